#!/usr/bin/env bash
# The GPU check (docs/gpu.md): on a CUDA machine, build the pinned llama.cpp with CUDA for this GPU
# only, run the demo's GGUF chain fully offloaded plus GPTQ/AWQ on CUDA, and write a JSON report
# compared with the CPU's figures. Everything but --prepare is quantkit/gpucheck.py (--help).
#
#   scripts/gpu-check.sh --prepare        # here (CPU, PyPI): pack .gpu-carry/ for a machine without network
#   scripts/gpu-check.sh --out gpu.json --cpu-reference .gpu-carry/cpu-reference.json   # there
#
# .gpu-carry/ holds what the GPU machine lacks (under the device tool's 64 MiB): model/ (the tests'
# tiny trained Llama, 19 MB: SmolLM2's 93 MB wheel does not fit), llama.cpp.tar.xz (the pinned source
# tree, trimmed to what the build and the converter need), wheels/ (the packages named in WHEELS, at the
# versions of this .venv) and cpu-reference.json (this check run here with --cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CARRY=.gpu-carry
# Python packages the GPU image (docs/gpu.md) lacks: quantkit's pydantic, GPTQModel and its needs.
# The image's own torch, transformers, accelerate, numpy, safetensors, pyarrow stay as they are.
WHEELS=(pydantic pydantic-core annotated-types typing-inspection gptqmodel optimum device-smi pypcre
        tokenicer logbar defuser dill datasets multiprocess torchao)

if [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi

prepare() {
  local src
  src=$("$PY" -c 'from quantkit.toolchain import _build_dir; print(_build_dir(False) / "src")')
  [ -f "$src/CMakeLists.txt" ] || { echo "gpu-check: error: no cached llama.cpp tree at $src (run scripts/setup.sh)" >&2; exit 2; }
  grep -qx '/.gpu-carry/' .git/info/exclude 2>/dev/null || echo '/.gpu-carry/' >> .git/info/exclude
  mkdir -p "$CARRY"
  # The source tree without what neither the build nor the converter reads (vocab test files, docs, CI),
  # compressed: about 60 MB as files, a fifth of that packed.
  local tree=$CARRY/llama.cpp
  rm -rf "$tree" "$CARRY/llama.cpp.tar.xz"
  cp -a "$src" "$tree"
  rm -rf "$tree"/{models,docs,media,.github,tests,benches,examples}
  tar -C "$CARRY" -cJf "$CARRY/llama.cpp.tar.xz" llama.cpp
  rm -rf "$tree"
  # Versions exactly as in this environment (where GPTQModel ran on CPU).
  rm -rf "$CARRY/wheels" && mkdir -p "$CARRY/wheels"
  local specs=() p v
  for p in "${WHEELS[@]}"; do
    v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p")
    specs+=("$p==$v")
  done
  printf '%s\n' "${specs[@]}" > "$CARRY/wheels/PACKAGES"
  # Binary wheels for the GPU machine's Python 3.12 where PyPI has them; the sdist-only ones (GPTQModel,
  # device-smi, ...) are pure Python and built into py3-none-any wheels here (pip's cache keeps those
  # setup.sh built).
  local s
  for s in "${specs[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
      -d "$CARRY/wheels" "$s" >/dev/null 2>&1 \
    || "$PY" -m pip wheel -q --no-deps -w "$CARRY/wheels" "$s" 2>&1 | { grep -v "is ignored: it is neither" || true; }
  done
  # A C extension built here is for this Python (3.11): carry its sdist instead, built there (pypcre).
  local whl name
  for whl in $(find "$CARRY/wheels" -name '*.whl' | grep -v -E -e '-(py3|py312|cp312|cp3[0-9]+-abi3)-'); do
    name=$(basename "$whl" | cut -d- -f1-2 | sed 's/-/==/; s/_/-/g')
    rm "$whl"
    "$PY" -m pip download -q --no-deps --no-binary :all: -d "$CARRY/wheels" "$name" 2>&1 \
      | { grep -v "is ignored: it is neither" || true; }
  done
  local n
  n=$(find "$CARRY/wheels" -name '*.whl' -o -name '*.tar.gz' | wc -l)
  [ "$n" -eq "${#specs[@]}" ] || { echo "gpu-check: error: $n files for ${#specs[@]} packages in $CARRY/wheels" >&2; exit 1; }
  "$PY" - "$CARRY" <<'EOF'
import logging, pathlib, shutil, sys
sys.path.insert(0, "tests")
from tinyllama import build_tiny_llama
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
dest = pathlib.Path(sys.argv[1]) / "model"
if not (dest / "config.json").is_file():
    build_tiny_llama(dest)
EOF
  "$PY" -m quantkit.gpucheck --cpu --model "$CARRY/model" --out "$CARRY/cpu-reference.json" "$@"
  echo "gpu-check: $CARRY is $(du -sm "$CARRY" | cut -f1) MiB (the device tool carries 64 MiB with the repo)"
}

for a in "$@"; do
  if [ "$a" = "--prepare" ]; then
    args=()
    for b in "$@"; do [ "$b" = "--prepare" ] || args+=("$b"); done
    prepare "${args[@]+"${args[@]}"}"
    exit 0
  fi
done

# On the GPU machine: unpack the carried source tree, install the carried wheels beside the image's packages (no network there).
if [ -f "$CARRY/llama.cpp.tar.xz" ] && [ ! -d "$CARRY/llama.cpp" ]; then
  tar -C "$CARRY" -xJf "$CARRY/llama.cpp.tar.xz"
fi
if [ -d "$CARRY/wheels" ] && ! "$PY" -c 'import pydantic, gptqmodel' 2>/dev/null; then
  site=${TMPDIR:-/tmp}/quantkit-gpu-site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$CARRY"/wheels/*.whl
  # sdists of C extensions (pypcre): built there, with the machine's compiler and setuptools.
  if compgen -G "$CARRY/wheels/*.tar.gz" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$site" \
      "$CARRY"/wheels/*.tar.gz
  fi
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
# quantkit from this checkout; gguf-py from the pinned tree when the gguf package is missing.
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
if ! "$PY" -c 'import gguf' 2>/dev/null && [ -d "$CARRY/llama.cpp/gguf-py" ]; then
  export PYTHONPATH=$PYTHONPATH:$ROOT/$CARRY/llama.cpp/gguf-py
fi
# ninja when there is one: the CUDA objects build faster than with make.
if [ -z "${CMAKE_GENERATOR:-}" ] && command -v ninja >/dev/null; then export CMAKE_GENERATOR=Ninja; fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PY" -m quantkit.gpucheck "$@"
