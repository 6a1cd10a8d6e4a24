"""Calibration samples for GPTQ/AWQ: fixed-length token windows cut from the calibration text.

The windows are chosen by a seeded ``random.Random``, never the global RNG, so the same
text, tokenizer, count, length and seed give the same windows on every machine. The
offsets are a pure function (``window_offsets``) that a step can record next to its
output, and ``samples_digest`` names the exact token ids that went in.
"""

from __future__ import annotations

import logging
import random

from quantkit.digest import digest_of
from quantkit.errors import QuantkitError

log = logging.getLogger(__name__)


class CalibrationTooShortError(QuantkitError, ValueError):
    """The calibration text has fewer tokens than one window."""

    tip = "lower seq_len in the recipe, or add calibration text"

    def __init__(self, tokens: int, seq_len: int):
        self.tokens = tokens
        self.seq_len = seq_len
        super().__init__(tokens, seq_len)

    def __str__(self) -> str:
        return f"calibration text is {self.tokens} tokens, shorter than one window of seq_len {self.seq_len}"


def window_offsets(*, tokens: int, samples: int, seq_len: int, seed: int) -> list[int]:
    """Start offsets of ``samples`` windows of ``seq_len`` tokens in a stream of ``tokens``, sorted.

    Distinct offsets when the text has enough of them; otherwise some repeat.
    """
    if tokens < seq_len:
        raise CalibrationTooShortError(tokens, seq_len)
    rng = random.Random(seed)
    starts = tokens - seq_len + 1
    if samples <= starts:
        chosen = rng.sample(range(starts), samples)
    else:
        chosen = [rng.randrange(starts) for _ in range(samples)]
    return sorted(chosen)


def calibration_samples(*, tokenizer, text: str, samples: int, seq_len: int, seed: int) -> list[list[int]]:
    """``samples`` windows of ``seq_len`` token ids from ``text``, chosen with ``seed``.

    The text is tokenized once, without special tokens, so a window can start anywhere.
    """
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # longer than a context on purpose
    return choose_windows(ids, samples=samples, seq_len=seq_len, seed=seed)[1]


def choose_windows(ids: list[int], *, samples: int, seq_len: int, seed: int) -> tuple[list[int], list[list[int]]]:
    """The chosen offsets (to record) and the windows of ``ids`` they start."""
    offsets = window_offsets(tokens=len(ids), samples=samples, seq_len=seq_len, seed=seed)
    log.debug("calibration windows (seed %d, %d tokens): %s", seed, len(ids), offsets)
    return offsets, [list(ids[o : o + seq_len]) for o in offsets]


def samples_digest(windows: list[list[int]]) -> str:
    """Digest of the token ids fed to the quantizer: two runs calibrated alike iff equal."""
    return digest_of(windows)
