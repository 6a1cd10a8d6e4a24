"""The recipe's quantization sections: GGUF types, targets and imatrix; GPTQ, AWQ and RTN variants."""

from __future__ import annotations


from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from quantkit.quanttypes import ALIASES, QUANT_TYPES, TENSOR_TYPES, TENSOR_TYPES_NEEDING_IMATRIX
from quantkit.recipe.fields import Invalid, SafeName, Section, TENSOR_PATTERN_RE, suggest


class TensorOverrides(Section):
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    tensor_types: dict[str, str] = Field(default_factory=dict, max_length=64)

    @field_validator("output_tensor_type", "token_embedding_type")
    @classmethod
    def _ggml_type(cls, v: str | None) -> str | None:
        return None if v is None else _tensor_type(v)

    @field_validator("tensor_types")
    @classmethod
    def _patterns(cls, v: dict[str, str]) -> dict[str, str]:
        out = {}
        for pattern, t in v.items():
            if not TENSOR_PATTERN_RE.match(pattern):
                raise Invalid(f"tensor pattern '{pattern}' has characters llama-quantize patterns do not need",
                              "use letters, digits, '_', '.', '*', '-' only")
            out[pattern] = _tensor_type(t)
        return out

    def needs_imatrix(self) -> bool:
        chosen = [self.output_tensor_type, self.token_embedding_type, *self.tensor_types.values()]
        return any(t in TENSOR_TYPES_NEEDING_IMATRIX for t in chosen if t)

    def args(self) -> list[str]:
        out: list[str] = []
        if self.output_tensor_type:
            out += ["--output-tensor-type", self.output_tensor_type]
        if self.token_embedding_type:
            out += ["--token-embedding-type", self.token_embedding_type]
        for pattern, t in sorted(self.tensor_types.items()):
            out += ["--tensor-type", f"{pattern}={t}"]
        return out


def _tensor_type(v: str) -> str:
    low = v.lower()
    if low not in TENSOR_TYPES:
        raise Invalid(f"unknown ggml tensor type '{v}'", suggest(low, TENSOR_TYPES) or f"use one of {', '.join(TENSOR_TYPES)}")
    return low


def _quant_type(v: str) -> str:
    if v in QUANT_TYPES:
        return v
    if v in ALIASES:
        raise Invalid(f"'{v}' is an alias of {ALIASES[v]}", f"write {ALIASES[v]} so the file name says what it is")
    if v.upper() in QUANT_TYPES:
        raise Invalid(f"unknown llama-quantize type '{v}' (names are case-sensitive)", f"write {v.upper()}")
    raise Invalid(f"unknown llama-quantize type '{v}'",
                  suggest(v.upper(), QUANT_TYPES) or "run `llama-quantize --help` for the list of type names")


class GGUFVariant(TensorOverrides):
    """One llama-quantize output. ``imatrix: null`` follows the gguf.imatrix setting."""

    type: str
    label: SafeName | None = Field(None, description="unique name of the variant (default: type, '-noimat' suffix)")
    imatrix: bool | None = None

    @field_validator("type")
    @classmethod
    def _type(cls, v: str) -> str:
        return _quant_type(v)


class ImatrixSpec(Section):
    enabled: bool = True
    ctx: int = Field(512, ge=16, le=131_072)
    chunks: int = Field(100, ge=1, le=100_000)
    # Mixture-of-experts models (quantkit.experts): an expert routed fewer calibration tokens than this
    # has too little importance data. A few dozen tokens is a guess at "some", not a measured threshold;
    # 0 acts only on experts that got none.
    min_expert_tokens: int = Field(32, ge=0, le=10_000_000,
                                   description="experts with fewer imatrix tokens are uncovered (MoE models)")
    uncovered_experts: Literal["fallback", "refuse"] = Field(
        "fallback", description="for types that need an imatrix: give uncovered layers' expert tensors q4_k "
                                "(fallback, named in the report) or refuse the variant")


class FitsBudget(Section):
    """Memory the GGUF must fit in at a context length: weights + KV cache + headroom (quantkit.hardware)."""

    memory_gib: float = Field(gt=0, le=4096)
    ctx: int = Field(ge=16, le=1_048_576)


