"""The one place quantkit runs an external tool.

Every command is an argument list (never a shell string), is logged, streams
its output line by line to the ``quantkit.tool`` logger (Prefect picks that up),
and on failure raises ToolError with the command, exit code and output tail.
"""

from __future__ import annotations

import collections
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import ToolError

log = logging.getLogger(__name__)
tool_log = logging.getLogger("quantkit.tool")

TAIL_LINES = 40
PROGRESS_EVERY = 30.0  # seconds between "still running" lines for long tools


@dataclass(frozen=True)
class ToolRun:
    command: tuple[str, ...]
    returncode: int
    seconds: float
    peak_rss_mib: float  # of the tool process itself (ru_maxrss of the child)
    output_tail: str


def run_tool(command: list[str | os.PathLike], *, cwd: Path | None = None, env: dict[str, str] | None = None,
             check: bool = True) -> ToolRun:
    argv = [os.fspath(a) for a in command]
    name = Path(argv[0]).name if not argv[0].endswith("python") else Path(argv[1]).name
    log.debug("running: %s (cwd=%s)", " ".join(argv), cwd or os.getcwd())
    full_env = {**os.environ, **(env or {})}
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    start = time.perf_counter()
    with subprocess.Popen(argv, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, text=True, errors="replace", bufsize=1) as proc:
        assert proc.stdout is not None
        next_progress = start + PROGRESS_EVERY
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            tool_log.debug("[%s] %s", name, line)
            now = time.perf_counter()
            if now >= next_progress and line.strip():
                log.info("%s running for %.0fs: %s", name, now - start, line.strip()[:160])
                next_progress = now + PROGRESS_EVERY
        # wait4 gives the child's own peak RSS, which benchmarks compare to the bare tool.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    run = ToolRun(tuple(argv), proc.returncode, seconds, usage.ru_maxrss / 1024, "\n".join(tail))
    if check and run.returncode != 0:
        raise ToolError(argv, run.returncode, run.output_tail)
    return run
