"""Python entry points of the preference-data ops (algorithms §6-§7): per-objective DPO losses, the Gram
matrix of per-objective parameter gradients and their weighted combination.

Each function calls ``torch.ops.pama_ext.<name>`` (C++/CUDA kernels) and has a twin of the same name
and signature in :mod:`pama_ext.reference`, used instead when the compiled library is absent (after
the argument checks of :mod:`pama_ext.checks`, the compiled ops' contract). Like every pama_ext op
they run on device and never read a value back to the host.

A RACO / MGDA step with these ops::

    losses, coef = multi_dpo_loss(pc, pr, rc, rr, labels, beta)          # [n], [n, B]
    grads = [torch.autograd.grad(losses[i], params, retain_graph=True) for i in range(n)]
    G = gradient_gram(grads)                                              # [n, n], one pass
    a = pareto.cagrad_weights(G, w)                                       # on device
    combine_gradients(grads, a, params)                                   # p.grad = sum_i a_i g_i
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _native
from . import checks
from . import reference
from .op_table import call_native, fallback, schema_args

__all__ = ["multi_dpo_loss", "gradient_gram", "combine_gradients"]

GradTable = Sequence[Sequence[Optional[Tensor]]]


def multi_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    labels: Tensor,
    beta: float = 0.1,
    *,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Per-objective DPO losses on shared preference pairs (algorithms §7). Returns ``(losses, coef)``.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]``
            summed token log-probs of the chosen / rejected responses under the policy and the
            frozen reference (one floating dtype: float32, float64, float16 or bfloat16).
        labels: ``[n, B]``, any integer or floating dtype (not bool), read through its sign:
            +1 = the chosen response wins on objective i, -1 = the rejected one wins, 0 = tie.
        beta: DPO temperature.
        chosen_lengths, rejected_lengths: optional ``[B]`` response lengths (any real dtype, clamped
            to >= 1); each log-prob is divided by its length (length normalisation).

    With ``h_b = (pc_b - rc_b) - (pr_b - rr_b)``:
    ``losses[i] = mean_b -log sigmoid(beta * s_ib * h_b)`` (a tie gives log 2 and no gradient) and
    ``coef[i, b] = dL_i/dh_b = -(beta/B) * s_ib * sigmoid(-beta * s_ib * h_b)`` (not differentiable).
    Both in float32 (float64 for float64 inputs). ``losses`` is differentiable w.r.t. the four
    log-prob tensors (fused backward kernel).
    """
    args = schema_args("multi_dpo_loss", dict(
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps, labels=labels, beta=beta,
        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths))
    return call_native("multi_dpo_loss", args) if _native.available("multi_dpo_loss") else fallback("multi_dpo_loss", args)


def _flatten(grads: GradTable) -> Tuple[List[Optional[Tensor]], int, int]:
    n, K = reference.grad_table_shape(grads)
    flat = [None if g is None else g.detach() for row in grads for g in row]
    return flat, n, K


def gradient_gram(grads: GradTable) -> Tensor:
    """``G[i, j] = sum_k <grads[i][k], grads[j][k]>``, ``[n, n]``, in one pass over the gradients.

    ``grads[i][k]`` is objective i's gradient of parameter k (same shape for every i; None = zero).
    float32 result with float32 accumulation (float64 for float64 gradients); no n x d buffer is
    ever built. Deterministic: fixed blocks, fixed-order reduction.
    """
    if not _native.available("gradient_gram"):
        checks.grad_table_args("gradient_gram", grads)
        return reference.gradient_gram(grads)
    flat, n, _ = _flatten(grads)
    if all(g is None for g in flat):  # nothing to dispatch on: no gradient at all
        return reference.gradient_gram(grads)
    return call_native("gradient_gram", {"grads": flat, "num_objectives": n})


@torch.no_grad()
def combine_gradients(grads: GradTable, coeffs: Tensor, params: Sequence[Tensor], *,
                      accumulate: bool = False) -> None:
    """``p.grad = sum_i coeffs[i] * grads[i][k]`` for each ``params[k]``, in place, in one pass.

    ``coeffs`` is a device tensor ``[n]`` (never read on the host). With ``accumulate=True`` the sum
    is added to an existing ``.grad``; a missing ``.grad`` is created with the parameter's dtype.
    The sum accumulates in float32 (float64 for float64 gradients or parameters). A call that fails
    its checks leaves every ``.grad`` as it was.
    """
    params = list(params)
    if not _native.available("combine_gradients"):
        checks.combine_args(grads, coeffs, params)
        return reference.combine_gradients(grads, coeffs, params, accumulate=accumulate)
    flat, n, K = _flatten(grads)
    if len(params) != K:
        raise ValueError(f"combine_gradients: params has {len(params)} entries but grads[0] has {K}")
    # One call over every parameter, so that errors name grads[i][k] by the caller's indices. A
    # missing .grad is written into a new tensor (zeros when accumulating) that is attached only
    # after the call has passed its checks: a failed check leaves every .grad as it was.
    new = {k: (torch.zeros if accumulate else torch.empty)(p.shape, dtype=p.dtype, device=p.device)
           for k, p in enumerate(params) if p.grad is None}
    out = [new[k] if k in new else p.grad for k, p in enumerate(params)]
    if K:
        call_native("combine_gradients", {"grads": flat, "num_objectives": n, "coeffs": coeffs.detach(), "out": out,
                                          "accumulate": accumulate})
    for k, g in new.items():
        params[k].grad = g
    return None
