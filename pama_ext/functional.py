"""Runtime helpers of the ops' math, used by the op entry points, the trainers and the adapters as
well as by the reference implementation: masks, aggregation (verl's ``agg_loss`` semantics), the
k3 KL estimator, masked moments and whitening. Plain PyTorch, any floating dtype, no host read.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .vocab import AGG_MODES, WHITEN_EPS

__all__ = ["float_mask", "acc_dtype", "zero_padding", "last_valid_onehot", "agg_loss", "k3_kl", "masked_moments",
           "whiten_with", "masked_whiten"]


def float_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """``mask != 0`` as 0/1 in ``dtype``."""
    return (mask != 0).to(dtype)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the ops: float64 for float64 inputs, float32 for every other float."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def zero_padding(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` with 0 on the masked-out positions of ``mask`` ([B, T], broadcast over leading dims).

    A select, not a product: NaN/Inf padding times 0 is still NaN, and it would leak into the
    sums (and, through the backward of a product, into the gradients). Every function below that
    takes [B, T]-shaped data (here and in pama_ext.reference) passes it through here first, so padding never matters (algorithms §9).
    """
    return torch.where(mask != 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def last_valid_onehot(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, T] one-hot of the last masked-in position of each row (all zero for an empty row)."""
    m = mask != 0
    T = m.shape[-1]
    pos = torch.arange(T, device=m.device).expand_as(m)
    last = torch.where(m, pos, torch.full_like(pos, -1)).amax(-1)  # -1 for an empty row
    return (pos == last.unsqueeze(-1)).to(dtype)


def agg_loss(loss_mat: Tensor, mask: Tensor, agg: str) -> Tensor:
    """verl's ``agg_loss`` over [..., B, T] (leading dims summed), fully masked rows excluded.

    Sequences with no masked-in token are left out of the sequence count (docs/algorithms.md §4), so
    an empty row never produces 0/0; a fully masked batch aggregates to 0.
    """
    m = float_mask(mask, loss_mat.dtype)
    row_sum = zero_padding(loss_mat, mask).sum(-1)  # [..., B]
    row_cnt = m.sum(-1)  # [B]
    if agg == "token-mean":
        return row_sum.sum(-1) / row_cnt.sum().clamp(min=1)
    nseq = (row_cnt > 0).to(loss_mat.dtype).sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        return (row_sum / row_cnt.clamp(min=1)).sum(-1) / nseq
    if agg == "seq-mean-token-sum":
        return row_sum.sum(-1) / nseq
    raise ValueError(f"agg: expected one of {AGG_MODES}, got {agg!r}")


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi_theta || pi_ref): exp(ref - logp) - (ref - logp) - 1 (algorithms §4)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def masked_moments(advantages: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(count, mean [n], var [n]) of each objective over the masked tokens (algorithms §3: unbiased
    variance, 0 when count <= 1).

    Scaled as the kernels (pama_math.h moments_chunk_scales): the mean sums a / count and the
    variance sums (d / sqrt(count - 1))^2, so no partial sum exceeds the result (a plain sum of d^2
    overflows float32 for |d| ~ 1e19 although the variance fits; +inf only when it does not).
    """
    count = float_mask(mask, advantages.dtype).sum()
    a = zero_padding(advantages, mask)
    mean = (a * (1 / count.clamp(min=1))).sum((1, 2))
    d = zero_padding(a - mean[:, None, None], mask) * torch.rsqrt((count - 1).clamp(min=1))
    var = d.square().sum((1, 2))
    return count, mean, torch.where(count > 1, var, torch.zeros_like(var))


def whiten_with(advantages: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """Â = (A - mean) / sqrt(var + 1e-8) per objective, with given moments ``[n]`` (mean not added back)."""
    mean, var = mean.to(advantages.dtype), var.to(advantages.dtype)
    return (advantages - mean[:, None, None]) / torch.sqrt(var + WHITEN_EPS)[:, None, None]


def masked_whiten(advantages: Tensor, mask: Tensor) -> Tensor:
    """Â = (A - mean) / sqrt(var + 1e-8) per objective over the masked tokens (mean not added back)."""
    _, mean, var = masked_moments(advantages, mask)
    return whiten_with(advantages, mean, var)
