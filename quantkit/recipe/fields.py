"""Shared pieces of the recipe schema: the strict base section, name/path/text validators, limits."""

from __future__ import annotations


import difflib
import re
from pathlib import Path, PurePosixPath
from typing import Annotated

import pydantic
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo

from quantkit.paths import name_problem


NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
TAG_RE = re.compile(r"^(refs/tags/[A-Za-z0-9][A-Za-z0-9._+-]{0,99}|v?[0-9][A-Za-z0-9._+-]{0,99})$")
REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
SAFE_TEXT_RE = re.compile(r"^[A-Za-z0-9 ._/@:+=,()\-]*$")
TENSOR_PATTERN_RE = re.compile(r"^[A-Za-z0-9_.*\-]{1,128}$")
MOVING_REFS = {"main", "master", "head", "dev", "develop", "latest"}
# model.track: a branch name or a tag pattern (fnmatch: * ? [..]); never a path ('..') or a ref prefix.
TRACK_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/*?\[\]+-]{0,99}$")
SDIST_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
RELEASE_RE = re.compile(r"^[0-9]{1,4}(\.[0-9]{1,4}){1,3}$")  # a llama-cpp-python release: 0.3.36
WORKER_ALLOWS_REMOTE_CODE = "QUANTKIT_ALLOW_REMOTE_CODE"
WORKER_ALLOWS_PICKLE = "QUANTKIT_ALLOW_PICKLE"
# Prefect expands these in prefect.yaml at deploy time ({{ $HF_TOKEN }}, {{ prefect.blocks.* }}); Jinja's
# statement marker too, so no recipe text that reaches a templated file can ask for a secret.
TEMPLATE_MARKERS = ("{{", "}}", "{%")


class Invalid(ValueError):
    """A validation failure that knows its fix (shown after the message) and, for cross-field rules,
    the recipe path it points at (``loc``), so the error names that line rather than the section's."""

    def __init__(self, message: str, fix: str, loc: tuple = ()):
        super().__init__(message)
        self.fix = fix
        self.loc = loc


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, str_strip_whitespace=False)


def _safe_text(value: str) -> str:
    """Strings end up in argument lists and file names: refuse shell syntax and control characters."""
    if not SAFE_TEXT_RE.match(value):
        bad = sorted({c for c in value if not SAFE_TEXT_RE.match(c)})
        shown = ", ".join(repr(c) for c in bad)
        raise Invalid(f"contains characters not allowed in a recipe: {shown}",
                      "use letters, digits, spaces and . _ / @ : + = , ( ) - only")
    return value


SafeText = Annotated[str, pydantic.AfterValidator(_safe_text), Field(max_length=200)]


def _safe_name(value: str) -> str:
    """A value that becomes a file or folder name: one safe path component (quantkit.paths)."""
    if (why := name_problem(value)) is not None:
        raise Invalid(why, "use a name like Q4_K_M-attn8 or my-model (no '/', no leading '.', no spaces)")
    return value


SafeName = Annotated[str, pydantic.AfterValidator(_safe_name)]


class _LinkedOut(Invalid):
    """A project path that a symlink leads out of the project: the link is what to fix, not the value."""


def _project_path(value: str, info: ValidationInfo) -> str:
    """A path relative to the project root that stays inside it, symlinks included."""
    _safe_text(value)
    pure = PurePosixPath(value)
    if pure.is_absolute() or value.startswith("~"):
        raise Invalid("absolute paths are not allowed", "write the path relative to the project root")
    if ".." in pure.parts:
        raise Invalid("'..' is not allowed: the path must stay inside the project", "move the file into the project")
    root = (info.context or {}).get("root")
    if root is not None:
        resolved = (Path(root) / pure).resolve()
        if not resolved.is_relative_to(Path(root).resolve()):
            raise _LinkedOut(f"resolves outside the project (a symlink leads to {resolved})",
                          "copy the file into the project instead of linking to it")
    return str(pure)


ProjectPath = Annotated[str, pydantic.AfterValidator(_project_path)]


def _project_dir(value: str, info: ValidationInfo) -> str:
    """A folder quantkit writes into (runs/, artifacts/): inside the project, symlinks included, and each
    component one safe name, because the writer joins it from the project root with ``paths.inside``."""
    try:
        value = _project_path(value, info)
    except _LinkedOut as e:
        raise Invalid(str(e), f"make '{value}' a real folder in the project (not a link), or write another "
                      "folder here") from None
    except Invalid as e:
        pure = PurePosixPath(value)
        if pure.is_absolute() or value.startswith("~") or ".." in pure.parts:
            raise Invalid(str(e), "write a folder inside the project, relative to its root (e.g. runs)") from None
        raise
    for part in PurePosixPath(value).parts:
        if (why := name_problem(part)) is not None:
            raise Invalid(f"folder '{value}': {why}", "use a folder name like runs or out/artifacts")
    return value


# Checked even when the recipe leaves it out (``validate_default``): a symlinked runs/ is refused either way.
ProjectDir = Annotated[str, pydantic.AfterValidator(_project_dir)]


def no_templating(value: str) -> str:
    """Text written into a file another tool templates (prefect.yaml): no template markers at all."""
    if found := [m for m in TEMPLATE_MARKERS if m in value]:
        raise Invalid(f"contains {' and '.join(repr(m) for m in found)}: prefect deploy would expand it as a "
                      "template (e.g. {{ $HF_TOKEN }} writes the token into the deployment)",
                      "remove the braces; write the text without {{, }} or {%")
    return value


def _repo_id(v: str | None) -> str | None:
    if v is not None and not REPO_RE.match(v):
        raise Invalid(f"'{v}' is not a Hugging Face repo id", "write owner/name, e.g. meta-llama/Llama-3.1-8B-Instruct")
    return v


def _pinned_revision(v: str) -> str:
    """A revision that names one fixed snapshot: a full commit sha or a tag."""
    if v.lower() in MOVING_REFS or v.startswith("refs/heads/") or v.startswith("refs/pr/"):
        raise Invalid(f"revision '{v}' is a branch, which moves", "pin a commit sha (40 hex digits) or a tag")
    if re.fullmatch(r"[0-9a-fA-F]{7,39}", v):
        raise Invalid(f"revision '{v}' is a short or partial sha", "write the full 40-digit commit sha")
    if not (COMMIT_RE.match(v) or TAG_RE.match(v)):
        raise Invalid(f"revision '{v}' is not a commit sha or a tag",
                      "write 40 lowercase hex digits, or a tag such as v1.2 or refs/tags/NAME")
    return v


def suggest(value: str, choices) -> str:
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]}?" if close else ""
