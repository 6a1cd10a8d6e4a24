"""`quantkit plan` of a 70B Llama from its safetensors headers alone (served by the local Hub), at the default
``publish.max_file_gib``: the F16 and Q8_0 GGUFs are over the Hub's 50 GB per-file limit and are published as
llama-gguf-split shards (issue #28); the plan shows how many, and publishing's new disk counts them."""

from __future__ import annotations

import math
import textwrap

import pytest
from test_plan_hub import CONFIG as CONFIG_8B, hub_online, llama_8b_shapes, llama_shapes, write_header_repo

from quantkit.estimate import Cost, ModelFacts, publish_cost
from quantkit.plan import plan, render, totals
from quantkit.recipe import Publish, load_recipe


REPO = "meta-llama/Llama-3.1-70B-Instruct"
COMMIT = "1605565b47bb9346c5515c34102e054115b4f98b"  # the snapshot public caches of the repo resolve to
GiB = 2**30
# Llama-3.1-70B's config.json (the fields quantkit reads)
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
          "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
          "vocab_size": 128256, "tie_word_embeddings": False, "max_position_embeddings": 131072,
          "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16"}
PARAMS = 70_553_706_496  # Llama-3.1-70B


def llama_70b_shapes() -> list[tuple[str, list[int]]]:
    return llama_shapes(hidden=8192, ffn=28672, vocab=128256, kv=8 * 128, layers=80)


RECIPE = textwrap.dedent(f"""\
    name: llama-70b
    model: {{repo: {REPO}, revision: {COMMIT}}}
    calibration: {{files: [calibration/calib.txt]}}
    gguf:
      imatrix: {{enabled: true, ctx: 512, chunks: 100}}
      types: [Q8_0, Q4_K_M]
    """)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """The 70B repo as the Hub has it (30 shards and the index, each shard only its header), and a recipe
    without a publish section: the default max_file_gib."""
    shapes = llama_70b_shapes()
    n = len(shapes)
    parts = {f"model-{i + 1:05d}-of-00030.safetensors": shapes[i * n // 30:(i + 1) * n // 30] for i in range(30)}
    folder = write_header_repo(tmp_path / "hub-files", parts, CONFIG)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "calibration").mkdir()
    (tmp_path / "calibration" / "calib.txt").write_text("Calibration paragraph. " * 40 + "\n")
    (tmp_path / "recipes" / "llama-70b.yaml").write_text(RECIPE)
    monkeypatch.setenv("QUANTKIT_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("QUANTKIT_PROJECT", str(tmp_path))
    with hub_online(REPO, folder, COMMIT, monkeypatch, tmp_path / "hf-cache"):
        yield tmp_path


def planned(project) -> dict:
    from quantkit.context import RunContext

    return {r.name: r for r in plan(RunContext.from_env(project / "recipes" / "llama-70b.yaml", toolchain="find"))}


def shards_at(size: int, limit: int) -> int:
    # llama-gguf-split is asked for shards of 97 % of the limit (3 % for the first shard's header)
    return math.ceil(size / (limit * 0.97)) if size > limit else 1


def test_a_70b_recipe_plans_its_shards_from_headers_alone(project):
    rows = planned(project)
    assert not totals(list(rows.values())).unknown
    assert rows["source"].disk_bytes == 2 * PARAMS  # the bf16 download: the headers give the real parameter count
    limit = Publish().max_file_bytes  # the default, just under the Hub's 50 GB
    assert limit == int(46.5 * GiB) and limit < 50 * 1000**3
    f16, q8, q4 = (rows[n].disk_bytes for n in ("convert", "quantize:Q8_0", "quantize:Q4_K_M"))
    # F16: 2 bytes a weight (norms f32) and the header; Q8_0: 34 bytes per 32 weights
    assert f16 / 1e9 == pytest.approx(141.1, abs=0.1)
    assert q8 / 1e9 == pytest.approx(PARAMS * 34 / 32 / 1e9, abs=0.05) and q8 / 1e9 == pytest.approx(75.0, abs=0.1)
    assert q4 / GiB == pytest.approx(39.6, abs=0.2)  # llama.cpp's Q4_K_M of Llama-3-70B: 39.6 GiB, one file
    assert rows["convert"].shards == shards_at(f16, limit) == 3  # 141 GB / 48.4 GB shards
    assert rows["quantize:Q8_0"].shards == shards_at(q8, limit) == 2
    assert rows["quantize:Q4_K_M"].shards is None and shards_at(q4, limit) == 1
    assert all(r.shards is None for n, r in rows.items() if not n.startswith(("convert", "quantize:")))
    lines = render(list(rows.values())).splitlines()
    convert = next(ln for ln in lines if ln.startswith("convert "))
    q8_line = next(ln for ln in lines if ln.startswith("quantize:Q8_0 "))
    assert f"{f16 / GiB:.2f} GiB (3 shards)" in convert and f"{q8 / GiB:.2f} GiB (2 shards)" in q8_line


def test_publish_cost_is_the_split_ggufs_once_more(project):
    """Publishing writes each GGUF over the limit again, as shards (release.shard_staged: copies, not links):
    the F16 and the Q8_0, not the Q4_K_M; at the Hub's limit an 8B recipe splits nothing."""
    rows = planned(project)
    recipe = load_recipe(project / "recipes" / "llama-70b.yaml", root=project)
    facts = ModelFacts.from_headers([{n: {"dtype": "BF16", "shape": s} for n, s in llama_70b_shapes()}], CONFIG)
    split = rows["convert"].disk_bytes + rows["quantize:Q8_0"].disk_bytes
    cost = publish_cost(recipe, {}, facts)
    assert split < cost.disk_bytes <= split + 3 * 64 * 1024  # and a header for each of the 3 shards after a first
    assert cost.disk_bytes < split + rows["quantize:Q4_K_M"].disk_bytes
    # llama-gguf-split holds one tensor at a time: the F16 embedding (128256 x 8192 x 2 bytes) sets its peak
    assert 2.1e9 < cost.ram_bytes < 2.1e9 + 200 * 2**20
    lower = recipe.model_copy(update={"publish": Publish(max_file_gib=20)})  # the 39.6 GiB Q4_K_M is over it too
    everything = split + rows["quantize:Q4_K_M"].disk_bytes
    assert everything < publish_cost(lower, {}, facts).disk_bytes <= everything + (6 + 3 + 2) * 64 * 1024
    eight = ModelFacts.from_headers([{n: {"dtype": "BF16", "shape": s} for n, s in llama_8b_shapes()}], CONFIG_8B)
    assert publish_cost(recipe, {}, eight) == Cost(0, None)  # 15 GiB and less: nothing is split, nothing runs

def test_the_plans_new_disk_counts_the_shards(project):
    rows = planned(project)
    split = rows["convert"].disk_bytes + rows["quantize:Q8_0"].disk_bytes
    assert split < rows["publish"].disk_bytes <= split + 3 * 64 * 1024
    before = sum(r.disk_bytes for n, r in rows.items() if n != "publish")
    assert totals(list(rows.values())).disk_bytes == before + rows["publish"].disk_bytes
