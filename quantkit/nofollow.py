"""Reading what a pull request brings without following a symlink.

A recipe points at files the same pull request adds: a model folder, task folders, calibration and
evaluation text. A symlink among them would make the worker read a file of its own (a token, a key)
and publish it inside a GGUF or a checkpoint. So nothing a recipe points at may be a symlink or sit
under one: validation refuses them (``quantkit.recipe``), the steps refuse them again when they read
(``quantkit.source``, ``quantkit.scoring.tasks``), and Python opens every such file with ``O_NOFOLLOW``
component by component from the project root, so a file swapped for a link after validation is
refused as well.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from quantkit.paths import UnsafePathError

CHUNK = 8 * 1024 * 1024
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
# O_NONBLOCK: a FIFO planted in place of a file must not hang the open; a regular file ignores it.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC


class SymlinkError(UnsafePathError):
    """A file or folder a recipe points at is a symlink (or not a regular file): it is never followed."""

    tip = "commit the file itself, not a link to it: quantkit reads no file a recipe points at through a symlink"


def _parts(rel: str | PurePosixPath) -> tuple[str, ...]:
    pure = PurePosixPath(rel)
    if pure.is_absolute() or any(p in ("", ".", "..") for p in pure.parts) or not pure.parts:
        raise UnsafePathError(f"'{rel}' is not a relative path inside its folder")
    return pure.parts


def symlink_on_path(root: Path, rel: str | PurePosixPath) -> str | None:
    """The first of ``rel``'s leading paths below ``root`` that is a symlink (``a``, ``a/b``, ...), or None.

    ``root`` itself is trusted (the project, found by quantkit); missing parts end the walk."""
    parts = _parts(rel)
    cur = Path(root)
    for i, part in enumerate(parts):
        cur = cur / part
        try:
            st = cur.lstat()
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            return "/".join(parts[: i + 1])
    return None


def symlinks_below(folder: Path, *, allow=None) -> list[str]:
    """Every symlink inside ``folder`` (files and folders, never descending through one), as paths
    relative to it; ``allow(path)`` may accept one (the Hub cache's links to its own blobs)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink() and not (allow is not None and allow(path)):
                out.append(path.relative_to(folder).as_posix())
    return sorted(out)


def regular_files_below(folder: Path) -> list[Path]:
    """Every regular file inside ``folder``, sorted; raises SymlinkError on any symlink or special file."""
    links = symlinks_below(folder)
    if links:
        raise SymlinkError(f"{folder / links[0]} is a symlink")
    out = []
    for dirpath, _, filenames in os.walk(folder, followlinks=False):
        for name in filenames:
            path = Path(dirpath) / name
            if not stat.S_ISREG(path.lstat().st_mode):
                raise SymlinkError(f"{path} is not a regular file")
            out.append(path)
    return sorted(out)


def _refused(path: str, e: OSError) -> SymlinkError:
    return SymlinkError(f"{path} is a symlink or not a regular file ({os.strerror(e.errno)})")


def _checked(fd: int, shown: str) -> BinaryIO:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise SymlinkError(f"{shown} is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def open_beneath(root: Path, rel: str | PurePosixPath) -> BinaryIO:
    """Open ``root/rel`` for reading, refusing a symlink in any part of ``rel`` (each folder is opened
    with ``O_NOFOLLOW`` relative to the one before, so a part swapped for a link is not followed)."""
    parts = _parts(rel)
    shown = str(Path(root).joinpath(*parts))
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    try:
        for i, part in enumerate(parts[:-1]):
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _refused(str(Path(root).joinpath(*parts[: i + 1])), e) from None
                raise
            os.close(fd)
            fd = nxt
        try:
            leaf = os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENXIO):
                raise _refused(shown, e) from None
            raise
    finally:
        os.close(fd)
    return _checked(leaf, shown)


def open_nofollow(path: Path) -> BinaryIO:
    """Open ``path`` for reading; its last part must not be a symlink (for folders checked as a whole)."""
    try:
        fd = os.open(path, _FILE_FLAGS)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):
            raise _refused(str(path), e) from None
        raise
    return _checked(fd, str(path))


def read_beneath(root: Path, rel: str | PurePosixPath) -> bytes:
    with open_beneath(root, rel) as f:
        return f.read()


def sha256_of(f: BinaryIO, *, copy_to: BinaryIO | None = None) -> str:
    """sha256 of what ``f`` holds from here on; with ``copy_to``, written there in the same pass."""
    h = hashlib.sha256()
    while block := f.read(CHUNK):
        h.update(block)
        if copy_to is not None:
            copy_to.write(block)
    return h.hexdigest()
