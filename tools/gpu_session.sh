#!/usr/bin/env bash
# The GPU issue's work on a lent GPU machine, in resumable, time-boxed stages.
#
#   bash tools/gpu_session.sh               # run the next stages not yet done, within GPU_SESSION_BUDGET
#   bash tools/gpu_session.sh STAGE ...     # run just these stages (again), e.g. bench_models
#   bash tools/gpu_session.sh --status      # what is done / failed / left
#   bash tools/gpu_session.sh --reset       # forget what was done
#
# The device tool runs one command for at most 600 s, so one call does what fits in
# GPU_SESSION_BUDGET (default 540 s) and says which stages are left: call it again (the machine
# stays warm between calls, and with it the build and build/gpu_session/state) until it prints
# "ALL STAGES DONE". All stages take roughly 20-25 min of device time (3 or 4 calls), more than the
# 15 minutes a task is lent now (machine start included): the stages are in priority order, so what a
# cut-short session misses is the least important. With a carried wheel (below) the build stage takes
# seconds, so the first call reaches gpu_tests at once; tests starts only with 360 s of the call's
# budget left (MINS), so it may need a second call. A stage that fails
# or times out is recorded and skipped on later calls (name it to retry); every stage has its
# own time limit (`timeout`), so one failure does not eat the budget.
#
# Before the GPU call, on the CPU machine: `make wheels WHEELS=cu-3.12` at the commit to be run (the GPU
# machines' Python 3.12 and torch 2.11+cu130), and pass that wheel in the device tool's `carry`
# (e.g. carry=["dist/pama_ext-0.1.0+cu130.torch2.11-cp312-cp312-manylinux_2_34_x86_64.whl"], 9 MB): the
# build stage then takes seconds instead of several minutes of the device budget. A wheel built from
# other csrc/ or schemas.def is refused (source digest) and the stage compiles.
#
# Stages, in order (max seconds):
#   env          nvidia-smi, python/torch/CUDA/nvcc versions; transformers etc. from ./.gpu_wheels
#                if that wheelhouse was carried along and transformers is missing              (60)
#   build        the library of a carried CUDA wheel of this Python (dist/pama_ext-*+cu*-cpXY-*.whl, or
#                GPU_WHEEL) when tools/wheel_library.py finds it built from this tree's sources (seconds);
#                else PAMA_EXT_CUDA=1 pip install --no-build-isolation --no-deps -e .  (archs: this
#                GPU's, EDITABLE_ARCHS to override; the wheel carries 8.0;9.0)                  (480)
#   info         python -m pama_ext.cli info                                                  (60)
#   gpu_tests    test_cuda_graphs.py + the CUDA cases of test_invariants.py (sync, graphs)     (240)
#   tests        the whole suite, PAMA_EXT_REQUIRE_NATIVE=1 PAMA_EXT_REQUIRE_CUDA=1; trainer and
#                tiny-world tests are left to `trainer_tests`                                  (540)
#   bench_ops    pama_ext.benchmarks.bench_gpu --only bandwidth,policy_loss,gae,stats (full sweeps)  (540)
#   bench_models pama_ext.benchmarks.bench_gpu --only headline,e2e (124M and 1B models)           (480)
#   bench_gram   pama_ext.benchmarks.gradient_gram --device cuda, fp32 and bf16 gradients   (300)
#   wheel        tools/build_wheel.sh: CUDA wheel, TORCH_CUDA_ARCH_LIST=8.0;9.0 (nothing to do when the
#                carried wheel was built from this tree)                                         (420)
#   verify       tools/verify_wheel.sh on that wheel, PAMA_EXT_REQUIRE_CUDA=1, the CUDA cases
#                of the op tests (VERIFY_PYTEST_ARGS; the full suite ran in `tests`)           (420)
#   gpu_report   tools/gpu_report.sh: ptxas registers/spills + SASS load widths for sm_90 ->
#                benchmarks/results/ptxas_sm90.txt, sass_summary_sm90.txt (also runs without a
#                GPU; the committed sm_80 and sm_90 files come from the CPU machine)          (150)
#   trainer_tests test_trainer.py + test_tiny_world.py when transformers is importable         (420)
# On demand only (name it): bench_quick  pama_ext.benchmarks.bench_gpu --quick -> build/gpu_session/bench_quick
#
# Output: logs and results under ${OUT:-/tmp/out}: gpu_session_summary.txt (stage table + the tail
# of each log of this call) and gpu_session_results.tar.gz (benchmarks/results/, the logs, the
# quick-bench folder, pip freeze); two files, well under the device tool's limits.
# Environment: PYTHON (default python3), GPU_SESSION_BUDGET, EDITABLE_ARCHS, VERIFY_PYTEST_ARGS
# (default: -k "cuda or native or installed or readme"; "" for the whole op suite), OUT.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/out}
BUDGET=${GPU_SESSION_BUDGET:-540}
STATE=build/gpu_session/state
LOGS=build/gpu_session/logs
QUICK_OUT=build/gpu_session/bench_quick
mkdir -p "$OUT" "$STATE" "$LOGS" "$QUICK_OUT"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
# the tree's pama_ext for every stage and the subprocesses of the tests, whether the library came from
# the editable build or from a carried wheel (stage build)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
T_START=$(date +%s)
CALL_ID=$(date +%Y%m%d-%H%M%S)

