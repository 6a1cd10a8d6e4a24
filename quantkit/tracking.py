"""Tracking runs: resolve what a recipe follows upstream (``model.track``, ``toolchain.track``) into new pins.

A plain run uses the recipe's pins. ``quantkit run --track`` (and the nightly deployment) first asks the Hub
for the commit ``model.track`` names now and the package index for the newest llama-cpp-python release
``toolchain.track`` allows. Nothing moved: the recipe runs as it is. Something moved: the recipe with the
new pins, its lines edited in place (comments kept), is written to ``<output.dir>/<name>.tracked/recipe.yaml``
with ``tracking.json`` beside it (the pins before and after, and the pin bump as a unified diff of the
recipe), and that file is what the run uses: every node, in every process, reads the same pins, and the
manifest records them. The release step finds ``tracking.json`` beside the recipe it ran, compares with the
last published release and publishes or holds (``quantkit.publish.release``). docs/nightly.md tells the story.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from quantkit.digest import sha256_file, write_json_atomic
from quantkit.errors import QuantkitError
from quantkit.paths import inside, project_parts, write_atomic
from quantkit.recipe import COMMIT_RE, Recipe, find_project_root, load_recipe
from quantkit.yamlsrc import parse_yaml

log = logging.getLogger(__name__)

RECORD = "tracking.json"
PATCH = "pin-bump.patch"  # written into the run folder when a tracking run publishes
SUFFIX = ".tracked"
_RECIPE_PATH = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/-]{0,199}\.ya?ml$")


class TrackingError(QuantkitError):
    tip = "docs/nightly.md: what model.track and toolchain.track follow"


@dataclass(frozen=True)
class Resolution:
    """What the recipe pins and what its ``track`` fields name upstream now."""

    repo: str | None = None
    model_track: str | None = None
    model_ref: str | None = None  # the branch, or the newest tag matching the pattern
    model_before: str | None = None  # the recipe's revision
    model_before_commit: str | None = None  # the commit that revision names
    model_after: str | None = None  # the commit the track names now
    toolchain_track: str | None = None
    toolchain_before: str | None = None  # llama-cpp-python version the recipe builds with
    toolchain_after: str | None = None
    sdist_sha256: str | None = None  # of toolchain_after, once fetched (by this run or an earlier one)
    llama_cpp_after: str | None = None  # the commit toolchain_after vendors, once fetched
    toolchain_built: str | None = None  # the cache folder where toolchain_after is built already

    @property
    def model_changed(self) -> bool:
        return self.model_after is not None and self.model_after != self.model_before_commit

    @property
    def toolchain_changed(self) -> bool:
        return self.toolchain_after is not None and self.toolchain_after != self.toolchain_before

    @property
    def changed(self) -> bool:
        return self.model_changed or self.toolchain_changed

    def lines(self) -> list[str]:
        """One line per tracked input, as ``plan --track`` and ``run --track`` print them."""
        out = []
        if self.model_track:
            out.append(f"model: {self.repo} {self.model_ref} is at {self.model_after}; the recipe pins "
                       f"{self.model_before}" + (": changed" if self.model_changed else ": unchanged"))
        if self.toolchain_track:
            tail = ""
            if self.toolchain_changed:
                built = f"; built in {self.toolchain_built}" if self.toolchain_built else ""
                tail = (f": changed (llama.cpp {self.llama_cpp_after}, sdist sha256 {self.sdist_sha256[:12]}{built})"
                        if self.sdist_sha256 else ": changed (fetched and built by the run, in its own cache folder)")
            out.append(f"toolchain: newest llama-cpp-python for {self.toolchain_track!r} is {self.toolchain_after}; "
                       f"the recipe builds with {self.toolchain_before}" + (tail or ": unchanged"))
        return out or ["nothing tracked: the recipe has no model.track or toolchain.track"]

    def to_dict(self) -> dict:
        return {**asdict(self), "changed": self.changed}


def resolve(recipe: Recipe, *, fetch: bool, hub_api=None, versions: list[str] | None = None) -> Resolution:
    """Ask the Hub and the package index what the recipe's ``track`` fields name now. ``fetch``: download a
    newer llama-cpp-python sdist into its own cache folder, which pins its sha256 and commit (a run); without
    it (a plan) those are known only when an earlier run fetched it, and nothing is written."""
    from quantkit.errors import ToolchainError
    from quantkit.source import resolve_track
    from quantkit.toolchain import (PIN, default_cuda, fetch_release, fetched_release, find_release_toolchain,
                                    newest_release, release_dir)

    out: dict = {}
    m = recipe.model
    if m.track is not None:
        ref, commit = resolve_track(repo=m.repo, track=m.track, api=hub_api)
        before = m.revision
        if not COMMIT_RE.match(before):  # a tag: compare the commits it and the track name
            before_commit = resolve_track(repo=m.repo, track=before.removeprefix("refs/tags/"), api=hub_api)[1]
        else:
            before_commit = before
        out.update(repo=m.repo, model_track=m.track, model_ref=ref, model_before=before,
                   model_before_commit=before_commit, model_after=commit)
    tc = recipe.toolchain
    if tc is not None and tc.track is not None:
        before = tc.version or PIN.version
        after = newest_release(tc.track, versions)
        out.update(toolchain_track=tc.track, toolchain_before=before, toolchain_after=after)
        if after != before:
            cuda = default_cuda(None)
            folder = release_dir(after, cuda)
            pin = fetched_release(after, folder)  # an earlier night's fetch: its pins are known offline
            if pin is None and fetch:
                folder.mkdir(parents=True, exist_ok=True)
                pin = fetch_release(after, folder)
            if pin is not None:
                out.update(sdist_sha256=pin.sdist_sha256, llama_cpp_after=pin.commit)
                try:  # built on an earlier night too: a plan can compute the keys the run will use
                    out.update(toolchain_built=str(find_release_toolchain(after, pin.sdist_sha256, cuda=cuda)
                                                   .bin_dir.parent))
                except ToolchainError:
                    pass
    return Resolution(**out)


# --- the recipe with new pins -----------------------------------------------------------------------

def _set(line: str, key: str, value: str) -> str | None:
    """``line`` with the value of ``key:`` (block or flow style, quoted or not) replaced; None if absent."""
    pattern = re.compile(rf"(?<![\w-])({re.escape(key)}:\s*)([\"']?)[^,\"'}}\s#]+([\"']?)")
    new, n = pattern.subn(lambda mt: f"{mt.group(1)}{mt.group(2)}{value}{mt.group(3)}", line, count=1)
    return new if n else None


def pinned_text(text: str, *, file: str, model_commit: str | None = None,
                toolchain: tuple[str, str] | None = None) -> str:
    """The recipe's text with new pins, edited line by line so every comment and the layout stay:
    ``model.revision`` set to ``model_commit``, ``toolchain.version``/``sdist_sha256`` to ``toolchain``."""
    _, lines = parse_yaml(text.encode("utf-8"), file)
    out = text.splitlines(keepends=True)

    def edit(path: tuple, key: str, value: str) -> bool:
        at = lines.get(path)
        if at is None:
            return False
        new = _set(out[at - 1], key, value)
        if new is None:
            raise TrackingError(f"{file}:{at}: could not find the value of '{key}' on its line to pin {value}")
        out[at - 1] = new
        return True

    if model_commit is not None:
        edit(("model", "revision"), "revision", model_commit)
    if toolchain is not None:
        version, sha = toolchain
        have_version = edit(("toolchain", "version"), "version", version)
        have_sha = edit(("toolchain", "sdist_sha256"), "sdist_sha256", sha)
        if not (have_version and have_sha):
            if have_version or have_sha:
                raise TrackingError(f"{file}: toolchain has only one of version and sdist_sha256")
            at = lines[("toolchain", "track")]
            line = out[at - 1]
            if lines[("toolchain",)] == at and "{" in line:  # flow style: toolchain: {track: latest}
                i = line.index("{") + 1
                out[at - 1] = f"{line[:i]}version: {version}, sdist_sha256: {sha}, {line[i:].lstrip()}"
            else:
                indent = line[: len(line) - len(line.lstrip())]
                out.insert(at, f"{indent}version: {version}\n{indent}sdist_sha256: {sha}\n")
    return "".join(out)


def pin_patch(before: str, after: str, rel: str) -> str:
    """The pin bump as a unified diff of the recipe file (``git apply`` takes it)."""
    return "".join(difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                        fromfile=f"a/{rel}", tofile=f"b/{rel}"))


# --- a tracking run ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrackedRun:
    recipe_file: Path  # what the run uses: the recipe itself when nothing moved, else the re-pinned copy
    resolution: Resolution


def tracked_folder(recipe: Recipe, root: Path) -> Path:
    return inside(root, *project_parts(recipe.output.dir), f"{recipe.name}{SUFFIX}")


def prepare(recipe_file: str | Path, *, hub_api=None, versions: list[str] | None = None) -> TrackedRun:
    """Resolve the recipe's tracks; when something moved, write the re-pinned recipe and its record and
    return it as the file to run. Raises TrackingError (nothing written) when the Hub or index cannot say."""
    path = Path(recipe_file)
    root = find_project_root(path.parent)
    recipe = load_recipe(path, root=root)
    if recipe.model.track is None and (recipe.toolchain is None or recipe.toolchain.track is None):
        raise TrackingError(f"{path} tracks nothing: add model.track or toolchain.track to follow upstream")
    res = resolve(recipe, fetch=True, hub_api=hub_api, versions=versions)
    for line in res.lines():
        log.info("track %s", line)
    folder = tracked_folder(recipe, root)
    if not res.changed:
        return TrackedRun(path.resolve(), res)
    text = path.read_text(encoding="utf-8")
    rel = path.resolve().relative_to(root.resolve()).as_posix() if path.resolve().is_relative_to(root.resolve()) \
        else path.name
    new = pinned_text(text, file=rel, model_commit=res.model_after if res.model_changed else None,
                      toolchain=(res.toolchain_after, res.sdist_sha256) if res.toolchain_changed else None)
    folder.mkdir(parents=True, exist_ok=True)
    target = inside(folder, "recipe.yaml")
    write_atomic(target, new.encode("utf-8"))
    pinned = load_recipe(target, root=root)  # the edit gave a valid recipe with exactly the new pins
    if (res.model_changed and pinned.model.revision != res.model_after) or \
            (res.toolchain_changed and pinned.toolchain.version != res.toolchain_after):
        raise TrackingError(f"editing {rel} did not pin {res.model_after or res.toolchain_after}")
    write_json_atomic(inside(folder, RECORD), {
        "recipe": rel, "recipe_sha256": sha256_file(path), "pinned_sha256": sha256_file(target),
        "resolution": res.to_dict(), "patch": pin_patch(text, new, rel)})
    log.info("tracking run of %s with new pins: %s", rel, target)
    return TrackedRun(target, res)


def record_for(recipe_file: Path) -> dict | None:
    """The tracking record of a run's recipe file, when it is a re-pinned copy ``prepare`` wrote."""
    recipe_file = Path(recipe_file)
    if recipe_file.name != "recipe.yaml" or not recipe_file.parent.name.endswith(SUFFIX):
        return None
    record = recipe_file.parent / RECORD
    if not record.is_file() or record.is_symlink():
        return None
    data = json.loads(record.read_text(encoding="utf-8"))
    # Written by prepare for exactly this file, naming a recipe of the project: anything else (a record
    # edited, or committed under runs/ in a pull request) would steer the patch and the pull request.
    rel = data.get("recipe") if isinstance(data, dict) else None
    if data.get("pinned_sha256") != sha256_file(recipe_file) or not isinstance(rel, str) or \
            not _RECIPE_PATH.match(rel) or ".." in rel.split("/"):
        raise TrackingError(f"{record} does not belong to {recipe_file} (its sha256 or its recipe path differ): "
                            "run `quantkit run --track` on the recipe again")
    return data


