"""Mixture-of-experts models end to end (#27), on the tiny MoE checkpoints of tests/tinymoe.py:

- the plan's per-tensor types of expert tensors are llama-quantize's (--dry-run), routed and shared;
- the whole recipe (convert, imatrix, stock types, scoring, GPTQ, AWQ, report, publish) on a routed-only Mixtral,
  with the tokens each expert received in the imatrix and in GPTQ/AWQ calibration;
- an expert the router never picks: the imatrix says 0 tokens, a type that needs importance data falls back
  (named) or is refused with the list, never a failure inside llama-quantize;
- GPTQ/AWQ on a family GPTQModel cannot calibrate is refused by `quantkit validate`, with file:line.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_pipeline import make_project, tiny_recipe

from quantkit.cli import main
from quantkit.estimate import MiB, read_local_facts, quantize_types, tensor_bytes

RECIPE = tiny_recipe("tiny-moe", body="""\
gguf:
  imatrix: {enabled: true, ctx: 128, chunks: 8}
  types: [Q4_K_M, IQ2_XXS]
evaluation:
  file: calibration/eval/en-prose-heldout.txt
  ctx: 128
  max_tokens: 2048
  bench: false
gptq:
  - {bits: 4, group_size: 128, samples: 8, seq_len: 64}
awq:
  - {w_bit: 4, q_group_size: 128, samples: 8, seq_len: 64}
""")
DEAD_RECIPE = tiny_recipe("tiny-moe-dead", body="""\
gguf:
  imatrix: {enabled: true, ctx: 128, chunks: 8%s}
  types: [Q4_K_M, IQ2_XXS]
