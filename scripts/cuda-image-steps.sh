#!/usr/bin/env bash
# Run Dockerfile.cuda's RUN steps here, without a Docker engine, so the image's recipe is exercised
# (docs/gpu.md). The steps are read from the Dockerfile itself, not copied: its ARG and ENV lines give
# their environment, with the image's folders (/opt/..., /data/...) moved under WORK; COPY copies from
# this checkout into WORK; WORKDIR is where each step runs. A step under a comment
# `# image-steps: skip: REASON` is not run (it needs more network than the package registries, or a GPU).
#
#   scripts/cuda-image-steps.sh --list                       # each step, run or skipped, syntax-checked; runs nothing
#   scripts/cuda-image-steps.sh [--work DIR] [--steps 2,3] [--build-arg NAME=VALUE]... [--cache DIR] [--file F]
#
# Here the torch step's index is PyPI (--build-arg TORCH_INDEX=...; download.pytorch.org is not reachable):
# pip then takes the CPU wheel of the same version where one is on its find-links. --cache points
# QUANTKIT_CACHE of the toolchain step at an existing build (the CUDA build takes tens of minutes on 2
# cores); --build-arg CUDA_ARCHITECTURES=90 matches `quantkit toolchain --build --cuda --cuda-arch 90`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${TMPDIR:-/tmp}/quantkit-image-steps
LIST=0 STEPS="" CACHE="" DOCKERFILE=$ROOT/Dockerfile.cuda
BUILD_ARGS=("TORCH_INDEX=https://pypi.org/simple")
while [ $# -gt 0 ]; do
  case "$1" in
    --list) LIST=1 ;;
    --work) WORK=$2; shift ;;
    --steps) STEPS=$2; shift ;;
    --build-arg) BUILD_ARGS+=("$2"); shift ;;
    --cache) CACHE=$2; shift ;;
    --file) DOCKERFILE=$2; shift ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "cuda-image-steps: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -x .venv/bin/python ]; then PY=${PYTHON:-$ROOT/.venv/bin/python}; else PY=${PYTHON:-python3}; fi

# The Dockerfile as a list of steps (JSON): the parsing is Python's, the running bash's.
plan=$("$PY" - "$DOCKERFILE" "$WORK" "$CACHE" "${BUILD_ARGS[@]}" <<'EOF'
import json, os, re, shlex, sys

dockerfile, work, cache, *overrides = sys.argv[1:]
lines = open(dockerfile, encoding="utf-8").read().split("\n")
# Instructions with their continuation lines joined; the comment above each one kept.
instrs, comment, buf = [], [], ""
for n, line in enumerate(lines, 1):
    if buf and line.lstrip().startswith("#"):
        continue  # a comment inside a continued instruction is dropped, as Docker does
    if not buf and line.lstrip().startswith("#"):
        comment.append(line.lstrip("# ").rstrip())
        continue
    if not buf and not line.strip():
        comment = []
        continue
    if not buf:
        start = n
    if line.rstrip().endswith("\\"):
        buf += line.rstrip()[:-1] + " "  # Docker drops the backslash and the line break
        continue
    buf += line
    word, _, rest = buf.strip().partition(" ")
    instrs.append({"line": start, "op": word.upper(), "text": rest.strip(), "comment": comment})
    buf, comment = "", []

args = dict(o.split("=", 1) for o in overrides)
def here(value: str) -> str:
    """An image folder moved under WORK (/opt/venv -> WORK/opt/venv)."""
    return re.sub(r"(?<![\w/])/(opt|data)/", lambda m: f"{work}/{m.group(1)}/", value)
def expand(value: str, env: dict) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), os.environ.get(m.group(1) or m.group(2), "")), value)

env, steps, workdir, run_no = {}, [], work, 0
for ins in instrs:
    op, text = ins["op"], ins["text"]
    if op == "ARG":
        name, _, default = text.partition("=")
        if name not in args and name != "CUDA_IMAGE":
            args[name] = shlex.split(default)[0] if default else ""
        if name in args:
            env[name] = args[name]
    elif op == "ENV":
        for pair in shlex.split(text):
            name, _, value = pair.partition("=")
            env[name] = here(expand(value, {**os.environ, **env}))
    elif op == "WORKDIR":
        workdir = here(text)
    elif op == "COPY":
        *srcs, dest = shlex.split(text)
        steps.append({"kind": "copy", "line": ins["line"], "srcs": srcs,
                      "dest": dest if dest.startswith("/") else os.path.join(workdir, dest)})
    elif op == "RUN":
        run_no += 1
        skip = next((c.split("skip:", 1)[1].strip() for c in ins["comment"] if c.startswith("image-steps: skip:")), None)
        step_env = {**env, **({"QUANTKIT_CACHE": cache} if cache else {})}
        # The interpreters the apt step installs, as this machine has them (shims resolved; see below).
        # After the image's own folders (its venv), before this machine's (where a shim may sit).
        path = step_env.get("PATH", os.environ["PATH"]).split(":")
        mine = sum(1 for p in path if p.startswith(work + "/"))
        step_env["PATH"] = ":".join([*path[:mine], f"{work}/python-bin", *path[mine:]])
        steps.append({"kind": "run", "n": run_no, "line": ins["line"], "command": here(text), "skip": skip,
                      "cwd": workdir, "env": step_env})
