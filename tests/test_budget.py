"""Size-budget GGUFs (gguf.targets): recipe validation, the allocator, and the chain on the tiny model."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
import textwrap
from pathlib import Path

import pytest

from quantkit.budget import BudgetError, Choice, allocate, budget_bytes, check_target, mix_summary, options
from quantkit.cli import main
from quantkit.manifest import Manifest
from quantkit.recipe import GGUFTarget
from quantkit.sensitivity import chunk_klds, halves, mix_file_text, paired

RECIPE = """\
name: tiny
model:
  path: models/tiny
calibration:
  files: [calibration/calib.txt]
gguf:
  types: [Q8_0]
  targets:
    - {bpw: 4.5}
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "calibration").mkdir()
    (tmp_path / "calibration" / "calib.txt").write_text("Calibration paragraph. " * 10 + "\n")
    monkeypatch.setenv("QUANTKIT_STORE", str(tmp_path / "store"))
    return tmp_path


def validate(project: Path, text: str, capsys) -> tuple[int, list[str]]:
    p = project / "recipes" / "r.yaml"
    p.write_text(textwrap.dedent(text))
    code = main(["validate", str(p)])
    return code, capsys.readouterr().err.splitlines()


# --- recipe ------------------------------------------------------------------------------------------

def test_targets_validate_with_default_labels(project, capsys):
    text = RECIPE.replace("    - {bpw: 4.5}", "    - {bpw: 4.5}\n    - {fits: {memory_gib: 8, ctx: 8192}}\n"
                                              "    - {size_gib: 0.5, label: small}")
    code, _ = validate(project, text, capsys)
    assert code == 0
    from quantkit.recipe import load_recipe

    r = load_recipe(project / "recipes" / "r.yaml", root=project)
    assert [lab for _, _, lab in r.variant_labels()] == ["F16", "Q8_0", "target-4.50bpw", "target-8GiB-8k", "small"]


def test_targets_without_types_validate(project, capsys):
    assert validate(project, RECIPE.replace("  types: [Q8_0]\n", ""), capsys)[0] == 0


@pytest.mark.parametrize("target,expected", [
    ("{bpw: 2.0}", "recipes/r.yaml:9: gguf.targets[0].bpw: no mix can meet 2.0 bits per weight: the smallest "
                   "candidate type (Q2_K) takes 2.625 (fix: use bpw >= 2.625)"),
    ("{bpw: 4.5, size_gib: 3}", "recipes/r.yaml:9: gguf.targets[0]: a target needs exactly one budget, found 2 "
                                "(size_gib, bpw) (fix: write one of {bpw: 4.5}, {size_gib: 4}, "
                                "{fits: {memory_gib: 8, ctx: 8192}})"),
    ("{label: x}", "recipes/r.yaml:9: gguf.targets[0]: a target needs exactly one budget, found 0 (fix: write one "
                   "of {bpw: 4.5}, {size_gib: 4}, {fits: {memory_gib: 8, ctx: 8192}})"),
    ("{size_gib: -1}", "recipes/r.yaml:9: gguf.targets[0].size_gib: Input should be greater than 0 "
                       "(fix: use a value inside the allowed range)"),
    ("{fits: {memory_gib: 8}}", "recipes/r.yaml:9: gguf.targets[0].fits.ctx: Field required (fix: add it)"),
    ("{bpw: 4.5, label: ../x}", "recipes/r.yaml:9: gguf.targets[0].label: '../x' is not one safe path component"),
    ("{bpw: 8.5, label: Q8_0}", "recipes/r.yaml:9: gguf.targets[0]: variant 'Q8_0' is made twice: by "
                                "gguf.targets[0] and by gguf.types[0] (line 7); both would write the same files "
                                "(fix: give one of them a different 'label')"),
])
def test_bad_targets_refused_on_their_line(project, capsys, target, expected):
    code, lines = validate(project, RECIPE.replace("{bpw: 4.5}", target), capsys)
    assert code == 2
    assert any(line.startswith(expected) for line in lines), lines


def test_targets_need_the_imatrix(project, capsys):
    code, lines = validate(project, RECIPE.replace("  types: [Q8_0]", "  imatrix: {enabled: false}\n  types: [Q8_0]"),
                           capsys)
    assert code == 2
    assert any("gguf.targets: gguf.targets need the importance matrix" in line for line in lines), lines


