#!/usr/bin/env bash
# The GPU check (docs/gpu.md): the demo's GGUF chain on llama.cpp's CUDA build with every layer offloaded,
# plus GPTQ/AWQ on CUDA, in a JSON report compared with the same chain on the CPU.
#
#   scripts/gpu-check.sh --prepare [--skip-gptq]   # here (CPU, nvcc, PyPI): pack .gpu-carry/ and the CPU reference
#   scripts/gpu-check.sh --cpu --out cpu.json      # here: the same chain on the CPU build (the reference)
#   scripts/gpu-check.sh --out gpu.json            # on the lent GPU: unpack .gpu-carry/, run, compare
#
# .gpu-carry/ (listed with sizes and sha256 in its MANIFEST.json; under the device tool's 64 MiB with the
# repository) holds llama-cuda.tar.xz (the CUDA build's tools, sm_90, stripped: built here with
# `quantkit toolchain --build --cuda --cuda-arch 90`, never on the GPU), llama-src.tar.xz (the pinned
# converter and gguf-py), model/ (the tests' tiny trained Llama), wheels/ (what the lent machine's Python
# lacks) and cpu-reference.json. Everything but --prepare and the unpacking is `quantkit gpu-check` (quantkit/gpucheck.py; --help).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CARRY=.gpu-carry
# Python packages the lent machine lacks (docs/gpu.md): quantkit's pydantic; GPTQModel and its needs.
# Its own torch, transformers, accelerate, numpy, safetensors, pyarrow stay as they are.
WHEELS=(pydantic pydantic-core annotated-types typing-inspection)
GPTQ_WHEELS=(gptqmodel optimum device-smi pypcre tokenicer logbar defuser dill datasets multiprocess torchao)

if [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

wheels() {  # the named packages at this environment's versions, for the lent machine's Python 3.12
  local specs=() p v s
  for p in "$@"; do
    v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p")
    specs+=("$p==$v")
  done
  printf '%s\n' "${specs[@]}" >> "$CARRY/wheels/PACKAGES"
  # Binary wheels where PyPI has them; the sdist-only ones (GPTQModel, device-smi, ...) are pure Python and
  # built into py3-none-any wheels here (pip's cache keeps those setup.sh built).
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
    "$PY" -m pip download -q --no-deps --no-binary "${name%%==*}" -d "$CARRY/wheels" "$name" 2>&1 \
      | { grep -v "is ignored: it is neither" || true; }
  done
}

prepare() {
  local skip_gptq=0 a
  for a in "$@"; do [ "$a" = "--skip-gptq" ] && skip_gptq=1; done
  # Kept out of `git status` (a clone may have no .git/info; a copy without .git skips this).
  local exclude
  if exclude=$(git rev-parse --git-path info/exclude 2>/dev/null); then
    mkdir -p "$(dirname "$exclude")"
    for d in /.gpu-carry/ /.gpu-carry.partial/; do grep -qx "$d" "$exclude" 2>/dev/null || echo "$d" >> "$exclude"; done
  fi
  # Packed beside the last carry, which is replaced only when this one is complete.
  local final=$CARRY
  CARRY=$CARRY.partial
  rm -rf "$CARRY" && mkdir -p "$CARRY/wheels"
  trap 'rm -rf "$CARRY"' EXIT
  # The CUDA tools (refused unless built for sm_90 only) and the converter's tree.
  "$PY" - "$CARRY" <<'EOF'
import json, pathlib, sys
from quantkit import gpucheck
from quantkit.toolchain import _build_dir, is_pinned_source
carry = pathlib.Path(sys.argv[1])
try:
    binaries = gpucheck.pack_cuda_binaries(_build_dir(True), carry / gpucheck.CUDA_BINARIES)
except gpucheck.GpuCheckError as e:
    sys.exit(f"gpu-check: error: {e}")
src = next((s for s in (_build_dir(True) / "src", _build_dir(False) / "src") if is_pinned_source(s)), None)
if src is None:
    sys.exit("gpu-check: error: no pinned llama.cpp tree in the cache (quantkit toolchain --build)")
source = gpucheck.pack_source(src, carry / gpucheck.SOURCE_TREE)
(carry / "pack.json").write_text(json.dumps({"cuda_binaries": binaries, "source": source}, indent=1))
EOF
  wheels "${WHEELS[@]}"
  [ "$skip_gptq" = 1 ] || wheels "${GPTQ_WHEELS[@]}"
  local n want
  n=$(find "$CARRY/wheels" -name '*.whl' -o -name '*.tar.gz' | wc -l)
  want=$(wc -l < "$CARRY/wheels/PACKAGES")
  [ "$n" -eq "$want" ] || { echo "gpu-check: error: $n files for $want packages in $CARRY/wheels" >&2; exit 1; }
  # The tests' tiny trained Llama (19 MB; the demo's SmolLM2 is 93 MB): the tests' cached copy when there is one.
  "$PY" - "$CARRY" <<'EOF'
import logging, os, pathlib, shutil, sys
sys.path.insert(0, "tests")
from tinyllama import build_tiny_llama, source_digest
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
cache = pathlib.Path(os.environ.get("QUANTKIT_TEST_CACHE", pathlib.Path.home() / ".cache" / "quantkit-tests"))
model = cache / f"tiny-llama-{source_digest()}"
if not (model / "config.json").is_file():
    build_tiny_llama(model)
shutil.copytree(model, pathlib.Path(sys.argv[1]) / "model")
EOF
  # The reference: the same chain on this machine's CPU build.
  "$PY" -m quantkit.cli gpu-check --cpu --model "$CARRY/model" --out "$CARRY/cpu-reference.json" "$@"
  "$PY" - "$CARRY" <<'EOF'
import json, pathlib, sys
from quantkit import gpucheck
carry = pathlib.Path(sys.argv[1])
details = json.loads((carry / "pack.json").read_text())
(carry / "pack.json").unlink()
try:
    m = gpucheck.write_carry_manifest(carry, repo_bytes=gpucheck.repository_bytes(pathlib.Path(".")),
                                      details=details)
except gpucheck.GpuCheckError as e:
    sys.exit(f"gpu-check: error: {e}")
print(f"gpu-check: the carry is {m['carried_bytes'] / 2**20:.1f} MiB, with the repository "
      f"{m['total_bytes'] / 2**20:.1f} MiB of the {m['limit_bytes'] / 2**20:.0f} MiB a device call carries")
EOF
  rm -rf "$final" && mv "$CARRY" "$final"
  trap - EXIT
  echo "gpu-check: packed $final/"
}

cpu=0
for a in "$@"; do
  case "$a" in
    --prepare)
      args=()
      for b in "$@"; do [ "$b" = "--prepare" ] || args+=("$b"); done
      prepare "${args[@]+"${args[@]}"}"
      exit 0 ;;
    --cpu) cpu=1 ;;
  esac
