"""A real Prefect server and worker lose their machine during quantization; the run is retried.

The worker and the flow run it started are SIGKILLed while llama-quantize writes a type (a lost
machine: nothing gets to report). The heartbeat automation (flows/zombies.py) marks the run
Crashed; `prefect flow-run retry` hands it to a fresh worker, which finishes it from the store. The
published GGUFs equal an uninterrupted `quantkit run`'s, byte for byte.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from uuid import UUID

import pytest

pytest.importorskip("prefect", reason="the Prefect flow needs the 'prefect' extra")
psutil = pytest.importorskip("psutil")

from figures import COUNTERS  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.settings import PREFECT_API_URL, temporary_settings  # noqa: E402
from test_pipeline import make_project, tiny_recipe  # noqa: E402

pytestmark = pytest.mark.slow

NAME = "tiny-worker-kill"
RECIPE = tiny_recipe(NAME, """\
gguf:
  imatrix: {enabled: true, ctx: 128, chunks: 8}
  types: [Q8_0, Q4_K_M, Q2_K]
""")
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Site:
    """A project folder, a store and a Prefect server of their own."""

    def __init__(self, root: Path, repo_root: Path, tiny_llama: Path):
        self.root, self.store = root / "project", root / "store"
        make_project(self.root, repo_root, tiny_llama).unlink()
        (self.root / "recipes" / f"{NAME}.yaml").write_text(RECIPE)
        shutil.copytree(repo_root / "flows", self.root / "flows", ignore=shutil.ignore_patterns("__pycache__"))
        self.url = f"http://127.0.0.1:{free_port()}/api"
        self.env = {**os.environ, "PREFECT_API_URL": self.url, "PREFECT_HOME": str(root / "prefect-home"),
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOCAL_STORAGE_PATH": str(root / "results"),
                    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30", "QUANTKIT_PROJECT": str(self.root),
                    "QUANTKIT_STORE": str(self.store), "QUANTKIT_THREADS": "2", "HF_HUB_OFFLINE": "1"}
        self.logs = root / "logs"
        self.logs.mkdir()
        self.procs: list[subprocess.Popen] = []

    def cli(self, *args: str) -> str:
        done = subprocess.run(args, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(args, cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_server(self) -> None:
        server = self.spawn("server", str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                            "--port", self.url.split(":")[2].split("/")[0])
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert server.poll() is None, (self.logs / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return
            except OSError:
                time.sleep(1)
        pytest.fail("the Prefect server did not answer within 180 s")

    def flow_run_state(self, run_id: str) -> str:
        with temporary_settings({PREFECT_API_URL: self.url}), get_client(sync_client=True) as client:
            return client.read_flow_run(UUID(run_id)).state.name

    def wait_state(self, run_id: str, wanted: set[str], timeout: float, proc: subprocess.Popen | None = None) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.flow_run_state(run_id)
            if state in wanted:
                return state
            if proc is not None and proc.poll() is not None:
                pytest.fail(f"the worker exited: {(self.logs / 'worker-2.log').read_text()[-3000:]}")
            time.sleep(3)
        pytest.fail(f"flow run {run_id} still {state} after {timeout:.0f} s (wanted {wanted})")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def lose_machine(worker: subprocess.Popen) -> int:
    """SIGKILL the worker's process group and every flow run it started (each has a session of its own)."""
    children = psutil.Process(worker.pid).children(recursive=True)
    groups = {worker.pid} | {os.getpgid(c.pid) for c in children if c.is_running()}
    for group in groups:
        os.killpg(group, signal.SIGKILL)
    worker.wait()
    return len(children)


def ggufs(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.gguf"))}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, repo_root, tiny_llama):
    root = tmp_path_factory.mktemp("ref")
    make_project(root, repo_root, tiny_llama).unlink()
    (root / "recipes" / f"{NAME}.yaml").write_text(RECIPE)
    env = {**os.environ, "QUANTKIT_STORE": str(tmp_path_factory.mktemp("ref-store")), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "quantkit.cli", "run", f"recipes/{NAME}.yaml"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return ggufs(root / "artifacts" / NAME / "latest")


def test_worker_sigkill_then_flow_run_retry(tmp_path, repo_root, tiny_llama, uninterrupted):
    site = Site(tmp_path, repo_root, tiny_llama)
    prefect = str(BIN / "prefect")
    try:
        site.start_server()
        site.cli(prefect, "work-pool", "create", "local", "--type", "process")
        site.cli(prefect, "global-concurrency-limit", "create", "gpu", "--limit", "1")
        site.cli(str(BIN / "python"), "flows/zombies.py")
        site.cli(str(BIN / "quantkit"), "deployments")
        site.cli(prefect, "--no-prompt", "deploy", "--all")
        worker = site.spawn("worker-1", prefect, "worker", "start", "--pool", "local", "--name", "w1")
        out = site.cli(prefect, "deployment", "run", f"quantize/{NAME}")
        run_id = next(w for w in out.split() if w.count("-") == 4 and len(w) == 36)

        deadline = time.monotonic() + 600
        while not any(site.store.glob("scratch/*/quantize/.tmp-*")):  # staging, in the run's scratch folder
            assert time.monotonic() < deadline, "the flow run never reached llama-quantize"
            assert worker.poll() is None, (site.logs / "worker-1.log").read_text()[-3000:]
            time.sleep(0.01)
        assert lose_machine(worker) >= 1, "no flow-run process was running under the worker"
        assert site.flow_run_state(run_id) == "Running"  # nothing reported the loss

        # Three missed heartbeats of 30 s, plus the automation service's own period.
        assert site.wait_state(run_id, {"Crashed", "Completed", "Failed"}, timeout=300) == "Crashed"

        worker = site.spawn("worker-2", prefect, "worker", "start", "--pool", "local", "--name", "w2")
        site.cli(prefect, "flow-run", "retry", run_id)
        assert site.wait_state(run_id, {"Completed", "Failed", "Crashed"}, timeout=600, proc=worker) == "Completed", \
            (site.logs / "worker-2.log").read_text()[-3000:]
    finally:
        site.stop()

    published = site.root / "artifacts" / NAME
    assert [p.name for p in published.iterdir() if ".tmp-" in p.name] == []
    assert ggufs(published / "latest") == uninterrupted, "GGUFs after the retry differ from an uninterrupted run"
    assert not list(site.store.rglob(".tmp-*")), "temp folders left after the retry"
    COUNTERS["kill points survived"] += 1
