"""What a node costs before it runs: the disk it adds, its peak RAM.

Everything is computed from the model's safetensors headers (tensor names, shapes, dtypes) and its
config.json, never from the weights, so a plan can be made before any download (``quantkit.hubfacts``
reads the headers of a Hub repo with Range requests).

- GGUF sizes are exact up to the metadata: each tensor gets the type llama-quantize would give it
  (``quantize_types``, a port of ``llama_tensor_get_type`` in src/llama-quant.cpp at the pinned
  commit: the per-category rules of every ftype, the output/tied-embedding rule, the fallbacks when a
  row is not a multiple of the type's block) and its bytes from gguf-py's ``GGML_QUANT_SIZES``.
- The base logits' size is llama-perplexity's file layout (quantkit.scoring.windows.base_logits_bytes).
- Peak RAM of a llama.cpp tool is the model file it maps (the tools read weights in place; the kernel
  counts those pages in RSS) plus its buffers: the KV cache (quantkit.hardware's model), the logits of one
  context and the compute graph. Python steps add their interpreter with torch and transformers loaded.
  The constants below were fitted to ``benchmarks/scaling.py`` (0.5B to 3B parameters, Llama and Qwen
  shapes); benchmarks/README.md shows the error of each node kind at each size.

Time is tokens (or weights) x a rate per node kind (``RATE``, ``PER_WEIGHT``), fitted on the demo on one 2-core
machine; the console's ETA scales the rates by how fast this machine ran the nodes already done.
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.recipe import Recipe

GiB = 2**30
MiB = 2**20
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
GGUF_ALIGNMENT = 32

# Fitted to benchmarks/scaling.py (see benchmarks/README.md).
CONVERTER_BASE = 300 * MiB  # convert_hf_to_gguf.py with torch, numpy and the tokenizer loaded
LLAMA_TOOL_BASE = 60 * MiB  # a llama.cpp binary before it maps the model
GENERATE_TOOL_BASE = 30 * MiB  # llama-bench and llama-server the same (no evaluation text, no logits file)
TORCH_BASE = 420 * MiB  # quantkit's process with torch + transformers imported
GPTQMODEL_BASE = 600 * MiB  # quantkit's process with GPTQModel, torch and transformers imported
QUANTIZER_BASE = 800 * MiB  # the same, quantizing (GPTQ, AWQ, RTN), before the model's tensors
# torch on the CPU, fitted on two shapes of 49k and 262k tokens and checked on four more (benchmarks/README.md):
# copies of one window's ctx x vocab f32 logits held while it is scored (logits, log-softmax, gathers), and with
# KLD (the base's too, their difference and product); lm-eval beyond torch; a multiple-choice request's tokens
SCORE_WINDOW_COPIES = 5.0
KLD_WINDOW_COPIES = 6.5
LM_EVAL_EXTRA = 48 * MiB
HF_TASK_TOKENS = 64
SERVE_PROMPT_TOKENS = 256  # the serve check's chat prompts (system, a tool definition, the question) in tokens
QUANTKIT_BASE = 60 * MiB  # quantkit's own process (Python, pydantic, numpy, yaml): 52-67 MiB measured, the source hashes in it
LM_EVAL_BASE = 210 * MiB  # quantkit's process with lm-eval imported, building a task's items
GGUF_META_PER_TOKEN = 40  # tokenizer tokens, types and merges in the GGUF header, per vocab entry
QUANTIZE_BASE = 40 * MiB  # llama-quantize with its buffers empty
# The converter's vocabulary, per entry: its tokens, scores and types as Python lists, the tokenizer files
# parsed (tokenizer.model, tokenizer.json), the GGUF header built from them; the 262k-entry shapes of
# benchmarks/scaling.py held 72 MiB (tokenizer.model only) to 100 MiB (and tokenizer.json, Gemma-3's path).
CONVERTER_PER_TOKEN = 300
TOKENIZER_JSON_PER_TOKEN = 70  # tokenizer.json per vocab entry (SmolLM2 72, Llama-3 70 bytes)


@dataclass(frozen=True)
class Tensor:
    name: str  # as in the safetensors file
    shape: tuple[int, ...]
    dtype: str

    @property
    def count(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ModelFacts:
    """Sizes that decide costs: the tensors, the parameter count, bytes on disk, the vocabulary."""

    parameters: int
    largest_tensor: int  # elements
    source_bytes: int
    vocab: int | None
    config: dict
    tensors: tuple[Tensor, ...] = field(default=(), repr=False)
    origin: str = "local"  # "local" (a folder on disk) or "hub" (headers fetched, weights not)
    tokenizer_bytes: int | None = None  # the tokenizer's files, when on disk (a checkpoint copies them)

    @classmethod
    def from_headers(cls, headers: list[dict], config: dict, *, origin: str = "local",
                     tokenizer_bytes: int | None = None) -> ModelFacts:
        tensors = tuple(Tensor(name, tuple(int(d) for d in meta["shape"]), meta.get("dtype", "F32"))
                        for header in headers for name, meta in header.items() if name != "__metadata__")
        cfg = config.get("text_config") or config
        vocab = cfg.get("vocab_size")
        return cls(parameters=sum(t.count for t in tensors), largest_tensor=max((t.count for t in tensors), default=0),
                   source_bytes=sum(t.count * DTYPE_BYTES.get(t.dtype, 4) for t in tensors),
                   vocab=int(vocab) if vocab else None, config=config, tensors=tensors, origin=origin,
                   tokenizer_bytes=tokenizer_bytes)

    @property
    def text_config(self) -> dict:
        return self.config.get("text_config") or self.config

    @functools.cached_property
    def active_parameters(self) -> int:
        """Weights each token is computed with: all of them for a dense model; for a mixture of experts the
        non-expert weights (attention, embeddings, routers, shared experts) plus experts_used / expert_count
        of the routed experts' weights. What the compute of a forward pass scales with; disk and RAM stay on
        ``parameters`` (every expert is stored and mapped)."""
        cfg = self.text_config
        n, k = expert_count(cfg), experts_per_token(cfg)
        if not n or not k:
            return self.parameters
        routed = sum(t.ne0 * t.rows for t in gguf_tensors(self) if t.experts > 1)
        return self.parameters - routed + routed * min(k, n) // n


def read_local_facts(folder: Path) -> ModelFacts:
    headers = []
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            headers.append(json.loads(fh.read(n)))
    config_file = Path(folder) / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return ModelFacts.from_headers(headers, config, tokenizer_bytes=tokenizer_bytes(Path(folder)))


TOKENIZER_FILES = ("tokenizer*", "*.jinja", "vocab.*", "merges.txt", "special_tokens_map.json")


def tokenizer_bytes(folder: Path) -> int:
    """The bytes of a model folder's tokenizer files (what a GPTQ/AWQ checkpoint saves beside its weights)."""
    return sum(f.stat().st_size for pattern in TOKENIZER_FILES for f in folder.glob(pattern)
               if f.is_file() and not f.is_symlink())


# --- the GGUF tensors -------------------------------------------------------------------------------

_LAYER = re.compile(r"^(?:model\.|transformer\.|language_model\.model\.|model\.language_model\.)?"
                    r"(?:layers|h|blocks)\.(\d+)\.(.+)$")
_BLOCK_NAMES = {  # HF suffix (after "layers.N.") -> GGUF name after "blk.N."
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.qkv_proj.weight": "attn_qkv.weight", "self_attention.query_key_value.weight": "attn_qkv.weight",
    "attn.c_attn.weight": "attn_qkv.weight", "self_attn.dense.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "mlp.gate_up_proj.weight": "ffn_up.weight",
    "mlp.fc1.weight": "ffn_up.weight", "mlp.fc2.weight": "ffn_down.weight",
}


# Mixture-of-experts tensors (HF suffix after "layers.N.", with the expert index taken out) -> GGUF name.
# The converter stacks a layer's experts into one 3-D tensor per projection (conversion/qwen.py,
# conversion/llama.py, conversion/ernie.py); a fused gate_up_proj (transformers 5 checkpoints) splits in two.
_EXPERT = re.compile(r"^(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_EXPERT_NAMES = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps",
                 "w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}
_MOE_NAMES = {
    "mlp.gate.weight": "ffn_gate_inp.weight", "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
    "mlp.moe_statics.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
}
_F32_ALWAYS = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")
# Keys of config.json that hold the number of routed experts, by family.
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "moe_num_experts", "n_routed_experts")
# ... and of the experts each token is routed to.
EXPERTS_USED_KEYS = ("num_experts_per_tok", "moe_k", "experts_per_token", "moe_topk")


