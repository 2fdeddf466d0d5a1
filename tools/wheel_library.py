"""Puts the compiled library of a prebuilt pama_ext wheel into this source tree, if the wheel was built
from these sources for this Python and torch; otherwise says why not and changes nothing.

    python tools/wheel_library.py dist/pama_ext-0.1.0+cu130.torch2.11-cp312-cp312-manylinux_2_34_x86_64.whl
    python tools/wheel_library.py --check WHEEL   # only say whether it would serve (exit status 0 / 1)

Used by tools/gpu_session.sh: a GPU machine lent for minutes runs the tree it is given, and compiling
the CUDA kernels there costs several of those minutes; a wheel built beforehand on a CPU machine
(make wheels WHEELS=cu-3.12) and carried along serves instead when

  * its build record (pama_ext/_build_info.py) has the SOURCE_DIGEST of this tree's library sources
    (pama_ext/abi.py: source_digest over csrc/ and pama_ext/schemas.def): the same kernels;
  * its Python tag is this interpreter's (cpXY);
  * pama_ext/abi.py finds it loadable into this torch (same release series; a CUDA build needs a CUDA
    torch of the same CUDA major version).

Then pama_ext/_C*.so and pama_ext/_build_info.py are extracted into ./pama_ext (exit status 0), so
`import pama_ext` from the tree (PYTHONPATH=<tree>) loads the wheel's library. Exit status 1 (and the
reason on stderr) otherwise: build from source instead.
"""
from __future__ import annotations

import os
import pathlib
import sys
import zipfile

from check_wheel import ROOT, load_abi  # tools/ is the script's directory, first on sys.path


def why_not(wheel: pathlib.Path, record: dict, torch_version: str, torch_cuda) -> str | None:
    """None where the wheel's library serves this tree, interpreter and torch; else the reason."""
    abi = load_abi()
    tree = abi.source_digest(str(ROOT))
    built = record.get("SOURCE_DIGEST")
    if built != tree:
        return (f"{wheel.name} was built from other library sources (digest {built}, this tree {tree}): "
                "rebuild the wheel from this tree")
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    if f"-{tag}-" not in wheel.name:
        return f"{wheel.name} is not for this Python ({tag})"
    return abi.incompatibility(record["BUILT_WITH_TORCH"], record["BUILT_WITH_CUDA"], torch_version, torch_cuda,
                               record.get("VERSION", ""))


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    check_only = args[:1] == ["--check"]
    args = args[1:] if check_only else args
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    wheel = pathlib.Path(args[0])
    if not wheel.is_file():
        print(f"wheel_library: no wheel at {wheel}", file=sys.stderr)
        return 1
    import torch

    with zipfile.ZipFile(wheel) as z:
        record: dict = {}
        exec(z.read("pama_ext/_build_info.py").decode(), record)
        reason = why_not(wheel, record, torch.__version__, torch.version.cuda)
        if reason:
            print(f"wheel_library: not using {wheel.name}: {reason}", file=sys.stderr)
            return 1
        if check_only:
            print(f"wheel_library: {wheel.name} serves this tree (sources {record['SOURCE_DIGEST']})")
            return 0
        members = [n for n in z.namelist() if n == "pama_ext/_build_info.py"
                   or (n.startswith("pama_ext/_C") and n.endswith(".so"))]
        for old in (ROOT / "pama_ext").glob("_C*.so"):
            old.unlink()
        for name in members:
            target = ROOT / name
            tmp = target.with_name(target.name + ".tmp-wheel")
            tmp.write_bytes(z.read(name))
            os.replace(tmp, target)
    print(f"wheel_library: {wheel.name} -> {', '.join(members)} (sources {record['SOURCE_DIGEST']}, "
          f"built with torch {record['BUILT_WITH_TORCH']}, CUDA archs {record['CUDA_ARCHS'] or '-'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
