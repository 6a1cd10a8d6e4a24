"""The CUDA build without building it (issue 29): its flags, how the compiler, cuBLAS and libcuda are
found, the link-time driver stub, and that the CUDA build stays apart from the CPU one.

The build itself (tens of minutes on 2 cores) is not run here; docs/gpu.md records it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from quantkit import toolchain
from quantkit.errors import ToolchainError
from quantkit.toolchain import NoCublas, NoCudaCompiler, cmake_args, find_cuda_toolkit, find_nvcc


def _flags(args: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in args if a.startswith("-D"))


# --- flags -----------------------------------------------------------------------------------------

def test_cuda_flags_build_what_quantkit_uses_and_no_more():
    cuda, cpu = _flags(cmake_args(cuda=True, cuda_arch="90")), _flags(cmake_args(cuda=False))
    assert cuda["GGML_CUDA"] == "ON" and cuda["CMAKE_CUDA_ARCHITECTURES"] == "90"
    assert cuda["GGML_CUDA_FA_ALL_QUANTS"] == "OFF"  # every K/V quant pair multiplies the FA kernels
    assert cuda["GGML_CUDA_NCCL"] == "OFF"  # one GPU a worker; the same build with or without NCCL around
    assert not any(k.startswith("GGML_CUDA_") for k in cpu)
    # Everything else is the CPU build's: the same tools, the same commit.
    same = {k: v for k, v in cpu.items() if k not in ("GGML_CUDA", "GGML_NATIVE")}
    assert {k: cuda[k] for k in same} == same


def test_cuda_and_cpu_builds_have_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path))
    cuda, cpu = toolchain._build_dir(True), toolchain._build_dir(False)
    assert cuda != cpu and cuda.parent == cpu.parent == tmp_path / "llama.cpp"
    assert cuda.name.endswith("-cuda") and cpu.name.endswith("-cpu")


# --- the compiler ----------------------------------------------------------------------------------

def _exe(path: Path, text: str = "#!/bin/sh\nexit 0\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_compiler_order_cudacxx_path_cuda_home(tmp_path):
    mine = _exe(tmp_path / "mine" / "nvcc")
    on_path = _exe(tmp_path / "path" / "nvcc")
    home = _exe(tmp_path / "home" / "bin" / "nvcc")
    env = {"CUDACXX": str(mine), "PATH": str(on_path.parent), "CUDA_HOME": str(home.parent.parent)}
    assert find_nvcc(env) == mine
    del env["CUDACXX"]
    assert find_nvcc(env) == on_path
    env["PATH"] = str(tmp_path / "empty")
    assert find_nvcc(env) == home
    assert find_nvcc({"PATH": "", "CUDA_PATH": str(home.parent.parent)}) == home


@pytest.mark.parametrize("env, message", [
    ({"PATH": ""}, "no CUDA compiler for the CUDA build: CUDACXX unset, no nvcc on PATH, CUDA_HOME and CUDA_PATH unset"),
    ({"PATH": "", "CUDACXX": "/nonexistent/nvcc"}, "CUDACXX=/nonexistent/nvcc is not an executable CUDA compiler"),
    ({"PATH": "", "CUDA_HOME": "/nonexistent"}, "CUDA_HOME=/nonexistent has no bin/nvcc"),
])
def test_no_compiler_is_a_clear_error(env, message):
    with pytest.raises(NoCudaCompiler) as e:
        find_nvcc(env)
    assert str(e.value) == message
    assert "nvcc" in e.value.tip and "CUDA Toolkit" in e.value.tip  # what to install


def test_cli_without_nvcc_says_what_to_install_and_builds_nothing(tmp_path, monkeypatch, capsys):
    from quantkit.cli import main

    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvcc, no llama.cpp
    for var in ("CUDACXX", "CUDA_HOME", "CUDA_PATH", toolchain.ENV_BIN, toolchain.ENV_SRC):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(toolchain, "run_tool", lambda *a, **kw: pytest.fail("ran a tool"))
    monkeypatch.setattr(toolchain, "fetch_source", lambda dest: pytest.fail("fetched the source"))
    assert main(["toolchain", "--build", "--cuda", "--cuda-arch", "90"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: no CUDA compiler for the CUDA build: CUDACXX unset, no nvcc on PATH, CUDA_HOME and "
                   "CUDA_PATH unset", f"tip: {toolchain.NO_NVCC_TIP}"]
    assert not (tmp_path / "cache").exists()  # refused before anything was made


def _fake_nvcc(tmp_path: Path, root: Path) -> Path:
    """An nvcc that answers --dryrun as NVIDIA's does (a wrapper script somewhere else, like /usr/local/bin/nvcc)."""
    return _exe(tmp_path / "wrapper" / "nvcc", f"#!/bin/sh\necho '#$ _NVVM_BRANCH_=nvvm'\necho '#$ TOP={root}/bin/..'\n")


