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

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
from torch import Tensor

__all__ = ["group_logsumexp", "uniform_log_base", "lag_log_base", "tilt_log_weights", "robust_lower_bound",
           "chi_gradient", "MopoDuals", "dual_step", "bc_weights", "effective_sample_size", "secondary_values"]

CHI_MIN = 1e-3  # χ is kept strictly positive (the bound divides by it)


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


def dual_step(duals: MopoDuals, primary: Tensor, secondary: Tensor, log_base: Tensor, group: Tensor, n_groups: int,
              tau: float, eps: float, eta: float) -> Tuple[Tensor, Dict[str, Tensor]]:
    """One step of Algorithm 1's duals on a batch of ``n_groups`` prompts (updates ``duals`` in place):

    χ_k ← max(χ_k − η ∂_χ f_k(χ_k), CHI_MIN)   (ascent on the lower bound; skipped when ε = 0)
    λ_k ← [λ_k + η (b_k − LB_k(ρ̃_λ))]_+        (LB at the new χ, ρ̃ with the current λ)
    then returns log ρ̃ recomputed with the new λ, and device-side metrics.
    """
    log_p = log_base - torch.log(torch.tensor(float(n_groups), device=log_base.device))  # Ê over the batch
    log_rho = tilt_log_weights(primary, secondary, duals.lam, tau, log_base, group, n_groups)
    v = torch.exp(log_rho) * secondary  # [K−1, R]
    if eps != 0:
        duals.chi = (duals.chi - eta * chi_gradient(v, log_p, duals.chi, eps)).clamp_min(CHI_MIN)
    lb = robust_lower_bound(v, log_p, duals.chi, eps)
    duals.lam = (duals.lam + eta * (duals.b - lb)).clamp_min(0.0)
    log_rho = tilt_log_weights(primary, secondary, duals.lam, tau, log_base, group, n_groups)
    return log_rho, {"lower_bound": lb.detach()}


def bc_weights(log_rho: Tensor, log_base: Tensor, n_groups: int) -> Tensor:
    """W_r = base_r · ρ̃_r / M: the (detached) weights of the behaviour-cloning loss of a batch of M prompts."""
    return torch.exp(log_base + log_rho).detach() / n_groups


def effective_sample_size(w: Tensor) -> Tensor:
    """(Σw)² / Σw² (a tensor; equals the number of responses for equal weights)."""
    return w.sum() ** 2 / (w * w).sum().clamp_min(torch.finfo(w.dtype).tiny)


def secondary_values(values: Tensor, log_base: Tensor, n_groups: int) -> Tensor:
    """E_x E_{y~base}[values]: ``[K', R]`` → ``[K']`` (prompts weighted equally)."""
    return (values * torch.exp(log_base)).sum(-1) / n_groups