def expert_count(cfg: dict) -> int:
    return next((int(cfg[k]) for k in EXPERT_COUNT_KEYS if cfg.get(k)), 0)


def experts_per_token(cfg: dict) -> int:
    return next((int(cfg[k]) for k in EXPERTS_USED_KEYS if cfg.get(k)), 0)


@dataclass(frozen=True)
class GGUFTensor:
    name: str  # GGUF name (blk.N.attn_v.weight, token_embd.weight, output.weight)
    ne0: int  # row width (the last dimension of the HF shape)
    rows: int
    dims: int
    experts: int = 1  # ne[2] of a stacked expert tensor


def gguf_name(hf: str) -> str:
    if m := _LAYER.match(hf):
        layer, rest = m.groups()
        if e := _EXPERT.match(rest):
            return f"blk.{layer}.{_EXPERT_NAMES.get(e.group(2), e.group(2))}.weight"
        return f"blk.{layer}.{_MOE_NAMES.get(rest) or _BLOCK_NAMES.get(rest, rest)}"
    if hf.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight")):
        return "token_embd.weight"
    if hf.endswith("lm_head.weight") or hf == "embed_out.weight":
        return "output.weight"
    if hf.endswith(("model.norm.weight", "final_layernorm.weight", "ln_f.weight")):
        return "output_norm.weight"
    return hf


