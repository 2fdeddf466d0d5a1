"""MOPO (docs/dpo.md, "mopo"): the closed-form tilt, the robust lower bound, the dual updates and the
importance-weighted behaviour-cloning weights -- all tensor code that stays on the device.

Notation (per stored response r of prompt ``group[r]``):

- ``primary[r]`` = p̄(x, y_r), ``secondary[k, r]`` = q̄_k(x, y_r): mean pairwise win-rates in [0, 1];
- ``log_base[r]``: log of the reference distribution over the prompt's stored responses, normalised per
  prompt (``log(1/n_i)`` for responses sampled from π_ref; after a reference update it holds the
  self-normalised lag ratio π_ψ^(t−t0)/π_ref⁰, see :func:`lag_log_base`);
- the tilt ρ̃_λ = exp(z) / E_base[exp(z)] with z = (p̄ + λᵀq̄)/τ, computed in log space
  (:func:`tilt_log_weights`), so E_base[ρ̃] = 1 per prompt;
- the behaviour-cloning weight of r in a batch of M prompts: W_r = base_r · ρ̃_r / M
  (:func:`bc_weights`); the loss is −Σ_r sg[W_r] log π_ψ(y_r | x) (summed token log-probs).

The dual variables live in :class:`MopoDuals` (tensors on the training device); :func:`dual_step`
performs Algorithm 1's χ and λ updates and returns the recomputed tilt, without reading anything back
to the host.

Reconstructed parts (the MOPO paper gives their quoted form only; docs/dpo.md): the exact dual objectives behind
the χ and λ updates (Eqs. 8-9), and the reading of "G(ρ from step t−t0)" in the threshold update.
pama_ext evaluates G as the secondary win-rates of the lagged policy π_ψ^(t−t0) on the stored
responses (E_{π_ref⁰}[ratio · q̄], the same quantity as b⁰ = β·G(π_ref) at t = 0); see docs/dpo.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
from torch import Tensor

__all__ = ["group_logsumexp", "uniform_log_base", "lag_log_base", "tilt_log_weights", "robust_lower_bound",
           "robust_value", "chi_gradient", "MopoDuals", "dual_step", "barrier_lambda", "bc_weights",
           "effective_sample_size", "secondary_values"]

CHI_MIN = 1e-3  # χ is kept strictly positive (the bound divides by it)
#: the bracket of the exact supremum over χ (:func:`robust_value`): log χ in [log CHI_MIN, log CHI_MAX]
CHI_MAX = 1e3
#: golden-section steps of :func:`robust_value` (the bracket shrinks by 0.618 per step: 13.8 / 0.618^64 < 1e-12)
ROBUST_VALUE_ITERS = 64
#: mopo-lb: the bracket of the barrier's multipliers λ = σ / (G − b) (the cap is reached when no tilt meets b)
BARRIER_LAMBDA_MIN, BARRIER_LAMBDA_MAX = 1e-8, 100.0
#: mopo-lb: bisection steps on log λ (the bracket of width 23 shrinks below 1e-9 relative)
BARRIER_BISECTION_ITERS = 40


def group_logsumexp(x: Tensor, group: Tensor, n_groups: int) -> Tensor:
    """``[n_groups]``: log Σ_{r in g} exp(x[r]) for each group g (``-inf`` for an empty group)."""
    m = torch.full((n_groups,), float("-inf"), dtype=x.dtype, device=x.device)
    m = m.scatter_reduce(0, group, x, reduce="amax", include_self=True)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add(0, group, torch.exp(x - m_safe[group]))
    return m_safe + torch.log(s)


def uniform_log_base(group: Tensor, n_groups: int) -> Tensor:
    """log(1/n_i) for every response of prompt i (responses sampled from π_ref)."""
    counts = torch.zeros(n_groups, dtype=torch.float32, device=group.device).index_add(
        0, group, torch.ones_like(group, dtype=torch.float32))
    return -torch.log(counts)[group]


def lag_log_base(logp_lag: Tensor, logp_ref0: Tensor, log_base0: Tensor, group: Tensor, n_groups: int) -> Tensor:
    """The reference distribution after π_ref ← π_ψ^(t−t0): base0 · π_ψ^(t−t0)/π_ref⁰, renormalised per prompt
    (log space)."""
    x = log_base0 + (logp_lag - logp_ref0)
    return x - group_logsumexp(x, group, n_groups)[group]


def tilt_log_weights(primary: Tensor, secondary: Tensor, lam: Tensor, tau: float, log_base: Tensor, group: Tensor,
                     n_groups: int) -> Tensor:
    """log ρ̃_λ[r] = z_r − log Σ_{j in group} base_j exp(z_j),  z = (p̄ + λᵀq̄)/τ  (so E_base[ρ̃] = 1 per prompt)."""
    z = (primary + (lam[:, None] * secondary).sum(0)) / tau
    # shift by the per-prompt maximum first: large z (small τ) keeps full precision near the top
    zmax = torch.full((n_groups,), float("-inf"), dtype=z.dtype, device=z.device)
    z = z - zmax.scatter_reduce(0, group, z.detach(), reduce="amax", include_self=True)[group]
    return z - group_logsumexp(log_base + z, group, n_groups)[group]


def _log_mean_exp(log_p: Tensor, x: Tensor) -> Tensor:
    """log Σ_r p_r exp(x_r) for a probability vector p (given as log p), along the last dim."""
    return torch.logsumexp(log_p + x, dim=-1)


def robust_lower_bound(v: Tensor, log_p: Tensor, chi: Tensor, eps: float) -> Tensor:
    """LB_k = −χ_k log Ê exp(−v_k/χ_k) − χ_k ε at the current χ (``v``: [K−1, R], Ê under ``log_p`` [R]);
    the plain mean Ê v_k when ε = 0 (the bound's supremum over χ, reached as χ → ∞)."""
    p = torch.exp(log_p)
    if eps == 0:
        return (v * p).sum(-1)
    return -chi * _log_mean_exp(log_p, -v / chi[:, None]) - chi * eps


def robust_value(v: Tensor, log_p: Tensor, eps: float) -> Tensor:
    """``[K]``: the robust lower bound at its best χ, sup_{χ in [CHI_MIN, CHI_MAX]} LB_k(χ) (the plain mean Ê v_k
    when ε = 0). LB(χ) = −χ log Ê e^{−v/χ} − χε is concave in χ (minus a perspective of a convex function), so
    it is unimodal in log χ: a fixed number of golden-section steps on log χ finds the supremum, on the
    device and without reading anything back. This is G, the value the thresholds b are made of, measured
    with the same functional as the constraint it is compared with (docs/dpo.md, "mopo")."""
    if eps == 0:
        return robust_lower_bound(v, log_p, torch.ones(v.shape[0], dtype=v.dtype, device=v.device), eps)
    g = (math.sqrt(5.0) - 1.0) / 2.0
    lo = torch.full((v.shape[0],), math.log(CHI_MIN), dtype=v.dtype, device=v.device)
    hi = torch.full_like(lo, math.log(CHI_MAX))

    def f(x):
        return robust_lower_bound(v, log_p, torch.exp(x), eps)

    c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    fc, fd = f(c), f(d)
    for _ in range(ROBUST_VALUE_ITERS):
        left = fc >= fd  # the maximum lies in [lo, d]
        lo, hi = torch.where(left, lo, c), torch.where(left, d, hi)
        c_new, d_new = hi - g * (hi - lo), lo + g * (hi - lo)
        # one new evaluation per step in exact arithmetic; both are recomputed here (K is small) for clarity
        c, d = c_new, d_new
        fc, fd = f(c), f(d)
    return torch.maximum(torch.maximum(fc, fd), torch.maximum(f(lo), f(hi)))


def chi_gradient(v: Tensor, log_p: Tensor, chi: Tensor, eps: float) -> Tensor:
    """∂/∂χ of f(χ) = χ log Ê exp(−v/χ) + χ ε:  log Ê e^{−v/χ} + Ê_s[v]/χ + ε, where s ∝ p·e^{−v/χ}."""
    a = -v / chi[:, None]
    lme = _log_mean_exp(log_p, a)
    s = torch.softmax(log_p + a, dim=-1)
    return lme + (s * v).sum(-1) / chi + eps


@dataclass
class MopoDuals:
    """λ (multipliers, ≥ 0), χ (robust-bound temperatures, > 0) and b (thresholds), one per constraint."""
    lam: Tensor
    chi: Tensor
    b: Tensor

    @classmethod
    def init(cls, b0: Tensor) -> "MopoDuals":
        return cls(lam=torch.zeros_like(b0), chi=torch.ones_like(b0), b=b0.clone())

    def state_dict(self) -> Dict[str, Tensor]:
        return {"lam": self.lam, "chi": self.chi, "b": self.b}


def barrier_lambda(duals: "MopoDuals", primary: Tensor, secondary: Tensor, log_base: Tensor, group: Tensor,
                   n_groups: int, tau: float, eps: float, sigma: float) -> Tensor:
    """MOPO-LB: the multipliers that the log-barrier σ Σ_k log(G_k(ρ) − b_k) puts in place of λ, on the prompts given
    (updates ``duals.lam`` in place and returns G at them).

    Why the tilt keeps its form: maximising E_ρ[p̄] − τ KL + σ Σ_k log(G_k(ρ) − b_k) has the stationarity condition
    of the Lagrangian with λ_k = σ / (G_k(ρ) − b_k) (∂/∂ρ of σ log(G − b) is σ/(G − b) · ∂G/∂ρ), so the maximiser
    is the tilt ρ̃_λ at the λ solving λ_k (G_k(ρ̃_λ) − b_k) = σ. G_k(ρ̃_λ) rises with λ_k (the tilt moves mass to
    larger q̄_k), so the left side rises from 0 and the root is unique: it is found by bisection on log λ_k in
    [BARRIER_LAMBDA_MIN, BARRIER_LAMBDA_MAX] (a fixed number of steps, on the device), one constraint after the
    other (Gauss-Seidel for K − 1 > 1). A threshold no tilt reaches (the barrier is undefined) gives the cap."""
    log_p = log_base - math.log(n_groups)
    lam = duals.lam.clone()

    def g_of(lam_v: Tensor) -> Tensor:
        lr = tilt_log_weights(primary, secondary, lam_v, tau, log_base, group, n_groups)
        return robust_value(secondary, log_p + lr, eps)

    for k in range(lam.shape[0]):
        lo = torch.full((), math.log(BARRIER_LAMBDA_MIN), dtype=lam.dtype, device=lam.device)
        hi = torch.full((), math.log(BARRIER_LAMBDA_MAX), dtype=lam.dtype, device=lam.device)
        onehot = torch.zeros_like(lam)
        onehot[k] = 1.0
        for _ in range(BARRIER_BISECTION_ITERS):
            mid = 0.5 * (lo + hi)
            lm = torch.exp(mid)
            trial = lam * (1 - onehot) + lm * onehot
            h = lm * (g_of(trial)[k] - duals.b[k]) - sigma
            lo, hi = torch.where(h < 0, mid, lo), torch.where(h < 0, hi, mid)
        lam = lam * (1 - onehot) + torch.exp(hi) * onehot
    duals.lam = lam
    return g_of(lam)


def dual_step(duals: MopoDuals, primary: Tensor, secondary: Tensor, log_base: Tensor, group: Tensor, n_groups: int,
              tau: float, eps: float, eta: float) -> Tuple[Tensor, Dict[str, Tensor]]:
    """One step of Algorithm 1's duals on a batch of ``n_groups`` prompts (updates ``duals`` in place):

    χ_k ← max(χ_k − η ∂_χ f_k(χ_k), CHI_MIN)   (ascent on the lower bound; skipped when ε = 0)
    λ_k ← [λ_k + η (b_k − LB_k(ρ̃_λ))]_+        (LB at the new χ, ρ̃ with the current λ)
    then returns log ρ̃ recomputed with the new λ, and device-side metrics.

    The bound is that of the tilted policy π = ρ̃·base: LB_k = −χ log E_π e^{−q̄_k/χ} − χε (the importance
    weights are the measure; docs/dpo.md, "mopo", on why not E_base e^{−ρ̃ q̄_k/χ}); for ε = 0 both are
    E_base[ρ̃ q̄_k].
    """
    log_p = log_base - math.log(n_groups)  # Ê over the batch
    log_rho = tilt_log_weights(primary, secondary, duals.lam, tau, log_base, group, n_groups)
    log_pi = log_p + log_rho  # the tilted policy on the batch (sums to 1)
    if eps != 0:
        duals.chi = (duals.chi - eta * chi_gradient(secondary, log_pi, duals.chi, eps)).clamp_min(CHI_MIN)
    lb = robust_lower_bound(secondary, log_pi, duals.chi, eps)
    duals.lam = (duals.lam + eta * (duals.b - lb)).clamp_min(0.0)
    log_rho = tilt_log_weights(primary, secondary, duals.lam, tau, log_base, group, n_groups)
    return log_rho, {"lower_bound": lb.detach()}


def bc_weights(log_rho: Tensor, log_base: Tensor, n_groups: int) -> Tensor:
    """W_r = base_r · ρ̃_r / M: the (detached) weights of the behaviour-cloning loss of a batch of M prompts."""
    return torch.exp(log_base + log_rho).detach() / n_groups


def effective_sample_size(w: Tensor) -> Tensor:
    """(Σw)² / Σw² (a tensor; equals the number of responses for equal weights)."""
    return w.sum() ** 2 / (w * w).sum().clamp_min(torch.finfo(w.dtype).tiny)


def secondary_values(values: Tensor, log_base: Tensor, n_groups: int, eps: float = 0.0) -> Tensor:
    """G: the values ``[K', R]`` → ``[K']`` of the policy ``base`` (prompts weighted equally), measured with the
    constraint's functional: E_x E_{y~base}[values] for ε = 0, the robust bound :func:`robust_value` over the
    same distribution for ε > 0 (comparing a threshold made of plain means with a pessimistic bound would make
    the constraint unreachable; docs/dpo.md, "mopo")."""
    log_p = log_base - math.log(n_groups)
    return robust_value(values, log_p, eps)
