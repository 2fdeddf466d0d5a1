"""nn.Module front ends of the fused losses."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from . import ops
from .vocab import CAGRAD_C


class PamaPolicyLoss(nn.Module):
    """Multi-objective Noon-PPO / PAMA policy loss as a module.

    The constructor takes the keyword options of :func:`pama_ext.ops.pama_policy_loss`; ``forward``
    takes the tensors and returns ``(loss, metrics)``.

    Example::

        loss_fn = PamaPolicyLoss(method="pama", granularity="token")
        loss, metrics = loss_fn(logp, old_logp, advantages, mask)
        loss.backward()
    """

    def __init__(
        self,
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
    ) -> None:
        super().__init__()
        self.group = group  # torch.distributed process group of a sharded batch (docs/distributed.md)
        self.options = dict(
            eps_lo=eps_lo, eps_hi=eps_hi, dual_clip=dual_clip, noon=noon, whiten=whiten, method=method,
            granularity=granularity, agg=agg, beta_loss=beta_loss, check_finite=check_finite, cagrad_c=cagrad_c,
        )
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