""")


def project(root: Path, repo_root: Path, model: Path, recipe_text: str, name: str) -> Path:
    make_project(root, repo_root, model)
    recipe = root / "recipes" / f"{name}.yaml"
    recipe.write_text(recipe_text)
    return recipe


def tensor_types(gguf: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(gguf).tensors}


# --- the plan's types of expert tensors against llama-quantize -------------------------------------------

DRY_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q3_K_L", "Q2_K", "IQ4_XS", "IQ3_M",
             "MXFP4_MOE")
# "[  12/  51]  blk.0.ffn_down_exps.weight - [  256,   256,     8,     1], type =    f16, size = ... (q4_K)"
DRY_LINE = re.compile(r"\]\s+(\S+)\s+- \[.*?type =\s*(\S+),.*?size =\s*[\d.]+ MiB(?: ->\s*[\d.]+ MiB \((\S+)\))?")


@pytest.fixture(scope="module", params=["mixtral", "ernie"])
def deep_moe(request, tmp_path_factory, tiny_llama, toolchain):
    """An untrained 16-layer MoE (8 experts for Mixtral, whose 8-expert rules llama.cpp special-cases; a shared
    expert for Ernie) and its F16 GGUF: enough layers that the per-layer rules of each ftype apply."""
    import torch
    from tinymoe import TOKENIZER_FILES, model_config
    from transformers import AutoModelForCausalLM

    from quantkit.proc import run_tool

    folder = tmp_path_factory.mktemp(f"deep-{request.param}")
    cfg = model_config(request.param)
    cfg.num_hidden_layers = 16
    if request.param == "mixtral":
        cfg.num_local_experts = 8
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tiny_llama / name, folder / name)
    f16 = folder / "f16.gguf"
    run_tool([sys.executable, toolchain.convert_script, folder, "--outfile", f16, "--outtype", "f16"],
             env=toolchain.python_env())
    return folder, f16


def test_expert_tensor_types_are_llama_quantizes(deep_moe, toolchain, tmp_path):
    """Every tensor's type, routed experts, shared expert and router included, equals what
    llama-quantize --dry-run prints, and so does the total size."""
    folder, f16 = deep_moe
    facts = read_local_facts(folder)
    for qtype in DRY_TYPES:
        run = subprocess.run([toolchain.binary("llama-quantize"), "--dry-run", f16, tmp_path / "x.gguf", qtype, "1"],
                             capture_output=True, text=True, check=True)
        printed = {m.group(1): (m.group(3) or m.group(2)).upper()
                   for m in map(DRY_LINE.search, (run.stdout + run.stderr).splitlines()) if m}
        total = float(re.search(r"quant size\s*=\s*([\d.]+) MiB", run.stdout + run.stderr).group(1))
        ours = quantize_types(facts, qtype)
        assert {t.name: ty for t, ty in ours} == printed, qtype
        assert any("_exps" in n for n in printed)
        assert abs(sum(tensor_bytes(t, ty) for t, ty in ours) / MiB - total) <= 0.006, qtype


# --- the whole recipe on the routed-only Mixtral -------------------------------------------------------------

@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, repo_root, tiny_mixtral, toolchain):
    pytest.importorskip("gptqmodel", reason="needs the GPTQ/AWQ backend: pip install 'quantkit[gptq]'")
    root = tmp_path_factory.mktemp("moe-proj")
    recipe = project(root, repo_root, tiny_mixtral, RECIPE, "moe")
    store = tmp_path_factory.mktemp("moe-store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUANTKIT_STORE", str(store))
        assert main(["run", str(recipe)]) == 0
    return root, json.loads((root / "runs" / "tiny-moe" / "manifest.json").read_text())


@pytest.mark.slow
def test_moe_recipe_runs_end_to_end(moe_run):
    root, manifest = moe_run
    variants = {v["label"]: v for v in manifest["variants"]}
    assert list(variants) == ["F16", "Q4_K_M", "IQ2_XXS", "HF", "GPTQ-4bit-g128", "AWQ-4bit-g128"]
    for label in ("Q4_K_M", "IQ2_XXS", "GPTQ-4bit-g128", "AWQ-4bit-g128"):
        assert variants[label]["scores"]["kld_mean"] > 0, label
    # the imatrix's token counts: top-2 routing sends each of the 8 x 128 tokens to two experts per layer
    experts = variants["Q4_K_M"]["info"]["experts"]
    least = [tuple(x) for x in experts["least"]]
    assert least == sorted(least, key=lambda x: (x[2], x[0], x[1])) and len(least) == 8
    # the brief training leaves some experts nearly unrouted (a router imbalance real MoE training fights too):
    # IQ2_XXS, which needs importance data, gives their layers' expert tensors q4_k; Q4_K_M keeps its types
    below_layers = sorted({layer for layer, _, n in experts["below"]})
    assert all(n < 32 for *_, n in experts["below"])
    iq2 = variants["IQ2_XXS"]["info"]["experts"]
    assert iq2["fallback"] == [f"blk.{i}.ffn_{p}_exps.weight" for i in below_layers for p in ("gate", "up", "down")]
    assert bool(experts["below"]) == bool(experts.get("below_kept"))
    gguf = root / "runs" / "tiny-moe" / "tiny-llama-Q4_K_M.gguf"
    assert {t for n, t in tensor_types(gguf).items() if "_exps" in n} <= {"Q4_K", "Q6_K"}
    # GPTQ and AWQ: every expert calibrated on the whole sample (8 windows x 64 tokens)
    for label in ("GPTQ-4bit-g128", "AWQ-4bit-g128"):
        assert variants[label]["info"]["experts"]["tokens_per_expert"] == 8 * 64
    reports = list(root.rglob("report.md"))
    assert reports, "nothing published"
    text = reports[0].read_text()
    assert "## Expert coverage" in text and f"| {least[0][0]} | {least[0][1]} | {least[0][2]}" in text
    assert "gptq:GPTQ-4bit-g128: every expert calibrated on 512 tokens" in text


@pytest.mark.slow
def test_imatrix_counts_every_routed_token(moe_run, tiny_mixtral):
    from quantkit.experts import expert_token_counts

    root, manifest = moe_run
    # this run's imatrix, by its key (other tests' runs share the temporary folder)
    key = {s["step"]: s for s in manifest["steps"]}["imatrix"]["key"]
    imatrix = next(root.parent.glob(f"moe-store*/imatrix/{key}/imatrix.gguf"))
    counts = expert_token_counts(imatrix)
    cfg = json.loads((tiny_mixtral / "config.json").read_text())
    assert sorted(counts) == list(range(cfg["num_hidden_layers"]))
    for layer, per_expert in counts.items():
        assert len(per_expert) == cfg["num_local_experts"]
        assert sum(per_expert) == 8 * 128 * cfg["num_experts_per_tok"], layer


# --- an expert that is never routed to -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def dead_store(tmp_path_factory):
    return tmp_path_factory.mktemp("dead-store")


def test_a_never_routed_expert_falls_back_by_name(tmp_path, repo_root, tiny_ernie_dead, toolchain, dead_store,
                                                  monkeypatch):
    recipe = project(tmp_path, repo_root, tiny_ernie_dead, DEAD_RECIPE % "", "dead")
    monkeypatch.setenv("QUANTKIT_STORE", str(dead_store))
    assert main(["run", "--no-publish", str(recipe)]) == 0
    manifest = json.loads((tmp_path / "runs" / "tiny-moe-dead" / "manifest.json").read_text())
    variants = {v["label"]: v for v in manifest["variants"]}
    info = variants["IQ2_XXS"]["info"]["experts"]
    layers = json.loads((tiny_ernie_dead / "config.json").read_text())["num_hidden_layers"]
    below = {(layer, e): n for layer, e, n in info["below"]}
    assert all(below.get((layer, 3)) == 0 for layer in range(layers))  # the dead expert, in every layer
    # (the brief training also starves expert 1 of layer 1: a router collapse real MoE training fights too)
    assert info["fallback_type"] == "q4_k"
    assert info["fallback"] == [f"blk.{i}.ffn_{p}_exps.weight" for i in range(layers) for p in ("gate", "up", "down")]
    types = tensor_types(tmp_path / "runs" / "tiny-moe-dead" / "tiny-llama-IQ2_XXS.gguf")
    assert {types[n] for n in info["fallback"]} == {"Q4_K"}
    assert "IQ2_XXS" in set(types.values())  # the rest of the file is still the type asked for
    # a type that needs no importance data keeps its own types; the report says what happened
    assert variants["Q4_K_M"]["info"]["experts"]["below_kept"] is True
    from quantkit.publish.markdown import experts_md
    from quantkit.publish.report import build_report

    text = "\n".join(experts_md(build_report(manifest)))
    assert "| 0 | 3 | 0 (below) |" in text
    assert "gguf:IQ2_XXS: a type that needs importance data for every expert" in text
    assert "blk.0.ffn_down_exps.weight" in text


def test_a_never_routed_expert_can_refuse_the_variant(tmp_path, repo_root, tiny_ernie_dead, toolchain, dead_store,
                                                     monkeypatch, capsys):
    recipe = project(tmp_path, repo_root, tiny_ernie_dead, DEAD_RECIPE % ", uncovered_experts: refuse", "dead")
    monkeypatch.setenv("QUANTKIT_STORE", str(dead_store))
    assert main(["run", "--no-publish", str(recipe)]) != 0
    err = capsys.readouterr().err
    assert "IQ2_XXS: 3 expert(s) got fewer than 32 calibration tokens in the importance matrix" in err
    assert "layer 0 expert 3: 0" in err and "layer 1 expert 3: 0" in err
    assert "Traceback" not in err


def test_the_budget_search_prices_a_never_routed_expert_as_its_layer(tmp_path, repo_root, tiny_ernie_dead, toolchain,
                                                                      dead_store, monkeypatch):
    """The sensitivity table of the dead-expert model: expert 3's measured share of each expert tensor's error
    is 0 (no importance data), so the search would take it as free; priced by its layer's pooled importance it
    costs about what the layer's routed experts cost, and mix.json's note names it."""
    from quantkit.budget import price_uncovered_experts
    from quantkit.experts import expert_token_counts
    from quantkit.proc import run_tool
    from quantkit.sensitivity import read_importance, read_pooled_importance, tensor_errors

    recipe = project(tmp_path, repo_root, tiny_ernie_dead, DEAD_RECIPE % "", "dead")
    monkeypatch.setenv("QUANTKIT_STORE", str(dead_store))
    assert main(["run", "--no-publish", str(recipe)]) == 0  # reuses the fallback test's convert and imatrix
    steps = {s["step"]: s for s in json.loads((tmp_path / "runs" / "tiny-moe-dead" / "manifest.json").read_text())
             ["steps"]}
    base = dead_store / "convert" / steps["convert"]["key"] / "model.gguf"
    imatrix = dead_store / "imatrix" / steps["imatrix"]["key"] / "imatrix.gguf"
    run_tool([toolchain.binary("llama-quantize"), "--pure", "--imatrix", imatrix, base, tmp_path / "q2.gguf", "Q2_K",
              "1"])
    rows = tensor_errors(base_gguf=base, quant_gguf=tmp_path / "q2.gguf", importance=read_importance(imatrix),
                         pooled=read_pooled_importance(imatrix))
    counts = expert_token_counts(imatrix)
    priced, note = price_uncovered_experts({"q2_k": {"tensors": rows}}, counts=counts, min_tokens=32)
    layers = json.loads((tiny_ernie_dead / "config.json").read_text())["num_hidden_layers"]
    for layer in range(layers):
        assert counts[layer][3] == 0
        covered = [e for e, n in enumerate(counts[layer]) if n >= 32]
        for proj in ("gate", "up", "down"):
            name = f"blk.{layer}.ffn_{proj}_exps.weight"
            own, pooled = rows[name]["expert_errors"], rows[name]["expert_errors_pooled"]
            assert own[3] == 0.0 and sum(own) == pytest.approx(rows[name]["error"])  # unmeasured: free to crush
            # every uncovered expert (layer 1's expert 1 too, starved by the brief training) at the pooled price
            uncovered = [e for e in range(len(own)) if e not in covered]
            assert priced["q2_k"]["tensors"][name]["error"] == pytest.approx(
                sum(own[e] for e in covered) + sum(max(own[e], pooled[e]) for e in uncovered))
            # priced as a routed expert of its layer: not below the least of the covered ones' measured shares
            assert pooled[3] >= min(own[e] for e in covered), (name, own, pooled[3])
    assert [1, 3, 0] in note["experts"] and "blk.1.ffn_down_exps.weight" in note["tensors"]


@pytest.mark.slow
def test_a_budget_target_on_the_dead_expert_model_names_the_uncovered_experts(tmp_path, repo_root, tiny_ernie_dead,
                                                                             toolchain, dead_store, monkeypatch):
    """The whole search (tables, KLD probes, closed loop) on the dead-expert model: it runs, and the mix's info
    says which experts were priced as their layer's."""
    body = (DEAD_RECIPE % "").replace("  types: [Q4_K_M, IQ2_XXS]\n", "  types: [Q4_K_M]\n  targets:\n    - {bpw: 4.0}\n")
    recipe = project(tmp_path, repo_root, tiny_ernie_dead, body, "dead")
    monkeypatch.setenv("QUANTKIT_STORE", str(dead_store))
    assert main(["run", "--no-publish", str(recipe)]) == 0
    manifest = json.loads((tmp_path / "runs" / "tiny-moe-dead" / "manifest.json").read_text())
    mix = {v["label"]: v for v in manifest["variants"]}["target-4.00bpw"]["info"]["mix"]
    note = mix["uncovered_experts"]
    assert [0, 3, 0] in note["experts"] and [1, 3, 0] in note["experts"] and note["min_tokens"] == 32
    assert {f"blk.{i}.ffn_{p}_exps.weight" for i in (0, 1) for p in ("gate", "up", "down")} == set(note["tensors"])
    assert "unmeasured, not unimportant" in note["note"]
    from quantkit.publish.markdown import mix_md

    lines = mix_md({"variants": [{"label": "target-4.00bpw", "size_bytes": 1, "bpw": 4.0, "mix": {**mix, "summary": []}}]})
    assert f"Experts the importance matrix left under-covered: {note['note']}" in lines  # the report says so


