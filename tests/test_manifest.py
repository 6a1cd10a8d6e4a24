"""quantkit.manifest: typed records all the way down, read and written back exactly."""

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest

from quantkit.errors import StoreError
from quantkit.manifest import Manifest, ManifestVariant, Projector, Scores, Shard
from quantkit.store import FileRecord
from test_report import make_manifest

REAL = Path(__file__).parent / "data" / "manifest-tiny-budget-run.json"  # written by test_budget's tiny run


@pytest.mark.parametrize("data", [json.loads(REAL.read_text()), make_manifest()], ids=["run", "synthetic-schema-1"])
def test_a_manifest_reads_typed_and_writes_back_exactly(data):
    before = copy.deepcopy(data)
    m = Manifest.from_dict(data)
    assert m.to_dict() == data == before
    assert json.dumps(m.to_dict(), indent=2, sort_keys=True) == json.dumps(before, indent=2, sort_keys=True)
    v = m.variants[0]
    assert isinstance(v, ManifestVariant) and isinstance(v.scores, Scores)
    assert v.id == f"{v.format}:{v.label}"
    assert all(isinstance(r, FileRecord) for r in v.files.values())
    assert isinstance(v.scores.ppl, float) and v.shards == ()
    assert Manifest.coerce(m) is m and Manifest.coerce(data) == m


def test_what_publishing_adds_round_trips():
    data = make_manifest()
    data["variants"][0]["shards"] = [{"file": "a-00001-of-00002.gguf", "size": 10, "sha256": "ab" * 32},
                                     {"file": "a-00002-of-00002.gguf", "size": 5, "sha256": "cd" * 32}]
    data["projectors"] = [{"file": "mmproj-F16.gguf", "type": "F16", "store_file": "mmproj-F16.gguf", "step": "mmproj",
                           "key": "k" * 32, "reused": False, "sha256": "ef" * 32, "size": 3, "architecture": "clip",
                           "projector_type": "gemma3"}]
    m = Manifest.from_dict(data)
    assert m.to_dict() == data
    assert m.variants[0].shards[1] == Shard(file="a-00002-of-00002.gguf", size=5, sha256="cd" * 32)
    assert isinstance(m.projectors[0], Projector) and m.projectors[0].size == 3
    # replacing a frozen record writes what a dict edit would have
    cleared = replace(m, variants=(replace(m.variants[0], file=None, shards=()), *m.variants[1:])).to_dict()
    assert cleared["variants"][0]["file"] is None and "shards" not in cleared["variants"][0]


def test_an_unknown_key_is_refused_by_name():
    data = make_manifest()
    data["variants"][2]["scores"]["kld_mystery"] = 1.0
    with pytest.raises(StoreError, match=r"variants\[2\]\.scores: unknown key 'kld_mystery'"):
        Manifest.from_dict(data)
    data = make_manifest() | {"extra": 1}
    with pytest.raises(StoreError, match="manifest: unknown key 'extra'"):
        Manifest.from_dict(data)
    data = make_manifest()
    data["variants"][0]["files"]["model.gguf"]["md5"] = "x"
    with pytest.raises(StoreError, match=r"variants\[0\]\.files\['model.gguf'\]: unknown key 'md5'"):
        Manifest.from_dict(data)


def test_a_wrong_type_is_refused_by_name():
    data = make_manifest()
    data["variants"][1]["scores"]["ppl"] = "20.1"
    with pytest.raises(StoreError, match=r"variants\[1\]\.scores\.ppl: expected a number, got str"):
        Manifest.from_dict(data)
    data = make_manifest()
    data["variants"][0]["files"]["model.gguf"]["size"] = True
    with pytest.raises(StoreError, match=r"files\['model.gguf'\]\.size: expected an integer, got bool"):
        Manifest.from_dict(data)
    data = make_manifest()
    del data["variants"][0]["format"]
    with pytest.raises(StoreError, match=r"variants\[0\]: lacks 'format'"):
        Manifest.from_dict(data)


