"""Size-budget search (gguf.targets) against the stock llama-quantize types, at equal or smaller size.

For each model (the demo's SmolLM2-135M and the tests' tiny Llama):

1. `quantkit run` of a recipe with the stock types Q4_K_M, Q3_K_M and IQ4_XS (one imatrix for all),
   scored on the held-out text (calibration/eval/en-prose-heldout.txt; EVAL_TOKENS of it).
2. The same recipe plus one target per stock type, `size_gib` = that stock file's size, so the searched
   GGUF is equal or smaller. Stock variants, the imatrix and the base logits' windows are shared.
3. A paired test per pair: llama-perplexity prints the running mean KLD after every chunk (ctx tokens,
   second half scored, the same tokens for every variant); each chunk's own mean is recovered from
   consecutive running means, and the per-chunk differences (searched - stock) give a mean difference
   and its standard error. A win is a mean difference below zero by more than 3 standard errors.

The search's time is what a cold store pays for it (every sensitivity table, the KLD check per tensor
group, the mix with its --dry-run), printed beside one stock quantization's (Q4_K_M) time.

    nice -n 10 .venv/bin/python benchmarks/budget_search.py [--model demo|tiny|moe|both] [--workdir DIR]

The store is $QUANTKIT_STORE (default ~/.cache/quantkit/store): a second invocation reuses everything.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quantkit.cli import main as quantkit_main  # noqa: E402
from quantkit.publish.report import paired_difference  # noqa: E402
from quantkit.store import default_store_root  # noqa: E402

GIB = 2**30
STOCK = ("Q4_K_M", "Q3_K_M", "IQ4_XS")
CALIBRATION = {"demo": ["calibration/en-prose.txt", "calibration/code-python.txt", "calibration/ja-prose.txt"],
               "tiny": ["calibration/en-prose.txt", "calibration/code-python.txt"],
               "moe": ["calibration/en-prose.txt", "calibration/code-python.txt"]}
IMATRIX = {"demo": "{enabled: true, ctx: 512, chunks: 32}", "tiny": "{enabled: true, ctx: 128, chunks: 16}",
           "moe": "{enabled: true, ctx: 128, chunks: 16}"}
# as the demo recipe and the tests; "moe" is tests/tinymoe.py's Mixtral (4 routed experts, 2 per token)
MODEL_NAME = {"demo": "SmolLM2-135M-Instruct", "tiny": "tiny-llama", "moe": "tiny-mixtral"}
EVAL_CTX = {"demo": 256, "tiny": 128, "moe": 128}
# Scored tokens: the demo model costs ~10 s per 1k tokens per variant on a busy 2-core machine.
EVAL_TOKENS = {"demo": 8192, "tiny": 16384, "moe": 16384}
CHUNK_LINE = re.compile(r"^\s*(\d+)\s+[-\d.]+ ±\s+[-\d.]+\s+[-\d.]+ ±\s+[-\d.]+\s+([-\d.]+) ±\s+[-\d.]+")


def model_folder(which: str) -> Path:
    if which == "demo":
        path = REPO / "models" / "smollm2-135m-instruct"
        if not (path / "config.json").is_file():
            raise SystemExit("the demo model is missing: run `.venv/bin/quantkit demo-model` first")
        return path
    sys.path.insert(0, str(REPO / "tests"))
    from tests.tinyllama import build_tiny_llama, source_digest

    cache = Path(os.environ.get("QUANTKIT_TEST_CACHE", Path.home() / ".cache" / "quantkit-tests"))
    dest = cache / f"tiny-llama-{source_digest()}"
    if not (dest / "config.json").exists():
        build_tiny_llama(dest)
    if which == "moe":
        import tinymoe

        llama, dest = dest, cache / f"tiny-mixtral-moe-{tinymoe.source_digest('mixtral')}"
        if not (dest / "config.json").exists():
            tinymoe.build_tiny_moe(dest, family="mixtral", tokenizer_from=llama)
    return dest


def project(which: str, workdir: Path) -> Path:
    """A project folder with the model (hard links) and the calibration texts."""
    root = workdir / which
    if not (root / "models" / "m" / "config.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        (root / "recipes").mkdir(parents=True)
        shutil.copytree(REPO / "calibration", root / "calibration")
        shutil.copytree(model_folder(which), root / "models" / "m", copy_function=os.link)
    return root


def recipe(which: str, targets: dict[str, int] | None) -> str:
    lines = [f"name: budget-{which}", "model:", "  path: models/m", f"  name: {MODEL_NAME[which]}", "calibration:",
             f"  files: [{', '.join(CALIBRATION[which])}]", "evaluation:",
             "  file: calibration/eval/en-prose-heldout.txt", f"  ctx: {EVAL_CTX[which]}",
             f"  max_tokens: {EVAL_TOKENS[which]}", "  bench: false", "gguf:", "  base_type: f16",
             f"  imatrix: {IMATRIX[which]}", f"  types: [{', '.join(STOCK)}]"]
    if targets:
        lines.append("  targets:")
        lines += [f"    - {{size_gib: {size / GIB!r}, label: match-{t}}}" for t, size in targets.items()]
    return "\n".join(lines) + "\n"


def run(root: Path, text: str) -> dict:
    path = root / "recipes" / "bench.yaml"
    path.write_text(text)
    if quantkit_main(["-q", "run", "--no-publish", str(path)]) != 0:
        raise SystemExit(f"quantkit run failed for {path}")
    name = text.splitlines()[0].split(": ", 1)[1]
    return json.loads((root / "runs" / name / "manifest.json").read_text())


def chunk_klds(log_text: str) -> list[float]:
    """Each chunk's mean KLD from llama-perplexity's running means (equal tokens per chunk)."""
    running = {}
    for line in log_text.splitlines():
        m = CHUNK_LINE.match(line)
        if m:
            running[int(m.group(1))] = float(m.group(2))
    n = max(running) if running else 0
    if sorted(running) != list(range(1, n + 1)):
        raise SystemExit("llama-perplexity's per-chunk lines are incomplete")
    return [i * running[i] - (i - 1) * running[i - 1] if i > 1 else running[1] for i in range(1, n + 1)]


def bench(which: str, workdir: Path) -> str:
    root = project(which, workdir)
    stock = run(root, recipe(which, None))
    by_label = {v["label"]: v for v in stock["variants"]}
    sizes = {t: by_label[t]["files"]["model.gguf"]["size"] for t in STOCK}
    full = run(root, recipe(which, sizes))
    store = Path(os.environ.get("QUANTKIT_STORE") or default_store_root())
    steps = {s["step"]: s for s in full["steps"]}
    rows = {v["label"]: v for v in full["variants"]}
    params = rows[STOCK[0]]["info"]["gguf"]["parameters"]

    def per_chunk(label: str) -> list[float]:
        key = steps[f"score-gguf:{label}"]["key"]
        return chunk_klds((store / "score-gguf" / key / "llama-perplexity.log").read_text(errors="replace"))

    def entry_seconds(step: str, name: str) -> float:
        return json.loads((store / step / steps[name]["key"] / "entry.json").read_text())["info"].get("seconds", 0.0)

    out = [f"### {which}: {full['model'].get('path')}, {params:,} weights, "
           f"{len(per_chunk(STOCK[0]))} chunks of {EVAL_CTX[which]} tokens", "",
           "| variant | size MiB | bpw | mean KLD ± SE | p99 KLD | same top % | searched − stock (paired) | verdict |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
    for t in STOCK:
        for label in (t, f"match-{t}"):
            v = rows[label]
            s = v["scores"]
            size = v["files"]["model.gguf"]["size"]
            cells = [label, f"{size / 2**20:.2f}", f"{size * 8 / params:.3f}",
                     f"{s['kld_mean']:.5f} ± {s['kld_mean_err']:.5f}", f"{s['kld_p99']:.4f}",
                     f"{s['same_top_pct']:.2f}"]
            if label == t:
                cells += ["", ""]
            else:
                mean, se = paired_difference(per_chunk(label), per_chunk(t))
                verdict = ("**win**" if mean < 0 and -mean > 3 * se else
                           "loss" if mean > 0 and mean > 3 * se else "no significant difference")
                cells += [f"{mean:+.5f} ± {se:.5f} ({mean / se:+.1f} SE)", verdict]
            out.append("| " + " | ".join(cells) + " |")
    tables = sum(entry_seconds("sensitivity", n) for n in steps if n.startswith("sensitivity:"))
    kld = entry_seconds("sensitivity-kld", "sensitivity-kld")
    mixes = [entry_seconds("mix", n) for n in steps if n.startswith("mix:")]
    stock_q = entry_seconds("quantize", f"quantize:{STOCK[0]}")
    out += ["", f"Search cost (cold store): sensitivity tables {tables:.1f} s (all candidate types), KLD check per "
            f"tensor group {kld:.1f} s, mix search + --dry-run {sum(mixes) / max(len(mixes), 1):.1f} s per target; "
            f"total {tables + kld + sum(mixes):.1f} s for {len(mixes)} targets, against {stock_q:.1f} s for one "
            f"stock quantization ({STOCK[0]}). Every mix's GGUF then costs one more quantization."]
    calib = json.loads((store / "sensitivity-kld" / steps["sensitivity-kld"]["key"] / "calibration.json").read_text())
    out += ["", f"Proxy check (calibration text, {calib['chunks']} chunks of {calib['ctx']}): all tensors "
            f"{calib['reference_type']} gives KLD {calib['reference']['kld_mean']:.5f}; one group at {calib['probe']}, "
            "the rest at q8_0:", "", "| group | tensors | proxy error | KLD | KLD − reference | factor (KLD per proxy unit) |",
            "|---|---:|---:|---:|---:|---:|"]
    out += [f"| {g} | {v['tensors']} | {v['proxy']:.4g} | {v['kld_mean']:.5f} ± {v['kld_mean_err']:.5f} | "
            f"{v['kld_delta']:+.5f} | {v['factor']:.3g}{' (median)' if v.get('note') else ''} |"
            for g, v in calib["groups"].items()]
    mix_info = {label: rows[label]["info"]["mix"]["type_counts"] for label in rows if label.startswith("match-")}
    out += ["", "Types chosen (tensor count per type): " +
            "; ".join(f"{k}: {', '.join(f'{n}x{t}' for t, n in v.items())}" for k, v in mix_info.items())]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("demo", "tiny", "moe", "both"), default="both")
    ap.add_argument("--workdir", type=Path, default=REPO / ".quantkit" / "bench-budget")
    args = ap.parse_args()
    for which in (("tiny", "demo") if args.model == "both" else (args.model,)):
        print(bench(which, args.workdir), flush=True)
        print()


if __name__ == "__main__":
    main()