STAGES=(env build info gpu_tests tests bench_ops bench_models bench_gram wheel verify gpu_report trainer_tests)
declare -A MAXS=([env]=60 [build]=480 [info]=60 [gpu_tests]=240 [tests]=540 [bench_ops]=540
                 [bench_models]=480 [bench_gram]=300 [wheel]=420 [verify]=420 [gpu_report]=150
                 [trainer_tests]=420 [bench_quick]=330)
# a stage is started only when at least this much of the call's budget is left
declare -A MINS=([env]=20 [build]=240 [info]=20 [gpu_tests]=90 [tests]=360 [bench_ops]=360
                 [bench_models]=240 [bench_gram]=150 [wheel]=240 [verify]=240 [gpu_report]=90
                 [trainer_tests]=240 [bench_quick]=200)
VERIFY_PYTEST_ARGS=${VERIFY_PYTEST_ARGS-'-k "cuda or native or installed or readme"'}

elapsed() { echo $(( $(date +%s) - T_START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
status_of() { cat "$STATE/$1" 2>/dev/null || echo "todo"; }

have_cuda_build() {
  "$PY" - <<'PY' >/dev/null 2>&1
import pama_ext, torch
assert pama_ext.NATIVE_AVAILABLE and pama_ext.ops.has_cuda_kernels() and torch.cuda.is_available()
PY
}

# ---- stages -------------------------------------------------------------------------------------
stage_env() {
  nvidia-smi || echo "nvidia-smi failed"
  echo "--- nvidia-smi -q (clocks, memory)"; nvidia-smi -q -d CLOCK,MEMORY 2>/dev/null | head -60
  echo "--- python: $(command -v "$PY") $("$PY" --version 2>&1)"
  "$PY" - <<'PY'
import os, torch
print("torch", torch.__version__, "CUDA runtime", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", "cc", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count)
for m in ("triton", "transformers", "tokenizers", "vaderSentiment", "matplotlib", "tqdm", "hypothesis", "pytest",
          "expecttest", "numpy", "yaml", "ninja"):
    try:
        mod = __import__(m)
        print(f"{m:<15}", getattr(mod, "__version__", "(no __version__)"))
    except Exception as e:  # noqa: BLE001
        print(f"{m:<15} MISSING ({type(e).__name__})")
print("CUDA_HOME", os.environ.get("CUDA_HOME"), "cpus", os.cpu_count())
PY
  command -v nvcc && nvcc --version | tail -2
  command -v cuobjdump || echo "cuobjdump not on PATH"
  if ! "$PY" -c "import transformers" 2>/dev/null && [[ -d .gpu_wheels ]]; then
    echo "--- transformers missing: installing from the carried wheelhouse .gpu_wheels"
    "$PY" -m pip install --no-index --find-links .gpu_wheels transformers tokenizers vaderSentiment pyyaml tqdm \
      matplotlib 2>&1 | tail -5 || true
  fi
  "$PY" -m pip freeze >"$LOGS/pip_freeze.txt" 2>/dev/null || true
}

# the carried CUDA wheel (dist/, `carry` of the device tool) of this interpreter, if one is there
carried_wheel() {
  local tag
  tag=$("$PY" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
  ls -1t dist/pama_ext-*+cu*-"$tag"-"$tag"-*.whl 2>/dev/null | head -1
}

stage_build() {
  local whl
  whl=${GPU_WHEEL:-$(carried_wheel)}
  if [[ -n "$whl" ]]; then  # built from these sources on a CPU machine: saves the CUDA compile
    if "$PY" tools/wheel_library.py "$whl" && have_cuda_build; then
      echo "using the compiled library of $whl (no build)"; return 0
    fi
    echo "the carried wheel does not serve; building from source"
  fi
  local archs=${EDITABLE_ARCHS:-$("$PY" -c "import torch; c = torch.cuda.get_device_capability(0); print(f'{c[0]}.{c[1]}')" 2>/dev/null || echo "9.0")}
  echo "PAMA_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST=$archs MAX_JOBS=${MAX_JOBS:-$(nproc)}"
  PAMA_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST="$archs" MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    "$PY" -m pip install --no-build-isolation --no-deps -e . || return 1
  have_cuda_build || { echo "build finished but the CUDA kernels do not load"; return 1; }
}

stage_info() { "$PY" -m pama_ext.cli info; }

stage_gpu_tests() {
  PAMA_EXT_REQUIRE_NATIVE=1 PAMA_EXT_REQUIRE_CUDA=1 "$PY" -m pytest -q -rfEs -p no:cacheprovider \
    python_tests/test_cuda_graphs.py python_tests/test_invariants.py -k "cuda"
}

stage_bench_quick() {
  "$PY" -m pama_ext.benchmarks.bench_gpu --quick --out "$QUICK_OUT" --time-limit $(( $1 - 60 ))
}

stage_gpu_report() { ARCH=90 PYTHON="$PY" bash tools/gpu_report.sh; }

trainer_deps() { "$PY" -c "import transformers, tokenizers, vaderSentiment, yaml, tqdm" 2>/dev/null; }

stage_tests() {
  PAMA_EXT_REQUIRE_NATIVE=1 PAMA_EXT_REQUIRE_CUDA=1 "$PY" -m pytest python_tests -q -rfEs -p no:cacheprovider \
    --ignore=python_tests/test_trainer.py --ignore=python_tests/test_tiny_world.py --durations=15
}

stage_wheel() {
  local whl
  whl=${GPU_WHEEL:-$(carried_wheel)}
  if [[ -n "$whl" ]] && "$PY" tools/wheel_library.py --check "$whl"; then
    echo "the carried $whl was built from these sources: verify that one (no build)"; return 0
  fi
  rm -f dist/pama_ext-*+cu*.whl
  PAMA_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHON="$PY" bash tools/build_wheel.sh
}

stage_verify() {
  local whl
  whl=$(ls -1t dist/pama_ext-*+cu*.whl 2>/dev/null | head -1)
  [[ -n "$whl" ]] || { echo "no CUDA wheel in dist/ (stage wheel not done?)"; return 1; }
  PAMA_EXT_REQUIRE_CUDA=1 PYTHON="$PY" PYTEST_ARGS="$VERIFY_PYTEST_ARGS" bash tools/verify_wheel.sh "$whl"
}

# bench_gpu's --time-limit stops starting new configs; the margin covers the config in flight
stage_bench_ops() {
  "$PY" -m pama_ext.benchmarks.bench_gpu --only bandwidth,policy_loss,gae,stats --time-limit $(( $1 - 100 ))
}

# the Gram / combine ops of the preference trainers against concatenate-then-matmul, on the GPU
stage_bench_gram() {
  "$PY" -m pama_ext.benchmarks.gradient_gram --device cuda --budget 0.5 --max-repeats 20 &&
    "$PY" -m pama_ext.benchmarks.gradient_gram --device cuda --dtype bfloat16 --budget 0.5 --max-repeats 20
}

stage_bench_models() {
  "$PY" -m pama_ext.benchmarks.bench_gpu --only headline,e2e --time-limit $(( $1 - 150 ))
}

stage_trainer_tests() {
  if ! trainer_deps; then
    echo "SKIPPED: transformers / tokenizers / vaderSentiment / pyyaml / tqdm not importable (no wheelhouse)"
    return 0
  fi
  PAMA_EXT_REQUIRE_NATIVE=1 PAMA_EXT_REQUIRE_CUDA=1 "$PY" -m pytest -q -rfEs -p no:cacheprovider \
    python_tests/test_trainer.py python_tests/test_tiny_world.py
}

# ---- driver -------------------------------------------------------------------------------------
run_stage() {  # run_stage NAME: runs it under timeout, records done/failed/timeout
  local s=$1 limit rc t0 log
  limit=$(( $(left) < ${MAXS[$s]} ? $(left) : ${MAXS[$s]} ))
  log="$LOGS/$(printf '%02d' "$(stage_index "$s")")_${s}.log"
  echo "=== [$(elapsed) s] stage $s (limit ${limit} s) -> $log"
  t0=$(date +%s)
  # each stage in its own bash so that `timeout` can end it and everything it started
  timeout --kill-after=15 "$limit" bash -c "$(declare -f); $(declare -p PY OUT QUICK_OUT LOGS VERIFY_PYTEST_ARGS 2>/dev/null); stage_$s $limit" \
    >"$log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  case $rc in
    0) echo "done ($dt s, call $CALL_ID)" >"$STATE/$s" ;;
    124|137) echo "timeout after $dt s (limit $limit s, call $CALL_ID)" >"$STATE/$s" ;;
    *) echo "failed rc=$rc ($dt s, call $CALL_ID)" >"$STATE/$s" ;;
  esac
  echo "=== [$(elapsed) s] stage $s: $(status_of "$s")"
  tail -n 25 "$log" | sed 's/^/    | /'
  CALL_STAGES+=("$s")
}

stage_index() { local i; for i in "${!STAGES[@]}"; do [[ "${STAGES[$i]}" == "$1" ]] && { echo $(( i + 1 )); return; }; done; echo 99; }

print_status() {
  local s
  for s in "${STAGES[@]}"; do printf '  %-14s %s\n' "$s" "$(status_of "$s")"; done
}

pack() {
  local summary="$OUT/gpu_session_summary.txt"
  {
    echo "gpu_session call $CALL_ID on $(hostname), $(elapsed) s of a ${BUDGET} s budget"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
    echo; echo "stages:"; print_status
    local s
    for s in "${CALL_STAGES[@]}"; do
      echo; echo "----- $s: $(status_of "$s") (last 60 lines of its log)"
      tail -n 60 "$LOGS/$(printf '%02d' "$(stage_index "$s")")_${s}.log" 2>/dev/null
    done
  } >"$summary"
  tar -czf "$OUT/gpu_session_results.tar.gz" benchmarks/results "$LOGS" "$QUICK_OUT" "$STATE" 2>/dev/null
  echo "=== packed: $summary, $OUT/gpu_session_results.tar.gz ($(du -h "$OUT/gpu_session_results.tar.gz" | cut -f1))"
}

CALL_STAGES=()
case "${1:-}" in
  --status) print_status; exit 0 ;;
  --reset) rm -rf "$STATE"; echo "state cleared"; exit 0 ;;
