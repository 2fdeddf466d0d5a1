"""A build of pama_ext is tied to one torch release series (pama_ext/abi.py): the wheel's torch
requirement, and the import-time check that names both versions instead of failing with an
undefined C++ symbol. The import path is tested with a faked build record (pama_ext._build_info),
in a subprocess, so no second torch is needed. Also: tools/build_wheels.sh names a missing
interpreter and how to get it."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import pama_ext
from pama_ext import abi

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAJOR, MINOR = abi.release(torch.__version__)


@pytest.mark.parametrize("version, series, requirement", [
    ("2.13.0+cpu", "2.13", "torch>=2.13,<2.14"),
    ("2.11.0+cu130", "2.11", "torch>=2.11,<2.12"),
    ("2.9.1", "2.9", "torch>=2.9,<2.10"),
    ("3.0.0a0+git1234", "3.0", "torch>=3.0,<3.1"),
])
def test_series_and_requirement(version, series, requirement):
    assert abi.torch_series(version) == series
    assert abi.torch_requirement(version) == requirement


def test_requirement_admits_exactly_the_series():
    """Checked with packaging's PEP 440 implementation (independent of abi.release)."""
    specifiers = pytest.importorskip("packaging.specifiers")
    spec = specifiers.SpecifierSet(abi.torch_requirement("2.13.0+cpu").removeprefix("torch"))
    for ok in ("2.13.0", "2.13.0+cpu", "2.13.1", "2.13.10+cu130"):
        assert spec.contains(ok), ok
    for bad in ("2.12.9", "2.14.0", "2.14.1", "3.13.0", "2.1.3"):
        assert not spec.contains(bad), bad


def test_bad_version_is_named():
    with pytest.raises(ValueError, match="'nonsense'"):
        abi.release("nonsense")


@pytest.mark.parametrize("built, built_cuda, running, running_cuda, expect", [
    ("2.13.0+cpu", None, "2.13.0+cpu", None, None),
    ("2.13.0+cpu", None, "2.13.2", "13.0", None),          # a CPU build loads into a CUDA torch of its series
    ("2.11.0+cu130", "13.0", "2.11.0+cu130", "13.0", None),
    ("2.11.0+cu130", "13.0", "2.11.1+cu132", "13.2", None),  # same CUDA major: the same libcudart.so.13
    ("2.13.0+cpu", None, "2.14.1", None, ["2.13.0+cpu", "2.14.1", "torch>=2.13,<2.14"]),
    ("2.13.0+cpu", None, "2.12.0+cu130", "13.0", ["2.13.0+cpu", "2.12.0+cu130"]),
    ("2.11.0+cu130", "13.0", "2.11.0+cpu", None, ["2.11.0+cu130", "2.11.0+cpu", "without CUDA"]),
    ("2.11.0+cu130", "13.0", "2.11.0+cu128", "12.8", ["CUDA 13.0", "2.11.0+cu128", "CUDA 12.8"]),
])
def test_incompatibility(built, built_cuda, running, running_cuda, expect):
    message = abi.incompatibility(built, built_cuda, running, running_cuda, "0.1.0+test")
    if expect is None:
        assert message is None
    else:
        assert message is not None and "pama_ext 0.1.0+test" in message
        for part in expect:
            assert part in message, (part, message)


# Imports pama_ext with a faked build record made against another torch (series or CUDA) than the
# running one, and reports what pama_ext made of it.
IMPORT_WITH_FAKE_RECORD = r"""
import json, sys, types, warnings
fake = types.ModuleType("pama_ext._build_info")
fake.VERSION, fake.BUILT_WITH_TORCH, fake.BUILT_WITH_CUDA, fake.CUDA_ARCHS = json.loads(sys.argv[1])
sys.modules["pama_ext._build_info"] = fake
result = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        import pama_ext
        result["native"] = pama_ext.NATIVE_AVAILABLE
        result["error"] = str(pama_ext.NATIVE_ERROR)
        result["error_type"] = type(pama_ext.NATIVE_ERROR).__name__
    except ImportError as exc:
        result["import_error"] = str(exc)
result["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
result["library_loaded"] = "pama_ext._C" in sys.modules
print(json.dumps(result))
"""


