"""The Makefile's test path on a machine without nvcc (a CPU-only contributor's ``make test``).

Each case runs ``make`` in a temporary copy of the Makefile and csrc/ with stand-in tools (a fake
nvcc that only records its arguments, a fake python that only records its command lines), so nothing
is compiled, installed or written into the repository, and the real toolchain does not matter.
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SKIP_MESSAGE = "nvcc not found: skipping the CUDA compile check"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


def recorder(path: pathlib.Path, log: pathlib.Path, touch_output: bool = False) -> pathlib.Path:
    """An executable that appends its arguments to ``log`` (and creates its ``-o`` file) and succeeds."""
    touch = 'while [ $# -gt 0 ]; do [ "$1" = -o ] && : > "$2"; shift; done\n' if touch_output else ""
    path.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n{touch}exit 0\n')
    path.chmod(0o755)
    return path


@pytest.fixture
def tree(tmp_path):
    """A copy of what the nvcc check and the test target read: the Makefile and csrc/."""
    work = tmp_path / "repo"
    work.mkdir()
    shutil.copy(ROOT / "Makefile", work / "Makefile")
    shutil.copytree(ROOT / "csrc", work / "csrc")
    return work


# the Makefile's overridable variables (``NAME ?= default``): make would take them from the environment
MAKE_VARIABLES = set(re.findall(r"^(\w+) \?=", (ROOT / "Makefile").read_text(), flags=re.M))


def make(tree, *args, env=None):
    # nothing from an enclosing make (``make test`` runs pytest), the caller's NVCC settings or a variable
    # of the Makefile set in the environment (tools/build_wheels.sh --verify sets TORCH_SPEC) leaks in
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("MAKE", "MFLAGS", "NVCC", "PAMA_EXT_REQUIRE_NVCC")) and k not in MAKE_VARIABLES}
    full_env.update(env or {})
    return subprocess.run(["make", "--no-print-directory", "-C", str(tree), *args], capture_output=True,
                          text=True, env=full_env, timeout=120)


def test_nvcc_check_skips_without_nvcc(tree):
    missing = tree / "no-such-dir" / "nvcc"
    r = make(tree, "nvcc-check", f"NVCC={missing}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert SKIP_MESSAGE in r.stdout
    assert not (tree / "build").exists()
    # a machine that must run the check (PAMA_EXT_REQUIRE_NVCC=1) fails instead, naming the variable
    r = make(tree, "nvcc-check", f"NVCC={missing}", env={"PAMA_EXT_REQUIRE_NVCC": "1"})
    assert r.returncode != 0 and "PAMA_EXT_REQUIRE_NVCC" in r.stderr and str(missing) in r.stderr


def test_nvcc_check_compiles_with_nvcc(tree, tmp_path):
    """Where nvcc is found, every csrc/cuda/*.cu is compiled for sm_80 and sm_90, as before."""
    log = tmp_path / "nvcc.log"
    nvcc = recorder(tmp_path / "nvcc", log, touch_output=True)
    r = make(tree, "nvcc-check", f"NVCC={nvcc}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert SKIP_MESSAGE not in r.stdout
    sources = sorted(p.name for p in (tree / "csrc" / "cuda").glob("*.cu"))
    calls = log.read_text().splitlines()
    assert sorted(c.split(" -c ")[1].split()[0].rsplit("/", 1)[1] for c in calls) == sources
    for call in calls:
        assert "arch=compute_80,code=sm_80" in call and "arch=compute_90,code=sm_90" in call, call


def test_make_test_reaches_pytest_without_nvcc(tree, tmp_path):
    """``make test`` (README's command) on a machine without nvcc skips the check and runs pytest."""
    log = tmp_path / "python.log"
    python = recorder(tmp_path / "python", log)
    r = make(tree, "test", "VENV=", f"PYTHON={python}", f"NVCC={tmp_path / 'no-such-dir' / 'nvcc'}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert SKIP_MESSAGE in r.stdout
    assert "-m pytest python_tests" in log.read_text()


def test_make_test_verl_uses_a_venv_of_its_own(tree, tmp_path):
    """``make test-verl``: verl, torch and the test tools in one pip resolve inside $(VERL_VENV) (never
    the project's venv), then ``pip check``, the extension build and the verl tests with no skips."""
    venv = tmp_path / "verl-venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".created").touch()
    log = tmp_path / "python.log"
    py = venv / "bin" / "python"  # records its command line; `python -c` (the "already installed?" probe) fails
    py.write_text(f'#!/bin/sh\necho "PAMA_EXT_REQUIRE_VERL=$PAMA_EXT_REQUIRE_VERL $*" >> "{log}"\n'
                  '[ "$1" = -c ] && exit 1\nexit 0\n')
    py.chmod(0o755)
    r = make(tree, "test-verl", f"VERL_VENV={venv}", f"PYTHON={tmp_path / 'no-python'}")
    assert r.returncode == 0, r.stdout + r.stderr
    calls = [c.split(" ", 1)[1] for c in log.read_text().splitlines() if not c.split(" ", 1)[1].startswith("-c ")]
    install, check, build, tests = calls
    assert install.startswith("-m pip install") and "verl==0.9.1" in install and "torch==2.13.0" in install
    assert "--no-deps" not in install and "pytest" in install
    assert check == "-m pip check"
    assert build.startswith("-m pip install") and build.endswith("-e .")
    assert tests.startswith("-m pytest python_tests/test_integrations.py python_tests/test_integrations_verl_e2e.py")
    assert log.read_text().splitlines()[-1].startswith("PAMA_EXT_REQUIRE_VERL=1 ")