def gguf_tensors(facts: ModelFacts) -> list[GGUFTensor]:
    """The tensors the converter writes, in its order (token_embd, then by layer, output last)."""
    out = []
    stacked: dict[str, list] = {}  # a layer's experts, one GGUF tensor per projection: [ne0, rows, experts]
    for t in facts.tensors:
        if t.name.endswith(("rotary_emb.inv_freq", "masked_bias", ".attn.bias")) or not t.shape:
            continue
        if any(part in t.name for part in VISION_PARTS):  # a VLM's vision tower goes to its mmproj file instead
            continue
        name = gguf_name(t.name)
        if t.name.endswith("mlp.experts.gate_up_proj") or t.name.endswith("mlp.experts.gate_up_proj.weight"):
            # fused [experts, 2 * ff, embd]: the converter writes gate and up apart
            n_exp, rows2, ne0 = t.shape[-3:]
            for proj in ("gate", "up"):
                out.append(GGUFTensor(name.replace("gate_up_proj", f"ffn_{proj}_exps").removesuffix(".weight")
                                      + ".weight", ne0, n_exp * rows2 // 2, 3, n_exp))
            continue
        if t.name.endswith("mlp.experts.down_proj"):
            out.append(GGUFTensor(name, t.shape[-1], t.count // t.shape[-1], 3, t.shape[0]))
            continue
        rows = t.count // t.shape[-1] if t.shape[-1] else 0
        if name.endswith("_exps.weight") and len(t.shape) == 2:
            acc = stacked.setdefault(name, [t.shape[-1], 0, 0])
            acc[1] += rows
            acc[2] += 1
            continue
        if name.endswith("exp_probs_b.bias"):
            out.append(GGUFTensor(name, t.shape[-1], 1, 1))  # the converter squeezes [1, experts] to 1-D
            continue
        out.append(GGUFTensor(name, t.shape[-1], rows, len(t.shape)))
    out += [GGUFTensor(name, ne0, rows, 3, n) for name, (ne0, rows, n) in stacked.items()]

    def order(g: GGUFTensor):
        m = re.match(r"blk\.(\d+)\.", g.name)
        return (1, int(m.group(1)), g.name) if m else ((0, 0, g.name) if g.name == "token_embd.weight" else (2, 0, g.name))

    return sorted(out, key=order)


@functools.lru_cache(maxsize=None)  # called per tensor and type: the import and the lookup are most of its time
def _sizes(type_name: str) -> tuple[int, int]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]]


def tensor_bytes(t: GGUFTensor, type_name: str) -> int:
    block, size = _sizes(type_name)
    return t.rows * (t.ne0 // block) * size


def _aligned(n: int) -> int:
    return (n + GGUF_ALIGNMENT - 1) // GGUF_ALIGNMENT * GGUF_ALIGNMENT


def metadata_bytes(facts: ModelFacts, n_tensors: int) -> int:
    """GGUF header: key/values (the tokenizer dominates) and one info record per tensor."""
    return _aligned(64 * 1024 + (facts.vocab or 0) * GGUF_META_PER_TOKEN + n_tensors * 96)


def base_types(facts: ModelFacts, base_type: str) -> list[tuple[GGUFTensor, str]]:
    """What the converter writes: 1-D tensors (norms, biases) in F32, the rest in the base type."""
    base = base_type.upper()
    # the converter also keeps routers in F32 (conversion/base.py: FFN_GATE_INP, FFN_GATE_INP_SHEXP)
    return [(t, "F32" if t.dims < 2 or t.name.endswith(_F32_ALWAYS) else base) for t in gguf_tensors(facts)]


def gguf_file_bytes(facts: ModelFacts, typed: list[tuple[GGUFTensor, str]]) -> int:
    return metadata_bytes(facts, len(typed)) + sum(_aligned(tensor_bytes(t, ty)) for t, ty in typed)


# --- llama-quantize's choice of type per tensor (src/llama-quant.cpp, llama_tensor_get_type) ------------

_DEFAULT = {  # llama_ftype_get_default_type
    "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0", "F16": "F16", "BF16": "BF16",
    "F32": "F32", "Q1_0": "Q1_0", "Q2_0": "Q2_0", "MXFP4_MOE": "MXFP4", "Q2_K_S": "Q2_K", "Q2_K": "Q2_K",
    "IQ3_XS": "IQ3_S", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K",
    "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "TQ1_0": "TQ1_0", "TQ2_0": "TQ2_0", "IQ2_XXS": "IQ2_XXS",
    "IQ2_XS": "IQ2_XS", "IQ2_S": "IQ2_XS", "IQ2_M": "IQ2_S", "IQ3_XXS": "IQ3_XXS", "IQ1_S": "IQ1_S",
    "IQ1_M": "IQ1_M", "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS", "IQ3_S": "IQ3_S", "IQ3_M": "IQ3_S",
}
_FALLBACK = {"IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
             "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL", "Q2_0": "Q4_0", "Q2_K": "Q4_0",
             "Q3_K": "Q4_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_ATTN_OUT_8_EXPERTS = {"Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S", "IQ3_M",
                       "IQ4_XS"}
_IQ_LOW = {"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M"}
_UNQUANTIZED = {"F16", "BF16", "F32"}


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def _allows_quantization(t: GGUFTensor) -> bool:
    name = t.name
    return (t.dims >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name and "ssm_conv1d" not in name)


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass
class _State:
    n_attention_wv: int
    n_layer: int
    n_gqa: int
    n_expert: int
    arch: str
    is_70b: bool
    has_imatrix: bool
    tied: bool
    i_attention_wv: int = 0
    i_ffn_down: int = 0


def _pick(qs: _State, new: str, t: GGUFTensor, ftype: str, cat: str, output_type: str | None) -> str:
    """llama_tensor_get_type_impl for the architectures quantkit runs, dense and mixture-of-experts
    (the n_expert rules; the layer of a MoE model's ffn tensor read from its name, as layer_info does)."""
    falcon = qs.arch == "falcon"
    if cat == "output" or (qs.tied and cat == "token_embd"):
        if output_type:
            return output_type.upper()
        if ftype == "MXFP4_MOE" or falcon or t.ne0 % _sizes(new)[0] != 0:
            return "Q8_0"
        if ftype in _IQ_LOW or ftype == "IQ3_XXS":
            return "Q5_K"
        return new if new == "Q8_0" else "Q6_K"
    if ftype == "MXFP4_MOE":
        return "MXFP4" if t.experts > 1 else "Q8_0"
    if cat == "token_embd":
        if ftype in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            return "Q2_K"
        if ftype in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
            return "IQ3_S"
        if ftype in ("TQ1_0", "TQ2_0", "Q2_0"):
            return "Q4_K"
        return new
    if ftype in _IQ_LOW:
        if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
            qs.i_attention_wv += 1
            if qs.n_gqa >= 4 or qs.n_expert >= 4:
                return "Q4_K"
            return "IQ3_S" if ftype in ("IQ2_S", "IQ2_M") else "Q2_K"
        if qs.n_expert == 8 and cat == "attn_k":
            return "Q4_K"
        if cat == "ffn_down":
            i = qs.i_ffn_down  # here llama.cpp counts every ffn_down (routed and shared), not layers
            qs.i_ffn_down += 1
            if i < qs.n_layer // 8:
                return "IQ3_S" if ftype in ("IQ2_S", "IQ2_M") else "Q2_K"
            return new
        if cat == "attn_output":
            if qs.n_expert == 8:
                return "Q5_K"
            if ftype in ("IQ1_S", "IQ1_M"):
                return "IQ2_XXS"
            if ftype in ("IQ2_S", "IQ2_M"):
                return "IQ3_S"
        return new
    if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
        gqa4 = qs.n_gqa >= 4
        if ftype == "Q2_K":
            new = "Q4_K" if gqa4 else "Q3_K"
        elif ftype == "Q2_K_S" and gqa4:
            new = "Q4_K"
        elif ftype == "IQ3_XXS":
            new = "Q4_K" if gqa4 else ("IQ3_S" if not qs.has_imatrix else "IQ3_XXS")
        elif ftype in ("IQ3_XS", "IQ3_S") and gqa4:
            new = "Q4_K"
        elif ftype == "IQ3_M":
            new = "Q4_K"
        elif ftype == "Q3_K_M":
            new = "Q5_K" if qs.i_attention_wv < 2 else "Q4_K"
        elif ftype == "Q3_K_L":
            new = "Q5_K"
        elif ftype in ("IQ4_NL", "IQ4_XS") and gqa4:
            new = "Q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and _more_bits(qs.i_attention_wv, qs.n_attention_wv):
            new = "Q6_K"
        elif ftype == "Q4_K_S" and qs.i_attention_wv < 4:
            new = "Q5_K"
        if qs.is_70b and new in ("Q3_K", "Q4_K"):
            new = "Q5_K"
        if qs.n_expert == 8:
            new = "Q8_0"
        qs.i_attention_wv += 1
        return new
    if cat == "attn_k":
        if qs.n_expert == 8:
            return "Q8_0"
        return {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}.get(ftype, new)
    if cat == "attn_q":
        return {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}.get(ftype, new)
    if cat == "ffn_down":
        i, n = _layer_of(qs, t, qs.i_ffn_down), qs.n_layer
        qs.i_ffn_down += 1
        if ftype == "Q2_K":
            return "Q3_K"
        if ftype == "Q2_K_S":
            return "Q4_K" if i < n // 8 else new
        if ftype == "IQ3_XXS" and not qs.has_imatrix:
            return "Q4_K" if i < n // 8 else "Q3_K"
        if ftype == "Q3_K_M":
            return "Q5_K" if i < n // 16 else ("Q4_K" if not falcon or _more_bits(i, n) else "Q3_K")
        if ftype == "IQ3_M" and (i < n // 8 or (qs.n_expert == 8 and _more_bits(i, n))):
            return "Q4_K"
        if ftype == "Q3_K_L":
            return "Q4_K" if falcon else "Q5_K"
        if ftype == "Q4_K_M":
            if falcon:
                return "Q6_K" if i < n // 16 else ("Q5_K" if _more_bits(i, n) else "Q4_K")
            return "Q6_K" if _more_bits(i, n) else new
        if i < n // 8 and ftype in ("IQ4_NL", "IQ4_XS") and not qs.has_imatrix:
            return "Q5_K"
        if ftype == "Q5_K_M" and _more_bits(i, n):
            return "Q6_K"
        if ftype == "Q4_K_S" and not falcon and i < n // 8:
            return "Q5_K"
        if ftype in ("Q4_0", "Q5_0") and qs.has_imatrix and i < n // 8:
            return "Q4_1" if ftype == "Q4_0" else "Q5_1"
        return new
    if cat == "attn_output":
        if falcon:
            return "Q4_K" if ftype == "Q3_K_L" else new
        if qs.n_expert == 8:
            return "Q5_K" if ftype in _ATTN_OUT_8_EXPERTS else new
        return {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_M": "Q4_K"}.get(ftype, new)
    if cat == "attn_qkv":
        if ftype in ("Q3_K_M", "Q3_K_L", "IQ3_M"):
            return "Q4_K"
        return {"Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K"}.get(ftype, new)
    if cat in ("ffn_gate", "ffn_up"):
        return new  # only IQ3_XS changes these (to IQ3_XXS in the middle layers), a smaller type
    return new


def _layer_of(qs: _State, t: GGUFTensor, counted: int) -> int:
    """layer_info: with experts the layer comes from the tensor's name (a layer has several ffn_down:
    routed and shared), otherwise from the running count."""
    if qs.n_expert > 1 and (m := re.match(r"blk\.(\d+)\.", t.name)):
        return int(m.group(1))
    return counted


def _fallback(t: GGUFTensor, ty: str) -> str:
    block = _sizes(ty)[0]
    if t.ne0 % block == 0:
        return ty
    to = _FALLBACK.get(ty, ty)
    return to if t.ne0 % _sizes(to)[0] == 0 else "F16"


def quantize_types(facts: ModelFacts, qtype: str, *, base_type: str = "f16", has_imatrix: bool = False,
                   output_tensor_type: str | None = None, token_embedding_type: str | None = None,
                   tensor_types: dict[str, str] | None = None) -> list[tuple[GGUFTensor, str]]:
    """Each GGUF tensor with the type llama-quantize gives it for ``qtype`` and these overrides."""
    ftype = qtype.upper()
    default = _DEFAULT[ftype]
    base = base_types(facts, base_type)
    cfg = facts.text_config
    heads = int(cfg.get("num_attention_heads") or 1)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    n_layer = int(cfg.get("num_hidden_layers") or 0)
    arch = str(cfg.get("model_type") or "")
    names = {t.name for t, _ in base}
    qs = _State(n_attention_wv=sum(_category(t.name) in ("attn_v", "attn_qkv", "attn_kv_b") for t, _ in base),
                n_layer=n_layer, n_gqa=heads // kv_heads if kv_heads else 0,
                n_expert=expert_count(cfg), arch=arch,
                is_70b=arch == "llama" and n_layer == 80 and heads != kv_heads, has_imatrix=has_imatrix,
                tied="output.weight" not in names)
    patterns = [(re.compile(p), ty.upper()) for p, ty in sorted((tensor_types or {}).items())]
    out = []
    for t, current in base:
        if not _allows_quantization(t):
            out.append((t, current))
            continue
        cat = _category(t.name)
        if token_embedding_type and cat == "token_embd":
            out.append((t, token_embedding_type.upper()))
            continue
        if output_tensor_type and cat == "output":
            out.append((t, output_tensor_type.upper()))
            continue
        new = default
        if default not in _UNQUANTIZED:
            manual = next((ty for p, ty in patterns if p.search(t.name)), None)
            new = manual or _pick(qs, default, t, ftype, cat, output_tensor_type)
            new = _fallback(t, new)
        out.append((t, new))
    return out


def quantize_bytes(facts: ModelFacts, qtype: str, **kw) -> int:
    return gguf_file_bytes(facts, quantize_types(facts, qtype, **kw))


# --- costs per node kind -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Cost:
    disk_bytes: int | None  # what the node adds to the store (None: unknown)
    ram_bytes: int | None  # peak resident memory while it runs
    unknown: str | None = None  # why a figure is None


def kv_cache_bytes(facts: ModelFacts, ctx: int) -> int:
    from quantkit.hardware import ModelShape

    try:
        return ModelShape.from_config(facts.config).kv_cache_bytes(ctx)
    except (ValueError, KeyError, TypeError):
        return 0


LLAMA_BATCH = 2048  # common_params' n_batch and n_ubatch at the pinned commit: quantkit passes neither -b nor -ub
LLAMA_UBATCH = 512


def batched_tool_ram(facts: ModelFacts, gguf_bytes: int, ctx: int, chunks: int, *, all_logits: bool = False) -> int:
    """llama-perplexity (PPL, KLD, the base logits) and llama-imatrix over ``chunks`` chunks of ``ctx`` tokens.

    Both run ``n_batch // ctx`` chunks in one batch (their main() sets n_parallel = n_batch / n_ctx and a
    context of n_parallel * ctx tokens, one KV stream per chunk). As many chunks as the run has, up to that
    number, fill their KV streams and the logits buffer: every token's logits for the imatrix, the scored
    second half of each chunk for perplexity (the streams no chunk uses stay untouched: the measured peaks
    of 2-chunk runs fit two streams, not four). A chunk longer than a batch is gathered in a vector
    besides. The compute buffer is one ubatch: ggml's allocator reuses it along the graph, so it holds the
    larger of the layers' activations and the output's logits, not both (a 16x wide FFN measured so)."""
    cfg = facts.text_config
    hidden = int(cfg.get("hidden_size") or 0)
    ffn = int(cfg.get("intermediate_size") or 4 * hidden)
    vocab = facts.vocab or 0
    n_seq = max(1, LLAMA_BATCH // ctx)
    per_chunk = ctx if all_logits else ctx // 2
    in_batch = min(n_seq, max(1, chunks))
    outputs = in_batch * per_chunk
    if ctx > LLAMA_BATCH:
        outputs = min(per_chunk, LLAMA_BATCH) + per_chunk
    ubatch = min(LLAMA_UBATCH, n_seq * ctx)
    compute = ubatch * max(vocab, hidden * 6 + ffn * 3) * 4
    return gguf_bytes + kv_cache_bytes(facts, in_batch * ctx) + outputs * vocab * 4 + compute + LLAMA_TOOL_BASE


def _log_probs_bytes(facts: ModelFacts, positions: int) -> int:
    """llama-perplexity's uint16 log-probs of ``positions`` tokens (written for the base logits, read for KLD)."""
    return positions * (2 * (((facts.vocab or 0) + 1) // 2) + 4) * 2


def _variant_kwargs(recipe: Recipe, index: int) -> dict:
    spec = recipe.gguf
    v = spec.types[index]
    tensor_types = {**spec.overrides.tensor_types, **v.tensor_types}
    return {"base_type": spec.base_type, "has_imatrix": bool(spec.imatrix.enabled and spec.uses_imatrix(v)),
            "output_tensor_type": v.output_tensor_type or spec.overrides.output_tensor_type,
            "token_embedding_type": v.token_embedding_type or spec.overrides.token_embedding_type,
            "tensor_types": tensor_types}


def _variant_index(recipe: Recipe, params: dict) -> int | None:
    """The GGUF type a scoring node reads (``params["label"]``, added by the plan); None for the base."""
    if params.get("is_base") or not recipe.gguf:
        return None
    labels = [recipe.gguf.label(v) for v in recipe.gguf.types]
    return labels.index(params["label"]) if params.get("label") in labels else None


# evaluation.sets (quantkit.evalsets): a set's kind costs what its first-set kind costs at the set's ctx and tokens
def _as_first_set(recipe: Recipe, params: dict) -> Recipe:
    ev = recipe.evaluation
    s = next(x for x in ev.sets if x.name == params["set"])
    return recipe.model_copy(update={"evaluation": ev.model_copy(update={"ctx": s.ctx, "max_tokens": s.max_tokens})})


def on_set(name: str, recipe: Recipe, params: dict, facts: ModelFacts):
    """The estimate ``name`` of a first-set kind, for its kind on one more evaluation set."""
    return globals()[name](_as_first_set(recipe, params), params, facts)


def kind_cost(estimate, recipe: Recipe, params: dict, facts: ModelFacts | None) -> Cost:
    """A node's disk and peak RAM from its kind's ``estimate(recipe, params, facts)`` (quantkit.graph's
    ``StepKind.cost``; None: adds nothing, RAM unknown); ``params`` are the node's, with its label."""
    if facts is None:
        return Cost(None, None, "the model's safetensors headers are not available")
    if not facts.tensors:
        return Cost(None, None, "the model has no safetensors weights to read shapes from")
    return Cost(0, None) if estimate is None else estimate(recipe, params, facts)


def base_gguf_bytes(recipe: Recipe, facts: ModelFacts) -> int:
    return gguf_file_bytes(facts, base_types(facts, recipe.gguf.base_type)) if recipe.gguf else 0


def _eval_ctx(recipe: Recipe) -> int:
    return recipe.evaluation.ctx if recipe.evaluation else 512


def source_cost(recipe: Recipe, params: dict, facts: ModelFacts) -> Cost:
    # files are hashed (and downloaded) in blocks: nothing grows with the model
    return Cost(facts.source_bytes if facts.origin == "hub" else 0, QUANTKIT_BASE)


def task_items_cost(recipe: Recipe, params: dict, facts: ModelFacts) -> Cost:
    # lm-eval builds a task's requests from its documents: kilobytes to a few MiB of items, whatever the model
    return Cost(64 * 1024, LM_EVAL_BASE)


def convert_cost(recipe: Recipe, params: dict, facts: ModelFacts) -> Cost:
    # The converter streams one tensor at a time (the source tensor, its f32 copy and the output copy)
    # beside the vocabulary it loaded.
    vocabulary = (facts.vocab or 0) * CONVERTER_PER_TOKEN
    return Cost(base_gguf_bytes(recipe, facts), CONVERTER_BASE + facts.largest_tensor * (4 + 2) + vocabulary)


# A projector GGUF's header: the clip.* keys (image mean and std, sizes) and one info record per tensor; the
# tiny VLM's (22 tensors) is 2,272 bytes: a bound a little above it.
MMPROJ_META = 2048
MMPROJ_META_PER_TENSOR = 64


def mmproj_types(facts: ModelFacts, qtype: str) -> list[tuple[Tensor, str]]:
    """Each vision tensor with the type ``convert_hf_to_gguf.py --mmproj --outtype <qtype>`` writes it in
    (conversion/base.py ``prepare_tensors`` and ``MmprojModel.tensor_force_quant``, and the SigLIP families'
    own rule, SmolVLM's and Gemma 3's: ``.embeddings.`` in F32)."""
    qtype = qtype.upper()
    out = []
    for t in facts.tensors:
        if not any(part in t.name for part in VISION_PARTS):
            continue
        if len(t.shape) <= 1 or any(k in t.name for k in (".embeddings.", "position_embedding", "pos_embed")):
            ty = "F32"  # biases, norms and position embeddings always; the SigLIP patch embedding too
        elif "input_projection" in t.name:
            ty = "F16"  # Gemma 3's projector (llama.cpp issue 13025)
        elif "patch_embed" in t.name:
            ty = "F16" if qtype == "F16" else "F32"  # MmprojModel's patch_embd rule
        else:  # a row that is not a multiple of the block falls back to F16 (gguf.QuantError)
            ty = qtype if t.shape[-1] % _sizes(qtype)[0] == 0 else "F16"
        out.append((t, ty))
    return out


def mmproj_file_bytes(facts: ModelFacts, qtype: str) -> int:
    typed = mmproj_types(facts, qtype)
    data = sum(_aligned(t.count // _sizes(ty)[0] * _sizes(ty)[1]) for t, ty in typed)
    return _aligned(MMPROJ_META + MMPROJ_META_PER_TENSOR * len(typed)) + data


def mmproj_cost(recipe: Recipe, params: dict, facts: ModelFacts) -> Cost:
    """The vision tower and projector, written as F16 and as Q8_0 (quantkit.mmproj.TYPES), tensor by tensor."""
    from quantkit.mmproj import TYPES

    return Cost(sum(mmproj_file_bytes(facts, t) for t in TYPES), CONVERTER_BASE + facts.largest_tensor * (4 + 2))


def imatrix_cost(recipe: Recipe, params: dict, facts: ModelFacts) -> Cost:
    spec = recipe.gguf.imatrix
    # imatrix.gguf: per matrix multiplied in the layers one f32 sum per input column, and its record.
    disk = sum(t.ne0 * 4 + 512 for t, _ in base_types(facts, "f16")
               if t.dims >= 2 and t.name.startswith("blk.")) + 64 * 1024
    return Cost(disk, batched_tool_ram(facts, base_gguf_bytes(recipe, facts), spec.ctx, spec.chunks, all_logits=True))


def quantize_cost(recipe: Recipe, params: dict, facts: ModelFacts) -> Cost:
    size = quantize_bytes(facts, recipe.gguf.types[params["index"]].type, **_variant_kwargs(recipe, params["index"]))
    return Cost(size, _quantize_ram(recipe, facts))


def base_logits_cost(recipe: Recipe, params: dict, facts: ModelFacts) -> Cost:
    from quantkit.scoring.windows import estimate_base_logits_bytes, max_chunks

    ev, base = recipe.evaluation, base_gguf_bytes(recipe, facts)
    # and one chunk's log-probs, as written to the file
    ram = batched_tool_ram(facts, base, ev.ctx, max_chunks(ev)) + _log_probs_bytes(facts, ev.ctx)
    if facts.vocab is None:
        return Cost(None, ram, "config.json has no vocab_size")
    return Cost(estimate_base_logits_bytes(ev, n_vocab=facts.vocab), ram)


# A shard after the first: its GGUF header (the split.* keys and the info records of its own tensors; llama-gguf-split
# copies the model's key/values, the vocabulary, into the first shard only) and the alignment padding. A bound.
SHARD_HEADER_BYTES = 64 * 1024


def gguf_shards(size: int, max_file_bytes: int) -> int:
    """How many llama-gguf-split shards a GGUF of ``size`` bytes is published as (1: not split), the count
    quantkit.publish.release estimates from the shard size it asks for."""
    from quantkit.publish.release import shard_bytes_for, split_names

    if size <= max_file_bytes:
        return 1
    return len(split_names("x.gguf", size, shard_bytes=shard_bytes_for(max_file_bytes)))


def _quantize_ram(recipe: Recipe, facts: ModelFacts) -> int:
    """llama-quantize reads one tensor at a time into a buffer (the base type), converts it to f32 and quantizes
    it into a third (about a byte per weight): the largest tensor sets the peak, not the file."""
    in_bytes = 4 if recipe.gguf.base_type == "f32" else 2
    return QUANTIZE_BASE + facts.largest_tensor * (in_bytes + 4 + 1)


def _kld_probe_ram(recipe: Recipe, facts: ModelFacts, chunks: int) -> int:
    """quantkit.sensitivity.KLDProbe: llama-perplexity writes the base's log-probs on ``chunks`` chunks of
    KLD_CTX tokens, then reads them back beside each probed file (smaller than the base)."""
    from quantkit.sensitivity import KLD_CTX

    return (batched_tool_ram(facts, base_gguf_bytes(recipe, facts), KLD_CTX, chunks)
            + _log_probs_bytes(facts, KLD_CTX))


def sensitivity_cost(recipe, params: dict, facts):
    """llama-quantize --pure to one candidate type, then in quantkit's process the base and that file
    memory-mapped side by side, dequantized ROWS_PER_BLOCK rows at a time (base, file and their difference
    in f32)."""
    from quantkit.sensitivity import CANDIDATES, ROWS_PER_BLOCK

    pure = quantize_bytes(facts, CANDIDATES[params["label"]], has_imatrix=True)
    block = max((min(ROWS_PER_BLOCK, t.count // t.shape[-1]) * t.shape[-1] for t in facts.tensors
                 if len(t.shape) >= 2), default=0)
    compare = base_gguf_bytes(recipe, facts) + pure + 3 * block * 4
    return Cost(MiB, QUANTKIT_BASE + max(_quantize_ram(recipe, facts), compare))


def sensitivity_kld_cost(recipe, params: dict, facts):
    """Per tensor group, probe files quantized (llama-quantize) and scored against the base's log-probs."""
    from quantkit.sensitivity import PROBE_CHUNKS

    return Cost(MiB, max(_quantize_ram(recipe, facts), _kld_probe_ram(recipe, facts, PROBE_CHUNKS)))


def _target_budget(recipe, params: dict, facts) -> int:
    """The budget of a mix's target, checked against the model's size here (BudgetError names the target),
    so `plan` refuses it up front."""
    from quantkit.budget import check_target

    target = recipe.gguf.targets[params["index"]]
    return check_target(target, parameters=facts.parameters, config=facts.config,
                        where=f"gguf.targets[{params['index']}] ({target.name})")


def mix_cost(recipe, params: dict, facts):
    """The search in quantkit's process (its tables and a llama-quantize --dry-run of the mix), then, when a stock
    type fits the budget, the closed loop: the mix and that type quantized and scored on CHECK_CHUNKS
    calibration chunks against the base's log-probs (quantkit.budget.ClosedLoop)."""
    from quantkit.budget import CHECK_CHUNKS, STOCK_FTYPES

    budget = _target_budget(recipe, params, facts)
    ram = QUANTKIT_BASE + QUANTIZE_BASE
    if any(quantize_bytes(facts, t, has_imatrix=True) <= budget for t in STOCK_FTYPES):
        ram = QUANTKIT_BASE + max(_quantize_ram(recipe, facts), _kld_probe_ram(recipe, facts, CHECK_CHUNKS))
    return Cost(MiB, ram)


def quantize_mix_cost(recipe, params: dict, facts):
    return Cost(_target_budget(recipe, params, facts), _quantize_ram(recipe, facts))


def published_gguf_bytes(recipe: Recipe, facts: ModelFacts) -> list[int]:
    """The size of every GGUF the run folder holds and publishing stages: the base, each type, each size-budget
    mix (another publisher's file is scored, never published)."""
    spec = recipe.gguf
    if not spec:
        return []
    sizes = [base_gguf_bytes(recipe, facts)]
    sizes += [quantize_bytes(facts, v.type, **_variant_kwargs(recipe, i)) for i, v in enumerate(spec.types)]
    if spec.targets:
        sizes += [quantize_mix_cost(recipe, {"index": i}, facts).disk_bytes for i in range(len(spec.targets))]
    return sizes


def publish_cost(recipe: Recipe, params: dict, facts: ModelFacts) -> Cost:
    """Publishing (release.shard_staged) replaces each staged GGUF over ``publish.max_file_gib`` by its
    llama-gguf-split shards: new files beside the hard links into the store, so the published run adds the
    split GGUFs' bytes once more. The report, cards and Modelfiles are kilobytes. llama-gguf-split holds the
    header and one tensor at a time (its read buffer): the largest tensor in the widest published type."""
    from quantkit.recipe import Publish

    limit = (recipe.publish or Publish()).max_file_bytes
    split = [(size, gguf_shards(size, limit)) for size in published_gguf_bytes(recipe, facts) if size > limit]
    if not split:
        return Cost(0, None)
    widest = 4 if recipe.gguf.base_type == "f32" else 2
    return Cost(sum(size + (n - 1) * SHARD_HEADER_BYTES for size, n in split),
                LLAMA_TOOL_BASE + metadata_bytes(facts, len(facts.tensors)) + facts.largest_tensor * widest)


def _scored_gguf_bytes(recipe: Recipe, params: dict, facts: ModelFacts) -> int:
    """The GGUF a scoring node reads: the base, or the type its label names."""
    index = _variant_index(recipe, params)
    if index is None:
        return base_gguf_bytes(recipe, facts)
    return quantize_bytes(facts, recipe.gguf.types[index].type, **_variant_kwargs(recipe, index))


def external_cost(recipe: Recipe, params: dict, facts: ModelFacts) -> Cost:
    """Another publisher's GGUF copied into the store: at most the base's size (a quantized file of it)."""
    return Cost(base_gguf_bytes(recipe, facts), 256 * 2**20)


def score_gguf_cost(recipe: Recipe, params: dict, facts: ModelFacts) -> Cost:
    """llama-perplexity over the evaluation's chunks; a quantized type is scored against the base logits (KLD):
    one chunk's base log-probs read back."""
    from quantkit.scoring.windows import max_chunks, scored_per_chunk

    ev, index = recipe.evaluation, _variant_index(recipe, params)
    ram = batched_tool_ram(facts, _scored_gguf_bytes(recipe, params, facts), ev.ctx, max_chunks(ev))
    if index is not None:
        ram += _log_probs_bytes(facts, scored_per_chunk(ev.ctx))
    return Cost(64 * 1024, ram)


@dataclass(frozen=True)
class CpuRepack:
    """Which weights ggml's CPU backend copies into a layout of its own when a tool loads a GGUF without
    ``--no-repack`` (llama-bench, llama-server): a property of the machine that runs the node, which builds its
    tools natively. With AMX (ggml-cpu/amx at the pinned commit) the AMX buffer takes every matmul weight of
    Q4_0, Q4_1, Q8_0 (rows of a multiple of 32 weights) and Q4_K, Q5_K, Q6_K, IQ4_XS (of 256), in a layout
    with a few bytes more a block, the tied token embedding too (its output duplicate is a matmul); what it
    does not take goes to ggml-cpu/repack.cpp: Q4_0, Q4_K, IQ4_NL, MXFP4 with AVX2, Q2_K with AVX-512 (rows of
    8). A token embedding that is only looked up by row (an untied model's) stays mapped."""

    amx: bool = False
    avx512: bool = False

    @classmethod
    def from_flags(cls, flags) -> CpuRepack:
        flags = set(flags)
        return cls(amx={"amx_int8", "avx512_vnni"} <= flags, avx512="avx512f" in flags)


# The AMX buffer's types, the block of weights a row must be a multiple of, and the bytes it adds per block (its
# get_row_size: Q8_0's compensation sums, the K-types' unpacked scales)
AMX_TYPES = {"Q4_0": (32, 0), "Q4_1": (32, 0), "Q8_0": (32, 4), "Q4_K": (256, 4), "Q5_K": (256, 4),
             "Q6_K": (256, 0), "IQ4_XS": (256, 2)}
REPACKED_TYPES = frozenset({"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"})  # repack.cpp with AVX2 (+ Q2_K with AVX-512)
_CPU: ContextVar[CpuRepack | None] = ContextVar("cpu_repack", default=None)


def cpu_info() -> dict[str, str]:
    """This machine's /proc/cpuinfo, its first processor's fields (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


@functools.cache
def _this_cpu() -> CpuRepack:
    return CpuRepack.from_flags(cpu_info().get("flags", "").split())


@contextmanager
def on_cpu(cpu: CpuRepack):
    """Estimate as for the machine ``cpu`` describes (the benchmark's records were measured on others)."""
    token = _CPU.set(cpu)
    try:
        yield
    finally:
        _CPU.reset(token)


def repacked_bytes(typed, cpu: CpuRepack) -> int:
    """The anonymous copy of the matmul weights of ``typed`` ((GGUFTensor, type) pairs) on ``cpu``: the token
    embedding too where it is also the output (tied; llama.cpp places its output duplicate as a matmul's)."""
    tied = not any(t.name == "output.weight" for t, _ in typed)
    total = 0
    for t, ty in typed:
        ty = ty.upper()
        if t.dims < 2 or (t.name.startswith("token_embd") and not tied):
            continue
        amx = AMX_TYPES.get(ty) if cpu.amx and t.experts == 1 else None  # AMX: plain matmuls only
        if amx and t.ne0 % amx[0] == 0 and t.rows % 32 == 0:
            total += tensor_bytes(t, ty) + t.rows * (t.ne0 // amx[0]) * amx[1]
        elif (ty in REPACKED_TYPES or (ty == "Q2_K" and cpu.avx512)) and t.rows % 8 == 0:
            total += tensor_bytes(t, ty)
    return total


def _repacked_bytes(recipe: Recipe, params: dict, facts: ModelFacts) -> int:
    """The anonymous copy llama-bench and llama-server make of the repackable tensors (the scoring tools run with
    --no-repack): the file's pages of those tensors stay mapped beside it."""
    index = _variant_index(recipe, params)
    if index is None:
        return 0
    typed = quantize_types(facts, recipe.gguf.types[index].type, **_variant_kwargs(recipe, index))
    return repacked_bytes(typed, _CPU.get() or _this_cpu())


def _resident_tool_ram(recipe: Recipe, params: dict, facts: ModelFacts, ctx: int, batch_tokens: int) -> int:
    """A llama.cpp tool that asks for the last token's logits only (llama-bench, llama-server): the mapped weights
    and their repacked copy, the KV cache (cleared at start, so resident) of its context, and the activations of
    the batches it runs; ggml's compute buffer is reserved for a whole ubatch of logits but only the rows
    written are touched."""
    cfg = facts.text_config
    hidden = int(cfg.get("hidden_size") or 0)
    ffn = int(cfg.get("intermediate_size") or 4 * hidden)
    return (_scored_gguf_bytes(recipe, params, facts) + _repacked_bytes(recipe, params, facts)
            + kv_cache_bytes(facts, ctx) + batch_tokens * (hidden * 6 + ffn * 3) * 4 + (facts.vocab or 0) * 4
            + GENERATE_TOOL_BASE)


def bench_gguf_cost(recipe: Recipe, params: dict, facts: ModelFacts) -> Cost:
    """llama-bench: a context of the prompt and the generated tokens."""
    ev = recipe.evaluation
    ctx = ev.bench_prompt_tokens + ev.bench_gen_tokens
    return Cost(64 * 1024, _resident_tool_ram(recipe, params, facts, ctx, ev.bench_prompt_tokens))


def serve_gguf_cost(recipe: Recipe, params: dict, facts: ModelFacts) -> Cost:
    """llama-server with one slot of quantkit.serving.llamaserver.CTX tokens, short chat prompts."""
    from quantkit.serving.llamaserver import CTX

    return Cost(64 * 1024, _resident_tool_ram(recipe, params, facts, CTX, _serve_tokens(recipe) // 3))


def tasks_gguf_cost(recipe: Recipe, params: dict, facts: ModelFacts) -> Cost:
    """llama-perplexity --multiple-choice: a context of BATCH_CTX tokens over its parallel sequences (their KV) and
    a vector of every position's logits (tools/perplexity: ``batch_logits(n_ctx * n_vocab)``, zero-filled)."""
    from quantkit.scoring.tasks_llamacpp import BATCH_CTX

    return Cost(64 * 1024, _scored_gguf_bytes(recipe, params, facts) + kv_cache_bytes(facts, BATCH_CTX)
                + BATCH_CTX * (facts.vocab or 0) * 4 + LLAMA_TOOL_BASE)


def _checkpoint_spec(recipe: Recipe, label: str):
    """The GPTQ/AWQ/RTN settings of the checkpoint variant ``label``; None for the source model."""
    for path, _fmt, lab in recipe.variant_labels():
        if lab == label and len(path) == 2 and isinstance(path[1], int):
            spec = getattr(recipe, path[0])[path[1]]
            if hasattr(spec, "bits"):
                return spec
    return None


def torch_model_bytes(facts: ModelFacts, spec=None) -> int:
    """A model as quantkit runs it in transformers on the CPU: float32 weights; a checkpoint's linears packed (their
    bits and group scales) beside everything else in float32, and the int4 layout GPTQModel's CPU kernel
    (TorchAtenLinear) repacks them into on the first forward: about a byte a weight more (+392 MiB for the
    358 M of Qwen2.5-0.5B's shape, with quantkit.scoring.hf.release_freed_memory)."""
    if spec is None:
        return facts.parameters * 4
    packed, other = _packed_and_other(facts, spec.bits, spec.group_size)
    return int(packed + other * 4 + (facts.parameters - other))


def _torch_base(spec) -> int:
    return TORCH_BASE if spec is None else GPTQMODEL_BASE  # a checkpoint needs GPTQModel's kernels imported


def _load_transient(facts: ModelFacts, spec=None) -> int:
    """While transformers loads a model into float32, the 16-bit tensors it converts are also mapped from the file:
    a checkpoint's unquantized tensors (saved in 16 bits), or a 16-bit source's every tensor."""
    if spec is not None:
        return _packed_and_other(facts, spec.bits, spec.group_size)[1] * 2
    return sum(t.count * DTYPE_BYTES.get(t.dtype.upper(), 4) for t in facts.tensors if t.dtype.upper() != "F32")


def _torch_ram(facts: ModelFacts, spec, working: int, *, base: int | None = None) -> int:
    """Peak of a torch node: the library, the model as loaded, and the larger of its load and its work."""
    base = _torch_base(spec) if base is None else base
    return base + torch_model_bytes(facts, spec) + max(_load_transient(facts, spec), working)


def score_hf_cost(recipe: Recipe, params: dict, facts: ModelFacts) -> Cost:
    """A window of ctx tokens through the model: its logits, log-softmax and the gathered scores; a checkpoint is
    scored next to the float32 base (KLD): both models, both windows' log-probs and their difference."""
    spec = _checkpoint_spec(recipe, params["label"])
    window = _eval_ctx(recipe) * (facts.vocab or 0) * 4
    if spec is None:
        return Cost(64 * 1024, _torch_ram(facts, None, int(SCORE_WINDOW_COPIES * window)))
    return Cost(64 * 1024, _torch_ram(facts, spec, torch_model_bytes(facts) + int(KLD_WINDOW_COPIES * window)))


def tasks_hf_cost(recipe: Recipe, params: dict, facts: ModelFacts) -> Cost:
    """lm-eval's HFLM: batches of HF_TASK_BATCH requests padded to the longest, their logits and log-softmax."""
    from quantkit.scoring.tasks import HF_TASK_BATCH

    spec = _checkpoint_spec(recipe, params["label"])
    batch = HF_TASK_BATCH * HF_TASK_TOKENS * (facts.vocab or 0) * 4 * 2
    return Cost(64 * 1024, LM_EVAL_EXTRA + _torch_ram(facts, spec, batch))


def bench_hf_cost(recipe: Recipe, params: dict, facts: ModelFacts) -> Cost:
    """A greedy generation from a short prompt: one token's logits at a time."""
    return Cost(64 * 1024, _torch_ram(facts, _checkpoint_spec(recipe, params["label"]), (facts.vocab or 0) * 4))


def serve_hf_cost(recipe: Recipe, params: dict, facts: ModelFacts) -> Cost:
    """The serve check's chats: on the first step, the prompt's logits at every position and generate's copy."""
    spec = _checkpoint_spec(recipe, params["label"])
    return Cost(64 * 1024, _torch_ram(facts, spec, 2 * SERVE_PROMPT_TOKENS * (facts.vocab or 0) * 4))


def gptq_cost(recipe: Recipe, params: dict, facts: ModelFacts) -> Cost:
    spec = recipe.gptq[params["index"]]
    return Cost(checkpoint_bytes(facts, spec.bits, spec.group_size), gptqmodel_ram(facts))


def awq_cost(recipe: Recipe, params: dict, facts: ModelFacts) -> Cost:
    spec = recipe.awq[params["index"]]
    return Cost(checkpoint_bytes(facts, spec.bits, spec.group_size),
                gptqmodel_ram(facts, awq_tokens=spec.samples * spec.seq_len))


def rtn_cost(recipe: Recipe, params: dict, facts: ModelFacts) -> Cost:
    spec = recipe.rtn[params["index"]]  # no calibration: GPTQ's bound
    return Cost(checkpoint_bytes(facts, spec.bits, spec.group_size), gptqmodel_ram(facts))


# --- time per node kind --------------------------------------------------------------------------------
# Seconds per (token x weight) a node kind spends, fitted on the demo (SmolLM2-135M, 2 cores, quiet machine:
# benchmarks/README.md, "Where the demo's time goes"). The console's ETA scales them by how fast this
# machine ran the nodes already done, so only their ratios matter: a GPTQ, AWQ or torch pass is not an
# average node.
#
# Mixtures of experts: a forward pass computes each token with the weights it is routed to, so the nodes that
# evaluate tokens (imatrix, perplexity/KLD, tasks, bench, serve, score-hf) scale with
# ``ModelFacts.active_parameters`` (llama.cpp's mul_mat_id and transformers' expert loop only touch routed
# rows). Per-weight nodes (convert, quantize, rtn) read every weight: total ``parameters``. GPTQ and AWQ stay on
# the total too: quantkit calibrates with GPTQModel's ExpertsRoutingBypass (quantkit.gptq.moe_routing), which
# sends every calibration token through every expert, so forward passes and Hessians cover all expert weights
# on all tokens (with plain routing they would see ~experts_used/expert_count of the tokens, but each expert's
# solve would still cost as much as a dense linear's).
RATE = {
    "llama": 1.8e-11,  # llama.cpp evaluating tokens (imatrix, perplexity, KLD, bench): 42 s for 16k imatrix tokens
    "torch-score": 2.0e-11,  # transformers float32 on the CPU, windows of ctx tokens with the full logits (score-hf)
    "torch-tasks": 6.0e-12,  # lm-eval's torch backend, batches of 8 requests (tasks-hf): 71 s for 200 items
    "gptq": 2.5e-10,  # GPTQModel per calibration token (forward, Hessians, the layer solves): 79 s
    "awq": 4.0e-10,  # AWQ's scale search per calibration token: 120 s without clipping
    "awq-clip": 5.5e-9,  # AWQ's clipping search, on at most 512 sampled tokens: 382 s more with it
}
PER_WEIGHT = {"convert": 4.5e-8, "quantize": 2.6e-8, "quantize-iq": 7.4e-8, "rtn": 1e-7}
COPY_BYTES_PER_S = 200e6  # a file copied (or downloaded on a fast link) into the store: a rough figure, not fitted
TASK_TOKENS = 55  # effective tokens per multiple-choice item for llama.cpp (the context once, batched choices)
TASK_CHOICES = 4  # lm-eval's torch backend evaluates the context again with each choice


def kind_seconds(estimate, recipe: Recipe, params: dict, facts: ModelFacts | None) -> float | None:
    """A node's wall time on the reference machine from its kind's ``estimate`` (``StepKind.seconds``);
    None when nothing is known."""
    if estimate is None or facts is None or not facts.tensors:
        return None
    return estimate(recipe, params, facts)


def _scored_tokens(recipe: Recipe) -> int:
    return min(recipe.evaluation.max_tokens, 10 ** 9) if recipe.evaluation else 0


def _task_limit(recipe: Recipe, params: dict) -> int:
    limits = {t.name: t.limit or 500 for t in (recipe.evaluation.tasks if recipe.evaluation else [])}
    return limits.get(params.get("task"), 500)


def _bench_reps(recipe: Recipe) -> int:
    return recipe.evaluation.bench_reps if recipe.evaluation else 1


def _serve_tokens(recipe: Recipe) -> int:  # a server start (or a load) and three short requests
    return 3 * ((recipe.serve.max_tokens if recipe.serve else 64) + 64)


def convert_seconds(recipe: Recipe, params: dict, facts: ModelFacts) -> float:
    return facts.parameters * PER_WEIGHT["convert"]


def mmproj_seconds(recipe: Recipe, params: dict, facts: ModelFacts) -> float:  # two conversions
    return 2 * vision_parameters(facts) * PER_WEIGHT["convert"] + 2


# Calibration text per token: the three shipped files (142,162 bytes) are 40,287 tokens with SmolLM2's 49k-entry
# vocabulary (English 4.5, code 4.2, Japanese 1.7 bytes a token). Larger vocabularies (Llama 3's, Qwen's) make
# fewer tokens, so the count errs high and the imatrix time with it, never short.
CALIBRATION_BYTES_PER_TOKEN = 3.5


def calibration_tokens(recipe: Recipe, root: Path | None = None) -> int | None:
    """About how many tokens the recipe's calibration files hold, from their sizes (no tokenizer needed); None for
    a Hub dataset or a file that is not there. ``root``: the project (by default found as the recipe loader finds
    it: $QUANTKIT_PROJECT, or the folder above the working directory with a recipes/ folder)."""
    spec = recipe.calibration
    if not spec.files:
        return None
    if root is None:
        from quantkit.recipe import find_project_root

        root = find_project_root(Path.cwd())
    files = [Path(root) / f for f in (*spec.files, *spec.conversations)]
    if not all(f.is_file() for f in files):
        return None
    return int(sum(f.stat().st_size for f in files) / CALIBRATION_BYTES_PER_TOKEN)


def expected_imatrix_chunks(recipe: Recipe, root: Path | None = None) -> int:
    """The chunks llama-imatrix evaluates: ``imatrix.chunks``, or fewer when the calibration text runs out first
    (tools/imatrix/imatrix.cpp: at most tokens // ctx)."""
    spec = recipe.gguf.imatrix
    tokens = calibration_tokens(recipe, root)
    return spec.chunks if tokens is None else max(1, min(spec.chunks, tokens // spec.ctx))


def imatrix_seconds(recipe: Recipe, params: dict, facts: ModelFacts) -> float:
    return recipe.gguf.imatrix.ctx * expected_imatrix_chunks(recipe) * facts.active_parameters * RATE["llama"]


def quantize_seconds(recipe: Recipe, params: dict, facts: ModelFacts) -> float:
    qtype = recipe.gguf.types[params["index"]].type
    return facts.parameters * PER_WEIGHT["quantize-iq" if qtype.upper().startswith("IQ") else "quantize"]


def external_seconds(recipe: Recipe, params: dict, facts: ModelFacts) -> float:
    return base_gguf_bytes(recipe, facts) / COPY_BYTES_PER_S + 1


# The size-budget search's kinds: fixed seconds + seconds per weight, fitted to two runs on 2 quiet cores
# (2026-12-04, benchmarks/README.md): the demo's SmolLM2-135M (tables 42.0 s for 7, KLD per role 36.5 s, a mix with
# its closed-loop check 36.2 s, its GGUF 7.4 s) and the tiny model, 4.7 M weights (2.6, 6.6, 1.7 s, about 0.5 s).
# The KLD per role and the mix's check are llama-perplexity runs, whose start-up is the fixed part.
SEARCH = {"sensitivity": (0.0, 4.5e-8), "sensitivity-kld": (5.5, 2.3e-7), "mix": (0.5, 2.7e-7),
          "quantize-mix": (0.0, 5.5e-8)}


def search_seconds(recipe: Recipe, params: dict, facts: ModelFacts) -> float:
    fixed, per_weight = SEARCH[params["kind"]]
    return fixed + per_weight * facts.parameters


def llama_score_seconds(recipe: Recipe, params: dict, facts: ModelFacts) -> float:
    """base-logits, score-gguf: the evaluation text through llama-perplexity."""
    return _scored_tokens(recipe) * facts.active_parameters * RATE["llama"]


def tasks_gguf_seconds(recipe: Recipe, params: dict, facts: ModelFacts) -> float:
    return _task_limit(recipe, params) * TASK_TOKENS * facts.active_parameters * RATE["llama"] + 1


def serve_gguf_seconds(recipe: Recipe, params: dict, facts: ModelFacts) -> float:
    return _serve_tokens(recipe) * facts.active_parameters * RATE["llama"] + 2


def serve_hf_seconds(recipe: Recipe, params: dict, facts: ModelFacts) -> float:
    return _serve_tokens(recipe) * facts.active_parameters * RATE["torch-score"] + 2


def bench_gguf_seconds(recipe: Recipe, params: dict, facts: ModelFacts) -> float:
    return (128 + 32 * 8) * _bench_reps(recipe) * facts.active_parameters * RATE["llama"]


def score_hf_seconds(recipe: Recipe, params: dict, facts: ModelFacts) -> float:
    # a quantized checkpoint is scored beside its base (KLD)
    models = 1 if params.get("is_base", True) else 2
    return _scored_tokens(recipe) * facts.active_parameters * RATE["torch-score"] * models


def tasks_hf_seconds(recipe: Recipe, params: dict, facts: ModelFacts) -> float:
    tokens = _task_limit(recipe, params) * TASK_TOKENS * 2 * TASK_CHOICES
    return tokens * facts.active_parameters * RATE["torch-tasks"] + 3


def bench_hf_seconds(recipe: Recipe, params: dict, facts: ModelFacts) -> float:
    return 3.0 * _bench_reps(recipe)


def gptq_seconds(recipe: Recipe, params: dict, facts: ModelFacts) -> float:
    # total, not active, parameters: every expert sees every calibration token (see RATE above)
    spec = recipe.gptq[params["index"]]
    return spec.samples * spec.seq_len * facts.parameters * RATE["gptq"] + 10


def awq_seconds(recipe: Recipe, params: dict, facts: ModelFacts) -> float:
    spec, w = recipe.awq[params["index"]], facts.parameters  # total: every expert sees every token (RATE)
    tokens = spec.samples * spec.seq_len
    return tokens * w * RATE["awq"] + (min(tokens, 512) * w * RATE["awq-clip"] if spec.clip else 0) + 10


def rtn_seconds(recipe: Recipe, params: dict, facts: ModelFacts) -> float:
    return facts.parameters * PER_WEIGHT["rtn"] + 10


VISION_PARTS = ("vision_model", "vision_tower", "visual.", "multi_modal_projector", "connector", "mm_projector")


def vision_parameters(facts: ModelFacts) -> int:
    """Weights of the vision tower and its projector (what ``--mmproj`` converts), by their HF names."""
    return sum(t.count for t in facts.tensors if any(part in t.name for part in VISION_PARTS))


# Gemma's embedding (transformers' Gemma*ScaledWordEmbedding): GPTQModel's first calibration forward, where the
# peak was, held it once more as loaded: Gemma-3-270M's shape peaked at 2379-2400 MiB in five runs, the same
# vocabulary and widths in a Llama body at 1963 on the same machine (+429; the bf16 embedding is 320 MiB).
SCALED_EMBEDDING_TYPES = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text"})


def gptqmodel_ram(facts: ModelFacts, *, awq_tokens: int | None = None) -> int:
    """GPTQModel quantizes layer by layer (lazily loaded), in two phases whose larger is the peak. Its first
    calibration forward holds the embedding as loaded and in float32 (the forward's dtype on the CPU); then, layer
    by layer, the embedding as loaded, the layer being quantized in f32 and its solver's buffers: GPTQ solves each
    linear from the Hessian of its input (in_features² f32), its Cholesky factor and their inverse alive at once
    (a 16384-wide FFN input makes them 3 GiB); AWQ (``awq_tokens`` calibration tokens) keeps the layer's weights
    to restore after each scale it tries, and the widest linear's cached input and output. RTN holds less than
    GPTQ. Measured on six shapes (benchmarks/README.md, "Scaling"): Llama-3.2-1B's shape peaked at 2328 MiB
    where the two phases' sum said 3303, the first forward's alone 2303."""
    layers: dict[str, int] = {}
    widest = 0
    for t in facts.tensors:
        g = gguf_name(t.name)
        if g.startswith("blk."):
            layer = g.split(".")[1]
            layers[layer] = layers.get(layer, 0) + t.count
            if len(t.shape) == 2:
                widest = max(widest, t.shape[-1])
    largest = max(facts.tensors, key=lambda t: t.count)
    layer = max(layers.values(), default=0) * 4
    held = (2 * layer + 2 * awq_tokens * widest * 4 if awq_tokens is not None
            else layer + 3 * widest * widest * 4)
    as_loaded = DTYPE_BYTES.get(largest.dtype.upper(), 4)
    copies = 2 if str(facts.text_config.get("model_type") or "") in SCALED_EMBEDDING_TYPES else 1
    first_forward = largest.count * (copies * as_loaded + 4)
    return QUANTIZER_BASE + max(first_forward, largest.count * as_loaded + held)


def _packed_and_other(facts: ModelFacts, bits: int, group: int) -> tuple[float, int]:
    """A checkpoint's decoder linears packed at ``bits`` with an f16 scale and a packed zero per group (bytes),
    and the elements of everything else (embeddings, norms, the output layer), which stay unquantized."""
    packed = 0.0
    other = 0
    for t in facts.tensors:
        if gguf_name(t.name).startswith("blk.") and len(t.shape) == 2:
            groups = t.count // (group if group > 0 else t.shape[-1])
            packed += t.count * bits // 8 + groups * (2 + bits / 8)
        else:
            other += t.count
    return packed, other


def checkpoint_bytes(facts: ModelFacts, bits: int, group: int) -> int:
    """A GPTQ/AWQ checkpoint on disk: the packed linears, the rest in 16 bits, the tokenizer copied beside."""
    packed, other = _packed_and_other(facts, bits, group)
    tokenizer = facts.tokenizer_bytes
    if tokenizer is None:  # headers only (a Hub model not downloaded): by the vocabulary
        tokenizer = (facts.vocab or 0) * TOKENIZER_JSON_PER_TOKEN
    return int(packed + other * 2 + tokenizer)


# --- facts of a Hub model that is not on disk ----------------------------------------------------------

class FactsUnavailable(Exception):
    """Why the model's headers could not be read (the plan prints it next to the unknown figures)."""


def read_hub_facts(repo: str, revision: str | None) -> ModelFacts:
    """Tensor shapes from the safetensors headers (Range requests of the first bytes of each file, never
    the weights) and config.json, at the pinned revision."""
    from huggingface_hub import HfApi, constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    if constants.HF_HUB_OFFLINE:
        raise FactsUnavailable(f"HF_HUB_OFFLINE=1 and {repo} is not in the Hugging Face cache: the safetensors "
                               "headers and config.json cannot be read")
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    try:
        meta = HfApi(endpoint=endpoint).get_safetensors_metadata(repo, revision=revision)
        # Read into memory, not into the HF cache: a cached snapshot holding only config.json would look like
        # a downloaded model to the source step.
        url = hf_hub_url(repo, "config.json", revision=revision, endpoint=endpoint)
        response = get_session().get(url, headers=build_hf_headers(), follow_redirects=True)
        hf_raise_for_status(response)
        config = json.loads(response.content)
    except Exception as e:  # noqa: BLE001 - any failure to reach or parse the Hub leaves the figures unknown
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FactsUnavailable(f"cannot read the safetensors headers of {repo}@{revision}: {first}") from e
    headers = [{name: {"dtype": info.dtype, "shape": list(info.shape)} for name, info in fm.tensors.items()}
               for fm in meta.files_metadata.values()]
    return ModelFacts.from_headers(headers, config, origin="hub")
