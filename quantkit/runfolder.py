"""The run folder (``runs/<recipe>/``): links to every output, the manifest (``quantkit.manifest``), the recipe.

The run-folder node gets every other node's result and writes one versioned manifest: every input
(recipe, model files, calibration text, toolchain) and every output (store key, sha256 and size of
each file, scores). Publishing from it is ``quantkit.publish.fromrun``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from quantkit.digest import sha256_file, write_json_atomic
from quantkit.manifest import Manifest, ManifestStep, Projector, Variant
from quantkit.formats import FORMATS
from quantkit.paths import inside, open_fixed, project_parts, write_atomic
from quantkit.recipe import Recipe
from quantkit.store import Entry, Store, exclusive


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


def relative(path: Path, root: Path) -> str:
    return os.path.relpath(path, root) if path.is_relative_to(root) else str(path)


def _made_by(entry: Entry) -> tuple[str | None, str | None, str | None, int | None]:
    made = entry.info.get("made_by") or {}
    return made.get("host"), made.get("toolchain"), made.get("toolchain_dir"), made.get("threads")


def write_run_folder(ctx, deps, variants: list[Variant], projector: Entry | None) -> Path:
    """Link every output into ``runs/<recipe>/`` and write ``manifest.json``; return its path. ``projector``: the
    vision projector's entry, None for a model without one."""
    src = deps["source"]
    steps = tuple(ManifestStep(name, r.key, r.reused, r.info.get("seconds"), *_made_by(r))
                  for name, r in deps.items() if isinstance(r, Entry))
    out = run_dir(ctx.recipe, ctx.root)
    projectors = projector_records(projector, ctx.recipe.model.display_name) if projector is not None else []
    with run_folder_lock(ctx.recipe, ctx.root):
        out.mkdir(parents=True, exist_ok=True)
        for p in projectors:
            _place(ctx.store, projector, p.store_file, inside(out, p.file))
        for v in variants:
            fmt = FORMATS[v.format]
            if fmt.suffix is None:
                continue
            for name in fmt.store_files(v.entry):
                dest = inside(out, *fmt.placed(v.file_name, name).split("/"))
                dest.parent.mkdir(parents=True, exist_ok=True)
                _place(ctx.store, v.entry, name, dest)
        manifest = Manifest(
            recipe={"name": ctx.recipe.name, "file": relative(ctx.recipe_file, ctx.root),
                    "sha256": sha256_file(ctx.recipe_file), "resolved": ctx.recipe.model_dump(mode="json")},
            model=src.model.describe() | {"path": relative(src.model.path, ctx.root)},
            calibration=src.calibration.describe(),
            toolchain={"llama_cpp": ctx.tools.commit, "version": ctx.tools.version,
                       "origin": ctx.tools.origin, "cuda": ctx.tools.cuda} if ctx.toolchain else None,
            steps=steps, variants=tuple(v.describe() for v in variants), projectors=tuple(projectors))
        path = out / "manifest.json"
        write_json_atomic(path, manifest.to_dict())
        # The resolved recipe travels with what it produced.
        write_atomic(out / "recipe.yaml", ctx.recipe_file.read_bytes())  # replaces a symlink, never follows it
    return path


def projector_records(entry: Entry, model_name: str) -> list[Projector]:
    """The manifest's ``projectors``: per type, its name in the run folder and the GGUF repo, its store file,
    sha256 and size, and what the converter made (``quantkit.mmproj``)."""
    from quantkit.mmproj import TYPES, file_name, store_name

    made = entry.info.get("projectors") or {}
    return [Projector(file=file_name(model_name, t), type=t, store_file=store_name(t), step=entry.step,
                      key=entry.key, reused=entry.reused, sha256=entry.files[store_name(t)].sha256,
                      size=entry.files[store_name(t)].size, architecture=entry.info.get("architecture"),
                      projector_type=(made.get(t) or {}).get("projector_type"))
            for t in TYPES if store_name(t) in entry.files]


