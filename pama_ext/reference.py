"""Plain-PyTorch implementation of the ops' math (docs/algorithms.md §1-§7).

This module is the executable form of the math (docs/algorithms.md): the ground truth of every test,
the baseline of every benchmark and the fallback used when the compiled library is absent. The
runtime helpers it builds on (masks, aggregation, k3, moments, whitening) live in
:mod:`pama_ext.functional`, the vocabularies and the statistics layout in :mod:`pama_ext.vocab`;
both are re-exported here. It favours clarity over speed, works in any floating dtype (float64 included) and computes in the dtype of its
inputs, so that running it in bfloat16 measures how much error that dtype alone causes.

Every function here has a twin of the same name in :mod:`pama_ext.ops` (the fused kernels).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .functional import (acc_dtype, agg_loss, float_mask, k3_kl, last_valid_onehot, masked_moments, masked_whiten,
                         whiten_with, zero_padding)
from .vocab import (AGG_MODES, CAGRAD_C, GRAM_METHODS, GRANULARITIES, LOG_RATIO_CLAMP, METHODS, METRIC_SCALARS,
                    stats_layout, stats_num_objectives)

__all__ = [
    "METHODS",
    "GRANULARITIES",
    "AGG_MODES",
    "stats_layout",
    "acc_dtype",
    "float_mask",
    "stats_num_objectives",
    "token_rewards",
    "multi_gae",
    "objective_stats",
    "pareto_weights",
    "thm1_weights",
    "pref_factors",
    "weighted_thm1",
    "mgda_weights",
    "pama_policy_loss",
    "multi_value_loss",
    "agg_loss",
    "k3_kl",
    "masked_moments",
    "masked_whiten",
    "zero_padding",
    "last_valid_onehot",
    "grad_table_shape",
    "METRIC_SCALARS",
    "dpo_margins",
    "label_signs",
    "multi_dpo_loss",
    "gradient_gram",
    "combine_gradients",
    "linear_weights",
    "cagrad_weights",
    "pcgrad_weights",
    "gram_weights",
    "gram_face_solve",
    "GRAM_REFERENCE_MAX_N",
    "GRAM_TIE_ULPS",
]


# --------------------------------------------------------------------------------------------
# §1 token rewards
# --------------------------------------------------------------------------------------------
def token_rewards(
    scores: Tensor, old_logp: Tensor, ref_logp: Tensor, mask: Tensor, beta_kl: float = 0.0
) -> Tensor:
    """r_i[b,t] = -beta_kl * mask * (old_logp - ref_logp) + [t = last valid t of row b] * R_i[b]."""
    dt = old_logp.dtype
    kl = zero_padding(old_logp - ref_logp, mask)
    last = last_valid_onehot(mask, dt)
    return (-beta_kl * kl).unsqueeze(0) + scores.to(dt).unsqueeze(-1) * last.unsqueeze(0)


# --------------------------------------------------------------------------------------------
# §2 multi-objective GAE (the per-timestep recursion, vectorised over objectives and rows)
# --------------------------------------------------------------------------------------------
def multi_gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> Tuple[Tensor, Tensor]:
    """Returns (advantages, returns), both [n, B, T]. Masked positions do not break the recursion."""
    m = (mask != 0).unsqueeze(0).expand_as(values)
    T = values.shape[-1]
    next_v = torch.zeros_like(values[..., 0])
    last_a = torch.zeros_like(values[..., 0])
    adv = []
    for t in range(T - 1, -1, -1):
        delta = rewards[..., t] + gamma * next_v - values[..., t]
        a = delta + gamma * lam * last_a
        next_v = torch.where(m[..., t], values[..., t], next_v)
        last_a = torch.where(m[..., t], a, last_a)
        adv.append(last_a)
    advantages = torch.stack(adv[::-1], dim=-1)
    return advantages, advantages + values


# --------------------------------------------------------------------------------------------
# §3/§4 building blocks
# --------------------------------------------------------------------------------------------
def thm1_weights(v: Tensor) -> Tuple[Tensor, Tensor]:
    """Closed-form min-norm weights of PAMA's Theorem 1 along dim 0.

    Returns (c, s) with c >= 0 summing to 1 along dim 0 and s = sum_i c_i v_i, the projection of 0
    onto [min_i v_i, max_i v_i]. Ties share their weight uniformly.
    """
    mn = v.amin(0)
    mx = v.amax(0)
    is_min = (v == mn).to(v.dtype)
    is_max = (v == mx).to(v.dtype)
    width = mx - mn
    # total weight on the argmin set: 1 if all > 0, 0 if all < 0, else I_k / (I_k - I_j)
    mixed = mx / torch.where(width > 0, width, torch.ones_like(width))
    c_min = torch.where(mn > 0, torch.ones_like(mn), torch.where(mx < 0, torch.zeros_like(mx), mixed))
    c = is_min * (c_min / is_min.sum(0)) + is_max * ((1 - c_min) / is_max.sum(0))
    s = torch.where(mn > 0, mn, torch.where(mx < 0, mx, torch.zeros_like(mn)))
    return c, s


def pref_factors(prefs: Tensor) -> Tensor:
    """The factors 1/ρ_i of the weighted Theorem 1 (algorithms §4b): ρ_i = n·w_i / Σ_j w_j, written as
    (1/n)·Σ_j w_j / w_i, so that every constant ``prefs`` gives exactly 1. ``prefs`` > 0, shape [n]."""
    return (prefs[None, :] / prefs[:, None]).sum(1) / prefs.shape[0]


def weighted_thm1(v: Tensor, prefs: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Preference-steered Theorem 1 along dim 0 (algorithms §4b): :func:`thm1_weights` of v_i / ρ_i.

    Returns (c', s) with s = sum_i c'_i v_i: c'_i = c_i / ρ_i, where c are the Theorem-1 weights of the
    rescaled values (c' sums to 1 only for uniform ``prefs``). ``prefs=None`` is :func:`thm1_weights`.
    """
    if prefs is None:
        return thm1_weights(v)
    f = pref_factors(prefs.to(v.dtype)).reshape((-1,) + (1,) * (v.dim() - 1))
    c, s = thm1_weights(v * f)
    return c * f, s


