"""A run whose outputs and scores equal the last published run's publishes nothing new."""

from __future__ import annotations

import json
import os

from test_report import CHATML, CONFIG, RECIPE_YAML, make_manifest, make_run_dir

from quantkit.publish import release as pub
from quantkit.recipe import Publish


def _release(tmp_path, manifest, name, run_id, settings=None):
    return pub.release(run_dir=make_run_dir(tmp_path, manifest, name), manifest=manifest, root=tmp_path,
                       settings=settings or Publish(), recipe_yaml=RECIPE_YAML, config=CONFIG, chat_template=CHATML,
                       run_id=run_id)


def test_an_unchanged_rerun_publishes_no_new_release(tmp_path):
    first = _release(tmp_path, make_manifest(), "run1", "r1")
    assert first.unchanged_since is None and first.status == "published r1"
    again = make_manifest()
    for v in again["variants"]:  # a re-benchmark: speed is timing noise, not an output
        if "speed" in v["scores"]:
            v["scores"]["speed"]["tg_tokens_per_s"] += 3.0
    second = _release(tmp_path, again, "run2", "r2")
    assert second.unchanged_since == "r1" and second.status == "unchanged since r1"
    assert second.path == first.path
    folder = tmp_path / "artifacts" / "smollm2-135m-demo"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["latest", "r1", "unchanged.jsonl"]
    assert os.readlink(folder / "latest") == "r1"
    (line,) = (folder / "unchanged.jsonl").read_text().splitlines()
    assert json.loads(line)["unchanged_since"] == "r1"
    md = (tmp_path / "run2" / "report" / "report.md").read_text()
    assert ("- unchanged since r1: the same files and scores as that published run, so no new release was made"
            in md)
    assert "unchanged" not in (first.path / "report.md").read_text()


def test_a_changed_score_or_file_is_a_new_release(tmp_path):
    _release(tmp_path, make_manifest(), "run1", "r1")
    better = make_manifest(Q4_K_M=0.055)
    assert _release(tmp_path, better, "run2", "r2").status == "published r2"
    rebuilt = make_manifest(Q4_K_M=0.055)
    rebuilt["variants"][3]["files"]["model.gguf"]["sha256"] = "ff" * 32  # same scores, other bytes
    assert _release(tmp_path, rebuilt, "run3", "r3").status == "published r3"
    assert pub.release_fingerprint(better) != pub.release_fingerprint(rebuilt)


def test_an_unchanged_run_is_not_pushed_to_the_hub(tmp_path, monkeypatch):
    pushed = []
    monkeypatch.setattr(pub, "publish_hub_repos",
                        lambda **kw: pushed.append(kw["run_id"]) or {"me/x-GGUF": "https://hub/commit/x"})
    hub = Publish(target="hub", repo="me/SmolLM2-135M-Instruct-GGUF")
    assert _release(tmp_path, make_manifest(), "run1", "r1", hub).hub_commit == "https://hub/commit/x"
    second = _release(tmp_path, make_manifest(), "run2", "r2", hub)
    assert second.unchanged_since == "r1" and second.hub_commit is None
    assert pushed == ["r1"]
