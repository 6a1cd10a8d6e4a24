"""The graph's executor: ``quantkit run`` without Prefect.

``execute`` walks the nodes of ``quantkit.graph`` in dependency order and hands each ready node to a
``submit`` function; the local runner submits to a bounded thread pool, the Prefect flow submits
Prefect tasks (which may run on Ray). Lazy nodes (the base logits) run only when a dependent is not
stored yet; transient ones are removed from the store when the run is over.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from quantkit.context import RunContext
from quantkit.errors import NodeDoesNotFit, QuantkitError
from quantkit.graph import Node, build_graph, needed_for, with_reuse
from quantkit.paths import inside
from quantkit.store import Entry
from quantkit.storelocks import require_working_locks

log = logging.getLogger(__name__)

PARALLEL_ENV = "QUANTKIT_PARALLEL"


class Pending(Protocol):
    def done(self) -> bool: ...
    def result(self) -> Any: ...


Submit = Callable[[Node, dict[str, Any]], Pending]


def run_node(ctx: RunContext, node: Node, deps: dict[str, Any], estimate: Any = None) -> Any:
    """One node, in this process: what a thread, a Prefect task or a Ray worker calls.

    Whether the node is done is the store's answer (``StepKind.stored``), asked here, on the machine that
    runs it (its key may hold this machine's threads or device): a stored result is reused without running.
    ``ctx`` is this process's (a worker builds its own from the run's ``RunSpec``). With the plan's
    ``estimate`` of the node (a quantkit.plan.PlannedNode), this machine first checks that it can hold
    it (``preflight_node``).

    What in-process libraries print (GPTQModel's per-layer bars, tqdm, lm-eval, transformers) goes to
    the node's log file in the store, not the console (``-v`` keeps it on the console): thousands of
    carriage-return lines would bury quantkit's own. The llama.cpp tools' lines already go to the
    ``quantkit.tool`` logger.
    """
    spec = node.spec
    try:
        stored = spec.stored(ctx, node, deps)
    except QuantkitError:  # its inputs cannot be read here: running it says why
        stored = None
    if stored is not None:
        ctx.store.record_use(stored)  # `store gc` leaves what a live run uses
        log.info("%s: reused from the store (%s/%s)", node.name, stored.step, stored.key[:12])
        result = with_reuse(stored)
    else:
        if estimate is not None:
            preflight_node(ctx, node, deps, estimate)
        result = _run_logged(ctx, node, deps)
    if spec.check is not None:
        spec.check(ctx, node, result)
    return result


def _run_logged(ctx: RunContext, node: Node, deps: dict[str, Any]) -> Any:
    if logging.getLogger("quantkit.tool").isEnabledFor(logging.DEBUG):
        return node.spec.run(ctx, node, deps)
    log_file = node_log_file(ctx, node)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log_file, "w", encoding="utf-8", errors="replace") as out, _printed_to(out):
            try:
                return node.spec.run(ctx, node, deps)
            except BaseException:
                log.error("%s: what its libraries printed is in %s", node.name, log_file)
                raise
    finally:
        if log_file.is_file() and log_file.stat().st_size == 0:
            log_file.unlink()  # nothing was printed: no file to look at


class _ThreadRouted(io.TextIOBase):
    """sys.stdout/stderr that writes each thread's output where that thread was told (a node's log file),
    else to the real stream: nodes run in parallel threads, so swapping sys.stdout per node would not do.
    While exactly one node runs, threads it did not start itself (GPTQModel's workers) write to its log too."""

    def __init__(self, real):
        self.real = real
        self.local = threading.local()
        self.active: list = []  # the log files of the nodes running now

    def _target(self):
        own = getattr(self.local, "target", None)
        if own is not None:
            return own
        active = self.active
        return active[0] if len(active) == 1 else self.real

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()

    def isatty(self) -> bool:  # progress bars redraw in place only on a terminal
        return self._target() is self.real and self.real.isatty()

    def fileno(self) -> int:
        return self.real.fileno()


_ROUTING = threading.Lock()


@contextlib.contextmanager
def _printed_to(out):
    with _ROUTING:
        for name in ("stdout", "stderr"):
            if not isinstance(getattr(sys, name), _ThreadRouted):
                setattr(sys, name, _ThreadRouted(getattr(sys, name)))
        streams = (sys.stdout, sys.stderr)
        for s in streams:
            s.active = [*s.active, out]
    saved = [getattr(s.local, "target", None) for s in streams]
    for s in streams:
        s.local.target = out
    try:
        yield
    finally:
        for s, before in zip(streams, saved):
            s.local.target = before
        with _ROUTING:
            for s in streams:
                s.active = [f for f in s.active if f is not out]


class Eta:
    """Time left: the plan's estimates of the nodes not done, times how fast this machine is against them
    (seconds taken / seconds estimated over the nodes built so far). A node without an estimate counts as
    the mean of those with one. Reused nodes take no time and do not change the speed."""

    def __init__(self, estimates: dict[str, float | None], counted: set[str]):
        self.counted = counted
        known = [s for n, s in estimates.items() if n in counted and s is not None]
        fill = sum(known) / len(known) if known else 1.0
        self.estimate = {n: estimates.get(n) if estimates.get(n) is not None else fill for n in counted}
        self.taken = self.expected = 0.0

    def left(self, name: str, seconds: float | None, done: set[str]) -> float | None:
        if seconds is not None and name in self.estimate:
            self.taken += seconds
            self.expected += self.estimate[name]
        if not self.expected:
            return None
        rest = sum(s for n, s in self.estimate.items() if n not in done)
        return rest * self.taken / self.expected if rest else None


def node_log_file(ctx: RunContext, node: Node) -> Path:
    """``<store>/logs/<recipe>/<node>.log``: the last run's library output of that node."""
    return inside(ctx.store.root / "logs", ctx.recipe.name, node.name.replace(":", "-") + ".log")


def execute(ctx: RunContext, nodes: list[Node], submit: Submit, *, parallel: int = 1,
            poll: float = 0.05, keep: frozenset[str] = frozenset(),
            estimates: dict[str, float | None] | None = None) -> dict[str, Any]:
    """Run every node once its needs are done; return ``{node name: result}``.

    At most ``parallel`` nodes are in flight. The first failure stops new submissions; nodes already
    running finish, then the failure is raised. Transient results are removed at the end, except the
    nodes in ``keep``. ``estimates`` (the plan's seconds per node) weigh the ETA: what is left is their
    sum, scaled by how this machine ran the estimated nodes done so far.
    """
    by_name = {n.name: n for n in nodes}
    results: dict[str, Any] = {}
    running: dict[str, Pending] = {}
    waiting = [n for n in nodes if not n.spec.lazy or n.name in keep]  # a lazy node asked for by name runs
    failure: BaseException | None = None
    counted = {n.name for n in waiting}  # what the progress line counts

    started: dict[str, float] = {}
    eta = Eta(estimates or {}, counted)

    def start(node: Node) -> None:
        started[node.name] = time.perf_counter()
        running[node.name] = submit(node, {d: results[d] for d in node.needs})

    def finished(name: str) -> None:
        seconds = time.perf_counter() - started.pop(name)
        reused = isinstance(results[name], Entry) and results[name].reused
        done = len(counted.intersection(results))
        left = eta.left(name, None if reused else seconds, set(results))
        log.info("[%d/%d] %s %s%s", done, len(counted), name, "reused" if reused else f"done in {_duration(seconds)}",
                 f", about {_duration(left)} left" if left else "")

    while (waiting and failure is None) or running:
        progressed = False
        for node in list(waiting) if failure is None else []:
            if len(running) >= parallel:
                break
            eager = [d for d in node.needs if not by_name[d].spec.lazy]
            if not all(d in results for d in eager):
                continue
            lazy = [d for d in node.needs if by_name[d].spec.lazy and d not in results]
            if lazy:
                try:
                    stored = node.spec.stored(ctx, node, {d: results[d] for d in eager})
                except QuantkitError:  # a head without the toolchain cannot tell: the node's machine will
                    stored = None
                if stored is not None:  # its result exists: the lazy input is not needed for it
                    results[node.name] = with_reuse(stored)
                    started[node.name] = time.perf_counter()
                    finished(node.name)
                    waiting.remove(node)
                    progressed = True
                    continue
                for d in lazy:
                    if d not in running and all(x in results for x in by_name[d].needs):
                        start(by_name[d])
                continue
            waiting.remove(node)
            start(node)
            progressed = True
        for name in [n for n, f in running.items() if f.done()]:
            future = running.pop(name)
            progressed = True
            try:
                results[name] = future.result()
                finished(name)
            except BaseException as e:  # noqa: BLE001 - re-raised below once running nodes are done
                log.error("%s failed: %s", name, str(e).splitlines()[0] if str(e) else type(e).__name__)
                failure = failure or e
        if not progressed:
            _wait(running.values(), poll)
    if failure is not None:
        raise failure
    if waiting:
        raise RuntimeError(f"nodes never became ready: {[n.name for n in waiting]}")  # a graph bug
    discard_transient(ctx, [n for n in nodes if n.name not in keep], results)
    return {n.name: results[n.name] for n in nodes if n.name in results}  # graph order, not finishing order


def _wait(pending, poll: float) -> None:
    """Until one of ``pending`` is done: at once for the local pool's futures (a warm run is a chain of store
    hits, and a fixed poll would add to each of them), else ``poll`` seconds (Prefect's futures)."""
    pending = list(pending)
    if pending and all(isinstance(f, concurrent.futures.Future) for f in pending):
        concurrent.futures.wait(pending, timeout=poll, return_when=concurrent.futures.FIRST_COMPLETED)
    else:
        time.sleep(poll)


def _duration(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 90 else f"{seconds / 60:.0f} min"


def discard_transient(ctx: RunContext, nodes: list[Node], results: dict[str, Any]) -> None:
    """Remove transient outputs (the base logits) once every node that needs them is done."""
    for node in nodes:
        entry = results.get(node.name)
        if node.spec.transient and isinstance(entry, Entry) and ctx.store.remove(entry.step, entry.key):
            size = sum(f.size for f in entry.files.values())
            log.info("deleted %s (%.1f MiB): no node of this run needs it any more", node.name, size / 2**20)


@dataclass(frozen=True)
class RunResult:
    run_dir: Path | None  # None: the run stopped at a node (--until)
    manifest: Path | None
    reused: tuple[str, ...]
    built: tuple[str, ...]
    published: Path | None = None
    publish_status: str | None = None  # "published <run id>" or "unchanged since <run id>"
    release: Any = None  # the publish node's result (quantkit.publish.release), for the flow's artifacts


def summarize(results: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(reused, built) node names, from the stored results."""
    entries = {n: r for n, r in results.items() if isinstance(r, Entry)}
    return (tuple(n for n, e in entries.items() if e.reused), tuple(n for n, e in entries.items() if not e.reused))


def local_submit(ctx: RunContext, pool: concurrent.futures.Executor,
                 estimates: dict[str, Any] | None = None) -> Submit:
    """Run each node in ``pool``, after checking its estimate (``estimates``: node name -> PlannedNode)."""
    return lambda node, deps: pool.submit(run_node, ctx, node, deps, (estimates or {}).get(node.name))


def parallel_from_env() -> int:
    # Each llama.cpp tool already uses every core: one node at a time unless asked.
    return max(1, int(os.environ.get(PARALLEL_ENV, "1") or 1))


def run(ctx: RunContext, *, publish: bool = True, parallel: int | None = None, until: str | None = None) -> RunResult:
    """The recipe's whole run in this process's threads; with ``until``, only that node and what it needs."""
    parallel = parallel or parallel_from_env()
    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
        return run_sequence(ctx, lambda rows: local_submit(ctx, pool, rows), publish=publish, parallel=parallel,
                            until=until)


def run_sequence(ctx: RunContext, submitter: Callable[[dict[str, Any]], Submit], *, publish: bool = True,
                 parallel: int = 1, until: str | None = None, whole_run_here: bool = True) -> RunResult:
    """The one run sequence of `quantkit run` and the Prefect flow: build the graph, preflight, execute, sweep,
    then the manifest (the run folder node) and what was published.

    ``submitter(rows)`` gives the executor's submit function, ``rows`` the plan's estimate of each node (each
    node's machine checks it before it starts). ``whole_run_here``: this machine runs every node, so the run's
    totals are checked here before any work; a flow's head only plans. With ``until``, only that node and what
    it needs run (no run folder)."""
    start = time.perf_counter()
    require_working_locks(ctx.store.root)  # before any work: a store where flock does not hold is refused
    nodes = build_graph(ctx.recipe, publish=publish)
    if until:
        nodes = needed_for(nodes, until)
    names = {n.name for n in nodes}
    if whole_run_here:
        rows = preflight(ctx, names, publish=publish)
    else:
        from quantkit.plan import plan

        rows = plan(ctx, publish=publish, names=names, cost_done=False)
    results = execute(ctx, nodes, submitter({r.name: r for r in rows}), parallel=parallel,
                      keep=frozenset([until] if until else []), estimates={r.name: r.seconds for r in rows})
    ctx.store.sweep()  # what a node's process left when it died (a lost Ray worker, a killed tool)
    reused, built = summarize(results)
    log.info("run %s done in %.1fs: %d steps built, %d reused%s", ctx.recipe.name, time.perf_counter() - start,
             len(built), len(reused), f" ({', '.join(reused)})" if reused else "")
    if until:
        return RunResult(None, None, reused, built)
    manifest = results["run-folder"]
    published = results.get("publish")
    return RunResult(manifest.parent, manifest, reused, built, published.path if published else None,
                     published.status if published else None, published)


def preflight(ctx: RunContext, names: set[str] | None = None, *, publish: bool = True) -> list:
    """Refuse before any work when the plan's disk or RAM estimate (of the nodes ``names``, default all)
    exceeds what the machine has; return the plan's rows (quantkit.plan.PlannedNode) of those nodes."""
    from quantkit.errors import ResourceError
    from quantkit.plan import GiB, machine, plan, totals

    rows = plan(ctx, publish=publish, names=names, cost_done=False)  # a done node needs nothing
    need = totals(rows)
    have = machine(ctx.store.root)
    if need.disk_bytes and need.disk_bytes > have.free_disk:
        raise ResourceError(f"the run needs about {need.disk_bytes / GiB:.2f} GiB more disk in {ctx.store.root}, "
                            f"only {have.free_disk / GiB:.2f} GiB is free")
    if need.ram_bytes and need.ram_bytes > have.available_ram:
        raise ResourceError(f"node {need.ram_node} needs about {need.ram_bytes / GiB:.2f} GiB of RAM, "
                            f"{have.available_ram / GiB:.2f} GiB is available")
    return rows


def preflight_node(ctx: RunContext, node: Node, deps: dict[str, Any], estimate: Any) -> None:
    """On the machine that runs ``node``, before it starts: refuse (``NodeDoesNotFit``, with the numbers)
    when this machine's free disk under the store or its available RAM is below the node's estimate
    (``estimate``: the plan's row of the node). A node the store already holds needs neither, nor does one
    with no store key that the plan found done (the source on disk)."""
    from quantkit.plan import DONE, machine

    need_disk, need_ram = estimate.disk_bytes, estimate.ram_bytes
    if (not need_disk and not need_ram) or (estimate.status == DONE and node.spec.store_step is None):
        return
    have = machine(ctx.store.root)
    if (not need_disk or need_disk <= have.free_disk) and (not need_ram or need_ram <= have.available_ram):
        return
    try:
        if node.spec.stored(ctx, node, deps) is not None:
            return
    except QuantkitError:
        pass  # cannot tell: the node decides when it runs; this machine still cannot hold it
    raise NodeDoesNotFit(node.name, socket.gethostname(), need_disk, need_ram, have.free_disk, have.available_ram)