# The smallest candidate of the budget search (quantkit.budget.CANDIDATES): Q2_K blocks are 84 bytes per
# 256 weights. No mix of the candidates can go below it.
MIN_TARGET_BPW = 2.625


class GGUFTarget(Section):
    """A budget for a searched per-tensor mix: exactly one of size_gib, bpw, fits."""

    size_gib: float | None = Field(None, gt=0, le=4096, description="file size at most this many GiB")
    bpw: float | None = Field(None, gt=0, le=32, description="file bits per weight at most this")
    fits: FitsBudget | None = Field(None, description="weights + KV cache (f16) + headroom fit this memory")
    label: SafeName | None = Field(None, description="unique name of the variant (default target-4.50bpw, "
                                   "target-8GiB, target-8GiB-8k)")

    @model_validator(mode="after")
    def _one_budget(self) -> GGUFTarget:
        given = [k for k in ("size_gib", "bpw", "fits") if getattr(self, k) is not None]
        if len(given) != 1:
            raise Invalid(f"a target needs exactly one budget, found {len(given)}" + (f" ({', '.join(given)})" if given else ""),
                          "write one of {bpw: 4.5}, {size_gib: 4}, {fits: {memory_gib: 8, ctx: 8192}}")
        if self.bpw is not None and self.bpw < MIN_TARGET_BPW:
            raise Invalid(f"no mix can meet {self.bpw} bits per weight: the smallest candidate type (Q2_K) "
                          f"takes {MIN_TARGET_BPW}", f"use bpw >= {MIN_TARGET_BPW}", loc=("bpw",))
        return self

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        if self.bpw is not None:
            return f"target-{self.bpw:.2f}bpw"
        if self.size_gib is not None:
            return f"target-{self.size_gib:g}GiB"
        ctx = self.fits.ctx
        return f"target-{self.fits.memory_gib:g}GiB-" + (f"{ctx // 1024}k" if ctx % 1024 == 0 else str(ctx))


class GGUFSection(Section):
    base_type: Literal["f16", "bf16", "f32"] = "f16"
    imatrix: ImatrixSpec = ImatrixSpec()
    types: list[GGUFVariant] = Field(default_factory=list, max_length=64)
    targets: list[GGUFTarget] = Field(default_factory=list, max_length=16,
                                      description="budgets for searched per-tensor mixes (quantkit.budget)")
    overrides: TensorOverrides = TensorOverrides()

    @field_validator("types", mode="before")
    @classmethod
    def _strings_are_types(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"type": t} if isinstance(t, str) else t for t in v]
        return v

    @model_validator(mode="after")
    def _cross_field(self) -> GGUFSection:
        if not self.types and not self.targets:
            raise Invalid("gguf makes no variant", "list llama-quantize types under 'types' or budgets under 'targets'")
        if self.targets and not self.imatrix.enabled:
            raise Invalid("gguf.targets need the importance matrix: the search weights each tensor's error by it",
                          "set gguf.imatrix.enabled: true", loc=("targets",))
        for i, variant in enumerate(self.types):
            use_imatrix = self.uses_imatrix(variant)
            qt = QUANT_TYPES[variant.type]
            if not use_imatrix and (qt.needs_imatrix or variant.needs_imatrix() or self.overrides.needs_imatrix()):
                raise Invalid(f"types[{i}]: {variant.type} needs an importance matrix (llama-quantize refuses it without one)",
                              "set gguf.imatrix.enabled: true and do not set imatrix: false on this type")
        return self

    def uses_imatrix(self, variant: GGUFVariant) -> bool:
        return self.imatrix.enabled if variant.imatrix is None else (variant.imatrix and self.imatrix.enabled)

    def label(self, variant: GGUFVariant) -> str:
        if variant.label:
            return variant.label
        return variant.type if self.uses_imatrix(variant) or not self.imatrix.enabled else f"{variant.type}-noimat"

    def override_args(self, variant: GGUFVariant) -> list[str]:
        """Section-wide overrides, with the variant's own taking precedence."""
        merged = TensorOverrides(
            output_tensor_type=variant.output_tensor_type or self.overrides.output_tensor_type,
            token_embedding_type=variant.token_embedding_type or self.overrides.token_embedding_type,
            tensor_types={**self.overrides.tensor_types, **variant.tensor_types},
        )
        return merged.args()


