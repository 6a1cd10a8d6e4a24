"""Step 5 for Hugging Face checkpoints (the base model, GPTQ/AWQ variants): PPL and KLD in torch.

Same tokens and windows as llama-perplexity (see ``quantkit.scoring.windows``), same
formulas for PPL, its ±, mean KLD, the 99th percentile and "same top token",
so these rows sit in one table with the GGUF rows.

Differences from llama-perplexity, by design:
- tokens come from the checkpoint's own HF tokenizer (``add_special_tokens=True``,
  which also recognises special-token text in the input; llama.cpp does not).
  For ordinary prose the ids match llama.cpp's (the tests check it);
- KLD uses the base model's exact float log-probs over the whole vocabulary,
  where llama.cpp stores them in 16 bits and skips entries below e^-16.

The base model runs window by window next to the variant, so no vocab-sized
logits are kept beyond one window.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import time
from pathlib import Path

from quantkit.errors import VerificationError
from quantkit.recipe import Evaluation
from quantkit.source import remote_code_allowed
from quantkit.scoring.windows import (LOGITS_MAGIC, Score, max_chunks, percentile, ppl_and_err, quantized_rows,
                                      read_eval_text, scored_per_chunk)

log = logging.getLogger(__name__)

BACKEND = "torch"
PROGRESS_SECONDS = 30.0


def load_causal_lm(model_dir: Path, *, device: str = "cpu", trust_remote_code: bool = False):
    """Model and tokenizer of a checkpoint, in eval mode.

    The one place checkpoints are loaded for scoring: GPTQ/AWQ loading
    (gptqmodel) goes here. Plain checkpoints load in float32 on CPU (the
    reference must not be rounded further); on GPU in their saved dtype.
    ``trust_remote_code``: the recipe's ``model.trust_remote_code``; passed on to transformers only
    when this worker allows it too (``quantkit.source.remote_code_allowed``).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if "quantization_config" in json.loads((Path(model_dir) / "config.json").read_text()):
        from quantkit.gptq import import_gptqmodel

        import_gptqmodel()  # through quantkit, so that GPTQModel's import leaves the HF cache settings alone
        release_freed_memory()
    remote = remote_code_allowed(trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=remote)
    dtype = torch.float32 if device == "cpu" else "auto"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=remote).to(device)
    model.eval()
    return model, tokenizer


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def release_freed_memory() -> None:
    """Serve allocations of 1 MiB and more from their own mappings, returned to the system when freed.

    GPTQModel's CPU kernel (TorchAtenLinear) repacks every linear on the first forward through temporaries of
    1-4 bytes a weight; glibc kept them in its heap (its threshold rises to 32 MiB), so on Qwen2.5-0.5B's shape
    a GPTQ checkpoint's first generation peaked at 2829 MiB and stayed there; with this, 1783 MiB
    (benchmarks/README.md, "Scaling"). Process-wide and once: a no-op on a C library other than glibc."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS before a text (as llama.cpp's ``add_bos`` does for the GGUF)."""
    plain = tokenizer("a", add_special_tokens=False).input_ids
    special = tokenizer("a", add_special_tokens=True).input_ids
    bos = tokenizer.bos_token_id
    return bos is not None and special[:1] == [bos] and plain[:1] != [bos]


