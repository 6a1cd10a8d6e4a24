"""A short pause at the exit of llama-perplexity, so that llama.cpp's logger thread prints the last lines.

llama.cpp's logger (common/log.cpp, pinned commit) prints from a worker thread, and its singleton is never
destroyed (llama.cpp issue #22142), so nothing drains its queue at exit: on a busy machine the tail of the
output, where llama-perplexity prints its statistics, is lost from both ``--log-file`` and stdout. Measured
here on 2 cores with two busy loops beside it (20 runs of the tiny Llama, 8 chunks of 128): 6 of 20 logs
lost the final estimate; with this library preloaded, 0 of 40. Its destructor runs after ``main`` returns,
while the logger thread still runs, and waits ``PAUSE_US``. The numbers are the tool's own: nothing else
changes. Built once (into the llama.cpp cache folder, lib/) with the C compiler the toolchain build needs;
without one, the callers' retries remain.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from quantkit.toolchain import cache_dir

log = logging.getLogger(__name__)

PAUSE_US = 100_000
SOURCE = f"""#include <unistd.h>
__attribute__((destructor)) static void quantkit_drain_log(void) {{ usleep({PAUSE_US}); }}
"""


def library() -> Path | None:
    """The preloadable library (built on first use, keyed by its source); None off Linux or without a compiler."""
    if not sys.platform.startswith("linux"):
        return None
    out = cache_dir() / "lib" / f"drainlog-{hashlib.sha256(SOURCE.encode()).hexdigest()[:12]}.so"
    if out.is_file():
        return out
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    src, tmp = out.with_suffix(f".{os.getpid()}.c"), out.with_suffix(f".{os.getpid()}.tmp")
    try:
        src.write_text(SOURCE)
        subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", tmp, src], check=True, capture_output=True, timeout=60)
        os.replace(tmp, out)  # concurrent builders make the same file
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("could not build %s (%s): llama-perplexity's last lines may be lost on a busy machine", out.name, e)
        return None
    finally:
        for p in (src, tmp):
            with contextlib.suppress(OSError):
                p.unlink()
    return out


def preload_env() -> dict[str, str]:
    """The environment additions that preload the library (none when it is not available)."""
    lib = library()
    if lib is None:
        return {}
    before = os.environ.get("LD_PRELOAD")
    return {"LD_PRELOAD": f"{lib} {before}" if before else os.fspath(lib)}
