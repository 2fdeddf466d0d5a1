"""Helpers shared by the framework adapters (no framework imports here)."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
from torch import Tensor

from .. import ops
from ..vocab import AGG_MODES, GRANULARITIES, METHODS

#: The options of :func:`pama_ext.pama_policy_loss` that select the multi-objective combination.
PAMA_OPTION_NAMES = ("method", "granularity", "noon", "whiten", "prefs", "check_finite")


def check_pama_options(method: str, granularity: str, prefs: Optional[Any]) -> Optional[Tensor]:
    """Validate the combination options early (at construction), with errors naming the argument."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity: expected one of {GRANULARITIES}, got {granularity!r}")
    if prefs is None:
        return None
    p = torch.as_tensor(prefs, dtype=torch.float32)
    if p.dim() != 1 or p.numel() == 0:
        raise ValueError(f"prefs: expected a 1-D sequence of objective weights, got shape {tuple(p.shape)}")
    return p


def objectives_first(advantages: Tensor, mask: Tensor, layout_hint: str) -> Tensor:
    """``[n, B, T]`` (contiguous) from framework-side advantages ``[B, T]`` or ``[B, T, n]``.

    Framework batches are split, shuffled and packed along their first dimension, so per-objective
    advantages travel batch-first with the objectives last; the fused ops want them objective-first.
    """
    if not isinstance(advantages, Tensor):
        raise TypeError(f"advantages: expected a tensor, got {type(advantages).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"mask: expected [B, T], got shape {tuple(mask.shape)}")
    bt = tuple(mask.shape)
    if advantages.dim() == 2 and tuple(advantages.shape) == bt:
        return advantages.unsqueeze(0)
    if advantages.dim() == 3 and tuple(advantages.shape[:2]) == bt:
        return advantages.movedim(-1, 0).contiguous()
    hint = ""
    if advantages.dim() == 3 and tuple(advantages.shape[1:]) == bt:
        hint = ("; this looks objective-first [n, B, T] (as pama_ext.multi_gae returns it): "
                "store advantages.permute(1, 2, 0) instead")
    raise ValueError(
        f"advantages: expected [B, T] (one objective) or [B, T, n] ({layout_hint}) with [B, T] = {list(bt)} "
        f"matching the mask, got shape {tuple(advantages.shape)}{hint}"
    )


def loss_call_options(advantages: Tensor, like: Tensor, group: Optional[Any], prefs: Optional[Tensor] = None,
                      **options) -> Dict[str, Any]:
    """The keyword options of ``pama_ext.pama_policy_loss`` (and of ``pama_ext.fused_linear_policy_loss``,
    which takes the same): ``options`` plus ``prefs`` (as :func:`check_pama_options` returns it; it must
    have one weight per objective of the ``[n, B, T]`` advantages and is moved to ``like``'s device and
    dtype) and ``group=`` only when a process group is configured."""
    if prefs is not None:
        n = advantages.shape[0]
        if prefs.numel() != n:
            raise ValueError(f"prefs: {prefs.numel()} weights for {n} objectives in advantages")
        prefs = prefs.to(device=like.device, dtype=like.dtype)
    options["prefs"] = prefs
    if group is not None:
        options["group"] = group
    return options


def call_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                     ref_logp: Optional[Tensor], group: Optional[Any], prefs: Optional[Tensor] = None,
                     **options) -> tuple:
    """``pama_ext.pama_policy_loss`` with the options of :func:`loss_call_options`."""
    options = loss_call_options(advantages, logp, group, prefs, **options)
    return ops.pama_policy_loss(logp, old_logp, advantages, mask, ref_logp, **options)


def _count(mask: Tensor, per_sequence: bool, dtype: torch.dtype) -> Tensor:
    m = mask != 0
    return (m.any(-1) if per_sequence else m).sum().to(dtype)


def rescale_to_global(loss: Tensor, mask: Tensor, agg: str, *, dp_size: Any = 1,
                      batch_num_tokens: Any = None, global_batch_size: Any = None,
                      group: Optional[Any] = None) -> Tensor:
    """Turn the op's mean into the frameworks' global-batch normalisation, on device.

    The op returns ``S / D``: a masked sum over this shard (over the group's shards when ``group`` is
    given) divided by the token count (``token-mean``) or non-empty sequence count (``seq-mean-*``)
    of the same data. verl and OpenRLHF instead want ``S / D_global * dp_size``, where ``D_global``
    (``batch_num_tokens`` or ``global_batch_size``) counts the whole mini-batch over every micro-batch
    and rank and ``dp_size`` undoes the gradient averaging over data-parallel ranks. Without
    ``D_global`` they want the local mean (``dp_size`` must then be 1) -- or, with a group, the group
    mean times the group size for the same reason.
    """
    per_seq = agg != "token-mean"
    global_count = global_batch_size if per_seq else batch_num_tokens
    if global_count is None:
        if group is None:
            if not _is_one(dp_size):
                raise ValueError(
                    f"{'global_batch_size' if per_seq else 'batch_num_tokens'}: required when dp_size > 1 "
                    f"(got dp_size={dp_size})"
                )
            return loss
        import torch.distributed as dist

        return loss * float(dist.get_world_size(group))
    current = _count(mask, per_seq, loss.dtype)
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(current, op=dist.ReduceOp.SUM, group=group)
    denom = torch.as_tensor(global_count, dtype=loss.dtype, device=loss.device)
    return loss * (current / denom) * _as_scale(dp_size, loss)


def _is_one(x: Any) -> bool:
    # a tensor dp_size is not read back to the host (no synchronisation); only numbers are checked
    return isinstance(x, Tensor) or x == 1


def _as_scale(x: Any, like: Tensor) -> Any:
    if isinstance(x, Tensor):
        return x.to(device=like.device, dtype=like.dtype)
    return float(x)


def scalar_metrics(metrics: Mapping[str, Tensor], prefix: str, n: int) -> Dict[str, Tensor]:
    """Flatten the op's metrics into scalar device tensors (one key per objective for the vectors)."""
    out: Dict[str, Tensor] = {}
    for key in ("pg_loss", "kl_loss", "clipfrac", "approx_kl", "active"):
        out[f"{prefix}{key}"] = metrics[key].detach()
    for key in ("weights", "abar", "pos"):
        vec = metrics[key].detach()
        for i in range(n):
            out[f"{prefix}{key}/{i}"] = vec[i]
    return out


def check_agg(agg: str, allowed=AGG_MODES) -> str:
    if agg not in allowed:
        raise ValueError(f"loss_agg_mode: expected one of {tuple(allowed)}, got {agg!r}")
    return agg
