"""Plain-PyTorch implementation of SPEC.md §1-§5.

This module is the executable form of the specification: the ground truth of every test, the
baseline of every benchmark and the fallback used when the compiled library is absent. It favours
clarity over speed, works in any floating dtype (float64 included) and computes in the dtype of its
inputs, so that running it in bfloat16 measures how much error that dtype alone causes.

Every function here has a twin of the same name in :mod:`pama_ext.ops` (the fused kernels).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "METHODS",
    "GRANULARITIES",
    "AGG_MODES",
    "MGDA_FW_ITERS",
    "stats_layout",
    "stats_num_objectives",
    "token_rewards",
    "multi_gae",
    "objective_stats",
    "pareto_weights",
    "thm1_weights",
    "mgda_weights",
    "pama_policy_loss",
    "multi_value_loss",
    "agg_loss",
    "k3_kl",
    "masked_moments",
    "masked_whiten",
    "METRIC_SCALARS",
]

METHODS = ("pama", "linear", "mgda")
GRANULARITIES = ("token", "sequence", "batch")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
#: Frank-Wolfe iterations of the n > 2 MGDA solver. Fixed, so the solver never branches on data.
MGDA_FW_ITERS = 100
#: Scalar metrics of pama_policy_loss, in the order of the flat metrics vector.
METRIC_SCALARS = ("pg_loss", "kl_loss", "clipfrac", "approx_kl", "active")
WHITEN_EPS = 1e-8
LOG_RATIO_CLAMP = 20.0


# --------------------------------------------------------------------------------------------
# statistics vector layout (§3)
# --------------------------------------------------------------------------------------------
def stats_layout(n: int) -> Dict[str, slice]:
    """Slices of the flat statistics vector for ``n`` objectives.

    ``[count, num_seqs, mean(n), var(n), abar(n), pos(n), ctok(n), cseq(n), gram(n*n)]``,
    ``(n + 3)**2 - 7`` entries in all. ``ctok`` is the mean over masked tokens of the per-token
    Theorem-1 weights, ``cseq`` the mean over non-empty sequences of the per-sequence ones.
    """
    out = {"count": slice(0, 1), "num_seqs": slice(1, 2)}
    off = 2
    for name in ("mean", "var", "abar", "pos", "ctok", "cseq"):
        out[name] = slice(off, off + n)
        off += n
    out["gram"] = slice(off, off + n * n)
    return out


def stats_num_objectives(length: int) -> int:
    """Inverse of the layout size: the n with ``(n + 3)**2 - 7 == length`` (or ValueError)."""
    n = int(round((length + 7) ** 0.5)) - 3
    if n < 1 or (n + 3) ** 2 - 7 != length:
        raise ValueError(
            f"stats: a statistics vector has (n+3)^2-7 entries for n objectives; got length {length}"
        )
    return n


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _fmask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    return (mask != 0).to(dtype)


def _last_valid_onehot(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, T] one-hot of the last masked-in position of each row (all zero for an empty row)."""
    m = mask != 0
    T = m.shape[-1]
    pos = torch.arange(T, device=m.device).expand_as(m)
    last = torch.where(m, pos, torch.full_like(pos, -1)).amax(-1)  # -1 for an empty row
    return (pos == last.unsqueeze(-1)).to(dtype)


def agg_loss(loss_mat: Tensor, mask: Tensor, agg: str) -> Tensor:
    """verl's ``agg_loss`` over [..., B, T] (leading dims summed), fully masked rows excluded.

    CHOICE (documented in SPEC §4 as "verl's agg_loss semantics"): sequences with no masked-in
    token are left out of the sequence count, so an empty row never produces 0/0; a fully
    masked batch aggregates to 0.
    """
    m = _fmask(mask, loss_mat.dtype)
    row_sum = (loss_mat * m).sum(-1)  # [..., B]
    row_cnt = m.sum(-1)  # [B]
    if agg == "token-mean":
        return row_sum.sum(-1) / row_cnt.sum().clamp(min=1)
    nseq = (row_cnt > 0).to(loss_mat.dtype).sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        return (row_sum / row_cnt.clamp(min=1)).sum(-1) / nseq
    if agg == "seq-mean-token-sum":
        return row_sum.sum(-1) / nseq
    raise ValueError(f"agg: expected one of {AGG_MODES}, got {agg!r}")