def _nested_scores() -> dict:
    """A variant's scores as graph.variant_scores assembles them, from the writers' own classes."""
    from quantkit.scoring.tasks import _summary
    from quantkit.scoring.windows import Score, Speed as BenchSpeed
    from quantkit.serving import ServeCheck, ToolOutcome

    score = Score(backend="llama-perplexity", ppl=16.2, ppl_err=0.3, kld_mean=0.03, kld_mean_err=0.001, kld_p99=0.2,
                  same_top_pct=91.5, n_tokens=2048, n_chunks=8, ctx=512, seconds=9.5, printed={"ppl": "16.2000"},
                  kld_p999=0.6, chunk_kld=[0.03] * 8).to_dict()
    serve = ServeCheck("llama-server", loads=True, chat_stops=True, template_matches=True, tool_call="yes",
                       tool=ToolOutcome("parsed tool call", forced=True, name="get_weather",
                                        arguments='{"city": "Paris"}'), tokens_per_s=42.0, reply="Blue.")
    speed = BenchSpeed(pp_tokens_per_s=900.0, pp_stddev=5.0, tg_tokens_per_s=80.0, tg_stddev=1.0, prompt_tokens=64,
                       gen_tokens=16, reps=1, threads=2, backend="CPU", cpu="EPYC", repack=False)
    task = _summary({"acc": 0.75, "acc_norm": 0.76, "acc_token_norm": 0.8, "n": 4, "chance": 0.25, "p_value": 1e-3,
                     "metric": "acc_token_norm", "backend": "llama-perplexity", "correct": [1, 1, 0, 1],
                     "task": "fts"}) | {"items_sha256": "ab" * 32}
    return {**score, "tasks": {"fts": task, "old": 0.5}, "speed": speed.to_dict(), "serve": serve.to_dict(),
            "sets": {"prose": {**score, "set": "prose", "kind": "text", "reference": "base GGUF"},
                     "chat": {**score, "set": "chat", "kind": "chat", "reference": "HF checkpoint",
                              "set_info": {"conversations": 52, "skipped_tools": 0, "tokens": 2048}}}}


def test_nested_scores_are_records_and_write_back_exactly():
    data = make_manifest()
    data["variants"][0]["scores"] = _nested_scores()
    before = copy.deepcopy(data)
    m = Manifest.from_dict(data)
    assert m.to_dict() == before
    sc = m.variants[0].scores
    assert sc.tasks["fts"].acc_token_norm == 0.8 and sc.tasks["fts"].correct == [1, 1, 0, 1]
    assert sc.tasks["old"] == 0.5  # a bare number, as older manifests hold it
    assert sc.speed.tg_tokens_per_s == 80.0 and sc.speed.repack is False
    assert sc.serve.tool_call == "yes" and sc.serve.passed and sc.serve.tool["name"] == "get_weather"
    assert sc.sets["chat"].reference == "HF checkpoint" and sc.sets["chat"].number("kld_p999") == 0.6


@pytest.mark.parametrize("part, key, value, message", [
    ("serve", "verdict", "ok", r"variants\[0\]\.scores\.serve: unknown key 'verdict'"),
    ("speed", "tg_tokens_per_s", "fast", r"variants\[0\]\.scores\.speed\.tg_tokens_per_s: expected a number"),
    ("sets", "prose", {"ppl": 1.0, "shift": 2}, r"variants\[0\]\.scores\.sets\['prose'\]: unknown key 'shift'"),
    ("tasks", "fts", {"acc": True}, r"variants\[0\]\.scores\.tasks\['fts'\]\.acc: expected a number, got bool"),
])
def test_a_nested_score_of_the_wrong_shape_is_refused_where_it_is(part, key, value, message):
    data = make_manifest()
    data["variants"][0]["scores"] = _nested_scores()
    data["variants"][0]["scores"][part][key] = value
    with pytest.raises(StoreError, match=message):
        Manifest.from_dict(data)
