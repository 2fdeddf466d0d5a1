"""Python entry points of the fused ops: where the op schemas meet Python.

Each function calls ``torch.ops.pama_ext.<name>`` (C++/CUDA kernels) and has a twin of the same
name and signature in :mod:`pama_ext.reference`, which is used instead when the compiled library is
not available (:data:`pama_ext._native.NATIVE_AVAILABLE`, read at every call); on that path the
argument checks and ``check_finite`` of :mod:`pama_ext.checks` run first, so both paths keep one
contract (algorithms §9). This module also registers the fake (meta) implementations used by
torch.compile, which reject mixed devices, and the autograd formulas (fused backward kernels; no
op supports double backward).

Conventions: per-objective tensors are ``[n, B, T]`` (objective first), per-token tensors ``[B, T]``,
``mask`` is ``[B, T]`` of any dtype (nonzero = in). All floating inputs of one call share one dtype
(float32, float64, float16 or bfloat16); reductions accumulate in float32 (float64 for float64
inputs), and losses, metrics and statistics come back in that accumulation dtype, as device tensors.
No op reads a value back to the host, except the ``check_finite`` test on CUDA (one flag).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from . import _native
from . import checks
from . import distributed as dp
from . import reference
from .functional import acc_dtype, last_valid_onehot, masked_moments
from .vocab import CAGRAD_C, GRAM_BASED, METRIC_SCALARS, stats_layout, stats_num_objectives, stats_size

__all__ = [
    "token_rewards",
    "multi_gae",
    "objective_moments",
    "objective_stats",
    "pareto_weights",
    "pama_policy_loss",
    "multi_value_loss",
    "stats_layout",
    "has_cuda_kernels",
]


@functools.lru_cache(maxsize=None)
def arg_names(op: str) -> Tuple[str, ...]:
    """The argument names of ``torch.ops.pama_ext.<op>`` in schema order (the compiled library's);
    read once per op, since the autograd glue asks on every call."""
    return tuple(a.name for a in getattr(torch.ops.pama_ext, op).default._schema.arguments)


def has_cuda_kernels() -> bool:
    """True when the compiled library contains the CUDA kernels."""
    return _native.available() and bool(torch.ops.pama_ext.has_cuda_kernels())


def _inf_if_none(x: Optional[float]) -> float:
    return math.inf if x is None else float(x)


def _needs_native(group, name: str) -> None:
    if group is not None and not _native.available():
        raise RuntimeError(
            f"pama_ext.{name}: group= (data parallelism) needs the compiled library pama_ext._C, which "
            "could not be loaded; rebuild with `pip install --no-build-isolation -e .`"
        )


def _global_stats(advantages, logp, old_logp, mask, eps_hi, whiten, noon, group, with_gram=True) -> Tensor:
    """The statistics vector of the global batch of a data-parallel group (pama_ext.distributed).
    ``with_gram=False`` (the policy loss with a method other than mgda) leaves the Gram entries 0
    and skips their n(n+1)/2 products per token."""
    moments = objective_moments(advantages, mask, group=group)
    local = torch.ops.pama_ext.objective_stats(
        advantages, logp, old_logp, mask, float(eps_hi), bool(whiten), bool(noon), moments, bool(with_gram)
    )
    k = moments.numel()
    return torch.cat([moments, dp.all_reduce_sum(local[k:], group)])


def _split_metrics(metrics: Tensor, n: int) -> Dict[str, Tensor]:
    out = {name: metrics[k] for k, name in enumerate(METRIC_SCALARS)}
    k = len(METRIC_SCALARS)
    out["abar"] = metrics[k : k + n]
    out["pos"] = metrics[k + n : k + 2 * n]
    out["weights"] = metrics[k + 2 * n : k + 3 * n]
    return out


# ------------------------------------------------------------------------------------------------
# public functions
# ------------------------------------------------------------------------------------------------
def token_rewards(
    scores: Tensor, old_logp: Tensor, ref_logp: Tensor, mask: Tensor, beta_kl: float = 0.0
) -> Tensor:
    """Per-token rewards ``[n, B, T]`` from sequence scores ``[n, B]`` (algorithms §1).

    ``r_i[b,t] = -beta_kl * mask * (old_logp - ref_logp) + [t is the last masked-in t of row b] * scores[i,b]``.
    Differentiable w.r.t. scores, old_logp and ref_logp.
    """
    if not _native.available():
        checks.token_rewards_args(scores, old_logp, ref_logp, mask, beta_kl)
        return reference.token_rewards(scores, old_logp, ref_logp, mask, beta_kl)
    return torch.ops.pama_ext.token_rewards(scores, old_logp, ref_logp, mask, float(beta_kl))


def multi_gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> Tuple[Tensor, Tensor]:
    """Generalised advantage estimation for every objective and row in one launch (algorithms §2).

    Returns ``(advantages, returns)``, both ``[n, B, T]``; masked positions do not break the
    recursion. ``gamma`` and ``lam`` are finite numbers in [0, 1]. Differentiable w.r.t. rewards
    and values (a fused adjoint scan).
    """
    if not _native.available():
        checks.multi_gae_args(rewards, values, mask, gamma, lam)
        return reference.multi_gae(rewards, values, mask, gamma, lam)
    return torch.ops.pama_ext.multi_gae(rewards, values, mask, float(gamma), float(lam))


def objective_moments(advantages: Tensor, mask: Tensor, *, group: Optional[Any] = None) -> Tensor:
    """``[count, num_seqs, mean(n), var(n)]`` of the masked advantages: the first ``2 + 2n`` entries
    of :func:`objective_stats` (unbiased variance, 0 for one token or none). The moments are
    accumulated in a scaled form (mean of a/count, sum of (d/sqrt(count))²): the variance is right
    whenever it fits the accumulation dtype and +inf when it does not (float32, |A| ~ 1e19 or
    more). With ``group``, those of the global batch (the ranks' moments gathered and combined in
    rank order)."""
    if group is not None:
        _needs_native(group, "objective_moments")
        local = torch.ops.pama_ext.objective_moments(advantages.detach(), mask)
        return dp.combine_moments(dp.all_gather_rows(local, group))
    if not _native.available():
        checks.moments_args(advantages, mask)
        return reference.objective_moments(advantages.detach(), mask)
    return torch.ops.pama_ext.objective_moments(advantages.detach(), mask)


def objective_stats(
    advantages: Tensor,
    logp: Tensor,
    old_logp: Tensor,
    mask: Tensor,
    eps_hi: float = 0.2,
    whiten: bool = True,
    noon: bool = True,
    *,
    group: Optional[Any] = None,
) -> Tensor:
    """The flat per-objective statistics vector of algorithms §3.

    Layout (:func:`stats_layout`): ``[count, num_seqs, mean(n), var(n), abar(n), pos(n), ctok(n),
    cseq(n), gram(n*n)]``; ``eps_hi`` finite and >= 0. Statistics carry no gradient (inputs are
    detached). With ``group`` (a ``torch.distributed`` process group over which the batch is
    sharded), the statistics of the global batch, identical on every rank
    (:mod:`pama_ext.distributed`).
    """
    args = (advantages.detach(), logp.detach(), old_logp.detach(), mask)
    _needs_native(group, "objective_stats")
    if group is not None:
        return _global_stats(*args, eps_hi, whiten, noon, group)
    if not _native.available():
        checks.stats_args(*args, eps_hi)
        return reference.objective_stats(*args, eps_hi, whiten, noon)
    return torch.ops.pama_ext.objective_stats(*args, float(eps_hi), bool(whiten), bool(noon))


def pareto_weights(
    stats: Tensor, method: str = "pama", granularity: str = "batch", prefs: Optional[Tensor] = None,
    cagrad_c: float = CAGRAD_C,
) -> Tensor:
    """Objective weights ``[n]`` from a statistics vector (algorithms §4), computed on device.

    ``method`` is one of :data:`pama_ext.vocab.METHODS`. ``pama``: Theorem 1 on ``abar`` (batch),
    or the mean per-token / per-sequence Theorem-1 weights (token / sequence); ``linear``: ``prefs``
    as given (uniform when None); ``mgda``, ``cagrad``, ``raco``, ``pcgrad``: the weights of
    :func:`pama_ext.pareto.gram_weights` on the statistics Gram (``prefs`` as CAGrad's w and
    ``cagrad_c`` as its c), exact up to float64 rounding (docs/algorithms.md §6).
    """
    if not _native.available():
        checks.pareto_weights_args(stats, prefs, method, granularity, cagrad_c)
        return reference.pareto_weights(stats, method, granularity, prefs, cagrad_c)
    return torch.ops.pama_ext.pareto_weights(stats.detach(), prefs, method, granularity, float(cagrad_c))


def pama_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logp: Optional[Tensor] = None,
    *,
    eps_lo: float = 0.2,
    eps_hi: float = 0.2,
    dual_clip: Optional[float] = 3.0,
    noon: bool = True,
    whiten: bool = True,
    method: str = "pama",
    granularity: str = "token",
    prefs: Optional[Tensor] = None,
    agg: str = "token-mean",
    beta_loss: float = 0.0,
    check_finite: bool = True,
    group: Optional[Any] = None,
    cagrad_c: float = CAGRAD_C,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Fused Noon-PPO / PAMA policy loss (algorithms §3-§4). Returns ``(loss, metrics)``.

    Args:
        logp: ``[B, T]`` log-probs of the current policy (the only input that gets a gradient).
        old_logp: ``[B, T]`` rollout log-probs.
        advantages: ``[n, B, T]`` per-objective advantages (e.g. from :func:`multi_gae`).
        mask: ``[B, T]`` response mask.
        ref_logp: ``[B, T]`` reference log-probs for the optional k3 KL loss (``beta_loss``).
        eps_lo, eps_hi: PPO clip range ``[1 - eps_lo, 1 + eps_hi]``.
        dual_clip: dual-clip constant for negative advantages (None disables it).
        noon: clip negative (whitened) advantages to zero.
        whiten: whiten each objective's advantages over the masked tokens.
        method: one of :data:`pama_ext.vocab.METHODS`: ``"pama"`` (Theorem 1, closed form),
            ``"linear"`` (``prefs``-weighted sum), or a Gram method on the statistics Gram:
            ``"mgda"``, ``"cagrad"``, ``"raco"`` (CAGrad with RACO's clip), ``"pcgrad"``.
        granularity: ``"token"``, ``"sequence"`` or ``"batch"`` (method ``"pama"`` only).
        prefs: ``[n]`` weights of ``method="linear"`` and CAGrad's w (uniform when None), used as
            given: not normalised, so the linear loss scales with them (as TRL's
            ``reward_weights``); >= 0 and not all 0.
        agg: ``"token-mean"``, ``"seq-mean-token-mean"`` or ``"seq-mean-token-sum"``.
        beta_loss: weight (finite, >= 0) of the k3 KL loss to ``ref_logp``; > 0 needs ``ref_logp``.
        check_finite: raise if a masked-in input is NaN/Inf, if ``prefs`` is NaN/Inf, negative or all 0,
            or if the whitening variance of the advantages overflows the accumulation dtype (float32
            for |advantages| around 1e19); on CUDA these read one flag vector back.
        group: ``torch.distributed`` process group over which the batch is sharded (algorithms §8):
            statistics, weights and denominators are those of the global batch, the loss and
            metrics have their global values on every rank, and the gradient is that of the global
            loss w.r.t. this shard (see :mod:`pama_ext.distributed`; under DDP multiply the loss by
            :func:`pama_ext.distributed.ddp_loss_scale`).
        cagrad_c: c of the ``cagrad`` / ``raco`` methods (finite, >= 0).

    Metrics (device tensors): ``pg_loss``, ``kl_loss``, ``clipfrac``, ``approx_kl``, ``active``
    (fraction of tokens with a positive combined advantage), and per objective ``abar``, ``pos``
    and ``weights``.
    """
    _needs_native(group, "pama_policy_loss")
    if not _native.available():
        checks.policy_loss_args(logp, old_logp, advantages, mask, ref_logp, prefs, eps_lo, eps_hi,
                                _inf_if_none(dual_clip), method, granularity, agg, beta_loss, cagrad_c)
        if check_finite:
            checks.finite("pama_policy_loss", mask,
                          [("logp", logp), ("old_logp", old_logp), ("advantages", advantages), ("ref_logp", ref_logp)],
                          prefs=prefs,
                          variance=masked_moments(advantages.detach(), mask)[2] if whiten else None)
        return reference.pama_policy_loss(
            logp, old_logp, advantages, mask, ref_logp, eps_lo=eps_lo, eps_hi=eps_hi,
            dual_clip=_inf_if_none(dual_clip), noon=noon, whiten=whiten, method=method,
            granularity=granularity, prefs=prefs, agg=agg, beta_loss=beta_loss, cagrad_c=cagrad_c,
        )
    stats = None
    if group is not None:
        stats = _global_stats(advantages.detach(), logp.detach(), old_logp.detach(), mask, eps_hi, whiten, noon, group,
                              with_gram=method in GRAM_BASED)
    loss, metrics, _, _ = torch.ops.pama_ext.pama_policy_loss(
        logp, old_logp, advantages.detach(), mask, ref_logp, prefs, float(eps_lo), float(eps_hi),
        _inf_if_none(dual_clip), bool(noon), bool(whiten), method, granularity, agg, float(beta_loss),
        bool(check_finite), stats, float(cagrad_c),
    )
    if group is not None:  # the loss and per-token metric sums are this shard's shares
        k = len(METRIC_SCALARS)
        total = dp.all_reduce_sum(torch.cat([loss.reshape(1), metrics[:k]]), group)
        loss = dp.with_global_value(loss, total[0])
        metrics = torch.cat([total[1:], metrics[k:]])
    return loss, _split_metrics(metrics, advantages.shape[0])


def multi_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip: Optional[float] = 0.2,
    agg: str = "token-mean",
    check_finite: bool = True,
    *,
    group: Optional[Any] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Clipped value loss summed over n value heads (algorithms §5). Returns ``(loss, metrics)``.

    ``values``, ``old_values``, ``returns``: ``[n, B, T]``; ``clip=None`` disables clipping.
    Metrics: ``clipfrac`` (over heads and tokens) and ``head_loss`` ``[n]``. Differentiable w.r.t.
    ``values``. With ``group`` the denominators are the global token/sequence counts and the loss
    and metrics have their global values on every rank (as in :func:`pama_policy_loss`).
    """
    _needs_native(group, "multi_value_loss")
    if not _native.available():
        checks.value_loss_args(values, old_values, returns, mask, _inf_if_none(clip), agg)
        if check_finite:
            checks.finite("multi_value_loss", mask,
                          [("values", values), ("old_values", old_values), ("returns", returns)])
        return reference.multi_value_loss(values, old_values, returns, mask, clip, agg)
    denominators = None
    if group is not None:
        denominators = dp.global_denominators(mask, acc_dtype(values.dtype), group)
    loss, metrics, _ = torch.ops.pama_ext.multi_value_loss(
        values, old_values.detach(), returns.detach(), mask, _inf_if_none(clip), agg, bool(check_finite),
        denominators,
    )
    if group is not None:
        total = dp.all_reduce_sum(torch.cat([loss.reshape(1), metrics]), group)
        loss = dp.with_global_value(loss, total[0])
        metrics = total[1:]
    return loss, {"clipfrac": metrics[0], "head_loss": metrics[1:]}


# ------------------------------------------------------------------------------------------------
# fake (meta) implementations and autograd, registered only when the library is loaded
# ------------------------------------------------------------------------------------------------
def not_twice_differentiable(op: str):
    """(backward, setup_context) to register for a backward op: the first derivative of ``op`` works as usual; a
    second one (torch.autograd.grad(..., create_graph=True), then a grad of that) raises instead
    of silently returning a gradient with no second-order term."""

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(
            f"pama_ext.{op}: double backward is not supported (its backward is a fused kernel that is not "
            "itself differentiable); compute higher-order derivatives with the pama_ext.reference "
            "implementation instead"
        )

    return backward, setup_context


def _register() -> None:
    lib = "pama_ext::"
    fake = torch.library.register_fake

    # A call mixing a meta tensor with real ones dispatches here, not to the compiled checks:
    # every fake starts with the device check, so it cannot hand back uninitialised memory.
    @fake(lib + "token_rewards")
    def _(scores, old_logp, ref_logp, mask, beta_kl):
        checks.same_device("token_rewards", ("old_logp", old_logp), ("scores", scores), ("ref_logp", ref_logp),
                           ("mask", mask))
        return old_logp.new_empty((scores.shape[0], *old_logp.shape))

    @fake(lib + "multi_gae")
    def _(rewards, values, mask, gamma, lam):
        checks.same_device("multi_gae", ("values", values), ("rewards", rewards), ("mask", mask))
        return torch.empty_like(values), torch.empty_like(values)

    @fake(lib + "multi_gae_backward")
    def _(grad_advantages, grad_returns, mask, gamma, lam):
        return torch.empty_like(grad_advantages), torch.empty_like(grad_advantages)

    @fake(lib + "objective_moments")
    def _(advantages, mask):
        checks.same_device("objective_moments", ("advantages", advantages), ("mask", mask))
        n = advantages.shape[0]
        return advantages.new_empty((2 + 2 * n,), dtype=acc_dtype(advantages.dtype))

    @fake(lib + "objective_stats")
    def _(advantages, logp, old_logp, mask, eps_hi, whiten, noon, moments=None, with_gram=True):
        checks.same_device("objective_stats", ("logp", logp), ("old_logp", old_logp), ("advantages", advantages),
                           ("mask", mask), ("moments", moments))
        n = advantages.shape[0]
        return logp.new_empty((stats_size(n),), dtype=acc_dtype(logp.dtype))

    @fake(lib + "pareto_weights")
    def _(stats, prefs, method, granularity, cagrad_c=CAGRAD_C):
        checks.same_device("pareto_weights", ("stats", stats), ("prefs", prefs))
        n = stats_num_objectives(int(stats.shape[0]))
        return stats.new_empty((n,), dtype=acc_dtype(stats.dtype))

    @fake(lib + "pama_policy_loss")
    def _(logp, old_logp, advantages, mask, ref_logp, prefs, eps_lo, eps_hi, dual_clip, noon, whiten,
          method, granularity, agg, beta_loss, check_finite, global_stats=None, cagrad_c=CAGRAD_C):
        checks.same_device("pama_policy_loss", ("logp", logp), ("old_logp", old_logp), ("advantages", advantages),
                           ("mask", mask), ("ref_logp", ref_logp), ("prefs", prefs), ("global_stats", global_stats))
        acc = acc_dtype(logp.dtype)
        n = advantages.shape[0]
        return (
            logp.new_empty((), dtype=acc),
            logp.new_empty((len(METRIC_SCALARS) + 3 * n,), dtype=acc),
            logp.new_empty(logp.shape, dtype=acc),
            logp.new_empty((logp.shape[0],), dtype=acc),
        )

    @fake(lib + "pama_policy_loss_backward")
    def _(grad_loss, logp, old_logp, ref_logp, mask, a_tilde, row_scale, eps_lo, eps_hi, dual_clip, beta_loss):
        return torch.empty_like(logp)

    @fake(lib + "multi_value_loss")
    def _(values, old_values, returns, mask, clip, agg, check_finite, denominators=None):
        checks.same_device("multi_value_loss", ("values", values), ("old_values", old_values), ("returns", returns),
                           ("mask", mask), ("denominators", denominators))
        acc = acc_dtype(values.dtype)
        return (
            values.new_empty((), dtype=acc),
            values.new_empty((1 + values.shape[0],), dtype=acc),
            values.new_empty((values.shape[1],), dtype=acc),
        )

    @fake(lib + "multi_value_loss_backward")
    def _(grad_loss, values, old_values, returns, mask, row_scale, clip):
        return torch.empty_like(values)

    # --- autograd ---------------------------------------------------------------------------
    # Inputs are read by their schema names, and backward returns one entry per schema argument,
    # so adding an argument to an op's schema needs no change here.
    def named(op: str, inputs) -> Dict[str, Any]:
        return dict(zip(arg_names(op), inputs))

    def no_grads(op: str, *grads):
        return tuple(grads) + (None,) * (len(arg_names(op)) - len(grads))

    def tr_setup(ctx, inputs, output):
        a = named("token_rewards", inputs)
        ctx.save_for_backward(a["mask"])
        ctx.beta_kl = a["beta_kl"]

    def tr_backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        m = (mask != 0).to(grad.dtype)
        g_kl = grad.sum(0) * m
        grad_scores = (grad * last_valid_onehot(mask, grad.dtype)).sum(-1)
        return no_grads("token_rewards", grad_scores, -ctx.beta_kl * g_kl, ctx.beta_kl * g_kl)

    torch.library.register_autograd(lib + "token_rewards", tr_backward, setup_context=tr_setup)

    def gae_setup(ctx, inputs, output):
        a = named("multi_gae", inputs)
        ctx.save_for_backward(a["mask"])
        ctx.gamma, ctx.lam = a["gamma"], a["lam"]

    def gae_backward(ctx, g_adv, g_ret):
        (mask,) = ctx.saved_tensors
        like = g_adv if g_adv is not None else g_ret
        g_adv = torch.zeros_like(like) if g_adv is None else g_adv
        g_ret = torch.zeros_like(like) if g_ret is None else g_ret
        g_r, g_v = torch.ops.pama_ext.multi_gae_backward(g_adv, g_ret, mask, ctx.gamma, ctx.lam)
        return no_grads("multi_gae", g_r, g_v)

    torch.library.register_autograd(lib + "multi_gae", gae_backward, setup_context=gae_setup)

    def pl_setup(ctx, inputs, output):
        a = named("pama_policy_loss", inputs)
        _, metrics, a_tilde, row_scale = output
        ctx.mark_non_differentiable(metrics, a_tilde, row_scale)
        ctx.save_for_backward(a["logp"], a["old_logp"], a["ref_logp"], a["mask"], a_tilde, row_scale)
        ctx.consts = (a["eps_lo"], a["eps_hi"], a["dual_clip"], a["beta_loss"])

    def pl_backward(ctx, g_loss, g_metrics, g_at, g_rs):
        logp, old_logp, ref_logp, mask, a_tilde, row_scale = ctx.saved_tensors
        grad = None
        if g_loss is not None:
            grad = torch.ops.pama_ext.pama_policy_loss_backward(
                g_loss, logp, old_logp, ref_logp, mask, a_tilde, row_scale, *ctx.consts
            )
        return no_grads("pama_policy_loss", grad)

    torch.library.register_autograd(lib + "pama_policy_loss", pl_backward, setup_context=pl_setup)

    def vl_setup(ctx, inputs, output):
        a = named("multi_value_loss", inputs)
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.save_for_backward(a["values"], a["old_values"], a["returns"], a["mask"], output[2])
        ctx.clip = a["clip"]

    def vl_backward(ctx, g_loss, g_metrics, g_rs):
        values, old_values, returns, mask, row_scale = ctx.saved_tensors
        grad = None
        if g_loss is not None:
            grad = torch.ops.pama_ext.multi_value_loss_backward(
                g_loss, values, old_values, returns, mask, row_scale, ctx.clip
            )
        return no_grads("multi_value_loss", grad)

    torch.library.register_autograd(lib + "multi_value_loss", vl_backward, setup_context=vl_setup)

    for name in ("multi_gae", "pama_policy_loss", "multi_value_loss"):
        backward, setup = not_twice_differentiable(name)
        torch.library.register_autograd(lib + name + "_backward", backward, setup_context=setup)


if _native.NATIVE_AVAILABLE:
    _register()
