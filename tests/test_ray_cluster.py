"""A real cluster of two unlike machines on this one: a CPU head and a GPU worker, each its own world.

- The head (``ray start --head --num-gpus 0``) has no GPU and its workers run with ``QUANTKIT_THREADS=1``.
- The second node (``ray start --address``) declares one logical GPU and has an environment of its own:
  ``QUANTKIT_THREADS=2`` and its own ``QUANTKIT_CACHE``, a hard-linked copy of this session's toolchain
  cache (as a GPU machine has its own build; linked so nothing rebuilds).
- The store is shared by path; the flow runs in its own process against a real Prefect server.

Every GPU node kind (here the imatrix and GPTQ) asks Ray for a GPU, so it can only run on the second node;
the manifest must say so: the toolchain folder and thread count of that node. Its Ray worker is SIGKILLed
while it builds the GPTQ checkpoint (a lost worker: nothing reports it); Ray runs the task again there, and
every file and score equals a plain ``quantkit run``'s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("prefect_ray", reason="the Ray runner needs the 'ray' extra")
pytest.importorskip("gptqmodel", reason="the GPU kinds include GPTQ: pip install 'quantkit[gptq]'")
psutil = pytest.importorskip("psutil")

from figures import COUNTERS  # noqa: E402
from test_pipeline import make_project, tiny_recipe  # noqa: E402
from test_ray import RayCluster, outcome  # noqa: E402
from test_worker_kill import BIN, Site  # noqa: E402

from quantkit.graph import KINDS  # noqa: E402
from quantkit.toolchain import cache_dir  # noqa: E402

pytestmark = pytest.mark.slow

NAME = "tiny-cluster"
HEAD_THREADS, GPU_THREADS = "1", "2"
RECIPE = tiny_recipe(NAME, """\
gguf:
  imatrix: {enabled: true, ctx: 128, chunks: 4}
  types: [Q8_0, Q2_K]
gptq:
  - {bits: 4, group_size: 64, samples: 8, seq_len: 64}
