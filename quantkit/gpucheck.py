"""The GPU check (`quantkit gpu-check`, run by scripts/gpu-check.sh): the demo's GGUF chain on a CUDA build, compared with the CPU.

On a CUDA machine it uses the pinned llama.cpp built with CUDA for that GPU's architecture only
(carried there ready-made: the carry functions below; or built with it when the machine can), runs
the demo recipe's GGUF chain (convert, imatrix, every type, PPL and KLD, llama-bench) with every
layer offloaded, then GPTQ and AWQ through GPTQModel on CUDA scored in torch on the GPU, and
writes one versioned JSON report: build and step times, and each variant's PPL and mean KLD next
to the CPU figures of the same chain (``--cpu-reference``), with whether they agree.

``--cpu`` runs the same chain on the CPU toolchain (no CUDA needed): its report is the reference.
A run's ``report.json`` is accepted as a reference too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from quantkit.digest import write_json_atomic
from quantkit.errors import QuantkitError

log = logging.getLogger(__name__)

REPORT_SCHEMA = "quantkit.gpu-check/1"
PPL_RTOL = 1e-3  # |PPL_gpu / PPL_cpu - 1|
KLD_ATOL = 1e-3  # |KLD_gpu - KLD_cpu|, mean KLD in nats
DEFAULT_RECIPE = "recipes/smollm2-135m-demo.yaml"
DEFAULT_MODEL = "models/smollm2-135m-instruct"
CARRY = ".gpu-carry"  # what scripts/gpu-check.sh --prepare packs for a machine without network


class GpuCheckError(QuantkitError):
    """The check cannot run as asked (no CUDA, a bad argument, an unreadable reference)."""


@dataclass(frozen=True)
class Tolerance:
    ppl_rtol: float = PPL_RTOL
    kld_atol: float = KLD_ATOL


def _figure(value) -> float | None:
    if value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f


def compare_scores(cpu: dict[str, dict], gpu: dict[str, dict], tol: Tolerance) -> list[dict]:
    """One row per variant label (GPU order, then CPU-only labels): both figures, their difference and
    whether they agree. ``agrees`` is None when one side lacks the variant or a figure."""
    rows = []
    for label in [*gpu, *(k for k in cpu if k not in gpu)]:
        c, g = cpu.get(label), gpu.get(label)
        row = {"label": label, "format": (g or c or {}).get("format"),
               "cpu": {k: _figure((c or {}).get(k)) for k in ("ppl", "kld_mean")},
               "gpu": {k: _figure((g or {}).get(k)) for k in ("ppl", "kld_mean")},
               "ppl_rel_diff": None, "kld_abs_diff": None, "agrees": None, "why": ""}
        if c is None or g is None:
            row["why"] = "no CPU figure" if c is None else "not run on the GPU"
            rows.append(row)
            continue
        cp, gp = row["cpu"]["ppl"], row["gpu"]["ppl"]
        ck, gk = row["cpu"]["kld_mean"], row["gpu"]["kld_mean"]
        problems = []
        if cp is None or gp is None or not (math.isfinite(cp) and math.isfinite(gp)) or cp <= 0:
            row["why"] = f"PPL missing or not finite (CPU {cp}, GPU {gp})"
            row["agrees"] = False if (cp is not None and gp is not None) else None
            rows.append(row)
            continue
        row["ppl_rel_diff"] = gp / cp - 1.0
        if abs(row["ppl_rel_diff"]) > tol.ppl_rtol:
            problems.append(f"PPL differs by {row['ppl_rel_diff']:+.2e} (tolerance {tol.ppl_rtol:g})")
        if ck is not None and gk is not None:
            row["kld_abs_diff"] = gk - ck
            if not math.isfinite(row["kld_abs_diff"]) or abs(row["kld_abs_diff"]) > tol.kld_atol:
                problems.append(f"mean KLD differs by {row['kld_abs_diff']:+.2e} (tolerance {tol.kld_atol:g})")
        elif (ck is None) != (gk is None):
            problems.append("mean KLD on one side only")
        row["agrees"] = not problems
        row["why"] = "; ".join(problems)
        rows.append(row)
    return rows


def summarize(rows: list[dict]) -> dict:
    compared = [r for r in rows if r["agrees"] is not None]
    disagree = [r["label"] for r in compared if not r["agrees"]]
    return {"compared": len(compared), "agree": len(compared) - len(disagree), "disagree": disagree,
            "not_compared": [r["label"] for r in rows if r["agrees"] is None],
            "all_agree": bool(compared) and not disagree}


def build_report(*, mode: str, machine: dict, toolchain: dict | None, build_seconds: float | None,
                 steps: list[dict], variants: dict[str, dict], reference: dict | None, tol: Tolerance,
                 checkpoints: dict, model: dict, seconds: float) -> dict:
    """The report dict. ``variants`` maps label to its figures (format, ppl, kld_mean, ...);
    ``reference`` is ``read_reference``'s result or None (nothing compared)."""
    if mode not in ("cuda", "cpu"):
        raise ValueError(f"mode {mode!r}")
    report = {"schema": REPORT_SCHEMA, "mode": mode, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine, "toolchain": toolchain, "model": model, "build_seconds": build_seconds,
              "steps": steps, "seconds": round(seconds, 3), "variants": variants, "checkpoints": checkpoints,
              "tolerance": {"ppl_rtol": tol.ppl_rtol, "kld_atol": tol.kld_atol}, "comparison": None}
    if reference is not None:
        rows = compare_scores(reference["variants"], variants, tol)
        same_model = reference.get("model_digest") in (None, model.get("digest"))
        report["comparison"] = {"reference": reference.get("path"), "reference_mode": reference.get("mode"),
                                "same_model": same_model, "rows": rows, **summarize(rows)}
        if not same_model:
            report["comparison"]["all_agree"] = False
    return report


