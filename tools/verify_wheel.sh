#!/usr/bin/env bash
# Installs a pama_ext wheel into a fresh virtualenv and runs the op test suite against the
# installed wheel, not the source tree.
#
#   tools/verify_wheel.sh dist/pama_ext-0.1.0+cpu.torch2.13-cp311-cp311-linux_x86_64.whl
#
# torch in the fresh venv:
#   * where the creating interpreter ($PYTHON, default python3) imports torch (the GPU machine:
#     torch 2.11+cu130 is a system package), the venv sees that interpreter's packages: created
#     with --system-site-packages, or, when $PYTHON is itself a venv (whose base has no torch),
#     through a .pth file that adds its site-packages after the new venv's own;
#   * otherwise (the CPU dev machine) the venv is plain and gets $TORCH_SPEC (default
#     torch==2.13.0, which pip takes from the local wheel file the machine's pip config points at).
#   VERIFY_SYSTEM_SITE=1|0 forces either choice.
# Either way the venv's own site-packages come first on sys.path, so the wheel installed there is
# what `import pama_ext` finds, even next to an editable install of the source tree.
# Then: the wheel is installed with --no-deps (--force-reinstall, so an editable install of the
# same version in the system site-packages cannot stand in for it), `pip check` confirms that the
# torch there satisfies the wheel's Requires-Dist, the test deps (pytest,
# hypothesis, expecttest, numpy, scipy, tqdm) are installed if missing and a registry is reachable, and
# python_tests/ plus README.md (test_readme.py reads ../README.md), docs/, csrc/, the Makefile and
# pyproject.toml and the resource reports of benchmarks/results are copied to a temporary folder
# where pytest runs with PAMA_EXT_REQUIRE_NATIVE=1. A check before pytest and an extra test
# inside the pytest session assert that `import pama_ext` resolves to the venv's site-packages.
#
# Only the op tests run: test_trainer.py and test_tiny_world.py are excluded (they need
# transformers, tokenizers, vaderSentiment, ... and minutes of CPU training; the trainer is pure
# Python on top of the same ops, which the source-tree suite covers).
#
# Environment: PYTHON, TORCH_SPEC, VERIFY_SYSTEM_SITE, VERIFY_VENV (venv folder; default a new
# temporary one), KEEP_VENV=1 (keep it), PYTEST_ARGS (extra pytest arguments as shell words, e.g.
# '-x -k "gae or cuda"').
# PAMA_EXT_REQUIRE_CUDA=1 passes through (set it for a CUDA wheel on the GPU machine).
# Exit status: pytest's (0 = the installed wheel passed).
set -euo pipefail