def import_with_record(record, require_native: str):
    env = dict(os.environ, PAMA_EXT_REQUIRE_NATIVE=require_native,
               # the same pama_ext as this session's (the source tree, or the installed wheel)
               PYTHONPATH=str(pathlib.Path(pama_ext.__file__).resolve().parent.parent))
    r = subprocess.run([sys.executable, "-c", IMPORT_WITH_FAKE_RECORD, json.dumps(record)], capture_output=True,
                       text=True, env=env, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


OTHER_SERIES = f"{MAJOR}.{MINOR + 1}.0"
if torch.version.cuda is None:
    # a CUDA build of this very torch series, imported into this CPU torch
    OTHER_CUDA = (f"{MAJOR}.{MINOR}.0+cu130", "13.0", ["without CUDA"])
else:
    # a CUDA build for the next CUDA major version
    _cuda_major = abi.release(torch.version.cuda)[0] + 1
    OTHER_CUDA = (f"{MAJOR}.{MINOR}.0+cu{_cuda_major}0", f"{_cuda_major}.0", [f"CUDA {_cuda_major}.0"])


@pytest.mark.parametrize("built_torch, built_cuda, words", [
    (OTHER_SERIES + "+cpu", None, [f"torch {MAJOR}.{MINOR + 1}.x"]),
    OTHER_CUDA,
], ids=["other-torch-series", "other-cuda"])
def test_import_with_another_torch_names_both_versions(built_torch, built_cuda, words):
    """The library is not loaded; the error names the build's torch and the running torch. Without
    PAMA_EXT_REQUIRE_NATIVE the reference fallback takes over with a warning that carries the same
    message; with it, importing pama_ext raises that ImportError."""
    record = ["0.1.0+fake", built_torch, built_cuda, "8.0;9.0+PTX" if built_cuda else ""]
    expected = [built_torch, torch.__version__, *words]

    r = import_with_record(record, "0")
    assert r["native"] is False and r["error_type"] == "ImportError" and not r["library_loaded"], r
    for part in expected:
        assert part in r["error"], (part, r["error"])
    assert "undefined symbol" not in r["error"]
    assert len(r["warnings"]) == 1 and r["error"] in r["warnings"][0], r["warnings"]

    r = import_with_record(record, "1")
    assert "import_error" in r and not r["library_loaded"], r
    for part in expected:
        assert part in r["import_error"], (part, r["import_error"])


def test_import_with_the_recorded_torch_loads_the_library():
    """The control: the same subprocess with a record of the running torch loads the library."""
    pytest.importorskip("pama_ext._build_info", reason="no build record (source tree without a build)")
    from pama_ext import _build_info as bi

    r = import_with_record([bi.VERSION, bi.BUILT_WITH_TORCH, bi.BUILT_WITH_CUDA, bi.CUDA_ARCHS], "1")
    assert r.get("native") is True and r["library_loaded"] and not r["warnings"], r


# tools/build_wheels.sh: the interpreters are looked up before anything is built


def tool_path(tmp_path):
    """A PATH with only the tools the script's lookup uses (no python3.X, whatever the machine has)."""
    bin_dir = tmp_path / "bin"
    if bin_dir.exists():
        return str(bin_dir)
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "ls", "sort", "tail", "grep", "xargs", "sed", "head", "tr", "cat"):
        found = shutil.which(tool)
        if found is None:
            pytest.skip(f"{tool} not found")
        (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def build_wheels(tmp_path, *args, env=None):
    full = {"PATH": tool_path(tmp_path), "HOME": str(tmp_path), "PYENV_ROOT": str(tmp_path / "pyenv"), **(env or {})}
    return subprocess.run([shutil.which("bash"), str(ROOT / "tools" / "build_wheels.sh"), *args], capture_output=True,
                          text=True, env=full, timeout=60, cwd=tmp_path)


needs_script = pytest.mark.skipif(
    shutil.which("bash") is None or not (ROOT / "tools" / "build_wheels.sh").exists(),
    reason="bash or tools/build_wheels.sh not found (an installed wheel's test run has no tools/)")


@needs_script
def test_build_wheels_names_a_missing_interpreter(tmp_path):
    r = build_wheels(tmp_path, "cpu-3.10", "cu-3.12", "cpu-3.12")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "CPython 3.10 not found (needed for: cpu-3.10)" in r.stderr
    assert "CPython 3.12 not found (needed for: cu-3.12 cpu-3.12)" in r.stderr
    assert "pyenv install 3.10" in r.stderr and "PYTHON310=" in r.stderr
    assert "build_wheels ==" not in r.stdout  # nothing was built
    r = build_wheels(tmp_path, "cpu-3.9")
    assert r.returncode == 2 and "unknown matrix entry 'cpu-3.9'" in r.stderr


@needs_script
def test_build_wheels_finds_pyenv_and_explicit_interpreters(tmp_path):
    for version in ("3.10.2", "3.10.13"):
        exe = tmp_path / "pyenv" / "versions" / version / "bin" / "python3.10"
        exe.parent.mkdir(parents=True)
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
    explicit = tmp_path / "elsewhere" / "python3.13"
    explicit.parent.mkdir()
    explicit.write_text("#!/bin/sh\nexit 0\n")
    explicit.chmod(0o755)
    r = build_wheels(tmp_path, "--list", "cpu-3.10", "cpu-3.13", env={"PYTHON313": str(explicit)})
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert str(tmp_path / "pyenv" / "versions" / "3.10.13" / "bin" / "python3.10") in lines[0]  # the newest 3.10
    assert str(explicit) in lines[1]


# tools/check_wheel.py: what `make wheels` asserts about every wheel it writes


def fake_wheel(path: pathlib.Path, *, drop=(), extra=(), requires="torch<2.14,>=2.13", built_torch="2.13.0+cpu"):
    """A wheel-shaped zip holding every tracked file of pama_ext/ (minus ``drop``), a stand-in library,
    a build record and METADATA with the given torch requirement."""
    import zipfile

    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "pama_ext"], capture_output=True, text=True,
                             check=True).stdout.split()
    version = "0.1.0+cpu.torch2.13"
    with zipfile.ZipFile(path, "w") as z:
        for name in tracked:
            if name not in drop:
                z.writestr(name, "")
        for name in ["pama_ext/_C.cpython-311-x86_64-linux-gnu.so", *extra]:
            z.writestr(name, b"\x7fELF")
        z.writestr("pama_ext/_build_info.py", f"VERSION = {version!r}\nBUILT_WITH_TORCH = {built_torch!r}\n"
                                              "BUILT_WITH_CUDA = None\nCUDA_ARCHS = ''\n")
        di = f"pama_ext-{version}.dist-info"
        z.writestr(f"{di}/METADATA", f"Metadata-Version: 2.1\nName: pama_ext\nVersion: {version}\n"
                                     f"Requires-Dist: {requires}\nRequires-Dist: numpy\n"
                                     'Requires-Dist: pytest>=7; extra == "test"\n\n')
        z.writestr(f"{di}/entry_points.txt", "[console_scripts]\npama-ext = pama_ext.cli:main\n")
    return path


