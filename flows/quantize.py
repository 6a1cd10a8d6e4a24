"""The Prefect flow `quantize`: quantkit's steps as tasks, one deployment per recipe.

A thin layer: every task is a quantkit library function. What Prefect adds:
- independent GGUF variants run concurrently (a thread per variant);
- GPU-bound steps hold a slot of the global concurrency limit ``gpu`` (1 slot by default);
- only network steps retry, with backoff (the model download; publishing when it lands);
- a task's cache key is quantkit's store key, the digest of everything that decides its output, so an
  unchanged re-run is all cache hits and a changed type recomputes only that type;
- the tools' output (logger ``quantkit.tool``) and the steps' lines reach the run's logs line by line;
- the run's variants become table, markdown and link artifacts.

Run it without a server as ``python flows/quantize.py RECIPE`` (Prefect starts a temporary one), or
through a deployment: ``prefect deployment run quantize/<recipe name>``. ``quantkit run RECIPE`` stays
the embedded way, with no Prefect at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.exceptions import MissingContextError
from prefect.futures import PrefectFuture
from prefect.logging.handlers import APILogHandler
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import Task, exponential_backoff
from prefect.utilities.annotations import quote

from quantkit.convert import convert, convert_inputs
from quantkit.imatrix import imatrix, imatrix_inputs
from quantkit import pipeline
from quantkit.pipeline import RunContext, Variant, prepare_source, write_run_folder
from quantkit.quantize import quantize as quantize_gguf
from quantkit.quantize import quantize_inputs
from quantkit.recipe import find_project_root, load_recipe
from quantkit.store import ENTRY, Entry, Store, default_store_root
from quantkit.toolchain import ensure_toolchain

GPU_LIMIT = "gpu"  # global concurrency limit; scripts/prefect-up.sh creates it with 1 slot
PARALLEL = int(os.environ.get("QUANTKIT_PARALLEL", "4"))  # variants quantized at once


# --- cache keys: the store's own key -------------------------------------------------------------

def store_cache_key(step: str, inputs_fn: Callable[..., dict]) -> Callable[[Any, dict], str]:
    """A Prefect cache key function: the key under which quantkit's store keeps this step's output.

    ``inputs_fn`` is the step's own ``*_inputs`` function (content digests, never paths), called with
    the task's parameters of the same names.
    """
    names = list(inspect.signature(inputs_fn).parameters)

    def cache_key(_context, parameters: dict) -> str:
        return f"quantkit-{step}-{Store.key(inputs_fn(**{n: parameters[n] for n in names}))}"

    return cache_key


def _from_hub_or_network(_task, _task_run, state) -> bool:
    """Retry a failed download, not a local mistake (a missing folder, a bad recipe)."""
    exc = state.result(raise_on_failure=False)
    cause = getattr(exc, "__cause__", None)
    return isinstance(exc, (ConnectionError, TimeoutError)) or (
        cause is not None and type(cause).__module__.startswith(("huggingface_hub", "requests", "httpx", "urllib3")))


# --- tasks: library functions, nothing else ------------------------------------------------------

source_task = task(prepare_source, name="source", task_run_name="source", cache_policy=NO_CACHE, retries=3,
                   retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_jitter_factor=0.5,
                   retry_condition_fn=_from_hub_or_network)
toolchain_task = task(ensure_toolchain, name="toolchain", task_run_name="toolchain", cache_policy=NO_CACHE)
convert_task = task(convert, name="convert", task_run_name="convert",
                    cache_key_fn=store_cache_key("convert", convert_inputs), persist_result=True)


quantize_task = task(quantize_gguf, name="quantize", task_run_name="quantize-{label}",
                     cache_key_fn=store_cache_key("quantize", quantize_inputs), persist_result=True)
write_run_folder_task = task(write_run_folder, name="write-run-folder", task_run_name="write-run-folder",
                              cache_policy=NO_CACHE)


def on_gpu(fn: Callable) -> Callable:
    """``fn`` holding one slot of the global ``gpu`` limit while it runs (its signature kept, so a
    cache key function still finds its parameters by name)."""
    @functools.wraps(fn)
    def held(*args, **kwargs):
        with concurrency(GPU_LIMIT, occupy=1):
            return fn(*args, **kwargs)
    return held


imatrix_task = task(on_gpu(imatrix), name="imatrix", task_run_name="imatrix",
                    cache_key_fn=store_cache_key("imatrix", imatrix_inputs), persist_result=True)


# Coarse steps, one task each as `quantkit run` calls them: the store inside skips finished work.
# They record their steps on the run's context, so it is passed unvisited (quote): Prefect would
# otherwise hand the task a copy.
preflight_task = task(pipeline.preflight, name="preflight", task_run_name="preflight", cache_policy=NO_CACHE)
score_ggufs_task = task(on_gpu(pipeline.score_ggufs), name="score-gguf", task_run_name="score-gguf",
                        cache_policy=NO_CACHE)
checkpoints_task = task(on_gpu(pipeline.checkpoint_variants), name="gptq-awq", task_run_name="gptq-awq",
                        cache_policy=NO_CACHE)
score_checkpoints_task = task(on_gpu(pipeline.score_checkpoints), name="score-checkpoints",
                              task_run_name="score-checkpoints", cache_policy=NO_CACHE)
# Publishing may reach the Hub: the one late step that retries.
publish_task = task(pipeline.publish_run, name="publish", task_run_name="publish", cache_policy=NO_CACHE,
                    retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_jitter_factor=0.5)


def resolve(future: PrefectFuture, step_task: Task, kwargs: dict) -> Entry:
    """The entry a step task produced; a cache hit counts as reused.

    A cache hit whose store folder was deleted since (a cleaned store) is built again.
    """
    future.wait()
    state = future.state
    entry: Entry = state.result()
    if state.name != "Cached":
        return entry
    if (entry.path / ENTRY).is_file():
        return dataclasses.replace(entry, reused=True)
    get_run_logger().warning("%s: cached, but %s is gone from the store; building it again", entry.step, entry.path)
    return step_task.with_options(refresh_cache=True)(**kwargs)


# --- logs: quantkit's loggers into the run's logs ------------------------------------------------

class RunLogBridge(logging.Handler):
    """Re-emits quantkit records on the current task's (or flow's) run logger, tool lines at INFO."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            logger = get_run_logger()
        except MissingContextError:
            return  # a thread outside any run
        logger.log(max(record.levelno, logging.INFO), record.getMessage())


