"""compare: other publishers' GGUFs of the same model, scored beside the run's own (#26 item 3).

The external files are made here as another publisher would make them, with the bare tools: llama-quantize
without an importance matrix (a file in the project), and with an importance matrix of other text (served by a
Hub on 127.0.0.1). A GGUF of another vocabulary is refused before anything is scored.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from localhub import LocalHub
from quantkit.errors import RecipeError
from quantkit.publish.stats import paired_difference
from quantkit.recipe import load_recipe
from test_pipeline import make_project

HUB_REPO, HUB_COMMIT = "other-publisher/tiny-llama-GGUF", "0123456789abcdef0123456789abcdef01234567"
HEADER = """\
name: tiny-compare
model: {path: models/tiny, name: tiny-llama}
calibration: {files: [calibration/en-prose.txt, calibration/code-python.txt]}
evaluation: {file: calibration/eval/en-prose-heldout.txt, ctx: 128, max_tokens: 4096, bench: false}
gguf:
  imatrix: {enabled: true, ctx: 128, chunks: 16}
  types: [Q8_0, Q4_K_M, Q2_K]
"""
RECIPE = HEADER + f"""\
compare:
  - {{label: bare-Q4_K_M, file: external/tiny-Q4_K_M-bare.gguf}}
  - {{label: other-imatrix-Q4_K_M, repo: {HUB_REPO}, revision: {HUB_COMMIT}, file: tiny-Q4_K_M.gguf}}
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("entry, field, message", [
    ("{label: x, file: external/x.bin}", "compare[0].file", "'external/x.bin' is not a .gguf file"),
    ("{label: x, file: ../x.gguf}", "compare[0].file", "'..' is not allowed"),
    ("{label: x, file: x.gguf, revision: " + HUB_COMMIT + "}", "compare[0].revision", "no 'repo' is given"),
    ("{label: x, repo: a/b, revision: main, file: x.gguf}", "compare[0].revision", "does not pin the file"),
    ("{label: x, repo: a/b, revision: " + HUB_COMMIT + ", file: ../x.gguf}", "compare[0].file",
     "is not a file path inside a repo"),
    ("{label: Q8_0, file: x.gguf}", "compare[0]", "variant 'Q8_0' is made twice"),
])
def test_a_compare_entry_is_checked_for_what_it_becomes(tmp_path, entry, field, message):
    (tmp_path / "recipes").mkdir()
    path = tmp_path / "recipes" / "r.yaml"
    path.write_text(HEADER + f"compare:\n  - {entry}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    problem = next(p for p in e.value.problems if p.where == field)
    assert message in problem.message and problem.line == 9, e.value.problems


def test_compare_needs_the_base_logits(tmp_path):
    (tmp_path / "recipes").mkdir()
    path = tmp_path / "recipes" / "r.yaml"
    path.write_text(HEADER.replace("evaluation: {file: calibration/eval/en-prose-heldout.txt, ctx: 128, "
                                   "max_tokens: 4096, bench: false}\n", "")
                    + "compare:\n  - {label: x, file: x.gguf}\n")
    with pytest.raises(RecipeError, match="compare: other publishers' GGUFs are scored against"):
        load_recipe(path)


@pytest.fixture(scope="module")
def externals(tmp_path_factory, tiny_f16_gguf, toolchain, repo_root):
    """Q4_K_M of the tiny model by the bare llama-quantize: without an imatrix, and with one of Japanese text."""
    out = tmp_path_factory.mktemp("externals")
    run = lambda *cmd: subprocess.run([str(c) for c in cmd], check=True, capture_output=True, cwd=out)  # noqa: E731
    run(toolchain.binary("llama-quantize"), tiny_f16_gguf, out / "bare.gguf", "Q4_K_M")
    run(toolchain.binary("llama-imatrix"), "-m", tiny_f16_gguf, "-f", repo_root / "calibration" / "ja-prose.txt",
        "-o", out / "ja.imatrix.gguf", "-c", "128", "--chunks", "8", "--no-ppl")
    run(toolchain.binary("llama-quantize"), "--imatrix", out / "ja.imatrix.gguf", tiny_f16_gguf,
        out / "other-imatrix.gguf", "Q4_K_M")
    return out


@pytest.fixture(scope="module")
def compared(tmp_path_factory, repo_root, tiny_llama, externals):
    root = tmp_path_factory.mktemp("compare-project")
    make_project(root, repo_root, tiny_llama).unlink()
    (root / "external").mkdir()
    (root / "external" / "tiny-Q4_K_M-bare.gguf").write_bytes((externals / "bare.gguf").read_bytes())
    (root / "recipes" / "r.yaml").write_text(RECIPE)
    hub_folder = tmp_path_factory.mktemp("hub-files")
    (hub_folder / "tiny-Q4_K_M.gguf").write_bytes((externals / "other-imatrix.gguf").read_bytes())
    env = {**os.environ, "QUANTKIT_STORE": str(root / "store"), "HF_HOME": str(root / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_HUB_CACHE", None)
    with LocalHub(HUB_REPO, hub_folder, HUB_COMMIT) as hub:
        done = subprocess.run([sys.executable, "-m", "quantkit.cli", "run", "recipes/r.yaml"], cwd=root,
                              env=env | {"HF_ENDPOINT": hub.url}, capture_output=True, text=True, timeout=1200)
        served = hub.served("tiny-Q4_K_M.gguf")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return root, env, served


@pytest.mark.slow
def test_external_files_are_scored_beside_the_ladder_and_compared_paired(compared, externals):
    root, _, served = compared
    assert served  # downloaded from the Hub at its commit
    manifest = json.loads((root / "runs" / "tiny-compare" / "manifest.json").read_text())
    ext = {v["label"]: v for v in manifest["variants"] if v["format"] == "external"}
    assert set(ext) == {"bare-Q4_K_M", "other-imatrix-Q4_K_M"}
    assert ext["bare-Q4_K_M"]["files"]["model.gguf"]["sha256"] == sha256(externals / "bare.gguf")
    assert ext["other-imatrix-Q4_K_M"]["files"]["model.gguf"]["sha256"] == sha256(externals / "other-imatrix.gguf")
    ours = next(v for v in manifest["variants"] if v["label"] == "Q4_K_M")
    report = json.loads((root / "runs" / "tiny-compare" / "report" / "report.json").read_text())
    for label, v in ext.items():
        (c,) = [c for c in report["external_comparisons"] if c["external"] == f"external:{label}"]
        # the nearest variant of equal or smaller size is the run's own Q4_K_M (the same types, the same size)
        assert c["ours"] == "gguf:Q4_K_M" and not c["larger"]
        # the test, recomputed here from each chunk's KLD in the manifest
        diff, se = paired_difference(v["scores"]["chunk_kld"], ours["scores"]["chunk_kld"])
        assert (c["diff"], c["se"], c["chunks"]) == pytest.approx((diff, se, len(ours["scores"]["chunk_kld"])))
        want = "external wins" if diff < -3 * se else "external loses" if diff > 3 * se else "no significant difference"
        assert c["verdict"] == want
    md = (root / "runs" / "tiny-compare" / "report" / "report.md").read_text()
    assert "## Other publishers' files" in md and "| ext | external | bare-Q4_K_M |" in md
    card = (root / "runs" / "tiny-compare" / "report" / "README.md").read_text()
    assert "| ext | external | other-imatrix-Q4_K_M |" in card
    # never placed, published or recommended
    ext_shas = {v["files"]["model.gguf"]["sha256"] for v in ext.values()}
    published = [p for p in (root / "artifacts" / "tiny-compare").rglob("*") if p.is_file() and not p.is_symlink()]
    run_folder = [p for p in (root / "runs" / "tiny-compare").rglob("*.gguf")]
    assert not ext_shas & {sha256(p) for p in published + run_folder if p.suffix == ".gguf"}
    assert all(not r["id"].startswith("external:") for r in report["recommended"])


def _other_vocabulary(base: Path, out: Path) -> Path:
    """A GGUF whose header matches the base's architecture, layers, width and vocabulary size, with other tokens."""
    import numpy as np
    from gguf import GGUFWriter

    from quantkit.ggufinfo import read_gguf

    info = read_gguf(base)
    writer = GGUFWriter(out, info.architecture)
    writer.add_block_count(info.metadata[f"{info.architecture}.block_count"])
    writer.add_embedding_length(info.metadata[f"{info.architecture}.embedding_length"])
    writer.add_token_list([f"tok{i}" for i in range(info.vocab_size)])
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("other, why", [
    ("tiny_mixtral", "llama.block_count 2, the base's is 4"),  # llama.cpp converts Mixtral as "llama"
    ("tiny_ernie", "architecture ernie4_5-moe, the base's is llama"),
])
def test_a_gguf_of_another_shape_with_the_same_vocabulary_is_refused(request, other, why, tiny_f16_gguf, toolchain,
                                                                     tmp_path):
    """The tests' tiny MoEs share the tiny Llama's tokenizer: only the shape checks tell their GGUFs apart."""
    from quantkit.external import VOCABULARY, mismatch
    from quantkit.ggufinfo import array_sha256, read_gguf
    from quantkit.proc import run_tool

    out = tmp_path / f"{other}.gguf"
    run_tool([sys.executable, toolchain.convert_script, request.getfixturevalue(other), "--outfile", out,
              "--outtype", "f16"], env=toolchain.python_env())
    assert array_sha256(out, VOCABULARY) == array_sha256(tiny_f16_gguf, VOCABULARY)
    assert mismatch(read_gguf(out), out, tiny_f16_gguf) == why
    assert mismatch(read_gguf(tiny_f16_gguf), tiny_f16_gguf, tiny_f16_gguf) is None


@pytest.mark.slow
def test_a_gguf_of_another_vocabulary_is_refused_before_it_is_scored(compared, tiny_f16_gguf):
    root, env, _ = compared
    _other_vocabulary(tiny_f16_gguf, root / "external" / "other-vocab.gguf")
    (root / "recipes" / "other.yaml").write_text(
        HEADER.replace("tiny-compare", "tiny-other") + "compare:\n  - {label: other, file: external/other-vocab.gguf}\n")
    done = subprocess.run([sys.executable, "-m", "quantkit.cli", "run", "recipes/other.yaml"], cwd=root,
                          env=env | {"HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert ("compare 'other' (external/other-vocab.gguf) has the same number of tokens "
            in done.stdout + done.stderr), (done.stdout + done.stderr)[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    entries = (Path(env["QUANTKIT_STORE"]) / "external").glob("*/entry.json")
    assert not any("other-vocab" in p.read_text() for p in entries)  # nothing stored for it
    assert not (root / "runs" / "tiny-other" / "manifest.json").exists()
