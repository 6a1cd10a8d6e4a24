"""llama-quantize's type vocabulary, spelled exactly as the tool spells it.

The names and the sizes come from the type table in llama.cpp's
tools/quantize/quantize.cpp (commit 0c1e570). Sizes there are GiB for
Llama-3-8B (8.03e9 weights); bits per weight = GiB * 2**30 * 8 / 8.03e9.
For types listed only with a bpw figure we take that figure. The estimate is
for planning disk and RAM; real files are read back after quantizing.
tests/test_quanttypes.py checks this table against the built binary's --help.
"""

from __future__ import annotations

from dataclasses import dataclass

_LLAMA3_8B_WEIGHTS = 8.03e9


def _bpw_from_gib(gib: float) -> float:
    return round(gib * 2**30 * 8 / _LLAMA3_8B_WEIGHTS, 2)


@dataclass(frozen=True)
class QuantType:
    name: str
    ftype: int  # LlamaFileType value written to general.file_type
    bpw: float
    needs_imatrix: bool = False


_TYPES = [
    QuantType("Q1_0", 40, 1.125),
    QuantType("Q2_0", 41, 2.25),
    QuantType("Q4_0", 2, _bpw_from_gib(4.34)),
    QuantType("Q4_1", 3, _bpw_from_gib(4.78)),
    QuantType("MXFP4_MOE", 38, 4.25),
    QuantType("Q5_0", 8, _bpw_from_gib(5.21)),
    QuantType("Q5_1", 9, _bpw_from_gib(5.65)),
    # llama.cpp refuses these without an imatrix (tensor_requires_imatrix in
    # src/llama-quant.cpp): their tensors are IQ1/IQ2/IQ3_XXS or Q2_K-in-Q2_K_S.
    QuantType("IQ2_XXS", 19, 2.06, needs_imatrix=True),
    QuantType("IQ2_XS", 20, 2.31, needs_imatrix=True),
    QuantType("IQ2_S", 28, 2.5, needs_imatrix=True),
    QuantType("IQ2_M", 29, 2.7, needs_imatrix=True),
    QuantType("IQ1_S", 24, 1.56, needs_imatrix=True),
    QuantType("IQ1_M", 31, 1.75, needs_imatrix=True),
    QuantType("TQ1_0", 36, 1.69),
    QuantType("TQ2_0", 37, 2.06),
    QuantType("Q2_K", 10, _bpw_from_gib(2.96)),
    QuantType("Q2_K_S", 21, _bpw_from_gib(2.96), needs_imatrix=True),
    QuantType("IQ3_XXS", 23, 3.06, needs_imatrix=True),
    QuantType("IQ3_S", 26, 3.44),
    QuantType("IQ3_M", 27, 3.66),
    QuantType("IQ3_XS", 22, 3.3),
    QuantType("Q3_K_S", 11, _bpw_from_gib(3.41)),
    QuantType("Q3_K_M", 12, _bpw_from_gib(3.74)),
    QuantType("Q3_K_L", 13, _bpw_from_gib(4.03)),
    QuantType("IQ4_NL", 25, 4.5),
    QuantType("IQ4_XS", 30, 4.25),
    QuantType("Q4_K_S", 14, _bpw_from_gib(4.37)),
    QuantType("Q4_K_M", 15, _bpw_from_gib(4.58)),
    QuantType("Q5_K_S", 16, _bpw_from_gib(5.21)),
    QuantType("Q5_K_M", 17, _bpw_from_gib(5.33)),
    QuantType("Q6_K", 18, _bpw_from_gib(6.14)),
    QuantType("Q8_0", 7, _bpw_from_gib(7.96)),
    QuantType("F16", 1, 16.0),
    QuantType("BF16", 32, 16.0),
    QuantType("F32", 0, 32.0),
]

QUANT_TYPES: dict[str, QuantType] = {t.name: t for t in _TYPES}

# llama-quantize accepts these too, but a label must say what it is.
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

# Base types the HF -> GGUF converter writes (its --outtype).
BASE_TYPES = ("f16", "bf16", "f32")

# ggml tensor types accepted by --output-tensor-type, --token-embedding-type
# and --tensor-type (ggml_type_name spelling).
TENSOR_TYPES = (
    "f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0",
    "q2_k", "q3_k", "q4_k", "q5_k", "q6_k",
    "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq1_s", "iq1_m",
    "iq4_nl", "iq4_xs", "tq1_0", "tq2_0", "mxfp4",
)
TENSOR_TYPES_NEEDING_IMATRIX = frozenset({"iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq1_s", "iq1_m"})