def test_validate_refuses_gptq_and_awq_on_a_family_gptqmodel_cannot_calibrate(tmp_path, repo_root, tiny_ernie,
                                                                             capsys):
    body = """\
gptq:
  - {bits: 4, group_size: 128}
awq:
  - {w_bit: 4, q_group_size: 128}
"""
    recipe = project(tmp_path, repo_root, tiny_ernie, tiny_recipe("tiny-ernie", body), "ernie")
    assert main(["validate", str(recipe)]) == 2
    out = capsys.readouterr()
    text = out.out + out.err
    assert "recipes/ernie.yaml:8: gptq[0]: Ernie4_5_MoeForCausalLM: GPTQModel 7.6 cannot quantize" in text
    assert "recipes/ernie.yaml:10: awq[0]:" in text
    assert "ernie4_5_moe.py:106" in text
    assert not (tmp_path / "runs").exists()


# --- the size-budget search's roles --------------------------------------------------------------------------

def test_expert_tensors_have_roles_of_their_own_and_routers_stay_precise():
    from quantkit.budget import options
    from quantkit.sensitivity import calibration_group, tensor_group

    names = {"blk.3.ffn_gate_exps.weight": ("ffn_gate_exps", "ffn_exps"),
             "blk.3.ffn_down_exps.weight": ("ffn_down_exps", "ffn_exps"),
             "blk.3.ffn_up_shexp.weight": ("ffn_up_shexp", "ffn_shexp"),
             "blk.3.ffn_gate_inp.weight": ("ffn_gate_inp", "router"),
             "blk.3.ffn_gate_inp_shexp.weight": ("ffn_gate_inp_shexp", "router"),
             "blk.3.ffn_down.weight": ("ffn_down", "ffn")}
    assert {n: (calibration_group(n), tensor_group(n)) for n in names} == names
    table = lambda ty, size, err: {"tensors": {  # noqa: E731
        "blk.0.ffn_gate_inp_shexp.weight": {"quantized": True, "type": ty, "bytes": size, "error": err},
        "blk.0.ffn_down_exps.weight": {"quantized": True, "type": ty, "bytes": 100 * size, "error": err}}}
    opts = options({"q4_k": table("q4_k", 144, 2.0), "q8_0": table("q8_0", 272, 0.1)})
    assert [c.type for c in opts["blk.0.ffn_gate_inp_shexp.weight"]] == ["q8_0"]
    assert [c.type for c in opts["blk.0.ffn_down_exps.weight"]] == ["q4_k", "q8_0"]


