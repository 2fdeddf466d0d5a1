"""OpenRLHF adapter: a drop-in replacement for ``openrlhf.models.loss.PolicyLoss`` with the PAMA path.

Same constructor arguments (clip range, dual clip, token- or sequence-level loss), same ``forward``
signature and the same return tuple ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``; OpenRLHF
is not imported (its package pulls in DeepSpeed and flash-attn at import time), so this works
wherever pama_ext does. The extra keyword arguments choose how the objectives are combined
(:func:`pama_ext.pama_policy_loss`).

Per-objective advantages: ``advantages`` of shape ``[B, T, n]``, batch-first with the objectives last,
because OpenRLHF's replay buffer splits and packs experience along the first dimension; ``[B, T]`` is
one objective. With ``noon=False, method="linear", whiten=False`` and ``[B, T]`` advantages the loss
is OpenRLHF's PPO loss.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ._common import check_pama_options, call_policy_loss, objectives_first, rescale_to_global, scalar_metrics

__all__ = ["PolicyLoss", "PamaPolicyLoss"]


class PolicyLoss(nn.Module):
    """PPO policy loss with the multi-objective PAMA combination (drop-in for OpenRLHF's ``PolicyLoss``).

    Args (OpenRLHF's): ``clip_eps_low``, ``clip_eps_high``, ``dual_clip`` (None disables; must be
    > 1), ``token_level_loss`` (token-mean if True, else mean over sequences of token means),
    ``policy_loss_type`` (``"ppo"`` only), ``is_correction_level`` (``"off"`` only; the rollout
    importance-sampling correction is not supported).

    Args (pama_ext's, keyword-only): ``method`` (``pama`` / ``linear`` / ``mgda``), ``granularity``
    (``token`` / ``sequence`` / ``batch``), ``noon``, ``whiten`` (off by default: OpenRLHF normalises
    advantages when it computes them), ``prefs`` (weights of ``linear``), ``group`` (a
    ``torch.distributed`` process group for global statistics; passed on only when set),
    ``check_finite``.

    After each call ``self.metrics`` holds the op's metrics as scalar device tensors
    (``pama/weights/<i>``, ``pama/abar/<i>``, ``pama/pos/<i>``, ``pama/active``, ...).
    """

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: Optional[float] = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        is_correction_level: str = "off",
        is_correction_mode: str = "mask",
        is_correction_gating: str = "ratio",
        is_correction_threshold: Any = (0.5, 5.0),
        *,
        method: str = "pama",
        granularity: str = "token",
        noon: bool = True,
        whiten: bool = False,
        prefs: Optional[Any] = None,
        group: Optional[Any] = None,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        del is_correction_mode, is_correction_gating, is_correction_threshold  # only meaningful when on
        if policy_loss_type != "ppo":
            raise ValueError(f"policy_loss_type: only 'ppo' is supported by the PAMA loss, got {policy_loss_type!r}")
        if is_correction_level != "off":
            raise ValueError(
                f"is_correction_level: the rollout importance-sampling correction is not supported by the PAMA "
                f"loss; use 'off', got {is_correction_level!r}"
            )
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"dual_clip: must be > 1.0, got {dual_clip}")
        self.clip_eps_low = float(clip_eps_low)
        self.clip_eps_high = float(clip_eps_high)
        self.dual_clip = dual_clip
        self.token_level_loss = bool(token_level_loss)
        self.policy_loss_type = policy_loss_type
        self.method, self.granularity, self.noon, self.whiten = method, granularity, bool(noon), bool(whiten)
        self.register_buffer("prefs", check_pama_options(method, granularity, prefs), persistent=False)
        self.group = group
        self.check_finite = bool(check_finite)
        self.metrics: Dict[str, Tensor] = {}

    def extra_repr(self) -> str:
        return (f"clip_eps_low={self.clip_eps_low}, clip_eps_high={self.clip_eps_high}, dual_clip={self.dual_clip}, "
                f"token_level_loss={self.token_level_loss}, method={self.method!r}, "
                f"granularity={self.granularity!r}, noon={self.noon}, whiten={self.whiten}")

    def forward(
        self,
        log_probs: Tensor,
        old_log_probs: Tensor,
        advantages: Tensor,
        action_mask: Optional[Tensor] = None,
        rollout_log_probs: Optional[Tensor] = None,
        dp_size: int = 1,
        batch_num_tokens: Optional[float] = None,
        global_batch_size: Optional[float] = None,
    ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        del rollout_log_probs  # only used by the importance-sampling correction, which is off
        if action_mask is None:
            action_mask = torch.ones(log_probs.shape, dtype=torch.bool, device=log_probs.device)
        adv = objectives_first(advantages, action_mask, "objectives last, as OpenRLHF's experience carries them")
        n = adv.shape[0]
        agg = "token-mean" if self.token_level_loss else "seq-mean-token-mean"
        loss, metrics = call_policy_loss(
            log_probs, old_log_probs, adv, action_mask, None, self.group,
            eps_lo=self.clip_eps_low, eps_hi=self.clip_eps_high, dual_clip=self.dual_clip, noon=self.noon,
            whiten=self.whiten, method=self.method, granularity=self.granularity, prefs=self.prefs, agg=agg,
            check_finite=self.check_finite,
        )
        loss = rescale_to_global(loss, action_mask, agg, dp_size=dp_size, batch_num_tokens=batch_num_tokens,
                                 global_batch_size=global_batch_size, group=self.group)
        self.metrics = scalar_metrics(metrics, "pama/", n)
        return loss, metrics["clipfrac"].detach(), metrics["approx_kl"].detach(), None, None


#: The same class under a name that does not shadow OpenRLHF's when both are imported.
PamaPolicyLoss = PolicyLoss
