"""Does ``flock`` hold in the store? Checked once per process before it writes there.

The store's correctness rests on flock: a per-key lock makes a second builder wait, and a scratch
owner's lock tells a live run from a dead one (quantkit.store). On a filesystem where flock does not
hold, two machines would build the same entry at once and a sweeper would remove a live run's scratch.
Two ways it fails, both checked here:

- the probe: a lock file opened twice (two open file descriptions, as two processes would have); a
  non-blocking exclusive flock on the first must succeed and one on the second must fail. It fails on a
  filesystem that refuses flock (``ENOLCK``: NFSv3 with no lock daemon) or that grants every request;
- the mount: NFS with ``nolock`` or ``local_lock=flock|all`` keeps flocks on the client (nfs(5)): they
  hold between processes of one machine, so the probe passes, but another machine never sees them.

The refusal names the filesystem from /proc/mounts: its type, device, mount point and options.
"""

from __future__ import annotations

import fcntl
import os
import re
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import StoreError

MOUNTS = Path("/proc/mounts")
TIP = ("put QUANTKIT_STORE on a local filesystem, or on a shared one where flock works between machines "
       "(NFSv4, or NFSv3 with its lock daemon, mounted without nolock or local_lock): docs/distributed.md")


@dataclass(frozen=True)
class Mount:
    """One line of /proc/mounts (fstab(5) fields, octal escapes decoded)."""

    device: str
    point: Path
    fstype: str
    options: tuple[str, ...]

    @classmethod
    def parse(cls, line: str) -> Mount:
        device, point, fstype, options = line.split()[:4]
        return cls(_unescape(device), Path(_unescape(point)), fstype, tuple(options.split(",")))

    def __str__(self) -> str:
        return f"{self.fstype} ({self.device} mounted at {self.point}, options {','.join(self.options)})"


def _unescape(field: str) -> str:
    # /proc/mounts writes a space, tab, newline or backslash in a path as \040, \011, \012, \134
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_of(path: Path, mounts_text: str | None = None) -> Mount | None:
    """The mount that holds ``path``: the longest mount point above it (the last one mounted wins)."""
    path = Path(os.path.realpath(path))
    text = MOUNTS.read_text() if mounts_text is None else mounts_text
    best: Mount | None = None
    for line in text.splitlines():
        if len(line.split()) < 4:
            continue
        m = Mount.parse(line)
        inside = path == m.point or m.point in path.parents
        if inside and (best is None or len(m.point.parts) >= len(best.point.parts)):
            best = m
    return best


def local_only_locks(mount: Mount) -> str | None:
    """Why flocks on this mount stay on this machine, or None."""
    if not mount.fstype.startswith("nfs"):
        return None
    for opt in mount.options:
        if opt == "nolock" or opt in ("local_lock=flock", "local_lock=all"):
            return f"with {opt} an NFS client keeps flocks to itself: other machines never see them"
    return None


def probe(folder: Path) -> str | None:
    """Lock a new file in ``folder`` through one open, then try through a second: None when the second is
    refused (locks hold), else what happened."""
    path = folder / f".flock-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    first = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        second = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                return f"flock failed: {e.strerror} (errno {e.errno})"
            try:
                fcntl.flock(second, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            except OSError as e:
                return f"a second flock failed with {e.strerror} (errno {e.errno}) instead of waiting its turn"
            return "a second open of a lock file got the exclusive lock the first one held"
        finally:
            os.close(second)
    finally:
        os.close(first)
        path.unlink(missing_ok=True)


class LocksDoNotHold(StoreError):
    """The store's filesystem does not keep flock's promise (the message names the filesystem)."""

    tip = TIP


def refusal(root: Path, mount: Mount | None, why: str) -> LocksDoNotHold:
    where = str(mount) if mount else "a filesystem not in /proc/mounts"
    return LocksDoNotHold(f"the store {root} is on {where}, where flock does not hold: {why}; quantkit's store "
                          "relies on it to keep two builders of one entry apart and to tell a live run's scratch "
                          "from a dead one's")


_CHECKED: set[Path] = set()
_CHECKING = threading.Lock()


def require_working_locks(root: Path) -> None:
    """Raise LocksDoNotHold (naming the filesystem) unless flock holds under ``root``; once per process and root."""
    root = Path(os.path.realpath(root))
    with _CHECKING:
        if root in _CHECKED:
            return
        root.mkdir(parents=True, exist_ok=True)
        mount = mount_of(root) if MOUNTS.is_file() else None
        why = probe(root) or (local_only_locks(mount) if mount else None)
        if why:
            raise refusal(root, mount, why)
        _CHECKED.add(root)