def _group_size(v: int) -> int:
    if v != -1 and not (16 <= v <= 1024 and v & (v - 1) == 0):
        raise Invalid(f"group_size {v} is not supported", "use -1 (per channel) or a power of two from 16 to 1024, e.g. 128")
    return v


class GPTQVariant(Section):
    """GPTQ settings; the defaults are the seed's (bits 4, group 128, desc_act, damp 0.1)."""

    label: SafeName | None = Field(None, description="unique name of the variant (default GPTQ-<bits>bit-g<group>)")
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = Field(128, description="-1 (per channel) or a power of two from 16 to 1024")
    desc_act: bool = Field(True, description="act-order: columns in decreasing activation order, a group index per "
                           "column. vLLM 0.30 and later refuse it with groups (group_size other than -1): "
                           "docs/serving.md")
    group_aware: bool = Field(False, description="GPTQModel's act_group_aware: activation order within static groups, "
                              "which vLLM takes; needs desc_act: false")
    sym: bool = True
    damp_percent: float = Field(0.1, gt=0, lt=1)
    samples: int = Field(128, ge=1, le=4096)
    seq_len: int = Field(512, ge=16, le=32_768)
    seed: int = Field(0, ge=0, le=2**31 - 1)

    _group = field_validator("group_size")(_group_size)

    @model_validator(mode="after")
    def _order(self) -> GPTQVariant:
        if self.group_aware and self.desc_act:
            raise Invalid("group_aware and desc_act are two ways of ordering columns; GPTQModel takes one",
                          "set desc_act: false with group_aware: true (vLLM serves that), or drop group_aware",
                          loc=("group_aware",))
        return self

    @property
    def name(self) -> str:
        return self.label or f"GPTQ-{self.bits}bit-g{self.group_size}"


class AWQVariant(Section):
    """AWQ settings; defaults are the seed's (w_bit 4, group 128, zero point, GEMM)."""

    label: SafeName | None = Field(None, description="unique name of the variant (default AWQ-<bits>bit-g<group>)")
    w_bit: Literal[4] = 4
    q_group_size: Literal[32, 64, 128] = 128
    zero_point: bool = True
    version: Literal["GEMM"] = "GEMM"
    samples: int = Field(128, ge=1, le=4096)
    seq_len: int = Field(512, ge=16, le=32_768)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    clip: bool = Field(True, description="AWQ's clipping search after the scale search (AutoAWQ's apply_clip): "
                       "a grid over each linear's weight range; on a CPU most of AWQ's time")

    @property
    def name(self) -> str:
        return self.label or f"AWQ-{self.w_bit}bit-g{self.q_group_size}"

    # The names GPTQ and RTN variants use, so code reading any checkpoint spec asks one way.
    @property
    def bits(self) -> int:
        return self.w_bit

    @property
    def group_size(self) -> int:
        return self.q_group_size

    @property
    def sym(self) -> bool:
        return not self.zero_point  # GPTQModel's "sym" is the opposite of AWQ's zero point


class RTNVariant(Section):
    """Plain round-to-nearest in GPTQ's format (GPTQModel's weight-only RTN, no calibration, no smoothing): a
    reference that the GPTQ and AWQ variants of the same bits and group size must beat. Scored and shown in
    the report, never recommended, gated or published."""

    label: SafeName | None = Field(None, description="unique name of the variant (default RTN-<bits>bit-g<group>, "
                                   "'-asym' added when sym is false)")
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = Field(128, description="-1 (per channel) or a power of two from 16 to 1024")
    sym: bool = Field(True, description="symmetric like GPTQ's default; false: a zero point per group, like AWQ's")

    _group = field_validator("group_size")(_group_size)

    @property
    def name(self) -> str:
        return self.label or f"RTN-{self.bits}bit-g{self.group_size}" + ("" if self.sym else "-asym")
