"""Build tiny, briefly trained mixture-of-experts checkpoints with real MoE config layouts.

Two families that both the pinned llama.cpp converter and the installed transformers support and
that read a sentencepiece tokenizer (so the tiny Llama's tokenizer serves; Qwen2/3-MoE would need a
BPE tokenizer whose pre-tokenizer hash the converter knows):

- ``mixtral``: routed experts only (MixtralForCausalLM → GGUF arch ``llama`` with ``ffn_*_exps``);
- ``ernie``: a shared expert beside the routed ones (Ernie4_5_MoeForCausalLM → ``ernie4_5-moe`` with
  ``ffn_*_shexp``).

``kill_expert(src, dest, e)`` (ernie only) copies a built checkpoint and sets expert ``e``'s entry of every
layer's router selection bias (``moe_statics.e_score_correction_bias``, one entry per router row) to -1:
routing picks the top-k of softmax probability + bias, probabilities lie in (0, 1), so ``e`` is never
chosen by transformers nor by llama.cpp (which reads the bias as ``ffn_exp_probs_b``). Every tensor
width is a multiple of 256 (K-quant super-blocks) and of 128 (GPTQ groups).
"""

from __future__ import annotations

import hashlib
import logging
import pathlib
import shutil
import tempfile
import time

import tinyllama

log = logging.getLogger(__name__)

FAMILIES = ("mixtral", "ernie")
N_EXPERTS, TOP_K = 4, 2
# Brief: a step of a 4-expert model costs about 0.15 s of one core; 60 steps of 8 x 64 tokens give a
# router that prefers some experts and logits that follow the text (the loss falls from ~8 to ~5).
TRAIN_STEPS, BATCH_SIZE, SEQ_LEN = 60, 8, 64
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")


def source_digest(family: str) -> str:
    h = hashlib.sha256(pathlib.Path(__file__).read_bytes())
    h.update(tinyllama.source_digest().encode())
    h.update(family.encode())
    return h.hexdigest()[:16]


def model_config(family: str):
    common = dict(vocab_size=tinyllama.VOCAB_SIZE, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  bos_token_id=tinyllama.BOS_ID, eos_token_id=tinyllama.EOS_ID, dtype="float32")
    if family == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(intermediate_size=256, num_local_experts=N_EXPERTS, num_experts_per_tok=TOP_K,
                             rope_theta=10000.0, **common)
    if family == "ernie":
        from transformers import Ernie4_5_MoeConfig

        # The converter writes the shared expert's width as intermediate_size // num_key_value_heads
        # (conversion/ernie.py); 512 // 2 = 256 is what transformers builds for one shared expert.
        return Ernie4_5_MoeConfig(intermediate_size=512, moe_intermediate_size=256, moe_num_experts=N_EXPERTS,
                                  moe_k=TOP_K, moe_num_shared_experts=1, moe_layer_start_index=0,
                                  pad_token_id=0, **common)
    raise ValueError(f"unknown tiny MoE family {family!r}; one of {FAMILIES}")


def kill_expert(src: pathlib.Path, dest: pathlib.Path, expert: int) -> pathlib.Path:
    """A copy of the ernie checkpoint ``src`` at ``dest`` in which ``expert`` is never routed to."""
    from safetensors.torch import load_file, save_file

    if not (0 <= expert < N_EXPERTS):
        raise ValueError(f"expert {expert} is not one of 0..{N_EXPERTS - 1}")
    dest = pathlib.Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    work.chmod(0o755)
    try:
        for f in src.iterdir():
            shutil.copyfile(f, work / f.name)
        weights = load_file(work / "model.safetensors")
        biases = [k for k in weights if k.endswith("moe_statics.e_score_correction_bias")]
        if not biases:
            raise ValueError(f"{src} has no router selection bias (moe_statics): not a tiny ernie MoE")
        for k in biases:
            weights[k][..., expert] = -1.0
        save_file(weights, work / "model.safetensors", metadata={"format": "pt"})
        tinyllama.move_into_place(work, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def build_tiny_moe(dest: pathlib.Path, *, family: str, tokenizer_from: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A briefly trained tiny MoE checkpoint at ``dest`` (built beside it, moved into place atomically)."""
    import torch
    from transformers import AutoModelForCausalLM

    dest = pathlib.Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    work.chmod(0o755)
    try:
        started = time.monotonic()
        for name in TOKENIZER_FILES:
            shutil.copyfile(tokenizer_from / name, work / name)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(model_config(family))
        threads = torch.get_num_threads()
        # one thread: on a shared 2-core machine two threads per step made a step ~5x slower (contention)
        torch.set_num_threads(1)
        saved = tinyllama.TRAIN_STEPS, tinyllama.BATCH_SIZE, tinyllama.SEQ_LEN, tinyllama.WARMUP_STEPS
        # _train and its schedule read the module's constants
        tinyllama.TRAIN_STEPS, tinyllama.BATCH_SIZE, tinyllama.SEQ_LEN, tinyllama.WARMUP_STEPS = (
            TRAIN_STEPS, BATCH_SIZE, SEQ_LEN, 10)
        try:
            tinyllama._train(model, tinyllama._token_stream(work / "tokenizer.model"), seed)
        finally:
            tinyllama.TRAIN_STEPS, tinyllama.BATCH_SIZE, tinyllama.SEQ_LEN, tinyllama.WARMUP_STEPS = saved
            torch.set_num_threads(threads)
        model.generation_config.bos_token_id = tinyllama.BOS_ID
        model.generation_config.eos_token_id = tinyllama.EOS_ID
        model.save_pretrained(work, safe_serialization=True)
        log.info("built tiny %s MoE in %.0fs", family, time.monotonic() - started)
        tinyllama.move_into_place(work, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest
