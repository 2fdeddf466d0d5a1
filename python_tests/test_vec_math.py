"""Accuracy of cpu/vec.h's vectorisable float functions against the C library in float64.

python_tests/native/vec_math_check.cpp calls them in blocks (so the loop vectorises, as in a
kernel's tile loop) over a dense sweep of each argument range, both ends included, and prints the
largest error in ulps. It is compiled here with the floating-point flags of setup.py for both ISAs
the kernels are cloned for (PAMA_CPU_CLONES: the baseline and x86-64-v3, which contracts to FMA).
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "python_tests", "native", "vec_math_check.cpp")
CXX = os.environ.get("CXX", "g++")
# the flags of setup.py that shape floating-point code (-O3 vectorises, -fno-trapping-math allows
# the blends); -fopenmp for the `omp simd` loops
FLAGS = ["-O3", "-std=c++17", "-fno-trapping-math", "-fopenmp"]
STRIDE = 97  # every 97th float of each range: ~1e7 points, under a second
# max error in ulps: vlog1p <= 0.92 over every float of [0, 1] (an exhaustive run, stride 1); vexp
# of [-86, 0] <= 1.02 (vec.h states < 1 ulp; the exhaustive run found 1.016 at -59.92)
BOUNDS = {"vlog1p": 1.0, "vlog1p_hi": 1.0, "vexp_neg": 1.05}


def _has_avx2_fma():
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


ISAS = {"default": [], "x86-64-v3": ["-march=x86-64-v3"]}


@pytest.mark.skipif(shutil.which(CXX) is None, reason=f"no C++ compiler ({CXX})")
@pytest.mark.parametrize("isa", list(ISAS))
def test_vec_functions_ulp(isa, tmp_path):
    if isa == "x86-64-v3" and not _has_avx2_fma():
        pytest.skip("this CPU has no AVX2 + FMA")
    exe = str(tmp_path / "vec_math_check")
    cmd = [CXX, *FLAGS, *ISAS[isa], "-I", os.path.join(ROOT, "csrc"), SRC, "-o", exe]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr}"
    r = subprocess.run([exe, str(STRIDE)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    seen = {}
    for line in r.stdout.split("\n"):
        if not line.strip():
            continue
        name, points, worst, at, bad = line.split()
        seen[name] = (int(points), float(worst), at, int(bad))
    assert set(seen) == set(BOUNDS), r.stdout
    for name, (points, worst, at, bad) in seen.items():
        assert points > 100_000, f"{name}: only {points} points swept"
        assert bad == 0, f"{name} [{isa}]: {bad} results finite where the reference is not, or vice versa"
        assert worst <= BOUNDS[name], f"{name} [{isa}]: {worst:.3f} ulp at x = {at} > {BOUNDS[name]}"