@contextlib.contextmanager
def quantkit_logs_to_prefect() -> Iterator[None]:
    root = logging.getLogger("quantkit")
    tool = logging.getLogger("quantkit.tool")
    if any(isinstance(h, APILogHandler) for h in root.handlers):
        yield  # PREFECT_LOGGING_EXTRA_LOGGERS=quantkit already sends them
        return
    saved = root.level, tool.level, root.propagate
    bridge = RunLogBridge()
    root.addHandler(bridge)
    root.setLevel(logging.INFO)
    tool.setLevel(logging.DEBUG)
    root.propagate = False  # the run logger prints them already
    try:
        yield
    finally:
        root.removeHandler(bridge)
        root.setLevel(saved[0])
        tool.setLevel(saved[1])
        root.propagate = saved[2]


# --- artifacts ------------------------------------------------------------------------------------

def publish_artifacts(manifest_path: Path, manifest: dict) -> None:
    """Table of variants, a markdown summary and a link to the manifest, keyed by the recipe."""
    key = re.sub(r"[^a-z0-9-]+", "-", manifest["recipe"]["name"].lower()).strip("-")
    rows = [{"variant": v["label"], "format": v["format"], "MiB": round(v["files"][f]["size"] / 2**20, 1),
             "sha256": v["files"][f]["sha256"][:12], "reused": v["reused"]}
            for v in manifest["variants"] for f in sorted(v["files"])[:1]]
    create_table_artifact(rows, key=f"{key}-variants", description=f"{manifest['recipe']['name']}: variants")
    built = [s["step"] for s in manifest["steps"] if not s["reused"]]
    reused = [s["step"] for s in manifest["steps"] if s["reused"]]
    create_markdown_artifact("\n".join([
        f"# {manifest['recipe']['name']}",
        "",
        f"- recipe: `{manifest['recipe']['file']}` (sha256 `{manifest['recipe']['sha256'][:12]}`)",
        f"- model: `{manifest['model'].get('repo') or manifest['model']['path']}` "
        f"(digest `{manifest['model']['digest'][:12]}`)",
        f"- llama.cpp: `{manifest['toolchain']['version']}`",
        f"- built: {', '.join(built) or 'nothing'}",
        f"- reused: {', '.join(reused) or 'nothing'}",
        f"- run folder: `{manifest_path.parent}`",
    ]), key=f"{key}-summary", description="quantkit run summary")
    create_link_artifact(manifest_path.resolve().as_uri(), link_text="manifest.json", key=f"{key}-manifest")


