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
from .ops import not_twice_differentiable
from .functional import acc_dtype

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
    args = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if not _native.available("multi_dpo_loss"):
        checks.dpo_loss_args(*args, labels, beta, chosen_lengths, rejected_lengths)
        acc = acc_dtype(policy_chosen_logps.dtype)
        return reference.multi_dpo_loss(*(x.to(acc) for x in args), labels, beta,
                                        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    return torch.ops.pama_ext.multi_dpo_loss(*args, labels, float(beta), chosen_lengths, rejected_lengths)


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
    return torch.ops.pama_ext.gradient_gram(flat, n)


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
        torch.ops.pama_ext.combine_gradients(flat, n, coeffs.detach(), out, accumulate)
    for k, g in new.items():
        params[k].grad = g
    return None


# ------------------------------------------------------------------------------------------------
# fake (meta) implementations and autograd, registered only when the compiled ops are present
# ------------------------------------------------------------------------------------------------
def _register() -> None:
    lib = "pama_ext::"
    fake = torch.library.register_fake

    # as in ops.py: a meta tensor among real ones lands here, so every fake checks the devices
    @fake(lib + "multi_dpo_loss")
    def _(pc, pr, rc, rr, labels, beta, chosen_lengths, rejected_lengths):
        checks.same_device("multi_dpo_loss", ("policy_chosen_logps", pc), ("policy_rejected_logps", pr),
                           ("ref_chosen_logps", rc), ("ref_rejected_logps", rr), ("labels", labels),
                           ("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths))
        acc = acc_dtype(pc.dtype)
        return pc.new_empty((labels.shape[0],), dtype=acc), pc.new_empty(tuple(labels.shape), dtype=acc)

    @fake(lib + "multi_dpo_loss_backward")
    def _(grad_losses, coef, policy_chosen_logps, chosen_lengths, rejected_lengths):
        return torch.empty_like(policy_chosen_logps), torch.empty_like(policy_chosen_logps)

    @fake(lib + "gradient_gram")
    def _(grads, num_objectives):
        checks.same_device("gradient_gram", *checks.flat_grads_named(grads, num_objectives))
        like = next((g for g in grads if g is not None), None)
        if like is None:
            return torch.empty((num_objectives, num_objectives), dtype=torch.float32)
        return like.new_empty((num_objectives, num_objectives), dtype=acc_dtype(like.dtype))

    @fake(lib + "combine_gradients")
    def _(grads, num_objectives, coeffs, out, accumulate):
        checks.same_device("combine_gradients", ("out", list(out)), *checks.flat_grads_named(grads, num_objectives),
                           ("coeffs", coeffs))
        return None

    @fake(lib + "gram_weights")
    def _(G, w, method, c):
        checks.same_device("gram_weights", ("G", G), ("w", w))
        return G.new_empty((G.shape[0],), dtype=acc_dtype(G.dtype))

    def dpo_setup(ctx, inputs, output):
        pc, _, _, _, _, _, lc, lr = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1], pc, lc, lr)

    def dpo_backward(ctx, g_losses, g_coef):
        coef, pc, lc, lr = ctx.saved_tensors
        if g_losses is None:
            return (None,) * 8
        gc, gr = torch.ops.pama_ext.multi_dpo_loss_backward(g_losses, coef, pc, lc, lr)
        need = ctx.needs_input_grad
        return (gc, -gr if need[1] else None, -gc if need[2] else None, gr, None, None, None, None)

    torch.library.register_autograd(lib + "multi_dpo_loss", dpo_backward, setup_context=dpo_setup)
    backward, setup = not_twice_differentiable("multi_dpo_loss")
    torch.library.register_autograd(lib + "multi_dpo_loss_backward", backward, setup_context=setup)


if _native.available("multi_dpo_loss"):
    _register()
