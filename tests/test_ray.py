"""The quantize flow on a real local Ray cluster (prefect-ray): same bytes and scores as `quantkit run`,
and a Ray worker killed while it quantizes does not lose the run.

The cluster is `ray start --head` with its own worker processes (not the test's); the flow runs in
its own process against a real Prefect server; machines would share the store through a common
path, here one folder. The cluster declares one logical GPU so GPU nodes (which ask Ray for one)
can be placed; on a CPU machine they run on the CPU as usual. The cluster's workers have a thread count
of their own (``QUANTKIT_THREADS=1``, the flow's process 2): each node builds its context where it runs,
and the manifest says which machine facts made each step.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("prefect_ray", reason="the Ray runner needs the 'ray' extra")
psutil = pytest.importorskip("psutil")

from figures import COUNTERS  # noqa: E402
from test_pipeline import make_project, tiny_recipe  # noqa: E402
from test_worker_kill import BIN, Site, free_port  # noqa: E402

pytestmark = pytest.mark.slow

NAME = "tiny-ray"
WORKER_THREADS = "1"  # the flow's own process has QUANTKIT_THREADS=2 (Site)
RECIPE = tiny_recipe(NAME, """\
evaluation:
  file: calibration/eval/en-prose-heldout.txt
  ctx: 128
  max_tokens: 1024
  bench: false
gguf:
  imatrix: {enabled: true, ctx: 128, chunks: 8}
  types: [Q8_0, Q4_K_M, Q2_K]