# --- the flow -------------------------------------------------------------------------------------

def run_context(recipe_file: str) -> RunContext:
    path = Path(recipe_file)
    root = find_project_root(path.parent)
    recipe = load_recipe(path, root=root)  # a bad recipe fails here, before any task
    threads = int(os.environ.get("QUANTKIT_THREADS", 0)) or os.cpu_count() or 1
    toolchain = toolchain_task(cuda=os.environ.get("QUANTKIT_CUDA") == "1")
    return RunContext(recipe=recipe, recipe_file=path.resolve(), root=root, store=Store(default_store_root()),
                      toolchain=toolchain, threads=threads)


@flow(name="quantize", task_runner=ThreadPoolTaskRunner(max_workers=PARALLEL))
def quantize(recipe: str, publish: bool = True) -> dict:
    """Run one recipe: source, convert, imatrix, every GGUF type (concurrently), run folder, artifacts.

    ``recipe`` is the recipe's path, relative to the working directory (the project, in a deployment).
    """
    start = time.perf_counter()
    with quantkit_logs_to_prefect():
        ctx = run_context(recipe)
        preflight_task(quote(ctx))
        model, calib = source_task(ctx)
        variants = gguf_variants(ctx, model, calib) if ctx.recipe.gguf else []
        if variants and ctx.recipe.evaluation:
            variants = score_ggufs_task(quote(ctx), quote(variants))
        if ctx.recipe.gptq or ctx.recipe.awq:
            checkpoints = checkpoints_task(quote(ctx), quote(model), quote(calib))
            if ctx.recipe.evaluation:
                checkpoints = score_checkpoints_task(quote(ctx), quote(model), quote(checkpoints))
            variants = [*variants, *checkpoints]
        with pipeline.run_folder_lock(ctx):  # another run of this recipe may be writing it
            manifest_path = write_run_folder_task(ctx, model, calib, variants)
            if publish:
                publish_task(quote(ctx), quote(model), manifest_path)
    manifest = json.loads(manifest_path.read_text())
    publish_artifacts(manifest_path, manifest)
    built = [s["step"] for s in ctx.steps if not s["reused"]]
    reused = [s["step"] for s in ctx.steps if s["reused"]]
    get_run_logger().info("run %s done in %.1fs: %d steps built, %d reused", ctx.recipe.name,
                          time.perf_counter() - start, len(built), len(reused))
    return {"manifest": str(manifest_path), "built": built, "reused": reused}


def gguf_variants(ctx: RunContext, model, calib) -> list[Variant]:
    """pipeline.gguf_variants as tasks: the same calls, the types submitted at once."""
    kw = pipeline.convert_args(ctx, model)
    base = resolve(convert_task.submit(**kw), convert_task, kw)
    ctx.record("convert", base)
    imat = None
    if (kw := pipeline.imatrix_args(ctx, base, calib)) is not None:
        imat = resolve(imatrix_task.submit(**kw), imatrix_task, kw)
        ctx.record("imatrix", imat)
    variants = [pipeline.gguf_variant(ctx, ctx.recipe.gguf.base_type.upper(), base)]
    submitted = [(kw, quantize_task.submit(**kw)) for kw in pipeline.quantize_args(ctx, base, imat)]
    for kw, future in submitted:
        entry = resolve(future, quantize_task, kw)
        ctx.record(f"quantize:{kw['label']}", entry)
        variants.append(pipeline.gguf_variant(ctx, kw["label"], entry))
    return variants


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python flows/quantize.py RECIPE")
    print(quantize(sys.argv[1]))