def test_budget_below_the_model_refused_at_plan_time():
    """A size or memory budget depends on the model: refused once its size is known (plan, preflight)."""
    config = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}
    t = GGUFTarget(size_gib=0.01)
    with pytest.raises(BudgetError, match=r"gguf.targets\[0\]: no mix can meet 0.010 GiB: even all tensors at Q2_K"):
        check_target(t, parameters=134_515_008, config=config, where="gguf.targets[0]")
    fits = GGUFTarget(fits={"memory_gib": 0.5, "ctx": 8192})
    with pytest.raises(BudgetError, match="fits 0.5 GiB at 8192 context"):
        check_target(fits, parameters=134_515_008, config=config, where="gguf.targets[0]")
    ok = GGUFTarget(fits={"memory_gib": 1, "ctx": 8192})
    kv = 2 * 30 * 3 * 64 * 8192 * 2
    assert check_target(ok, parameters=134_515_008, config=config, where="x") == 2**30 - kv - 512 * 2**20
    assert budget_bytes(GGUFTarget(bpw=4.0), parameters=1000, config=None) == 500


# --- the allocator -----------------------------------------------------------------------------------

def _random_opts(seed: int, n: int) -> dict[str, list[Choice]]:
    rng = random.Random(seed)
    out = {}
    for i in range(n):
        size = rng.randint(10, 60)
        kinds = sorted(rng.sample(range(2, 9), 4))
        out[f"t{i}"] = [Choice(f"b{k}", size * k, rng.uniform(0.5, 2.0) * size * 2.0 ** -k * 100) for k in kinds]
    return out