def test_gptq_refuses_such_a_family_before_any_work(tiny_ernie, tmp_path):
    """A Hub model is only known once fetched: the step itself refuses, before GPTQModel loads anything."""
    from quantkit.digest import digest_of
    from quantkit.gptq import QuantizerError, gptq
    from quantkit.recipe import GPTQVariant
    from quantkit.source import ModelSnapshot
    from quantkit.store import Store

    snapshot = ModelSnapshot(path=tiny_ernie, repo=None, revision=None, commit=None, files={}, digest=digest_of({}))
    store = Store(tmp_path / "store")
    with pytest.raises(QuantizerError, match=r"gptq: Ernie4_5_MoeForCausalLM: GPTQModel 7.6 cannot quantize"):
        gptq(model=snapshot, spec=GPTQVariant(), calibration=None, store=store)
    assert not list((tmp_path / "store").glob("gptq/*"))


def test_validate_refuses_only_the_format_gptqmodel_cannot_make(tmp_path, repo_root, tiny_ernie, capsys):
    """Gemma-3: GPTQ quantizes it, AWQ does not (GPTQModel 7.6 with transformers 5): only the AWQ line is refused."""
    import shutil

    folder = tmp_path / "gemma-like"
    shutil.copytree(tiny_ernie, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["Gemma3ForCausalLM"]}))
    body = """\
gptq:
  - {bits: 4, group_size: 128}
awq:
  - {w_bit: 4, q_group_size: 128}
"""
    recipe = project(tmp_path / "p", repo_root, folder, tiny_recipe("tiny-gemma", body), "gemma")
    assert main(["validate", str(recipe)]) == 2
    out = capsys.readouterr()
    text = out.out + out.err
    assert "recipes/gemma.yaml:10: awq[0]: Gemma3ForCausalLM: GPTQModel 7.6's AWQ cannot run Gemma-3" in text
    assert "gptq[0]" not in text
