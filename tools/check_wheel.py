"""Checks a built pama_ext wheel's contents and metadata, and prints them.

    python tools/check_wheel.py dist/pama_ext-0.1.0+cpu.torch2.13-cp311-cp311-manylinux_2_34_x86_64.whl
    python tools/check_wheel.py --repaired WHEEL   # also: a manylinux tag, no grafted libraries

Fails (exit status 1, naming what is wrong) unless:
  * the wheel holds exactly one compiled library, pama_ext/_C*.so, and the build record
    pama_ext/_build_info.py;
  * every file git tracks under pama_ext/ is in the wheel: the Triton kernels (triton_kernels.py), the
    benchmark suites `pama-ext bench` runs (pama_ext/benchmarks/), the op schemas (schemas.def, package data);
  * METADATA's Requires-Dist pins torch to the release series recorded in _build_info.py
    (pama_ext/abi.py: torch_requirement) and its version is _build_info.VERSION;
  * the `pama-ext` console script is declared;
  * with --repaired: the platform tag is manylinux_* and auditwheel grafted no library into the wheel
    (torch's libraries, libgomp and the CUDA runtime come from the torch wheel and its dependencies).
Prints the file list (sizes), the build record and a one-line summary.
"""
from __future__ import annotations

import argparse
import email.parser
import importlib.util
import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_abi():
    spec = importlib.util.spec_from_file_location("pama_ext_abi", ROOT / "pama_ext" / "abi.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tracked_package_files() -> list[str]:
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "pama_ext"], capture_output=True, text=True,
                         check=True).stdout.split()
    return sorted(p for p in out if not p.endswith(".pyc"))


def clauses(requirement: str) -> set:
    """'torch<2.12,>=2.11' -> {'<2.12', '>=2.11'}: the specifier clauses of a name-only requirement,
    in any order (the wheel's METADATA orders them its own way)."""
    return {c.strip() for c in requirement.replace(" ", "")[len("torch"):].split(",")}


def check(path: pathlib.Path, repaired: bool) -> list[str]:
    problems = []
    z = zipfile.ZipFile(path)
    names = set(z.namelist())
    for info in z.infolist():
        if not info.filename.endswith(".pyc"):
            print(f"  {info.file_size:>10}  {info.filename}")

    libs = [n for n in names if n.startswith("pama_ext/_C") and n.endswith(".so")]
    if len(libs) != 1:
        problems.append(f"expected exactly one compiled library pama_ext/_C*.so, found {libs}")
    grafted = sorted(n for n in names if n.endswith(".so") or ".so." in n)
    grafted = [n for n in grafted if n not in libs]
    if grafted:
        problems.append(f"libraries besides pama_ext/_C*.so in the wheel (grafted by auditwheel?): {grafted}")
    missing = [p for p in tracked_package_files() if p not in names]
    if missing:
        problems.append(f"files of pama_ext/ missing from the wheel: {missing}")

    if "pama_ext/_build_info.py" not in names:
        problems.append("no pama_ext/_build_info.py (the build record)")
        return problems
    record: dict = {}
    exec(z.read("pama_ext/_build_info.py").decode(), record)
    print("".join(f"  {k} = {record[k]!r}\n" for k in ("VERSION", "BUILT_WITH_TORCH", "BUILT_WITH_CUDA", "CUDA_ARCHS", "SOURCE_DIGEST") if k in record),
          end="")

    dist_info = [n for n in names if n.endswith(".dist-info/METADATA")]
    meta = email.parser.Parser().parsestr(z.read(dist_info[0]).decode()) if dist_info else None
    if meta is None:
        problems.append("no .dist-info/METADATA")
        return problems
    # the unconditional requirements (the extras' are the optional-dependencies of pyproject.toml)
    requires = [r for r in meta.get_all("Requires-Dist") or [] if ";" not in r]
    want = load_abi().torch_requirement(record["BUILT_WITH_TORCH"])
    torch_req = [r for r in requires if r.startswith("torch") and not r[len("torch"):][:1].isalnum()]
    if len(torch_req) != 1 or clauses(torch_req[0]) != clauses(want):
        problems.append(f"Requires-Dist on torch is {torch_req}, expected [{want!r}] (built against "
                        f"torch {record['BUILT_WITH_TORCH']})")
    if meta["Version"] != record["VERSION"]:
        problems.append(f"METADATA version {meta['Version']} != _build_info.VERSION {record['VERSION']}")
    entry_points = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    if not entry_points or "pama-ext" not in z.read(entry_points[0]).decode():
        problems.append("no pama-ext console script in entry_points.txt")

    platform = path.name[:-len(".whl")].split("-")[-1]
    if repaired and not platform.startswith("manylinux_"):
        problems.append(f"platform tag {platform} is not manylinux_*")
    print(f"check_wheel: {path.name}: {path.stat().st_size / 2**20:.1f} MiB, Requires-Dist {', '.join(requires)}, "
          f"torch {record['BUILT_WITH_TORCH']}, CUDA {record['BUILT_WITH_CUDA']}, archs {record['CUDA_ARCHS'] or '-'}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("wheel", type=pathlib.Path)
    parser.add_argument("--repaired", action="store_true", help="also require a manylinux tag and no grafted library")
    args = parser.parse_args()
    problems = check(args.wheel, args.repaired)
    for p in problems:
        print(f"check_wheel: {args.wheel.name}: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
