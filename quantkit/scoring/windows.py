"""Step 5 (shared part): what a score is and which tokens it covers.

Every variant, GGUF or Hugging Face, is scored on the same held-out tokens in
the same windows, so the numbers sit in one table. The windows are
llama-perplexity's (tools/perplexity/perplexity.cpp, pinned commit):

- the whole text is tokenized once, with the model's BOS if its vocabulary
  adds one (``common_tokenize(ctx, text, add_special=true)``; one trailing
  newline of the file is dropped first, as ``-f`` does);
- the tokens are cut into ``n_chunks`` back-to-back chunks of ``ctx`` tokens
  (the tail that does not fill a chunk is not used);
- each chunk is evaluated from an empty cache; if the vocabulary adds BOS, the
  chunk's first token is replaced by BOS;
- only the second half is scored: positions ``ctx//2 .. ctx-2`` predict
  tokens ``ctx//2+1 .. ctx-1``, i.e. ``ctx - 1 - ctx//2`` tokens per chunk.

GGUF scoring lives in ``evaluate_gguf``, torch scoring in ``evaluate_torch``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quantkit.recipe import Evaluation

LOGITS_MAGIC = b"_logits_"


def read_eval_text(path: Path) -> str:
    """The text exactly as ``llama-perplexity -f`` sees it (one trailing newline dropped)."""
    text = Path(path).read_bytes().decode("utf-8", errors="replace")
    return text[:-1] if text.endswith("\n") else text


def max_chunks(spec: Evaluation) -> int:
    """Chunks the recipe allows (``--chunks``); the text may give fewer."""
    return max(1, spec.max_tokens // spec.ctx)


def scored_per_chunk(ctx: int) -> int:
    return ctx - 1 - ctx // 2


def base_logits_bytes(*, n_ctx: int, n_chunks: int, n_vocab: int) -> int:
    """Exact size of llama-perplexity's ``--kl-divergence-base`` file.

    Layout: ``_logits_``, int32 n_ctx, int32 n_vocab, int32 n_chunk, the
    n_chunk*n_ctx int32 tokens, then for every scored position a row of
    ``nv = 2*((n_vocab+1)//2) + 4`` uint16 (two floats: scale and minimum
    log-prob, then the vocab's log-probs quantized to 16 bits). Only the scored
    half of each chunk is stored, so it is about n_chunks*ctx/2*n_vocab*2 bytes.
    """
    nv = 2 * ((n_vocab + 1) // 2) + 4
    return len(LOGITS_MAGIC) + 12 + 4 * n_chunks * n_ctx + 2 * nv * n_chunks * scored_per_chunk(n_ctx)


def estimate_base_logits_bytes(spec: Evaluation, *, n_vocab: int) -> int:
    """Upper bound of the base logits' disk use for the plan (the text may give fewer chunks)."""
    return base_logits_bytes(n_ctx=spec.ctx, n_chunks=max_chunks(spec), n_vocab=n_vocab)


@dataclass(frozen=True)
class LogitsHeader:
    n_ctx: int
    n_vocab: int
    n_chunks: int
    tokens: tuple[int, ...]  # n_chunks * n_ctx, as llama.cpp tokenized the text (BOS not yet substituted)


def read_logits_header(path: Path) -> LogitsHeader:
    """Header and tokens of a ``--kl-divergence-base`` file (what llama.cpp tokenized)."""
    import struct

    with open(path, "rb") as f:
        if f.read(8) != LOGITS_MAGIC:
            raise ValueError(f"{path} is not a llama-perplexity logits file")
        n_ctx, n_vocab, n_chunks = struct.unpack("<iii", f.read(12))
        raw = f.read(4 * n_ctx * n_chunks)
    return LogitsHeader(n_ctx, n_vocab, n_chunks, struct.unpack(f"<{n_ctx * n_chunks}i", raw))


@dataclass(frozen=True)
class Score:
    """One variant's quality on the held-out text. KLD fields are None when no base was given.

    ``printed`` keeps llama-perplexity's own strings (its printed precision) for
    the numbers above; torch scores fill it with the same format.
    """

    backend: str  # "llama-perplexity" or "torch"
    ppl: float
    ppl_err: float  # ± one standard error, as llama-perplexity computes it
    kld_mean: float | None
    kld_mean_err: float | None
    kld_p99: float | None
    same_top_pct: float | None
    n_tokens: int  # scored tokens
    n_chunks: int
    ctx: int
    seconds: float
    printed: dict[str, str] = field(default_factory=dict, hash=False)
    kld_p999: float | None = None  # the 99.9th percentile (llama-perplexity prints it; scores before #26 lack it)
    set_info: dict | None = None  # a chat set: conversations rendered, left out (tools), tokens
    chunk_kld: list[float] | None = None  # each chunk's mean KLD, for paired per-chunk tests between variants

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Speed:
    """llama-bench throughput of one GGUF on this machine."""

    pp_tokens_per_s: float
    pp_stddev: float
    tg_tokens_per_s: float
    tg_stddev: float
    prompt_tokens: int
    gen_tokens: int
    reps: int
    threads: int
    backend: str  # llama-bench's "backends" field, e.g. "CPU"
    cpu: str
    repack: bool = True  # False when the CPU's repacked weight path crashed and was turned off

    def to_dict(self) -> dict:
        return asdict(self)


def ppl_and_err(sum_nll: float, sum_nll2: float, count: int) -> tuple[float, float]:
    """Perplexity and its ± as llama-perplexity computes them from summed -log p and its square."""
    mean = sum_nll / count
    var = sum_nll2 / count - mean * mean
    ppl = math.exp(mean)
    err = math.sqrt(var / (count - 1)) * ppl if var > 0 and count > 1 else 0.0
    return ppl, err


def percentile(sorted_values, fraction: float) -> float:
    """llama-perplexity's percentile: linear interpolation over sorted values."""
    n = len(sorted_values)
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = fraction * (n - 1)
    i = int(p)
    p -= i
    return float((1 - p) * sorted_values[i] + p * sorted_values[min(i + 1, n - 1)])


def quantized_rows(logits) -> bytes:
    """llama-perplexity's ``log_softmax(..., uint16_t * log_prob, ...)`` for each row of float32 logits: two
    floats (scale, minimum log-prob), then each logit above max-16 quantized to 16 bits; rows padded to nv."""
    import numpy as np

    x = logits.float().numpy()
    n, vocab = x.shape
    nv = 2 * ((vocab + 1) // 2) + 4
    mx = x.max(axis=1)
    mn = np.maximum(x.min(axis=1), mx - 16).astype(np.float32)
    lse = np.log(np.exp((x - mx[:, None]).astype(np.float64)).sum(axis=1)).astype(np.float32)
    scale = ((mx - mn) / np.float32(65535.0)).astype(np.float32)
    rows = np.zeros((n, nv), dtype="<u2")
    head = np.stack([scale, (mn - mx - lse).astype(np.float32)], axis=1).astype("<f4")
    rows[:, :4] = head.view("<u2").reshape(n, 4)
    inv = np.where(scale > 0, 1 / np.where(scale > 0, scale, 1), 0).astype(np.float32)
    # nearest_int in perplexity.cpp rounds half to even, as np.rint does
    q = np.rint(inv[:, None] * (x - mn[:, None])).clip(0, 65535)
    rows[:, 4:4 + vocab] = np.where(x > mn[:, None], q, 0).astype("<u2")
    return rows.tobytes()
