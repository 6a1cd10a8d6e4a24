"""A GGUF header with no tensors, written byte by byte: enough for quantkit.ggufinfo to read
(architecture, name, the chat template) without converting a model."""

from __future__ import annotations

import struct
from pathlib import Path

STRING = 8


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def write_header_gguf(path: Path, *, name: str = "tiny", chat_template: str | None = None) -> Path:
    kv = {"general.architecture": "llama", "general.name": name}
    if chat_template is not None:
        kv["tokenizer.chat_template"] = chat_template
    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv))
    for key, value in kv.items():
        out += _string(key) + struct.pack("<I", STRING) + _string(value)
    Path(path).write_bytes(out)
    return Path(path)
