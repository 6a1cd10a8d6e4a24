"""GGUFs over publish.max_file_gib ship as llama-gguf-split shards: the pinned splitter on the tiny Llama
with a tiny limit. The shards load by their first one and score exactly as the whole file,
``llama-gguf-split --merge`` gives every tensor and metadata value back, and a local release lists them shard by
shard (manifest, report, card, Modelfile) while the run folder keeps its one file. The Hub layout is in
tests/test_hub_layout.py (test_split_ggufs_keep_their_tags)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from test_report import CONFIG, RECIPE_YAML, STEM, make_manifest, make_run_dir

from quantkit.digest import sha256_file
from quantkit.proc import run_tool
from quantkit.publish import release as pub
from quantkit.recipe import Evaluation, Publish
from quantkit.scoring.llamacpp import base_logits, score_gguf

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
HELDOUT = REPO / "calibration" / "eval" / "en-prose-heldout.txt"
SPEC = Evaluation(file="calibration/eval/en-prose-heldout.txt", ctx=128, max_tokens=4 * 128)


@pytest.fixture(scope="session")
def gguf_split(toolchain) -> Path:
    binary = toolchain.binary("llama-gguf-split")
    if not binary.is_file():
        pytest.skip("the toolchain has no llama-gguf-split (built before #28); run `quantkit toolchain --build`")
    return binary


@pytest.fixture(scope="module")
def split(tiny_f16_gguf, gguf_split, tmp_path_factory) -> tuple[list[Path], int]:
    """The tiny F16 GGUF split with a limit of a third of its size: (shards, limit in bytes)."""
    limit = tiny_f16_gguf.stat().st_size // 3
    out = tmp_path_factory.mktemp("shards")
    return pub.split_gguf(tiny_f16_gguf, dest=out, gguf_split=gguf_split, max_file_bytes=limit), limit


def test_shards_stay_under_the_limit_with_llama_cpp_names(split, tiny_f16_gguf):
    shards, limit = split
    n = len(shards)
    assert n >= 3 and [p.name for p in shards] == [f"f16-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    assert all(p.stat().st_size <= limit for p in shards)
    with pytest.raises(pub.PublishError, match="already holds shards of f16.gguf"):
        pub.split_gguf(tiny_f16_gguf, dest=shards[0].parent, gguf_split=Path("/nonexistent"), max_file_bytes=limit)


def test_the_first_shard_loads_all_and_scores_as_the_whole_file(split, tiny_f16_gguf, toolchain, tmp_path):
    """llama-perplexity given the first shard: the same PPL, and the same KLD against the unsplit file's
    logits, as the unsplit file."""
    shards, _ = split
    for name in ("whole", "sharded"):
        (tmp_path / name).mkdir()
    logits = base_logits(base_gguf=tiny_f16_gguf, text_file=HELDOUT, spec=SPEC, toolchain=toolchain,
                         workdir=tmp_path / "logits")
    whole = score_gguf(gguf=tiny_f16_gguf, base_logits=logits, text_file=HELDOUT, spec=SPEC, toolchain=toolchain,
                       workdir=tmp_path / "whole")
    sharded = score_gguf(gguf=shards[0], base_logits=logits, text_file=HELDOUT, spec=SPEC, toolchain=toolchain,
                         workdir=tmp_path / "sharded")
    assert sharded.n_tokens == whole.n_tokens > 0
    assert (sharded.ppl, sharded.ppl_err) == (whole.ppl, whole.ppl_err)
    # against the whole file's stored logits (kept at reduced precision, so not exactly 0): the same KLD
    assert (sharded.kld_mean, sharded.kld_p99) == (whole.kld_mean, whole.kld_p99) and whole.kld_mean < 1e-5
    assert sharded.same_top_pct == whole.same_top_pct == 100


def test_merge_rebuilds_the_file(split, tiny_f16_gguf, gguf_split, tmp_path):
    """``--merge`` gives every tensor back byte for byte and every metadata value, in order. It is not the
    same file: the pinned merge keeps ``split.no`` and ``split.tensors.count`` and writes ``split.count`` 0
    (gguf-split.cpp, ``gguf_merge``), so the merged file's sha256 is not the manifest's (the card says so)."""
    from gguf import GGUFReader

    shards, _ = split
    run_tool([gguf_split, "--merge", shards[0], tmp_path / "merged.gguf"])
    whole, merged = GGUFReader(tiny_f16_gguf), GGUFReader(tmp_path / "merged.gguf")
    assert [(t.name, t.tensor_type, t.shape.tolist(), bytes(t.data)) for t in merged.tensors] == \
        [(t.name, t.tensor_type, t.shape.tolist(), bytes(t.data)) for t in whole.tensors]
    split_keys = {"split.no": 0, "split.count": 0, "split.tensors.count": len(whole.tensors)}
    assert {k: merged.fields[k].contents() for k in split_keys} == split_keys
    kv = {k: f.contents() for k, f in whole.fields.items() if k != "GGUF.kv_count"}
    assert {k: f.contents() for k, f in merged.fields.items() if k not in {*split_keys, "GGUF.kv_count"}} == kv
    assert list(kv) == [k for k in merged.fields if k not in {*split_keys, "GGUF.kv_count"}]


def test_a_local_release_lists_the_shards(tiny_f16_gguf, gguf_split, tmp_path):
    """A run whose Q4_K_M is over publish.max_file_gib (the tiny model's real GGUF): the published folder
    holds its shards, each hashed in the manifest and the report, listed in the card with the merge line
    Ollama needs, and the Modelfile says to merge; the run folder keeps its file and its manifest."""
    manifest = make_manifest()
    manifest["variants"] = manifest["variants"][:5]  # F16 … Q4_K_M, header-only GGUFs but this one
    run = make_run_dir(tmp_path, manifest)
    whole = run / f"{STEM}-Q4_K_M.gguf"
    shutil.copyfile(tiny_f16_gguf, whole)
    run_manifest = (run / "manifest.json").read_bytes()
    limit = whole.stat().st_size // 3
    settings = Publish(max_file_gib=limit / 2**30)
    p = pub.release(run_dir=run, manifest=manifest, root=tmp_path, settings=settings, recipe_yaml=RECIPE_YAML,
                    config=CONFIG, run_id="r1", gguf_split=gguf_split)
    assert p.path == tmp_path / "artifacts" / "smollm2-135m-demo" / "r1"
    published = json.loads((p.path / "manifest.json").read_text())
    (variant,) = [v for v in published["variants"] if v.get("shards")]
    shards = [s["file"] for s in variant["shards"]]
    n = len(shards)
    assert variant["file"] == whole.name and n >= 3
    assert shards == [f"{STEM}-Q4_K_M-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    for s in variant["shards"]:
        assert s["sha256"] == sha256_file(p.path / s["file"]) and s["size"] == (p.path / s["file"]).stat().st_size
        assert s["size"] <= limit
    assert not (p.path / whole.name).exists() and sorted(p.path.glob("*-of-*.gguf")) == [p.path / s for s in shards]
    # the run folder is as the run wrote it: one file, its manifest untouched (not written through a link)
    assert whole.is_file() and (run / "manifest.json").read_bytes() == run_manifest
    assert not list(run.glob("*-of-*.gguf"))

    merge = f"llama-gguf-split --merge {shards[0]} {whole.name}"
    (row,) = [r for r in json.loads((p.path / "report.json").read_text())["variants"] if r.get("shards")]
    assert row["shards"] == variant["shards"] and row["serve"]["merge"] == merge
    assert row["serve"]["command"].startswith(f"llama-server -m {shards[0]} ")
    card = (p.path / "README.md").read_text()
    assert "## Split files" in card and f"`{merge}`" in card
    assert all(f"| `{s['file']}` | {s['size']} | `{s['sha256']}` |" in card for s in variant["shards"])
    modelfile = (p.path / f"{STEM}-Q4_K_M.Modelfile").read_text().splitlines()
    assert f"#   {merge}" in modelfile and f'FROM "./{whole.name}"' in modelfile
    assert "merge them first" not in (p.path / f"{STEM}-Q8_0.Modelfile").read_text()  # under the limit: one file
    assert f"Ollama cannot import shards: `{merge}`" in (p.path / "report.md").read_text()

    # The same run again is the same release: its shards stand for the file it does not hold.
    again = pub.release(run_dir=run, manifest=manifest, root=tmp_path, settings=settings, recipe_yaml=RECIPE_YAML,
                        config=CONFIG, run_id="r2", gguf_split=gguf_split)
    assert again.unchanged_since == "r1" and os.readlink(p.path.parent / "latest") == "r1"


def test_a_release_without_the_splitter_is_refused_before_anything_is_published(tmp_path, monkeypatch):
    manifest = make_manifest()
    manifest["variants"] = manifest["variants"][:2]
    run = make_run_dir(tmp_path, manifest)
    monkeypatch.setattr(pub, "_toolchain_splitter", lambda: None)
    with pytest.raises(pub.PublishError, match=r"SmolLM2-135M-Instruct-F16.gguf is .* GiB, over "
                                               r"publish.max_file_gib \(.* GiB\), and llama-gguf-split is not built"):
        pub.release(run_dir=run, manifest=manifest, root=tmp_path, settings=Publish(max_file_gib=1e-8),
                    recipe_yaml=RECIPE_YAML, config=CONFIG, run_id="r1")
    store = tmp_path / "artifacts" / "smollm2-135m-demo"
    assert not (store / "r1").exists() and not (store / "latest").exists() and not list(store.glob(".tmp-*"))


def test_max_file_gib_stays_under_the_hub_limit():
    import pydantic

    assert Publish().max_file_gib == 46.5 and 49.9e9 < Publish().max_file_bytes < pub.HUB_MAX_FILE_BYTES
    assert pub.shard_bytes_for(Publish().max_file_bytes) == 48_431_000_000  # 3% left for the first shard's metadata
    for bad in (0, 47):
        with pytest.raises(pydantic.ValidationError, match="max_file_gib"):
            Publish(max_file_gib=bad)
