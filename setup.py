"""Build of the pama_ext compiled library (torch.utils.cpp_extension).

Always builds the CPU kernels; adds the CUDA kernels when a CUDA-enabled torch and CUDA_HOME are
present. Environment:
  PAMA_EXT_CUDA=auto|0|1      CUDA kernels: detect (default), never, or required
  TORCH_CUDA_ARCH_LIST        CUDA targets, default "8.0;9.0+PTX" (machine code for sm_80 and sm_90, and
                              PTX of sm_90, which the driver compiles for newer GPUs)
  PAMA_EXT_LOCAL_VERSION      override the local version label (set it empty for none)
Build with `pip install --no-build-isolation -e .` so the torch already installed is the one used.

Version: BASE_VERSION plus a PEP 440 local label naming what the compiled library is tied to, the
CUDA toolkit of the build (or "cpu" when no CUDA kernels are built) and torch's major.minor:
0.1.0+cpu.torch2.13 for a CPU build, 0.1.0+cu130.torch2.11 for a CUDA 13.0 build against torch 2.11.
A wheel only loads with the torch release series it was built against (the C++ ABI is not stable
across releases): its Requires-Dist pins that series (torch>=2.13,<2.14) and pama_ext/_build_info.py
records the build for the import-time check (pama_ext/abi.py holds both rules).
"""
import glob
import importlib.util
import os
import re
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
BASE_VERSION = "0.1.0"
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def load_abi():
    """pama_ext/abi.py, loaded by path (the package itself imports the compiled library)."""
    spec = importlib.util.spec_from_file_location("pama_ext_abi", os.path.join(HERE, "pama_ext", "abi.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ABI = load_abi()


def want_cuda() -> bool:
    mode = os.environ.get("PAMA_EXT_CUDA", "auto").lower()
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if mode in ("1", "true", "yes", "on"):
        if not available:
            raise SystemExit(
                "PAMA_EXT_CUDA=1 but no CUDA build is possible: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}"
            )
        return True
    if mode in ("0", "false", "no", "off"):
        return False
    return available


def local_version_label(use_cuda: bool) -> str:
    """'cpu.torch2.13' / 'cu130.torch2.11': PEP 440 local labels allow only [0-9A-Za-z.]."""
    override = os.environ.get("PAMA_EXT_LOCAL_VERSION")
    if override is not None:
        label = override
    else:
        major_minor = ABI.torch_series(torch.__version__)
        accel = "cu" + torch.version.cuda.replace(".", "") if use_cuda else "cpu"
        label = f"{accel}.torch{major_minor}"
    label = re.sub(r"[^0-9A-Za-z.]+", ".", label).strip(".")
    label = re.sub(r"\.{2,}", ".", label)
    return label


def full_version(use_cuda: bool) -> str:
    label = local_version_label(use_cuda)
    return f"{BASE_VERSION}+{label}" if label else BASE_VERSION


def write_build_info(use_cuda: bool, archs: str) -> None:
    path = os.path.join(HERE, "pama_ext", "_build_info.py")
    text = (
        "# Written by setup.py at build time; do not edit.\n"
        f"VERSION = {full_version(use_cuda)!r}\n"
        f"BUILT_WITH_TORCH = {torch.__version__!r}\n"
        f"BUILT_WITH_CUDA = {torch.version.cuda if use_cuda else None!r}\n"
        f"CUDA_ARCHS = {archs if use_cuda else ''!r}\n"
        f"SOURCE_DIGEST = {ABI.source_digest(HERE)!r}\n"
    )
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def openmp_flags():
    """The compile and link flags of torch's intra-op parallel backend (at::parallel_for).

    at::parallel_for is an inline ATen header: its OpenMP region is compiled into this library, so
    without -fopenmp every CPU kernel runs on one thread. torch ships its own libgomp.so.1 and loads
    it first, so the library links against the same runtime by soname.
    """
    # Linux / GCC only: Apple clang has no -fopenmp (there the kernels run on the calling thread)
    if "OpenMP" not in torch.__config__.parallel_info() or not sys.platform.startswith("linux"):
        return [], []
    return ["-fopenmp"], ["-fopenmp"]


def extensions(use_cuda: bool):
    omp_cxx, omp_link = openmp_flags()
    # -fno-trapping-math: the CPU kernels' loops are written with selects, which GCC turns into vector
    # blends only when floating-point operations may be evaluated unconditionally (cpu/vec.h); it
    # changes no result, only the floating-point exception flags, which nothing reads.
    # -fno-wrapv: Python's own CFLAGS, which setuptools passes first, hold -fwrapv (signed overflow
    # wraps); then GCC cannot take an index such as t + l (the lanes of cpu/vec.h's lane_sum, the
    # tile dot products) for a contiguous one and loads each lane on its own. The library's code does
    # not rely on signed wraparound, and torch itself is built without -fwrapv.
    cxx = ["-O3", "-std=c++17", "-fno-trapping-math", "-fno-wrapv"] + omp_cxx
    # op bodies + registration (csrc/*.cpp) and the CPU kernels (csrc/cpu/*.cpp), mirrored for CUDA
    # by csrc/cuda/*.cu + csrc/cuda/ops_cuda.cpp
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    if use_cuda:
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        write_build_info(True, archs)
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + ["csrc/cuda/ops_cuda.cpp"]
        return [
            CUDAExtension(
                "pama_ext._C",
                sources,
                include_dirs=[os.path.join(HERE, "csrc")],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
                extra_link_args=omp_link,
            )
        ]
    write_build_info(False, "")
    return [
        CppExtension(
            "pama_ext._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args=cxx,
            extra_link_args=omp_link,
        )
    ]


USE_CUDA = want_cuda()

setup(
    version=full_version(USE_CUDA),
    # pyproject.toml lists dependencies as dynamic: the torch series this build is tied to
    install_requires=[ABI.torch_requirement(torch.__version__), "numpy"],
    ext_modules=extensions(USE_CUDA),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