def check_wheel(path, *args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "check_wheel.py"), *args, str(path)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not (ROOT / "tools" / "check_wheel.py").exists() or shutil.which("git") is None
                    or not (ROOT / ".git").exists(), reason="needs the source checkout (tools/, git)")
def test_check_wheel_accepts_a_complete_wheel_and_names_what_is_wrong(tmp_path):
    name = "pama_ext-0.1.0+cpu.torch2.13-cp311-cp311-{}.whl"
    good = fake_wheel(tmp_path / name.format("manylinux_2_34_x86_64"))
    r = check_wheel(good, "--repaired")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Requires-Dist torch<2.14,>=2.13, numpy" in r.stdout

    cases = [
        (dict(drop=("pama_ext/triton_kernels.py", "pama_ext/schemas.def")), "manylinux_2_34_x86_64",
         ["missing from the wheel", "pama_ext/triton_kernels.py", "pama_ext/schemas.def"]),
        (dict(drop=("pama_ext/benchmarks/bench_ops.py",)), "manylinux_2_34_x86_64", ["pama_ext/benchmarks/bench_ops.py"]),
        (dict(requires="torch>=2.4"), "manylinux_2_34_x86_64", ["Requires-Dist on torch", "torch>=2.13,<2.14"]),
        (dict(built_torch="2.12.0"), "manylinux_2_34_x86_64", ["expected ['torch>=2.12,<2.13']"]),
        (dict(extra=("pama_ext.libs/libgomp-a34b3233.so.1",)), "manylinux_2_34_x86_64", ["grafted", "libgomp"]),
        ({}, "linux_x86_64", ["platform tag linux_x86_64 is not manylinux_*"]),
    ]
    for k, (kwargs, plat, words) in enumerate(cases):
        folder = tmp_path / str(k)
        folder.mkdir()
        r = check_wheel(fake_wheel(folder / name.format(plat), **kwargs), "--repaired")
        assert r.returncode == 1, (kwargs, r.stdout, r.stderr)
        for word in words:
            assert word in r.stderr, (word, r.stderr)


# ---- the source digest and a carried wheel's library (tools/wheel_library.py, tools/gpu_session.sh) ----
needs_sources = pytest.mark.skipif(not (ROOT / "csrc").is_dir() or not (ROOT / "tools" / "wheel_library.py").exists(),
                                   reason="no csrc/ or tools/ (an installed wheel's test run)")


