"""multi_gae: the kernel against pama_ext.reference (float64 and the low-precision tolerance rule,
DESIGN.md "Tests"), gradcheck, closed forms, the reference against a Python loop, and the
GAE-specific bad-input cases.

Opcheck and the bad-input cases shared by every op live in test_opcheck_compile.py and
test_bad_input.py (one parametrisation over all ops).
"""
from __future__ import annotations

import pytest
import torch

from pama_ext import ops, reference as ref
from op_runners import run_multi_gae
from pama_testutils import (BAD_UNIT, GC, IMPLS, LOWP_DTYPES, NS, SHAPES, bad_input_batch, check_dtypes,
                            compare_all, expect_error, make_inputs)

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# multi_gae
# ----------------------------------------------------------------------------------------------
GAE_PARAMS = [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)]


@pytest.mark.parametrize("gamma,lam", GAE_PARAMS)
@pytest.mark.parametrize("mask_kind", ["random", "holes"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n", NS)
def test_multi_gae_f64(device, n, shape, mask_kind, gamma, lam):
    x = make_inputs(n, *shape, seed=n * 11 + shape[1], mask=mask_kind)
    got = run_multi_gae(ops, x.to(device=device), gamma, lam)
    check_dtypes(got, F64, device, io_keys=["advantages", "returns", "grad_rewards", "grad_values"])
    compare_all(got, run_multi_gae(ref, x, gamma, lam))


@pytest.mark.parametrize("only", ["advantages", "returns"])
def test_multi_gae_single_output_grad(device, only):
    x = make_inputs(3, 3, 47, seed=5, mask="holes")
    got = run_multi_gae(ops, x.to(device=device), 0.99, 0.9, only=only)
    compare_all(got, run_multi_gae(ref, x, 0.99, 0.9, only=only))


@pytest.mark.parametrize("mask_kind", ["full", "empty"])
def test_multi_gae_full_and_empty_mask(device, mask_kind):
    x = make_inputs(3, 4, 33, seed=6, mask=mask_kind)
    got = run_multi_gae(ops, x.to(device=device))
    compare_all(got, run_multi_gae(ref, x))


@pytest.mark.parametrize("dtype", LOWP_DTYPES, ids=str)
@pytest.mark.parametrize("n", [2, 8])
def test_multi_gae_lowp(native, device, n, dtype):
    x = make_inputs(n, 5, 130, dtype=dtype, seed=4, mask="holes")
    got = run_multi_gae(ops, x.to(device=device), 0.99, 0.95)
    check_dtypes(got, dtype, device, io_keys=["advantages", "returns", "grad_rewards", "grad_values"])
    compare_all(got, run_multi_gae(ref, x.as64(), 0.99, 0.95), run_multi_gae(ref, x, 0.99, 0.95), dtype)


# Shapes for kernels that scan several sequences at once in blocks of timesteps (a vector of 8 float32
# or 4 float64 lanes): T around and below a block, n * B (here 3 * 5 = 15) not a multiple of the lane
# count; "holes" has an all-masked-out row.
@pytest.mark.parametrize("T", [1, 7, 9, 255, 257])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_multi_gae_partial_blocks_and_groups(device, dtype, T):
    x = make_inputs(3, 5, T, dtype=dtype, seed=300 + T, mask="holes")
    got = run_multi_gae(ops, x.to(device=device), 0.99, 0.95)
    check_dtypes(got, dtype, device, io_keys=["advantages", "returns", "grad_rewards", "grad_values"])
    if dtype == F64:
        compare_all(got, run_multi_gae(ref, x, 0.99, 0.95))
    else:
        compare_all(got, run_multi_gae(ref, x.as64(), 0.99, 0.95), run_multi_gae(ref, x, 0.99, 0.95), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_multi_gae_sequence_independent_of_its_position(device, dtype):
    """A sequence's advantages, returns and gradients are bitwise the same wherever it sits in the
    batch (whichever task, chunk or vector lane scans it): the rows rolled by 3 give the rolled results."""
    x = make_inputs(3, 7, 37, dtype=dtype, seed=301, mask="holes")
    g = torch.Generator().manual_seed(302)
    up = [torch.randn(3, 7, 37, generator=g, dtype=dtype) for _ in range(2)]  # dL/dA, dL/dreturns

    def run(shift):
        r, v = (t.roll(shift, dims=1).to(device).requires_grad_(True) for t in (x.rewards, x.values))
        adv, ret = ops.multi_gae(r, v, x.mask.roll(shift, dims=0).to(device), gamma=0.99, lam=0.95)
        gr, gv = torch.autograd.grad((adv, ret), (r, v), [u.roll(shift, dims=1).to(device) for u in up])
        return {k: t.roll(-shift, dims=1) for k, t in dict(adv=adv, ret=ret, gr=gr, gv=gv).items()}

    base, got = run(0), run(3)
    for k in base:
        assert torch.equal(got[k], base[k]), k


@pytest.mark.parametrize("gamma,lam", GAE_PARAMS)
def test_gradcheck_multi_gae(gamma, lam):
    x = make_inputs(2, 3, 9, seed=53, mask="holes")

    def f(rewards, values):
        return ops.multi_gae(rewards, values, x.mask, gamma=gamma, lam=lam)

    args = (x.rewards.clone().requires_grad_(True), x.values.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(f, args, **GC)


@pytest.mark.parametrize("impl", ["ops", "reference"])
def test_gae_closed_forms(device, impl):
    mod = IMPLS[impl]
    x = make_inputs(2, 3, 25, seed=180, mask="full")
    xd = x.to(device=device)
    # gamma = lam = 1: A[t] = sum_{t' >= t} r[t'] - V[t]
    adv, ret = mod.multi_gae(xd.rewards, xd.values, xd.mask, gamma=1.0, lam=1.0)
    want = x.rewards.flip(-1).cumsum(-1).flip(-1) - x.values
    torch.testing.assert_close(adv.cpu(), want, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(ret.cpu(), want + x.values, rtol=1e-11, atol=1e-11)
    # lam = 0: one-step TD error r[t] + gamma V[t+1] - V[t]
    adv, _ = mod.multi_gae(xd.rewards, xd.values, xd.mask, gamma=0.9, lam=0.0)
    nxt = torch.cat([x.values[..., 1:], torch.zeros(2, 3, 1, dtype=F64)], -1)
    torch.testing.assert_close(adv.cpu(), x.rewards + 0.9 * nxt - x.values, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# the GAE reference against a per-row Python loop of algorithms §1
# ----------------------------------------------------------------------------------------------
def gae_loop(rewards, values, mask, gamma, lam):
    n, B, T = values.shape
    adv = torch.zeros(n, B, T, dtype=F64)
    r, v, m = rewards.tolist(), values.tolist(), (mask != 0).tolist()
    for i in range(n):
        for b in range(B):
            next_v, last_a = 0.0, 0.0
            for t in reversed(range(T)):
                delta = r[i][b][t] + gamma * next_v - v[i][b][t]
                a = delta + gamma * lam * last_a
                if m[b][t]:
                    next_v, last_a = v[i][b][t], a
                adv[i, b, t] = last_a
    return adv, adv + values


@pytest.mark.parametrize("mask_kind", ["random", "holes", "full", "empty"])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0), (1.0, 1.0)])
def test_gae_reference_matches_python_loop(mask_kind, gamma, lam):
    x = make_inputs(3, 4, 23, seed=11, mask=mask_kind)
    adv, ret = ref.multi_gae(x.rewards, x.values, x.mask, gamma=gamma, lam=lam)
    want_adv, want_ret = gae_loop(x.rewards, x.values, x.mask, gamma, lam)
    torch.testing.assert_close(adv, want_adv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, want_ret, rtol=1e-12, atol=1e-12)


def test_gae_reference_closed_form_full_mask():
    # gamma = lam = 1 and a full mask: A[t] = sum_{t' >= t} r[t'] - V[t]
    x = make_inputs(2, 3, 17, seed=12, mask="full")
    adv, ret = ref.multi_gae(x.rewards, x.values, x.mask, gamma=1.0, lam=1.0)
    want = x.rewards.flip(-1).cumsum(-1).flip(-1) - x.values
    torch.testing.assert_close(adv, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, want + x.values, rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("path")  # native and fallback (conftest.py)
def test_wrong_num_objectives_gae(device):
    x = bad_input_batch(device)
    expect_error("values", ops.multi_gae, x.rewards, x.values[:2], x.mask)


@pytest.mark.usefixtures("path")  # native and fallback (conftest.py)
@pytest.mark.parametrize("value", BAD_UNIT, ids=str)
@pytest.mark.parametrize("arg", ["gamma", "lam"])
def test_gae_gamma_lam_out_of_range(device, arg, value):
    x = bad_input_batch(device)
    expect_error(arg, ops.multi_gae, x.rewards, x.values, x.mask, **{arg: value})


@pytest.mark.usefixtures("path")  # native and fallback (conftest.py)
def test_gae_gamma_lam_bounds_are_accepted(device):
    x = bad_input_batch(device)
    for gamma, lam in ((0.0, 1.0), (1.0, 0.0)):
        adv, ret = ops.multi_gae(x.rewards, x.values, x.mask, gamma=gamma, lam=lam)
        assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
