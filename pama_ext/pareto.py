"""The weighting methods (:data:`pama_ext.vocab.METHODS`), on device (docs/algorithms.md §4, §6):
PAMA's closed form on per-objective scalars, and the Gram methods (linear, MGDA, CAGrad, RACO's
CAGrad-clip, PCGrad) on a Gram matrix ``G [n, n]`` through :func:`gram_weights` (e.g. from
:func:`pama_ext.gradient_gram`, or the ``gram`` block of the statistics vector, which is what
``pama_policy_loss(method=...)`` uses).

Device tensors in, device tensors out; bounded work and no host read, so a step using them can be
captured in a CUDA graph. MGDA and CAGrad are solved exactly in float64 (support enumeration for
n <= 8, an active-set method beyond; csrc/gram_solvers.h, shared by CPU and CUDA): the objective is
within 1e-10 of max_i G_ii of the optimum (docs/algorithms.md §6). A non-finite G, w
or c gives NaN weights. The solvers are one small kernel each (``torch.ops.pama_ext.gram_weights``)
with pure-PyTorch twins in :mod:`pama_ext.reference` used when the compiled library is absent.
"""
from __future__ import annotations

import math
from typing import Optional

from torch import Tensor

from . import _native, checks, reference
from .functional import acc_dtype
from .op_table import call_native, schema_args
from .vocab import CAGRAD_C, GRAM_METHODS, MAX_OBJECTIVES, METHODS

__all__ = ["METHODS", "GRAM_METHODS", "gram_weights", "pama_weights", "linear_weights", "mgda_weights", "cagrad_weights",
           "pcgrad_weights"]


def _check_gram(G: Tensor, w: Optional[Tensor] = None) -> None:
    if not isinstance(G, Tensor) or G.dim() != 2 or G.shape[0] != G.shape[1] or not G.is_floating_point():
        shape = tuple(G.shape) if isinstance(G, Tensor) else type(G).__name__
        raise ValueError(f"G must be a floating [n, n] Gram matrix, got {shape}")
    if not 1 <= G.shape[0] <= MAX_OBJECTIVES:
        raise ValueError(f"G has n = {G.shape[0]} objectives; n must be in [1, {MAX_OBJECTIVES}]")
    checks.same_device("gram_weights", ("G", G), ("w", w))


def _acc(G: Tensor) -> Tensor:
    return G.to(acc_dtype(G.dtype))


def gram_weights(G: Tensor, w: Optional[Tensor] = None, method: str = "mgda", c: float = CAGRAD_C) -> Tensor:
    """The weights ``[n]`` of a Gram-based ``method`` (one of :data:`pama_ext.vocab.GRAM_METHODS`:
    linear, mgda, cagrad, raco, pcgrad) from ``G [n, n]``, with the user weights ``w`` (uniform when
    None) and CAGrad's ``c``; returned in G's accumulation dtype. The one entry point of the Gram
    methods: the functions below and ``pama_policy_loss(method=...)`` (on the statistics Gram) all
    come here, to ``torch.ops.pama_ext.gram_weights`` (or its reference twin without the library)."""
    _check_gram(G, w)
    checks.method_arg("gram_weights", method, from_gram=True)
    if not (math.isfinite(c) and c >= 0):
        raise ValueError(f"gram_weights: c must be finite and >= 0, got {c}")
    if not _native.available("gram_weights"):
        return reference.gram_weights(_acc(G), w, method, c)
    return call_native("gram_weights", schema_args("gram_weights", dict(G=G, w=w, method=method, c=c),
                                                          detach=("G", "w")))


def pama_weights(v: Tensor) -> Tensor:
    """PAMA's Theorem 1 on per-objective scalars ``v [n]`` (e.g. ``abar``): closed-form min-norm
    weights, ties shared uniformly."""
    return reference.thm1_weights(v)[0]


def linear_weights(G: Tensor, w: Optional[Tensor] = None) -> Tensor:
    """The user weights ``w`` (uniform when None), ``[n]`` in G's accumulation dtype."""
    return gram_weights(G, w, "linear")


def mgda_weights(G: Tensor) -> Tensor:
    """Min-norm point ``argmin_{c in simplex} c^T G c``, exact up to float64 rounding (objective
    within 1e-10 of max_i G_ii; weights are not unique where G is singular, the direction
    ``sum_i c_i g_i`` is). The same solver as ``pareto_weights(method="mgda")``."""
    return gram_weights(G, None, "mgda")


def cagrad_weights(G: Tensor, w: Optional[Tensor] = None, c: float = CAGRAD_C, clip: bool = True) -> Tensor:
    """Final coefficients ``a [n]`` of CAGrad-clip / RACO (``clip=True``: method ``raco``) or CAGrad
    (``clip=False``: method ``cagrad``).

    With user weights ``w`` (on the simplex; uniform when None; not checked, that would need a host
    read), ``b = G w`` and ``s = c * sqrt(w^T G w)``: ``p* = argmin_{p in simplex} p^T b +
    s * sqrt(p^T G p)``, ``p~ = min(p*, w)`` (clip) or ``p*``, ``a = w + s / sqrt(p~^T G p~) * p~``
    (``a = w`` where ``p~^T G p~`` is 0 up to rounding: the direction vanishes). The update is
    ``sum_i a_i g_i``. ``p*`` is exact up to float64 rounding (objective within 1e-10 of
    max_i G_ii).
    """
    return gram_weights(G, w, "raco" if clip else "cagrad", c)


def pcgrad_weights(G: Tensor) -> Tensor:
    """PCGrad in Gram form (algorithms §6): coefficients ``sum_i v_i`` of the projected gradients, with
    objectives projected in the fixed order j = 0..n-1."""
    return gram_weights(G, None, "pcgrad")
