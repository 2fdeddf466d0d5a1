"""Run an op (from pama_ext.ops or pama_ext.reference: same names and signatures) on an Inputs
bundle and collect every forward output, metric and input gradient in one flat dict, so the
kernel and the reference can be compared key by key.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from pama_testutils import Inputs


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def _upstream(like: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(like.shape, generator=g, dtype=torch.float64).to(like.dtype).to(like.device)


def run_token_rewards(mod, x: Inputs, beta_kl: float = 0.0, grad: bool = True) -> Dict[str, torch.Tensor]:
    scores, old, refl = _leaf(x.scores), _leaf(x.old_logp), _leaf(x.ref_logp)
    r = mod.token_rewards(scores, old, refl, x.mask, beta_kl=beta_kl)
    out = {"rewards": r}
    if grad:
        gs, go, gr = torch.autograd.grad(r, (scores, old, refl), _upstream(r, 1), allow_unused=True)
        out.update(grad_scores=gs, grad_old_logp=go, grad_ref_logp=gr)
    return out


def run_multi_gae(mod, x: Inputs, gamma: float = 1.0, lam: float = 0.95, grad: bool = True,
                  only: Optional[str] = None) -> Dict[str, torch.Tensor]:
    rewards, values = _leaf(x.rewards), _leaf(x.values)
    adv, ret = mod.multi_gae(rewards, values, x.mask, gamma=gamma, lam=lam)
    out = {"advantages": adv, "returns": ret}
    if grad:
        if only == "advantages":
            obj = (adv * _upstream(adv, 2)).sum()
        elif only == "returns":
            obj = (ret * _upstream(ret, 3)).sum()
        else:
            obj = (adv * _upstream(adv, 2)).sum() + (ret * _upstream(ret, 3)).sum()
        gr, gv = torch.autograd.grad(obj, (rewards, values), allow_unused=True)
        out.update(grad_rewards=gr, grad_values=gv)
    return out


def run_objective_stats(mod, x: Inputs, **kw) -> Dict[str, torch.Tensor]:
    return {"stats": mod.objective_stats(x.advantages, x.logp, x.old_logp, x.mask, **kw)}


def run_policy_loss(mod, x: Inputs, *, use_ref: bool = False, prefs=None, upstream: float = 1.7,
                    grad: bool = True, **kw) -> Dict[str, torch.Tensor]:
    logp = _leaf(x.logp)
    if prefs is not None:
        prefs = torch.as_tensor(prefs, dtype=torch.float64).to(dtype=x.logp.dtype, device=x.logp.device)
    loss, metrics = mod.pama_policy_loss(
        logp, x.old_logp, x.advantages, x.mask, x.ref_logp if use_ref else None, prefs=prefs, **kw
    )
    out = {"loss": loss}
    out.update(metrics)
    if grad:
        (g,) = torch.autograd.grad(loss * upstream, logp, allow_unused=True)
        out["grad_logp"] = g
    return out


def run_value_loss(mod, x: Inputs, clip=0.2, agg: str = "token-mean", upstream: float = 0.6,
                   grad: bool = True) -> Dict[str, torch.Tensor]:
    values = _leaf(x.values)
    loss, metrics = mod.multi_value_loss(values, x.old_values, x.returns, x.mask, clip=clip, agg=agg)
    out = {"loss": loss}
    out.update(metrics)
    if grad:
        (g,) = torch.autograd.grad(loss * upstream, values, allow_unused=True)
        out["grad_values"] = g
    return out
