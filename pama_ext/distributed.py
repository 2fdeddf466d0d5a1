"""Data parallelism for the batch-statistic ops (algorithms §8).

When a batch is sharded over the ranks of a ``torch.distributed`` process group, every statistic of
algorithms §3 and every aggregation denominator of §4-§5 must be taken over the *global* batch. The ops of
:mod:`pama_ext.ops` accept ``group=`` and then run these steps, all on device (no host read):

1. **Moments** (count, sequence count, mean, variance per objective): each rank computes its own
   (``objective_moments``), the ranks' vectors are all-gathered and combined in rank order with the
   pairwise (Chan) update, so every rank holds the same global moments. A gather, rather than an
   all-reduce of sums of squares, keeps the variance accurate when the mean is large.
2. **Indicators** (ā, pos, token/sequence weights, Gram): each rank whitens with the global moments
   and divides its sums by the global counts (``objective_stats(..., moments=...)``), so one
   all-reduce (sum) of that flat vector gives the global statistics.
3. **Loss**: the op runs on the rank's shard with the global statistics (global weights, global
   token and sequence counts as denominators), which makes its loss and metric sums this shard's
   share of the global ones; one more all-reduce of those few scalars returns the global values.

Whitening makes step 2 depend on step 1, so two collectives precede the loss (algorithms §8's "one
all-reduce" holds only without whitening; see docs/distributed.md). The returned loss has the global
value on every rank, and its gradient with respect to a rank's inputs is the gradient of the global
loss with respect to that shard: the shards' gradients concatenated equal the gradient of one
process holding the whole batch. Under DistributedDataParallel, which averages gradients over the
ranks, multiply the loss by :func:`ddp_loss_scale` (the world size) to keep that equality.

Without a group nothing here runs and torch.distributed is never imported.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

__all__ = [
    "world_size",
    "ddp_loss_scale",
    "combine_moments",
    "all_reduce_sum",
    "all_gather_rows",
    "global_denominators",
    "with_global_value",
]


def _dist():
    import torch.distributed as dist

    return dist


def world_size(group: Optional[Any]) -> int:
    """Number of ranks in ``group`` (1 without a group)."""
    return 1 if group is None else _dist().get_world_size(group)


def ddp_loss_scale(group: Optional[Any] = None) -> float:
    """Factor for a global-batch loss under DDP gradient averaging: the world size (1 without a group)."""
    if group is None:
        dist = _dist()
        return float(dist.get_world_size()) if dist.is_available() and dist.is_initialized() else 1.0
    return float(world_size(group))


def all_reduce_sum(x: Tensor, group: Any) -> Tensor:
    """Sum of ``x`` over the ranks of ``group`` (a new tensor; ``x`` is left as it is)."""
    out = x.detach().clone()
    _dist().all_reduce(out, op=_dist().ReduceOp.SUM, group=group)
    return out


def all_gather_rows(x: Tensor, group: Any) -> Tensor:
    """``[k, len(x)]``: row r is rank r's ``x`` (a flat vector of the same length on every rank)."""
    dist = _dist()
    x = x.detach().contiguous()
    k = dist.get_world_size(group)
    out = x.new_empty((k * x.numel(),))  # flat: the layout every backend accepts
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # newer torch renamed it
    gather(out, x.reshape(-1), group=group)
    return out.view(k, x.numel())


def combine_moments(rows: Tensor) -> Tensor:
    """Global ``[count, num_seqs, mean(n), var(n)]`` from per-shard rows of the same layout.

    Pairwise combination: ``mean = Σ c_r mean_r / C`` and ``M2 = Σ (M2_r + c_r (mean_r - mean)^2)``
    with ``M2_r = var_r (c_r - 1)``; the variance is unbiased (``M2 / (C - 1)``, 0 when ``C <= 1``),
    as in the single-process statistics. Every rank evaluates it on the same rows in the same
    order, so all ranks hold bitwise the same result.
    """
    n = (rows.shape[1] - 2) // 2
    c = rows[:, 0:1]
    mean_r = rows[:, 2 : 2 + n]
    var_r = rows[:, 2 + n : 2 + 2 * n]
    count = c.sum(0)
    mean = (c * mean_r).sum(0) / count.clamp_min(1)
    m2_r = torch.where(c > 1, var_r * (c - 1), torch.zeros_like(var_r))
    m2 = (m2_r + c * (mean_r - mean) ** 2).sum(0)
    var = torch.where(count > 1, m2 / (count - 1).clamp_min(1), torch.zeros_like(m2))
    return torch.cat([count, rows[:, 1].sum(0, keepdim=True), mean, var])


def global_denominators(mask: Tensor, acc: torch.dtype, group: Any) -> Tensor:
    """Global ``[token count, sequence count]`` (rows with at least one token) of a sharded mask."""
    m = mask != 0
    local = torch.stack([m.sum(), m.any(-1).sum()]).to(acc)
    return all_reduce_sum(local, group)


def with_global_value(local: Tensor, total: Tensor) -> Tensor:
    """A scalar whose value is ``total`` and whose gradient is that of ``local``."""
    return total + (local - local.detach())
