"""Content-addressed store for step outputs, and the scratch space of the runs using it.

A step's output folder is ``<root>/<step>/<key>/`` where ``key`` is the digest of
everything that determines the output (recipe section, input digests, tool
version). It is built in a staging folder and renamed into place only after
``entry.json`` (inputs, outputs with sha256 and size, timings) is written and every
file is fsynced, so a folder at the final path is always complete, even after a power
loss. A per-key lock makes a second process wait for the first instead of building
the same thing twice.

The store never serves a damaged entry: ``Store.check`` is the one place that decides
whether an entry is intact. Every reuse (``get``, hence ``ensure`` and the executor's
lazy reuse) compares each file's size with ``entry.json``, which is cheap; a file about
to be linked into a run folder or published is compared by sha256 (``Store.verify``).
A damaged entry is moved aside with a warning naming it, and the next build makes it
again.

Everything temporary a process needs (staging folders, GPTQModel's offload
folder, base logits, lm-eval task includes) lives in its own scratch folder,
``<root>/scratch/<owner>/``, next to ``<root>/scratch/<owner>.lock``, which the
process holds with ``flock`` for as long as it lives. ``Store.scratch(purpose)``
hands out a subfolder and removes it when the ``with`` block ends, however it
ends; the owner folder goes at interpreter exit. The kernel drops the lock when
its holder dies (SIGKILL, OOM, a lost machine), so the next process that uses
the store can tell a dead owner's folder from a live one and removes it
(``Store.sweep``; ``quantkit store gc`` does the same on demand).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.digest import digest_of, sha256_file, write_json_atomic
from quantkit.errors import StoreError
from quantkit.paths import inside
from quantkit.storelocks import require_working_locks

log = logging.getLogger(__name__)

ENTRY = "entry.json"
ENTRY_SCHEMA = 1
SCRATCH = "scratch"  # <root>/scratch/<owner>/ and <root>/scratch/<owner>.lock
STAGING_PREFIX = ".tmp-"  # a staging folder: <owner>/<step>/.tmp-<key>-<random>/
USES = "entries"  # in an owner's folder: the "<step>/<key>" lines it used, so gc keeps them
_KEY = re.compile(r"[0-9a-f]{32}")
_PURPOSE = re.compile(r"[a-z0-9][a-z0-9._-]{0,40}")


@dataclass(frozen=True)
class FileRecord:
    sha256: str
    size: int


def file_problem(path: Path, record: FileRecord, *, digest: bool = False) -> str | None:
    """What is wrong with ``path`` against its record (size; with ``digest``, sha256 too), or None.

    The one check of a stored file, used for store entries and for the run-folder and published
    copies a manifest lists."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return f"{path.name} is missing"
    except OSError as e:
        return f"{path.name} cannot be read ({e.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return f"{path.name} is not a regular file"
    if st.st_size != record.size:
        return f"{path.name} is {st.st_size} bytes, its record says {record.size}"
    if digest:
        try:
            actual = sha256_file(path)
        except OSError as e:
            return f"{path.name} cannot be read ({e.strerror})"
        if actual != record.sha256:
            return f"{path.name} has sha256 {actual[:12]}…, its record says {record.sha256[:12]}…"
    return None


@dataclass(frozen=True)
class Entry:
    """A finished step output in the store."""

    step: str
    key: str
    path: Path
    inputs: dict[str, Any]
    files: dict[str, FileRecord]  # relative name -> digest
    info: dict[str, Any]  # tool versions, timings, anything the step wants to record
    reused: bool = False

    def file(self, name: str) -> Path:
        if name not in self.files:
            raise StoreError(f"{self.step}/{self.key} has no output named {name!r}")
        return self.path / name


@contextlib.contextmanager
def exclusive(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive flock on ``lock_path``; say what is awaited when another process holds it.

    The kernel drops the lock when its holder dies, so a killed run never blocks the next one."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another quantkit process %s (lock %s)", what, lock_path)
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def try_lock(lock_path: Path, *, create: bool) -> int | None:
    """An fd holding an exclusive flock on ``lock_path``, or None when another process holds it
    (or, with ``create=False``, when the file is gone). The caller closes the fd to release it."""
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(lock_path, flags, 0o644)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@dataclass(frozen=True)
class Leftover:
    """Something in the store that no live process owns: removable."""

    path: Path
    what: str  # "scratch", "staging" or "entry"
    size: int  # bytes in its files
    note: str = ""


@dataclass
class Staging:
    """A step's scratch folder; ``info`` is saved in entry.json with the outputs."""

    path: Path
    info: dict[str, Any] = field(default_factory=dict)


def default_store_root() -> Path:
    env = os.environ.get("QUANTKIT_STORE")
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "quantkit" / "store"