# --------------------------------------------------------------------------------------------
# §1 token rewards
# --------------------------------------------------------------------------------------------
def token_rewards(
    scores: Tensor, old_logp: Tensor, ref_logp: Tensor, mask: Tensor, beta_kl: float = 0.0
) -> Tensor:
    """r_i[b,t] = -beta_kl * mask * (old_logp - ref_logp) + [t = last valid t of row b] * R_i[b]."""
    dt = old_logp.dtype
    m = _fmask(mask, dt)
    kl = (old_logp - ref_logp) * m
    last = _last_valid_onehot(mask, dt)
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


def mgda_weights(gram: Tensor, iters: int = MGDA_FW_ITERS) -> Tensor:
    """argmin_{c in simplex} c^T G c: exact for n <= 2, fixed-iteration Frank-Wolfe for n > 2."""
    n = gram.shape[0]
    G = gram
    if n == 1:
        return torch.ones(1, dtype=G.dtype, device=G.device)
    if n == 2:
        den = G[0, 0] + G[1, 1] - 2 * G[0, 1]
        c0 = torch.where(
            den > 0,
            ((G[1, 1] - G[0, 1]) / torch.where(den > 0, den, torch.ones_like(den))).clamp(0, 1),
            torch.full_like(den, 0.5),
        )
        return torch.stack([c0, 1 - c0])
    c = torch.full((n,), 1.0 / n, dtype=G.dtype, device=G.device)
    eye = torch.eye(n, dtype=G.dtype, device=G.device)
    for _ in range(iters):
        grad = G @ c
        d = eye[torch.argmin(grad)] - c  # argmin returns the first minimum: deterministic
        Gd = G @ d
        dGd = d @ Gd
        cGd = c @ Gd
        step = torch.where(
            dGd > 0,
            (-cGd / torch.where(dGd > 0, dGd, torch.ones_like(dGd))).clamp(0, 1),
            (cGd < 0).to(G.dtype),
        )
        c = c + step * d
    return c


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi_theta || pi_ref): exp(ref - logp) - (ref - logp) - 1 (SPEC §4)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def _ratio(logp: Tensor, old_logp: Tensor) -> Tensor:
    return torch.exp(torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def masked_moments(advantages: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(count, mean [n], var [n]) of each objective over the masked tokens (SPEC §3: unbiased
    variance, 0 when count <= 1)."""
    m = _fmask(mask, advantages.dtype)
    count = m.sum()
    mean = (advantages * m).sum((1, 2)) / count.clamp(min=1)
    var = ((advantages - mean[:, None, None]).square() * m).sum((1, 2)) / (count - 1).clamp(min=1)
    return count, mean, torch.where(count > 1, var, torch.zeros_like(var))


def objective_moments(advantages: Tensor, mask: Tensor) -> Tensor:
    """``[count, num_seqs, mean(n), var(n)]``: the first 2 + 2n entries of the statistics vector."""
    count, mean, var = masked_moments(advantages, mask)
    nseq = (mask != 0).any(-1).sum().to(advantages.dtype)
    return torch.cat([count.reshape(1), nseq.reshape(1), mean, var])


def whiten_with(advantages: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """Â = (A - mean) / sqrt(var + 1e-8) per objective, with given moments ``[n]`` (mean not added back)."""
    mean, var = mean.to(advantages.dtype), var.to(advantages.dtype)
    return (advantages - mean[:, None, None]) / torch.sqrt(var + WHITEN_EPS)[:, None, None]


def masked_whiten(advantages: Tensor, mask: Tensor) -> Tensor:
    """Â = (A - mean) / sqrt(var + 1e-8) per objective over the masked tokens (mean not added back)."""
    _, mean, var = masked_moments(advantages, mask)
    return whiten_with(advantages, mean, var)


def _whitened_noon(advantages: Tensor, mask: Tensor, whiten: bool, noon: bool):
    """(count, row counts, mean, var, N) with N = Noon(whiten(A))."""
    row_cnt = _fmask(mask, advantages.dtype).sum(-1)
    count, mean, var = masked_moments(advantages, mask)
    if whiten:
        a_hat = whiten_with(advantages, mean, var)
    else:
        a_hat = advantages
    N = a_hat.clamp(min=0) if noon else a_hat
    return count, row_cnt, mean, var, N


def _stats_from(advantages, logp, old_logp, mask, eps_hi, whiten, noon):
    dt = advantages.dtype
    m = _fmask(mask, dt)
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
) -> Tensor:
    """Objective weights [n] from a statistics vector.

    pama: Theorem 1 on ``abar`` (batch), or the reported mean per-token / per-sequence weights
    (token / sequence); linear: ``prefs`` (uniform by default); mgda: min-norm point of the Gram.
    """
    n = stats_num_objectives(stats.shape[0])
    lay = stats_layout(n)
    if method == "pama":
        if granularity == "batch":
            return thm1_weights(stats[lay["abar"]])[0]
        if granularity == "token":
            return stats[lay["ctok"]]
        if granularity == "sequence":
            return stats[lay["cseq"]]
        raise ValueError(f"granularity: expected one of {GRANULARITIES}, got {granularity!r}")
    if method == "linear":
        if prefs is None:
            return torch.full((n,), 1.0 / n, dtype=stats.dtype, device=stats.device)
        return prefs.to(stats.dtype)
    if method == "mgda":
        return mgda_weights(stats[lay["gram"]].reshape(n, n))
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
) -> Tuple[Tensor, Tensor, Tensor]:
    """(Ã [B, T], reported weights [n], statistics vector) for the given combiner."""
    stats, N, c_seq = _stats_from(advantages, logp, old_logp, mask, eps_hi, whiten, noon)
    n = N.shape[0]
    if method == "pama" and granularity == "token":
        _, a_tilde = thm1_weights(N)
        weights = stats[stats_layout(n)["ctok"]]
    elif method == "pama" and granularity == "sequence":
        a_tilde = (c_seq.unsqueeze(-1) * N).sum(0)
        weights = stats[stats_layout(n)["cseq"]]
    else:
        weights = pareto_weights(stats, method, granularity, prefs)
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
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """(loss, metrics). Differentiable w.r.t. ``logp`` only (SPEC §4)."""
    del check_finite  # the reference propagates NaN; the kernels check
    advantages = advantages.detach()
    a_tilde, weights, stats = combined_advantage(
        advantages, logp.detach(), old_logp, mask,
        eps_hi=eps_hi, noon=noon, whiten=whiten, method=method, granularity=granularity, prefs=prefs,
    )
    dt = logp.dtype
    m = _fmask(mask, dt)
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
        "approx_kl": ((old_logp - logp) * m).sum().detach() / cnt,
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
    eps = float("inf") if clip is None else clip
    diff = values - old_values
    # inside the clip range Vc is V itself (old + (V - old) differs from V by rounding)
    v_clipped = torch.where(diff.abs() <= eps, values, old_values + torch.clamp(diff, -eps, eps))
    l1 = (values - returns).square()
    l2 = (v_clipped - returns).square()
    per_token = torch.maximum(l1, l2)
    per_head = torch.stack([0.5 * agg_loss(per_token[i], mask, agg) for i in range(values.shape[0])])
    m = _fmask(mask, values.dtype)
    clipfrac = ((l2 > l1).to(values.dtype) * m).sum() / (m.sum() * values.shape[0]).clamp(min=1)
    return per_head.sum(), {"clipfrac": clipfrac.detach(), "head_loss": per_head.detach()}
