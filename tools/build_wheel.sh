#!/usr/bin/env bash
# Builds the pama_ext wheel into dist/ against the torch that is already installed.
#
#   tools/build_wheel.sh                 # CPU wheel on a CPU torch; CUDA wheel on a CUDA torch + nvcc
#   PYTHON=python3 tools/build_wheel.sh  # pick the interpreter (default: .venv/bin/python if present, else python3)
#
# The wheel is built without build isolation (`pip wheel --no-build-isolation --no-deps`): an
# isolated build would install its own (multi-GB CUDA) torch, and the compiled library must be
# built against the very torch it will run with. What kind of wheel comes out follows setup.py:
#   PAMA_EXT_CUDA=auto|0|1    CUDA kernels: when torch has CUDA and CUDA_HOME is found (default),
#                             never, or required (fails without CUDA)
#   TORCH_CUDA_ARCH_LIST      CUDA targets, setup.py's default "8.0;9.0+PTX" (sm_80 A100 and sm_90
#                             H100/H200 machine code, sm_90 PTX that newer GPUs' drivers compile)
# The version carries a PEP 440 local label with the build's CUDA and torch versions:
#   pama_ext-0.1.0+cpu.torch2.13-cp311-cp311-linux_x86_64.whl    (CPU build, torch 2.13)
#   pama_ext-0.1.0+cu130.torch2.11-cp311-cp311-linux_x86_64.whl  (CUDA 13.0 build, torch 2.11)
# The platform tag is the plain linux_x86_64: tools/build_wheels.sh (make wheels) builds the release
# matrix and repairs each wheel to a manylinux tag. The library links against the libtorch / libc10
# of the installed torch, which must be the same major.minor at run time (the wheel's Requires-Dist).
# Environment: DIST (output folder, default dist/), PYTHON.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DIST=${DIST:-dist}

"$PYTHON" -c "import torch" 2>/dev/null || {
  echo "build_wheel: $PYTHON cannot import torch; install torch first (make install)" >&2; exit 2; }
"$PYTHON" -c "import setuptools, wheel" 2>/dev/null || "$PYTHON" -m pip install -q setuptools wheel

read -r TORCH_VERSION TORCH_CUDA < <("$PYTHON" -c "import torch; print(torch.__version__, torch.version.cuda)")
mode=${PAMA_EXT_CUDA:-auto}
if [[ "$TORCH_CUDA" != "None" && "$mode" != "0" && "$mode" != "off" && "$mode" != "no" && "$mode" != "false" ]]; then
  echo "build_wheel: torch $TORCH_VERSION (CUDA $TORCH_CUDA), PAMA_EXT_CUDA=$mode," \
    "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset, the default of setup.py}"
  command -v nvcc >/dev/null && nvcc --version | tail -1
else
  echo "build_wheel: torch $TORCH_VERSION (CPU build of the extension), PAMA_EXT_CUDA=$mode"
fi

# setuptools' own build folders only (build/nvcc holds `make nvcc-check` objects and stays):
# a stale build/lib.* from a build of the other kind must not end up in this wheel.
rm -rf build/lib.* build/temp.* build/bdist.* pama_ext.egg-info
mkdir -p "$DIST"

# setup.py writes pama_ext/_build_info.py for the build it runs; an editable install in this tree
# (make build) reads the same file, so keep the tree's copy as it was
INFO=pama_ext/_build_info.py
SAVED_INFO=$(mktemp)
if [[ -f "$INFO" ]]; then cp "$INFO" "$SAVED_INFO"; trap 'cp "$SAVED_INFO" "$INFO"; rm -f "$SAVED_INFO"' EXIT
else trap 'rm -f "$INFO" "$SAVED_INFO"' EXIT; fi

start=$(date +%s)
"$PYTHON" -m pip wheel --no-build-isolation --no-deps -w "$DIST" .
echo "build_wheel: built in $(( $(date +%s) - start )) s"

wheel=$(ls -1t "$DIST"/pama_ext-*.whl | head -1)
echo "build_wheel: contents of $wheel"
"$PYTHON" tools/check_wheel.py "$wheel"
# Which GPU architectures the library carries (machine code per sm_XX, and PTX if any), where a
# cuobjdump is at hand (tools/find_cuda_tool.sh).
CUOBJDUMP=$(PYTHON="$PYTHON" bash tools/find_cuda_tool.sh cuobjdump CUOBJDUMP)
if [[ "$TORCH_CUDA" != "None" && -n "$CUOBJDUMP" ]] && unzip -l "$wheel" | grep -q "_C.*\.so"; then
  tmp=$(mktemp -d)
  unzip -q -o "$wheel" 'pama_ext/_C*.so' -d "$tmp"
  echo "build_wheel: GPU code in the library ($CUOBJDUMP):"
  { "$CUOBJDUMP" --list-elf "$tmp"/pama_ext/_C*.so 2>/dev/null | grep -o 'sm_[0-9]*[a-z]*' | sort | uniq -c |
      sed 's/^ *\([0-9]*\) \(.*\)/  \2: machine code of \1 source files/'
    "$CUOBJDUMP" --list-ptx "$tmp"/pama_ext/_C*.so 2>/dev/null | grep -o 'sm_[0-9]*[a-z]*' | sort | uniq -c |
      sed 's/^ *\([0-9]*\) \(.*\)/  \2: PTX of \1 source files/'; } || true
  rm -rf "$tmp"
fi
echo "WHEEL=$wheel"
