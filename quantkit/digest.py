"""Content digests, and JSON written so that a reader never sees half a file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def digest_of(data: Any) -> str:
    """Digest of a JSON-able value: the key of a step's inputs."""
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    from quantkit.paths import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"
    write_atomic(path, text.encode("utf-8"))


class DigestCache:
    """sha256 of big input files (model weights), remembered by (path, size, mtime, inode),
    so a warm re-run does not re-read gigabytes it has already hashed."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._data: dict[str, str] = json.loads(path.read_text())
        except (OSError, ValueError):
            self._data = {}

    def sha256(self, file: Path) -> str:
        st = file.stat()
        key = f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        if key not in self._data:
            self._data[key] = sha256_file(file)
            write_json_atomic(self.path, self._data)
        return self._data[key]
