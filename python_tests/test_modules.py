"""nn.Module front ends (PamaPolicyLoss, MultiValueLoss) together in a training step; each module
against its functional op lives in test_policy_loss.py / test_value_loss.py."""
from __future__ import annotations

import torch
from torch import nn

import pama_ext
from pama_ext import ops
from pama_testutils import make_inputs

F64 = torch.float64


def test_modules_compose_in_a_training_step(device):
    """Both modules inside a tiny model: gradients reach the parameters, and equal the functional ones."""
    torch.manual_seed(0)
    x = make_inputs(2, 4, 12, seed=207, mask="holes").to(device=device)
    head = nn.Linear(3, 3, dtype=F64).to(device)
    feats = torch.randn(4, 12, 3, dtype=F64, device=device)

    def step(use_modules):
        head.zero_grad()
        out = head(feats)  # [B, T, 3]: logp offset and two value heads
        logp = x.old_logp + 0.1 * out[..., 0]
        values = out[..., 1:].permute(2, 0, 1)  # [2, B, T], non-contiguous
        if use_modules:
            pl, _ = pama_ext.PamaPolicyLoss(granularity="sequence")(logp, x.old_logp, x.advantages, x.mask)
            vl, _ = pama_ext.MultiValueLoss()(values, x.old_values, x.returns, x.mask)
        else:
            pl, _ = ops.pama_policy_loss(logp, x.old_logp, x.advantages, x.mask, granularity="sequence")
            vl, _ = ops.multi_value_loss(values, x.old_values, x.returns, x.mask)
        (pl + 0.5 * vl).backward()
        return [p.grad.clone() for p in head.parameters()]

    a, b = step(True), step(False)
    for ga, gb in zip(a, b):
        assert torch.isfinite(ga).all() and ga.abs().sum() > 0
        assert torch.equal(ga, gb)
