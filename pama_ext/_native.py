"""Loads the compiled library (pama_ext._C), which registers torch.ops.pama_ext.*.

If it cannot be loaded, pama_ext keeps working on the pure-PyTorch reference path and says so once;
the ops keep their contract there (the argument checks and check_finite of pama_ext.checks run
before the reference). The ops read NATIVE_AVAILABLE at every call. Set PAMA_EXT_REQUIRE_NATIVE=1 to make a missing or broken build an ImportError instead (the test
suite does this, so a build problem never passes silently).
"""
import os
import warnings

import torch  # (loads libc10/libtorch, which the compiled library links against)

from .abi import incompatibility

NATIVE_AVAILABLE = False
NATIVE_ERROR = None


def _check_torch() -> None:
    """Raises ImportError naming both versions where the build (pama_ext/_build_info.py) was made
    against another torch release series or CUDA major version than the one imported (pama_ext.abi),
    before the library is loaded: loading it would fail with an undefined C++ symbol, or worse."""
    try:
        from . import _build_info
    except ImportError:  # a source tree without a build: importing _C fails on its own
        return
    problem = incompatibility(_build_info.BUILT_WITH_TORCH, _build_info.BUILT_WITH_CUDA, torch.__version__,
                              torch.version.cuda, _build_info.VERSION)
    if problem is not None:
        raise ImportError(problem)


try:
    _check_torch()
    from . import _C  # noqa: F401  (import registers the ops)

    NATIVE_AVAILABLE = True
except (ImportError, OSError) as exc:  # not built, or built against another torch
    NATIVE_ERROR = exc
    if os.environ.get("PAMA_EXT_REQUIRE_NATIVE", "0") == "1":
        raise ImportError(
            f"pama_ext: the compiled library could not be loaded ({exc}); PAMA_EXT_REQUIRE_NATIVE=1 "
            "forbids the reference fallback. Build it with `pip install --no-build-isolation -e .`."
        ) from exc
    warnings.warn(
        f"pama_ext: compiled ops unavailable ({exc}); using the pure-PyTorch reference implementation "
        "(slower, no fused kernels). Build with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )


def available(op: str = "") -> bool:
    """Whether the compiled library serves ``torch.ops.pama_ext.<op>`` (any op when empty). Reads
    NATIVE_AVAILABLE at every call, so a test can switch the reference fallback on."""
    return NATIVE_AVAILABLE and (not op or hasattr(torch.ops.pama_ext, op))
