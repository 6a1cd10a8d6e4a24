"""The Prefect flow `quantize`: a loop over the recipe's graph (quantkit.graph), one task per node.

A thin layer; the graph decides the steps. What Prefect adds:
- independent nodes run concurrently (threads by default; on a Ray cluster when ``QUANTKIT_RAY_ADDRESS``
  or the flow's ``ray_address`` names one: machines share the store through a common path);
- nodes that use a GPU hold a slot of the global concurrency limit ``gpu`` (1 slot by default) and, on
  Ray, ask Ray for a GPU;
- only nodes that touch the network retry, with backoff (the download; a Hub publish);
- a task carries only what is the same on every machine: the run's ``RunSpec`` (recipe, project and store
  paths), the node, its inputs' results and the plan's estimate of it; the process that runs it builds its
  own context (toolchain, threads, device) and first checks its own free disk and RAM against the estimate;
- the store is the one cache: Prefect caches nothing, a node whose output is stored is reused by the store
  (an unchanged re-run builds nothing, a changed type recomputes only that type);
- tasks exchange results (store entries, paths), never a shared mutable context;
- the tools' output (logger ``quantkit.tool``) and the steps' lines reach the run's logs line by line;
- the run's variants become table, markdown and link artifacts.

Run it without a server as ``python flows/quantize.py RECIPE`` (Prefect starts a temporary one), or
through a deployment: ``prefect deployment run quantize/<recipe name>``. ``quantkit run RECIPE`` stays
the embedded way, with no Prefect at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.exceptions import MissingContextError
from prefect.logging.handlers import APILogHandler
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from quantkit.context import RunContext, RunSpec
from quantkit.graph import Node
from quantkit.manifest import Manifest
from quantkit.executor import run_node, run_sequence
from quantkit.plan import PlannedNode
from quantkit.tracking import prepare as prepare_tracking
from quantkit.storelocks import require_working_locks

GPU_LIMIT = "gpu"  # global concurrency limit; scripts/prefect-up.sh creates it with 1 slot
# A GPU slot is a lease its holder renews; a worker that dies holding one (a lost Ray worker) gives it back
# when the lease runs out. The server's shortest lease, not Prefect's default 5 minutes: meanwhile every GPU
# node waits, and on Ray the one that waits also holds the machine's GPU that the retry needs.
GPU_LEASE_S = 60
PARALLEL = int(os.environ.get("QUANTKIT_PARALLEL", "4"))  # nodes in flight at once
RAY_ENV = "QUANTKIT_RAY_ADDRESS"


# --- one task per node ------------------------------------------------------------------------------

def _from_hub_or_network(_task, _task_run, state) -> bool:
    """Retry a failed download or upload, not a local mistake (a missing folder, a bad recipe)."""
    exc = state.result(raise_on_failure=False)
    cause = getattr(exc, "__cause__", None)
    return isinstance(exc, (ConnectionError, TimeoutError)) or (
        cause is not None and type(cause).__module__.startswith(("huggingface_hub", "requests", "httpx", "urllib3")))


def run_node_task(run: RunSpec, node: Node, deps: dict[str, Any], estimate: PlannedNode | None = None) -> Any:
    """The one task function: this machine's context for the run, its preflight, the node's kind, holding a
    GPU slot when it needs one."""
    with quantkit_logs_to_prefect():
        ctx = run.context()
        if node.spec.gpu:
            with concurrency(GPU_LIMIT, occupy=1, lease_duration=GPU_LEASE_S):
                return run_node(ctx, node, deps, estimate)
        return run_node(ctx, node, deps, estimate)


node_task = task(run_node_task, name="node")


def task_for(ctx: RunContext, node: Node):
    spec = node.spec
    # The store is the one cache: nothing persisted beside it, nothing to repair when an entry is removed.
    options: dict[str, Any] = dict(name=node.kind, task_run_name=node.name.replace(":", "-"),
                                   tags=["gpu"] if spec.gpu else [], cache_policy=NO_CACHE, persist_result=False)
    if spec.network(ctx.recipe):  # only the world is flaky: a local failure fails the same way again
        options.update(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_jitter_factor=0.5,
                       retry_condition_fn=_from_hub_or_network)
    return node_task.with_options(**options)


class Submitted:
    """A Prefect future in the shape quantkit.executor.execute polls. The task gets the run's ``RunSpec``,
    never the head's context; whether the node was reused is the store's answer (``Entry.reused``)."""

    def __init__(self, ctx: RunContext, node: Node, deps: dict[str, Any], estimate: PlannedNode | None = None):
        with _ray_resources(node):
            self.future = task_for(ctx, node).submit(run=ctx.spec, node=node, deps=deps, estimate=estimate)

    def done(self) -> bool:
        return self.future.state.is_final()

    def result(self) -> Any:
        return self.future.result()


@contextlib.contextmanager
def _ray_resources(node: Node) -> Iterator[None]:
    """On Ray, a GPU node asks for one GPU; elsewhere nothing."""
    if not node.spec.gpu or not os.environ.get(RAY_ENV):
        yield
        return
    from prefect_ray.context import remote_options

    with remote_options(num_gpus=1):
        yield


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
    if any(isinstance(h, (APILogHandler, RunLogBridge)) for h in root.handlers):
        yield  # PREFECT_LOGGING_EXTRA_LOGGERS=quantkit already sends them, or the flow's bridge does
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

def publish_artifacts(manifest_path: Path, manifest: Manifest | dict, published: Any = None) -> None:
    """Table of variants, a markdown summary, a link to the manifest and, once published, the report
    (its quality table and recommendations) with a link to its plot, keyed by the recipe."""
    manifest = Manifest.coerce(manifest)
    name = manifest.recipe.name
    key = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    rows = [{"variant": v.label, "format": v.format, "MiB": round(v.files[f].size / 2**20, 1),
             "sha256": v.files[f].sha256[:12], "reused": v.reused}
            for v in manifest.variants for f in sorted(v.files)[:1]]
    create_table_artifact(rows, key=f"{key}-variants", description=f"{name}: variants")
    built = [s.step for s in manifest.steps if not s.reused]
    reused = [s.step for s in manifest.steps if s.reused]
    create_markdown_artifact("\n".join([
        f"# {name}",
        "",
        f"- recipe: `{manifest.recipe.file}` (sha256 `{manifest.recipe.sha256[:12]}`)",
        f"- model: `{manifest.model.repo or manifest.model.path}` (digest `{manifest.model.digest[:12]}`)",
        f"- llama.cpp: `{manifest.toolchain.version}`",
        f"- built: {', '.join(built) or 'nothing'}",
        f"- reused: {', '.join(reused) or 'nothing'}",
        f"- run folder: `{manifest_path.parent}`",
    ]), key=f"{key}-summary", description="quantkit run summary")
    create_link_artifact(manifest_path.resolve().as_uri(), link_text="manifest.json", key=f"{key}-manifest")
    report = manifest_path.parent / "report"
    if published is not None and (report / "report.md").is_file():
        plot = report / "plot.png"
        create_markdown_artifact("\n".join([
            f"**{published.status}**" + (f": `{published.path}`" if not published.unchanged_since else ""),
            *(f"pin bump (a tracking run's new pins, for the recipe): `{published.pin_patch}`",) * bool(
                getattr(published, "pin_patch", None)),
            *(f"pull request for the pin bump: {published.pin_pr}",) * bool(getattr(published, "pin_pr", None)),
            *(f"[plot]({plot.resolve().as_uri()})",) * plot.is_file(),
            "",
            (report / "report.md").read_text(encoding="utf-8"),
        ]), key=f"{key}-report", description=f"{name}: report ({published.status})")


# --- the flow -------------------------------------------------------------------------------------

def task_runner(ray_address: str | None = None):
    """Threads by default; a Ray cluster when an address is given (``auto``, ``ray://host:10001``)."""
    address = ray_address or os.environ.get(RAY_ENV)
    if not address:
        return ThreadPoolTaskRunner(max_workers=PARALLEL)
    from prefect_ray import RayTaskRunner

    os.environ[RAY_ENV] = address  # GPU nodes read it when they are submitted
    return RayTaskRunner(address=address)


@flow(name="quantize", task_runner=task_runner())
def quantize(recipe: str, publish: bool = True, track: bool = False) -> dict:
    """Run one recipe: every node of its graph as a task, dependencies first.

    ``recipe`` is the recipe's path, relative to the working directory (the project, in a deployment).
    ``track`` (the nightly schedule's parameter): first resolve the recipe's ``model.track`` and
    ``toolchain.track`` to new pins and run with them; the release step then publishes or holds
    (quantkit.tracking, docs/nightly.md).
    """
    with quantkit_logs_to_prefect():
        if track:
            tracked = prepare_tracking(recipe)  # the Hub and the package index: before any task
            for line in tracked.resolution.lines():
                get_run_logger().info("track: %s", line)
            recipe = str(tracked.recipe_file)
        # The head only plans: a bad recipe fails here, before any task; the toolchain, the threads and the
        # preflight are each worker's own (Submitted sends the RunSpec and the node's estimate).
        ctx = RunContext.from_env(recipe, toolchain="find")
        require_working_locks(ctx.store.root)  # the shared store, as the head sees it; each worker checks its own
        done = run_sequence(ctx, lambda rows: lambda node, deps: Submitted(ctx, node, deps, rows.get(node.name)),
                            publish=publish, parallel=PARALLEL, whole_run_here=False)
    publish_artifacts(done.manifest, Manifest.read(done.manifest), done.release)
    return {"manifest": str(done.manifest), "built": list(done.built), "reused": list(done.reused)}


def on_ray(address: str):
    """The ``quantize`` flow with its tasks on the Ray cluster at ``address``."""
    return quantize.with_options(task_runner=task_runner(address))


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python flows/quantize.py RECIPE [RAY_ADDRESS]")
    print((on_ray(sys.argv[2]) if len(sys.argv) == 3 else quantize)(sys.argv[1]))
