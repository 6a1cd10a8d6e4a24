"""Build a tiny but *trained* Llama checkpoint to use as a test fixture.

The model is small enough to build on two CPU cores in a couple of minutes,
but it is a real Hugging Face ``LlamaForCausalLM`` with a real sentencepiece
tokenizer, so llama.cpp's ``convert_hf_to_gguf.py``, ``llama-quantize``,
``llama-imatrix`` and the GPTQ/AWQ paths all treat it like a full-size model.
Because it is trained, perplexity and KL-divergence numbers measured on it
move in the right direction when quantization gets coarser; an untrained
model would give near-uniform logits and hide such regressions.

Usage::

    from tests.tinyllama import build_tiny_llama
    path = build_tiny_llama(pathlib.Path("/tmp/tiny-llama"))
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import pathlib
import shutil
import tempfile
import time

log = logging.getLogger(__name__)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CALIBRATION_DIR = REPO_ROOT / "calibration"
# Training texts. The held-out file calibration/eval/en-prose-heldout.txt is
# deliberately absent: it is what the model (and its quantized copies) are
# scored on.
TRAIN_FILES = ("en-prose.txt", "code-python.txt", "ja-prose.txt")
HELDOUT_FILE = CALIBRATION_DIR / "eval" / "en-prose-heldout.txt"

VOCAB_SIZE = 3072
SEQ_LEN = 128
BATCH_SIZE = 16
TRAIN_STEPS = 360
PEAK_LR = 3e-3
WARMUP_STEPS = 30

# Llama-2 style ids, which is also what sentencepiece's defaults look like.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def source_digest() -> str:
    """Digest of everything that determines the checkpoint.

    Covers this file and the training texts, so editing either gives a new
    cache key and the fixture is rebuilt instead of silently reused.
    """
    h = hashlib.sha256()
    h.update(pathlib.Path(__file__).read_bytes())
    for name in TRAIN_FILES:
        h.update(name.encode())
        h.update((CALIBRATION_DIR / name).read_bytes())
    return h.hexdigest()[:16]


def _train_texts() -> list[str]:
    return [(CALIBRATION_DIR / name).read_text(encoding="utf-8") for name in TRAIN_FILES]


def _train_sentencepiece(work: pathlib.Path) -> pathlib.Path:
    """Train a Llama-style BPE sentencepiece model on the calibration texts."""
    import sentencepiece as spm

    lines = [line for text in _train_texts() for line in text.splitlines()]
    model = work / "tokenizer.model"
    with model.open("wb") as out:
        # Feeding an iterator and a writer (not file paths) keeps temporary
        # paths out of the model's stored trainer spec, so the bytes of
        # tokenizer.model do not depend on where it was built.
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=out,
            vocab_size=VOCAB_SIZE,
            model_type="bpe",
            # Byte fallback (as in Llama) keeps every input encodable,
            # including rare kanji that did not make it into the vocabulary.
            character_coverage=1.0,
            byte_fallback=True,
            split_digits=True,
            # Keep indentation runs: the code corpus depends on them.
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=-1,
            # Each prose paragraph is a single line, some several KB long.
            max_sentence_length=1 << 16,
            num_threads=1,  # single-threaded for reproducible merges
            minloglevel=2,
        )
    return model


def _save_hf_tokenizer(model_dir: pathlib.Path) -> None:
    """Write tokenizer_config.json and tokenizer.json next to tokenizer.model.

    transformers converts tokenizer.model into a fast tokenizer on load;
    saving it back gives tokenizer.json, so later loads skip the conversion.
    llama.cpp's converter reads tokenizer.model itself.
    """
    import json

    from transformers import AutoTokenizer

    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": SEQ_LEN * 4,
        "chat_template": CHAT_TEMPLATE,
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)


def _model_config():
    from transformers import LlamaConfig

    # Every width is a multiple of 256 (llama.cpp K-quant super-blocks) and
    # of 128 (GPTQ/AWQ group size), so no tensor falls back to another type.
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        dtype="float32",
    )


def _token_stream(sp_model: pathlib.Path):
    """All training texts as one token tensor, each document wrapped in BOS/EOS."""
    import sentencepiece as spm
    import torch

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    ids: list[int] = []
    for text in _train_texts():
        for paragraph in text.split("\n\n"):
            ids += [BOS_ID, *sp.encode(paragraph), EOS_ID]
    return torch.tensor(ids, dtype=torch.long)


def _lr_at(step: int) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, TRAIN_STEPS - WARMUP_STEPS)
    return PEAK_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _train(model, stream, seed: int) -> None:
    import torch

    # A private generator fixes the batch order independently of anything
    # else that consumes the global RNG.
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    start = time.monotonic()
    for step in range(TRAIN_STEPS):
        offsets = torch.randint(0, len(stream) - SEQ_LEN - 1, (BATCH_SIZE,), generator=gen)
        batch = torch.stack([stream[o : o + SEQ_LEN] for o in offsets.tolist()])
        for group in opt.param_groups:
            group["lr"] = _lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == TRAIN_STEPS - 1:
            log.info("step %d loss %.3f (%.0fs)", step, loss.item(), time.monotonic() - start)
    model.eval()


def heldout_perplexity(model, tokenizer, text: str | None = None, ctx: int = SEQ_LEN) -> float:
    """Perplexity over non-overlapping ``ctx``-token windows of the held-out text.

    Same scheme as llama-perplexity with ``-c ctx`` except that every token in
    a window is scored (llama-perplexity scores only the second half).
    """
    import torch

    if text is None:
        text = HELDOUT_FILE.read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    n_windows = len(ids) // ctx
    windows = ids[: n_windows * ctx].view(n_windows, ctx)
    total_nll = 0.0
    with torch.no_grad():
        for chunk in windows.split(16):
            # .loss is the mean over ctx-1 predicted positions per window.
            total_nll += model(input_ids=chunk, labels=chunk).loss.item() * len(chunk)
    return math.exp(total_nll / n_windows)


def build_tiny_llama(dest: pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """Create a trained tiny Llama checkpoint directory at ``dest``.

    The checkpoint is built in a sibling temporary directory and moved into
    place with ``os.replace``, so a crashed or concurrent build never leaves a
    half-written directory at ``dest``. If another process finished first,
    its result is kept and ours is discarded.

    Weights are saved in float32: the model is only ~19 MB, and keeping full
    precision makes the HF checkpoint the exact reference that f16 and
    quantized GGUF conversions are compared against.
    """
    import torch
    from transformers import LlamaForCausalLM

    dest = pathlib.Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    work.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
    try:
        started = time.monotonic()
        sp_model = _train_sentencepiece(work)
        _save_hf_tokenizer(work)

        torch.manual_seed(seed)
        model = LlamaForCausalLM(_model_config())
        _train(model, _token_stream(sp_model), seed)
        if log.isEnabledFor(logging.INFO):
            from transformers import AutoTokenizer

            ppl = heldout_perplexity(model, AutoTokenizer.from_pretrained(work))
            log.info("held-out perplexity %.1f", ppl)
        model.generation_config.bos_token_id = BOS_ID
        model.generation_config.eos_token_id = EOS_ID
        model.save_pretrained(work, safe_serialization=True)
        log.info("built tiny llama in %.0fs", time.monotonic() - started)
        move_into_place(work, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def move_into_place(work: pathlib.Path, dest: pathlib.Path) -> None:
    """A checkpoint built in ``work`` becomes ``dest`` in one rename, its files readable by all (safetensors
    writes 0600; the cache may be shared). Losing a race with another builder is fine: its checkpoint is
    equivalent."""
    for f in work.iterdir():
        f.chmod(0o644)
    try:
        os.replace(work, dest)
    except OSError:
        if not (dest / "config.json").exists():
            raise
