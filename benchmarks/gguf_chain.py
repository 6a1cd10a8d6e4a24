"""Side by side: the demo recipe's GGUF chain through quantkit vs the bare llama.cpp commands.

Both sides use the same binaries and arguments; runs alternate (quantkit, bare,
quantkit, ...) so drift in machine load hits both. Each repetition starts from
an empty store, so quantkit does all the work the bare chain does. Prints the
median wall time and peak RSS of each side and their ratio, then the warm
re-run and a one-type change against the cold run.

    .venv/bin/python benchmarks/gguf_chain.py --reps 3 [--recipe recipes/smollm2-135m-demo.yaml]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
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
from quantkit.toolchain import ensure_toolchain  # noqa: E402


def measure(argv: list[str], *, env: dict | None = None, cwd: Path | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of the largest process in the command's tree."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env={**os.environ, **(env or {})}, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(map(str, argv))}")
    return wall, usage.ru_maxrss / 1024


def bare_chain(recipe, tc, work: Path, threads: int) -> list[list[str]]:
    """The same commands quantkit runs, written out by hand."""
    spec = recipe.gguf
    base = work / "base.gguf"
    cmds = [[sys.executable, str(tc.convert_script), str(REPO / recipe.model.path), "--outfile", str(base),
             "--outtype", spec.base_type, "--model-name", recipe.model.display_name]]
    if spec.imatrix.enabled:
        cmds.append([str(tc.binary("llama-imatrix")), "-m", str(base), "-f", "calibration.txt", "-o", "imatrix.gguf",
                     "-c", str(spec.imatrix.ctx), "--chunks", str(spec.imatrix.chunks), "-t", str(threads),
                     "--no-ppl", "--output-frequency", "1000000"])
    for v in spec.types:
        imat = ["--imatrix", "imatrix.gguf"] if spec.uses_imatrix(v) else []
        cmds.append([str(tc.binary("llama-quantize")), *imat, *spec.override_args(v), str(base),
                     f"{spec.label(v)}.gguf", v.type, str(threads)])
    return cmds


def run_bare(recipe, tc, threads: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="qk-bench-bare-") as tmp:
        work = Path(tmp)
        (work / "calibration.txt").write_text(load_calibration(recipe.calibration, root=REPO).text)
        env = tc.python_env()
        total, peak = 0.0, 0.0
        for cmd in bare_chain(recipe, tc, work, threads):
            wall, rss = measure(cmd, env=env if cmd[0] == sys.executable else None, cwd=work)
            total, peak = total + wall, max(peak, rss)
        return total, peak


def run_quantkit(recipe_path: Path, store: Path) -> tuple[float, float]:
    return measure([str(REPO / ".venv" / "bin" / "quantkit"), "-q", "run", "--no-publish", str(recipe_path)],
                   env={"QUANTKIT_STORE": str(store), "QUANTKIT_PROJECT": str(REPO)})


def gguf_only(recipe_path: Path, dest: Path, *, change_last_type: bool = False) -> Path:
    """The recipe's GGUF chain alone (no scoring, GPTQ/AWQ or publishing): what the bare side runs."""
    data = yaml.safe_load(recipe_path.read_text())
    for key in ("evaluation", "gptq", "awq", "publish", "schedule"):
        data.pop(key, None)
    if change_last_type:
        last = data["gguf"]["types"][-1]
        data["gguf"]["types"][-1] = "Q4_0" if last != "Q4_0" else "Q5_0"
    dest.write_text(yaml.safe_dump(data, sort_keys=False))
    return dest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "smollm2-135m-demo.yaml"))
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    recipe = load_recipe(Path(args.recipe).resolve(), root=REPO)
    tc = ensure_toolchain()
    threads = os.cpu_count() or 1
    qk, bare = [], []
    with tempfile.TemporaryDirectory(prefix="qk-bench-") as tmp:
        recipe_path = gguf_only(Path(args.recipe), Path(tmp) / "gguf-only.yaml")
        for rep in range(args.reps):
            store = Path(tmp) / f"store-{rep}"
            qk.append(run_quantkit(recipe_path, store))
            bare.append(run_bare(recipe, tc, threads))
            print(f"rep {rep + 1}: quantkit {qk[-1][0]:.1f}s {qk[-1][1]:.0f} MiB | bare {bare[-1][0]:.1f}s "
                  f"{bare[-1][1]:.0f} MiB", flush=True)
        cold = statistics.median(w for w, _ in qk)
        warm = [run_quantkit(recipe_path, Path(tmp) / "store-0")[0] for _ in range(3)]
        changed = gguf_only(Path(args.recipe), Path(tmp) / "changed.yaml", change_last_type=True)
        changed_run = run_quantkit(changed, Path(tmp) / "store-0")[0]
        last, alt = recipe.gguf.types[-1].type, yaml.safe_load(changed.read_text())["gguf"]["types"][-1]
    q_wall, b_wall = statistics.median(w for w, _ in qk), statistics.median(w for w, _ in bare)
    q_rss, b_rss = max(r for _, r in qk), max(r for _, r in bare)
    print(f"\nGGUF chain, median of {args.reps} (cold store): quantkit {q_wall:.1f}s, bare {b_wall:.1f}s, "
          f"ratio {q_wall / b_wall:.3f}")
    print(f"peak RSS: quantkit {q_rss:.0f} MiB, bare {b_rss:.0f} MiB")
    print(f"warm re-run: {statistics.median(warm):.2f}s = {100 * statistics.median(warm) / cold:.1f}% of cold")
    print(f"one type changed ({last} -> {alt}): {changed_run:.1f}s")
    print(f"machine: {os.cpu_count()} cores; self RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
