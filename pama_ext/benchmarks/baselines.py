"""The baselines every benchmark compares the fused ops with, defined once.

* ``EAGER[op]``: the plain-PyTorch reference (pama_ext.reference) of each op, run eagerly.
* :func:`compiled`: ``torch.compile`` of that reference (for the policy loss, of
  :func:`reference_policy_loss_flat`, which returns its metrics packed; see there).
* :func:`gae_python_loop`: GAE the way TRL's PPO trainer / verl write it (per objective, per timestep);
  :func:`gae_python_loop_folded`: the same loop with the objectives folded into the batch (one loop
  over t for all n objectives), how a user with n objectives would write it.
* :func:`plain_ppo_loss`: the ordinary single-objective PPO loss in plain PyTorch (ratio, two clamps,
  dual clip, masked token mean): what ``pama_policy_loss`` computes with n = 1, noon=False,
  method="linear", whiten=False (:data:`PLAIN_PPO_OPTIONS`), and the strongest baseline a user
  would write for it (eager, or under torch.compile).
* :func:`plain_ppo_losses`: n ordinary single-objective PPO losses, the per-objective losses whose
  gradients full-gradient MGDA needs (the headline benchmark).
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch

from pama_ext import ops, reference
from pama_ext.vocab import METRIC_SCALARS


def reference_policy_loss_flat(logp, old_logp, advantages, mask):
    """reference.pama_policy_loss with the metrics packed into one new tensor (as the fused op
    returns them), for torch.compile.

    Why not return the metrics dict: with torch 2.13, when the compiled graph returns both
    ``loss`` and ``metrics["pg_loss"]`` (= ``pg_loss.detach()``, which aliases ``loss`` when
    ``beta_loss == 0``), the returned ``loss`` comes back without a grad_fn. Packing the metrics
    into a fresh tensor avoids the alias and computes the same values.
    """
    loss, m = reference.pama_policy_loss(logp, old_logp, advantages, mask)
    flat = torch.cat([torch.stack([m[k] for k in METRIC_SCALARS]), m["abar"], m["pos"], m["weights"]])
    return loss, flat


def reference_value_loss_flat(values, old_values, returns, mask):
    """reference.multi_value_loss with its metrics packed into one new tensor (same reason as
    :func:`reference_policy_loss_flat`)."""
    loss, m = reference.multi_value_loss(values, old_values, returns, mask)
    return loss, torch.cat([torch.atleast_1d(v.detach().float()).reshape(-1) for v in m.values()])


# the reference of each op family, run eagerly
EAGER: Dict[str, Callable] = {
    "policy_loss": reference.pama_policy_loss,
    "gae": reference.multi_gae,
    "value_loss": reference.multi_value_loss,
    "token_rewards": reference.token_rewards,
    "dpo_loss": reference.multi_dpo_loss,
}

# what torch.compile compiles for each op family (the eager reference, metrics packed where needed)
COMPILABLE: Dict[str, Callable] = dict(EAGER, policy_loss=reference_policy_loss_flat,
                                       value_loss=reference_value_loss_flat)


def compiled(op: str, dynamic: bool = False) -> Callable:
    """``torch.compile`` of the reference of ``op`` (call ``torch._dynamo.reset()`` before, for a
    fresh compile)."""
    return torch.compile(COMPILABLE[op], dynamic=dynamic)


def gae_python_loop(rewards, values, mask, gamma: float, lam: float):
    """GAE as TRL's PPO trainer / verl write it: for each objective separately, a Python loop
    over t in reverse on ``[B]`` slices, then ``torch.stack``.

    NOTE: like TRL, this loop does not skip masked positions (the reference and the fused op
    carry ``nextvalues``/``lastgaelam`` over masked tokens); its outputs therefore differ from
    theirs on rows with masked tokens. It is a speed baseline only, and is not checked.
    """
    del mask
    n, B, T = values.shape
    per_objective = []
    for i in range(n):
        lastgaelam = 0.0
        advantages_reversed = []
        for t in reversed(range(T)):
            nextvalues = values[i, :, t + 1] if t < T - 1 else 0.0
            delta = rewards[i, :, t] + gamma * nextvalues - values[i, :, t]
            lastgaelam = delta + gamma * lam * lastgaelam
            advantages_reversed.append(lastgaelam)
        per_objective.append(torch.stack(advantages_reversed[::-1], dim=1))
    advantages = torch.stack(per_objective)
    return advantages, advantages + values


def gae_python_loop_folded(rewards, values, mask, gamma: float, lam: float):
    """:func:`gae_python_loop` with the objectives folded into the batch: one Python loop over t on
    ``[n * B]`` slices (n times fewer launches). A speed baseline only, like the loop it folds."""
    del mask
    n, B, T = values.shape
    r = rewards.reshape(n * B, T)
    v = values.reshape(n * B, T)
    lastgaelam = 0.0
    advantages_reversed = []
    for t in reversed(range(T)):
        nextvalues = v[:, t + 1] if t < T - 1 else 0.0
        delta = r[:, t] + gamma * nextvalues - v[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1).reshape(n, B, T)
    return advantages, advantages + values


# the pama_policy_loss options under which it is the plain PPO loss (n = 1 advantages)
PLAIN_PPO_OPTIONS = dict(noon=False, method="linear", whiten=False)


def plain_ppo_loss(logp, old_logp, advantages, mask, eps_lo: float = 0.2, eps_hi: float = 0.2,
                   dual_clip: float = 3.0):
    """The plain PPO clipped surrogate with dual clip, masked token mean (verl's
    compute_policy_loss with agg "token-mean"); ``advantages`` is ``[1, B, T]`` or ``[B, T]``.
    Returns ``(loss,)`` like the other loss callables of the benchmarks. Same defaults as
    pama_policy_loss."""
    adv = advantages.reshape(logp.shape)
    m = mask.to(logp.dtype)
    ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1.0 - eps_lo, 1.0 + eps_hi)
    l12 = torch.maximum(l1, l2)
    l3 = torch.minimum(-adv * dual_clip, l12)
    per_token = torch.where(adv < 0, l3, l12)
    return ((per_token * m).sum() / m.sum().clamp(min=1.0),)


def plain_ppo_losses(logp, old_logp, advantages, mask) -> List[torch.Tensor]:
    """One ordinary PPO loss per objective (``pama_policy_loss`` with n = 1, linear, no Noon): the
    losses whose n gradients full-gradient MGDA combines."""
    return [ops.pama_policy_loss(logp, old_logp, advantages[i:i + 1], mask, noon=False, method="linear",
                                 check_finite=False)[0] for i in range(advantages.shape[0])]


def reference_mgda_weights(gram: torch.Tensor) -> torch.Tensor:
    """The min-norm weights of a Gram matrix by the reference (plain PyTorch) solver: the solver of the
    full-gradient MGDA baseline."""
    return reference.mgda_weights(gram)
