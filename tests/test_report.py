"""Report rendering, the regression gate and publishing, on a synthetic but realistic scored manifest."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from pathlib import Path

import pydantic
import pytest
from ggufbytes import write_header_gguf
from huggingface_hub import HfApi, ModelCard

from quantkit.errors import PublishError, RegressionError
from quantkit.publish import release as pub
from quantkit.hardware import GIB, ModelShape
from quantkit.publish.modelfile import ollama_template, render_modelfile
from quantkit.publish.markdown import render_markdown
from quantkit.publish.report import ReportSchemaError, build_report, load_report, write_report
from quantkit.recipe import Publish, PublishThresholds

PARAMS = 134_515_008
STEM = "SmolLM2-135M-Instruct"
CONFIG = {"architectures": ["LlamaForCausalLM"], "head_dim": 64, "hidden_size": 576, "num_attention_heads": 9,
          "num_hidden_layers": 30, "num_key_value_heads": 3, "max_position_embeddings": 8192, "vocab_size": 49152}
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
          "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{- bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}")
RECIPE_YAML = "name: smollm2-135m-demo\nmodel:\n  repo: HuggingFaceTB/SmolLM2-135M-Instruct\n"
CALIB_README = (Path(__file__).resolve().parents[1] / "calibration" / "README.md").read_text()

# label, bits per weight, ppl, kld mean, kld p99, same top %, pp t/s, tg t/s
GGUF = [("F16", 16.0, 20.1234, None, None, None, 410.2, 61.3),
        ("Q8_0", 8.5, 20.1410, 0.004, 0.041, 97.81, 520.6, 95.2),
        ("Q6_K", 6.56, 20.2150, 0.012, 0.118, 95.62, 388.1, 101.7),
        ("Q5_K_M", 5.70, 20.3820, 0.025, 0.245, 93.40, 402.9, 110.4),
        ("Q4_K_M", 4.90, 20.9055, 0.060, 0.610, 89.95, 430.0, 121.8),
        ("IQ4_XS", 4.30, 21.0711, 0.070, 0.700, 89.10, 350.4, 118.0),
        ("Q3_K_M", 3.90, 22.4180, 0.150, 1.620, 83.70, 360.3, 125.5),
        ("Q2_K", 3.00, 27.9501, 0.300, 3.310, 74.25, 371.9, 131.0)]


def _size(bpw: float) -> int:
    return int(PARAMS * bpw / 8)


def _variant(fmt, label, file, size, scores, weights="model.gguf"):
    files = {weights: {"sha256": "ab" * 32, "size": size}}
    if fmt != "gguf":
        files["config.json"] = {"sha256": "cd" * 32, "size": 1234}
    return {"format": fmt, "label": label, "file": file, "files": files,
            "info": {"gguf": {"parameters": PARAMS, "tensor_types": {"q4_K": 150}}} if fmt == "gguf" else {},
            "scores": scores}


def make_manifest(**kld_override) -> dict:
    variants = []
    for label, bpw, ppl, kld, p99, top, pp, tg in GGUF:
        scores = {"ppl": ppl, "ppl_err": 0.21, "speed": {"pp_tokens_per_s": pp, "tg_tokens_per_s": tg, "threads": 2}}
        if kld is not None:
            scores |= {"kld_mean": kld_override.get(label, kld), "kld_mean_err": kld / 50, "kld_p99": p99,
                       "same_top_pct": top}
        if label in ("F16", "Q4_K_M"):
            scores["tasks"] = {"arc_easy": 0.6010 if label == "F16" else 0.5893}
        variants.append(_variant("gguf", label, f"{STEM}-{label}.gguf", _size(bpw), scores))
    variants.append(_variant("hf", "BF16", "hf-base", _size(16.0), {"ppl": 20.1100, "tasks": {"arc_easy": 0.6030}},
                             "model.safetensors"))
    variants.append(_variant("gptq", "GPTQ-4bit-g128", f"{STEM}-GPTQ-4bit-g128", _size(4.6),
                             {"ppl": 20.8800, "kld_mean": 0.080, "kld_p99": 0.81, "same_top_pct": 88.9,
                              "tasks": {"arc_easy": 0.5851}}, "model.safetensors"))
    variants.append(_variant("awq", "AWQ-4bit-g128", f"{STEM}-AWQ-4bit-g128", _size(4.65),
                             {"ppl": 21.2000, "kld_mean": 0.090, "kld_p99": 0.95, "same_top_pct": 87.5,
                              "tasks": {"arc_easy": kld_override.get("awq_arc", 0.5702)}}, "model.safetensors"))
    return {"schema": 1, "quantkit": "0.1.0",
            "recipe": {"name": "smollm2-135m-demo", "file": "recipes/smollm2-135m-demo.yaml", "sha256": "12" * 32,
                       "resolved": {"name": "smollm2-135m-demo",
                                    "model": {"repo": "HuggingFaceTB/SmolLM2-135M-Instruct", "name": STEM},
                                    "evaluation": {"file": "calibration/eval/en-prose-heldout.txt", "ctx": 512}}},
            "model": {"repo": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "a" * 40, "commit": "a" * 40,
                      "path": "models/smollm2", "digest": "ee" * 32, "files": {}},
            "calibration": {"sha256": "77" * 32,
                            "sources": ["calibration/en-prose.txt", "calibration/code-python.txt"]},
            "toolchain": {"llama_cpp": "0c1e570", "version": "llama.cpp 0c1e570 (llama-cpp-python 0.3.36)"},
            "variants": variants}


def make_run_dir(tmp_path: Path, manifest: dict, name: str = "run") -> Path:
    run = tmp_path / name
    run.mkdir()
    for v in manifest["variants"]:
        if v["format"] == "gguf":
            write_header_gguf(run / v["file"], name=v["label"], chat_template=CHATML)
        elif v["format"] in ("gptq", "awq"):
            (run / v["file"]).mkdir()
            (run / v["file"] / "model.safetensors").write_bytes(b"weights")
            (run / v["file"] / "config.json").write_text("{}")
    (run / "manifest.json").write_text(json.dumps(manifest))
    (run / "recipe.yaml").write_text(RECIPE_YAML)
    return run


def reported_run_dir(tmp_path: Path) -> Path:
    """A run folder of the synthetic manifest with its report rendered in ``report/``."""
    manifest = make_manifest()
    run = make_run_dir(tmp_path, manifest)
    write_report(build_report(manifest, config=CONFIG, chat_template=CHATML), run / "report",
                 recipe_yaml=RECIPE_YAML, chat_template=CHATML)
    return run


def table_rows(md: str) -> dict[str, dict[str, str]]:
    section = md.split("## Variants", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    return {f"{r['format']}:{r['variant']}": r for r in rows}


def test_markdown_table_shows_the_manifest_numbers():
    manifest = make_manifest()
    report = build_report(manifest, config=CONFIG, chat_template=CHATML)
    rows = table_rows(render_markdown(report))
    assert len(rows) == len(manifest["variants"])
    base_ppl = manifest["variants"][0]["scores"]["ppl"]
    for v in manifest["variants"]:
        row, s = rows[f"{v['format']}:{v['label']}"], v["scores"]
        weights = sum(r["size"] for n, r in v["files"].items() if n.endswith((".gguf", ".safetensors")))
        assert float(row["size GiB"]) == pytest.approx(weights / GIB, abs=5e-4)
        assert float(row["bpw"]) == pytest.approx(weights * 8 / PARAMS, abs=5e-3)
        assert row["PPL"] == f"{s['ppl']:.4f}"
        # within the combined standard error (0.21 each, so 0.297) a difference is shown as a tie
        tie = "ppl_err" in s and v is not manifest["variants"][0] and abs(s["ppl"] - base_ppl) <= math.hypot(0.21, 0.21)
        assert row["ΔPPL"] == f"{s['ppl'] - base_ppl:+.4f}" + (" (tie)" if tie else "")
        assert row["mean KLD"] == (f"{s['kld_mean']:.5f}" if "kld_mean" in s else "–")
        assert row["KLD p99"] == (f"{s['kld_p99']:.5f}" if "kld_p99" in s else "–")
        assert row["same top %"] == (f"{s['same_top_pct']:.2f}" if "same_top_pct" in s else "–")
        assert row["arc_easy"] == (f"{s['tasks']['arc_easy']:.4f}" if "tasks" in s else "–")
        assert row["tg t/s"] == (f"{s['speed']['tg_tokens_per_s']:.1f}" if "speed" in s else "–")
    assert rows["gguf:F16"][""] == "base"
    # smallest under the KLD threshold, and the knee of the frontier, are marked and explained
    assert rows["gguf:Q5_K_M"][""] == "★"
    why = {r["id"]: r["why"] for r in report["recommended"]}
    assert "smallest variant with mean KLD under 0.05" in why["gguf:Q5_K_M"]
    assert report["pareto"] == ["gguf:Q2_K", "gguf:Q3_K_M", "gguf:IQ4_XS", "gguf:Q4_K_M", "gguf:Q5_K_M",
                                "gguf:Q6_K", "gguf:Q8_0"]  # gptq/awq are bigger and worse than IQ4_XS here
    assert any("knee" in w for w in why.values())


def test_scores_may_be_missing_or_partial():
    manifest = make_manifest()
    del manifest["variants"][3]["scores"]
    manifest["variants"][4]["scores"] = {"ppl": 21.0}
    md = render_markdown(build_report(manifest))
    row = table_rows(md)["gguf:Q5_K_M"]
    assert row["PPL"] == "–" and row["mean KLD"] == "–"
    assert "No config.json was given" in md


def test_report_json_schema(tmp_path):
    report = build_report(make_manifest(), config=CONFIG, chat_template=CHATML)
    write_report(report, tmp_path, recipe_yaml=RECIPE_YAML, chat_template=CHATML, calibration_readme=CALIB_README)
    loaded = load_report(tmp_path / "report.json")
    assert loaded["schema"] == 1 and loaded["variants"][4]["kld_mean"] == 0.06
    (tmp_path / "bad.json").write_text(json.dumps(loaded | {"schema": 99}))
    with pytest.raises(ReportSchemaError, match="schema 99"):
        load_report(tmp_path / "bad.json")
    with pytest.raises(ReportSchemaError, match="manifest schema 3"):
        build_report(make_manifest() | {"schema": 3})
    assert build_report(make_manifest() | {"schema": 2})["variants"][4]["kld_mean"] == 0.06  # graph-node steps
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plot_draws_the_searched_mix_and_the_external_file_with_their_own_markers(tmp_path):
    from quantkit.publish.plot import render_plot, scatter_groups

    manifest = make_manifest()
    mix = _variant("gguf", "target-4.50bpw", f"{STEM}-target-4.50bpw.gguf", _size(4.5),
                   {"ppl": 20.7, "kld_mean": 0.05, "kld_p99": 0.5, "same_top_pct": 90.5})
    mix["info"]["mix"] = {"target": "4.50bpw", "type_counts": {"q4_K": 1, "q5_K": 1}, "check": [], "fallback": None,
                          "tensors": {"blk.0.ffn_down.weight": "q4_K", "blk.0.attn_q.weight": "q5_K"}}
    external = _variant("external", "bare-Q4_K_M", None, _size(4.9),  # never placed: no file in the run folder
                        {"ppl": 21.0, "kld_mean": 0.065, "kld_p99": 0.7, "same_top_pct": 89.0})
    manifest["variants"] += [mix, external]
    report = build_report(manifest, config=CONFIG, chat_template=CHATML)
    quantized = [r for r in report["variants"] if not r["is_base"]]
    groups = {style["label"]: (style["marker"], [r["id"] for r in rows])
              for rows, style in scatter_groups(quantized, "kld_mean", log_y=True)}
    assert groups["gguf, searched mix (gguf.targets)"] == ("*", ["gguf:target-4.50bpw"])
    assert groups["external (another publisher's file)"] == ("P", ["external:bare-Q4_K_M"])
    assert "gguf:target-4.50bpw" not in groups["gguf"][1]  # drawn once, as a mix, not as a stock type
    assert len({marker for marker, _ in groups.values()}) == len(groups), groups
    render_plot(report, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_card_metadata(tmp_path):
    report = build_report(make_manifest(), config=CONFIG, chat_template=CHATML)
    write_report(report, tmp_path, recipe_yaml=RECIPE_YAML, chat_template=CHATML, calibration_readme=CALIB_README)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.quantized_by == "quantkit"
    assert {"gguf", "gptq", "awq"} <= set(card.data.tags)
    assert card.data.eval_results and any(e.metric_type == "kl_divergence_mean" for e in card.data.eval_results)
    assert "llama.cpp 0c1e570" in card.text
    assert "`calibration/en-prose.txt`" in card.text and "PSF License 2.0" in card.text
    assert RECIPE_YAML.strip() in card.text


def test_the_recipe_in_the_card_cannot_close_its_fence():
    """A recipe is a pull request's text: a ``` line in a comment or a description must not end the card's code
    block (what follows would render as the card's own Markdown). CommonMark reads the card back: one yaml block
    holding the recipe verbatim, and no heading the recipe wrote."""
    markdown_it = pytest.importorskip("markdown_it")
    from quantkit.publish.card import fenced, render_card

    recipe = (RECIPE_YAML + "# an example:\n```\n# Injected heading\n````\n"
              "description: 'see ````` and ``` here'\n")
    assert fenced(recipe, "yaml")[0] == "``````yaml"  # one longer than the longest run (five)
    assert fenced("plain", "yaml") == ["```yaml", "plain", "```"]
    report = build_report(make_manifest(), config=CONFIG, chat_template=CHATML)
    card = render_card(report, table=[], recipe_yaml=recipe)
    tokens = markdown_it.MarkdownIt("commonmark").parse(card.text)
    yaml_blocks = [t for t in tokens if t.type == "fence" and t.info == "yaml"]
    assert [t.content for t in yaml_blocks] == [recipe]
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert "Recipe" in headings and "Injected heading" not in headings


def test_one_modelfile_per_gguf(tmp_path):
    manifest = make_manifest()
    report = build_report(manifest, config=CONFIG, chat_template=CHATML)
    write_report(report, tmp_path, recipe_yaml=RECIPE_YAML, chat_template=CHATML)
    ggufs = [v["file"] for v in manifest["variants"] if v["format"] == "gguf"]
    assert sorted(p.name for p in tmp_path.glob("*.Modelfile")) == sorted(g[:-5] + ".Modelfile" for g in ggufs)
    text = (tmp_path / f"{STEM}-Q4_K_M.Modelfile").read_text()
    assert f'FROM "./{STEM}-Q4_K_M.gguf"\n' in text
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER num_ctx 4096" in text
    md = (tmp_path / "report.md").read_text()
    assert f"`llama-server -m {STEM}-Q4_K_M.gguf -c 4096 --port 8080 -ngl 999`" in md
    assert f"`vllm serve ./{STEM}-GPTQ-4bit-g128 --max-model-len 4096`" in md


def test_modelfile_template_shapes():
    assert ollama_template(LLAMA3).stop == ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    text = render_modelfile("m.gguf", "{{ messages[0]['content'] }}", num_ctx=2048, eos_token="</s>")
    assert "# No TEMPLATE: the model's chat template is none of the shapes quantkit converts" in text
    assert "TEMPLATE \"\"\"" not in text  # Ollama then uses the GGUF's own tokenizer.chat_template


def test_hardware_fit_from_config():
    llama8b = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
               "max_position_embeddings": 131072}
    shape = ModelShape.from_config(llama8b)
    assert shape.head_dim == 128 and shape.kv_cache_bytes(8192) == GIB  # 2*32*8*128*2 B/token * 8k
    report = build_report(make_manifest(), config=CONFIG)
    hw = report["hardware"]
    assert hw["kv_cache_bytes"]["4096"] == 2 * 30 * 3 * 64 * 2 * 4096
    assert hw["needed_bytes"]["gguf:Q8_0"]["32768"] is None  # beyond SmolLM2's 8192 context
    assert hw["fits"]["8"]["4096"][0] == "gguf:F16"  # everything fits; the base is best quality


def test_local_publish_is_complete_or_absent_and_never_overwrites(tmp_path, monkeypatch):
    run = reported_run_dir(tmp_path)
    store = tmp_path / "artifacts"
    first = pub.publish_local(run_dir=run, report_dir=run / "report", store=store, recipe="demo", run_id="r1")
    assert os.readlink(store / "demo" / "latest") == "r1"
    assert (first / "README.md").is_file() and (first / "manifest.json").is_file() and not (first / "report").exists()
    assert (first / f"{STEM}-AWQ-4bit-g128" / "model.safetensors").is_file()

    calls, place = [], pub._place

    def failing(src, dest):
        calls.append(src)
        if len(calls) == 3:
            raise OSError("disk full")
        place(src, dest)

    monkeypatch.setattr(pub, "_place", failing)
    with pytest.raises(OSError, match="disk full"):
        pub.publish_local(run_dir=run, report_dir=run / "report", store=store, recipe="demo", run_id="r2")
    assert sorted(p.name for p in (store / "demo").iterdir()) == [".publish.lock", "latest", "r1"]
    assert os.readlink(store / "demo" / "latest") == "r1"
    monkeypatch.undo()

    before = sorted(p.name for p in first.rglob("*"))
    with pytest.raises(PublishError, match="never overwritten"):
        pub.publish_local(run_dir=run, report_dir=run / "report", store=store, recipe="demo", run_id="r1")
    assert sorted(p.name for p in first.rglob("*")) == before


def test_degraded_rerun_is_refused_with_the_difference(tmp_path):
    settings = Publish(dir="artifacts")
    good = make_manifest()
    done = pub.release(run_dir=make_run_dir(tmp_path, good, "run1"), manifest=good, root=tmp_path, settings=settings,
                       recipe_yaml=RECIPE_YAML, config=CONFIG, chat_template=CHATML, run_id="r1")
    assert done.path == tmp_path / "artifacts" / "smollm2-135m-demo" / "r1"

    worse = make_manifest(Q4_K_M=0.0900)
    run2 = make_run_dir(tmp_path, worse, "run2")
    with pytest.raises(RegressionError) as e:
        pub.release(run_dir=run2, manifest=worse, root=tmp_path, settings=settings, recipe_yaml=RECIPE_YAML,
                    config=CONFIG, chat_template=CHATML, run_id="r2")
    assert [(f["id"], f["check"]) for f in e.value.findings] == [("gguf:Q4_K_M", "kld_mean")]
    assert "gguf:Q4_K_M: mean KLD 0.06000 → 0.09000 (+50.0%" in str(e.value)
    md = (run2 / "report" / "report.md").read_text()
    assert "**FAILED, not published**" in md and "| gguf:Q4_K_M | kld_mean | 0.06000 | 0.09000 |" in md
    assert os.readlink(tmp_path / "artifacts" / "smollm2-135m-demo" / "latest") == "r1"
    assert not (tmp_path / "artifacts" / "smollm2-135m-demo" / "r2").exists()
    assert pickle.loads(pickle.dumps(e.value)).findings == e.value.findings

    # a small rise within +10% (and the noise) passes
    ok = make_manifest(Q4_K_M=0.0640)
    assert pub.release(run_dir=make_run_dir(tmp_path, ok, "run3"), manifest=ok, root=tmp_path, settings=settings,
                       recipe_yaml=RECIPE_YAML, config=CONFIG, chat_template=CHATML, run_id="r3").run_id == "r3"


def test_recovery_floor_without_a_previous_run():
    report = build_report(make_manifest(awq_arc=0.5300))  # 0.53 / 0.603 = 0.879 < 0.90
    gate = pub.regression_gate(report, None, thresholds=PublishThresholds())
    assert gate["failed"] and [f["check"] for f in gate["findings"]] == ["recovery:arc_easy"]
    assert gate["findings"][0]["id"] == "awq:AWQ-4bit-g128" and "0.879" in gate["findings"][0]["message"]
    assert not pub.regression_gate(build_report(make_manifest()), None, thresholds=PublishThresholds())["failed"]


def test_a_task_that_separates_nothing_gates_nothing():
    report = build_report(make_manifest(awq_arc=0.5300))
    report["task_checks"]["arc_easy"] |= {"discriminates": False, "why": "the base scores 1.0"}
    gate = pub.regression_gate(report, None, thresholds=PublishThresholds())
    assert not gate["failed"]
    assert {c["skipped"] for c in gate["changes"] if c["check"] == "task:arc_easy"} == {"the base scores 1.0"}


def test_hub_commit_operations_without_network(tmp_path, monkeypatch):
    run = reported_run_dir(tmp_path)
    staged = tmp_path / "staged"
    for rel, src in pub.collect_files(run, run / "report").items():
        pub._place(src, staged / rel)
    ops = pub.hub_operations(pub.plan_hub_files(staged))
    paths = [op.path_in_repo for op in ops]
    assert paths == sorted(paths) and "README.md" in paths and "report.json" in paths and "plot.png" in paths
    assert f"{STEM}-Q4_K_M.gguf" in paths and f"{STEM}-Q4_K_M.Modelfile" in paths
    assert f"{STEM}-GPTQ-4bit-g128/model.safetensors" in paths and "manifest.json" in paths

    calls: dict[str, list] = {"create_repo": [], "create_commit": [], "create_tag": []}

    class Commit:
        oid, commit_url = "c" * 40, "https://huggingface.co/me/smol-GGUF/commit/ccc"

    class Refs:
        tags = []

    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: calls["create_repo"].append((a, k)))
    monkeypatch.setattr(HfApi, "list_repo_refs", lambda self, *a, **k: Refs())
    monkeypatch.setattr(HfApi, "create_commit", lambda self, **k: calls["create_commit"].append(k) or Commit())
    monkeypatch.setattr(HfApi, "create_tag", lambda self, *a, **k: calls["create_tag"].append((a, k)))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(PublishError, match=r"\$HF_TOKEN"):
        pub.publish_hub(folder=staged, repo_id="me/smol-GGUF", private=True, run_id="r1", recipe="demo")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    url = pub.publish_hub(folder=staged, repo_id="me/smol-GGUF", private=True, run_id="r1", recipe="demo")
    assert url == Commit.commit_url
    assert calls["create_repo"] == [(("me/smol-GGUF",), {"private": True, "exist_ok": True, "repo_type": "model"})]
    (commit,) = calls["create_commit"]  # one commit per run
    assert commit["repo_id"] == "me/smol-GGUF" and commit["commit_message"] == "quantkit: demo run r1"
    assert [op.path_in_repo for op in commit["operations"]] == paths
    assert calls["create_tag"][0][1]["tag"] == "r1"

    Refs.tags = [type("Tag", (), {"name": "r1"})()]
    with pytest.raises(PublishError, match="already has a run tagged r1"):
        pub.publish_hub(folder=staged, repo_id="me/smol-GGUF", private=True, run_id="r1", recipe="demo")


def test_hub_refuses_oversized_gguf_without_gguf_split(tmp_path):
    (tmp_path / "big.gguf").write_bytes(b"x" * 300)
    (tmp_path / "README.md").write_text("card")
    files = pub.plan_hub_files(tmp_path, max_file_bytes=100)
    assert [f.split for f in files] == [False, True]
    with pytest.raises(PublishError, match=r"big.gguf is 2.79e-07 GiB, over publish.max_file_gib \(9.31e-08 GiB\), "
                                           "and llama-gguf-split is not built"):
        pub.split_large_ggufs(files, work=tmp_path / "w", gguf_split=None, max_file_bytes=100)
    with pytest.raises(PublishError, match="must be split"):
        pub.hub_operations(files)
    assert pub.split_names("m.gguf", 120 * 10**9) == ["m-00001-of-00003.gguf", "m-00002-of-00003.gguf",
                                                       "m-00003-of-00003.gguf"]
    (tmp_path / "notes.bin").write_bytes(b"x" * 300)
    with pytest.raises(PublishError, match="only GGUF files can be split"):
        pub.plan_hub_files(tmp_path, max_file_bytes=100)


def test_publish_section_is_strict():
    assert Publish().thresholds.min_recovery_gptq == 0.94 and Publish().thresholds.min_recovery_awq == 0.90
    with pytest.raises(pydantic.ValidationError, match="no 'repo'"):
        Publish(target="hub")
    with pytest.raises(pydantic.ValidationError, match="target is 'local'"):
        Publish(repo="me/x")
    with pytest.raises(pydantic.ValidationError, match="extra"):
        Publish.model_validate({"thresholds": {"max_kld_incrase": 0.1}})
    assert re.match(r"\d{8}T\d{6}Z-[0-9a-f]{8}$", pub.run_id_for(Path(__file__)))


def _items(right: int, n: int = 371, *, flip_down: int = 0, flip_up: int = 0) -> list[int]:
    """``right`` items correct, then ``flip_down`` of those wrong and ``flip_up`` of the wrong ones right: a
    variant that mostly agrees with the base item by item, as a quantized model does."""
    out = [1] * right + [0] * (n - right)
    for i in range(flip_down):
        out[i] = 0
    for i in range(flip_up):
        out[right + i] = 1
    return out


def _task(items: list[int], backend: str, **extra) -> dict:
    """quantkit.scoring.tasks' summary of one task on one variant (acc_token_norm, the metric all backends share)."""
    return {"acc_token_norm": sum(items) / len(items), "n": len(items), "chance": 0.25, "p_value": 1e-9,
            "metric": "acc_token_norm", "backend": backend, "correct": items, "items_sha256": "5e" * 32,
            "per_item": {"acc_token_norm": items}} | extra


def gated_manifest(gptq_items: list[int]) -> dict:
    """The demo's shape: the base scores 0.752 on 371 items of finish-the-sentence, every format on one metric."""
    m = make_manifest()
    base = _items(279)
    for v in m["variants"]:
        v["scores"].pop("tasks", None)
        if v["format"] == "hf":
            # lm-eval's acc of the same items is lower (summed log-likelihood): it must not share the column
            v["scores"]["tasks"] = {"fts": _task(base, "lm-eval-hf", acc=0.70, acc_norm=0.71)}
        elif v["format"] == "gptq":
            v["scores"]["tasks"] = {"fts": _task(gptq_items, "lm-eval-hf", acc=0.65, acc_norm=0.66)}
        elif v["label"] in ("F16", "Q2_K"):
            v["scores"]["tasks"] = {"fts": _task(_items(279, flip_down=3, flip_up=2) if v["label"] == "F16"
                                                 else _items(279, flip_down=30, flip_up=12), "llama-perplexity")}
    return m


def test_gate_fails_only_outside_the_error_and_shows_its_bounds():
    th = PublishThresholds()
    # a real regression: GPTQ loses 100 of the base's 279 items (recovery 0.67, many standard errors under 0.94)
    bad = pub.regression_gate(build_report(gated_manifest(_items(279, flip_down=100))), None, thresholds=th)
    assert bad["failed"] and [(f["id"], f["check"], f["verdict"]) for f in bad["findings"]] == [
        ("gptq:GPTQ-4bit-g128", "recovery:fts", "failed")]
    assert bad["findings"][0]["bound"][1] < 0.94

    # the issue's case: 0.7062 against 0.7520 (recovery 0.939), a fraction of a standard error under 0.94
    close = build_report(gated_manifest(_items(279, flip_down=35, flip_up=18)))
    gate = pub.regression_gate(close, None, thresholds=th)
    [check] = [c for c in gate["changes"] if c["id"].startswith("gptq:")]
    assert round(check["now"], 3) == 0.939 and check["verdict"] == "inconclusive"
    lo, hi = check["bound"]
    assert lo < 0.94 < hi and hi - lo < 0.2  # paired: the error of the per-item differences, not two binomials
    assert not gate["failed"] and gate["inconclusive"] == [check]
    strict = pub.regression_gate(close, None, thresholds=th.model_copy(update={"strict": True}))
    assert strict["failed"] and strict["findings"] == [check]

    md = render_markdown(close | {"regression": gate})
    assert "**passed, with inconclusive checks**" in md
    assert "(a shortfall at 99.87 % one-sided confidence)" in md  # what gate_sigmas 3 means, said in the report
    assert f"| gptq:GPTQ-4bit-g128 | recovery:fts | – | {check['now']:.5f} | 0.94 | {lo:.5f}–{hi:.5f} | inconclusive |" in md


def test_a_task_column_holds_one_metric_for_every_format():
    report = build_report(gated_manifest(_items(279, flip_down=35, flip_up=18)))
    assert report["task_metrics"] == {"fts": {"task": "fts", "metric": "acc_token_norm"}}
    rows = {r["id"]: r for r in report["variants"]}
    # lm-eval's acc (0.70) never lands in the column beside llama.cpp's acc_token_norm
    assert rows["hf:BF16"]["tasks"]["fts"] == pytest.approx(279 / 371)
    assert rows["gguf:F16"]["tasks"]["fts"] == pytest.approx(278 / 371)
    # F16 and the HF base: paired over the same items, the 5 items that differ are within the error
    bases = report["task_checks"]["fts"]["bases"]
    assert bases["paired"] and bases["agree"] and bases["difference"] == pytest.approx(-1 / 371)
    assert "gguf:F16 − hf:BF16 (the same weights in two backends): -0.0027 ± 0.0060 (paired): they agree" in \
        render_markdown(report)
    assert "| fts (acc_token_norm) |" in render_markdown(report).replace(" | pp t/s", " |")
    # a variant without the shared metric gets a column of its own instead of sharing one
    m = gated_manifest(_items(279))
    for v in m["variants"]:
        if v["format"] == "gptq":
            v["scores"]["tasks"] = {"fts": {"acc": 0.65, "n": 371, "metric": "acc", "backend": "lm-eval-hf"}}
    split = build_report(m)
    assert split["task_metrics"] == {"fts [acc]": {"task": "fts", "metric": "acc"},
                                     "fts [acc_token_norm]": {"task": "fts", "metric": "acc_token_norm"}}


def test_the_same_scores_again_pass_every_comparison_with_the_last_release():
    """A re-run that measured the same values (the same files on the same tokens) is not 'inconclusive'."""
    report = build_report(gated_manifest(_items(279, flip_down=35, flip_up=18)))
    gate = pub.regression_gate(report, report, thresholds=PublishThresholds(), previous_run="r1")
    versus = [c for c in gate["changes"] if c["check"] == "kld_mean" or c["check"].startswith("task:")]
    assert versus and {c["verdict"] for c in versus} == {"passed"}
    # a variant 5 % worse in mean KLD, within the +10 % allowed but not by 3 unpaired errors: inconclusive
    worse = build_report(gated_manifest(_items(279, flip_down=35, flip_up=18)))
    for r in worse["variants"]:
        if r["id"] == "gguf:Q4_K_M":
            r["kld_mean"] *= 1.05
    [c] = [c for c in pub.regression_gate(worse, report, thresholds=PublishThresholds())["changes"]
           if c["id"] == "gguf:Q4_K_M" and c["check"] == "kld_mean"]
    assert c["verdict"] == "inconclusive" and c["bound"][0] < c["limit"] < c["bound"][1]


def _served(manifest: dict, failed: dict[str, str]) -> dict:
    """Every GGUF/GPTQ/AWQ variant with a serve check (quantkit.serving); ``failed``: id -> reason."""
    from quantkit.serving import ServeCheck, ToolOutcome

    for v in manifest["variants"]:
        vid = f"{v['format']}:{v['label']}"
        if v["format"] not in ("gguf", "gptq", "awq"):
            continue
        check = ServeCheck("llama-server" if v["format"] == "gguf" else "transformers (cpu)", loads=True,
                           chat_stops=True, template_matches=True, tokens_per_s=42.0, reply="Blue.",
                           tool_call="n/a" if v["format"] != "gguf" else "yes")
        if vid == "gguf:Q8_0":
            check.tool_call, check.tool = "no", ToolOutcome("forced call refused", forced=True, why="HTTP 400 | x")
        if vid in failed:
            check.chat_stops = False
            check.fail(failed[vid])
        v["scores"]["serve"] = check.to_dict()
    return manifest


def test_publish_leaves_out_what_failed_its_serve_check_and_names_why(tmp_path):
    why = {"gguf:Q2_K": "chat did not stop within 64 tokens (finish_reason 'length')",
           "gptq:GPTQ-4bit-g128": "transformers cannot load it: ValueError: no kernel"}
    manifest = _served(make_manifest(), why)
    run = make_run_dir(tmp_path, manifest)
    done = pub.release(run_dir=run, manifest=manifest, root=tmp_path, settings=Publish(dir="artifacts"),
                       recipe_yaml=RECIPE_YAML, chat_template=CHATML)
    assert done.refused == why
    assert "not published gguf:Q2_K: chat did not stop" in done.status
    published = {p.name for p in done.path.iterdir()}
    assert f"{STEM}-Q2_K.gguf" not in published and f"{STEM}-Q2_K.Modelfile" not in published
    assert f"{STEM}-GPTQ-4bit-g128" not in published
    assert {f"{STEM}-Q4_K_M.gguf", f"{STEM}-Q4_K_M.Modelfile", f"{STEM}-AWQ-4bit-g128"} <= published
    md = (done.path / "report.md").read_text()
    serving = md.split("## Serving", 1)[1].split("\n## ", 1)[0]
    assert ("| gguf:Q4_K_M | llama-server | yes | yes | yes | yes | not checked | 42.0 | passed |"
            in serving.splitlines())
    # how the tool call was decided, with a "|" in the server's message kept out of the table's cells
    assert ("| gguf:Q8_0 | llama-server | yes | yes | yes | no (forced call refused: HTTP 400 / x) | not checked | "
            "42.0 | passed |" in serving.splitlines())
    assert ("| gguf:Q2_K | llama-server | yes | **no** | yes | yes | not checked | 42.0 | **not published**: "
            "chat did not stop within 64 tokens (finish_reason 'length') |" in serving.splitlines())
    assert "## Serving" in (done.path / "README.md").read_text()  # the card shows the same table
    how = md.split("## How to run", 1)[1]
    assert f"{STEM}-Q4_K_M.gguf" in how and f"{STEM}-Q2_K.gguf" not in how
    again = pub.release(run_dir=make_run_dir(tmp_path, manifest, "run2"), manifest=manifest, root=tmp_path,
                        settings=Publish(dir="artifacts"), recipe_yaml=RECIPE_YAML, chat_template=CHATML)
    assert again.unchanged_since == done.run_id and again.refused == why  # the missing files are no change


def test_nothing_to_publish_when_every_artifact_failed_its_serve_check(tmp_path):
    manifest = make_manifest()
    _served(manifest, {f"{v['format']}:{v['label']}": "chat returned no text" for v in manifest["variants"]})
    with pytest.raises(PublishError, match="nothing published: every artifact failed its serve check"):
        pub.release(run_dir=make_run_dir(tmp_path, manifest), manifest=manifest, root=tmp_path,
                    settings=Publish(dir="artifacts"), recipe_yaml=RECIPE_YAML, chat_template=CHATML)
    assert not (tmp_path / "artifacts" / "smollm2-135m-demo" / "latest").exists()


def test_a_symlinked_report_folder_is_refused_and_nothing_written_where_it_leads(tmp_path, tmp_path_factory):
    """A pull request commits runs/<name>/report as a link to a folder outside the project: rmtree would leave
    the link, and the report, card, Modelfiles and plot would land in its target."""
    from quantkit.paths import LinkedWriteError

    outside = tmp_path_factory.mktemp("outside")
    manifest = make_manifest()
    run = make_run_dir(tmp_path, manifest)
    (run / "report").symlink_to(outside, target_is_directory=True)
    with pytest.raises(LinkedWriteError, match=r"run/report is a symlink; quantkit never writes through one"):
        pub.release(run_dir=run, manifest=manifest, root=tmp_path, settings=Publish(dir="artifacts"),
                    recipe_yaml=RECIPE_YAML, chat_template=CHATML)
    assert list(outside.iterdir()) == [] and (run / "report").is_symlink()
    assert not (tmp_path / "artifacts").exists()
