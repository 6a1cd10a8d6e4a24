"""One rule for names that become paths, and the join every writer uses.

Recipe values (the recipe name, ``model.name``, variant labels) end up in file and folder names. The
schema checks each one against ``NAME_RULE``; the code that writes a path checks again with
``inside``, so a recipe object that skipped the schema still cannot write outside its folder.
"""

from __future__ import annotations

import re
from pathlib import Path

from quantkit.errors import QuantkitError

NAME_MAX = 96
# Not starting with "." (hidden, "..") nor "-" (read as an option by the tools that get the name).
NAME_RE = re.compile(rf"^[A-Za-z0-9_][A-Za-z0-9._-]{{0,{NAME_MAX - 1}}}$")
NAME_RULE = (f"letters, digits, '.', '_' and '-' only, starting with a letter, digit or '_', "
             f"at most {NAME_MAX} characters")


class UnsafePathError(QuantkitError, ValueError):
    """A name that is not one safe path component, or a join that would leave its folder."""

    tip = "names in recipes are single path components: " + NAME_RULE


def name_problem(name: object) -> str | None:
    """Why ``name`` is not one safe path component, or None when it is."""
    if not isinstance(name, str):
        return f"{name!r} is not a string"
    if name in {"", ".", ".."} or not NAME_RE.match(name):
        return f"'{name}' is not one safe path component ({NAME_RULE})"
    return None


def safe_name(name: str) -> str:
    if (why := name_problem(name)) is not None:
        raise UnsafePathError(why)
    return name


def inside(folder: str | Path, *names: str) -> Path:
    """``folder/name/...`` where each name is one safe component and the result, symlinks resolved,
    stays inside ``folder``; anything else raises UnsafePathError before a byte is written."""
    base = Path(folder)
    path = base.joinpath(*(safe_name(n) for n in names))
    real_base = base.resolve()
    if not path.resolve().is_relative_to(real_base):
        raise UnsafePathError(f"{path} resolves to {path.resolve()}, outside {real_base}")
    return path
