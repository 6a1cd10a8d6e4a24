"""quantkit.drainlog: a preloaded pause at exit lets a logger thread print what the main thread left it."""

import shutil
import subprocess

import pytest

from quantkit import drainlog

# What llama.cpp's logger does: a worker thread prints after main has returned; nothing joins it.
PROGRAM = r"""
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
static void *late(void *arg) { usleep(40000); fputs("Final estimate: PPL = 1.0\n", stdout); fflush(stdout); return 0; }
int main(void) { pthread_t t; pthread_create(&t, 0, late, 0); puts("started"); fflush(stdout); return 0; }
"""


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (the toolchain build needs one)")
    d = tmp_path_factory.mktemp("drain")
    (d / "late.c").write_text(PROGRAM)
    subprocess.run([cc, "-O2", "-pthread", "-o", d / "late", d / "late.c"], check=True)
    return d / "late"


def test_the_last_line_is_printed_only_with_the_pause(program, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    env = drainlog.preload_env()
    assert drainlog.library() is not None and env["LD_PRELOAD"].endswith(".so")
    without = subprocess.run([program], capture_output=True, text=True, check=True).stdout
    assert without == "started\n"  # the thread's line is lost: main returned first
    with_pause = subprocess.run([program], capture_output=True, text=True, check=True, env=env).stdout
    assert with_pause == "started\nFinal estimate: PPL = 1.0\n"


def test_a_preload_already_set_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LD_PRELOAD", "/opt/other.so")
    lib = drainlog.library()
    if lib is None:
        pytest.skip("no C compiler")
    assert drainlog.preload_env() == {"LD_PRELOAD": f"{lib} /opt/other.so"}
