"""Weighting methods on statistics, on device (SPEC §4, §6): PAMA's closed form on per-objective
scalars, and linear / MGDA / CAGrad (RACO's CAGrad-clip) / PCGrad on a Gram matrix ``G [n, n]``
(e.g. from :func:`pama_ext.gradient_gram` or the ``gram`` block of the statistics vector).

Device tensors in, device tensors out; bounded work and no host read, so a step using them can be
captured in a CUDA graph. MGDA and CAGrad are solved exactly in float64 (support enumeration for
n <= 8, an active-set method beyond; csrc/gram_solvers.h, shared by CPU and CUDA): the objective is
within 1e-10 of max_i G_ii of the optimum (docs/algorithms.md §6). A non-finite G, w
or c gives NaN weights. The solvers are one small kernel each (``torch.ops.pama_ext.gram_weights``)
with pure-PyTorch twins in :mod:`pama_ext.reference` (face enumeration, n <= 12) used when the
compiled library is absent.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from . import _native, checks

__all__ = ["pama_weights", "linear_weights", "mgda_weights", "cagrad_weights", "pcgrad_weights"]


def _use_native() -> bool:
    """Read at every call, as pama_ext.ops does (the fallback can be switched on in tests)."""
    return _native.NATIVE_AVAILABLE and hasattr(torch.ops.pama_ext, "gram_weights")


def _check_gram(G: Tensor, w: Optional[Tensor] = None) -> None:
    if not isinstance(G, Tensor) or G.dim() != 2 or G.shape[0] != G.shape[1] or not G.is_floating_point():
        shape = tuple(G.shape) if isinstance(G, Tensor) else type(G).__name__
        raise ValueError(f"G must be a floating [n, n] Gram matrix, got {shape}")
    if not 1 <= G.shape[0] <= 64:
        raise ValueError(f"G has n = {G.shape[0]} objectives; n must be in [1, 64]")
    checks.same_device("gram_weights", ("G", G), ("w", w))


def _acc(G: Tensor) -> Tensor:
    return G.to(reference.acc_dtype(G.dtype))


def _solve(G: Tensor, w: Optional[Tensor], method: str, c: float, clip: bool) -> Tensor:
    return torch.ops.pama_ext.gram_weights(G.detach(), None if w is None else w.detach(), method, float(c),
                                           bool(clip))


def pama_weights(v: Tensor) -> Tensor:
    """PAMA's Theorem 1 on per-objective scalars ``v [n]`` (e.g. ``abar``): closed-form min-norm
    weights, ties shared uniformly."""
    return reference.thm1_weights(v)[0]


def linear_weights(G: Tensor, w: Optional[Tensor] = None) -> Tensor:
    """The user weights ``w`` (uniform when None), ``[n]`` in G's accumulation dtype."""
    _check_gram(G, w)
    return reference.linear_weights(_acc(G), w)


def mgda_weights(G: Tensor) -> Tensor:
    """Min-norm point ``argmin_{c in simplex} c^T G c``, exact up to float64 rounding (objective
    within 1e-10 of max_i G_ii; weights are not unique where G is singular, the direction
    ``sum_i c_i g_i`` is). The same solver as ``pareto_weights(method="mgda")``."""
    _check_gram(G)
    if not _use_native():
        return reference.mgda_weights(_acc(G))
    return _solve(G, None, "mgda", 0.0, False)


def cagrad_weights(G: Tensor, w: Optional[Tensor] = None, c: float = 0.4, clip: bool = True) -> Tensor:
    """Final coefficients ``a [n]`` of CAGrad-clip / RACO (``clip=True``) or CAGrad (``clip=False``).

    With user weights ``w`` (on the simplex; uniform when None; not checked, that would need a host
    read), ``b = G w`` and ``s = c * sqrt(w^T G w)``: ``p* = argmin_{p in simplex} p^T b +
    s * sqrt(p^T G p)``, ``p~ = min(p*, w)`` (clip) or ``p*``, ``a = w + s / sqrt(p~^T G p~) * p~``
    (``a = w`` where ``p~^T G p~`` is 0 up to rounding: the direction vanishes). The update is
    ``sum_i a_i g_i``. ``p*`` is exact up to float64 rounding (objective within 1e-10 of
    max_i G_ii).
    """
    _check_gram(G, w)
    if c < 0:
        raise ValueError(f"c must be >= 0, got {c}")
    if not _use_native():
        return reference.cagrad_weights(_acc(G), w, c, clip)
    return _solve(G, w, "cagrad", c, clip)


def pcgrad_weights(G: Tensor) -> Tensor:
    """PCGrad in Gram form (SPEC §6): coefficients ``sum_i v_i`` of the projected gradients, with
    objectives projected in the fixed order j = 0..n-1."""
    _check_gram(G)
    if not _use_native():
        return reference.pcgrad_weights(_acc(G))
    return _solve(G, None, "pcgrad", 0.0, False)
