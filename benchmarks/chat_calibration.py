"""Does a chat-rendered imatrix lower KLD on the chat set without raising it on prose? (issue #26)

Compares two finished runs of one model that differ only in ``calibration.conversations`` (the same base,
the same types, the same evaluation sets), variant by variant and set by set: mean KLD of each, and their
difference paired chunk by chunk (every variant is scored on the same chunks of the same tokens against the
same reference), with its standard error over the chunks. Prints a markdown table for benchmarks/README.md.

    python benchmarks/chat_calibration.py runs/tiny-cal-text/manifest.json runs/tiny-cal-chat/manifest.json
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def _sets(variant: dict) -> dict[str, dict]:
    return (variant.get("scores") or {}).get("sets") or {}


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of b - a over chunks and its standard error."""
    d = [y - x for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))


def compare(text_manifest: dict, chat_manifest: dict) -> list[str]:
    text = {v["label"]: v for v in text_manifest["variants"]}
    out = ["| type | set | mean KLD, text imatrix | mean KLD, text + chat imatrix | chat − text (paired over chunks) "
           "| SE | sigmas |", "|---|---|---:|---:|---:|---:|---:|"]
    for v in chat_manifest["variants"]:
        a = text.get(v["label"])
        if a is None or v["format"] != "gguf" or v["label"] == "F16":
            continue
        for name, sc in _sets(v).items():
            ref = _sets(a).get(name)
            if not ref or not sc.get("chunk_kld") or not ref.get("chunk_kld"):
                continue
            diff, se = paired(ref["chunk_kld"], sc["chunk_kld"])
            out.append(f"| {v['label']} | {name} | {ref['kld_mean']:.5f} ± {ref['kld_mean_err']:.5f} | "
                       f"{sc['kld_mean']:.5f} ± {sc['kld_mean_err']:.5f} | {diff:+.5f} | {se:.5f} | "
                       f"{diff / se if se else float('nan'):+.1f} |")
    return out


if __name__ == "__main__":
    a, b = (json.loads(Path(p).read_text()) for p in sys.argv[1:3])
    print("\n".join(compare(a, b)))
