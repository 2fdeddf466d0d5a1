"""nn.Module front ends of the fused losses."""
from __future__ import annotations

import inspect
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from . import ops


def policy_loss_options() -> Dict[str, Any]:
    """The options of :func:`pama_ext.ops.pama_policy_loss` with their defaults, read from its signature
    (its keyword-only parameters but ``prefs`` and ``group``): the one list the module front end and
    the adapters take."""
    sig = inspect.signature(ops.pama_policy_loss)
    return {k: p.default for k, p in sig.parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in ("prefs", "group")}


def check_policy_loss_options(caller: str, options: Dict[str, Any]) -> None:
    """Raise a TypeError naming the keys of ``options`` that are not options of
    :func:`pama_ext.ops.pama_policy_loss` (:func:`policy_loss_options`)."""
    known = policy_loss_options()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"{caller}: unknown option(s) {unknown}; the options of pama_policy_loss are "
                        f"{sorted(known)} (and prefs, group)")


class PamaPolicyLoss(nn.Module):
    """Multi-objective Noon-PPO / PAMA policy loss as a module.

    The constructor takes the keyword options of :func:`pama_ext.ops.pama_policy_loss`; ``forward``
    takes the tensors and returns ``(loss, metrics)``.

    Example::

        loss_fn = PamaPolicyLoss(method="pama", granularity="token")
        loss, metrics = loss_fn(logp, old_logp, advantages, mask)
        loss.backward()
    """

    def __init__(self, *, prefs: Optional[Tensor] = None, group: Optional[Any] = None, **options: Any) -> None:
        super().__init__()
        check_policy_loss_options("PamaPolicyLoss", options)
        known = policy_loss_options()
        self.group = group  # torch.distributed process group of a sharded batch (docs/distributed.md)
        self.options = {**known, **options}
        self.register_buffer("prefs", None if prefs is None else torch.as_tensor(prefs), persistent=False)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())

    def forward(
        self,
        logp: Tensor,
        old_logp: Tensor,
        advantages: Tensor,
        mask: Tensor,
        ref_logp: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Dict[str, Tensor]]:
        prefs = self.prefs
        if prefs is not None:
            prefs = prefs.to(device=logp.device, dtype=logp.dtype)
        return ops.pama_policy_loss(logp, old_logp, advantages, mask, ref_logp, prefs=prefs, group=self.group,
                                    **self.options)


class MultiValueLoss(nn.Module):
    """Clipped value loss summed over n value heads, as a module (see :func:`pama_ext.ops.multi_value_loss`)."""

    def __init__(self, clip: Optional[float] = 0.2, agg: str = "token-mean", check_finite: bool = True,
                 group: Optional[Any] = None) -> None:
        super().__init__()
        self.clip, self.agg, self.check_finite, self.group = clip, agg, check_finite, group

    def extra_repr(self) -> str:
        return f"clip={self.clip!r}, agg={self.agg!r}"

    def forward(
        self, values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor
    ) -> Tuple[Tensor, Dict[str, Tensor]]:
        return ops.multi_value_loss(values, old_values, returns, mask, self.clip, self.agg, self.check_finite,
                                    group=self.group)