# As bash: one array per field, index i for step i (the env as export lines, the COPY sources one a line).
q = shlex.quote
fields = {"KIND": "kind", "LINE": "line", "N": "n", "CMD": "command", "SKIP": "skip", "CWD": "cwd", "DEST": "dest"}
for var, key in fields.items():
    print(f"S_{var}=(" + " ".join(q(str(st.get(key) or "")) for st in steps) + ")")
print("S_SRCS=(" + " ".join(q("\n".join(st.get("srcs", []))) for st in steps) + ")")
print("S_ENV=(" + " ".join(q("".join(f"export {k}={q(v)}\n" for k, v in st.get("env", {}).items()))
                          for st in steps) + ")")
print(f"PYVER={q(env.get('PYTHON_VERSION', ''))}")
EOF
)
eval "$plan"  # defines S_* (one entry a step) and PYVER

rc=0
if [ "$LIST" = 0 ]; then
  mkdir -p "$WORK/python-bin"
  # python3.X as the apt step would install it: the real interpreter, not a pyenv shim (a shim follows
  # VIRTUAL_ENV, which the image sets before its venv exists).
  if real=$(env -u VIRTUAL_ENV "python$PYVER" -c 'import sys; print(sys.executable)' 2>/dev/null); then
    ln -sfn "$real" "$WORK/python-bin/python$PYVER"
  fi
fi
for ((i = 0; i < ${#S_KIND[@]}; i++)); do
  kind=${S_KIND[i]} line=${S_LINE[i]}
  if [ "$kind" = copy ]; then
    [ "$LIST" = 1 ] && { echo "line $line: COPY (from this checkout)"; continue; }
    dest=${S_DEST[i]}
    mapfile -t srcs <<< "${S_SRCS[i]}"
    mkdir -p "$(dirname "$dest")"
    if [ "${#srcs[@]}" -gt 1 ] || [[ "$dest" == */ ]]; then mkdir -p "$dest"; fi
    for s in "${srcs[@]}"; do
      if [ -d "$ROOT/$s" ]; then mkdir -p "$dest" && cp -a "$ROOT/$s/." "$dest/"; else cp -a "$ROOT/$s" "$dest"; fi
    done
    continue
  fi
  n=${S_N[i]} command=${S_CMD[i]} skip=${S_SKIP[i]} cwd=${S_CWD[i]}
  if ! bash -n -c "$command" 2>/tmp/quantkit-image-steps-syntax.$$; then
    echo "RUN $n (line $line): syntax error: $(cat /tmp/quantkit-image-steps-syntax.$$)" >&2
    rm -f /tmp/quantkit-image-steps-syntax.$$; rc=1; continue
  fi
  rm -f /tmp/quantkit-image-steps-syntax.$$
  if [ -n "$skip" ]; then echo "RUN $n (line $line): skipped here: $skip"; continue; fi
  if [ -n "$STEPS" ] && [[ ",$STEPS," != *",$n,"* ]]; then echo "RUN $n (line $line): not selected"; continue; fi
  if [ "$LIST" = 1 ]; then echo "RUN $n (line $line): runs here"; continue; fi
  echo "RUN $n (line $line): running in $cwd"
  mkdir -p "$cwd"
  start=$(date +%s)
  (
    cd "$cwd"
    # The step's environment: the image's ARGs and ENVs (folders moved under WORK), over this shell's.
    eval "${S_ENV[i]}"
    exec bash -o pipefail -c "$command"
  ) || { echo "RUN $n (line $line): failed (exit $?)" >&2; exit 1; }
  echo "RUN $n (line $line): done in $(( $(date +%s) - start )) s"
done
if [ "$LIST" = 0 ]; then
  # What the skipped apt step would have installed, as this machine has it.
  for tool in cmake git c++ "python$PYVER"; do
    command -v "$tool" >/dev/null || { echo "cuda-image-steps: $tool is missing here (the image's apt step installs it)" >&2; rc=1; }
  done
fi
exit $rc