def read_reference(path: Path) -> dict:
    """Variant figures from a ``--cpu`` report of this check or from a run's ``report.json``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GpuCheckError(f"cannot read the CPU reference {path}: {e}") from e
    if not isinstance(data, dict):
        raise GpuCheckError(f"{path} is not a JSON object")
    if data.get("schema") == REPORT_SCHEMA:
        if data.get("mode") != "cpu":
            raise GpuCheckError(f"{path} is a {data.get('mode')} report, not a CPU one (make it with --cpu)")
        return {"path": str(path), "mode": "gpu-check --cpu", "model_digest": (data.get("model") or {}).get("digest"),
                "variants": data["variants"]}
    if data.get("schema") == 1 and isinstance(data.get("variants"), list):  # quantkit.publish.report's report.json
        variants = {r["label"]: {"format": r.get("format"), "ppl": r.get("ppl"), "kld_mean": r.get("kld_mean")}
                    for r in data["variants"] if isinstance(r, dict) and "label" in r}
        return {"path": str(path), "mode": "run report.json", "model_digest": None, "variants": variants}
    raise GpuCheckError(f"{path} is neither a gpu-check report ({REPORT_SCHEMA}) nor a run's report.json")


# --- the carry: what a lent GPU machine without network gets -------------------------------------
#
# The device tool copies the repository plus the carried paths, 64 MiB in all, to a machine with
# no network. Building llama.cpp with CUDA there would spend most of its 15 minutes, so the CUDA
# binaries are built here (a CPU machine with nvcc), stripped, and carried; the machine's own Python
# has torch with CUDA and the nvidia-* wheels that hold libcublas and libcudart.

CARRY_LIMIT = 64 * 2**20  # bytes a device call carries: the repository's files and the carried paths
CARRY_MANIFEST = "MANIFEST.json"
CARRY_SCHEMA = "quantkit.gpu-carry/1"
CUDA_BINARIES = "llama-cuda.tar.xz"  # bin/<tool> of the CUDA build, stripped
SOURCE_TREE = "llama-src.tar.xz"  # the converter and gguf-py of the pinned tree (all the chain reads of it)
SOURCE_KEEP = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
CARRY_ARCH = "90"  # the lent machine's H200 (and H100): sm_90 machine code only


def cuda_build_arch(build_dir: Path) -> str | None:
    """The CMAKE_CUDA_ARCHITECTURES a cached CUDA build was configured with (its toolchain.json)."""
    from quantkit.toolchain import STAMP

    try:
        stamp = json.loads((build_dir / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GpuCheckError(f"no finished CUDA build in {build_dir} (no readable {STAMP}); build it with "
                            f"`quantkit toolchain --build --cuda --cuda-arch {CARRY_ARCH}`") from e
    if not stamp.get("cuda"):
        raise GpuCheckError(f"{build_dir} is a CPU build, not a CUDA one")
    archs = [a.split("=", 1)[1] for a in stamp.get("cmake_args", []) if a.startswith("-DCMAKE_CUDA_ARCHITECTURES=")]
    return archs[0] if archs else None


def _tar_xz(dest: Path, files: dict[str, Path]) -> None:
    """``files`` (name in the archive -> file) into ``dest``, written beside and renamed into place.

    xz with a dictionary longer than the largest file: the tools link the same ggml-cuda, so most of each
    binary repeats the one before it, which xz finds only within its window (with a 64 MiB window, six sm_90
    tools of 62-69 MiB each came to over 120 MB; the window costs its size in memory to unpack)."""
    import lzma
    import tarfile

    largest_mib = -(-max(p.stat().st_size for p in files.values()) // 2**20)  # rounded up
    window = max(64, largest_mib + 1) * 2**20
    tmp = dest.with_name(dest.name + ".partial")
    with lzma.open(tmp, "wb", format=lzma.FORMAT_XZ,
                   filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": window}]) as xz, \
            tarfile.open(fileobj=xz, mode="w") as tar:
        for name, path in sorted(files.items()):
            info = tar.gettarinfo(str(path), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(path, "rb") as f:
                tar.addfile(info, f)
    os.replace(tmp, dest)


def pack_cuda_binaries(build_dir: Path, dest: Path, *, arch: str = CARRY_ARCH) -> dict:
    """The CUDA build's tools, stripped, into ``dest`` (tar.xz). Refuses a build for other architectures
    (ggml's default list is several times the size and not what the lent GPU runs)."""
    from quantkit.toolchain import BINARIES

    built = cuda_build_arch(build_dir)
    # One architecture with its machine code: 90 (with PTX), 90-real (without: smaller) or 90a; not 90-virtual.
    if built is None or ";" in built or built.endswith("-virtual") or built.split("-")[0].rstrip("af") != arch:
        raise GpuCheckError(f"the CUDA build in {build_dir} is for architectures {built or 'ggml default'}, the carry "
                            f"takes {arch} only: `quantkit toolchain --build --cuda --cuda-arch {arch} --force`")
    strip = shutil.which("strip")
    if strip is None:
        raise GpuCheckError("strip (binutils) is not on PATH; it halves the carried binaries")
    sizes = {}
    with tempfile.TemporaryDirectory(prefix="quantkit-carry-") as tmp:
        files = {}
        for name in BINARIES:
            src = build_dir / "bin" / name
            if not src.is_file():
                raise GpuCheckError(f"{src} is missing: the CUDA build is incomplete")
            out = Path(tmp) / name
            subprocess.run([strip, "--strip-all", "-o", str(out), str(src)], check=True, capture_output=True)
            files[f"bin/{name}"] = out
            sizes[name] = {"built": src.stat().st_size, "stripped": out.stat().st_size}
        _tar_xz(dest, files)
    return {"arch": built, "binaries": sizes, "archive": dest.stat().st_size}


def pack_source(src: Path, dest: Path) -> dict:
    """The pinned tree's converter and gguf-py (what the chain runs of it; the binaries are carried built)."""
    from quantkit.toolchain import is_pinned_source

    if not is_pinned_source(src):
        raise GpuCheckError(f"{src} is not the pinned llama.cpp tree")
    files = {}
    for keep in SOURCE_KEEP:
        top = src / keep
        if top.is_file():
            files[keep] = top
        for f in sorted(top.rglob("*")) if top.is_dir() else ():
            if f.is_file() and not f.is_symlink() and "__pycache__" not in f.parts:
                files[str(f.relative_to(src))] = f
    _tar_xz(dest, files)
    return {"files": len(files), "archive": dest.stat().st_size}


def repository_bytes(root: Path) -> int:
    """What the device tool sends of the repository: tracked files and untracked ones git does not ignore."""
    out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True)
    return sum((root / p).stat().st_size for p in out.stdout.decode().split("\0")
               if p and (root / p).is_file() and not (root / p).is_symlink())