class _Owner:
    """This process's claim on ``<root>/scratch/<id>/``: the folder and the flock on ``<id>.lock``."""

    def __init__(self, root: Path):
        base = root / SCRATCH
        base.mkdir(parents=True, exist_ok=True)
        self.pid = os.getpid()
        while True:
            self.id = f"{self.pid}-{uuid.uuid4().hex[:8]}"
            # Locked under a hidden name, then renamed: a sweeper never sees an unlocked owner lock.
            tmp = base / f".{self.id}.lock.tmp"
            fd = try_lock(tmp, create=True)
            if fd is None:
                continue
            os.write(fd, json.dumps({"pid": self.pid, "host": socket.gethostname(),
                                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())
            self.lock_path = base / f"{self.id}.lock"
            try:
                os.rename(tmp, self.lock_path)
            except FileNotFoundError:  # a sweeper took it between open and flock: try another id
                os.close(fd)
                continue
            break
        self.fd: int | None = fd
        self.path = base / self.id
        self.path.mkdir()
        self._uses_lock = threading.Lock()

    def record_use(self, step: str, key: str) -> None:
        with self._uses_lock, open(self.path / USES, "a") as f:
            f.write(f"{step}/{key}\n")

    def release(self) -> None:
        """Remove the folder and the lock (at exit, in the process that made them)."""
        if self.fd is None or os.getpid() != self.pid:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        self.lock_path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


_OWNERS: dict[Path, _Owner] = {}
_OWNERS_LOCK = threading.Lock()


def _release_owners() -> None:
    with _OWNERS_LOCK:
        for owner in _OWNERS.values():
            owner.release()
        _OWNERS.clear()


def _forget_owners_in_child() -> None:
    # A forked child must not keep its parent's locks alive (flock follows the open file, which
    # fork shares) nor remove the parent's folders: it closes its copies and makes its own owner.
    global _OWNERS_LOCK
    _OWNERS_LOCK = threading.Lock()
    for owner in _OWNERS.values():
        if owner.fd is not None:
            with contextlib.suppress(OSError):
                os.close(owner.fd)
            owner.fd = None
    _OWNERS.clear()


atexit.register(_release_owners)
os.register_at_fork(after_in_child=_forget_owners_in_child)


def _size(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.made_by: dict[str, Any] = {}  # this machine's host and toolchain, written into each entry built

    @staticmethod
    def key(inputs: dict[str, Any]) -> str:
        return digest_of(inputs)[:32]

    def _final(self, step: str, key: str) -> Path:
        return inside(self.root, step, key)

    # ------------------------------------------------------------ scratch space

    def _owner(self) -> _Owner:
        """This process's scratch owner for this store; the first call sweeps dead owners' folders."""
        where = self.root.resolve()
        with _OWNERS_LOCK:
            owner = _OWNERS.get(where)
            if owner is None:
                require_working_locks(where)  # everything below relies on flock holding here
                owner = _OWNERS[where] = _Owner(where)
                fresh = True
            else:
                fresh = False
        if fresh:
            self.sweep()
        return owner

    @contextlib.contextmanager
    def scratch(self, purpose: str) -> Iterator[Path]:
        """A new empty folder in this process's scratch space, removed when the block ends.

        ``purpose`` (``gptq-offload``, ``logits``, …) starts the folder's name. If the process is
        killed inside the block, the next process that uses the store removes the folder.
        """
        if not _PURPOSE.fullmatch(purpose):
            raise ValueError(f"scratch purpose {purpose!r} is not a short [a-z0-9._-] name")
        path = Path(tempfile.mkdtemp(prefix=f"{purpose}-", dir=self._owner().path))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def leftovers(self) -> list[Leftover]:
        """What no live process owns: dead owners' scratch folders and staging left in step folders."""
        return self._collect(remove=False)

    def sweep(self) -> list[Leftover]:
        """Remove what ``leftovers`` lists; each under the lock its owner held. Returns what went."""
        found = self._collect(remove=True)
        for item in found:
            log.info("removed %s of a dead run: %s (%.1f MiB)", item.what, item.path, item.size / 2**20)
        return found

    def _collect(self, *, remove: bool) -> list[Leftover]:
        out: list[Leftover] = []
        base = self.root / SCRATCH
        if base.is_dir():
            for lock in sorted(base.glob("*.lock")) + sorted(base.glob(".*.lock.tmp")):
                fd = try_lock(lock, create=False)
                if fd is None:  # alive (or just removed by another sweeper)
                    continue
                try:
                    folder = base / lock.name.removeprefix(".").removesuffix(".tmp").removesuffix(".lock")
                    note = lock.read_text(errors="replace").strip()
                    if folder.exists():
                        out.append(Leftover(folder, "scratch", _size(folder), note))
                    if remove:
                        shutil.rmtree(folder, ignore_errors=True)
                        lock.unlink(missing_ok=True)
                finally:
                    os.close(fd)
            for folder in sorted(p for p in base.iterdir() if p.is_dir()):
                # An owner makes its lock before its folder: a folder with no lock lost its owner.
                if not (base / f"{folder.name}.lock").exists() and not (base / f".{folder.name}.lock.tmp").exists():
                    out.append(Leftover(folder, "scratch", _size(folder), "no owner lock"))
                    if remove:
                        shutil.rmtree(folder, ignore_errors=True)
        # Staging that earlier versions built inside the step folder: dead when its key's lock is free.
        for stale in sorted(self.root.glob(f"*/{STAGING_PREFIX}*")):
            step, key = stale.parent.name, stale.name[len(STAGING_PREFIX):].split("-")[0]
            if step == SCRATCH or not _KEY.fullmatch(key):
                continue
            fd = try_lock(self._lock_path(step, key), create=True)
            if fd is None:
                continue
            try:
                out.append(Leftover(stale, "staging", _size(stale)))
                if remove:
                    shutil.rmtree(stale, ignore_errors=True)
            finally:
                os.close(fd)
        return out

    def live_uses(self) -> set[tuple[str, str]]:
        """``(step, key)`` of every entry a live process has used (gc keeps them)."""
        uses: set[tuple[str, str]] = set()
        base = self.root / SCRATCH
        for lock in base.glob("*.lock") if base.is_dir() else ():
            fd = try_lock(lock, create=False)
            if fd is not None:  # dead
                os.close(fd)
                continue
            with contextlib.suppress(OSError):
                for line in (base / lock.name.removesuffix(".lock") / USES).read_text().splitlines():
                    step, _, key = line.partition("/")
                    uses.add((step, key))
        return uses

    # ------------------------------------------------------------ entries

    def get(self, step: str, inputs: dict[str, Any]) -> Entry | None:
        """The finished, intact entry for these inputs, or None (a damaged one is moved aside first).

        Every reuse comes through here: ``ensure``, and the executor's and the planner's ``stored``."""
        key = self.key(inputs)
        entry = self._read(step, key, reused=True)
        if entry is not None and (why := self.check(entry)) is not None:
            self._discard(step, key, why, locked=False)
            return None
        return entry

    def check(self, entry: Entry, *, names: Iterable[str] | None = None, digests: bool = False) -> str | None:
        """Why ``entry`` is damaged, or None when it is intact: each file (or each of ``names``) has
        the size ``entry.json`` records and, with ``digests``, its sha256."""
        for name in entry.files if names is None else names:
            record = entry.files.get(name)
            if record is None:
                return f"it has no output named {name!r}"
            if (problem := file_problem(entry.path / name, record, digest=digests)) is not None:
                return problem
        return None

    def verify(self, entry: Entry, names: Iterable[str] | None = None) -> None:
        """Raise StoreError unless the files (default: all) match their sha256 in ``entry.json``.

        Called before a file is linked into a run folder or published. A damaged entry is moved
        aside first, so the next run builds it again."""
        why = self.check(entry, names=names, digests=True)
        if why is not None:
            self._discard(entry.step, entry.key, why, locked=False, digests=True)
            raise StoreError(f"store entry {entry.path} is damaged ({why}); it was moved aside, "
                             "run again to rebuild it")

    def recheck(self, step: str, key: str) -> None:
        """Check an entry's files by sha256 because a copy of them (a run folder's hard link) was found
        damaged; move it aside if it is, so the next run builds it again."""
        entry = self._read(step, key, reused=True)
        if entry is not None and (why := self.check(entry, digests=True)) is not None:
            self._discard(step, key, why, locked=False, recheck=False)

    def _discard(self, step: str, key: str, why: str, *, locked: bool, recheck: bool = True,
                 digests: bool = False) -> None:
        """Move a damaged entry aside (under its key's lock, unless the caller holds it) and delete it.

        With ``recheck``, the entry is read and checked again under the lock: another process may have
        replaced it with a good one meanwhile. A key whose lock another process holds is left to it."""
        final = self._final(step, key)
        fd = None
        try:
            if not locked:
                fd = try_lock(self._lock_path(step, key), create=True)
                if fd is None:  # another process is building or discarding it; build() waits for it
                    return
            if recheck:
                try:
                    entry = self._read(step, key, reused=True)
                except StoreError:
                    entry = None
                if entry is not None and self.check(entry, digests=digests) is None:
                    return
            if not final.is_dir():
                return
            aside = self._move_aside(step, key)
        except OSError as e:  # a read-only store: it is not served, but it stays
            log.warning("store entry %s is damaged (%s) and could not be moved aside: %s", final, why, e)
            return
        finally:
            if fd is not None:
                os.close(fd)
        log.warning("store entry %s is damaged (%s): moved aside, it will be rebuilt", final, why)
        shutil.rmtree(aside, ignore_errors=True)

    def _read(self, step: str, key: str, *, reused: bool) -> Entry | None:
        final = self._final(step, key)
        try:
            record = json.loads((final / ENTRY).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise StoreError(f"store entry {final} is unreadable ({e}); delete that folder to rebuild it") from e
        files = {name: FileRecord(**rec) for name, rec in record["files"].items()}
        return Entry(step, key, final, record["inputs"], files, record.get("info", {}), reused)

    def _lock(self, step: str, key: str) -> contextlib.AbstractContextManager[None]:
        return exclusive(self._lock_path(step, key), f"building {step}/{key}")

    def _lock_path(self, step: str, key: str) -> Path:
        return inside(self.root, step) / f".{key}.lock"

    def remove(self, step: str, key: str) -> bool:
        """Delete the entry for ``key``: moved aside under its key's lock (readers see it whole or not at
        all), then deleted. False when a run is building it or it is gone."""
        final = self._final(step, key)
        fd = try_lock(self._lock_path(step, key), create=True)
        if fd is None:
            log.info("skipping %s: a run is building it", final)
            return False
        try:
            if not final.is_dir():
                return False
            aside = self._move_aside(step, key)
        finally:
            os.close(fd)
        shutil.rmtree(aside, ignore_errors=True)
        return True

    def _move_aside(self, step: str, key: str) -> Path:
        """Rename the entry to a staging name (the caller holds its key's lock); return that name.

        Readers see the entry whole or not at all. If this process dies before deleting it, the next
        build of the key (or gc) removes it."""
        final = self._final(step, key)
        aside = final.with_name(f"{STAGING_PREFIX}{key}-rm{uuid.uuid4().hex[:6]}")
        os.replace(final, aside)
        return aside

    @contextlib.contextmanager
    def build(self, step: str, inputs: dict[str, Any]) -> Iterator[Staging]:
        """Yield a staging folder; on success it becomes the entry for ``inputs``.

        The staging folder is ``<owner>/<step>/.tmp-<key>-*`` in this process's scratch space, so a
        killed build is removed by the next process, whatever key it builds. Raises ``AlreadyBuilt``
        (caught by ``ensure``) if another process finished it while this one waited for the lock.
        """
        key = self.key(inputs)
        parent = inside(self.root, step)  # a step name is one safe path component, checked before any write
        owner = self._owner()
        with self._lock(step, key):
            done = self._read(step, key, reused=True)
            if done is not None:
                why = self.check(done)
                if why is None:
                    raise AlreadyBuilt(done)
                self._discard(step, key, why, locked=True)
            for stale in parent.glob(f"{STAGING_PREFIX}{key}-*"):
                # We hold the key's lock, so any temp folder for it is from a dead run.
                log.info("removing unfinished output of an interrupted run: %s", stale)
                shutil.rmtree(stale, ignore_errors=True)
            tmp = owner.path / step / f"{STAGING_PREFIX}{key}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            staging = Staging(tmp)
            start = time.perf_counter()
            try:
                yield staging
                files = {}
                for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
                    rel = f.relative_to(tmp).as_posix()
                    files[rel] = {"sha256": sha256_file(f), "size": f.stat().st_size}
                    _fsync(f)  # on disk before the rename publishes it: a power loss cannot leave it short
                staging.info.setdefault("seconds", round(time.perf_counter() - start, 3))
                if self.made_by:
                    staging.info.setdefault("made_by", self.made_by)
                record = {"schema": ENTRY_SCHEMA, "step": step, "key": key, "inputs": inputs,
                          "files": files, "info": staging.info}
                write_json_atomic(tmp / ENTRY, record)
                for folder in sorted((p for p in tmp.rglob("*") if p.is_dir()), reverse=True):
                    _fsync(folder)
                _fsync(tmp)
                os.replace(tmp, self._final(step, key))
                _fsync(parent)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise

    def ensure(self, step: str, inputs: dict[str, Any], produce) -> Entry:
        """Return the entry for ``inputs``, calling ``produce(staging)`` only if it is missing."""
        found = self.get(step, inputs)
        if found is None:
            try:
                with self.build(step, inputs) as staging:
                    produce(staging)
            except AlreadyBuilt as e:
                found = e.entry
            else:
                found = self._read(step, self.key(inputs), reused=False)
                assert found is not None
        self.record_use(found)
        return found

    def record_use(self, entry: Entry) -> None:
        # So that `quantkit store gc --entries` never removes what a live run is using.
        try:
            self._owner().record_use(entry.step, entry.key)
        except OSError as e:  # a read-only store can still serve finished entries
            log.debug("could not record the use of %s/%s in %s: %s", entry.step, entry.key, self.root, e)


class AlreadyBuilt(Exception):
    def __init__(self, entry: Entry):
        self.entry = entry
        super().__init__(entry.path)


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's (its names') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
