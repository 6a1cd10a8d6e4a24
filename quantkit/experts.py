"""Mixture-of-experts coverage: how many calibration tokens each routed expert received, and what to do
about the experts that received too few.

The pinned llama-imatrix (GGUF format, tools/imatrix/imatrix.cpp) stores for every weight a
``<tensor>.counts`` tensor with one count per expert: for ``blk.N.ffn_{gate,up,down}_exps.weight`` the
number of tokens routed to each expert of layer N. llama-quantize then divides each expert's sums by
its own count and gives an expert with count 0 uniform weights (tools/quantize/quantize.cpp,
``load_imatrix``): it is quantized as if there were no importance matrix at all, silently. For the
types that llama.cpp refuses to make without an imatrix (``tensor_requires_imatrix``) that is the
failure this module turns into a decision: fall back to a type that needs none for those layers'
expert tensors (named in the variant's info and the report), or refuse with the list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import QuantkitError, VerificationError

# A type that llama.cpp never requires an imatrix for and that keeps ~4.5 bits: what an uncovered
# layer's expert tensors get instead of an IQ1/IQ2/IQ3_XXS type.
FALLBACK_TYPE = "q4_k"
EXPERT_TENSORS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
_COUNTS = re.compile(r"^blk\.(\d+)\.(ffn_(?:gate|up|down)_exps)\.weight\.counts$")
LEAST_SHOWN = 8


class UncoveredExpertsError(QuantkitError):
    """A variant needs importance data for experts that the calibration text did not route enough tokens to."""

    def __init__(self, label: str, uncovered: list[tuple[int, int, int]], min_tokens: int):
        self.label, self.uncovered, self.min_tokens = label, uncovered, min_tokens
        super().__init__(f"{label}: {len(uncovered)} expert(s) got fewer than {min_tokens} calibration tokens in the "
                         f"importance matrix ({describe(uncovered)}); this type needs importance data for every "
                         "expert (fix: more or more varied calibration text, or gguf.imatrix.uncovered_experts: "
                         "fallback, or a type that needs no imatrix)")

    def __reduce__(self):
        return type(self), (self.label, self.uncovered, self.min_tokens)


def describe(experts: list[tuple[int, int, int]], limit: int = LEAST_SHOWN) -> str:
    shown = ", ".join(f"layer {layer} expert {e}: {n}" for layer, e, n in experts[:limit])
    return shown + (f", and {len(experts) - limit} more" if len(experts) > limit else "")


def expert_token_counts(imatrix_gguf: Path) -> dict[int, list[int]]:
    """{layer: [tokens routed to expert 0, 1, ...]} from a GGUF imatrix; {} for a dense model."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(imatrix_gguf)
    except (OSError, ValueError) as e:
        raise VerificationError(f"{imatrix_gguf} is not a readable imatrix GGUF: {e}") from e
    out: dict[int, list[int]] = {}
    for t in reader.tensors:
        m = _COUNTS.match(t.name)
        if not m:
            continue
        counts = [int(round(float(c))) for c in t.data.ravel()]
        layer = int(m.group(1))
        # gate, up and down of one layer see the same routed tokens; keep the smallest should they differ
        out[layer] = [min(a, b) for a, b in zip(out[layer], counts)] if layer in out else counts
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class Coverage:
    """Tokens per expert per layer, as the imatrix node's info records it (JSON: layer keys are strings)."""

    counts: dict[int, list[int]]

    @classmethod
    def from_info(cls, info: dict | None) -> Coverage | None:
        experts = (info or {}).get("experts")
        if not experts:
            return None
        return cls({int(k): list(v) for k, v in experts["tokens"].items()})

    def to_info(self) -> dict:
        return {"tokens": {str(k): v for k, v in self.counts.items()}}

    def least(self, n: int = LEAST_SHOWN) -> list[tuple[int, int, int]]:
        """The ``n`` (layer, expert, tokens) with the fewest tokens, fewest first."""
        flat = [(layer, e, c) for layer, cs in self.counts.items() for e, c in enumerate(cs)]
        return sorted(flat, key=lambda x: (x[2], x[0], x[1]))[:n]

    def below(self, min_tokens: int) -> list[tuple[int, int, int]]:
        return sorted(((layer, e, c) for layer, cs in self.counts.items() for e, c in enumerate(cs) if c < min_tokens),
                      key=lambda x: (x[0], x[1]))


def needs_importance_data(qtype_needs_imatrix: bool, tensor_types: dict[str, str]) -> bool:
    """Whether a variant makes any tensor that llama.cpp only makes with an imatrix."""
    from quantkit.quanttypes import TENSOR_TYPES_NEEDING_IMATRIX

    return qtype_needs_imatrix or any(t in TENSOR_TYPES_NEEDING_IMATRIX for t in tensor_types.values())


def fallback_args(coverage: Coverage, min_tokens: int) -> tuple[list[str], list[str]]:
    """(--tensor-type arguments, tensor names) that give the expert tensors of every layer with an
    expert below ``min_tokens`` the fallback type. One tensor holds all experts of a layer, so the
    fallback is per layer, not per expert."""
    layers = sorted({layer for layer, _, _ in coverage.below(min_tokens)})
    names = [f"blk.{layer}.{t}.weight" for layer in layers for t in EXPERT_TENSORS]
    # llama-quantize matches --tensor-type patterns as regular expressions over the tensor name
    args = [a for layer in layers for t in EXPERT_TENSORS
            for a in ("--tensor-type", f"blk\\.{layer}\\.{t}={FALLBACK_TYPE}")]
    return args, names


def quantize_plan(*, coverage: Coverage | None, label: str, needs_imatrix: bool, min_tokens: int,
                  action: str) -> tuple[list[str], dict | None]:
    """(--tensor-type arguments to put before the recipe's own, the variant's ``experts`` info) for a
    GGUF variant quantized with an imatrix. Raises UncoveredExpertsError when ``action`` is ``refuse``
    and the type needs importance data that some experts lack."""
    if coverage is None:
        return [], None
    below = coverage.below(min_tokens)
    info = {"min_tokens": min_tokens, "least": [list(x) for x in coverage.least()], "below": [list(x) for x in below],
            "fallback": [], "fallback_type": None}
    if not below:
        return [], info
    if not needs_imatrix:
        # this type needs no imatrix: llama-quantize uses what data there is, uniform weights for 0 tokens
        info["below_kept"] = True
        return [], info
    if action == "refuse":
        raise UncoveredExpertsError(label, below, min_tokens)
    args, names = fallback_args(coverage, min_tokens)
    info.update(fallback=names, fallback_type=FALLBACK_TYPE)
    return args, info