def test_toolkit_root_comes_from_nvcc_itself(tmp_path, monkeypatch):
    root = tmp_path / "cuda-13.0"
    (root / "include").mkdir(parents=True)
    (root / "include" / "cublas_v2.h").write_text("")
    (root / "lib64" / "stubs").mkdir(parents=True)
    (root / "lib64" / "stubs" / "libcuda.so").write_text("")
    kit = find_cuda_toolkit({"PATH": "", "CUDACXX": str(_fake_nvcc(tmp_path, root))})
    assert kit.root == root and kit.cublas_include is None and kit.cublas_lib is None
    assert kit.driver_lib == root / "lib64" / "stubs" / "libcuda.so"
    hints = _flags(kit.cmake_hints(tmp_path / "stub" / "libcuda.so"))
    assert hints == {"CMAKE_CUDA_COMPILER": str(kit.nvcc), "CUDA_cuda_driver_LIBRARY": str(kit.driver_lib)}


def test_slim_toolkit_takes_cublas_from_the_wheel_and_stubs_the_driver(tmp_path, monkeypatch):
    root = tmp_path / "cuda"
    (root / "include").mkdir(parents=True)
    wheel = tmp_path / "site-packages" / "nvidia" / "cu13"
    (wheel / "include").mkdir(parents=True)
    (wheel / "include" / "cublas_v2.h").write_text("")
    (wheel / "lib").mkdir()
    for lib in ("libcublas.so.13", "libcublasLt.so.13"):
        (wheel / "lib" / lib).write_text("")
    monkeypatch.setattr(toolchain, "_wheel_cuda_dirs", lambda: [wheel])
    kit = find_cuda_toolkit({"PATH": "", "CUDACXX": str(_fake_nvcc(tmp_path, root))})
    if kit.driver_lib is not None:
        pytest.skip(f"this machine has {kit.driver_lib}")
    stub = tmp_path / "build" / "cuda-stub" / "libcuda.so"
    hints = _flags(kit.cmake_hints(stub))
    assert hints["CUDA_cublas_LIBRARY"] == str(wheel / "lib" / "libcublas.so.13")
    assert hints["CUDA_cublasLt_LIBRARY"] == str(wheel / "lib" / "libcublasLt.so.13")
    assert hints["CMAKE_CUDA_STANDARD_INCLUDE_DIRECTORIES"] == str(wheel / "include")
    assert hints["CUDA_cuda_driver_LIBRARY"] == str(stub)
    # No wheel either: the error names the wheel to install.
    monkeypatch.setattr(toolchain, "_wheel_cuda_dirs", lambda: [])
    with pytest.raises(NoCublas, match=f"toolkit at {root} has no cuBLAS") as e:
        find_cuda_toolkit({"PATH": "", "CUDACXX": str(_fake_nvcc(tmp_path, root))})
    assert "pip install nvidia-cublas" in e.value.tip


