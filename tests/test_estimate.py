"""The plan's estimates against what benchmarks/scaling.py measured (benchmarks/results/scaling.json).

The JSON holds, per model size, the safetensors headers and config the estimate reads, the bytes every
node wrote, its peak RSS, and llama-quantize --dry-run's size of every type of the demo ladder: these
tests recompute the estimates with today's code, so a change to estimate.py is checked against real runs
without running them again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from quantkit.estimate import (GiB, MiB, CpuRepack, ModelFacts, gguf_name, quantize_types, repacked_bytes,
                               tensor_bytes)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.scaling import RESULTS, config_for, estimates, tensor_shapes  # noqa: E402

SIZES = json.loads(RESULTS.read_text())["sizes"]
# Named exceptions to ±20 % (benchmarks/README.md explains each): none for disk.
RAM_EXCEPTIONS: set[tuple[str, str]] = set()


def facts_of(name: str) -> ModelFacts:
    cfg = config_for(name)
    return ModelFacts.from_headers([{n: {"dtype": "BF16", "shape": list(s)} for n, s in tensor_shapes(cfg)}], cfg)


@pytest.mark.parametrize("size", SIZES, ids=[s["name"] for s in SIZES])
def test_tensor_types_are_llama_quantizes(size):
    """Tensor data of every ladder type equals llama-quantize --dry-run's (printed to 0.01 MiB)."""
    facts = ModelFacts.from_headers(size["headers"], size["config"])
    for qtype, printed in size["dry_run"].items():
        ours = sum(tensor_bytes(t, ty) for t, ty in quantize_types(facts, qtype, has_imatrix=True))
        assert abs(ours - printed) <= 0.006 * MiB, (qtype, ours / MiB, printed / MiB)


@pytest.mark.parametrize("size", SIZES, ids=[s["name"] for s in SIZES])
def test_estimates_within_20_percent(size):
    for r in estimates(size):
        if r["disk_err"] is not None:
            assert abs(r["disk_err"]) <= 0.02, (r["kind"], r["label"], r["disk_err"])  # sizes are near exact
        if r["ram_err"] is not None and (size["name"], r["kind"]) not in RAM_EXCEPTIONS:
            assert abs(r["ram_err"]) <= 0.20, (r["kind"], r["label"], r["ram_err"])


def test_fallbacks_of_a_width_not_a_multiple_of_256():
    """Qwen2.5-0.5B is 896 wide: K-quants fall back to 32-block types on every tensor whose rows are 896."""
    types = {t.name: ty for t, ty in quantize_types(facts_of("qwen-0.5b"), "Q4_K_M")}
    assert types["blk.0.attn_q.weight"] == "Q5_0"  # Q4_K -> Q5_0
    assert types["blk.0.attn_v.weight"] == "Q8_0"  # Q6_K (more bits) -> Q8_0
    assert types["blk.0.ffn_down.weight"] == "Q6_K"  # 4864 = 19 x 256: no fallback
    assert types["token_embd.weight"] == "Q8_0"  # tied: the output rule, 896 % 256 != 0
    assert types["blk.0.attn_norm.weight" if "blk.0.attn_norm.weight" in types else
                 "blk.0.input_layernorm.weight"] == "F32"


