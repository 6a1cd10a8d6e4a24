"""`quantkit plan` for the shipped Qwen3-30B-A3B recipe from the safetensors headers and config.json alone,
served by the local Hub: 48 layers x 128 routed experts as the Hub stores them (one tensor per expert and
projection), priced as the converter stacks them and as llama-quantize types them."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
from test_plan_hub import hub_online, write_header_repo

from quantkit.estimate import CALIBRATION_BYTES_PER_TOKEN, RATE
from quantkit.plan import Machine, plan, render, totals


REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = REPO_ROOT / "recipes" / "qwen3-30b-a3b.yaml"
REPO = "Qwen/Qwen3-30B-A3B"
COMMIT = "ad44e777bcd18fa416d9da3bd8f70d33ebb85d39"
GiB = 2**30
# Qwen3-30B-A3B's config.json (the fields quantkit reads)
CONFIG = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
          "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
          "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
          "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
          "vocab_size": 151936, "tie_word_embeddings": False, "max_position_embeddings": 40960,
          "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16"}
H, FF, V, Q, KV, E = 2048, 768, 151936, 32 * 128, 4 * 128, 128


def shapes() -> list[tuple[str, list[int]]]:
    out = [("model.embed_tokens.weight", [V, H])]
    for i in range(48):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", [H]), (p + "post_attention_layernorm.weight", [H]),
                (p + "self_attn.q_proj.weight", [Q, H]), (p + "self_attn.k_proj.weight", [KV, H]),
                (p + "self_attn.v_proj.weight", [KV, H]), (p + "self_attn.o_proj.weight", [H, Q]),
                (p + "self_attn.q_norm.weight", [128]), (p + "self_attn.k_norm.weight", [128]),
                (p + "mlp.gate.weight", [E, H])]
        for e in range(E):
            out += [(p + f"mlp.experts.{e}.gate_proj.weight", [FF, H]),
                    (p + f"mlp.experts.{e}.up_proj.weight", [FF, H]),
                    (p + f"mlp.experts.{e}.down_proj.weight", [H, FF])]
    return out + [("model.norm.weight", [H]), ("lm_head.weight", [V, H])]


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    shutil.copy(RECIPE, tmp_path / "recipes" / RECIPE.name)
    shutil.copytree(REPO_ROOT / "calibration", tmp_path / "calibration")
    all_shapes = shapes()
    quarter = -(-len(all_shapes) // 4)
    parts = {f"model-0000{i + 1}-of-00004.safetensors": all_shapes[i * quarter:(i + 1) * quarter] for i in range(4)}
    folder = write_header_repo(tmp_path / "hub-files", parts, CONFIG)
    monkeypatch.setenv("QUANTKIT_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("QUANTKIT_PROJECT", str(tmp_path))
    with hub_online(REPO, folder, COMMIT, monkeypatch, tmp_path / "hf-cache"):
        yield tmp_path


def test_the_moe_recipe_plans_from_headers_alone(project):
    from quantkit.context import RunContext

    rows = {r.name: r for r in plan(RunContext.from_env(project / "recipes" / RECIPE.name, toolchain="find"))}
    assert not totals(list(rows.values())).unknown
    params = rows["source"].disk_bytes // 2  # the bf16 download
    assert params / 1e9 == pytest.approx(30.53, abs=0.01)  # "30.5B" on the model card
    # Q8_0: every weight at 34 bytes per 32 (embeddings and output too); norms and the 48 routers stay F32.
    f32 = 48 * (2 * H + 2 * 128 + E * H) + H
    q8 = (params - f32) * 34 // 32 + 4 * f32
    assert rows["quantize:Q8_0"].disk_bytes == pytest.approx(q8, rel=0.001)
    ladder = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M")
    sizes = {t: rows[f"quantize:{t}"].disk_bytes / GiB for t in ladder}
    assert list(sizes.values()) == sorted(sizes.values(), reverse=True)
    # imatrix maps the 57 GiB bf16 base: its RAM is above that
    assert rows["imatrix"].ram_bytes > rows["convert"].disk_bytes
    # Time of the nodes that evaluate tokens follows the 3.35 B active weights (1.54 B outside the routed experts
    # + 8/128 of their 28.99 B), not the 30.53 B stored; GPTQ sends every token through every expert: total.
    active = params - 48 * E * 3 * H * FF + 48 * 8 * 3 * H * FF
    assert active / 1e9 == pytest.approx(3.35, abs=0.01)
    # imatrix: the recipe's 200 chunks are a ceiling; the calibration text (142 KB) gives about 79 of 512 tokens
    calib = sum((project / f).stat().st_size for f in ("calibration/en-prose.txt", "calibration/code-python.txt",
                                                        "calibration/ja-prose.txt"))
    chunks = int(calib / CALIBRATION_BYTES_PER_TOKEN) // 512
    assert chunks == 79
    assert rows["imatrix"].seconds == pytest.approx(512 * chunks * active * RATE["llama"], rel=1e-6)
    assert rows["imatrix"].seconds < 3600  # 40,448 tokens; with total weights and 200 chunks it was 15.6 h
    assert rows["gptq:GPTQ-4bit-g128"].seconds == pytest.approx(256 * 2048 * params * RATE["gptq"] + 10, rel=1e-6)
    text = render(list(rows.values()), have=Machine(free_disk=500 * GiB, available_ram=64 * GiB))
    print(text)
    print({t: round(s, 2) for t, s in sizes.items()})
    print({n: round(r.seconds) for n, r in rows.items() if r.seconds is not None})


def test_moe_time_follows_active_weights_disk_and_ram_all_weights():
    """An MoE shape's token-evaluating nodes cost what a dense model of its active size costs; its disk and
    RAM what all its weights take."""
    from quantkit.estimate import (ModelFacts, bench_gguf_seconds, imatrix_cost, imatrix_seconds,
                                   llama_score_seconds, score_hf_seconds)
    from quantkit.recipe import load_recipe

    recipe = load_recipe(RECIPE, root=REPO_ROOT)
    moe = ModelFacts.from_headers([{n: {"dtype": "BF16", "shape": s} for n, s in shapes()}], CONFIG)
    # a dense model with the same attention and embeddings and an MLP as wide as the 8 experts a token uses
    dense_shapes = [(n, s) for n, s in shapes() if ".mlp." not in n]
    for i in range(48):
        p = f"model.layers.{i}.mlp."
        dense_shapes += [(p + "gate_proj.weight", [8 * FF, H]), (p + "up_proj.weight", [8 * FF, H]),
                         (p + "down_proj.weight", [H, 8 * FF])]
    dense_config = {k: v for k, v in CONFIG.items() if "expert" not in k} | {"intermediate_size": 8 * FF}
    dense = ModelFacts.from_headers([{n: {"dtype": "BF16", "shape": s} for n, s in dense_shapes}], dense_config)
    assert dense.active_parameters == dense.parameters
    # the same but for the 48 routers (128 x 2048 each): 0.35 %
    assert moe.active_parameters == pytest.approx(dense.parameters, rel=0.005)
    assert moe.parameters / moe.active_parameters > 9
    for seconds in (imatrix_seconds, llama_score_seconds, bench_gguf_seconds, score_hf_seconds):
        assert seconds(recipe, {}, moe) == pytest.approx(seconds(recipe, {}, dense), rel=0.005), seconds.__name__
    # imatrix maps the whole base GGUF: RAM follows every weight
    assert imatrix_cost(recipe, {}, moe).ram_bytes > 5 * imatrix_cost(recipe, {}, dense).ram_bytes
    # a dense config is untouched
    plain = ModelFacts.from_headers([{"model.layers.0.mlp.up_proj.weight": {"dtype": "BF16", "shape": [8, 4]}}],
                                    {"num_hidden_layers": 1})
    assert plain.active_parameters == plain.parameters == 32


def test_hardware_fit_says_what_must_be_resident():
    from quantkit.hardware import ModelShape, hardware_fit

    shape = ModelShape.from_config(CONFIG)
    assert (shape.experts, shape.experts_per_token) == (128, 8)
    assert shape.expert_parameters == 48 * 128 * 3 * H * FF  # 28.99 B of the 30.53 B
    params = sum(math.prod(s) for _, s in shapes())
    q4 = {"id": "gguf:Q4_K_M", "size_bytes": int(17.28 * GiB), "kld_mean": 0.01, "parameters": params}
    hw = hardware_fit([q4], shape)
    full, gpu = hw["needed_bytes"]["gguf:Q4_K_M"]["4096"], hw["gpu_bytes_experts_in_ram"]["gguf:Q4_K_M"]["4096"]
    # with the experts in system RAM the GPU holds attention, embeddings and output (5 % of the parameters: 0.87
    # of the 17.28 GiB) + 0.375 GiB of f16 KV cache at 4k + 0.5 GiB headroom
    assert gpu == pytest.approx(0.87 * GiB + 0.375 * GiB + 0.5 * GiB, rel=0.01)
    assert full == pytest.approx(17.28 * GiB + 0.375 * GiB + 0.5 * GiB, rel=0.001)
