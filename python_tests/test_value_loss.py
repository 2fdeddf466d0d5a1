"""multi_value_loss and the MultiValueLoss module: the kernel against pama_ext.reference (float64
and the low-precision tolerance rule, DESIGN.md "Tests"), gradcheck, closed forms, the reference
against the spec, and the module against the functional op.

Opcheck, property tests and the bad-input cases shared by every op live in test_opcheck_compile.py,
test_properties.py and test_bad_input.py.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pama_ext
from pama_ext import ops, reference as ref
from op_runners import run_value_loss
from pama_testutils import (AGGS, GC, IMPLS, LOWP_DTYPES, NS, SHAPES, bad_input_batch, check_dtypes,
                            compare_all, expect_error, make_inputs, nonempty_mask, odd_mask, verl_agg)

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# multi_value_loss
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("agg", ref.AGG_MODES)
@pytest.mark.parametrize("clip", [0.2, 0.05, None])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n", NS)
def test_value_loss_f64(device, n, shape, clip, agg):
    x = make_inputs(n, *shape, seed=n * 5 + shape[1], mask="holes")
    got = run_value_loss(ops, x.to(device=device), clip, agg)
    check_dtypes(got, F64, device, acc_keys=["loss", "clipfrac", "head_loss"], io_keys=["grad_values"])
    want = run_value_loss(ref, x, clip, agg)
    compare_all(got, want)


# More rows than the finalize tree has lanes (pama_math.h kMergeLanes = 256), some fully masked:
# lanes with one, two or no rows, every aggregation.
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
@pytest.mark.parametrize("agg", ref.AGG_MODES)
def test_value_loss_many_rows(device, agg, dtype):
    x = make_inputs(3, 300, 9, dtype=dtype, seed=300, mask="holes")
    x.mask[::7] = False
    got = run_value_loss(ops, x.to(device=device), 0.2, agg)
    if dtype == F64:
        compare_all(got, run_value_loss(ref, x, 0.2, agg))
    else:
        compare_all(got, run_value_loss(ref, x.as64(), 0.2, agg), run_value_loss(ref, x, 0.2, agg), dtype)


@pytest.mark.parametrize("mask_kind", ["random", "full", "empty"])
def test_value_loss_masks_f64(device, mask_kind):
    x = make_inputs(3, 4, 2100, seed=9, mask=mask_kind)
    for agg in ref.AGG_MODES:
        compare_all(run_value_loss(ops, x.to(device=device), 0.2, agg), run_value_loss(ref, x, 0.2, agg))


@pytest.mark.parametrize("dtype", LOWP_DTYPES, ids=str)
@pytest.mark.parametrize("agg", ref.AGG_MODES)
@pytest.mark.parametrize("n", [2, 8])
def test_value_loss_lowp(native, device, n, agg, dtype):
    x = make_inputs(n, 5, 130, dtype=dtype, seed=n + 1)
    got = run_value_loss(ops, x.to(device=device), 0.2, agg)
    check_dtypes(got, dtype, device, acc_keys=["loss", "clipfrac", "head_loss"], io_keys=["grad_values"])
    compare_all(got, run_value_loss(ref, x.as64(), 0.2, agg), run_value_loss(ref, x, 0.2, agg), dtype)


@pytest.mark.parametrize("dtype", (F64, torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("n,B,T", [(1, 3, 2049), (3, 2, 4099), (2, 5, 2047), (5, 1, 6001)])
def test_value_loss_rows_of_several_chunks(native, device, n, B, T, dtype):
    """Rows of one chunk and of several (the CPU kernel's blocks), odd B and T, rows with holes and
    fully masked rows: forward and backward against the reference in every dtype."""
    x = make_inputs(n, B, T, dtype=dtype, seed=T + n, mask="holes")
    x.mask[B // 2] = False  # one row masked out entirely (seq-mean aggregation skips it)
    cases = [(0.2, "token-mean"), (0.05, "seq-mean-token-mean")]
    if dtype == F64:  # a token sum over thousands of tokens: in float32 its last bit exceeds the rule's floor
        cases.append((None, "seq-mean-token-sum"))
    for clip, agg in cases:
        got = run_value_loss(ops, x.to(device=device), clip, agg)
        check_dtypes(got, dtype, device, acc_keys=["loss", "clipfrac", "head_loss"], io_keys=["grad_values"])
        if dtype == F64:
            compare_all(got, run_value_loss(ref, x, clip, agg))
        else:
            compare_all(got, run_value_loss(ref, x.as64(), clip, agg), run_value_loss(ref, x, clip, agg), dtype)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.float64, torch.uint8], ids=str)
def test_value_loss_mask_dtypes_match_bool(device, dtype, mask_dtype):
    """A mask of any real dtype is nonzero = in (NaN and -2 in, -0.0 out): loss, metrics and gradient
    bitwise those of the bool mask (the CPU kernels read a float32 mask as it is), with and without
    the finite checks, over rows of several chunks."""
    x = make_inputs(3, 4, 2500, dtype=dtype, seed=21, mask="holes")
    x.mask[1] = False
    m = odd_mask(x.mask, mask_dtype)
    xd = x.to(device=device)
    want = run_value_loss(ops, xd, 0.2, "seq-mean-token-mean")
    for check_finite in (True, False):
        v = xd.values.clone().requires_grad_(True)
        loss, metrics = ops.multi_value_loss(v, xd.old_values, xd.returns, m.to(device), 0.2,
                                             "seq-mean-token-mean", check_finite)
        (g,) = torch.autograd.grad(loss * 0.6, v)
        assert torch.equal(loss, want["loss"]) and torch.equal(g, want["grad_values"])
        assert torch.equal(metrics["clipfrac"], want["clipfrac"])
        assert torch.equal(metrics["head_loss"], want["head_loss"])


def test_value_loss_float_mask_non_finite_is_named(device):
    """With a float32 mask (read by the kernel), a masked-in NaN is still an error naming the argument,
    and a masked-out one is ignored."""
    x = make_inputs(2, 3, 300, dtype=torch.float32, seed=22, mask="holes").to(device=device)
    m = x.mask.to(torch.float32)
    on, off = x.mask.nonzero()[-1], (~x.mask).nonzero()[0]
    returns = x.returns.clone()
    returns[(1,) + tuple(off)] = float("nan")
    loss, _ = ops.multi_value_loss(x.values, x.old_values, returns, m)
    assert torch.isfinite(loss)
    returns[(1,) + tuple(on)] = float("inf")
    expect_error("returns", ops.multi_value_loss, x.values, x.old_values, returns, m)


@pytest.mark.parametrize("clip,agg", [(0.2, "token-mean"), (None, "seq-mean-token-mean"), (0.1, "seq-mean-token-sum")])
def test_gradcheck_value_loss(clip, agg):
    x = make_inputs(3, 3, 7, seed=52, mask="holes")

    def f(values):
        return ops.multi_value_loss(values, x.old_values, x.returns, x.mask, clip=clip, agg=agg)[0]

    assert torch.autograd.gradcheck(f, (x.values.clone().requires_grad_(True),), **GC)


def test_value_loss_metrics_carry_no_gradient(device):
    x = make_inputs(2, 3, 11, seed=305).to(device=device)
    v = x.values.clone().requires_grad_(True)
    loss, m = ops.multi_value_loss(v, x.old_values, x.returns, x.mask)
    assert loss.requires_grad
    for k, t in m.items():
        assert not t.requires_grad, f"metric {k} carries a gradient"


# ----------------------------------------------------------------------------------------------
# value loss closed forms
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["ops", "reference"])
@pytest.mark.parametrize("agg", AGGS)
def test_value_loss_without_clip_is_half_mse(device, impl, agg):
    mod = IMPLS[impl]
    B, T = 5, 29
    x = make_inputs(3, B, T, seed=160)
    x.mask = nonempty_mask(B, T, 161)
    xd = x.to(device=device)
    for clip in (None, 1e9):
        v = xd.values.clone().requires_grad_(True)
        loss, m = mod.multi_value_loss(v, xd.old_values, xd.returns, xd.mask, clip=clip, agg=agg)
        loss.backward()
        vv = x.values.clone().requires_grad_(True)
        heads = torch.stack([0.5 * verl_agg((vv[i] - x.returns[i]) ** 2, x.mask, agg) for i in range(3)])
        heads.sum().backward()
        assert loss.item() == pytest.approx(heads.sum().item(), rel=1e-11)
        torch.testing.assert_close(m["head_loss"].cpu(), heads.detach(), rtol=1e-11, atol=0)
        torch.testing.assert_close(v.grad.cpu(), vv.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("impl", ["ops", "reference"])
def test_value_loss_without_clip_reports_no_clipping(impl):
    mod = IMPLS[impl]
    x = make_inputs(3, 5, 29, seed=160)
    _, m = mod.multi_value_loss(x.values, x.old_values, x.returns, x.mask, clip=None)
    assert m["clipfrac"].item() == 0.0


@pytest.mark.parametrize("impl", ["ops", "reference"])
def test_value_loss_clipped_verl(device, impl):
    """verl's clipped value loss: 0.5 * agg(max((V - R)^2, (clip(V) - R)^2)) per head, summed."""
    mod = IMPLS[impl]
    x = make_inputs(2, 4, 31, seed=162, mask="holes")
    xd = x.to(device=device)
    v = xd.values.clone().requires_grad_(True)
    loss, m = mod.multi_value_loss(v, xd.old_values, xd.returns, xd.mask, clip=0.2)
    loss.backward()
    vv = x.values.clone().requires_grad_(True)
    vpredclipped = torch.clamp(vv, x.old_values - 0.2, x.old_values + 0.2)
    l1 = (vv - x.returns) ** 2
    l2 = (vpredclipped - x.returns) ** 2
    per = torch.max(l1, l2)
    want = sum(0.5 * verl_agg(per[i], x.mask, "token-mean") for i in range(2))
    want.backward()
    mm = x.mask.to(F64)
    clipfrac = sum(((l2[i] > l1[i]).to(F64) * mm).sum() for i in range(2)) / (2 * mm.sum())
    assert loss.item() == pytest.approx(want.item(), rel=1e-11)
    torch.testing.assert_close(v.grad.cpu(), vv.grad, rtol=1e-10, atol=1e-14)
    assert m["clipfrac"].item() == pytest.approx(clipfrac.item(), rel=1e-12)
    assert 0 < m["clipfrac"].item() < 1


def test_value_loss_reference_matches_spec():
    x = make_inputs(3, 4, 11, seed=41, mask="holes")
    loss, m = ref.multi_value_loss(x.values, x.old_values, x.returns, x.mask, clip=0.2)
    tot, heads, clipped, cnt = 0.0, [], 0, 0
    for i in range(3):
        s, c = 0.0, 0
        for b in range(4):
            for t in range(11):
                if not x.mask[b, t]:
                    continue
                v, ov, r = x.values[i, b, t].item(), x.old_values[i, b, t].item(), x.returns[i, b, t].item()
                vc = ov + min(max(v - ov, -0.2), 0.2)
                l1, l2 = (v - r) ** 2, (vc - r) ** 2
                s += max(l1, l2)
                c += 1
                clipped += l2 > l1
                cnt += 1
        heads.append(0.5 * s / c)
    assert loss.item() == pytest.approx(sum(heads), rel=1e-12)
    torch.testing.assert_close(m["head_loss"], torch.tensor(heads, dtype=F64), rtol=1e-12, atol=0)
    assert m["clipfrac"].item() == pytest.approx(clipped / cnt, rel=1e-12)


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


@pytest.mark.usefixtures("path")  # native and fallback (conftest.py)
@pytest.mark.parametrize("value", ["mean", "sum", "token-sum"])
def test_unknown_agg_value_loss(device, value):
    x = bad_input_batch(device)
    expect_error("agg", ops.multi_value_loss, x.values, x.old_values, x.returns, x.mask, agg=value)
