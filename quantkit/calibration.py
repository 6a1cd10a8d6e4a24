"""Calibration text: the versioned files under calibration/, or a pinned Hub dataset."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import SourceError
from quantkit.nofollow import read_beneath
from quantkit.recipe import Calibration

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationText:
    text: str
    sha256: str
    sources: tuple[str, ...]  # files, or "hub:name/config/split@revision"

    def describe(self) -> dict:
        return {"sha256": self.sha256, "sources": list(self.sources), "chars": len(self.text)}


def load_calibration(spec: Calibration, *, root: Path) -> CalibrationText:
    if spec.files:
        # never through a symlink (quantkit.nofollow): a link would make the worker read one of its own files
        parts = [read_beneath(root, f).decode("utf-8") for f in spec.files]
        sources = tuple(spec.files)
    else:
        parts, sources = _from_hub(spec), (f"hub:{spec.dataset.name}/{spec.dataset.config or ''}/"
                                           f"{spec.dataset.split}@{spec.dataset.revision}",)
    text = "\n\n".join(p.strip("\n") for p in parts) + "\n"
    return CalibrationText(text, hashlib.sha256(text.encode()).hexdigest(), sources)


def _from_hub(spec: Calibration) -> list[str]:
    ds = spec.dataset
    try:
        import datasets
    except ImportError as e:
        raise SourceError("a Hub calibration dataset needs the 'datasets' package: pip install 'quantkit[hub]'") from e
    if Path(ds.name).exists():  # datasets would load this folder (or script) instead of the Hub repo
        raise SourceError(f"calibration dataset {ds.name} is also a path here; only a Hub repo id is loaded "
                          "(rename or remove the local folder)")
    try:
        rows = datasets.load_dataset(ds.name, ds.config, split=ds.split, revision=ds.revision)
    except Exception as e:  # datasets raises many types; the message names the cause
        raise SourceError(f"cannot load calibration dataset {ds.name}@{ds.revision}: {e}") from e
    if ds.column not in rows.column_names:
        raise SourceError(f"dataset {ds.name} has no column {ds.column!r} (columns: {rows.column_names})")
    return [r for r in rows[ds.column][: ds.max_rows] if isinstance(r, str) and r.strip()]
