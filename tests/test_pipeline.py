"""The GGUF chain end to end on the tiny trained Llama, through the real llama.cpp binaries."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from quantkit.cli import main
from quantkit.digest import sha256_file
from quantkit.ggufinfo import read_gguf
from quantkit.manifest import Manifest
from quantkit.toolchain import ensure_toolchain

pytestmark = pytest.mark.slow



def tiny_recipe(name: str, body: str, *, calibration: tuple[str, ...] = ("en-prose",)) -> str:
    """A recipe over the tiny model of a make_project folder: the header every test shares, then ``body``."""
    files = ", ".join(f"calibration/{c}.txt" for c in calibration)
    return (f"name: {name}\nmodel:\n  path: models/tiny\n  name: tiny-llama\ncalibration:\n  files: [{files}]\n"
            + textwrap.dedent(body))


RECIPE = tiny_recipe("tiny-chain", calibration=("en-prose", "code-python"), body="""\
gguf:
  base_type: f16
  imatrix: {enabled: true, ctx: 128, chunks: 16}
  types:
    - Q8_0
    - Q4_K_M
    - {type: Q4_K_M, imatrix: false}
    - {type: Q4_K_M, label: Q4_K_M-q8out, output_tensor_type: q8_0}
    - Q2_K
    - IQ2_XS
""")


@pytest.fixture(scope="module")
def toolchain():
    return ensure_toolchain()


def make_project(root: Path, repo_root: Path, tiny_llama: Path) -> Path:
    (root / "recipes").mkdir(parents=True)
    (root / "recipes" / "tiny.yaml").write_text(textwrap.dedent(RECIPE))
    shutil.copytree(repo_root / "calibration", root / "calibration")
    shutil.copytree(tiny_llama, root / "models" / "tiny")
    return root / "recipes" / "tiny.yaml"


def run(recipe: Path, store: Path, capsys, monkeypatch) -> tuple[dict, str]:
    monkeypatch.setenv("QUANTKIT_STORE", str(store))
    assert main(["run", str(recipe)]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((recipe.parents[1] / "runs" / "tiny-chain" / "manifest.json").read_text())
    assert Manifest.from_dict(manifest).to_dict() == manifest  # the typed schema reads back what a run wrote
    return manifest, out


def shas(manifest: dict) -> dict[str, str]:
    return {v["label"]: v["files"]["model.gguf"]["sha256"] for v in manifest["variants"]}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, repo_root, tiny_llama, toolchain):
    root = tmp_path_factory.mktemp("proj")
    recipe = make_project(root, repo_root, tiny_llama)
    return recipe, tmp_path_factory.mktemp("store")


PLANTED_TOKEN = "hf_PlantedSecret0123456789abcdefXYZ"


def test_chain_produces_every_variant(first_run, capsys, monkeypatch):
    recipe, store = first_run
    monkeypatch.setenv("HF_TOKEN", PLANTED_TOKEN)
    manifest, out = run(recipe, store, capsys, monkeypatch)
    assert "built: convert, imatrix, quantize:Q8_0" in out
    run_dir = recipe.parents[1] / "runs" / "tiny-chain"
    assert [v["label"] for v in manifest["variants"]] == [
        "F16", "Q8_0", "Q4_K_M", "Q4_K_M-noimat", "Q4_K_M-q8out", "Q2_K", "IQ2_XS"]
    assert manifest["toolchain"]["llama_cpp"] == "0c1e570"
    assert manifest["calibration"]["sha256"] and manifest["model"]["digest"]
    expected_ftype = {"F16": 1, "Q8_0": 7, "Q4_K_M": 15, "Q4_K_M-noimat": 15, "Q4_K_M-q8out": 15, "Q2_K": 10,
                      "IQ2_XS": 20}
    for v in manifest["variants"]:
        path = run_dir / v["file"]
        info = read_gguf(path)  # read back, not trusted from the log
        assert info.file_type == expected_ftype[v["label"]], v["label"]
        assert path.stat().st_size == v["files"]["model.gguf"]["size"]
    # Widths are multiples of 256, so the K-quant path is really taken.
    assert read_gguf(run_dir / "tiny-llama-Q4_K_M.gguf").tensor_types.get("q4_k", 0) > 0
    assert read_gguf(run_dir / "tiny-llama-IQ2_XS.gguf").tensor_types.get("iq2_xs", 0) > 0
    sha = shas(manifest)
    assert sha["Q4_K_M"] != sha["Q4_K_M-noimat"], "the imatrix must change the result"


def test_tensor_override_applied(first_run):
    from gguf import GGUFReader

    recipe, _ = first_run
    reader = GGUFReader(recipe.parents[1] / "runs" / "tiny-chain" / "tiny-llama-Q4_K_M-q8out.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["output.weight"] == "Q8_0"
    plain = GGUFReader(recipe.parents[1] / "runs" / "tiny-chain" / "tiny-llama-Q4_K_M.gguf")
    assert {t.name: t.tensor_type.name for t in plain.tensors}["output.weight"] != "Q8_0"


def listing(folder: Path) -> list[str]:
    """Every name under ``folder``, hidden ones included."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_rerun_reuses_everything(first_run, capsys, monkeypatch):
    recipe, store = first_run
    run_dir = recipe.parents[1] / "runs" / "tiny-chain"
    before = json.loads((run_dir / "manifest.json").read_text())
    cold = listing(run_dir)
    manifest, out = run(recipe, store, capsys, monkeypatch)
    assert "built: nothing (every step was already done)" in out
    assert "reused: convert, imatrix, quantize:Q8_0, quantize:Q4_K_M" in out
    assert shas(manifest) == shas(before)
    assert listing(run_dir) == cold, "a re-run leaves exactly what the cold run left (#22: no .<name>.tmp links)"


