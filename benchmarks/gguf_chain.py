"""Side by side: the demo recipe through quantkit vs the bare tools, in one run.

1. The GGUF chain (convert -> imatrix -> every quantize type -> llama-perplexity: base logits, base
   PPL, KLD of every type), through `quantkit run` with an empty store and as the bare commands
   with the same binaries and arguments, alternating (quantkit, bare, quantkit, ...) so drift in
   machine load hits both. Median wall time and peak RSS of each side, and their ratio.
2. A warm re-run of the unchanged recipe against the cold run.
3. One type changed: quantkit's re-run against the bare commands that change needs (quantize the
   new type, base logits again, since they are deleted after each run, its KLD).
4. Conversion's peak RSS against the model's largest tensor and the converter's own footprint.
5. With --gptq / --awq: GPTQ or AWQ through quantkit (a one-variant recipe) against a script calling GPTQModel
   directly with the same config and calibration windows (benchmarks/gptqmodel_direct.py).

    .venv/bin/python benchmarks/gguf_chain.py --reps 3 [--gptq] [--awq] [--skip-chain] [--recipe FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quantkit.calibration import load_calibration  # noqa: E402
from quantkit.recipe import load_recipe  # noqa: E402
from quantkit.scoring.windows import max_chunks  # noqa: E402
from quantkit.toolchain import ensure_toolchain  # noqa: E402

QUANTKIT = str(REPO / ".venv" / "bin" / "quantkit")


def measure(argv: list[str], *, env: dict | None = None, cwd: Path | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of the largest process in the command's tree."""
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: nobody reads it until the end
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env={**os.environ, **(env or {})}, cwd=cwd, stdout=subprocess.DEVNULL,
                                stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise SystemExit(f"failed: {' '.join(map(str, argv))}\n{err.read().decode(errors='replace')[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def peak_anon_mib(argv: list[str], *, env: dict | None = None, cwd: Path | None = None) -> float:
    """Peak anonymous RSS (MiB, /proc polled every 10 ms): memory the process owns, without the
    file pages of an mmapped safetensors that ru_maxrss also counts (clean, reclaimable)."""
    proc = subprocess.Popen(argv, env={**os.environ, **(env or {})}, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            break
        peak = max([peak] + [int(line.split()[1]) for line in status.splitlines() if line.startswith("RssAnon:")])
        time.sleep(0.01)
    proc.wait()
    return peak / 1024


class Bare:
    """The commands quantkit runs for the GGUF chain, written out by hand, in one work folder."""

    def __init__(self, recipe, tc, work: Path, threads: int):
        self.recipe, self.tc, self.work, self.threads = recipe, tc, work, threads
        self.spec, self.ev = recipe.gguf, recipe.evaluation
        (work / "calibration.txt").write_text(load_calibration(recipe.calibration, root=REPO).text)
        self.text = str(REPO / self.ev.file)

    def convert(self) -> list[str]:
        return [sys.executable, str(self.tc.convert_script), str(REPO / self.recipe.model.path), "--outfile",
                "base.gguf", "--outtype", self.spec.base_type, "--model-name", self.recipe.model.display_name]

    def imatrix(self) -> list[str]:
        im = self.spec.imatrix
        return [str(self.tc.binary("llama-imatrix")), "-m", "base.gguf", "-f", "calibration.txt", "-o",
                "imatrix.gguf", "-c", str(im.ctx), "--chunks", str(im.chunks), "-t", str(self.threads), "--no-ppl",
                "--output-frequency", "1000000"]

    def quantize(self, v) -> list[str]:
        imat = ["--imatrix", "imatrix.gguf"] if self.spec.uses_imatrix(v) else []
        return [str(self.tc.binary("llama-quantize")), *imat, *self.spec.override_args(v), "base.gguf",
                f"{self.spec.label(v)}.gguf", v.type, str(self.threads)]

    def perplexity(self, *args: str) -> list[str]:
        return [str(self.tc.binary("llama-perplexity")), *args, "-c", str(self.ev.ctx), "-t", str(self.threads),
                "--no-repack", "--log-file", "perplexity.log"]  # as quantkit scores (quantkit.scoring.llamacpp)

    def logits(self) -> list[str]:
        return self.perplexity("-m", "base.gguf", "-f", self.text, "--chunks", str(max_chunks(self.ev)),
                               "--kl-divergence-base", "logits.bin")

    def base_ppl(self) -> list[str]:
        return self.perplexity("-m", "base.gguf", "-f", self.text, "--chunks", str(max_chunks(self.ev)))

    def kld(self, v) -> list[str]:
        return self.perplexity("-m", f"{self.spec.label(v)}.gguf", "--kl-divergence-base", "logits.bin",
                               "--kl-divergence")

    def chain(self) -> list[tuple[str, list[str]]]:
        cmds = [("convert", self.convert())]
        if self.spec.imatrix.enabled:
            cmds.append(("imatrix", self.imatrix()))
        cmds += [(f"quantize {self.spec.label(v)}", self.quantize(v)) for v in self.spec.types]
        cmds += [("logits", self.logits()), ("base ppl", self.base_ppl())]
        cmds += [(f"kld {self.spec.label(v)}", self.kld(v)) for v in self.spec.types]
        return cmds

    def run(self, cmds: list[tuple[str, list[str]]]) -> tuple[float, float, dict[str, tuple[float, float]]]:
        steps = {}
        for name, cmd in cmds:
            steps[name] = measure(cmd, env=self.tc.python_env() if cmd[0] == sys.executable else None, cwd=self.work)
        (self.work / "logits.bin").unlink(missing_ok=True)  # as quantkit does after scoring
        return sum(w for w, _ in steps.values()), max(r for _, r in steps.values()), steps


def bench_recipe(src: Path, dest: Path, *, change_last_type: bool = False) -> Path:
    """The recipe's GGUF chain and its PPL/KLD scoring: no tasks, llama-bench, GPTQ/AWQ or publishing."""
    data = yaml.safe_load(src.read_text())
    for key in ("gptq", "awq", "publish", "schedule"):
        data.pop(key, None)
    data["evaluation"].pop("tasks", None)
    data["evaluation"]["bench"] = False
    if change_last_type:
        last = data["gguf"]["types"][-1]
        data["gguf"]["types"][-1] = "Q4_0" if last != "Q4_0" else "Q5_0"
    dest.write_text(yaml.safe_dump(data, sort_keys=False))
    return dest


def run_quantkit(recipe_path: Path, store: Path) -> tuple[float, float]:
    return measure([QUANTKIT, "-q", "run", "--no-publish", str(recipe_path)],
                   env={"QUANTKIT_STORE": str(store), "QUANTKIT_PROJECT": str(REPO), "HF_HUB_OFFLINE": "1"})


def largest_tensor_mib(model_dir: Path) -> tuple[str, float]:
    best = ("", 0)
    for f in model_dir.glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, t in header.items():
            if name != "__metadata__" and t["data_offsets"][1] - t["data_offsets"][0] > best[1]:
                best = (name, t["data_offsets"][1] - t["data_offsets"][0])
    return best[0], best[1] / 2**20


def checkpoint_side_by_side(method: str, recipe_src: Path, tmp: Path, reps: int) -> str:
    """The recipe's first GPTQ or AWQ variant through quantkit vs GPTQModel called directly."""
    data = yaml.safe_load(recipe_src.read_text())
    only = {k: data[k] for k in ("name", "model", "calibration")} | {method: [data[method][0]]}
    recipe_path = tmp / f"{method}-only.yaml"
    recipe_path.write_text(yaml.safe_dump(only, sort_keys=False))
    recipe = load_recipe(recipe_path, root=REPO)
    calib = tmp / f"{method}-calibration.txt"
    calib.write_text(load_calibration(recipe.calibration, root=REPO).text)
    spec = getattr(recipe, method)[0]
    if method == "gptq":
        knobs = ["--bits", str(spec.bits), "--group-size", str(spec.group_size), "--desc-act", str(spec.desc_act),
                 "--damp", str(spec.damp_percent)]
        what = f"GPTQ {spec.bits}-bit g{spec.group_size}"
    else:
        knobs = ["--bits", str(spec.w_bit), "--group-size", str(spec.q_group_size), "--zero-point",
                 str(spec.zero_point)]
        what = f"AWQ {spec.w_bit}-bit g{spec.q_group_size}"
    direct = [sys.executable, str(REPO / "benchmarks" / "gptqmodel_direct.py"), method, str(REPO / recipe.model.path),
              str(calib), *knobs, "--samples", str(spec.samples), "--seq-len", str(spec.seq_len), "--seed",
              str(spec.seed)]
    qk, lib = [], []
    for rep in range(reps):
        qk.append(run_quantkit(recipe_path, tmp / f"{method}-store-{rep}"))
        lib.append(measure([*direct, "--out", str(tmp / f"{method}-direct-{rep}")]))
        print(f"{method} rep {rep + 1}: quantkit {qk[-1][0]:.1f}s {qk[-1][1]:.0f} MiB | GPTQModel direct "
              f"{lib[-1][0]:.1f}s {lib[-1][1]:.0f} MiB", flush=True)
    q, d = statistics.median(w for w, _ in qk), statistics.median(w for w, _ in lib)
    return (f"{what}, median of {reps}: quantkit {q:.1f}s, direct {d:.1f}s, ratio {q / d:.3f}; "
            f"peak RSS {max(r for _, r in qk):.0f} vs {max(r for _, r in lib):.0f} MiB")


def chain_side_by_side(src: Path, tc, tmp: Path, reps: int, threads: int) -> list[str]:
    """Sections 1-4 of the module docstring; returns the summary lines."""
    qk, bare = [], []
    recipe_path = bench_recipe(src, tmp / "bench.yaml")
    recipe = load_recipe(recipe_path, root=REPO)
    for rep in range(reps):
        qk.append(run_quantkit(recipe_path, tmp / f"store-{rep}"))
        work = tmp / f"bare-{rep}"
        work.mkdir()
        chain = Bare(recipe, tc, work, threads)
        bare.append(chain.run(chain.chain()))
        print(f"rep {rep + 1}: quantkit {qk[-1][0]:.1f}s {qk[-1][1]:.0f} MiB | bare {bare[-1][0]:.1f}s "
              f"{bare[-1][1]:.0f} MiB", flush=True)
    cold = statistics.median(w for w, _ in qk)
    warm = statistics.median(run_quantkit(recipe_path, tmp / "store-0")[0] for _ in range(3))

    changed_path = bench_recipe(src, tmp / "changed.yaml", change_last_type=True)
    changed = load_recipe(changed_path, root=REPO)
    new = changed.gguf.types[-1]
    changed_qk = run_quantkit(changed_path, tmp / "store-0")[0]
    b = Bare(changed, tc, tmp / "bare-0", threads)  # base.gguf and imatrix.gguf are there already
    changed_bare, _, changed_steps = b.run([("quantize", b.quantize(new)), ("logits", b.logits()),
                                            ("kld", b.kld(new))])

    steps = bare[0][2]
    tensor, tensor_mib = largest_tensor_mib(REPO / recipe.model.path)
    footprint = measure([sys.executable, str(tc.convert_script), "--help"], env=tc.python_env())[1]
    scratch = tmp / "convert-rss"
    scratch.mkdir()
    convert_anon = peak_anon_mib(Bare(recipe, tc, scratch, threads).convert(), env=tc.python_env(), cwd=scratch)

    b_wall = statistics.median(w for w, _, _ in bare)
    return [
        f"GGUF chain + PPL/KLD, median of {reps} (cold store): quantkit {cold:.1f}s, bare {b_wall:.1f}s, "
        f"ratio {cold / b_wall:.3f}",
        f"peak RSS: quantkit {max(r for _, r in qk):.0f} MiB, bare {max(r for _, r, _ in bare):.0f} MiB",
        "bare steps (rep 1): " + ", ".join(f"{n} {w:.1f}s" for n, (w, _) in steps.items()),
        f"warm re-run: {warm:.2f}s = {100 * warm / cold:.1f}% of cold",
        f"one type changed ({recipe.gguf.types[-1].type} -> {new.type}): quantkit {changed_qk:.1f}s, bare "
        f"{changed_bare:.1f}s ({', '.join(f'{n} {s:.1f}s' for n, (s, _) in changed_steps.items())}), "
        f"ratio {changed_qk / changed_bare:.3f}",
        f"convert peak RSS {steps['convert'][1]:.0f} MiB (anonymous {convert_anon:.0f} MiB); largest tensor "
        f"{tensor} {tensor_mib:.0f} MiB; converter footprint (--help) {footprint:.0f} MiB",
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "smollm2-135m-demo.yaml"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gptq", action="store_true", help="also GPTQ: quantkit vs GPTQModel called directly")
    ap.add_argument("--awq", action="store_true", help="also AWQ (about 9 minutes a side on 2 cores)")
    ap.add_argument("--skip-chain", action="store_true", help="only the GPTQ/AWQ comparisons")
    args = ap.parse_args()
    src = Path(args.recipe).resolve()
    tc = ensure_toolchain()
    lines = []
    with tempfile.TemporaryDirectory(prefix="qk-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if not args.skip_chain:
            lines += chain_side_by_side(src, tc, tmp, args.reps, os.cpu_count() or 1)
        lines += [checkpoint_side_by_side(m, src, tmp, max(1, args.reps // 2)) for m in ("gptq", "awq")
                  if getattr(args, m)]
    print("\n" + "\n".join(lines))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, llama.cpp {tc.version}")


if __name__ == "__main__":
    main()
