"""quantkit's GGUF header reader against gguf-py's GGUFReader, on a file gguf-py writes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from quantkit.errors import VerificationError
from quantkit.ggufinfo import imatrix_chunks, read_gguf


@pytest.fixture
def gguf_file(tmp_path):
    path = tmp_path / "m.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny ünïcode")
    w.add_file_type(15)
    w.add_context_length(256)
    w.add_block_count(2)
    w.add_token_list([f"tok{i}" for i in range(3000)])  # a string array to skip
    w.add_token_scores([0.5] * 3000)  # a scalar array to skip
    w.add_array("test.nested", [[1, 2], [3]])
    w.add_key_value("quantize.imatrix.chunks_count", 7, 4)  # uint32
    w.add_tensor("a", np.zeros((4, 256), dtype=np.float32))
    w.add_tensor("b", np.zeros((256,), dtype=np.float16))
    w.add_tensor("c", np.zeros((3, 5, 7), dtype=np.float32), raw_dtype=GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_header_matches_gguf_py(gguf_file):
    info = read_gguf(gguf_file)
    ref = GGUFReader(gguf_file)
    assert info.architecture == "llama" and info.name == "tiny ünïcode" and info.file_type == 15
    assert info.tensor_count == len(ref.tensors) == 3
    assert info.parameters == sum(int(t.n_elements) for t in ref.tensors) == 4 * 256 + 256 + 105
    assert info.tensor_types == dict(sorted(Counter(t.tensor_type.name.lower() for t in ref.tensors).items()))
    assert info.vocab_size == len(ref.get_field("tokenizer.ggml.tokens").data) == 3000
    assert info.metadata["llama.context_length"] == 256 and info.metadata["quantize.imatrix.chunks_count"] == 7


@pytest.mark.parametrize("cut", [3, 24, 200, 20000, -40])  # -40: the last tensor loses 12 bytes (28 are padding)
def test_truncated_or_foreign_file_is_refused(gguf_file, tmp_path, cut):
    bad = tmp_path / "bad.gguf"
    data = gguf_file.read_bytes()
    bad.write_bytes(data[:cut] if cut > 0 else data[:cut])
    with pytest.raises(VerificationError, match="not a readable GGUF"):
        read_gguf(bad)


def test_imatrix_without_data_is_refused(gguf_file, tmp_path):
    path = tmp_path / "imatrix.gguf"
    w = GGUFWriter(str(path), "imatrix")
    w.add_uint32("imatrix.chunk_count", 32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(VerificationError, match="no importance data"):
        imatrix_chunks(path)