def library_tree(tmp_path) -> pathlib.Path:
    """A copy of what the digest and tools/wheel_library.py read: csrc/, pama_ext/{abi.py,schemas.def}, and
    tools/wheel_library.py with the check_wheel.py it imports."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "csrc", tree / "csrc")
    (tree / "pama_ext").mkdir()
    for name in ("abi.py", "schemas.def"):
        shutil.copy(ROOT / "pama_ext" / name, tree / "pama_ext" / name)
    (tree / "tools").mkdir()
    for name in ("wheel_library.py", "check_wheel.py"):
        shutil.copy(ROOT / "tools" / name, tree / "tools" / name)
    return tree


@needs_sources
def test_source_digest_follows_every_library_source(tmp_path):
    tree = library_tree(tmp_path)
    digest = abi.source_digest(str(tree))
    assert digest == abi.source_digest(str(ROOT)) and len(digest) == 16
    kernel = next(tree.glob("csrc/cpu/*.cpp"))
    kernel.write_bytes(kernel.read_bytes() + b" ")
    assert abi.source_digest(str(tree)) != digest
    kernel.write_bytes(kernel.read_bytes()[:-1])
    assert abi.source_digest(str(tree)) == digest
    (tree / "pama_ext" / "schemas.def").write_text((tree / "pama_ext" / "schemas.def").read_text() + "\n")
    assert abi.source_digest(str(tree)) != digest
    shutil.copy(ROOT / "pama_ext" / "schemas.def", tree / "pama_ext" / "schemas.def")
    (tree / "csrc" / "cuda" / "new.cuh").write_text("")
    assert abi.source_digest(str(tree)) != digest  # a new file counts, even an empty one
    with pytest.raises(FileNotFoundError, match="no library sources"):
        abi.source_digest(str(tmp_path / "empty"))


def library_wheel(path, tag, record):
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("pama_ext/_build_info.py", "".join(f"{k} = {v!r}\n" for k, v in record.items()))
        z.writestr(f"pama_ext/_C.cpython-{tag[2:]}-x86_64-linux-gnu.so", b"library bytes")
        z.writestr("pama_ext/__init__.py", "")
    return path


@needs_sources
def test_wheel_library_takes_only_a_wheel_of_these_sources_python_and_torch(tmp_path):
    tree = library_tree(tmp_path)
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    record = {"VERSION": "0.1.0+x", "BUILT_WITH_TORCH": torch.__version__, "BUILT_WITH_CUDA": torch.version.cuda,
              "CUDA_ARCHS": "", "SOURCE_DIGEST": abi.source_digest(str(tree))}
    other_torch = f"{MAJOR}.{MINOR + 1}.0"

    def run(name, tag, check=False, **changes):
        whl = library_wheel(tmp_path / f"pama_ext-0.1.0-{tag}-{tag}-linux_x86_64-{name}.whl", tag, {**record, **changes})
        return subprocess.run([sys.executable, str(tree / "tools" / "wheel_library.py"), *(["--check"] * check),
                               str(whl)], capture_output=True, text=True, timeout=120)

    for name, t, changes, words in [
        ("stale", tag, {"SOURCE_DIGEST": "0123456789abcdef"}, "built from other library sources"),
        ("old", tag, {"SOURCE_DIGEST": None}, "built from other library sources"),
        ("py", "cp39", {}, "not for this Python"),
        ("torch", tag, {"BUILT_WITH_TORCH": other_torch}, f"built against torch {other_torch}"),
    ]:
        r = run(name, t, **changes)
        assert r.returncode == 1 and words in r.stderr, (name, r.stdout, r.stderr)
        assert not list((tree / "pama_ext").glob("_C*")) and not (tree / "pama_ext" / "_build_info.py").exists()
    r = run("good", tag, check=True)
    assert r.returncode == 0 and "serves this tree" in r.stdout, r.stdout + r.stderr
    assert not list((tree / "pama_ext").glob("_C*"))  # --check extracts nothing
    r = run("good", tag)
    assert r.returncode == 0, r.stdout + r.stderr
    lib = tree / "pama_ext" / f"_C.cpython-{tag[2:]}-x86_64-linux-gnu.so"
    assert lib.read_bytes() == b"library bytes"
    assert f"SOURCE_DIGEST = {record['SOURCE_DIGEST']!r}" in (tree / "pama_ext" / "_build_info.py").read_text()
    assert not (tree / "pama_ext" / "__init__.py").exists()  # only the library and its build record


def test_info_says_whether_the_library_matches_the_source_tree():
    from pama_ext import cli

    assert "not recorded" in cli.library_sources_line(None)
    package_root = pathlib.Path(pama_ext.__file__).resolve().parent.parent
    if not (package_root / "csrc").is_dir():  # an installed package: the digest alone
        assert cli.library_sources_line("0123456789abcdef") == "0123456789abcdef"
        return
    here = abi.source_digest(str(package_root))
    assert cli.library_sources_line(here).startswith(f"{here} (matches this source tree")
    assert "this source tree differs: rebuild" in cli.library_sources_line("0123456789abcdef")