@dataclass(frozen=True)
class TrackedPlan:
    """What ``plan --track`` plans with: the resolution, the recipe with the new pins it can know (None: the
    recipe's own), and the newer release's toolchain when it is built already (None: the recipe's, or none)."""

    resolution: Resolution
    recipe: Recipe | None
    toolchain: object | None  # quantkit.toolchain.Toolchain


def plan_recipe(recipe_file: str | Path, *, hub_api=None) -> TrackedPlan:
    """For ``plan --track``: what would change, and the recipe with the new pins. A newer toolchain is not
    fetched by a plan; when an earlier tracking run fetched and built it, its pins and its build are used, so
    the nodes whose store entries exist under its keys show as done. Otherwise the recipe keeps its toolchain
    and the caller shows the nodes after the source as to do."""
    from quantkit.toolchain import find_release_toolchain

    path = Path(recipe_file)
    root = find_project_root(path.parent)
    recipe = load_recipe(path, root=root)
    res = resolve(recipe, fetch=False, hub_api=hub_api)
    toolchain = None
    if res.toolchain_changed and res.toolchain_built:
        # resolve() found it built a moment ago; found again here for the Toolchain itself
        toolchain = find_release_toolchain(res.toolchain_after, res.sdist_sha256)
    if not res.model_changed and toolchain is None:
        return TrackedPlan(res, None, None)
    text = pinned_text(path.read_text(encoding="utf-8"), file=path.name,
                       model_commit=res.model_after if res.model_changed else None,
                       toolchain=(res.toolchain_after, res.sdist_sha256) if toolchain is not None else None)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        return TrackedPlan(res, load_recipe(Path(f.name), root=root), toolchain)