esac

if [[ $# -gt 0 ]]; then
  todo=("$@")
  for s in "${todo[@]}"; do
    [[ -n "${MAXS[$s]:-}" ]] || { echo "unknown stage $s; stages: ${STAGES[*]}" >&2; exit 2; }
  done
else
  todo=()
  for s in "${STAGES[@]}"; do [[ "$(status_of "$s")" == "todo" ]] && todo+=("$s"); done
fi

echo "gpu_session: budget ${BUDGET} s; stages this call (in order, as time allows): ${todo[*]:-none}"
for s in "${todo[@]}"; do
  # every stage after env needs the CUDA build; a fresh machine (or a cold restart) rebuilds it
  if [[ "$s" != env && "$s" != build ]] && ! have_cuda_build; then
    if [[ " ${CALL_STAGES[*]} " == *" build "* ]]; then
      echo "=== the CUDA build of this call is not usable; stopping (see the build log)"; break
    fi
    if (( $(left) < ${MINS[build]} + ${MINS[$s]} )); then
      echo "=== not enough time left for build + $s; call again"; break
    fi
    run_stage build
    have_cuda_build || { echo "=== the CUDA build is not usable; stopping (see the build log)"; break; }
  fi
  if (( $(left) < ${MINS[$s]} )); then
    echo "=== [$(elapsed) s] $(left) s left < ${MINS[$s]} s needed for $s: stopping here; call again"
    break
  fi
  run_stage "$s"
  if [[ "$s" == build ]] && ! have_cuda_build; then
    echo "=== the CUDA build is not usable; stopping (see the build log)"; break
  fi
done

echo; echo "stages:"; print_status
left_todo=()
for s in "${STAGES[@]}"; do [[ "$(status_of "$s")" == "todo" ]] && left_todo+=("$s"); done
if (( ${#left_todo[@]} == 0 )); then
  echo "ALL STAGES DONE (failed/timeout ones are listed above; name a stage to run it again)"
else
  echo "LEFT: ${left_todo[*]}  -> run tools/gpu_session.sh again"
fi
pack
