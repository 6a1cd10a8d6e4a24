"""Shared pytest fixtures."""

from __future__ import annotations

import os
import pathlib

import pytest

# tests/ has no __init__.py, so pytest puts it on sys.path and this imports.
from tinyllama import build_tiny_llama, source_digest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_llama() -> pathlib.Path:
    """Path of a trained tiny Llama HF checkpoint (see tests/tinyllama.py).

    Cached across sessions; the directory name carries a digest of the
    builder's source and training texts, so changing either rebuilds it.
    The first build takes a few minutes on two cores.
    """
    cache = pathlib.Path(os.environ.get("QUANTKIT_TEST_CACHE", pathlib.Path.home() / ".cache" / "quantkit-tests"))
    dest = cache / f"tiny-llama-{source_digest()}"
    if not (dest / "config.json").exists():
        build_tiny_llama(dest)
    return dest


def pytest_terminal_summary(terminalreporter):
    from figures import COUNTERS

    if COUNTERS:
        terminalreporter.section("quantkit figures")
        terminalreporter.write_line(", ".join(f"{n} {what}" for what, n in COUNTERS.items()))