""")


def outcome(manifest_path: Path) -> dict:
    """What must not depend on where the nodes ran: every file's sha256 and every score."""
    manifest = json.loads(manifest_path.read_text())
    return {v["label"]: ({n: f["sha256"] for n, f in v["files"].items()},
                         {k: v["scores"].get(k) for k in ("ppl", "kld_mean", "kld_p99", "same_top_pct")})
            for v in manifest["variants"]}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, repo_root, tiny_llama):
    root = tmp_path_factory.mktemp("ray-ref")
    make_project(root, repo_root, tiny_llama).unlink()
    (root / "recipes" / f"{NAME}.yaml").write_text(RECIPE)
    env = {**os.environ, "QUANTKIT_STORE": str(tmp_path_factory.mktemp("ray-ref-store")), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "quantkit.cli", "run", "--no-publish", f"recipes/{NAME}.yaml"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return outcome(root / "runs" / NAME / "manifest.json")


class RayCluster:
    head_gpus = 1  # a logical GPU, so GPU nodes can be placed

    def __init__(self, site: Site):
        self.site = site
        # Ray's unix sockets need a short path.
        self.temp = tempfile.mkdtemp(prefix="qk-ray-", dir="/tmp")
        self.address = f"127.0.0.1:{free_port()}"
        self.site.env |= {"RAY_ADDRESS": self.address, "RAY_USAGE_STATS_ENABLED": "0",
                          "QUANTKIT_RAY_ADDRESS": self.address}

    def start(self) -> None:
        # The workers inherit the environment of `ray start`, not the flow's: another thread count.
        args = [str(BIN / "ray"), "start", "--head", "--port", self.address.split(":")[1], "--num-cpus", "2",
                "--num-gpus", str(self.head_gpus), "--include-dashboard=false", "--disable-usage-stats",
                "--temp-dir", self.temp, "--ray-client-server-port", str(free_port()), *self.own_ports()]
        done = subprocess.run(args, cwd=self.site.root, env=self.site.env | {"QUANTKIT_THREADS": WORKER_THREADS},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"

    @staticmethod
    def own_ports() -> list[str]:
        # Ray fixes this port by default (another cluster on the machine, or a second node, would take it).
        return ["--dashboard-agent-listen-port", str(free_port())]

    def folders(self) -> tuple[str, ...]:
        """The session folders of this cluster's nodes."""
        return (self.temp,)

    def processes(self) -> list[psutil.Process]:
        """This cluster's live processes: those that name a session folder, and their descendants (the raylet's
        workers and agents rename themselves ``ray::…``)."""
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["cmdline"]):
            if any(f in " ".join(p.info["cmdline"] or ()) for f in self.folders()):
                with contextlib.suppress(psutil.NoSuchProcess):
                    for q in (p, *p.children(recursive=True)):
                        found[q.pid] = q
        alive = []
        for p in found.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
        return alive

    def stop(self) -> None:
        """Stop this cluster's processes only: `ray stop` would stop every Ray cluster on the machine. A raylet
        that is told to stop can still start a worker on its way out: again until none is left."""
        for _ in range(5):
            procs = self.processes()
            if not procs:
                break
            for p in procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.terminate()
            _, alive = psutil.wait_procs(procs, timeout=10)
            for p in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            psutil.wait_procs(alive, timeout=10)
        for folder in self.folders():
            subprocess.run(["rm", "-rf", folder])


@pytest.fixture
def cluster(tmp_path, repo_root, tiny_llama):
    site = Site(tmp_path, repo_root, tiny_llama)
    (site.root / "recipes" / f"{NAME}.yaml").write_text(RECIPE)
    ray = RayCluster(site)
    try:
        site.start_server()
        site.cli(str(BIN / "prefect"), "global-concurrency-limit", "create", "gpu", "--limit", "1")
        ray.start()
        yield site
    finally:
        site.stop()  # the flow first: its driver must not outlive the cluster
        ray.stop()


def run_flow(site: Site) -> subprocess.Popen:
    return site.spawn("flow", str(BIN / "python"), "flows/quantize.py", f"recipes/{NAME}.yaml",
                      site.env["QUANTKIT_RAY_ADDRESS"])


def finished(site: Site, flow: subprocess.Popen, timeout: float = 900) -> Path:
    assert flow.wait(timeout=timeout) == 0, (site.logs / "flow.log").read_text()[-4000:]
    return site.root / "runs" / NAME / "manifest.json"


def test_flow_on_ray_matches_a_local_run(cluster, local_run):
    flow = run_flow(cluster)
    manifest = finished(cluster, flow)
    log = (cluster.logs / "flow.log").read_text()
    assert "Connecting to an existing Ray instance" in log and "Using Ray cluster with 1 nodes" in log
    assert outcome(manifest) == local_run
    steps = json.loads(manifest.read_text())["steps"]
    made = {(s["host"], s["toolchain"], s["threads"]) for s in steps}
    assert cluster.env["QUANTKIT_THREADS"] == "2" and len(steps) >= 5
    assert made == {(socket.gethostname(), steps[0]["toolchain"], int(WORKER_THREADS))}, steps
    assert steps[0]["toolchain"] and steps[0]["toolchain_dir"]
    COUNTERS["Ray runs identical to quantkit run"] += 1


def ray_worker_quantizing(store: Path) -> int | None:
    """The pid of the Ray worker whose scratch folder holds a quantize staging folder (the owner id
    is ``<pid>-<random>``), once llama-quantize is writing."""
    for tmp in store.glob("scratch/*/quantize/.tmp-*"):
        pid = int(tmp.parents[1].name.split("-")[0])
        if psutil.pid_exists(pid) and "ray" in " ".join(psutil.Process(pid).cmdline()).lower():
            return pid
    return None


def test_ray_worker_killed_while_quantizing(cluster, local_run):
    flow = run_flow(cluster)
    deadline = time.monotonic() + 600
    while (pid := ray_worker_quantizing(cluster.store)) is None:
        assert flow.poll() is None, (cluster.logs / "flow.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "no Ray worker ever reached llama-quantize"
        time.sleep(0.02)
    worker = psutil.Process(pid)
    for child in worker.children(recursive=True):
        child.kill()
    os.kill(pid, signal.SIGKILL)
    manifest = finished(cluster, flow)
    log = (cluster.logs / "flow.log").read_text()
    assert "A worker died or was killed while executing a task" in log  # Ray saw the loss and ran it again
    assert outcome(manifest) == local_run, "outputs after the lost worker differ from a local run"
    assert not list(cluster.store.rglob(".tmp-*")), "temp folders left after the run"
    COUNTERS["kill points survived"] += 1