""")


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, repo_root, tiny_llama):
    root = tmp_path_factory.mktemp("cluster-ref")
    make_project(root, repo_root, tiny_llama).unlink()
    (root / "recipes" / f"{NAME}.yaml").write_text(RECIPE)
    # The GPU node's thread count: a CPU GPTQ checkpoint depends on it (its key names it).
    env = {**os.environ, "QUANTKIT_STORE": str(tmp_path_factory.mktemp("cluster-ref-store")), "HF_HUB_OFFLINE": "1",
           "QUANTKIT_THREADS": GPU_THREADS}
    done = subprocess.run([sys.executable, "-m", "quantkit.cli", "run", "--no-publish", f"recipes/{NAME}.yaml"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return outcome(root / "runs" / NAME / "manifest.json")


class TwoNodes(RayCluster):
    """The head of RayCluster with no GPU, and a GPU node that joins it from an environment of its own."""

    head_gpus = 0

    def __init__(self, site: Site, tmp: Path):
        super().__init__(site)
        self.gpu_temp = tempfile.mkdtemp(prefix="qk-rayg-", dir="/tmp")  # its own session folder, as a machine has
        self.gpu_cache = tmp / "gpu-node-cache"  # its QUANTKIT_CACHE

    def start(self) -> None:
        super().start()
        (self.gpu_cache / "llama.cpp").parent.mkdir(parents=True)
        subprocess.run(["cp", "-al", str(cache_dir()), str(self.gpu_cache / "llama.cpp")], check=True)
        env = self.site.env | {"QUANTKIT_THREADS": GPU_THREADS, "QUANTKIT_CACHE": str(self.gpu_cache)}
        args = [str(BIN / "ray"), "start", "--address", self.address, "--num-cpus", "1", "--num-gpus", "1",
                "--disable-usage-stats", "--temp-dir", self.gpu_temp, *self.own_ports()]
        done = subprocess.run(args, cwd=self.site.root, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"

    def folders(self) -> tuple[str, ...]:
        return (*super().folders(), self.gpu_temp)


@pytest.fixture
def two_nodes(tmp_path, repo_root, tiny_llama):
    site = Site(tmp_path, repo_root, tiny_llama)
    (site.root / "recipes" / f"{NAME}.yaml").write_text(RECIPE)
    ray = TwoNodes(site, tmp_path)
    try:
        site.start_server()
        site.cli(str(BIN / "prefect"), "global-concurrency-limit", "create", "gpu", "--limit", "1")
        ray.start()
        yield site, ray
    finally:
        site.stop()  # the flow first: its driver must not outlive the cluster
        ray.stop()
    left = [(p.pid, " ".join(p.cmdline())[:200]) for p in ray.processes()]
    assert left == [], f"Ray processes of the test's cluster are left: {left}"


def gpu_worker_building_gptq(store: Path, gpu_cache: Path) -> int | None:
    """The pid of the Ray worker whose scratch holds a GPTQ staging folder (owner id ``<pid>-<random>``); it
    must be the GPU node's (its environment names that node's toolchain cache)."""
    for tmp in store.glob("scratch/*/gptq/.tmp-*"):
        pid = int(tmp.parents[1].name.split("-")[0])
        try:
            worker = psutil.Process(pid)
            env = worker.environ()
        except psutil.NoSuchProcess:
            continue
        assert env.get("QUANTKIT_CACHE") == str(gpu_cache), f"GPTQ is being built outside the GPU node: {env}"
        return pid
    return None


def test_gpu_kinds_run_on_the_gpu_node_and_survive_its_worker_loss(two_nodes, local_run):
    site, ray = two_nodes
    flow = site.spawn("flow", str(BIN / "python"), "flows/quantize.py", f"recipes/{NAME}.yaml", ray.address)
    deadline = time.monotonic() + 600
    while (pid := gpu_worker_building_gptq(site.store, ray.gpu_cache)) is None:
        assert flow.poll() is None, (site.logs / "flow.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "no Ray worker ever started building the GPTQ checkpoint"
        time.sleep(0.02)
    worker = psutil.Process(pid)
    for child in worker.children(recursive=True):
        child.kill()
    os.kill(pid, signal.SIGKILL)

    assert flow.wait(timeout=1800) == 0, (site.logs / "flow.log").read_text()[-4000:]
    log = (site.logs / "flow.log").read_text()
    assert "Using Ray cluster with 2 nodes" in log
    assert "A worker died or was killed while executing a task" in log  # Ray saw the loss and ran it again
    manifest = site.root / "runs" / NAME / "manifest.json"
    assert outcome(manifest) == local_run, "outputs of the cluster run differ from quantkit run's"

    steps = json.loads(manifest.read_text())["steps"]
    gpu_bin = str(ray.gpu_cache / "llama.cpp")
    on_gpu_node = {s["step"] for s in steps if s["toolchain_dir"].startswith(gpu_bin + os.sep)}
    gpu_kinds = {s["step"] for s in steps if KINDS[s["step"].split(":")[0]].gpu}
    assert {"imatrix", "gptq:GPTQ-4bit-g64"} <= gpu_kinds  # a llama.cpp tool and a torch one
    assert gpu_kinds <= on_gpu_node, f"GPU kinds that ran elsewhere: {sorted(gpu_kinds - on_gpu_node)}"
    for s in steps:
        if s["step"] in on_gpu_node:
            assert s["threads"] == int(GPU_THREADS) and not s["reused"], s
        else:  # the head: its own toolchain and threads
            assert s["toolchain_dir"].startswith(str(cache_dir()) + os.sep), s
            assert s["threads"] == int(HEAD_THREADS), s
    assert len({s["toolchain"] for s in steps}) == 1  # the same pinned build, from two folders
    assert not list(site.store.rglob(".tmp-*")), "temp folders left after the run"
    COUNTERS["Ray runs identical to quantkit run"] += 1
    COUNTERS["kill points survived"] += 1
