"""``runs/<recipe>/manifest.json``: the schema of the record of one run, and checks of files against it.

The run-folder node (``quantkit.runfolder``) writes it: every input (recipe, model files, calibration
text, toolchain) and every output (store key, sha256 and size of each file, scores). The report, the
publisher and `store gc` read it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quantkit import __version__
from quantkit.errors import StoreError
from quantkit.nodes import FORMATS
from quantkit.paths import inside
from quantkit.store import Entry, FileRecord, file_problem

MANIFEST_SCHEMA = 2  # 2: steps are graph nodes (kind:label), base logits not listed (transient)
READABLE_SCHEMAS = (1, 2)  # 1 listed the same fields with hand-written step names


@dataclass(frozen=True)
class ManifestStep:
    """One stored node of the run: its store key, whether it was reused, how long it took when built, and
    the machine that built it (host name, llama.cpp build and its folder there, threads; None in manifests
    before they were kept)."""

    step: str
    key: str
    reused: bool
    seconds: float | None
    host: str | None = None
    toolchain: str | None = None
    toolchain_dir: str | None = None
    threads: int | None = None


@dataclass(frozen=True)
class Manifest:
    """``runs/<recipe>/manifest.json``: every input and every output of one run, versioned."""

    recipe: dict  # name, file, sha256, resolved
    model: dict  # repo, revision, commit, path, digest, files
    calibration: dict  # sha256, sources, chars
    toolchain: dict | None  # llama_cpp, version, origin, cuda
    steps: tuple[ManifestStep, ...]
    variants: tuple[dict, ...]  # Variant.describe()
    quantkit: str = __version__
    schema: int = MANIFEST_SCHEMA
    projectors: tuple[dict, ...] = ()  # a VLM's mmproj files (projector_records); the key is absent without any

    def to_dict(self) -> dict:
        return {"schema": self.schema, "quantkit": self.quantkit, "recipe": self.recipe, "model": self.model,
                "calibration": self.calibration, "toolchain": self.toolchain,
                "steps": [asdict(s) for s in self.steps], "variants": list(self.variants),
                **({"projectors": list(self.projectors)} if self.projectors else {})}

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        if data.get("schema") not in READABLE_SCHEMAS:
            raise StoreError(f"manifest schema {data.get('schema')!r} is not one this quantkit reads "
                             f"({', '.join(map(str, READABLE_SCHEMAS))})")
        return cls(recipe=data["recipe"], model=data["model"], calibration=data["calibration"],
                   toolchain=data.get("toolchain"), steps=tuple(ManifestStep(**s) for s in data["steps"]),
                   variants=tuple(data["variants"]), quantkit=data["quantkit"], schema=data["schema"],
                   projectors=tuple(data.get("projectors") or ()))

    @classmethod
    def read(cls, path: Path) -> Manifest:
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class Variant:
    """One produced artifact of the run, as the report and publishing see it."""

    format: str  # "gguf", "gptq", "awq", "hf", "rtn" (a reference: scored, never linked or published)
    label: str
    entry: Entry
    file_name: str | None  # name in the run folder; None for a reference, which stays in the store
    scores: dict = field(default_factory=dict)  # Score.to_dict() plus "speed", "tasks"

    def describe(self) -> dict:
        return {"format": self.format, "label": self.label, "file": self.file_name, "step": self.entry.step,
                "key": self.entry.key, "reused": self.entry.reused, "files": {
                    n: {"sha256": r.sha256, "size": r.size} for n, r in self.entry.files.items()},
                "info": self.entry.info, "scores": self.scores}


def linked_files(manifest: dict) -> Iterator[tuple[dict, str, FileRecord]]:
    """``(variant, path in the run folder, record)`` of every store file a manifest's run folder links."""
    for v in manifest["variants"]:
        fmt = FORMATS.get(v.get("format"))
        if fmt is None or fmt.suffix is None or not v.get("file"):
            continue
        for name, rec in (v.get("files") or {}).items():
            yield v, fmt.placed(v["file"], name), FileRecord(rec["sha256"], rec["size"])
    for p in manifest.get("projectors") or []:
        yield p, p["file"], FileRecord(p["sha256"], p["size"])


def damaged_files(folder: Path, manifest: dict, *, digests: bool = False) -> list[tuple[dict, str]]:
    """``(variant, what is wrong)`` for each file a manifest lists that ``folder`` (a run folder or a
    published run) does not hold as recorded: its size, and with ``digests`` its sha256."""
    found = []
    for v, rel, record in linked_files(manifest):
        problem = file_problem(inside(folder, *rel.split("/")), record, digest=digests)
        if problem is not None:
            found.append((v, f"{folder.name}/{rel}: {problem}"))
    return found


def differing_files(published: Path, run_folder: Path, manifest: dict) -> list[str]:
    """The files of ``manifest`` whose size in ``published`` is not their size in ``run_folder`` (or
    that either lacks): a published run that shared a damaged store file, rebuilt since. Cheap."""
    def size(path: Path) -> int | None:
        with contextlib.suppress(OSError):
            return path.lstat().st_size
        return None

    return [rel for _, rel, _ in linked_files(manifest)
            if (a := size(published / rel)) is None or a != size(run_folder / rel)]
