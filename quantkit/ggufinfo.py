"""Read a GGUF back to check what a step produced (not what its log claims).

Only the header is parsed (key/values and tensor infos), in one pass over an mmap. gguf-py's
GGUFReader builds a numpy view per array element and took about 4 s per file on SmolLM2's
49k-token vocabulary: 14 % of the demo's GGUF chain (benchmarks/README.md).
"""

from __future__ import annotations

import mmap
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import VerificationError

# Two files of the same tensor types differ by their metadata (an imatrix's name and dataset, kilobytes): within
# 0.1 % they count as the same size
SAME_SIZE = 1.001

MAGIC = b"GGUF"
# GGUF value types -> struct format of a scalar (8: string, 9: array are handled apart).
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
KEPT_PREFIXES = ("general.", "quantize.", "imatrix.")  # general.alignment places the data
KEPT_SUFFIXES = (".context_length", ".block_count", ".embedding_length")


@dataclass(frozen=True)
class GGUFInfo:
    architecture: str
    name: str | None
    file_type: int | None
    tensor_count: int
    parameters: int
    tensor_types: dict[str, int]  # ggml type name -> number of tensors
    metadata: dict[str, object]  # selected scalar keys
    vocab_size: int | None  # entries in tokenizer.ggml.tokens (the n_vocab of its logits)


class _Header:
    """A cursor over the header bytes; every read is bounds-checked by struct."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise ValueError("string runs past the end of the file")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def skip_string(self) -> None:
        n = self.take("Q")  # before the +=, which would read pos ahead of take()
        self.pos += n

    def value(self, vtype: int, keep: bool):
        if vtype in SCALARS:
            return self.take(SCALARS[vtype])
        if vtype == STRING:
            if keep:
                return self.string()
            self.skip_string()
            return None
        if vtype == ARRAY:
            etype, count = self.take("I"), self.take("Q")
            if etype in SCALARS:
                self.pos += count * struct.calcsize(SCALARS[etype])
            else:
                for _ in range(count):  # strings or nested arrays: each has its own length
                    self.value(etype, keep=False)
            return None
        raise ValueError(f"unknown GGUF value type {vtype}")


Parsed = tuple[dict[str, object], list[tuple[str, int, int]], dict[str, int]]


def _parse(path: Path, extra_keys: tuple[str, ...] = ()) -> Parsed:
    """({kept key: scalar value}, [(tensor name, element count, ggml type)], {array key: length}).
    ``extra_keys``: string keys to keep besides the general ones (the chat template is long, so asked for)."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != MAGIC:
            raise ValueError("no GGUF magic")
        h = _Header(buf)
        h.pos = 4
        version = h.take("I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported")
        n_tensors, n_kv = h.take("Q"), h.take("Q")
        meta, lengths = {}, {}
        for _ in range(n_kv):
            key = h.string()
            keep = key.startswith(KEPT_PREFIXES) or key.endswith(KEPT_SUFFIXES) or key in extra_keys
            vtype = h.take("I")
            if vtype == ARRAY:
                lengths[key] = struct.unpack_from("<Q", buf, h.pos + 4)[0]  # after the element type
            value = h.value(vtype, keep)
            if keep and value is not None:
                meta[key] = value
        tensors, end = [], 0
        for _ in range(n_tensors):
            name = h.string()
            count = 1
            for _ in range(h.take("I")):
                count *= h.take("Q")
            ttype = h.take("I")
            end = max(end, h.take("Q") + _nbytes(ttype, count))
            tensors.append((name, count, ttype))
        align = int(meta.get("general.alignment", 32))
        data_start = -(-h.pos // align) * align
        if tensors and data_start + end > len(buf):
            raise ValueError(f"tensor data ends at byte {data_start + end}, the file has {len(buf)}: truncated")
        return meta, tensors, lengths


def _read(path: Path, what: str, extra_keys: tuple[str, ...] = ()) -> Parsed:
    try:
        return _parse(path, extra_keys)
    except (OSError, ValueError, struct.error) as e:
        raise VerificationError(f"{path} is not a readable {what}: {e}") from e


def _nbytes(ttype: int, count: int) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
    except (ValueError, KeyError):
        raise ValueError(f"tensor type {ttype} is unknown to this gguf-py") from None
    return count // block * size


def _type_name(ttype: int) -> str:
    from gguf.constants import GGMLQuantizationType

    try:
        return GGMLQuantizationType(ttype).name.lower()
    except ValueError:
        return f"type{ttype}"


def read_gguf(path: Path) -> GGUFInfo:
    meta, tensors, lengths = _read(path, "GGUF file")
    arch = meta.get("general.architecture")
    if not arch:
        raise VerificationError(f"{path} has no general.architecture")
    types = Counter(_type_name(t) for _, _, t in tensors)
    return GGUFInfo(
        architecture=str(arch),
        name=meta.get("general.name"),
        file_type=meta.get("general.file_type"),
        tensor_count=len(tensors),
        parameters=sum(n for _, n, _ in tensors),
        tensor_types=dict(sorted(types.items())),
        metadata={k: v for k, v in meta.items() if not k.startswith("imatrix.")},
        vocab_size=lengths.get("tokenizer.ggml.tokens"),
    )


def array_sha256(path: Path, key: str) -> str | None:
    """sha256 of one array value's bytes in the header (``tokenizer.ggml.tokens``: two files with the same digest
    have the same vocabulary, token for token); None when the file lacks the key."""
    import hashlib

    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != MAGIC:
                raise ValueError("no GGUF magic")
            h = _Header(buf)
            h.pos = 8
            _, n_kv = h.take("Q"), h.take("Q")
            for _ in range(n_kv):
                name, vtype = h.string(), h.take("I")
                start = h.pos
                h.value(vtype, keep=False)
                if name == key:
                    return hashlib.sha256(buf[start:h.pos]).hexdigest()
    except (OSError, ValueError, struct.error) as e:
        raise VerificationError(f"{path} is not a readable GGUF file: {e}") from e
    return None


def chat_template(path: Path) -> str | None:
    """The GGUF's ``tokenizer.chat_template`` (what Ollama and llama-server chat with), or None."""
    from gguf.constants import Keys

    meta, _, _ = _read(path, "GGUF file", (Keys.Tokenizer.CHAT_TEMPLATE,))
    value = meta.get(Keys.Tokenizer.CHAT_TEMPLATE)
    return value if isinstance(value, str) else None


def imatrix_chunks(path: Path) -> int:
    """Chunk count recorded in a GGUF-format imatrix (0 if the file has none)."""
    meta, tensors, _ = _read(path, "imatrix GGUF")
    if not tensors:
        raise VerificationError(f"{path} holds no importance data")
    return int(meta.get("imatrix.chunk_count") or 0)


def adds_bos(path: Path) -> bool | None:
    """``tokenizer.ggml.add_bos_token`` of a GGUF: whether llama.cpp puts BOS first in each window; None when
    the file does not say (llama_vocab then picks a default per tokenizer, src/llama-vocab.cpp)."""
    from gguf.constants import Keys

    meta, _, _ = _read(path, "GGUF file", (Keys.Tokenizer.ADD_BOS,))
    return bool(meta[Keys.Tokenizer.ADD_BOS]) if Keys.Tokenizer.ADD_BOS in meta else None
