"""nn.Module front ends (PamaPolicyLoss, MultiValueLoss) against the functional ops."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pama_ext
from pama_ext import ops
from pama_testutils import make_inputs

F64 = torch.float64


def _policy_functional(x, ref_logp=None, **kw):
    logp = x.logp.clone().requires_grad_(True)
    loss, m = ops.pama_policy_loss(logp, x.old_logp, x.advantages, x.mask, ref_logp, **kw)
    loss.backward()
    return loss, m, logp.grad


def _policy_module(mod, x, ref_logp=None):
    logp = x.logp.clone().requires_grad_(True)
    loss, m = mod(logp, x.old_logp, x.advantages, x.mask, ref_logp)
    loss.backward()
    return loss, m, logp.grad


def _assert_same(a, b):
    (la, ma, ga), (lb, mb, gb) = a, b
    assert torch.equal(la, lb)
    assert torch.equal(ga, gb)
    assert set(ma) == set(mb)
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k


@pytest.mark.parametrize("kw", [
    dict(),
    dict(method="pama", granularity="sequence", agg="seq-mean-token-mean"),
    dict(method="mgda", granularity="batch", agg="seq-mean-token-sum", noon=False),
    dict(method="linear", whiten=False, eps_lo=0.1, eps_hi=0.3, dual_clip=2.0),
    dict(method="pama", granularity="batch", beta_loss=0.2),
], ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()) or "default")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_policy_module_matches_functional(device, kw, dtype):
    x = make_inputs(3, 4, 23, seed=201, mask="holes").to(dtype, device)
    ref_logp = x.ref_logp if kw.get("beta_loss") else None
    mod = pama_ext.PamaPolicyLoss(**kw)
    assert isinstance(mod, nn.Module)
    _assert_same(_policy_module(mod, x, ref_logp), _policy_functional(x, ref_logp, **kw))


def test_policy_module_with_prefs(device):
    x = make_inputs(3, 4, 23, seed=202, mask="holes").to(device=device)
    prefs = torch.tensor([0.5, 0.2, 0.3], dtype=F64)
    mod = pama_ext.PamaPolicyLoss(method="linear", prefs=prefs)
    _assert_same(_policy_module(mod, x), _policy_functional(x, method="linear", prefs=prefs.to(device)))
    # the prefs follow the module (and the inputs) to the device / dtype
    x32 = x.to(torch.float32)
    _assert_same(_policy_module(mod, x32),
                 _policy_functional(x32, method="linear", prefs=prefs.to(device, torch.float32)))


def test_policy_module_defaults_match_functional_defaults(device):
    x = make_inputs(2, 3, 17, seed=203).to(device=device)
    _assert_same(_policy_module(pama_ext.PamaPolicyLoss(), x), _policy_functional(x))


def test_policy_module_has_no_parameters_and_reprs():
    mod = pama_ext.PamaPolicyLoss(method="mgda", agg="seq-mean-token-sum")
    assert list(mod.parameters()) == []
    r = repr(mod)
    assert "mgda" in r and "seq-mean-token-sum" in r
    assert mod.state_dict() == {} or all(not v.requires_grad for v in mod.state_dict().values())


def test_policy_module_bad_option_is_an_error():
    x = make_inputs(2, 3, 7, seed=204)
    with pytest.raises((RuntimeError, ValueError), match="method"):
        pama_ext.PamaPolicyLoss(method="nope")(x.logp, x.old_logp, x.advantages, x.mask)


@pytest.mark.parametrize("clip,agg", [(0.2, "token-mean"), (None, "seq-mean-token-mean"), (0.05, "seq-mean-token-sum")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_value_module_matches_functional(device, clip, agg, dtype):
    x = make_inputs(3, 4, 23, seed=205, mask="holes").to(dtype, device)
    mod = pama_ext.MultiValueLoss(clip=clip, agg=agg)
    assert isinstance(mod, nn.Module) and list(mod.parameters()) == []
    v1 = x.values.clone().requires_grad_(True)
    l1, m1 = mod(v1, x.old_values, x.returns, x.mask)
    l1.backward()
    v2 = x.values.clone().requires_grad_(True)
    l2, m2 = ops.multi_value_loss(v2, x.old_values, x.returns, x.mask, clip=clip, agg=agg)
    l2.backward()
    assert torch.equal(l1, l2) and torch.equal(v1.grad, v2.grad)
    assert set(m1) == set(m2) == {"clipfrac", "head_loss"}
    for k in m1:
        assert torch.equal(m1[k], m2[k]), k


def test_value_module_defaults():
    x = make_inputs(2, 3, 9, seed=206)
    l1, _ = pama_ext.MultiValueLoss()(x.values, x.old_values, x.returns, x.mask)
    l2, _ = ops.multi_value_loss(x.values, x.old_values, x.returns, x.mask)
    assert torch.equal(l1, l2)


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
