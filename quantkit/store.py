"""Content-addressed store for step outputs.

A step's output folder is ``<root>/<step>/<key>/`` where ``key`` is the digest of
everything that determines the output (recipe section, input digests, tool
version). It is built in a temp folder next to it and renamed into place only
after ``entry.json`` (inputs, outputs with sha256 and size, timings) is written,
so a folder at the final path is always complete and a crash leaves only a
temp folder that the next build of that key removes. A per-key lock makes a
second process wait for the first instead of building the same thing twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.digest import digest_of, sha256_file, write_json_atomic
from quantkit.errors import StoreError

log = logging.getLogger(__name__)

ENTRY = "entry.json"
ENTRY_SCHEMA = 1


@dataclass(frozen=True)
class FileRecord:
    sha256: str
    size: int


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


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)

    @staticmethod
    def key(inputs: dict[str, Any]) -> str:
        return digest_of(inputs)[:32]

    def _final(self, step: str, key: str) -> Path:
        return self.root / step / key

    def get(self, step: str, inputs: dict[str, Any]) -> Entry | None:
        """The finished entry for these inputs, or None."""
        key = self.key(inputs)
        return self._read(step, key, reused=True)

    def _read(self, step: str, key: str, *, reused: bool) -> Entry | None:
        final = self._final(step, key)
        try:
            import json

            record = json.loads((final / ENTRY).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise StoreError(f"store entry {final} is unreadable ({e}); delete that folder to rebuild it") from e
        files = {name: FileRecord(**rec) for name, rec in record["files"].items()}
        return Entry(step, key, final, record["inputs"], files, record.get("info", {}), reused)

    def _lock(self, step: str, key: str) -> contextlib.AbstractContextManager[None]:
        return exclusive(self.root / step / f".{key}.lock", f"building {step}/{key}")

    @contextlib.contextmanager
    def build(self, step: str, inputs: dict[str, Any]) -> Iterator[Staging]:
        """Yield a staging folder; on success it becomes the entry for ``inputs``.

        Raises ``AlreadyBuilt`` (caught by ``ensure``) if another process finished
        it while this one waited for the lock.
        """
        key = self.key(inputs)
        with self._lock(step, key):
            done = self._read(step, key, reused=True)
            if done is not None:
                raise AlreadyBuilt(done)
            parent = self.root / step
            for stale in parent.glob(f".tmp-{key}-*"):
                # We hold the key's lock, so any temp folder for it is from a dead run.
                log.info("removing unfinished output of an interrupted run: %s", stale)
                shutil.rmtree(stale, ignore_errors=True)
            tmp = parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            staging = Staging(tmp)
            start = time.perf_counter()
            try:
                yield staging
                files = {}
                for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
                    rel = f.relative_to(tmp).as_posix()
                    files[rel] = {"sha256": sha256_file(f), "size": f.stat().st_size}
                staging.info.setdefault("seconds", round(time.perf_counter() - start, 3))
                record = {"schema": ENTRY_SCHEMA, "step": step, "key": key, "inputs": inputs,
                          "files": files, "info": staging.info}
                write_json_atomic(tmp / ENTRY, record)
                _fsync_dir(tmp)
                os.replace(tmp, self._final(step, key))
                _fsync_dir(parent)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise

    def ensure(self, step: str, inputs: dict[str, Any], produce) -> Entry:
        """Return the entry for ``inputs``, calling ``produce(staging)`` only if it is missing."""
        found = self.get(step, inputs)
        if found is not None:
            return found
        try:
            with self.build(step, inputs) as staging:
                produce(staging)
        except AlreadyBuilt as e:
            return e.entry
        entry = self._read(step, self.key(inputs), reused=False)
        assert entry is not None
        return entry


class AlreadyBuilt(Exception):
    def __init__(self, entry: Entry):
        self.entry = entry
        super().__init__(entry.path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
