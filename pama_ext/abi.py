"""Which torch a compiled pama_ext library can be loaded into (no torch import here).

The compiled library (pama_ext._C) links against libtorch / libc10, whose C++ ABI is only stable
within one torch release series (major.minor). A build records the torch and CUDA it was built
against (pama_ext/_build_info.py, written by setup.py); the same rules decide the wheel's
``Requires-Dist`` on torch (setup.py, through :func:`torch_requirement`) and, at import time, whether
the library is loaded at all (pama_ext._native, through :func:`incompatibility`), so that a wheel
installed next to another torch fails with a message naming both versions instead of a dynamic
linker error about an undefined C++ symbol. setup.py loads this file by path, before pama_ext
exists as an installed package, hence no imports from the package.
"""
from __future__ import annotations

import glob
import hashlib
import os


def release(version: str) -> tuple:
    """(major, minor) of a version string: '2.13.0+cpu' -> (2, 13), '13.0' -> (13, 0)."""
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise ValueError(f"not a version of the form MAJOR.MINOR[...]: {version!r}") from None


def torch_series(version: str) -> str:
    """The torch release series a build is tied to: '2.13.0+cpu' -> '2.13'."""
    return "%d.%d" % release(version)


def torch_requirement(version: str) -> str:
    """The torch requirement of a wheel built against torch ``version``: its release series only,
    any patch release or build variant ('2.13.0+cpu', '2.13.1') -> 'torch>=2.13,<2.14'."""
    major, minor = release(version)
    return f"torch>={major}.{minor},<{major}.{minor + 1}"


def incompatibility(built_torch: str, built_cuda, torch_version: str, torch_cuda, package_version: str = ""):
    """Why a library built against torch ``built_torch`` (CUDA ``built_cuda``, None for a CPU-only
    build) cannot be loaded into torch ``torch_version`` (``torch.version.cuda``: None for a CPU torch);
    None where it can. A CPU-only build loads into a CUDA torch of its series (the CPU half of the
    ABI is the same); a CUDA build needs a CUDA torch of the same CUDA major version (the CUDA
    runtime's soname, libcudart.so.<major>, is that of the torch it was built against)."""
    what = f"pama_ext {package_version}".rstrip()
    fix = (
        "Install the pama_ext wheel built for this torch (README.md, Install), install the torch this one was "
        f"built for (pip install \"{torch_requirement(built_torch)}\"), or build pama_ext from source against "
        "this torch (pip install --no-build-isolation .)."
    )
    if release(built_torch) != release(torch_version):
        return (
            f"{what} was built against torch {built_torch} (torch {torch_series(built_torch)}.x) but this "
            f"environment has torch {torch_version}; its compiled library is tied to the C++ ABI of one torch "
            f"release series. {fix}"
        )
    if built_cuda is not None and torch_cuda is None:
        return (
            f"{what} was built with CUDA {built_cuda} kernels against torch {built_torch} but this environment "
            f"has torch {torch_version} without CUDA (a CUDA build needs a CUDA torch). "
            f"{fix}"
        )
    if built_cuda is not None and release(built_cuda)[0] != release(torch_cuda)[0]:
        return (
            f"{what} was built with CUDA {built_cuda} against torch {built_torch} but this environment has torch "
            f"{torch_version} with CUDA {torch_cuda} (another CUDA major version, another CUDA runtime). {fix}"
        )
    return None


#: the files the compiled library is built from, relative to the source tree (setup.py compiles csrc/
#: and registers the schemas of pama_ext/schemas.def)
LIBRARY_SOURCES = ("csrc/**/*", "pama_ext/schemas.def")


def source_digest(root: str) -> str:
    """A short SHA-256 over the paths and contents of the files of :data:`LIBRARY_SOURCES` under the
    source tree ``root``. setup.py records it in ``_build_info.SOURCE_DIGEST``, so a library (e.g. one
    taken from a prebuilt wheel) can be checked against a tree: equal digests, same kernels."""
    files = sorted({p for pattern in LIBRARY_SOURCES for p in glob.glob(os.path.join(root, pattern), recursive=True)
                    if os.path.isfile(p)})
    if not files:
        raise FileNotFoundError(f"no library sources ({', '.join(LIBRARY_SOURCES)}) under {root}")
    h = hashlib.sha256()
    for path in files:
        h.update(os.path.relpath(path, root).replace(os.sep, "/").encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()[:16]
