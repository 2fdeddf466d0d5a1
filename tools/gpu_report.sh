#!/usr/bin/env bash
# Resource report of the CUDA kernels: what ptxas allocates (registers, spills, stack, shared
# memory) and which global loads/stores the SASS uses (vectorised LDG.E.128 / LDG.E.64 or scalar),
# per kernel and template instantiation (float, double, __half, __nv_bfloat16).
#
#   tools/gpu_report.sh               # sm_90 -> benchmarks/results/ptxas_sm90.txt, sass_summary_sm90.txt
#   ARCH=80 tools/gpu_report.sh       # another arch -> ptxas_sm80.txt, sass_summary_sm80.txt
#
# Needs only nvcc (no GPU): each csrc/cuda/*.cu is compiled with the flags of `make nvcc-check`
# plus -Xptxas -v, for one real arch. The SASS part needs cuobjdump (and the nvdisasm it calls):
# taken from $CUOBJDUMP, PATH, $CUDA_HOME/bin, /usr/local/cuda/bin, or a pip-installed
# nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm (nvidia/cu13/bin in site-packages); without it
# the SASS part is skipped with a message and the ptxas part is still written.
# Environment: ARCH (default 90), NVCC (default nvcc), OUT_DIR (default benchmarks/results),
# PYTHON (any python3, only the standard library is used).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
ARCH=${ARCH:-90}
NVCC=${NVCC:-nvcc}
OUT_DIR=${OUT_DIR:-benchmarks/results}
PYTHON=${PYTHON:-python3}
BUILD=build/gpu_report/sm_$ARCH
FLAGS=(-std=c++17 -O3 -Icsrc -gencode "arch=compute_$ARCH,code=sm_$ARCH")
mkdir -p "$BUILD" "$OUT_DIR"
RAW="$BUILD/ptxas_raw.txt"
: >"$RAW"