def eval_windows(tokenizer, text: str, spec: Evaluation):
    """The evaluation chunks as a (n_chunks, ctx) LongTensor, BOS already substituted as llama.cpp does."""
    import torch

    ids = tokenizer(text, add_special_tokens=True).input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    special = tokenizer("a", add_special_tokens=True).input_ids
    bos = tokenizer.bos_token_id
    add_bos = tokenizer_adds_bos(tokenizer)
    if len(special) > len(plain) + int(add_bos):
        raise VerificationError(f"tokenizer appends {special[len(plain) + int(add_bos):]} after the text; "
                                "llama-perplexity refuses vocabularies that add EOS")
    if len(ids) < 2 * spec.ctx:
        raise VerificationError(f"evaluation text has {len(ids)} tokens, fewer than two contexts of {spec.ctx} "
                                "(llama-perplexity's minimum)")
    n_chunks = min(max_chunks(spec), len(ids) // spec.ctx)
    windows = torch.tensor(ids[: n_chunks * spec.ctx], dtype=torch.long).view(n_chunks, spec.ctx).clone()
    if add_bos:
        windows[:, 0] = bos
    return windows


def _scored_log_probs(model, window, first: int):
    """log-softmax (float64) at positions first..ctx-2 of one window: (ctx-1-first, vocab)."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=window[None].to(model.device)).logits[0, first:-1]
    return torch.log_softmax(logits.to(torch.float64).cpu(), dim=-1)


def score_hf(*, model_dir: Path, text_file: Path, spec, base_model_dir: Path | None = None,
             device: str = "cpu", trust_remote_code: bool = False) -> Score:
    """PPL of a HF checkpoint on llama-perplexity's windows, and KLD against ``base_model_dir`` if given.
    ``spec``: the Evaluation or an EvalSet (ctx, max_tokens)."""
    model, tokenizer = load_causal_lm(model_dir, device=device, trust_remote_code=trust_remote_code)
    windows = eval_windows(tokenizer, read_eval_text(text_file), spec)
    return score_windows(model=model, windows=windows, model_dir=model_dir, base_model_dir=base_model_dir,
                         device=device, trust_remote_code=trust_remote_code)


def score_chat_hf(*, model_dir: Path, conversations, spec, base_model_dir: Path | None = None,
                  device: str = "cpu", trust_remote_code: bool = False) -> Score:
    """``score_hf`` on a chat set: the conversations rendered through the checkpoint's template
    (quantkit.scoring.chat), cut as the chat base logits are."""
    from dataclasses import replace

    from quantkit.scoring.chat import chat_windows, render_tokens

    model, tokenizer = load_causal_lm(model_dir, device=device, trust_remote_code=trust_remote_code)
    chat = render_tokens(tokenizer, list(conversations))
    windows, _ = chat_windows(chat.ids, spec, bos=tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None)
    score = score_windows(model=model, windows=windows, model_dir=model_dir, base_model_dir=base_model_dir,
                          device=device, trust_remote_code=trust_remote_code)
    return replace(score, set_info={"conversations": chat.conversations, "skipped_tools": chat.skipped_tools,
                                    "tokens": len(chat.ids)})


def score_windows(*, model, windows, model_dir: Path, base_model_dir: Path | None = None, device: str = "cpu",
                  trust_remote_code: bool = False) -> Score:
    """PPL (and KLD against ``base_model_dir``) of a loaded model over (n_chunks, ctx) windows."""
    import torch

    start = time.perf_counter()
    base = (load_causal_lm(base_model_dir, device=device, trust_remote_code=trust_remote_code)[0]
            if base_model_dir is not None else None)
    n_chunks, ctx = windows.shape
    first = ctx // 2
    sum_nll = sum_nll2 = 0.0
    kld_values: list[torch.Tensor] = []
    same_top = 0
    last_report = time.perf_counter()
    for i, window in enumerate(windows):
        log_probs = _scored_log_probs(model, window, first)
        targets = window[first + 1:]
        nll = -log_probs.gather(1, targets[:, None])[:, 0]
        sum_nll += float(nll.sum())
        sum_nll2 += float((nll * nll).sum())
        if base is not None:
            base_lp = _scored_log_probs(base, window, first)
            if base_lp.shape != log_probs.shape:
                raise VerificationError(f"{model_dir} has {log_probs.shape[1]} logits, base {base_model_dir} "
                                        f"{base_lp.shape[1]}: not the same vocabulary")
            kld_values.append((base_lp.exp() * (base_lp - log_probs)).sum(dim=-1))
            same_top += int((base_lp.argmax(dim=-1) == log_probs.argmax(dim=-1)).sum())
        now = time.perf_counter()
        if now - last_report > PROGRESS_SECONDS:
            rate = (i + 1) / (now - start)
            log.info("scoring %s: chunk %d/%d, %.2f chunks/s, ETA %.0fs", model_dir.name, i + 1, n_chunks, rate,
                     (n_chunks - i - 1) / rate)
            last_report = now
    count = n_chunks * scored_per_chunk(ctx)
    ppl, ppl_err = ppl_and_err(sum_nll, sum_nll2, count)
    printed = {"ppl": f"{ppl:.6f}", "ppl_err": f"{ppl_err:.6f}"}
    kld_mean = kld_err = kld_p99 = kld_p999 = same_pct = None
    if base is not None:
        values = torch.cat(kld_values)
        kld_mean = float(values.mean())
        var = float((values * values).mean()) - kld_mean * kld_mean
        kld_err = math.sqrt(var / (count - 1)) if var > 0 and count > 10 else 0.0
        ordered = values.sort().values.tolist()
        kld_p99, kld_p999 = percentile(ordered, 0.99), percentile(ordered, 0.999)
        same_pct = 100.0 * same_top / count
        printed |= {"kld_mean": f"{kld_mean:.6f}", "kld_mean_err": f"{kld_err:.6f}", "kld_p99": f"{kld_p99:.6f}",
                    "kld_p999": f"{kld_p999:.6f}", "same_top_pct": f"{same_pct:.3f}"}
    seconds = time.perf_counter() - start
    log.info("scored %s in torch: PPL %s over %d tokens (%d chunks) in %.1fs", model_dir, printed["ppl"], count,
             n_chunks, seconds)
    return Score(backend=BACKEND, ppl=ppl, ppl_err=ppl_err, kld_mean=kld_mean, kld_mean_err=kld_err, kld_p99=kld_p99,
                 same_top_pct=same_pct, n_tokens=count, n_chunks=n_chunks, ctx=ctx, seconds=round(seconds, 3),
                 printed=printed, kld_p999=kld_p999,
                 chunk_kld=[round(float(v.mean()), 6) for v in kld_values] if base is not None else None)


def bench_hf(*, model_dir: Path, gen_tokens: int = 32, reps: int = 1, device: str = "cpu",
             trust_remote_code: bool = False, threads: int | None = None) -> dict:
    """Greedy generation tokens/s of a checkpoint in transformers (the kernel GPTQModel picks on this
    machine: its torch kernels on CPU), with ``threads`` torch threads when given (the count the store
    key holds). Prompt processing is not measured here."""
    import torch

    if threads is not None and threads != torch.get_num_threads():
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return bench_hf(model_dir=model_dir, gen_tokens=gen_tokens, reps=reps, device=device,
                            trust_remote_code=trust_remote_code)
        finally:
            torch.set_num_threads(saved)
    model, tokenizer = load_causal_lm(model_dir, device=device, trust_remote_code=trust_remote_code)
    prompt = tokenizer("The quick brown fox", return_tensors="pt").to(device)
    rates = []
    with torch.inference_mode():
        model.generate(**prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
        for _ in range(reps):
            start = time.perf_counter()
            out = model.generate(**prompt, max_new_tokens=gen_tokens, min_new_tokens=gen_tokens, do_sample=False)
            new = out.shape[1] - prompt["input_ids"].shape[1]
            rates.append(new / (time.perf_counter() - start))
    return {"tg_tokens_per_s": sum(rates) / len(rates), "gen_tokens": gen_tokens, "reps": reps,
            "threads": torch.get_num_threads(), "backend": f"transformers ({device})"}


def write_base_logits(*, model_dir: Path, conversations: list, spec, n_vocab: int,
                      gguf_adds_bos: bool | None, out: Path, device: str = "cpu", trust_remote_code: bool = False) -> dict:
    """The HF checkpoint's log-probs over a chat set's windows (quantkit.scoring.chat), as a ``--kl-divergence-base`` file that
    ``llama-perplexity --kl-divergence`` reads (tokens from it, not from text). ``n_vocab`` and
    ``gguf_adds_bos`` are the base GGUF's (what llama-perplexity checks and substitutes): the windows put BOS
    first as the tokenizer does (so torch scores cut the same windows), refused if the GGUF says otherwise."""
    import torch

    from quantkit.scoring.chat import chat_windows, render_tokens

    model, tokenizer = load_causal_lm(model_dir, device=device, trust_remote_code=trust_remote_code)
    chat = render_tokens(tokenizer, conversations)
    add_bos = tokenizer_adds_bos(tokenizer)
    if gguf_adds_bos is not None and gguf_adds_bos != add_bos:
        raise VerificationError(f"the GGUF {'adds' if gguf_adds_bos else 'does not add'} BOS and the checkpoint's "
                                f"tokenizer {'does' if add_bos else 'does not'}: the chat windows would differ")
    bos = tokenizer.bos_token_id if add_bos else None
    windows, raw = chat_windows(chat.ids, spec, bos=bos)
    n_chunks, ctx = windows.shape
    first = ctx // 2
    sum_nll = 0.0
    with open(out, "wb") as f:
        f.write(LOGITS_MAGIC + struct.pack("<iii", ctx, n_vocab, n_chunks))
        f.write(raw.to(torch.int32).numpy().astype("<i4").tobytes())
        for window in windows:
            with torch.inference_mode():
                logits = model(input_ids=window[None].to(model.device)).logits[0, first:-1].float().cpu()
            if logits.shape[1] < n_vocab:
                raise VerificationError(f"the checkpoint has {logits.shape[1]} logits, the GGUF {n_vocab} tokens")
            logits = logits[:, :n_vocab]  # a padded embedding's extra rows are no tokens
            lp = torch.log_softmax(logits.double(), dim=-1)
            sum_nll -= float(lp.gather(1, window[first + 1:, None])[:, 0].sum())
            f.write(quantized_rows(logits))
    count = n_chunks * scored_per_chunk(ctx)
    log.info("chat base logits: %d conversations (%d with tools left out), %d tokens, %d chunks of %d, base PPL %.4f",
             chat.conversations, chat.skipped_tools, len(chat.ids), n_chunks, ctx, math.exp(sum_nll / count))
    return {"conversations": chat.conversations, "skipped_tools": chat.skipped_tools, "tokens": len(chat.ids),
            "n_chunks": n_chunks, "ctx": ctx, "add_bos": add_bos, "base_ppl": math.exp(sum_nll / count)}
