"""GPTQ and AWQ on the tiny Llama: standard checkpoints that transformers reloads on CPU,
perplexity near the base model's, store reuse, and a group-size preflight that names the layer."""

from __future__ import annotations

import hashlib
import pickle

import pytest

from quantkit.calibration import CalibrationText
from quantkit.digest import digest_of, sha256_file
from quantkit.gptq import GroupSizeError, check_group_size, gptq
from quantkit.recipe import AWQVariant, GPTQVariant
from quantkit.samples import calibration_samples
from quantkit.source import ModelSnapshot
from quantkit.store import Store

pytest.importorskip("gptqmodel", reason="needs the GPTQ/AWQ backend: pip install 'quantkit[gptq]'")

# Small enough for two CPU cores; the recipe defaults (128 x 512) are for real models.
SAMPLES, SEQ_LEN = 16, 128
EVAL_TOKENS, EVAL_CTX = 2048, 128


@pytest.fixture(scope="module")
def snapshot(tiny_llama) -> ModelSnapshot:
    files = {f.name: sha256_file(f) for f in sorted(tiny_llama.iterdir()) if f.is_file()}
    return ModelSnapshot(path=tiny_llama, repo=None, revision=None, commit=None, files=files, digest=digest_of(files))


@pytest.fixture(scope="module")
def calibration(repo_root) -> CalibrationText:
    text = (repo_root / "calibration" / "en-prose.txt").read_text(encoding="utf-8")
    return CalibrationText(text, hashlib.sha256(text.encode()).hexdigest(), ("calibration/en-prose.txt",))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    return Store(tmp_path_factory.mktemp("store"))


def _perplexity(path, repo_root) -> float:
    """Perplexity over the first EVAL_TOKENS held-out tokens, in EVAL_CTX windows."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    text = (repo_root / "calibration" / "eval" / "en-prose-heldout.txt").read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0][:EVAL_TOKENS]
    windows = ids[: len(ids) // EVAL_CTX * EVAL_CTX].view(-1, EVAL_CTX)
    with torch.no_grad():
        ppl = math.exp(model(input_ids=windows, labels=windows).loss.item())
        prompt = tokenizer("The river", return_tensors="pt")
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt.input_ids.shape[1], "generated nothing"
    return ppl


@pytest.fixture(scope="module")
def base_ppl(tiny_llama, repo_root) -> float:
    return _perplexity(tiny_llama, repo_root)


def test_samples_are_seeded_windows(tiny_llama, calibration):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    a = calibration_samples(tokenizer=tok, text=calibration.text, samples=8, seq_len=64, seed=0)
    assert a == calibration_samples(tokenizer=tok, text=calibration.text, samples=8, seq_len=64, seed=0)
    assert a != calibration_samples(tokenizer=tok, text=calibration.text, samples=8, seq_len=64, seed=1)
    assert len(a) == 8 and {len(w) for w in a} == {64}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq", "awq-noclip"])
def test_quantized_checkpoint_reloads_and_scores(method, snapshot, calibration, store, base_ppl, repo_root):
    import json

    if method == "gptq":
        step, spec = gptq, GPTQVariant(label="g128", samples=SAMPLES, seq_len=SEQ_LEN)
        want = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True}
    else:
        from quantkit.awq import awq

        step, spec = awq, AWQVariant(label="g128", samples=SAMPLES, seq_len=SEQ_LEN, clip=method == "awq")
        want = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}

    entry = step(model=snapshot, spec=spec, calibration=calibration, store=store)
    assert not entry.reused
    qc = json.loads(entry.file("config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in want} == want
    assert {"model.safetensors", "tokenizer.json", "tokenizer.model"} <= set(entry.files)
    assert entry.info["device"] == "cpu" and entry.info["samples"]["count"] == SAMPLES

    ppl = _perplexity(entry.path, repo_root)
    print(f"{method}: base ppl {base_ppl:.3f}, quantized {ppl:.3f} ({ppl / base_ppl - 1:+.2%}), "
          f"{entry.info['seconds']:.0f} s")
    assert ppl < base_ppl * 1.10

    again = step(model=snapshot, spec=spec.model_copy(update={"label": "renamed"}), calibration=calibration,
                 store=store)
    assert again.reused and again.path == entry.path
    if method == "awq-noclip":
        # without the clipping search the weights come out otherwise: another key, other bytes
        clipped = step(model=snapshot, spec=spec.model_copy(update={"clip": True}), calibration=calibration,
                       store=store)
        assert clipped.path != entry.path
        assert clipped.files["model.safetensors"].sha256 != entry.files["model.safetensors"].sha256


def test_group_size_preflight_names_the_layer(snapshot, calibration, tmp_path):
    store = Store(tmp_path)
    # hidden 256, intermediate 768: 512 fits neither; down_proj (in 768) sorts first in layer 0.
    with pytest.raises(GroupSizeError) as info:
        gptq(model=snapshot, spec=GPTQVariant(group_size=512, samples=SAMPLES, seq_len=SEQ_LEN),
             calibration=calibration, store=store)
    assert str(info.value) == "model.layers.0.mlp.down_proj: input width 768 is not a multiple of group_size 512"
    assert info.value.layer == "model.layers.0.mlp.down_proj"
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)
    assert not (tmp_path / "gptq").exists()  # refused before the store was touched
    assert check_group_size(snapshot.path, 128) == 28  # 7 linears x 4 layers


def test_awq_clip_is_in_the_key_only_when_turned_off():
    """Checkpoints stored before `clip` existed were clipped: at its default the key is what it was."""
    from types import SimpleNamespace

    from quantkit.gptq import checkpoint_inputs

    model = SimpleNamespace(digest="ab" * 32)
    default = checkpoint_inputs(model=model, spec=AWQVariant(), calibration=None)
    off = checkpoint_inputs(model=model, spec=AWQVariant(clip=False), calibration=None)
    assert "clip" not in default["spec"] and off["spec"]["clip"] is False
    assert {k: v for k, v in off["spec"].items() if k != "clip"} == default["spec"]


def test_a_gptqmodel_worker_error_ends_the_run_with_a_message(tmp_path):
    """GPTQModel's worker threads end the process on any error (os._exit(1)) with the traceback on stderr, which
    during a node is the node's log file: quantkit keeps that exit and says on the terminal what it was."""
    import subprocess
    import sys

    log = tmp_path / "node.log"
    code = ("import sys\n"
            "from quantkit.gptq import import_gptqmodel\n"
            "import_gptqmodel()\n"
            "from gptqmodel.utils.threadx import _DeviceWorker\n"
            f"sys.stderr = open({str(log)!r}, 'w')\n"
            "_DeviceWorker._abort_process(None, TypeError('forward() missing layer_type'))\n"
            "print('not reached', file=sys.__stderr__)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert f"error: GPTQModel stopped the process: TypeError: forward() missing layer_type (its traceback: {log})" \
        in run.stderr
    assert "not reached" not in run.stderr
    assert "TypeError: forward() missing layer_type" in log.read_text()  # GPTQModel's own traceback, kept