done

export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# The carry only where there is a GPU to run it on (elsewhere gpucheck says there is none).
if [ "$cpu" = 0 ] && [ -f "$CARRY/MANIFEST.json" ] && command -v nvidia-smi >/dev/null; then
  # On the lent machine: install the carried wheels beside its own packages (no network there), then
  # check and unpack the carry and run on its binaries (never built there).
  if [ -d "$CARRY/wheels" ] && ! "$PY" -c 'import pydantic' 2>/dev/null; then
    site=${TMPDIR:-/tmp}/quantkit-gpu-site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$CARRY"/wheels/*.whl
    # sdists of C extensions (pypcre): built there, with the machine's compiler and setuptools.
    if compgen -G "$CARRY/wheels/*.tar.gz" >/dev/null; then
      "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$site" \
        "$CARRY"/wheels/*.tar.gz
    fi
    export PYTHONPATH=$PYTHONPATH:$site
  fi
  unpacked=${TMPDIR:-/tmp}/quantkit-gpu-carry
  mkdir -p "$unpacked"
  eval "$("$PY" - "$CARRY" "$unpacked" <<'EOF'
import pathlib, shlex, sys
from quantkit.gpucheck import GpuCheckError, unpack_carry
try:
    env = unpack_carry(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]))
except GpuCheckError as e:
    print(f"echo {shlex.quote(f'gpu-check: error: {e}')} >&2; exit 2")
else:
    print("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
EOF
)"
  # gguf-py of the pinned tree for quantkit itself (the converter finds its own).
  export PYTHONPATH=$PYTHONPATH:$QUANTKIT_LLAMA_CPP_SRC/gguf-py
  extra=(--no-build)
  case " $* " in *" --cpu-reference "* | *" --cpu-reference="*) ;; *) extra+=(--cpu-reference "$CARRY/cpu-reference.json") ;; esac
  exec "$PY" -m quantkit.cli gpu-check "${extra[@]}" "$@"
fi
exec "$PY" -m quantkit.cli gpu-check "$@"
