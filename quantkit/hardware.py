"""Which variant fits which GPU or RAM size: weights + KV cache + runtime headroom.

The KV cache is computed from the model's own config.json (layers, KV heads, head
dim), f16 by default: ``2 (K and V) * layers * kv_heads * head_dim * ctx * bytes``.
The headroom stands for llama.cpp's compute buffers and the CUDA context; it is a
stated constant, not hidden in the numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

GIB = 1024**3
MEMORY_SIZES_GB = (8, 12, 16, 24, 48, 80)  # cards are sold in GiB ("24 GB" = 24 GiB)
CONTEXTS = (4096, 8192, 32768)
KV_BYTES = {"f16": 2, "q8_0": 34 / 32, "f32": 4}
DEFAULT_HEADROOM = 512 * 1024**2  # compute buffers + runtime context


@dataclass(frozen=True)
class ModelShape:
    """What the KV cache size depends on, read from config.json."""

    layers: int
    kv_heads: int
    head_dim: int
    max_context: int | None
    # mixture of experts: weights of the routed experts (all layers), and how many a token uses
    expert_parameters: int = 0
    experts: int = 0
    experts_per_token: int = 0

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        cfg = config.get("text_config") or config  # multimodal configs nest the language model
        try:
            layers = int(cfg["num_hidden_layers"])
            heads = int(cfg["num_attention_heads"])
        except KeyError as e:
            raise ValueError(f"config.json has no {e.args[0]!r}; cannot size the KV cache") from None
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
        max_ctx = cfg.get("max_position_embeddings")
        experts = next((int(cfg[k]) for k in ("num_local_experts", "num_experts", "moe_num_experts",
                                              "n_routed_experts") if cfg.get(k)), 0)
        expert_params, per_token = 0, 0
        if experts:
            ff = int(cfg.get("moe_intermediate_size") or cfg.get("intermediate_size") or 0)
            dense = int(cfg.get("first_k_dense_replace") or cfg.get("moe_layer_start_index") or 0)
            moe_layers = max(0, layers - dense - len(cfg.get("mlp_only_layers") or []))
            expert_params = moe_layers * experts * 3 * int(cfg["hidden_size"]) * ff  # gate, up, down
            per_token = int(cfg.get("num_experts_per_tok") or cfg.get("moe_k") or 0)
        return cls(layers, kv_heads, head_dim, int(max_ctx) if max_ctx else None, expert_parameters=expert_params,
                   experts=experts, experts_per_token=per_token)

    def kv_bytes_per_token(self, cache_type: str = "f16") -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * KV_BYTES[cache_type]

    def kv_cache_bytes(self, ctx: int, cache_type: str = "f16") -> int:
        return round(self.kv_bytes_per_token(cache_type) * ctx)

    def to_dict(self) -> dict:
        return asdict(self)


def available_memory() -> int | None:
    """This machine's MemAvailable (bytes), or None where /proc/meminfo does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_needed(weights_bytes: int, shape: ModelShape, ctx: int, *, cache_type: str = "f16",
                  headroom: int = DEFAULT_HEADROOM) -> int:
    return weights_bytes + shape.kv_cache_bytes(ctx, cache_type) + headroom


def hardware_fit(variants: list[dict], shape: ModelShape, *, contexts=CONTEXTS, memory_gb=MEMORY_SIZES_GB,
                 cache_type: str = "f16", headroom: int = DEFAULT_HEADROOM) -> dict:
    """For each variant and context, the memory it needs; for each memory size and context,
    the variants that fit, best quality (lowest mean KLD, then largest) first.

    ``variants``: report rows with ``id``, ``size_bytes`` and ``kld_mean``.
    """
    need: dict[str, dict[str, int | None]] = {}
    for v in variants:
        need[v["id"]] = {str(c): (memory_needed(v["size_bytes"], shape, c, cache_type=cache_type, headroom=headroom)
                                  if _ctx_ok(shape, c) else None) for c in contexts}

    def quality(v: dict) -> tuple:
        kld = v.get("kld_mean")
        return (0.0 if v.get("is_base") else (kld if kld is not None else float("inf")), -v["size_bytes"])

    ranked = sorted(variants, key=quality)
    fits = {}
    for gb in memory_gb:
        fits[str(gb)] = {str(c): [v["id"] for v in ranked
                                  if need[v["id"]][str(c)] is not None and need[v["id"]][str(c)] <= gb * GIB]
                         for c in contexts}
    moe = None
    if shape.expert_parameters:
        # llama.cpp can keep the routed experts in system RAM (--cpu-moe) and put the rest on the GPU; the
        # experts' share of a file is estimated by their share of the parameters
        moe = {}
        for v in variants:
            if not v.get("parameters"):
                continue
            rest = round(v["size_bytes"] * (1 - min(1.0, shape.expert_parameters / v["parameters"])))
            moe[str(v["id"])] = {str(c): rest + shape.kv_cache_bytes(c, cache_type) + headroom if _ctx_ok(shape, c)
                                 else None for c in contexts}
    return {"cache_type": cache_type, "headroom_bytes": headroom, "contexts": list(contexts),
            "memory_gb": list(memory_gb), "model": shape.to_dict(), "gpu_bytes_experts_in_ram": moe,
            "kv_cache_bytes": {str(c): shape.kv_cache_bytes(c, cache_type) for c in contexts},
            "needed_bytes": need, "fits": fits}


def _ctx_ok(shape: ModelShape, ctx: int) -> bool:
    return shape.max_context is None or ctx <= shape.max_context
