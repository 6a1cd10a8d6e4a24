"""Shared pytest fixtures."""

from __future__ import annotations

import os
import pathlib
import tempfile

import pytest

# tests/ has no __init__.py, so pytest puts it on sys.path and this imports.
from tinyllama import build_tiny_llama, source_digest

# GPTQModel's tokenicer points HF_HOME at /tmp/tokenicer_hf_home when it is unset, for the whole
# process and every process it starts; test modules import GPTQModel directly (importorskip), so
# pin HF_HOME to where huggingface_hub puts it anyway before any of them is collected.
os.environ.setdefault("HF_HOME", os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                              "huggingface"))

# A worker's vLLM environment turns every serve-hf node into a vLLM load: the suite runs as a worker without
# one, and the vLLM test names its environment itself (QUANTKIT_TEST_VLLM_PYTHON).
os.environ.pop("QUANTKIT_VLLM_PYTHON", None)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


# What quantkit, GPTQModel and its tokenicer would leave in the system temp folder if they leaked.
TEMP_LEAKS = ("quantkit-*", "gptqmodel_*", "lazyturtle-*", "tokenicer_hf_home")


@pytest.fixture(scope="session", autouse=True)
def nothing_leaks(tmp_path_factory):
    """After the session: nothing of quantkit's or GPTQModel's in the system temp folder, and no
    staging folder in any store the tests made (killed runs' ones are swept by their re-runs).

    The session gets a temp folder of its own (TMPDIR, inherited by every process the tests start),
    so another session on the machine cannot make this fail; the real one is checked for the names
    libraries write there directly (tokenicer's /tmp/tokenicer_hf_home)."""
    base = tmp_path_factory.getbasetemp()
    private = base / "system-tmp"
    private.mkdir()
    saved_env, saved_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    system = pathlib.Path(tempfile.gettempdir())
    os.environ["TMPDIR"] = str(private)
    tempfile.tempdir = None  # recomputed from TMPDIR
    before = {p for pattern in TEMP_LEAKS for p in system.glob(pattern)}
    yield
    leaked = [p for pattern in TEMP_LEAKS for p in private.glob(pattern)]
    leaked += [p for pattern in TEMP_LEAKS for p in system.glob(pattern) if p not in before]
    staging = [p for scratch in base.rglob("scratch") for p in scratch.glob("*/*/.tmp-*")]
    staging += [p for scratch in base.rglob("scratch") for p in scratch.parent.glob("*/.tmp-*")]
    if saved_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved_env
    tempfile.tempdir = saved_tempdir
    assert not leaked, f"temporary folders left in the system temp folder: {sorted(map(str, leaked))}"
    assert not staging, f"staging folders left in a store: {sorted(map(str, staging))}"


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


def _test_cache() -> pathlib.Path:
    return pathlib.Path(os.environ.get("QUANTKIT_TEST_CACHE", pathlib.Path.home() / ".cache" / "quantkit-tests"))


def _tiny_moe(family: str, tiny_llama: pathlib.Path) -> pathlib.Path:
    import tinymoe

    dest = _test_cache() / f"tiny-{family}-moe-{tinymoe.source_digest(family)}"
    if not (dest / "config.json").exists():
        tinymoe.build_tiny_moe(dest, family=family, tokenizer_from=tiny_llama)
    return dest


@pytest.fixture(scope="session")
def tiny_mixtral(tiny_llama) -> pathlib.Path:
    """A briefly trained tiny Mixtral (routed experts only; tests/tinymoe.py), cached like the tiny Llama."""
    return _tiny_moe("mixtral", tiny_llama)


@pytest.fixture(scope="session")
def tiny_ernie(tiny_llama) -> pathlib.Path:
    """A briefly trained tiny Ernie-4.5 MoE (routed experts and a shared expert; tests/tinymoe.py)."""
    return _tiny_moe("ernie", tiny_llama)


@pytest.fixture(scope="session")
def tiny_ernie_dead(tiny_ernie) -> pathlib.Path:
    """The tiny Ernie MoE with expert 3 never routed to (its router selection bias set to -1)."""
    import tinymoe

    dest = tiny_ernie.with_name(tiny_ernie.name + "-dead3")
    if not (dest / "config.json").exists():
        tinymoe.kill_expert(tiny_ernie, dest, 3)
    return dest


@pytest.fixture(scope="session")
def toolchain():
    """The pinned llama.cpp toolchain, found (never built); the test is skipped without it."""
    from quantkit.errors import ToolchainError
    from quantkit.toolchain import find_toolchain

    try:
        return find_toolchain()
    except ToolchainError as e:
        pytest.skip(f"no pinned llama.cpp toolchain ({e}); run `quantkit toolchain --build`")


@pytest.fixture(scope="session")
def tiny_f16_gguf(tiny_llama, toolchain, tmp_path_factory) -> pathlib.Path:
    """The tiny Llama converted to an F16 GGUF by the pinned converter (once per session)."""
    import sys

    from quantkit.proc import run_tool

    f16 = tmp_path_factory.mktemp("tiny-gguf") / "f16.gguf"
    run_tool([sys.executable, toolchain.convert_script, tiny_llama, "--outfile", f16, "--outtype", "f16"],
             env=toolchain.python_env())
    return f16


def pytest_terminal_summary(terminalreporter):
    from figures import COUNTERS

    if COUNTERS:
        terminalreporter.section("quantkit figures")
        terminalreporter.write_line(", ".join(f"{n} {what}" for what, n in COUNTERS.items()))
