"""The run folder (``runs/<recipe>/``: links to every output, the manifest, the recipe) and its publish.

The run-folder node gets every other node's result and writes one versioned manifest: every input
(recipe, model files, calibration text, toolchain) and every output (store key, sha256 and size of
each file, scores).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantkit import __version__
from quantkit.digest import sha256_file, write_json_atomic
from quantkit.errors import StoreError
from quantkit.paths import inside, open_fixed, project_parts, write_atomic
from quantkit.recipe import Recipe
from quantkit.source import ModelSnapshot
from quantkit.store import Entry, FileRecord, Store, exclusive, file_problem

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


def run_dir(recipe: Recipe, root: Path) -> Path:
    # Joined from the project root: a runs/ that is a symlink leading out of the project is refused.
    return inside(root, *project_parts(recipe.output.dir), recipe.name)


def run_folder_lock(recipe: Recipe, root: Path) -> contextlib.AbstractContextManager[None]:
    """Held while a run writes runs/<name>/ and while it publishes from it: two runs of one recipe
    share that folder (their steps are shared through the store's own locks)."""
    folder = run_dir(recipe, root)
    lock = folder.with_name(f".{folder.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    os.close(open_fixed(lock, os.O_WRONLY | os.O_CREAT))  # a symlink planted at the lock's name is refused
    return exclusive(lock, f"writing and publishing {folder}")


def _place(store: Store, entry: Entry, name: str, dest: Path) -> None:
    """Put the store file ``name`` of ``entry`` at ``dest`` in the run folder; idempotent.

    A ``dest`` that already is that file (a re-run's hard link) is left alone. Anything else is
    replaced, after the file's sha256 was checked against ``entry.json`` (``Store.verify``)."""
    src = entry.path / name
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.unlink(missing_ok=True)  # also what earlier versions left behind
    if _same_file(src, dest):
        return
    store.verify(entry, [name])
    _link(src, dest)


def _same_file(src: Path, dest: Path) -> bool:
    try:
        a, b = src.stat(), dest.lstat()  # a symlink at dest is never "the same": it gets replaced
    except FileNotFoundError:
        return False
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)


def _link(src: Path, dest: Path) -> None:
    """Put a store file into the run folder: a hard link (no copy) when the filesystem allows."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    try:
        os.replace(tmp, dest)
    finally:
        # rename() does nothing when both names are already one file (POSIX): the tmp name would stay.
        tmp.unlink(missing_ok=True)


def _linked_files(manifest: dict) -> Iterator[tuple[dict, str, FileRecord]]:
    """``(variant, path in the run folder, record)`` of every store file a manifest's run folder links."""
    from quantkit.graph import FORMATS

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
    for v, rel, record in _linked_files(manifest):
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

    return [rel for _, rel, _ in _linked_files(manifest)
            if (a := size(published / rel)) is None or a != size(run_folder / rel)]


def _relative(path: Path, root: Path) -> str:
    return os.path.relpath(path, root) if path.is_relative_to(root) else str(path)


def variants_of(ctx, node, deps) -> list[Variant]:
    """The run's variants in report order, each with the scores its graph nodes produced."""
    from quantkit.graph import FORMATS, Source, build_graph, variant_scores

    stem = ctx.recipe.model.display_name
    nodes = build_graph(ctx.recipe)
    out = []
    for fmt, label, made_by in node.params["variants"]:
        made = deps[made_by]
        if isinstance(made, Source):  # the model folder itself, where it is
            entry, file_name = made.model.as_entry(), _relative(made.model.path, ctx.root)
        else:
            entry, file_name = made, FORMATS[fmt].file_name(stem, label)
        out.append(Variant(fmt, label, entry, file_name, variant_scores(ctx, made_by, deps, nodes)))
    return out


def _made_by(entry: Entry) -> tuple[str | None, str | None, str | None, int | None]:
    made = entry.info.get("made_by") or {}
    return made.get("host"), made.get("toolchain"), made.get("toolchain_dir"), made.get("threads")


def write_run_folder(ctx, node, deps) -> Path:
    """Link every output into ``runs/<recipe>/`` and write ``manifest.json``; return its path."""
    from quantkit.graph import FORMATS

    src = deps["source"]
    variants = variants_of(ctx, node, deps)
    steps = tuple(ManifestStep(name, r.key, r.reused, r.info.get("seconds"), *_made_by(r))
                  for name, r in deps.items() if isinstance(r, Entry))
    out = run_dir(ctx.recipe, ctx.root)
    projector = deps.get("mmproj")  # an Entry, or None for a model without a projector
    projectors = projector_records(projector, ctx.recipe.model.display_name) if isinstance(projector, Entry) else []
    with run_folder_lock(ctx.recipe, ctx.root):
        out.mkdir(parents=True, exist_ok=True)
        for p in projectors:
            _place(ctx.store, projector, p["store_file"], inside(out, p["file"]))
        for v in variants:
            fmt = FORMATS[v.format]
            if fmt.suffix is None:
                continue
            for name in fmt.store_files(v.entry):
                dest = inside(out, *fmt.placed(v.file_name, name).split("/"))
                dest.parent.mkdir(parents=True, exist_ok=True)
                _place(ctx.store, v.entry, name, dest)
        manifest = Manifest(
            recipe={"name": ctx.recipe.name, "file": _relative(ctx.recipe_file, ctx.root),
                    "sha256": sha256_file(ctx.recipe_file), "resolved": ctx.recipe.model_dump(mode="json")},
            model=src.model.describe() | {"path": _relative(src.model.path, ctx.root)},
            calibration=src.calibration.describe(),
            toolchain={"llama_cpp": ctx.tools.commit, "version": ctx.tools.version,
                       "origin": ctx.tools.origin, "cuda": ctx.tools.cuda} if ctx.toolchain else None,
            steps=steps, variants=tuple(v.describe() for v in variants), projectors=tuple(projectors))
        path = out / "manifest.json"
        write_json_atomic(path, manifest.to_dict())
        # The resolved recipe travels with what it produced.
        write_atomic(out / "recipe.yaml", ctx.recipe_file.read_bytes())  # replaces a symlink, never follows it
    return path


def projector_records(entry: Entry, model_name: str) -> list[dict]:
    """The manifest's ``projectors``: per type, its name in the run folder and the GGUF repo, its store file,
    sha256 and size, and what the converter made (``quantkit.mmproj``)."""
    from quantkit.mmproj import TYPES, file_name, store_name

    made = entry.info.get("projectors") or {}
    return [{"file": file_name(model_name, t), "type": t, "store_file": store_name(t), "step": entry.step,
             "key": entry.key, "reused": entry.reused, "sha256": entry.files[store_name(t)].sha256,
             "size": entry.files[store_name(t)].size, "architecture": entry.info.get("architecture"),
             "projector_type": (made.get(t) or {}).get("projector_type")} for t in TYPES if store_name(t) in entry.files]


def model_facts(model_dir: Path) -> dict:
    """What the report needs from the model's own files: config, chat template, EOS token."""
    def read(name: str) -> dict:
        p = model_dir / name
        return json.loads(p.read_text()) if p.is_file() else {}

    tok = read("tokenizer_config.json")
    template_file = model_dir / "chat_template.jinja"
    template = template_file.read_text() if template_file.is_file() else tok.get("chat_template")
    eos = tok.get("eos_token")
    if isinstance(eos, dict):  # older tokenizer configs wrap special tokens
        eos = eos.get("content")
    return {"config": read("config.json"), "chat_template": template if isinstance(template, str) else None,
            "eos_token": eos}


def publish_run(ctx, model: ModelSnapshot, manifest_path: Path) -> Any:
    """Render the report, apply the regression gate, publish (local store by default)."""
    from quantkit.publish.release import release
    from quantkit.recipe import Publish
    from quantkit.tracking import record_for

    facts = model_facts(model.path)
    calib_readme = ctx.root / "calibration" / "README.md"
    manifest = Manifest.read(manifest_path).to_dict()

    def verify() -> None:
        """Every file about to be published matches the manifest's sha256. The run folder holds hard links
        into the store, so a damaged file's store entry is checked too and moved aside if damaged: the next
        run rebuilds it and links the good file."""
        damaged = damaged_files(manifest_path.parent, manifest, digests=True)
        for step, key in dict.fromkeys((v["step"], v["key"]) for v, _ in damaged):
            ctx.store.recheck(step, key)
        if damaged:
            more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
            raise StoreError(f"not published: {damaged[0][1]}{more}; run again to rebuild it")

    with run_folder_lock(ctx.recipe, ctx.root):
        return release(run_dir=manifest_path.parent, manifest=manifest, root=ctx.root, verify=verify,
                       settings=ctx.recipe.publish or Publish(), recipe_yaml=ctx.recipe_file.read_text(),
                       config=facts["config"], chat_template=facts["chat_template"], eos_token=facts["eos_token"],
                       calibration_readme=calib_readme.read_text() if calib_readme.is_file() else None,
                       gguf_split=ctx.toolchain.binary("llama-gguf-split") if ctx.toolchain else None,
                       tracking=record_for(ctx.recipe_file))
