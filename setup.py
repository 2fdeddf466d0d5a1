"""Build of the pama_ext compiled library (torch.utils.cpp_extension).

Always builds the CPU kernels; adds the CUDA kernels when a CUDA-enabled torch and CUDA_HOME are
present. Environment:
  PAMA_EXT_CUDA=auto|0|1      CUDA kernels: detect (default), never, or required
  TORCH_CUDA_ARCH_LIST        CUDA targets, default "8.0;9.0"
Build with `pip install --no-build-isolation -e .` so the torch already installed is the one used.
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


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


def write_build_info(use_cuda: bool, archs: str) -> None:
    path = os.path.join(HERE, "pama_ext", "_build_info.py")
    text = (
        "# Written by setup.py at build time; do not edit.\n"
        f"VERSION = {VERSION!r}\n"
        f"BUILT_WITH_TORCH = {torch.__version__!r}\n"
        f"BUILT_WITH_CUDA = {torch.version.cuda if use_cuda else None!r}\n"
        f"CUDA_ARCHS = {archs if use_cuda else ''!r}\n"
    )
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def extensions():
    use_cuda = want_cuda()
    cxx = ["-O3", "-std=c++17"]
    sources = ["csrc/ops.cpp"]
    if use_cuda:
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        write_build_info(True, archs)
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + ["csrc/cuda/ops_cuda.cpp"]
        return [
            CUDAExtension(
                "pama_ext._C",
                sources,
                include_dirs=[os.path.join(HERE, "csrc")],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
            )
        ]
    write_build_info(False, "")
    return [CppExtension("pama_ext._C", sources, include_dirs=[os.path.join(HERE, "csrc")], extra_compile_args=cxx)]


setup(
    version=VERSION,
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