def test_what_llama_bench_repacks_depends_on_the_cpu():
    """Gemma-3-270M's Q4_K_M: an AMX CPU copies its tied Q8_0 embedding (the output's matmul) with 4 bytes more a
    block, its Q6_K and Q4_K matmuls; AVX2 alone only the Q4_K ones. Measured on the AMX machine: llama-bench held
    213 MiB more with repacking than with --repack 0 (benchmarks/README.md, (16))."""
    typed = quantize_types(facts_of("gemma3-270m"), "Q4_K_M")
    types = {t.name: ty for t, ty in typed}
    assert types["token_embd.weight"] == "Q8_0"
    amx = CpuRepack.from_flags(["avx2", "avx512f", "avx512_vnni", "amx_int8"])
    avx2 = CpuRepack.from_flags(["avx2"])
    assert amx.amx and not avx2.amx and not CpuRepack.from_flags(["amx_int8"]).amx  # AMX needs VNNI beside it
    q4k = sum(tensor_bytes(t, ty) for t, ty in typed if ty == "Q4_K")
    assert repacked_bytes(typed, avx2) == q4k
    assert 200 * MiB < repacked_bytes(typed, amx) < 230 * MiB
    embd = next(t for t, _ in typed if t.name == "token_embd.weight")
    untied = [*typed, (type(embd)("output.weight", embd.ne0, embd.rows, 2), "Q8_0")]
    # untied, the embedding is only looked up by row and stays mapped; the output of the same type is copied
    assert repacked_bytes(untied, amx) == repacked_bytes(typed, amx)
    assert repacked_bytes(untied, avx2) == q4k


def test_llama_8b_ladder_sizes_match_the_published_table():
    """llama-quantize's own size table (tools/quantize/quantize.cpp) for Llama-3-8B."""
    facts = facts_of("llama-8b")
    assert facts.parameters == 8_030_261_248
    from quantkit.estimate import quantize_bytes

    for qtype, gib in (("Q8_0", 7.96), ("Q6_K", 6.14), ("Q5_K_M", 5.33), ("Q4_K_M", 4.58), ("Q3_K_M", 3.74),
                       ("Q2_K", 2.96)):
        assert quantize_bytes(facts, qtype) / GiB == pytest.approx(gib, abs=0.04), qtype


def test_hf_names_map_to_gguf_names():
    assert gguf_name("model.layers.3.self_attn.v_proj.weight") == "blk.3.attn_v.weight"
    assert gguf_name("model.layers.3.mlp.down_proj.weight") == "blk.3.ffn_down.weight"
    assert gguf_name("lm_head.weight") == "output.weight"
    assert gguf_name("model.embed_tokens.weight") == "token_embd.weight"


def test_imatrix_time_stops_where_the_calibration_text_does(monkeypatch, tmp_path):
    """llama-imatrix runs at most tokens // ctx chunks: the Qwen3-30B-A3B recipe's 200 are a ceiling its three
    calibration files (142 KB, about 40k tokens) do not reach; the estimate counts the chunks the text gives."""
    from quantkit.estimate import (CALIBRATION_BYTES_PER_TOKEN, RATE, calibration_tokens, expected_imatrix_chunks,
                                   imatrix_seconds)
    from quantkit.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / "qwen3-30b-a3b.yaml", root=REPO)
    size = sum((REPO / f).stat().st_size for f in recipe.calibration.files)
    tokens = calibration_tokens(recipe, REPO)
    assert tokens == int(size / CALIBRATION_BYTES_PER_TOKEN)
    assert 38_000 < tokens < 42_000  # SmolLM2's tokenizer counts 40,287
    assert expected_imatrix_chunks(recipe, REPO) == tokens // 512 == 79 and recipe.gguf.imatrix.chunks == 200
    facts = facts_of("llama-8b")
    monkeypatch.setenv("QUANTKIT_PROJECT", str(REPO))  # how the plan finds the files without being told
    assert imatrix_seconds(recipe, {}, facts) == pytest.approx(512 * 79 * facts.parameters * RATE["llama"])
    # fewer chunks than the text holds: as asked
    few = recipe.model_copy(update={"gguf": recipe.gguf.model_copy(
        update={"imatrix": recipe.gguf.imatrix.model_copy(update={"chunks": 32})})})
    assert expected_imatrix_chunks(few, REPO) == 32
    # the files elsewhere (another project root) or a Hub dataset: the size is unknown, the recipe's count stands
    monkeypatch.setenv("QUANTKIT_PROJECT", str(tmp_path))
    assert calibration_tokens(recipe) is None and expected_imatrix_chunks(recipe) == 200
    hub = recipe.model_copy(update={"calibration": recipe.calibration.model_copy(update={"files": None})})
    assert calibration_tokens(hub, REPO) is None
