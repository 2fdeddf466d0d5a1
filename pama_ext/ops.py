"""Python entry points of the fused ops: where the op schemas meet Python.

Each function calls ``torch.ops.pama_ext.<name>`` (C++/CUDA kernels) and has a twin of the same
name in :mod:`pama_ext.reference`, which is used instead when the compiled library is not available
(:data:`pama_ext._native.NATIVE_AVAILABLE`, read at every call); on that path the argument checks and
``check_finite`` of :mod:`pama_ext.checks` run first, so both paths keep one contract (algorithms §9).
The arguments go to both paths by schema name, and the fakes (torch.compile) and the autograd
formulas (fused backward kernels; no op supports double backward) are registered from the one op
table, :mod:`pama_ext.op_table`.

Conventions: per-objective tensors are ``[n, B, T]`` (objective first), per-token tensors ``[B, T]``,
``mask`` is ``[B, T]`` of any dtype (nonzero = in). All floating inputs of one call share one dtype
(float32, float64, float16 or bfloat16); reductions accumulate in float32 (float64 for float64
inputs), and losses, metrics and statistics come back in that accumulation dtype, as device tensors.
No op reads a value back to the host, except the ``check_finite`` test on CUDA (one flag).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from . import _native
from . import distributed as dp
from . import op_table
from .functional import acc_dtype, last_valid_onehot
from .op_table import arg_names, call_native, fallback, schema_args
from .vocab import CAGRAD_C, GRAM_BASED, METRIC_SCALARS, stats_layout

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


def has_cuda_kernels() -> bool:
    """True when the compiled library contains the CUDA kernels."""
    return _native.available() and bool(torch.ops.pama_ext.has_cuda_kernels())


def _needs_native(group, name: str) -> None:
    if group is not None and not _native.available():
        raise RuntimeError(
            f"pama_ext.{name}: group= (data parallelism) needs the compiled library pama_ext._C, which "
            "could not be loaded; rebuild with `pip install --no-build-isolation -e .`"
        )


def _global_stats(values: Dict[str, Any], group) -> Tensor:
    """The statistics vector of the global batch of a data-parallel group (pama_ext.distributed), from
    ``values`` holding objective_stats' arguments by name. ``with_gram=False`` (a policy loss whose
    method needs no Gram) leaves the Gram entries 0 and skips their n(n+1)/2 products per token."""
    args = schema_args("objective_stats", values, detach=("advantages", "logp", "old_logp"))
    args["moments"] = objective_moments(args["advantages"], args["mask"], group=group)
    local = call_native("objective_stats", args)
    k = args["moments"].numel()
    return torch.cat([args["moments"], dp.all_reduce_sum(local[k:], group)])


def _split_metrics(metrics: Tensor, n: int) -> Dict[str, Tensor]:
    # views of the one metrics vector: two calls (split, unbind) rather than one indexing call per entry
    scalars, abar, pos, weights = metrics.split((len(METRIC_SCALARS), n, n, n))
    out = dict(zip(METRIC_SCALARS, scalars.unbind(0)))
    out.update(abar=abar, pos=pos, weights=weights)
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
    args = schema_args("token_rewards", dict(scores=scores, old_logp=old_logp, ref_logp=ref_logp, mask=mask,
                                              beta_kl=beta_kl))
    return call_native("token_rewards", args) if _native.available() else fallback("token_rewards", args)


def multi_gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> Tuple[Tensor, Tensor]:
    """Generalised advantage estimation for every objective and row in one launch (algorithms §2).

    Returns ``(advantages, returns)``, both ``[n, B, T]``; masked positions do not break the
    recursion. ``gamma`` and ``lam`` are finite numbers in [0, 1]. Differentiable w.r.t. rewards
    and values (a fused adjoint scan).
    """
    args = schema_args("multi_gae", dict(rewards=rewards, values=values, mask=mask, gamma=gamma, lam=lam))
    return call_native("multi_gae", args) if _native.available() else fallback("multi_gae", args)


def objective_moments(advantages: Tensor, mask: Tensor, *, group: Optional[Any] = None) -> Tensor:
    """``[count, num_seqs, mean(n), var(n)]`` of the masked advantages: the first ``2 + 2n`` entries
    of :func:`objective_stats` (unbiased variance, 0 for one token or none). The moments are
    accumulated in a scaled form (mean of a/count, sum of (d/sqrt(count))²): the variance is right
    whenever it fits the accumulation dtype and +inf when it does not (float32, |A| ~ 1e19 or
    more). With ``group``, those of the global batch (the ranks' moments gathered and combined in
    rank order)."""
    _needs_native(group, "objective_moments")
    args = schema_args("objective_moments", dict(advantages=advantages, mask=mask), detach=("advantages",))
    if not _native.available():
        return fallback("objective_moments", args)
    local = call_native("objective_moments", args)
    return local if group is None else dp.combine_moments(dp.all_gather_rows(local, group))


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
    _needs_native(group, "objective_stats")
    values = dict(advantages=advantages, logp=logp, old_logp=old_logp, mask=mask, eps_hi=eps_hi, whiten=whiten,
                  noon=noon)
    if group is not None:
        return _global_stats(values, group)
    args = schema_args("objective_stats", values, detach=("advantages", "logp", "old_logp"))
    return call_native("objective_stats", args) if _native.available() else fallback("objective_stats", args)


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
    args = schema_args("pareto_weights", dict(stats=stats, method=method, granularity=granularity, prefs=prefs,
                                               cagrad_c=cagrad_c), detach=("stats",))
    return call_native("pareto_weights", args) if _native.available() else fallback("pareto_weights", args)


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
            ``reward_weights``); >= 0 and not all 0. With ``method="pama"`` (token or batch
            granularity) the preferences of the weighted Theorem 1 (docs/algorithms.md §4b: Theorem 1
            on N_i / ρ_i, ρ_i = n·w_i / Σ_j w_j; scale-free, uniform = plain PAMA exactly); every
            entry > 0.
        agg: ``"token-mean"``, ``"seq-mean-token-mean"`` or ``"seq-mean-token-sum"``.
        beta_loss: weight (finite, >= 0) of the k3 KL loss to ``ref_logp``; > 0 needs ``ref_logp``.
        check_finite: raise if a masked-in input is NaN/Inf, if ``prefs`` is NaN/Inf, negative or all 0
            (pama: not > 0),
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
    args = schema_args("pama_policy_loss", dict(
        logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp, eps_lo=eps_lo,
        eps_hi=eps_hi, dual_clip=dual_clip, noon=noon, whiten=whiten, method=method, granularity=granularity,
        prefs=prefs, agg=agg, beta_loss=beta_loss, check_finite=check_finite, cagrad_c=cagrad_c),
        detach=("advantages",))
    if not _native.available():
        return fallback("pama_policy_loss", args)
    args["return_a_tilde"] = False  # read by nobody here: the op skips writing it
    loss, metrics, _, _ = policy_loss_native(args, group)
    return loss, metrics


def policy_loss_native(args: Dict[str, Any], group: Optional[Any] = None
                       ) -> Tuple[Tensor, Dict[str, Tensor], Tensor, Tensor]:
    """The compiled ``pama_policy_loss`` on its schema arguments ``args``
    (:func:`pama_ext.op_table.schema_args`), with the statistics and reductions of a data-parallel
    ``group``: ``(loss, metrics, a_tilde, row_scale)``, where ``a_tilde`` ``[B, T]`` (the combined
    advantage; empty ``[0]`` when ``args["return_a_tilde"]`` is False) and ``row_scale`` ``[B]`` (the
    aggregation's per-row factor) are what ``pama_policy_loss_backward`` reads besides the log-probs.
    Needs the compiled library."""
    if group is not None:
        args = dict(args, global_stats=_global_stats({**args, "with_gram": args["method"] in GRAM_BASED}, group))
    loss, metrics, a_tilde, row_scale, _ = call_native("pama_policy_loss", args)
    if group is not None:  # the loss and per-token metric sums are this shard's shares
        k = len(METRIC_SCALARS)
        total = dp.all_reduce_sum(torch.cat([loss.reshape(1), metrics[:k]]), group)
        loss = dp.with_global_value(loss, total[0])
        metrics = torch.cat([total[1:], metrics[k:]])
    return loss, _split_metrics(metrics, args["advantages"].shape[0]), a_tilde, row_scale


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
    args = schema_args("multi_value_loss", dict(values=values, old_values=old_values, returns=returns, mask=mask,
                                                 clip=clip, agg=agg, check_finite=check_finite),
                       detach=("old_values", "returns"))
    if not _native.available():
        return fallback("multi_value_loss", args)
    if group is not None:
        args["denominators"] = dp.global_denominators(mask, acc_dtype(values.dtype), group)
    loss, metrics, _ = call_native("multi_value_loss", args)
    if group is not None:
        total = dp.all_reduce_sum(torch.cat([loss.reshape(1), metrics]), group)
        loss = dp.with_global_value(loss, total[0])
        metrics = total[1:]
    return loss, {"clipfrac": metrics[0], "head_loss": metrics[1:]}


# ------------------------------------------------------------------------------------------------
# autograd of the one op whose backward is a Python formula; every fake and every other autograd
# formula is registered from the op table (pama_ext.op_table)
# ------------------------------------------------------------------------------------------------
def _token_rewards_autograd():
    def setup(ctx, inputs, output):
        a = dict(zip(arg_names("token_rewards"), inputs))
        ctx.save_for_backward(a["mask"])
        ctx.beta_kl = a["beta_kl"]

    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        g_kl = grad.sum(0) * (mask != 0).to(grad.dtype)
        grads = {"scores": (grad * last_valid_onehot(mask, grad.dtype)).sum(-1),
                 "old_logp": -ctx.beta_kl * g_kl, "ref_logp": ctx.beta_kl * g_kl}
        return tuple(grads.get(name) for name in arg_names("token_rewards"))

    return backward, setup


if _native.NATIVE_AVAILABLE:
    op_table.register({"token_rewards": _token_rewards_autograd()})
