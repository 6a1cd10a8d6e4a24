"""Write calibration/tasks/finish-the-sentence/items.jsonl from the held-out evaluation text.

Each item is one sentence of ``calibration/eval/en-prose-heldout.txt`` (CPython's documentation prose,
PSF licence, never used for calibration): the context is the sentence before it and the sentence's
first words; the choices are its real last words and three wrong endings, the last words of other
sentences from the same few paragraphs (the same topic), of about the same length, chosen by the words
they share with the context. A model has to follow the text to pick the real ending: harder than
which-word-fits (at ceiling for SmolLM2-135M), so quantization losses show. On the demo model,
llama-perplexity's acc_token_norm: Q8_0 0.803, Q2_K 0.755 over the 371 items, paired difference
0.049 ± 0.016 (3.0 standard errors).

Deterministic (seeded; tests/test_tasks.py checks the file is what this writes); run it again after
changing the held-out text, and update calibration/README.md:

    .venv/bin/python scripts/make_finish_the_sentence.py
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "calibration" / "eval" / "en-prose-heldout.txt"
OUT = ROOT / "calibration" / "tasks" / "finish-the-sentence" / "items.jsonl"
ENDING_WORDS = (4, 7)  # length of the ending to pick, in words
MIN_WORDS = 12  # shorter sentences leave too little context
SEED = 20261128
NEAR = 2  # wrong endings come from paragraphs at most this far away

SENTENCE_END = re.compile(r"(?<=[.:])\s+(?=[A-Z\"])")


def sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(paragraph) if s.strip()]


def make_items() -> list[dict]:
    rng = random.Random(SEED)
    paragraphs = [p.strip() for p in TEXT.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    cut: list[tuple[int, str, str, int]] = []  # (paragraph, context, ending, words in the ending)
    seen: set[str] = set()
    for i, para in enumerate(paragraphs):
        prev = ""
        for s in sentences(para):
            words = s.split()
            if len(words) >= MIN_WORDS and s not in seen:
                seen.add(s)
                k = rng.randint(*ENDING_WORDS)
                head = " ".join(words[:-k])
                cut.append((i, f"{prev} {head}".strip(), " ".join(words[-k:]), k))
            prev = s
    items = []
    for n, (para, context, ending, k) in enumerate(cut):
        # wrong endings from the same few paragraphs (the same topic), of about the same length
        pool = sorted({e for p, _, e, kk in cut if abs(p - para) <= NEAR and abs(kk - k) <= 1 and e != ending})
        if len(pool) < 3:
            continue
        # the hardest of them by a measure no model decides: most words shared with the context
        seen_words = set(context.lower().split())
        pool.sort(key=lambda e: (-len(seen_words & set(e.lower().split())), rng.random()))
        choices = pool[:3]
        gold = n % 4  # the real ending's position rotates, so position bias cannot score
        choices.insert(gold, ending)
        items.append({"id": f"fts-{len(items):03d}", "question": context, "choices": choices, "answer": gold})
    return items


def main(out: Path = OUT) -> None:
    items = make_items()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    print(f"{len(items)} items -> {out}")


if __name__ == "__main__":
    main()