def _brute_force(opts, budget):
    names = sorted(opts)
    best = None
    for combo in itertools.product(*(opts[n] for n in names)):
        b = sum(c.bytes for c in combo)
        if b <= budget:
            e = sum(c.error for c in combo)
            if best is None or e < best - 1e-12:
                best = e
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocator_is_optimal_on_small_cases(seed):
    opts = _random_opts(seed, 5)
    lo = sum(o[0].bytes for o in opts.values())
    hi = sum(o[-1].bytes for o in opts.values())
    for budget in (lo, (2 * lo + hi) // 3, (lo + hi) // 2, (lo + 2 * hi) // 3, hi):
        chosen = allocate(opts, budget, granule=1)
        assert sum(c.bytes for c in chosen.values()) <= budget
        assert sum(c.error for c in chosen.values()) == pytest.approx(_brute_force(opts, budget), rel=1e-12)


def test_allocator_meets_the_budget_with_coarse_granules_and_is_deterministic():
    opts = _random_opts(42, 200)
    lo = sum(o[0].bytes for o in opts.values())
    hi = sum(o[-1].bytes for o in opts.values())
    for budget in range(lo, hi, (hi - lo) // 7):
        a = allocate(opts, budget, granule=37)
        assert sum(c.bytes for c in a.values()) <= budget
        assert a == allocate(dict(reversed(list(opts.items()))), budget, granule=37)
    with pytest.raises(BudgetError, match="the smallest mix takes"):
        allocate(opts, lo - 1)


def test_more_budget_never_predicts_more_error():
    opts = _random_opts(7, 40)
    lo = sum(o[0].bytes for o in opts.values())
    errors = [sum(c.error for c in allocate(opts, lo + k * 500, granule=1).values()) for k in range(20)]
    assert errors == sorted(errors, reverse=True)


def test_options_collapse_fallbacks_and_apply_group_factors():
    tables = {
        "q3_k": {"tensors": {"blk.0.attn_q.weight": {"type": "q3_k", "bytes": 110, "error": 9.0, "group": "attn",
                                                      "quantized": True},
                             "blk.0.attn_norm.weight": {"type": "f32", "bytes": 8, "group": "other", "quantized": False},
                             "token_embd.weight": {"type": "q4_0", "bytes": 144, "error": 4.0, "group": "token_embd",
                                                   "quantized": True}}},
        "q2_k": {"tensors": {"blk.0.attn_q.weight": {"type": "q2_k", "bytes": 84, "error": 20.0, "group": "attn",
                                                      "quantized": True},
                             "blk.0.attn_norm.weight": {"type": "f32", "bytes": 8, "group": "other", "quantized": False},
                             "token_embd.weight": {"type": "q4_0", "bytes": 144, "error": 4.0, "group": "token_embd",
                                                   "quantized": True}}},
    }
    opts = options(tables, {"attn_q": 2.0, "token_embd": 0.5})
    assert opts["token_embd.weight"] == [Choice("q4_0", 144, 2.0)]  # both candidates fell back to q4_0
    assert opts["blk.0.attn_q.weight"] == [Choice("q2_k", 84, 40.0), Choice("q3_k", 110, 18.0)]
    assert "blk.0.attn_norm.weight" not in opts


def test_options_price_each_candidate_by_its_probe():
    """Per-candidate factors (one per probe type): the q2_k choice is priced by the q2_k probe, not the q3_k one."""
    row = {"group": "attn", "quantized": True}
    tables = {"q2_k": {"tensors": {"blk.0.attn_v.weight": {**row, "type": "q2_k", "bytes": 84, "error": 20.0}}},
              "q3_k": {"tensors": {"blk.0.attn_v.weight": {**row, "type": "q3_k", "bytes": 110, "error": 9.0}}}}
    opts = options(tables, {"attn_v": {"q2_k": 3.0, "q3_k": 1.0}})
    assert opts["blk.0.attn_v.weight"] == [Choice("q2_k", 84, 60.0), Choice("q3_k", 110, 9.0)]


def test_chunk_klds_recovers_each_chunk_and_pairs_them():
    # llama-perplexity --kl-divergence's per-chunk lines: running means of equal-sized chunks 0.01, 0.03, 0.02
    lines = [f"{i:4d}      10.1234 ±    0.5000       0.01234 ±    0.00100       {m:.5f} ±    0.00100     1.000 ±  0.100 %"
             "    99.000 ±  0.100 %" for i, m in ((1, 0.01), (2, 0.02), (3, 0.02))]
    got = chunk_klds("\n".join(lines), 3)
    assert got == pytest.approx([0.01, 0.03, 0.02])
    assert chunk_klds("\n".join(lines[:2]), 3) == pytest.approx([0.01, 0.03])  # the last line lost at exit
    with pytest.raises(Exception, match="for 1 of 3 chunks"):
        chunk_klds(lines[0], 3)
    mean, se, n = paired([0.01, 0.03, 0.02], [0.02, 0.05, 0.03])
    assert n == 3 and mean == pytest.approx(-0.40 / 30) and se == pytest.approx(0.0033333, rel=1e-3)


def test_check_and_probe_texts_are_disjoint_halves():
    text = "".join(f"paragraph {i} " * 5 + "\n\n" for i in range(10))
    check, probes = halves(text)
    assert "paragraph 0 " in check and "paragraph 1 " in probes
    assert not set(check.split("\n\n")) & set(probes.split("\n\n")) - {"", "\n"}


def test_mix_file_is_llama_quantize_tensor_type_file():
    text = mix_file_text({"blk.1.ffn_up.weight": "q4_k", "blk.0.attn_q.weight": "q6_k"})
    assert text == "^blk\\.0\\.attn_q\\.weight$=q6_k\n^blk\\.1\\.ffn_up\\.weight$=q4_k\n"


def test_mix_summary_groups_layers():
    rows = mix_summary({"blk.0.ffn_up.weight": "q4_k", "blk.1.ffn_up.weight": "q4_k", "blk.3.ffn_up.weight": "q4_k",
                        "blk.2.ffn_up.weight": "q6_k", "token_embd.weight": "q8_0"})
    assert rows == [{"tensor": "ffn_up", "type": "q4_k", "layers": "0-1,3", "count": 3},
                    {"tensor": "ffn_up", "type": "q6_k", "layers": "2", "count": 1},
                    {"tensor": "token_embd", "type": "q8_0", "layers": "-", "count": 1}]


# --- end to end on the tiny model --------------------------------------------------------------------

TINY = """\
name: tiny-budget
model:
  path: models/tiny
  name: tiny-llama
calibration:
  files: [calibration/en-prose.txt, calibration/code-python.txt]
evaluation:
  file: calibration/eval/en-prose-heldout.txt
  ctx: 128
  max_tokens: 1024
  bench: false
gguf:
  base_type: f16
  imatrix: {enabled: true, ctx: 128, chunks: 16}
  types: [Q4_K_M]
  targets:
    - {bpw: 4.5}
"""


def test_target_builds_a_scored_gguf_within_budget_and_is_reused(tmp_path, repo_root, tiny_llama, monkeypatch,
                                                                   capsys):
    import shutil

    from quantkit.budget import MIX_FILE

    root = tmp_path / "proj"
    (root / "recipes").mkdir(parents=True)
    recipe = root / "recipes" / "tiny.yaml"
    recipe.write_text(TINY)
    shutil.copytree(repo_root / "calibration", root / "calibration")
    shutil.copytree(tiny_llama, root / "models" / "tiny")
    monkeypatch.setenv("QUANTKIT_STORE", str(tmp_path / "store"))
    assert main(["run", str(recipe)]) == 0
    capsys.readouterr()
    manifest = json.loads((root / "runs" / "tiny-budget" / "manifest.json").read_text())
    assert Manifest.from_dict(manifest).to_dict() == manifest  # the typed schema reads back what the run wrote
    v = {x["label"]: x for x in manifest["variants"]}["target-4.50bpw"]
    # published as its GGUF alone: the mix's tensor-types file stays in the store
    published = root / "artifacts" / "tiny-budget" / "latest" / v["file"]
    assert hashlib.sha256(published.read_bytes()).hexdigest() == v["files"]["model.gguf"]["sha256"]
    assert not list((root / "artifacts" / "tiny-budget" / "latest").glob("*tensor-types*"))
    params = v["info"]["gguf"]["parameters"]
    size = v["files"]["model.gguf"]["size"]
    assert size * 8 / params <= 4.5
    assert v["scores"]["kld_mean"] is not None
    assert MIX_FILE in v["files"]
    mix = (tmp_path / "store" / "quantize" / v["key"] / MIX_FILE).read_text()
    assert v["info"]["mix"]["tensors"] and all(f"={t}" in mix for t in v["info"]["mix"]["tensors"].values())
    assert len(set(v["info"]["mix"]["tensors"].values())) > 1, "a mix of one type is a stock type"
    # The closed loop measured the mix against the largest stock type within 4.5 bpw, paired per chunk.
    check = v["info"]["mix"]["check"]
    assert check and check[-1]["chunks"] >= 8 and check[-1]["stock"] in ("Q3_K_L", "Q3_K_M", "Q4_K_S", "IQ4_XS")
    assert check[-1]["stock_file_bytes"] * 8 / params <= 4.5
    assert check[-1]["win"] == (check[-1]["diff"] < -3 * check[-1]["se"])
    assert (v["info"]["mix"]["fallback"] is None) == check[-1]["win"]
    # A second run builds nothing: sensitivity tables, the KLD check, the mix and the GGUF are reused.
    assert main(["run", "--no-publish", str(recipe)]) == 0
    again = json.loads((root / "runs" / "tiny-budget" / "manifest.json").read_text())
    assert all(s["reused"] for s in again["steps"]), [s["step"] for s in again["steps"] if not s["reused"]]
    assert {x["label"]: x for x in again["variants"]}["target-4.50bpw"]["files"] == v["files"]
    # The same tables and tools give the same mix and the same bytes: search and quantize again from scratch.
    shutil.rmtree(tmp_path / "store" / "mix")
    shutil.rmtree(tmp_path / "store" / "quantize" / v["key"])
    assert main(["run", "--no-publish", str(recipe)]) == 0
    third = json.loads((root / "runs" / "tiny-budget" / "manifest.json").read_text())
    rebuilt = {x["label"]: x for x in third["variants"]}["target-4.50bpw"]
    assert not rebuilt["reused"] and rebuilt["files"] == v["files"]


def test_a_mix_that_does_not_win_is_the_stock_type(tmp_path, repo_root, tiny_llama, monkeypatch, caplog):
    """No mix can win by infinitely many standard errors: the target is then the stock type, byte for byte
    what llama-quantize --imatrix makes, and the manifest and report say so."""
    import shutil
    import subprocess

    import quantkit.budget as budget
    from quantkit.digest import sha256_file
    from quantkit.toolchain import find_toolchain

    root = tmp_path / "proj"
    (root / "recipes").mkdir(parents=True)
    recipe = root / "recipes" / "tiny.yaml"
    recipe.write_text(TINY.replace("  types: [Q4_K_M]\n", "  types: []\n"))
    shutil.copytree(repo_root / "calibration", root / "calibration")
    shutil.copytree(tiny_llama, root / "models" / "tiny")
    monkeypatch.setenv("QUANTKIT_STORE", str(tmp_path / "store"))
    monkeypatch.setattr(budget, "WIN_SE", float("inf"))
    with caplog.at_level(logging.INFO, logger="quantkit.budget"):
        assert main(["run", "--no-publish", str(recipe)]) == 0
    assert "fell back to stock" in caplog.text
    manifest = json.loads((root / "runs" / "tiny-budget" / "manifest.json").read_text())
    v = {x["label"]: x for x in manifest["variants"]}["target-4.50bpw"]
    fallback, check = v["info"]["mix"]["fallback"], v["info"]["mix"]["check"]
    assert fallback["stock"] == check[0]["stock"] and not any(c["win"] for c in check)
    steps = {s["step"]: s for s in manifest["steps"]}
    store = tmp_path / "store"
    base = store / "convert" / steps["convert"]["key"] / "model.gguf"
    imatrix = store / "imatrix" / steps["imatrix"]["key"] / "imatrix.gguf"
    out = tmp_path / "stock.gguf"
    # the GGUF records the --imatrix argument (quantize.imatrix.file): the same relative name as quantkit's
    (tmp_path / "imatrix.gguf").symlink_to(imatrix)
    subprocess.run([find_toolchain().binary("llama-quantize"), "--imatrix", "imatrix.gguf", base, out,
                    fallback["stock"], "2"], check=True, capture_output=True, cwd=tmp_path)
    assert v["files"]["model.gguf"]["sha256"] == sha256_file(out)
    from quantkit.publish.markdown import mix_md

    lines = mix_md({"variants": [{"label": "target-4.50bpw", "size_bytes": v["files"]["model.gguf"]["size"],
                                  "bpw": 4.4, "mix": {**v["info"]["mix"], "summary": []}}]})
    assert any(f"the stock type {fallback['stock']}" in line for line in lines), lines


def test_an_unrouted_expert_is_priced_as_its_layer_not_as_free():
    """Layer 1's routed experts matter more than layer 0's, but its expert 3 saw no calibration token, so its
    measured share of the error is 0 and layer 1 looks the cheaper one to crush. Priced as its layer's routed
    experts (the pooled importance), layer 1 gets the upgrade."""
    from quantkit.budget import price_uncovered_experts

    def table(ty: str, size: int, s: float) -> dict:
        def row(own, pooled):
            return {"quantized": True, "type": ty, "bytes": size, "error": sum(own), "expert_errors": own,
                    "expert_errors_pooled": pooled}
        return {"tensors": {"blk.0.ffn_down_exps.weight": row([s] * 4, [s] * 4),
                            "blk.1.ffn_down_exps.weight": row([1.2 * s] * 3 + [0.0], [1.2 * s] * 4),
                            "blk.1.attn_v.weight": {"quantized": True, "type": ty, "bytes": 1, "error": s}}}

    tables = {"q2_k": table("q2_k", 100, 1.0), "q4_k": table("q4_k", 150, 0.1)}
    room = 100 + 150 + 2  # one of the two expert tensors can be q4_k
    layer_types = lambda chosen: [chosen[f"blk.{i}.ffn_down_exps.weight"].type for i in (0, 1)]  # noqa: E731
    assert layer_types(allocate(options(tables), room)) == ["q4_k", "q2_k"]  # what zero importance did
    counts = {0: [300, 200, 250, 250], 1: [400, 300, 300, 0]}
    priced, note = price_uncovered_experts(tables, counts=counts, min_tokens=32)
    assert layer_types(allocate(options(priced), room)) == ["q2_k", "q4_k"]
    assert priced["q2_k"]["tensors"]["blk.1.ffn_down_exps.weight"]["error"] == pytest.approx(4.8)
    assert priced["q2_k"]["tensors"]["blk.1.ffn_down_exps.weight"]["error_measured"] == pytest.approx(3.6)
    assert priced["q2_k"]["tensors"]["blk.1.attn_v.weight"] == tables["q2_k"]["tensors"]["blk.1.attn_v.weight"]
    assert note["experts"] == [[1, 3, 0]] and note["tensors"] == ["blk.1.ffn_down_exps.weight"]
    assert "layer 1 expert 3: 0" in note["note"] and "unmeasured, not unimportant" in note["note"]
    assert "their share of 1 expert tensor(s)" in note["note"]
    # an expert that measured more than the pooled price keeps its own; every expert covered: tables untouched
    own_higher = {"q2_k": table("q2_k", 100, 1.0)}
    own_higher["q2_k"]["tensors"]["blk.0.ffn_down_exps.weight"]["expert_errors"][2] = 5.0
    own_higher["q2_k"]["tensors"]["blk.0.ffn_down_exps.weight"]["error"] = 8.0
    got, _ = price_uncovered_experts(own_higher, counts={0: [300, 300, 5, 300]}, min_tokens=32)
    assert got["q2_k"]["tensors"]["blk.0.ffn_down_exps.weight"]["error"] == 8.0
    assert price_uncovered_experts(tables, counts={0: [40] * 4, 1: [40] * 4}, min_tokens=32) == (tables, None)