def test_this_machines_toolkit_if_any():
    """Where nvcc is installed (the CUDA build's machine), detection finds a whole toolkit or says why not."""
    try:
        nvcc = find_nvcc()
    except NoCudaCompiler:
        pytest.skip("no nvcc here")
    try:
        kit = find_cuda_toolkit()
    except NoCublas:
        return  # a slim toolkit without the cuBLAS wheel: the error is the answer
    assert kit.nvcc == nvcc and (kit.root / "bin" / "nvcc").is_file()
    assert (kit.cublas_include or kit.root / "include").is_dir()


# --- the link-time driver stub ---------------------------------------------------------------------

needs_cc = pytest.mark.skipif(not all(shutil.which(t) for t in ("cc", "ar", "nm", "readelf")),
                              reason="needs cc, ar, nm and readelf (binutils)")


@needs_cc
def test_driver_stub_defines_what_the_archive_calls(tmp_path):
    # An archive like libggml-cuda.a: calls into the driver (cu*), the runtime (cuda*) and cuBLAS (cublas*).
    (tmp_path / "pool.c").write_text("int cuMemCreate(void); int cuDeviceGet(void); int cudaMalloc(void);\n"
                                     "int cublasCreate_v2(void);\n"
                                     "int pool(void) { return cuMemCreate() + cuDeviceGet() + cudaMalloc()"
                                     " + cublasCreate_v2(); }\n")
    subprocess.run(["cc", "-c", "-fPIC", "-o", tmp_path / "pool.o", tmp_path / "pool.c"], check=True)
    subprocess.run(["ar", "rcs", tmp_path / "libpool.a", tmp_path / "pool.o"], check=True)
    assert toolchain.driver_symbols(tmp_path / "libpool.a") == ["cuDeviceGet", "cuMemCreate"]
    stub = toolchain.write_driver_stub(tmp_path / "libpool.a", tmp_path / "stub" / "libcuda.so")
    defined = subprocess.run(["nm", "-D", "--defined-only", "--format=just-symbols", stub], capture_output=True,
                             text=True, check=True).stdout.split()
    assert {"cuDeviceGet", "cuMemCreate"} <= set(defined) and "cudaMalloc" not in defined
    dynamic = subprocess.run(["readelf", "-d", stub], capture_output=True, text=True, check=True).stdout
    assert "Library soname: [libcuda.so.1]" in dynamic  # what a binary linked with it asks for at run time


@needs_cc
def test_an_archive_without_driver_calls_gets_no_stub(tmp_path):
    (tmp_path / "x.c").write_text("int x(void) { return 1; }\n")
    subprocess.run(["cc", "-c", "-o", tmp_path / "x.o", tmp_path / "x.c"], check=True)
    subprocess.run(["ar", "rcs", tmp_path / "libx.a", tmp_path / "x.o"], check=True)
    with pytest.raises(ToolchainError, match="calls no CUDA driver function"):
        toolchain.write_driver_stub(tmp_path / "libx.a", tmp_path / "libcuda.so")
    assert not (tmp_path / "libcuda.so").exists()


def test_version_check_loads_the_stub_only_without_a_driver(tmp_path, monkeypatch):
    binary = tmp_path / "build" / "bin" / "llama-perplexity"
    binary.parent.mkdir(parents=True)
    assert toolchain._version_env(binary) is None  # no stub: the environment as it is
    stub = tmp_path / "build" / toolchain.VERSION_STUB_DIR
    stub.mkdir()
    (stub / "libcuda.so.1").write_text("")
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/lib")
    monkeypatch.setattr(toolchain, "_driver_loadable", lambda: False)
    assert toolchain._version_env(binary)["LD_LIBRARY_PATH"] == f"{stub}{os.pathsep}/opt/lib"
    monkeypatch.setattr(toolchain, "_driver_loadable", lambda: True)
    assert toolchain._version_env(binary) is None  # the real driver wins
