"""Read a GGUF back to check what a step produced (not what its log claims)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import VerificationError


@dataclass(frozen=True)
class GGUFInfo:
    architecture: str
    name: str | None
    file_type: int | None
    tensor_count: int
    parameters: int
    tensor_types: dict[str, int]  # ggml type name -> number of tensors
    metadata: dict[str, object]  # selected scalar keys


def _scalar(reader, key: str):
    field = reader.get_field(key)
    if field is None:
        return None
    value = field.contents()
    return value


def read_gguf(path: Path) -> GGUFInfo:
    from gguf import GGUFReader  # numpy-heavy; only where files are read

    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct errors on damaged files
        raise VerificationError(f"{path} is not a readable GGUF file: {e}") from e
    types = Counter(t.tensor_type.name.lower() for t in reader.tensors)
    params = sum(int(t.n_elements) for t in reader.tensors)
    meta = {}
    for field in reader.fields.values():
        if field.name.startswith(("general.", "quantize.")) or field.name.endswith((".context_length", ".block_count", ".embedding_length")):
            try:
                v = field.contents()
            except Exception:
                continue
            if isinstance(v, (str, int, float, bool)):
                meta[field.name] = v
    arch = _scalar(reader, "general.architecture")
    if not arch:
        raise VerificationError(f"{path} has no general.architecture")
    return GGUFInfo(
        architecture=arch,
        name=_scalar(reader, "general.name"),
        file_type=_scalar(reader, "general.file_type"),
        tensor_count=len(reader.tensors),
        parameters=params,
        tensor_types=dict(sorted(types.items())),
        metadata=meta,
    )


def imatrix_chunks(path: Path) -> int:
    """Chunk count recorded in a GGUF-format imatrix (0 if the file has none)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:
        raise VerificationError(f"{path} is not a readable imatrix GGUF: {e}") from e
    value = _scalar(reader, "imatrix.chunk_count")
    if not reader.tensors:
        raise VerificationError(f"{path} holds no importance data")
    return int(value or 0)
