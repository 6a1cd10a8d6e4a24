"""Size-budget search (gguf.targets) against the stock llama-quantize types, at equal or smaller size.

For each model (the demo's SmolLM2-135M, the tests' tiny Llama, and a held-out model the search was not
developed on: random-init, briefly trained here, a large tied embedding, never committed):

1. `quantkit run` of a recipe with the stock types Q4_K_M, Q3_K_M and IQ4_XS (one imatrix for all),
   scored on the held-out text (calibration/eval/en-prose-heldout.txt; EVAL_TOKENS of it).
2. The same recipe plus one target per stock type, `size_gib` = that stock file's size, so the searched
   GGUF is equal or smaller. Stock variants, the imatrix and the base logits' windows are shared.
3. A paired test per pair: llama-perplexity prints the running mean KLD after every chunk (ctx tokens,
   second half scored, the same tokens for every variant); each chunk's own mean is recovered from
   consecutive running means, and the per-chunk differences (searched - stock) give a mean difference
   and its standard error. A win is a mean difference below zero by more than 3 standard errors.

The search's time is what a cold store pays for it (every sensitivity table, the KLD per role and probe
type, the mix with its closed-loop check and --dry-run), printed beside one stock Q4_K_M quantization plus its
scoring, timed in the same invocation twice (before the search, and again after it with those two entries
removed), with the load average at each.

    nice -n 10 .venv/bin/python benchmarks/budget_search.py [--model demo|tiny|heldout|moe|all] [--workdir DIR]

The store is $QUANTKIT_STORE (default ~/.cache/quantkit/store): a second invocation reuses everything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quantkit.cli import main as quantkit_main  # noqa: E402
from quantkit.publish.stats import paired_difference  # noqa: E402
from quantkit.store import default_store_root  # noqa: E402

GIB = 2**30
MODELS = ("tiny", "demo", "heldout")
STOCK = ("Q4_K_M", "Q3_K_M", "IQ4_XS")
CALIBRATION = {"demo": ["calibration/en-prose.txt", "calibration/code-python.txt", "calibration/ja-prose.txt"],
               "tiny": ["calibration/en-prose.txt", "calibration/code-python.txt"],
               "heldout": ["calibration/en-prose.txt", "calibration/code-python.txt", "calibration/ja-prose.txt"],
               "moe": ["calibration/en-prose.txt", "calibration/code-python.txt"]}
IMATRIX = {"demo": "{enabled: true, ctx: 512, chunks: 32}", "tiny": "{enabled: true, ctx: 128, chunks: 16}",
           "heldout": "{enabled: true, ctx: 256, chunks: 32}", "moe": "{enabled: true, ctx: 128, chunks: 16}"}
# "moe" is tests/tinymoe.py's Mixtral (4 routed experts, 2 per token)
MODEL_NAME = {"demo": "SmolLM2-135M-Instruct", "tiny": "tiny-llama", "heldout": "heldout-tied", "moe": "tiny-mixtral"}
EVAL_CTX = {"demo": 256, "tiny": 128, "heldout": 128, "moe": 128}
# Scored tokens: the demo model costs ~10 s per 1k tokens per variant on a busy 2-core machine.
EVAL_TOKENS = {"demo": 8192, "tiny": 16384, "heldout": 16384, "moe": 16384}
CHUNK_LINE = re.compile(r"^\s*(\d+)\s+[-\d.]+ ±\s+[-\d.]+\s+[-\d.]+ ±\s+[-\d.]+\s+([-\d.]+) ±\s+[-\d.]+")


def heldout_model(dest: Path) -> Path:
    """A shape the search was not developed on: Llama, 3 layers of width 256 (K-quants everywhere), a
    12288-token vocabulary in a tied embedding that holds about 64 % of the weights; random init, then
    200 steps on the calibration texts (tests/tinyllama.py's recipe with another config). Never committed."""
    if (dest / "config.json").is_file():
        return dest
    sys.path.insert(0, str(REPO / "tests"))
    import tempfile

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import tests.tinyllama as tl

    tl.VOCAB_SIZE, tl.TRAIN_STEPS, tl.BATCH_SIZE = 12288, 200, 8
    work = Path(tempfile.mkdtemp(prefix="heldout-"))
    sp = tl._train_sentencepiece(work)
    torch.manual_seed(1234)
    config = LlamaConfig(vocab_size=tl.VOCAB_SIZE, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=tl.BOS_ID, eos_token_id=tl.EOS_ID, dtype="float32")
    model = LlamaForCausalLM(config)
    tl._train(model, tl._token_stream(sp), seed=1234)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    shutil.copy(sp, tmp / "tokenizer.model")
    tl._save_hf_tokenizer(tmp)
    tmp.rename(dest)
    shutil.rmtree(work, ignore_errors=True)
    return dest


def model_folder(which: str, workdir: Path) -> Path:
    if which == "heldout":
        return heldout_model(workdir / "heldout-model")
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
        shutil.copytree(model_folder(which, workdir), root / "models" / "m", copy_function=os.link)
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
    # The run's manifest:/reused:/built: lines go to stderr: stdout is the Markdown pasted into the README, and
    # they would land under the previous model's heading (each model's runs print before its section).
    with contextlib.redirect_stdout(sys.stderr):
        code = quantkit_main(["-q", "run", "--no-publish", str(path)])
    if code != 0:
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


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def bench(which: str, workdir: Path) -> str:
    root = project(which, workdir)
    store = Path(os.environ.get("QUANTKIT_STORE") or default_store_root())
    load_before = load()
    stock = run(root, recipe(which, None))
    by_label = {v["label"]: v for v in stock["variants"]}
    sizes = {t: by_label[t]["files"]["model.gguf"]["size"] for t in STOCK}
    first = {s["step"]: s for s in stock["steps"]}

    def stock_seconds(steps: dict) -> float:
        total = 0.0
        for node, step in (("quantize", "quantize"), ("score-gguf", "score-gguf")):
            info = json.loads((store / step / steps[f"{node}:{STOCK[0]}"]["key"] / "entry.json").read_text())["info"]
            total += info.get("seconds", (info.get("score") or {}).get("seconds", 0.0))
        return total

    stock_before = stock_seconds(first)
    load_search = load()
    full = run(root, recipe(which, sizes))
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
            elif v["info"]["mix"].get("fallback"):
                cells += ["0 (the same file)", f"stock {v['info']['mix']['fallback']['stock']} (fallback)"]
            else:
                mean, se = paired_difference(per_chunk(label), per_chunk(t))
                verdict = ("**win**" if mean < 0 and -mean > 3 * se else
                           "loss" if mean > 0 and mean > 3 * se else "no significant difference")
                cells += [f"{mean:+.5f} ± {se:.5f} ({mean / se:+.1f} SE)", verdict]
            out.append("| " + " | ".join(cells) + " |")
    tables = sum(entry_seconds("sensitivity", n) for n in steps if n.startswith("sensitivity:"))
    kld = entry_seconds("sensitivity-kld", "sensitivity-kld")
    mixes = [entry_seconds("mix", n) for n in steps if n.startswith("mix:")]
    # The stock Q4_K_M quantization and its scoring once more, after the search, on the same machine.
    load_after = load()
    for node, step in (("quantize", "quantize"), ("score-gguf", "score-gguf")):
        shutil.rmtree(store / step / first[f"{node}:{STOCK[0]}"]["key"])
    again = {s["step"]: s for s in run(root, recipe(which, None))["steps"]}
    stock_after = stock_seconds(again)
    stock_ref = (stock_before + stock_after) / 2
    first_search = tables + kld + mixes[0]
    out += ["", f"Search cost (cold store): sensitivity tables {tables:.1f} s (all candidate types), KLD per role "
            f"and probe type {kld:.1f} s, mix with its closed-loop check and --dry-run "
            f"{', '.join(f'{m:.1f}' for m in mixes)} s per target. The first target's search: {first_search:.1f} s; "
            f"one stock {STOCK[0]} quantization plus its scoring: {stock_before:.1f} s before the search, "
            f"{stock_after:.1f} s after it (mean {stock_ref:.1f} s): **{first_search / stock_ref:.1f}x**. "
            f"Load average (1, 5, 15 min) at the stock run {load_before}, at the search {load_search}, "
            f"after it {load_after}. Every mix's GGUF then costs one more quantization."]
    calib = json.loads((store / "sensitivity-kld" / steps["sensitivity-kld"]["key"] / "calibration.json").read_text())
    out += ["", f"KLD per role (calibration text, {calib['chunks']} chunks of {calib['ctx']}, {calib['runs']} "
            "llama-perplexity runs): the role at each probe type's --pure tensors, every other tensor as in the base; "
            "factor = KLD per unit of proxy error:", "",
            "| role | tensors | " + " | ".join(f"{p}: types, KLD ± SE, factor" for p in calib["probes"]) + " |",
            "|---|---:|" + "---:|" * len(calib["probes"])]
    for g, v in calib["groups"].items():
        cells = []
        for p in calib["probes"]:
            r = v["probes"][p]
            types = "+".join(f"{n}x{t}" if len(r["types"]) > 1 else t for t, n in r["types"].items())
            cells.append(f"{types}, {r['kld_mean']:.5f} ± {r['kld_se']:.5f}, {r['factor']:.3g}")
        out.append(f"| {g} | {v['tensors']} | " + " | ".join(cells) + " |")
    out += ["", "Closed-loop check per target (calibration chunks, the text's other half; mix − stock, paired):", ""]
    for label in [x for x in rows if x.startswith("match-")]:
        mix = rows[label]["info"]["mix"]
        checks = "; ".join(f"round {c['round']}: {c['diff']:+.5f} ± {c['se']:.5f} over {c['chunks']} chunks against "
                           f"{c['stock']} ({'win' if c['win'] else 'no win'})" for c in mix.get("check") or [])
        fb = mix.get("fallback")
        counts = ", ".join(f"{n}x{t}" for t, n in mix["type_counts"].items())
        out.append(f"- {label}: {checks or 'not checked'}; " +
                   (f"**fell back to stock {fb['stock']}**" if fb else f"mix published ({counts})"))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=(*MODELS, "moe", "all"), default="all")
    ap.add_argument("--workdir", type=Path, default=REPO / ".quantkit" / "bench-budget")
    args = ap.parse_args()
    for which in (MODELS if args.model == "all" else (args.model,)):
        print(bench(which, args.workdir), flush=True)
        print()


if __name__ == "__main__":
    main()