def write_carry_manifest(carry: Path, *, repo_bytes: int, details: dict | None = None,
                         limit: int = CARRY_LIMIT) -> dict:
    """Every carried file with its size and sha256, the total with the repository, and whether it fits.
    Written even when it does not fit (then GpuCheckError), so the numbers can be read."""
    from quantkit.digest import sha256_file

    files = {str(f.relative_to(carry)): {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
             for f in sorted(carry.rglob("*"))
             if f.is_file() and not f.is_symlink() and f.name != CARRY_MANIFEST}
    carried = sum(f["bytes"] for f in files.values())
    manifest = {"schema": CARRY_SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": files, "carried_bytes": carried, "repository_bytes": repo_bytes,
                "total_bytes": carried + repo_bytes, "limit_bytes": limit, "fits": carried + repo_bytes <= limit,
                **(details or {})}
    write_json_atomic(carry / CARRY_MANIFEST, manifest)
    if not manifest["fits"]:
        raise GpuCheckError(f"the carry is {carried / 2**20:.1f} MiB and the repository {repo_bytes / 2**20:.1f} MiB: "
                            f"over the {limit / 2**20:.0f} MiB a device call takes ({carry / CARRY_MANIFEST} lists it)")
    return manifest


def check_carry(carry: Path) -> dict:
    """The manifest, after checking every file it lists arrived whole (sizes and sha256)."""
    from quantkit.digest import sha256_file

    try:
        manifest = json.loads((carry / CARRY_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GpuCheckError(f"{carry} has no readable {CARRY_MANIFEST} ({e}): run scripts/gpu-check.sh --prepare") from e
    if manifest.get("schema") != CARRY_SCHEMA:
        raise GpuCheckError(f"{carry / CARRY_MANIFEST} is not a {CARRY_SCHEMA} manifest")
    bad = [name for name, rec in manifest["files"].items()
           if not (carry / name).is_file() or (carry / name).stat().st_size != rec["bytes"]
           or sha256_file(carry / name) != rec["sha256"]]
    if bad:
        raise GpuCheckError(f"carried files missing or changed: {', '.join(bad)}")
    return manifest


def unpack_carry(carry: Path, dest: Path) -> dict[str, str]:
    """Unpack the checked carry into ``dest``; the environment that makes quantkit use it (the carried
    CUDA tools and source tree, and this Python's nvidia wheels for libcublas and libcudart)."""
    import tarfile

    check_carry(carry)
    for name in (CUDA_BINARIES, SOURCE_TREE):
        sub = dest / name.removesuffix(".tar.xz")
        if not sub.is_dir():
            staging = sub.with_name(sub.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            with tarfile.open(carry / name) as tar:
                tar.extractall(staging, filter="data")
            os.replace(staging, sub)
    libs = [str(d) for d in cuda_library_dirs()]
    return {"QUANTKIT_LLAMA_CPP_BIN": str(dest / "llama-cuda" / "bin"),
            "QUANTKIT_LLAMA_CPP_SRC": str(dest / "llama-src"), "QUANTKIT_CUDA": "1",
            "LD_LIBRARY_PATH": os.pathsep.join([*libs, os.environ.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)}


def cuda_library_dirs() -> list[Path]:
    """Folders of this Python's nvidia-* wheels that hold libcublas.so.13 or libcudart.so.13 (torch's CUDA 13 build
    installs them); the carried binaries load them from there."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    dirs = []
    for root in roots:
        for lib in sorted(root.glob("*/lib")):
            if any(lib.glob("libcublas*.so.*")) or any(lib.glob("libcudart.so.*")):
                dirs.append(lib)
    return dirs


# --- running the chain ---------------------------------------------------------------------------

def cuda_machine() -> dict:
    """The GPU this runs on, or GpuCheckError when there is no usable CUDA device."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise GpuCheckError("no CUDA here: nvidia-smi is not on PATH (run this on a machine with an NVIDIA GPU, "
                            "or use --cpu to make the CPU reference)")
    out = subprocess.run([smi, "--query-gpu=name,compute_cap,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0 or not out.stdout.strip():
        raise GpuCheckError(f"no CUDA here: nvidia-smi exited {out.returncode}: {(out.stderr or out.stdout).strip()}")
    name, cap, driver, memory = [f.strip() for f in out.stdout.splitlines()[0].split(",")]
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    return {"gpu": name, "compute_cap": cap, "driver": driver, "memory": memory, "nvcc": _version_line(nvcc),
            "cpus": os.cpu_count(), "python": platform.python_version()}


def _version_line(tool: str | None) -> str | None:
    if tool is None:
        return None
    out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=60)
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    return lines[-1] if lines else None


def load_check_recipe(recipe_file: Path, model_dir: Path, *, bench: bool):
    """The recipe with ``model_dir`` as its model, no tasks (not part of the check), llama-bench once
    when ``bench``; and the project root."""
    from quantkit.recipe import find_project_root, load_recipe

    recipe_file = recipe_file.resolve()
    root = find_project_root(recipe_file.parent)
    recipe = load_recipe(recipe_file, root=root)
    if recipe.evaluation is None:
        raise GpuCheckError(f"{recipe_file} has no evaluation section: nothing to compare")
    # A recipe's model path is relative to its project (quantkit.source refuses any other).
    try:
        rel = model_dir.resolve().relative_to(root.resolve())
    except ValueError:
        raise GpuCheckError(f"--model {model_dir}: must be inside the project {root} (copy it there, e.g. under "
                            "models/)") from None
    model = recipe.model.model_copy(update={"path": rel.as_posix(), "repo": None})
    evaluation = recipe.evaluation.model_copy(update={"tasks": [], "bench": bench, "bench_reps": 1})
    return recipe.model_copy(update={"model": model, "evaluation": evaluation}), root


def _timed(steps: list[dict], name: str, fn, *a, **kw):
    start = time.perf_counter()
    result = fn(*a, **kw)
    steps.append({"step": name, "seconds": round(time.perf_counter() - start, 3)})
    log.info("%s: %.1fs", name, steps[-1]["seconds"])
    return result


def _figures(fmt: str, scores: dict) -> dict:
    """A variant's figures from its scores (``graph.variant_scores``, read as the manifest's typed record)."""
    from quantkit.manifest import Scores

    sc = Scores.from_dict(scores, where=f"{fmt} scores")
    keep = ("ppl", "ppl_err", "kld_mean", "kld_p99", "same_top_pct", "n_tokens", "backend", "seconds")
    out = {"format": fmt, **{k: getattr(sc, k) for k in keep}}
    if sc.speed is not None:
        out["speed"] = {k: getattr(sc.speed, k) for k in ("pp_tokens_per_s", "tg_tokens_per_s", "backend")}
    return out


def run_nodes(*, recipe, recipe_file: Path, root: Path, toolchain, store, threads: int,
              steps: list[dict]) -> dict[str, dict]:
    """The check recipe's graph (quantkit.graph; no run folder, no publishing), one node at a time, each
    timed. Returns label -> figures for every variant the graph scores."""
    from quantkit.context import RunContext
    from quantkit.formats import FORMATS
    from quantkit.graph import build_graph, variant_scores
    from quantkit.executor import execute, run_node

    ctx = RunContext(recipe=recipe, recipe_file=recipe_file, root=root, store=store, toolchain=toolchain,
                     threads=threads)
    nodes = build_graph(recipe, publish=False)
    folder = nodes[-1]  # the run folder: every variant, and the nodes that measure them

    class Done:  # execute() polls a future; these nodes run in this thread, one at a time
        def __init__(self, node, deps):
            self.value = _timed(steps, node.name, run_node, ctx, node, deps)

        def done(self) -> bool:
            return True

        def result(self):
            return self.value

    results = execute(ctx, [n for n in nodes if n is not folder], Done)
    return {label: _figures(fmt, variant_scores(ctx, made_by, results, nodes) | (
                {"backend": "torch"} if FORMATS[fmt].torch else {}))
            for fmt, label, made_by in folder.params["variants"]}


def run_check(args) -> dict:
    started = time.perf_counter()
    cuda = args.mode == "cuda"
    machine = cuda_machine() if cuda else {"cpus": os.cpu_count(), "python": platform.python_version(),
                                           "cpu": platform.processor() or platform.machine()}
    reference = read_reference(Path(args.cpu_reference)) if args.cpu_reference else None
    if cuda and not args.skip_gptq:
        import torch

        if not torch.cuda.is_available():
            raise GpuCheckError(f"torch {torch.__version__} sees no CUDA device (use --skip-gptq to check only "
                                "llama.cpp)")
    from quantkit.digest import DigestCache
    from quantkit.gptq import backend_version
    from quantkit.nodes import CHECKPOINT_KINDS
    from quantkit.source import fetch_model
    from quantkit.store import Store
    from quantkit.toolchain import build_toolchain, find_toolchain

    recipe, root = load_check_recipe(Path(args.recipe), Path(args.model), bench=cuda)
    build_seconds = None
    if cuda and not args.no_build:
        t0 = time.perf_counter()
        toolchain = build_toolchain(cuda=True, jobs=args.jobs, cuda_arch=args.arch,
                                    source=Path(args.llama_src) if args.llama_src else None)
        build_seconds = round(time.perf_counter() - t0, 3)
    else:
        toolchain = find_toolchain(cuda=cuda)
    threads = args.threads or os.cpu_count() or 1
    steps: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="quantkit-gpu-check-", dir=args.work) as work:
        store = Store(Path(work) / "store")  # a fresh store: nothing reused from a CPU run
        model = fetch_model(source=recipe.model, root=root, digests=DigestCache(Path(work) / "digests.json"))
        checkpoints = {"status": "skipped", "reason": "--skip-gptq"}
        if args.skip_gptq:
            recipe = recipe.model_copy(update={k: [] for k in CHECKPOINT_KINDS})
        else:
            try:
                checkpoints = {"status": "ran", "backend": f"gptqmodel {backend_version()}",
                               "device": "cuda" if cuda else "cpu"}
            except QuantkitError as e:
                checkpoints = {"status": "skipped", "reason": str(e)}
                recipe = recipe.model_copy(update={k: [] for k in CHECKPOINT_KINDS})
        variants = run_nodes(recipe=recipe, recipe_file=Path(args.recipe).resolve(), root=root, toolchain=toolchain,
                             store=store, threads=threads, steps=steps)
    return build_report(mode=args.mode, machine=machine, toolchain={**toolchain.describe(), "version": toolchain.version},
                        build_seconds=build_seconds, steps=steps, variants=variants, reference=reference,
                        tol=Tolerance(args.ppl_rtol, args.kld_atol), checkpoints=checkpoints,
                        model={"path": str(model.path), "digest": model.digest},
                        seconds=time.perf_counter() - started)
