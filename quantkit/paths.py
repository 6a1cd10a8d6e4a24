"""One rule for names that become paths, and the join every writer uses.

Recipe values (the recipe name, ``model.name``, variant labels) end up in file and folder names. The
schema checks each one against ``NAME_RULE``; the code that writes a path checks again with
``inside``, so a recipe object that skipped the schema still cannot write outside its folder.

A pull request can also put files (and symlinks) where quantkit writes: ``runs/``, ``artifacts/``, a
lock's name. A folder a recipe names is joined from the project root with ``inside``, so a symlinked
``runs/`` leading elsewhere is refused; a fixed name in such a folder is written by ``write_atomic``
(a temp file renamed over the name, which replaces a symlink instead of following it) or opened by
``open_fixed`` (O_NOFOLLOW).
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path, PurePosixPath

from quantkit.errors import QuantkitError

NAME_MAX = 96
# Not starting with "." (hidden, "..") nor "-" (read as an option by the tools that get the name).
NAME_RE = re.compile(rf"^[A-Za-z0-9_][A-Za-z0-9._-]{{0,{NAME_MAX - 1}}}$")
NAME_RULE = (f"letters, digits, '.', '_' and '-' only, starting with a letter, digit or '_', "
             f"at most {NAME_MAX} characters")


class UnsafePathError(QuantkitError, ValueError):
    """A name that is not one safe path component, or a join that would leave its folder."""

    tip = "names in recipes are single path components: " + NAME_RULE


class LinkedWriteError(UnsafePathError):
    """A symlink where quantkit writes a fixed name (a lock, a run's report/): never written through."""

    tip = "remove the link: nothing in the project may link where quantkit writes"


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
    stays inside ``folder``; anything else raises UnsafePathError before a byte is written.

    ``folder`` itself is trusted (it is resolved before comparing): join a folder the recipe names from
    the project root, ``inside(root, *project_parts(rel), ...)``, so that a ``runs/`` or ``artifacts/``
    that is a symlink leading out of the project is refused like any other name."""
    base = Path(folder)
    path = base.joinpath(*(safe_name(n) for n in names))
    real_base = base.resolve()
    if not path.resolve().is_relative_to(real_base):
        raise UnsafePathError(f"{path} resolves to {path.resolve()}, outside {real_base}")
    return path


def not_a_link(path: str | Path) -> Path:
    """``path``, refused when it is a symlink: for a folder quantkit empties and fills (a run's ``report/``)."""
    if Path(path).is_symlink():
        raise LinkedWriteError(f"{path} is a symlink; quantkit never writes through one")
    return Path(path)


def project_parts(rel: str) -> tuple[str, ...]:
    """The components of a project-relative folder from a recipe (``runs``, ``out/artifacts``), for
    ``inside(root, *parts)``; each must be one safe name (no ``..``, no absolute path)."""
    return tuple(safe_name(p) for p in PurePosixPath(rel).parts)


def open_fixed(path: str | Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that refuses a symlink at ``path`` (O_NOFOLLOW) with UnsafePathError: for a fixed name
    (a lock, a log) in a folder that a pull request can fill."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LinkedWriteError(f"{path} is a symlink; quantkit never writes through one") from e
        raise


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync, rename it over ``path``: a reader never sees
    half a file, and a symlink at ``path`` is replaced, never written through."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