if [[ $# -ne 1 || ! -f "$1" ]]; then
  echo "usage: $0 path/to/pama_ext-*.whl" >&2; exit 2
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEEL=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pama_verify.XXXXXX")
VENV=${VERIFY_VENV:-$WORK/venv}
cleanup() {
  if [[ "${KEEP_VENV:-0}" == "1" ]]; then echo "verify_wheel: kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
start=$(date +%s)
step() { echo "== verify_wheel [$(( $(date +%s) - start )) s] $*"; }

# wheel version from the file name: pama_ext-<version>-<py>-<abi>-<plat>.whl
WHEEL_VERSION=$(basename "$WHEEL" | cut -d- -f2)
step "wheel $(basename "$WHEEL") (version $WHEEL_VERSION)"

if [[ -z "${VERIFY_SYSTEM_SITE:-}" ]]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then VERIFY_SYSTEM_SITE=1; else VERIFY_SYSTEM_SITE=0; fi
fi
VPY="$VENV/bin/python"
if [[ "$VERIFY_SYSTEM_SITE" == "1" ]] && "$PYTHON" -c "import sys; sys.exit(sys.prefix != sys.base_prefix)"; then
  step "creating $VENV with --system-site-packages (torch from $PYTHON: $("$PYTHON" -c 'import torch; print(torch.__version__)'))"
  "$PYTHON" -m venv --system-site-packages "$VENV"
elif [[ "$VERIFY_SYSTEM_SITE" == "1" ]]; then
  step "creating $VENV; $PYTHON is a venv: its site-packages are added after the new venv's own (.pth)"
  "$PYTHON" -m venv "$VENV"
  "$PYTHON" -c "import site, sysconfig; print('import site; ' + '; '.join(f'site.addsitedir({p!r})' for p in dict.fromkeys([sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']])))" \
    >"$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_pama_verify_parent.pth"
else
  step "creating $VENV (isolated; torch will be installed: $TORCH_SPEC)"
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VPY" -c "import torch" 2>/dev/null; then
  step "pip install $TORCH_SPEC numpy"
  "$VPY" -m pip install -q "$TORCH_SPEC" numpy
fi
"$VPY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available())"

step "pip install --no-deps $(basename "$WHEEL")"
"$VPY" -m pip install -q --no-deps --force-reinstall "$WHEEL"

# the wheel's Requires-Dist (torch's release series of the build, numpy) holds for the torch installed
step "pip check (Requires-Dist: $(unzip -p "$WHEEL" '*.dist-info/METADATA' | sed -n 's/^Requires-Dist: //p' | grep -v ';' | paste -sd' ' -))"
# (only pama_ext's own line counts: a --system-site-packages venv may hold unrelated broken packages)
if "$VPY" -m pip check 2>&1 | grep -i '^pama[-_]ext'; then
  echo "verify_wheel: the torch in the venv does not satisfy the wheel's Requires-Dist" >&2; exit 5
fi

if ! "$VPY" -c "import pytest, hypothesis, expecttest, numpy, scipy, tqdm" 2>/dev/null; then
  step "pip install test deps (pytest hypothesis expecttest numpy scipy tqdm)"
  "$VPY" -m pip install -q pytest hypothesis expecttest numpy scipy tqdm || {
    echo "verify_wheel: could not install the test deps (no registry?); install pytest, hypothesis," \
         "expecttest, numpy, scipy and tqdm into $PYTHON's site-packages and use VERIFY_SYSTEM_SITE=1" >&2; exit 3; }
fi

TESTDIR="$WORK/tests"
mkdir -p "$TESTDIR"
cp -r "$ROOT/python_tests" "$TESTDIR/python_tests"
cp "$ROOT/README.md" "$TESTDIR/README.md"
# what some tests read besides the package: the docs' snippets (run against the installed wheel) and
# the C++/CUDA sources of the no-host-read lint; no Python sources, which would shadow the wheel
cp -r "$ROOT/docs" "$TESTDIR/docs"
cp -r "$ROOT/csrc" "$TESTDIR/csrc"
# the Makefile and pyproject.toml: read by the tests of the Makefile and of the triton pin
cp "$ROOT/Makefile" "$ROOT/pyproject.toml" "$TESTDIR/"
# the per-arch resource reports, checked against the installed library's source digest
mkdir -p "$TESTDIR/benchmarks/results"
cp "$ROOT"/benchmarks/results/ptxas_sm*.txt "$ROOT"/benchmarks/results/sass_summary_sm*.txt "$TESTDIR/benchmarks/results/"
find "$TESTDIR" -name __pycache__ -prune -exec rm -rf {} +
SITE=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['platlib'])")
# Asserted again inside the pytest session, after conftest.py has set up sys.path.
cat >"$TESTDIR/python_tests/test_installed_wheel.py" <<'PY'
"""Written by tools/verify_wheel.sh: the suite is testing the installed wheel."""
import importlib.metadata
import os

import pama_ext


def test_pama_ext_is_the_installed_wheel():
    site = os.path.realpath(os.environ["PAMA_EXT_EXPECT_SITE"])
    path = os.path.realpath(pama_ext.__file__)
    assert path.startswith(site + os.sep), f"pama_ext imported from {path}, not from the venv {site}"
    assert pama_ext.NATIVE_AVAILABLE, pama_ext.NATIVE_ERROR
    assert os.path.realpath(pama_ext._C.__file__).startswith(site + os.sep)
    assert importlib.metadata.version("pama_ext") == os.environ["PAMA_EXT_EXPECT_VERSION"]
    assert pama_ext.__version__ == os.environ["PAMA_EXT_EXPECT_VERSION"]
PY

export PAMA_EXT_REQUIRE_NATIVE=1 PAMA_EXT_EXPECT_SITE="$SITE" PAMA_EXT_EXPECT_VERSION="$WHEEL_VERSION"
export PYTHONDONTWRITEBYTECODE=1
cd "$TESTDIR"
step "import check (cwd $TESTDIR)"
"$VPY" - <<'PY'
import os, sys
import pama_ext
site = os.path.realpath(os.environ["PAMA_EXT_EXPECT_SITE"])
path = os.path.realpath(pama_ext.__file__)
print(f"pama_ext {pama_ext.__version__} from {path}")
if not path.startswith(site + os.sep):
    sys.exit(f"verify_wheel: pama_ext resolves to {path}, not to the venv's site-packages {site}")
if pama_ext.__version__ != os.environ["PAMA_EXT_EXPECT_VERSION"]:
    sys.exit(f"verify_wheel: pama_ext.__version__ {pama_ext.__version__} != wheel version")
PY
"$VPY" -m pama_ext.cli info

step "pytest python_tests/test_installed_wheel.py (the suite below imports the installed wheel)"
set +e
"$VPY" -m pytest python_tests/test_installed_wheel.py -v -p no:cacheprovider --rootdir "$TESTDIR" 2>&1 |
  grep -E "PASSED|FAILED|ERROR|Error|assert|passed|failed|error"
wrc=${PIPESTATUS[0]}
set -e
[[ $wrc -eq 0 ]] || { echo "verify_wheel: the suite would not test the installed wheel" >&2; exit 4; }

step "pytest (op tests; trainer and tiny-world tests excluded) PAMA_EXT_REQUIRE_CUDA=${PAMA_EXT_REQUIRE_CUDA:-}"
eval "EXTRA_ARGS=(${PYTEST_ARGS:-})"  # shell words, so that -k "a or b" stays one argument
set +e
"$VPY" -m pytest python_tests -q -ra -p no:cacheprovider --rootdir "$TESTDIR" \
  --ignore=python_tests/test_trainer.py --ignore=python_tests/test_tiny_world.py "${EXTRA_ARGS[@]}"
rc=$?
set -e
step "done: pytest exit status $rc ($( [[ $rc -eq 0 ]] && echo PASSED || echo FAILED )) for $(basename "$WHEEL")"
exit $rc