def mgda_weights(gram: Tensor) -> Tensor:
    """argmin_{c in simplex} c^T G c, exact (see :func:`gram_face_solve`), computed in float64 and
    returned in G's dtype."""
    return _simplex_solve(gram, None, 0.0)[0].to(gram.dtype)


def _ratio(logp: Tensor, old_logp: Tensor) -> Tensor:
    return torch.exp(torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def objective_moments(advantages: Tensor, mask: Tensor) -> Tensor:
    """``[count, num_seqs, mean(n), var(n)]``: the first 2 + 2n entries of the statistics vector."""
    count, mean, var = masked_moments(advantages, mask)
    nseq = (mask != 0).any(-1).sum().to(advantages.dtype)
    return torch.cat([count.reshape(1), nseq.reshape(1), mean, var])


def _whitened_noon(advantages: Tensor, mask: Tensor, whiten: bool, noon: bool):
    """(count, row counts, mean, var, N) with N = Noon(whiten(A))."""
    row_cnt = float_mask(mask, advantages.dtype).sum(-1)
    count, mean, var = masked_moments(advantages, mask)
    if whiten:
        a_hat = whiten_with(advantages, mean, var)
    else:
        a_hat = advantages
    N = a_hat.clamp(min=0) if noon else a_hat
    return count, row_cnt, mean, var, N


def _stats_from(advantages, logp, old_logp, mask, eps_hi, whiten, noon):
    dt = advantages.dtype
    m = float_mask(mask, dt)
    advantages, logp, old_logp = (zero_padding(x, mask) for x in (advantages, logp, old_logp))
    count, row_cnt, mean, var, N = _whitened_noon(advantages, mask, whiten, noon)
    safe = count.clamp(min=1)
    ind = (_ratio(logp, old_logp) <= 1 + eps_hi).to(dt)
    I = N * ind  # [n, B, T]
    Im = I * m
    abar = Im.sum((1, 2)) / safe
    pos = ((N > 0).to(dt) * m).sum((1, 2)) / safe
    gram = torch.einsum("ibt,jbt->ij", Im, I) / safe
    c_tok, _ = thm1_weights(N)
    ctok = (c_tok * m).sum((1, 2)) / safe
    has = (row_cnt > 0).to(dt)
    nseq = has.sum()
    seq_mean = Im.sum(-1) / row_cnt.clamp(min=1)  # [n, B]
    c_seq, _ = thm1_weights(seq_mean)
    cseq = (c_seq * has).sum(-1) / nseq.clamp(min=1)
    stats = torch.cat(
        [count.reshape(1), nseq.reshape(1), mean, var, abar, pos, ctok, cseq, gram.reshape(-1)]
    )
    return stats, N, c_seq


def objective_stats(
    advantages: Tensor,
    logp: Tensor,
    old_logp: Tensor,
    mask: Tensor,
    eps_hi: float = 0.2,
    whiten: bool = True,
    noon: bool = True,
) -> Tensor:
    """The flat statistics vector of §3 (layout: :func:`stats_layout`)."""
    return _stats_from(advantages, logp, old_logp, mask, eps_hi, whiten, noon)[0]


def pareto_weights(
    stats: Tensor,
    method: str = "pama",
    granularity: str = "batch",
    prefs: Optional[Tensor] = None,
    cagrad_c: float = CAGRAD_C,
) -> Tensor:
    """Objective weights [n] from a statistics vector.

    pama: Theorem 1 on ``abar`` (batch), or the reported mean per-token / per-sequence weights
    (token / sequence); every other method: :func:`gram_weights` on the statistics Gram (linear:
    ``prefs``, uniform by default; cagrad / raco: ``prefs`` as w and ``cagrad_c`` as c). pama with
    ``prefs`` at batch granularity: the weighted Theorem 1 (§4b) on ``abar``; the per-token / per-sequence
    weights of the statistics vector are the unweighted ones.
    """
    n = stats_num_objectives(stats.shape[0])
    lay = stats_layout(n)
    if method == "pama":
        if granularity == "batch":
            return weighted_thm1(stats[lay["abar"]], prefs)[0]
        if granularity == "token":
            return stats[lay["ctok"]]
        if granularity == "sequence":
            return stats[lay["cseq"]]
        raise ValueError(f"granularity: expected one of {GRANULARITIES}, got {granularity!r}")
    if method in METHODS:
        return gram_weights(stats[lay["gram"]].reshape(n, n), prefs, method, cagrad_c)
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")


# --------------------------------------------------------------------------------------------
# §4 Noon-PPO / PAMA policy loss
# --------------------------------------------------------------------------------------------
def combined_advantage(
    advantages: Tensor,
    logp: Tensor,
    old_logp: Tensor,
    mask: Tensor,
    *,
    eps_hi: float = 0.2,
    noon: bool = True,
    whiten: bool = True,
    method: str = "pama",
    granularity: str = "token",
    prefs: Optional[Tensor] = None,
    cagrad_c: float = CAGRAD_C,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(Ã [B, T], reported weights [n], statistics vector) for the given combiner."""
    stats, N, c_seq = _stats_from(advantages, logp, old_logp, mask, eps_hi, whiten, noon)
    n = N.shape[0]
    if method == "pama" and granularity == "token":
        _, a_tilde = weighted_thm1(N, prefs)  # §4b: Theorem 1 on N_i / ρ_i with prefs
        weights = stats[stats_layout(n)["ctok"]]
    elif method == "pama" and granularity == "sequence":
        if prefs is not None:
            raise ValueError("pama_policy_loss: prefs with method 'pama' needs granularity 'token' or 'batch' (the "
                             "weighted Theorem 1, algorithms §4b), got granularity 'sequence'")
        a_tilde = (c_seq.unsqueeze(-1) * N).sum(0)
        weights = stats[stats_layout(n)["cseq"]]
    else:
        weights = pareto_weights(stats, method, granularity, prefs, cagrad_c)
        a_tilde = (weights[:, None, None] * N).sum(0)
    return a_tilde, weights, stats


def pama_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logp: Optional[Tensor] = None,
    *,
    eps_lo: float = 0.2,
    eps_hi: float = 0.2,
    dual_clip: float = 3.0,
    noon: bool = True,
    whiten: bool = True,
    method: str = "pama",
    granularity: str = "token",
    prefs: Optional[Tensor] = None,
    agg: str = "token-mean",
    beta_loss: float = 0.0,
    check_finite: bool = True,
    cagrad_c: float = CAGRAD_C,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """(loss, metrics). Differentiable w.r.t. ``logp`` only (algorithms §4)."""
    del check_finite  # the checks are pama_ext.checks' (ops.py runs them on the fallback path)
    logp, old_logp, advantages = (zero_padding(x, mask) for x in (logp, old_logp, advantages.detach()))
    if ref_logp is not None:
        ref_logp = zero_padding(ref_logp, mask)
    a_tilde, weights, stats = combined_advantage(
        advantages, logp.detach(), old_logp, mask,
        eps_hi=eps_hi, noon=noon, whiten=whiten, method=method, granularity=granularity, prefs=prefs,
        cagrad_c=cagrad_c,
    )
    dt = logp.dtype
    m = float_mask(mask, dt)
    u = _ratio(logp, old_logp)
    l1 = -a_tilde * u
    l2 = -a_tilde * torch.clamp(u, 1 - eps_lo, 1 + eps_hi)
    l = torch.maximum(l1, l2)
    l = torch.where(a_tilde < 0, torch.minimum(l, -a_tilde * dual_clip), l)
    pg_loss = agg_loss(l, mask, agg)
    if ref_logp is not None and beta_loss != 0.0:
        kl_loss = agg_loss(k3_kl(logp, ref_logp), mask, agg)
    else:
        kl_loss = torch.zeros((), dtype=dt, device=logp.device)
    loss = pg_loss + beta_loss * kl_loss
    cnt = m.sum().clamp(min=1)
    n = advantages.shape[0]
    lay = stats_layout(n)
    metrics = {
        "pg_loss": pg_loss.detach(),
        "kl_loss": kl_loss.detach(),
        "clipfrac": ((l2 > l1).to(dt) * m).sum().detach() / cnt,
        "approx_kl": zero_padding(old_logp - logp, mask).sum().detach() / cnt,
        "active": ((a_tilde > 0).to(dt) * m).sum() / cnt,
        "abar": stats[lay["abar"]],
        "pos": stats[lay["pos"]],
        "weights": weights,
    }
    return loss, metrics


# --------------------------------------------------------------------------------------------
# §5 multi-head value loss
# --------------------------------------------------------------------------------------------
def multi_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip: Optional[float] = 0.2,
    agg: str = "token-mean",
    check_finite: bool = True,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """L_V = 1/2 * sum_i agg(max((V_i - ret_i)^2, (Vc_i - ret_i)^2)); metrics: clipfrac, per-head loss."""
    del check_finite
    values, old_values, returns = (zero_padding(x, mask) for x in (values, old_values, returns))
    eps = float("inf") if clip is None else clip
    diff = values - old_values
    # inside the clip range Vc is V itself (old + (V - old) differs from V by rounding)
    v_clipped = torch.where(diff.abs() <= eps, values, old_values + torch.clamp(diff, -eps, eps))
    l1 = (values - returns).square()
    l2 = (v_clipped - returns).square()
    per_token = torch.maximum(l1, l2)
    per_head = torch.stack([0.5 * agg_loss(per_token[i], mask, agg) for i in range(values.shape[0])])
    m = float_mask(mask, values.dtype)
    clipfrac = ((l2 > l1).to(values.dtype) * m).sum() / (m.sum() * values.shape[0]).clamp(min=1)
    return per_head.sum(), {"clipfrac": clipfrac.detach(), "head_loss": per_head.detach()}


# --------------------------------------------------------------------------------------------
# §7 preference data: per-objective DPO losses
# --------------------------------------------------------------------------------------------
def label_signs(labels: Tensor, dtype: torch.dtype) -> Tensor:
    """s = sign(labels) in ``dtype``: +1 (chosen preferred), -1 (rejected preferred), 0 (tie).

    CHOICE: labels are read through their sign (a value check would need a host read on CUDA);
    NaN counts as a tie.
    """
    return (labels > 0).to(dtype) - (labels < 0).to(dtype)


def dpo_margins(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
) -> Tensor:
    """h_b = (pc_b - rc_b)/Lc_b - (pr_b - rr_b)/Lr_b  [B] (lengths clamped to >= 1; 1 when None)."""
    dc = policy_chosen_logps - ref_chosen_logps
    dr = policy_rejected_logps - ref_rejected_logps
    if chosen_lengths is not None:
        dc = dc / chosen_lengths.to(dc.dtype).clamp(min=1)
    if rejected_lengths is not None:
        dr = dr / rejected_lengths.to(dr.dtype).clamp(min=1)
    return dc - dr


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
    """Per-objective DPO losses (algorithms §7): ``(losses [n], coef [n, B])``.

    losses[i] = mean_b -log sigmoid(beta * s_ib * h_b) (a tie s = 0 gives log 2 and no gradient);
    coef[i, b] = dL_i/dh_b = -(beta/B) * s_ib * sigmoid(-beta * s_ib * h_b) (detached). An empty
    batch (B = 0) gives zero losses. Computed in the accumulation dtype of the log-probs (float32, or
    float64 for float64 inputs), as the kernels do.
    """
    acc = acc_dtype(policy_chosen_logps.dtype)
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps = (
        x.to(acc) for x in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))
    h = dpo_margins(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    chosen_lengths, rejected_lengths)
    s = label_signs(labels, h.dtype)
    z = beta * s * h  # [n, B]
    denom = max(int(h.shape[0]), 1)
    nll = torch.clamp(-z, min=0) + torch.log1p(torch.exp(-z.abs()))  # -log sigmoid(z), stable
    losses = nll.sum(-1) / denom
    coef = (-(beta / denom) * s * torch.sigmoid(-z)).detach()
    return losses, coef


# --------------------------------------------------------------------------------------------
# §6 full-gradient statistics: Gram of per-objective parameter gradients, combination
# --------------------------------------------------------------------------------------------
def grad_table_shape(grads) -> Tuple[int, int]:
    """(n, K) of a table ``grads[i][k]`` of n objectives' gradients of K parameters."""
    n = len(grads)
    if n < 1:
        raise ValueError("grads: expected n >= 1 sequences of per-parameter gradients, got 0")
    K = len(grads[0])
    for i, g in enumerate(grads):
        if len(g) != K:
            raise ValueError(f"grads[{i}] has {len(g)} entries but grads[0] has {K}: one gradient per parameter")
    return n, K


def gradient_gram(grads) -> Tensor:
    """G[i, j] = sum_k <grads[i][k], grads[j][k]> ([n, n]; None entries are zero).

    float64 when the gradients are float64, float32 otherwise (float32 accumulation).
    """
    n, K = grad_table_shape(grads)
    present = [g for row in grads for g in row if g is not None]
    like = present[0] if present else None
    acc = acc_dtype(like.dtype) if like is not None else torch.float32
    device = like.device if like is not None else torch.device("cpu")
    G = torch.zeros(n, n, dtype=acc, device=device)
    for k in range(K):
        col = [grads[i][k] for i in range(n)]
        first = next((g for g in col if g is not None), None)
        if first is None:
            continue
        M = torch.stack([(g if g is not None else torch.zeros_like(first)).detach().reshape(-1).to(acc)
                         for g in col])
        G = G + M @ M.T
    return G


@torch.no_grad()
def combine_gradients(grads, coeffs: Tensor, params, *, accumulate: bool = False) -> None:
    """p.grad = sum_i coeffs[i] * grads[i][k] for params[k] (+= the existing .grad when accumulate).

    The sum runs over i in order in the accumulation dtype (float64 for float64 gradients or
    parameters, float32 otherwise); a new .grad has the parameter's dtype.
    """
    n, K = grad_table_shape(grads)
    if len(params) != K:
        raise ValueError(f"params has {len(params)} entries but grads[0] has {K}")
    totals = []  # every sum first: a failure leaves every .grad as it was
    for k, p in enumerate(params):
        col = [grads[i][k] for i in range(n)]
        f64 = p.dtype == torch.float64 or any(g is not None and g.dtype == torch.float64 for g in col)
        acc = torch.float64 if f64 else torch.float32
        total = torch.zeros(p.shape, dtype=acc, device=p.device)
        for i, g in enumerate(col):
            if g is not None:
                total = total + coeffs[i].to(acc) * g.detach().reshape(p.shape).to(acc)
        totals.append(total)
    for p, total in zip(params, totals):
        if p.grad is None:
            p.grad = total.to(p.dtype)
        elif accumulate:
            p.grad.copy_(p.grad.to(total.dtype) + total)
        else:
            p.grad.copy_(total)


# --------------------------------------------------------------------------------------------
# §6 weighting methods on a Gram matrix (MGDA above; linear, CAGrad/RACO, PCGrad)
# --------------------------------------------------------------------------------------------
def linear_weights(gram: Tensor, w: Optional[Tensor] = None) -> Tensor:
    """The user weights ``w`` (uniform when None) in the Gram's dtype."""
    n = gram.shape[0]
    if w is None:
        return torch.full((n,), 1.0 / n, dtype=gram.dtype, device=gram.device)
    return w.to(dtype=gram.dtype, device=gram.device)


def _faces(n: int, device) -> Tensor:
    """Every nonempty subset of range(n) as a bool matrix [2^n - 1, n], in increasing bitmask order
    (bit i = coordinate i), the order in which the kernels try the faces."""
    codes = torch.arange(1, 1 << n, device=device)
    return (codes[:, None] >> torch.arange(n, device=device)) & 1 == 1


def gram_face_solve(G: Tensor, b: Tensor, faces: Tensor) -> Tuple[Tensor, Tensor]:
    """For every face S of the simplex (rows of ``faces``), the solutions of the bordered system
    ``[G_SS 1; 1^T 0] [x; lam] = [0; 1]`` (p0: the min-norm point of the affine hull of the face's
    gradients) and ``= [-b_S; 0]`` (p1: 1^T p1 = 0, G p1 = -b + mu 1 on S), zero outside S; NaN where
    the face's system is singular. G, b float64; returns ``(p0, p1)``, each [faces, n]."""
    F, n = faces.shape
    both = faces[:, :, None] & faces[:, None, :]
    eye = torch.eye(n, dtype=G.dtype, device=G.device)
    K = G.new_zeros(F, n + 1, n + 1)
    K[:, :n, :n] = torch.where(both, G, eye)  # coordinates outside S: x_i = 0
    K[:, :n, n] = faces.to(G.dtype)
    K[:, n, :n] = faces.to(G.dtype)
    rhs = G.new_zeros(F, n + 1, 2)
    rhs[:, n, 0] = 1
    rhs[:, :n, 1] = torch.where(faces, -b, torch.zeros_like(b))
    sol, info = torch.linalg.solve_ex(K, rhs)
    sol = torch.where((info == 0)[:, None, None], sol, torch.full_like(sol, float("nan")))
    return sol[:, :n, 0], sol[:, :n, 1]


#: Largest n the reference solves by face enumeration (2^n - 1 faces, batched, no host read); above
#: it, the active-set method (a host loop) runs, as the kernels do above n = 8.
GRAM_REFERENCE_MAX_N = 12
#: Objective ties: closer than this many float64 ulps of the two values' magnitudes (sums of the
#: absolute terms); the first candidate wins (as the kernels).
GRAM_TIE_ULPS = 64.0


def _face_candidate(G: Tensor, b: Tensor, s: Tensor, cagrad: bool, p0: Tensor, p1: Tensor):
    """The candidates of faces with solutions (p0, p1) (rows): MGDA's p0; CAGrad's p0 + p1 / kappa,
    kappa = sqrt((s^2 - p1^T G p1) / p0^T G p0) where s^2 > p1^T G p1 and p0^T G p0 > 0 (NaN elsewhere).
    Also returns where CAGrad's objective is unbounded below on the face's affine hull (s^2 < m1)."""
    if not cagrad:
        return p0, torch.zeros(p0.shape[0], dtype=torch.bool, device=p0.device)
    m0 = torch.einsum("fi,ij,fj->f", p0, G, p0)
    m1 = torch.einsum("fi,ij,fj->f", p1, G, p1)
    ok = (s * s > m1) & (m0 > 0)
    kappa = torch.sqrt(torch.where(ok, (s * s - m1) / torch.where(ok, m0, torch.ones_like(m0)), torch.ones_like(m0)))
    return torch.where(ok[:, None], p0 + p1 / kappa[:, None], torch.full_like(p0, float("nan"))), s * s < m1


def _tie_eps() -> float:
    return GRAM_TIE_ULPS * torch.finfo(torch.float64).eps


def _enumerate(G: Tensor, b: Tensor, s: Tensor, cagrad: bool) -> Tensor:
    """Every face's candidates (p0 first, then CAGrad's smooth point), clamped to the simplex and
    evaluated; the first that ties with the smallest wins. Batched: no host read."""
    n = G.shape[0]
    p0, p1 = gram_face_solve(G, b, _faces(n, G.device))
    cands = [p0] + ([_face_candidate(G, b, s, True, p0, p1)[0]] if cagrad else [])
    P = torch.stack(cands, 1).reshape(-1, n)  # order: face by face, p0 first
    P = torch.clamp(P, min=0)
    tot = P.sum(1, keepdim=True)
    P = P / tot
    Q = torch.einsum("fi,ij,fj->f", P, G, P)
    A = torch.einsum("fi,ij,fj->f", P, G.abs(), P)  # magnitudes that the rounding error scales with
    f = P @ b + s * torch.sqrt(torch.clamp(Q, min=0)) if cagrad else Q
    mag = P @ b.abs() + s * torch.sqrt(A) if cagrad else A
    f = torch.where(torch.isfinite(f) & (tot[:, 0] > 0), f, torch.full_like(f, float("inf")))
    best = torch.argmin(f)
    tie = f <= f[best] + _tie_eps() * (mag[best] + mag)
    return P[torch.argmax(tie.to(torch.int8))]


def _active_set(G: Tensor, b: Tensor, s: Tensor, cagrad: bool) -> Tensor:
    """The primal active-set method of the kernels for n > 8 (csrc/gram_solvers.h), as a host loop:
    from the best vertex, step toward the current face's candidate (along p1 where CAGrad's objective
    is unbounded on the face), drop the coordinate that blocks the step, or, at a face optimum, add
    the coordinate with the most negative reduced gradient; at most 8n + 32 steps."""
    n = G.shape[0]
    diag = torch.diagonal(G).clamp(min=0)
    p = torch.zeros(n, dtype=G.dtype, device=G.device)
    p[torch.argmin(b + s * torch.sqrt(diag) if cagrad else diag)] = 1
    free = p > 0
    tie = _tie_eps()
    inf = torch.full_like(p, float("inf"))
    for _ in range(8 * n + 32):
        p0, p1 = gram_face_solve(G, b, free[None])
        if not (torch.isfinite(p0).all() and torch.isfinite(p1).all()):
            break  # a singular face: only rounding on an affinely dependent set leads here
        q, ray = _face_candidate(G, b, s, cagrad, p0, p1)
        q, ray = q[0], bool(ray[0])
        d = p1[0] if ray else q - p
        ratios = torch.where(free & (d < 0), p / -d, inf)
        tmin = ratios.min().item()
        blocked = tmin < (float("inf") if ray else 1.0)
        if ray and not blocked:
            break
        if blocked:  # the first coordinate within rounding of the smallest ratio
            block = int(torch.argmax((ratios <= tmin + tie * (1 + tmin)).to(torch.int8)))
        p = p + (tmin if blocked else 1.0) * d
        if blocked:
            p[block] = 0
            free[block] = False
        p = torch.where(p <= tie, torch.zeros_like(p), p)
        p = p / p.sum()
        if blocked:
            continue
        free = p > 0
        Gp, Ga = G @ p, G.abs() @ p
        Q, A = p @ Gp, p @ Ga
        if not cagrad:
            grad, nu, err = Gp, Q, Ga + A
        elif Q > tie * A:
            kappa = s / torch.sqrt(Q)
            grad = b + kappa * Gp
            err = b.abs() + kappa * Ga
            nu, err = p @ grad, err + p @ err
        else:  # the kink: one-sided derivatives toward the vertices
            grad = b + s * torch.sqrt(diag)
            nu, err = torch.zeros_like(Q), grad.abs()
        viol = ~free & (grad < nu - tie * err)
        if not viol.any():
            break
        gmin = torch.where(viol, grad, inf).min()
        free[torch.argmax((viol & (grad <= gmin + tie * err)).to(torch.int8))] = True
    return p


def _simplex_solve(gram: Tensor, w: Optional[Tensor], c: float) -> Tuple[Tensor, Tensor, Tensor]:
    """The exact minimiser over the simplex of p^T G p (``w is None``) or of CAGrad's
    p^T b + s sqrt(p^T G p) (b = G w, s = c sqrt(w^T G w)) through the faces of the simplex
    (docs/algorithms.md §6): on a face S the bordered system (gram_face_solve) gives
    the min-norm point p0 of the face's affine hull and a direction p1; MGDA's candidate is p0,
    CAGrad's p0 + p1 / kappa with kappa = sqrt((s^2 - p1^T G p1) / p0^T G p0) (or p0 at the kink).
    n <= GRAM_REFERENCE_MAX_N: every face is tried (:func:`_enumerate`); above, the active-set
    method. In float64, on G / max_i G_ii. Non-finite G, w or c give NaN. Returns (p, scaled G, s)."""
    n = gram.shape[0]
    G64 = gram.detach().to(torch.float64)
    cagrad = w is not None
    wv = w.detach().to(dtype=torch.float64, device=G64.device) if cagrad else G64.new_zeros(n)
    finite = torch.isfinite(G64).all() & torch.isfinite(wv).all() & bool(math.isfinite(c))
    G = torch.where(finite, G64, torch.zeros_like(G64))
    scale = torch.diagonal(G).max()
    G = G / torch.where(scale > 0, scale, torch.ones_like(scale))
    b = G @ wv
    s = c * torch.sqrt(torch.clamp(wv @ b, min=0))
    p = _enumerate(G, b, s, cagrad) if n <= GRAM_REFERENCE_MAX_N else _active_set(G, b, s, cagrad)
    return torch.where(finite, p, torch.full_like(p, float("nan"))), G, s


def cagrad_weights(gram: Tensor, w: Optional[Tensor] = None, c: float = 0.4, clip: bool = True) -> Tensor:
    """CAGrad (clip=False) / CAGrad-clip as in RACO (clip=True) final coefficients a [n] (algorithms §6).

    b = G w, s = c * sqrt(w^T G w), p* = argmin_{p in simplex} p^T b + s * sqrt(p^T G p) (exact, see
    :func:`_simplex_solve`); p~ = min(p*, w) (clip) or p*; a = w + s / sqrt(p~^T G p~) * p~, with
    a = w where p~^T G p~ is 0 up to rounding (<= GRAM_TIE_ULPS eps p~^T |G| p~: the direction
    vanishes). Float64 inside; returned in G's dtype.
    """
    wv = linear_weights(gram.to(torch.float64), w)
    p, G, s = _simplex_solve(gram, wv, c)
    pt = torch.minimum(p, wv) if clip else p
    nrm2 = pt @ G @ pt
    kink = ~(nrm2 > GRAM_TIE_ULPS * torch.finfo(torch.float64).eps * (pt @ G.abs() @ pt))
    a = wv + torch.where(kink, torch.zeros_like(nrm2), s / torch.sqrt(torch.where(kink, torch.ones_like(nrm2), nrm2))) * pt
    return a.to(gram.dtype)


def pcgrad_weights(gram: Tensor) -> Tensor:
    """PCGrad in Gram form (algorithms §6): v_i = e_i; for j != i in order, if (G v_i)_j < 0 (and G_jj > 0),
    v_i[j] -= (G v_i)_j / G_jj; returns sum_i v_i."""
    G = gram
    n = G.shape[0]
    rows = []
    for i in range(n):
        v = torch.zeros(n, dtype=G.dtype, device=G.device)
        v[i] = 1
        for j in range(n):
            if j == i:
                continue
            gv = G[j] @ v
            hit = (gv < 0) & (G[j, j] > 0)
            step = torch.where(hit, gv / torch.where(G[j, j] > 0, G[j, j], torch.ones_like(gv)), torch.zeros_like(gv))
            v = v - step * torch.eye(n, dtype=G.dtype, device=G.device)[j]
        rows.append(v)
    return torch.stack(rows).sum(0)


def gram_weights(gram: Tensor, w: Optional[Tensor], method: str, c: float = CAGRAD_C) -> Tensor:
    """Weights of a Gram-based ``method`` (every method of pama_ext.vocab but pama) from G [n, n]:
    linear (``w``, uniform when None), mgda, cagrad / raco (``w``, ``c``), pcgrad."""
    if method == "linear":
        return linear_weights(gram, w)
    if method == "mgda":
        return mgda_weights(gram)
    if method in ("cagrad", "raco"):
        return cagrad_weights(gram, w, c, clip=method == "raco")
    if method == "pcgrad":
        return pcgrad_weights(gram)
    raise ValueError(f"method: expected one of {GRAM_METHODS}, got {method!r}")
