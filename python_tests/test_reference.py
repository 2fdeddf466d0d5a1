"""Self-checks of pama_ext.reference against docs/algorithms.md, independent of the compiled kernels.

The reference is the ground truth of every other test, so here it is checked against brute force
and against per-element Python loops written from the docs/algorithms.md formulas. What is left
here is the aggregation shared by the policy and value losses; the per-op reference checks (GAE,
token rewards, Theorem 1, statistics, MGDA, the losses) live in the per-op files.
"""
from __future__ import annotations

import pytest
import torch

from pama_ext import reference as ref
from pama_testutils import make_mask

F64 = torch.float64


def agg_loop(loss, mask, agg):
    B, T = mask.shape
    rows = [[loss[b, t].item() for t in range(T) if mask[b, t]] for b in range(B)]
    rows_ne = [r for r in rows if r]
    if agg == "token-mean":
        tot = sum(len(r) for r in rows)
        return sum(sum(r) for r in rows) / tot if tot else 0.0
    if not rows_ne:
        return 0.0
    if agg == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in rows_ne) / len(rows_ne)
    return sum(sum(r) for r in rows_ne) / len(rows_ne)


@pytest.mark.parametrize("agg", ref.AGG_MODES)
@pytest.mark.parametrize("mask_kind", ["random", "holes", "empty", "full"])
def test_agg_loss_reference(agg, mask_kind):
    g = torch.Generator().manual_seed(6)
    loss = torch.randn(5, 13, generator=g, dtype=F64)
    mask = make_mask(5, 13, g, mask_kind)
    got = ref.agg_loss(loss, mask, agg)
    assert got.item() == pytest.approx(agg_loop(loss, mask, agg), rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError, match="agg"):
        ref.agg_loss(loss, mask, "mean")