def test_truncated_store_entry_is_rebuilt_and_the_good_file_published(first_run, capsys, monkeypatch, caplog):
    # What a power loss leaves of a file that was never fsynced (#23): a finished entry, a short GGUF. The run
    # folder and the published run hold hard links to it, so they are short too.
    recipe, store = first_run
    root = recipe.parents[1]
    before = json.loads((root / "runs" / "tiny-chain" / "manifest.json").read_text())
    (q2,) = [v for v in before["variants"] if v["label"] == "Q2_K"]
    stored = store / q2["step"] / q2["key"] / "model.gguf"
    good = q2["files"]["model.gguf"]
    with open(stored, "r+b") as f:
        f.truncate(good["size"] // 2)
    with caplog.at_level("WARNING", logger="quantkit.store"):
        manifest, out = run(recipe, store, capsys, monkeypatch)
    assert f"store entry {stored.parent} is damaged (model.gguf is {good['size'] // 2} bytes" in caplog.text
    assert "built: quantize:Q2_K\n" in out  # nothing else
    assert shas(manifest) == shas(before)
    for path in (stored, root / "runs" / "tiny-chain" / q2["file"],
                 root / "artifacts" / "tiny-chain" / "latest" / q2["file"]):
        assert sha256_file(path) == good["sha256"], path  # rebuilt byte-identical, linked and published


def test_clean_rerun_is_bit_identical(first_run, tmp_path, capsys, monkeypatch):
    recipe, store = first_run
    before = shas(json.loads((recipe.parents[1] / "runs" / "tiny-chain" / "manifest.json").read_text()))
    manifest, out = run(recipe, tmp_path / "fresh-store", capsys, monkeypatch)
    assert "reused" not in out
    assert shas(manifest) == before


def test_until_runs_one_node_and_what_it_needs(first_run, tmp_path, capsys, monkeypatch):
    recipe, _ = first_run
    runs = recipe.parents[1] / "runs" / "tiny-chain"
    before = (runs / "manifest.json").stat().st_mtime_ns
    monkeypatch.setenv("QUANTKIT_STORE", str(tmp_path / "store"))
    assert main(["run", "--until", "quantize:Q2_K", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "built: convert, imatrix, quantize:Q2_K\n" in out and "manifest" not in out
    made = {p.name for p in (tmp_path / "store").iterdir() if p.is_dir()} - {"logs", "scratch"}
    assert made == {"convert", "imatrix", "quantize"}  # nothing else was made
    assert (runs / "manifest.json").stat().st_mtime_ns == before  # no run folder written


def test_plan_shows_done_steps(first_run, capsys, monkeypatch):
    recipe, store = first_run
    monkeypatch.setenv("QUANTKIT_STORE", str(store))
    assert main(["plan", str(recipe)]) == 0
    lines = capsys.readouterr().out.splitlines()
    status = {line.split()[0]: line.split()[1] for line in lines[1:] if line.split()[0] != "of"}
    assert status["convert"] == "done" and status["quantize:IQ2_XS"] == "done"
    assert status["run-folder"] == "to" and status["publish"] == "to"  # "to do": they run every time
    assert any(line.startswith("2 of 11 nodes to do; new disk: 0 KiB") for line in lines), lines[-3:]
    assert main(["plan", "--json", str(recipe)]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert [n["name"] for n in planned["nodes"]][:3] == ["source", "convert", "imatrix"]
    assert planned["nodes"][1]["key"] == json.loads(
        (recipe.parents[1] / "runs" / "tiny-chain" / "manifest.json").read_text())["steps"][0]["key"]
    assert planned["totals"]["disk_bytes"] == 0


def test_planted_token_never_written(first_run):
    recipe, store = first_run
    leaked = [p for folder in (store, recipe.parents[1] / "runs", recipe.parents[1] / "artifacts")
              for p in folder.rglob("*")
              if p.is_file() and PLANTED_TOKEN.encode() in p.read_bytes()]
    assert leaked == []


def test_out_of_memory_refused_before_work(first_run, tmp_path, capsys, monkeypatch):
    import quantkit.plan

    recipe, _ = first_run

    monkeypatch.setattr(quantkit.plan, "machine", lambda _: quantkit.plan.Machine(1 << 50, 1 << 20))
    monkeypatch.setenv("QUANTKIT_STORE", str(tmp_path / "store"))
    assert main(["run", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert "error: node convert needs about" in err and "0.00 GiB is available" in err
    assert not (tmp_path / "store" / "convert").exists()


def test_full_disk_refused_before_work(first_run, tmp_path, capsys, monkeypatch):
    import subprocess

    recipe, _ = first_run
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        monkeypatch.setenv("QUANTKIT_STORE", str(small / "store"))
        assert main(["run", str(recipe)]) == 1
        err = capsys.readouterr().err
        assert "more disk in" in err and "GiB is free" in err
        assert not (small / "store" / "convert").exists()
    finally:
        subprocess.run(["umount", str(small)])