status=0
for cu in csrc/cuda/*.cu; do
  name=$(basename "$cu" .cu)
  echo "### $cu" >>"$RAW"
  if ! "$NVCC" "${FLAGS[@]}" -Xptxas -v -c "$cu" -o "$BUILD/$name.o" >>"$RAW" 2>&1; then
    echo "gpu_report: nvcc failed on $cu (see $RAW)" >&2
    status=1
  fi
done

CUOBJDUMP_BIN=$(PYTHON="$PYTHON" bash tools/find_cuda_tool.sh cuobjdump CUOBJDUMP)
NVDISASM_BIN=$(PYTHON="$PYTHON" bash tools/find_cuda_tool.sh nvdisasm NVDISASM)
SASS="$BUILD/sass_raw.txt"
: >"$SASS"
if [[ -n "$CUOBJDUMP_BIN" ]]; then
  [[ -n "$NVDISASM_BIN" ]] && export NVDISASM_PATH=$(dirname "$NVDISASM_BIN") PATH="$(dirname "$NVDISASM_BIN"):$PATH"
  for o in "$BUILD"/*.o; do
    echo "### $(basename "$o" .o).cu" >>"$SASS"
    "$CUOBJDUMP_BIN" --dump-sass "$o" >>"$SASS" 2>&1 || { echo "gpu_report: cuobjdump failed on $o" >&2; status=1; }
  done
else
  echo "gpu_report: cuobjdump not found (CUDA toolkit bin, or pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm); SASS part skipped" >&2
fi

CUOBJDUMP_VER=""
[[ -n "$CUOBJDUMP_BIN" ]] && CUOBJDUMP_VER="$("$CUOBJDUMP_BIN" --version 2>/dev/null | tail -1)"
"$PYTHON" - "$RAW" "$SASS" "$OUT_DIR" "$ARCH" "$("$NVCC" --version | tail -1)" "${CUOBJDUMP_VER:-${CUOBJDUMP_BIN:-}}" "${FLAGS[*]}" <<'PY'
import os, re, subprocess, sys, time
from collections import Counter, OrderedDict

raw_path, sass_path, out_dir, arch, nvcc_ver, cuobjdump, flags = sys.argv[1:8]

def demangle(names):
    if not names:
        return {}
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
        return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}
    except OSError:
        return {n: n for n in names}

def short(dem):
    """pama::cuda::(anonymous namespace)::policy_loss_partials_kernel<float>(pama::PolicyLossParams) ->
    policy_loss_partials_kernel<float>"""
    s = re.sub(r"\([^()]*\)$", "", dem.replace("(anonymous namespace)::", ""))
    head, sep, targs = s.partition("<")
    return (head.split("::")[-1] + sep + targs).replace("__nv_bfloat16", "bf16").replace("__half", "half")

# ---- ptxas -------------------------------------------------------------------------------------
kern = OrderedDict()
cur_file, cur = None, None
raw = open(raw_path).read().splitlines()
for line in raw:
    if line.startswith("### "):
        cur_file = os.path.basename(line[4:])
        continue
    m = re.search(r"Compiling entry function '([^']+)'", line)
    if m:
        cur = m.group(1)
        kern[cur] = {"file": cur_file, "regs": None, "stack": 0, "spill_st": 0, "spill_ld": 0, "smem": 0, "barriers": 0}
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and cur:
        kern[cur].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        continue
    m = re.search(r"Used (\d+) registers", line)
    if m and cur:
        kern[cur]["regs"] = int(m.group(1))
        b = re.search(r"used (\d+) barriers", line)
        s = re.search(r"(\d+) bytes smem", line)
        kern[cur]["barriers"] = int(b.group(1)) if b else 0
        kern[cur]["smem"] = int(s.group(1)) if s else 0
dem = demangle(list(kern))
stamp = time.strftime("%Y-%m-%d %H:%M:%S")
# the library sources the report was made from (pama_ext/abi.py, loaded by path: no torch needed);
# python_tests/test_benchmarks.py checks that the committed reports match the tree
import importlib.util
_spec = importlib.util.spec_from_file_location("pama_ext_abi", os.path.join("pama_ext", "abi.py"))
_abi = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_abi)
sources = f"# library sources: {_abi.source_digest('.')} (pama_ext/abi.py source_digest of csrc/ and schemas.def)"
lines = [f"# ptxas resource usage, sm_{arch} ({stamp})",
         sources,
         f"# nvcc: {nvcc_ver}",
         f"# flags: {flags} -Xptxas -v   (one object per csrc/cuda/*.cu, as `make nvcc-check`)",
         "# regs = registers per thread; stack = bytes of local stack frame; spill = bytes of spill stores/loads;",
         "# smem = static shared memory per block (dynamic shared memory is not shown by ptxas)",
         ""]
hdr = f"{'file':<16} {'kernel':<58} {'regs':>4} {'stack':>5} {'spill st/ld':>11} {'smem':>6} {'bar':>3}"
lines += [hdr, "-" * len(hdr)]
for k, v in sorted(kern.items(), key=lambda kv: (kv[1]["file"] or "", short(dem[kv[0]]))):
    lines.append(f"{v['file'] or '?':<16} {short(dem[k]):<58} {v['regs'] if v['regs'] is not None else '?':>4} "
                 f"{v['stack']:>5} {str(v['spill_st']) + '/' + str(v['spill_ld']):>11} {v['smem']:>6} {v['barriers']:>3}")
spilling = [short(dem[k]) for k, v in kern.items() if v["spill_st"] or v["spill_ld"]]
lines += ["", f"{len(kern)} kernels; spilling: {', '.join(spilling) if spilling else 'none'}; "
          f"max registers: {max((v['regs'] or 0) for v in kern.values()) if kern else 0}", "",
          "# ---- raw ptxas output (demangled) ----"]
for line in raw:
    for mangled, d in dem.items():
        if mangled in line:
            line = line.replace(mangled, d)
    lines.append(line)
with open(os.path.join(out_dir, f"ptxas_sm{arch}.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines[:lines.index('# ---- raw ptxas output (demangled) ----')]))

# ---- SASS --------------------------------------------------------------------------------------
sass_out = os.path.join(out_dir, f"sass_summary_sm{arch}.txt")
sass = open(sass_path).read().splitlines() if os.path.exists(sass_path) else []
if not any("Function :" in l for l in sass):
    msg = (f"# SASS summary, sm_{arch}: not produced ({'cuobjdump failed' if cuobjdump else 'cuobjdump not found'});"
           f" run tools/gpu_report.sh where the CUDA toolkit has cuobjdump + nvdisasm\n{sources}\n")
    with open(sass_out, "w") as f:
        f.write(msg)
    print(msg)
    sys.exit(0)
counts = OrderedDict()
cur_file = None
fn = None
for line in sass:
    if line.startswith("### "):
        cur_file = line[4:]
        continue
    m = re.search(r"Function : (\S+)", line)
    if m:
        fn = m.group(1)
        counts[fn] = {"file": cur_file, "ld": Counter(), "st": Counter(), "n": 0}
        continue
    if fn is None:
        continue
    m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
    if not m:
        continue
    op = m.group(2)
    counts[fn]["n"] += 1
    for kind, key in (("LDG", "ld"), ("STG", "st")):
        if op.startswith(kind + "."):
            mods = op.split(".")[1:]
            width = "128" if "128" in mods else "64" if "64" in mods else \
                    "16" if ("U16" in mods or "S16" in mods) else "8" if ("U8" in mods or "S8" in mods) else "32"
            counts[fn][key][width] += 1
dem2 = demangle(list(counts))
out = [f"# SASS global memory instructions per kernel, sm_{arch} ({stamp})",
       sources,
       f"# cuobjdump: {cuobjdump}; objects compiled with: {flags}",
       "# LDG/STG counts by access width in bits (static instruction counts in the SASS, not executed counts).",
       "# Vectorised = loads wider than the element type: .128 always; .64 only in kernels with no double",
       "# template argument (there LDG.E.64 may be one scalar double element).",
       ""]
hdr = f"{'kernel':<58} {'instr':>6} {'LDG 128/64/32/16/8':>22} {'STG 128/64/32/16/8':>22}  vectorised loads"
out += [hdr, "-" * len(hdr)]
def has_double(name):
    """True when any template argument is double (combine_kernel<G, O> has two): there a
    LDG.E.64 may be one scalar double element, so it is not counted as vectorised."""
    return re.search(r"[<,]\s*double\s*[,>]", name) is not None
def hist(c):
    return "/".join(str(c.get(w, 0)) for w in ("128", "64", "32", "16", "8"))
for k, v in sorted(counts.items(), key=lambda kv: short(dem2[kv[0]])):
    name = short(dem2[k])
    is_double = has_double(name)
    vec = v["ld"].get("128", 0) + (0 if is_double else v["ld"].get("64", 0))
    out.append(f"{name:<58} {v['n']:>6} {hist(v['ld']):>22} {hist(v['st']):>22}  {'yes (' + str(vec) + ')' if vec else 'no'}")
nvec = [short(dem2[k]) for k, v in counts.items()
        if v["ld"].get("128", 0) or (not has_double(short(dem2[k])) and v["ld"].get("64", 0))]
out += ["", f"{len(counts)} kernels; with vectorised global loads: {', '.join(nvec) if nvec else 'none'}"]
with open(sass_out, "w") as f:
    f.write("\n".join(out) + "\n")
print("\n".join(out))
PY
rc=$?
[[ $rc -ne 0 ]] && status=$rc
echo "gpu_report: wrote $OUT_DIR/ptxas_sm$ARCH.txt and $OUT_DIR/sass_summary_sm$ARCH.txt (status $status)"
exit $status
