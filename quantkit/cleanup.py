"""`quantkit store gc`: remove what no live run owns.

Always: scratch folders of dead runs and staging folders no build holds (``Store.leftovers``).
With ``entries=True`` also finished store entries that nothing references: not a run folder's
manifest (``runs/*/manifest.json``), not a published run's (``artifacts/*/*/manifest.json``), not
a live run (the entries it has used so far). An entry counts as referenced when its key appears in
a manifest; a measurement (a score, a benchmark, a task result) also when its inputs name something
a manifest names (the variant it measured). Every removal happens under the lock its owner or
builder would hold, so a run that starts meanwhile is never robbed.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.errors import StoreError
from quantkit.store import ENTRY, SCRATCH, Leftover, Store

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"[0-9a-f]{32}|[0-9a-f]{64}")
_KEY = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class Collected:
    items: tuple[Leftover, ...]
    removed: bool

    @property
    def size(self) -> int:
        return sum(i.size for i in self.items)


def manifests(project: Path, runs: Iterable[str] = ("runs",), artifacts: str = "artifacts") -> list[Path]:
    """Manifests of run folders and of published runs under ``project``."""
    found = [m for r in runs for m in sorted((project / r).glob("*/manifest.json"))]
    found += sorted((project / artifacts).glob("*/*/manifest.json"))
    return found


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def referenced(manifest_files: Iterable[Path]) -> set[str]:
    """Every digest-looking string (store keys, sha256) the manifests hold."""
    refs: set[str] = set()
    for path in manifest_files:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise StoreError(f"cannot read {path} ({e}); fix or remove it before collecting store entries") from e
        refs.update(s for s in _strings(data) if _DIGEST.fullmatch(s))
    return refs


def unreferenced_entries(store: Store, refs: set[str]) -> list[Leftover]:
    """Finished entries neither ``refs`` nor a live run names; ``note`` says which step."""
    from quantkit.graph import large_store_steps

    large = large_store_steps()  # models, the base logits: kept only when a manifest names their key
    live = store.live_uses()
    out = []
    for entry_file in sorted(store.root.glob(f"*/*/{ENTRY}")):
        folder = entry_file.parent
        step, key = folder.parent.name, folder.name
        if step == SCRATCH or not _KEY.fullmatch(key) or key in refs or (step, key) in live:
            continue
        if step not in large:
            try:
                inputs = json.loads(entry_file.read_text()).get("inputs", {})
            except (OSError, ValueError):
                inputs = None  # unreadable: keep it, the store reports it when used
            if inputs is None or any(s in refs for s in _strings(inputs) if _DIGEST.fullmatch(s)):
                continue
        out.append(Leftover(folder, "entry", _freed(folder), step))
    return out


def _freed(folder: Path) -> int:
    """Bytes removing ``folder`` gives back: files hard-linked elsewhere (a run folder) stay on disk."""
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_nlink == 1:
                total += st.st_size
    return total


def collect(store: Store, *, project: Path, entries: bool = False, dry_run: bool = False,
            runs: Iterable[str] = ("runs",), artifacts: str = "artifacts") -> Collected:
    """List (``dry_run``) or remove dead scratch, dead staging and, with ``entries``, unreferenced entries."""
    items = store.leftovers() if dry_run else store.sweep()
    if entries:
        found = manifests(project, runs, artifacts)
        if not found and not dry_run:
            raise StoreError(f"no run manifests under {project} ({', '.join(runs)}/*/manifest.json, "
                             f"{artifacts}/*/*/manifest.json): every store entry would count as unreferenced; "
                             "run from the project folder (or pass --project), or use --dry-run to see the list")
        candidates = unreferenced_entries(store, referenced(found))
        if not dry_run:
            candidates = [c for c in candidates if store.remove(c.path.parent.name, c.path.name)]
        items += candidates
    return Collected(tuple(items), removed=not dry_run)
