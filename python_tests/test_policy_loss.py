"""pama_policy_loss and the PamaPolicyLoss module: the kernel against pama_ext.reference (float64
and the low-precision tolerance rule, DESIGN.md "Tests"), gradcheck, closed forms and invariants,
the reference against the spec loops, and the module against the functional op.

Opcheck, property tests and the bad-input cases shared by every op live in test_opcheck_compile.py,
test_properties.py and test_bad_input.py.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import pama_ext
from pama_ext import ops, reference as ref
from pama_ext.vocab import CAGRAD_C
from op_runners import run_multi_gae, run_objective_stats, run_policy_loss, run_value_loss
from pama_testutils import (AGGS, BAD_NONNEG, COMBOS, GC, IMPLS, LOWP_DTYPES, NS, SHAPES, bad_input_batch,
                            check_dtypes, compare_all, expect_error, make_inputs, make_prefs, names_arg,
                            nonempty_mask, odd_mask, spec_stats, thm1_loop, verl_agg, widen_ratio)

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# pama_policy_loss
# ----------------------------------------------------------------------------------------------
POLICY_IO = dict(acc_keys=["loss", "pg_loss", "kl_loss", "clipfrac", "approx_kl", "active", "abar", "pos",
                           "weights"], io_keys=["grad_logp"])


@pytest.mark.parametrize("method,granularity", COMBOS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n", NS)
def test_policy_loss_grid_f64(device, n, shape, method, granularity):
    # agg cycles with the grid position, so that every (method, granularity, agg) triple and every
    # (n, shape, agg) triple is covered without the full cross product
    agg = ref.AGG_MODES[(NS.index(n) + SHAPES.index(shape) + COMBOS.index((method, granularity))) % 3]
    x = widen_ratio(make_inputs(n, *shape, seed=n * 3 + shape[1]))
    kw = dict(method=method, granularity=granularity, agg=agg)
    got = run_policy_loss(ops, x.to(device=device), **kw)
    check_dtypes(got, F64, device, **POLICY_IO)
    compare_all(got, run_policy_loss(ref, x, **kw))


@pytest.mark.parametrize("noon,whiten,agg", [(True, False, "token-mean"), (False, True, "seq-mean-token-mean"),
                                             (False, False, "seq-mean-token-sum"), (False, True, "token-mean"),
                                             (True, False, "seq-mean-token-sum")])
@pytest.mark.parametrize("method,granularity", COMBOS)
@pytest.mark.parametrize("n", [2, 3])
def test_policy_loss_noon_whiten_f64(device, n, method, granularity, agg, noon, whiten):
    x = widen_ratio(make_inputs(n, 3, 47, seed=n + 100, mask="holes"), scale=0.5)
    kw = dict(method=method, granularity=granularity, agg=agg, noon=noon, whiten=whiten)
    got = run_policy_loss(ops, x.to(device=device), **kw)
    compare_all(got, run_policy_loss(ref, x, **kw))


@pytest.mark.parametrize("mask_kind", ["holes", "full", "empty"])
@pytest.mark.parametrize("method,granularity", [("pama", "token"), ("pama", "sequence"), ("pama", "batch"),
                                                ("linear", "token"), ("mgda", "batch")])
@pytest.mark.parametrize("n", [2, 8])
def test_policy_loss_masks_f64(device, n, method, granularity, mask_kind):
    x = widen_ratio(make_inputs(n, 4, 29, seed=n + 7, mask=mask_kind))
    for noon in (True, False):
        kw = dict(method=method, granularity=granularity, noon=noon, agg="seq-mean-token-mean")
        got = run_policy_loss(ops, x.to(device=device), **kw)
        compare_all(got, run_policy_loss(ref, x, **kw))


# More rows than the finalize tree has lanes (pama_math.h kMergeLanes = 256), some fully masked: the
# loss and metric totals (and the moments' merge) with lanes of one, two or no rows.
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
@pytest.mark.parametrize("agg", ref.AGG_MODES)
@pytest.mark.parametrize("method,granularity", [("pama", "token"), ("mgda", "batch")])
def test_policy_loss_many_rows(device, method, granularity, agg, dtype):
    x = widen_ratio(make_inputs(2, 300, 9, dtype=dtype, seed=301, mask="holes"))
    x.mask[::7] = False
    kw = dict(method=method, granularity=granularity, agg=agg, beta_loss=0.1, use_ref=True)
    got = run_policy_loss(ops, x.to(device=device), **kw)
    if dtype == F64:
        compare_all(got, run_policy_loss(ref, x, **kw))
    else:
        compare_all(got, run_policy_loss(ref, x.as64(), **kw), run_policy_loss(ref, x, **kw), dtype)


@pytest.mark.parametrize("beta_loss", [0.1, 0.0])
@pytest.mark.parametrize("agg", ref.AGG_MODES)
@pytest.mark.parametrize("method,granularity", [("pama", "token"), ("pama", "batch"), ("mgda", "sequence")])
@pytest.mark.parametrize("n", [1, 3])
def test_policy_loss_kl_f64(device, n, method, granularity, agg, beta_loss):
    x = widen_ratio(make_inputs(n, 3, 47, seed=n + 23))
    kw = dict(method=method, granularity=granularity, agg=agg, beta_loss=beta_loss, use_ref=True)
    got = run_policy_loss(ops, x.to(device=device), **kw)
    want = run_policy_loss(ref, x, **kw)
    if beta_loss > 0:
        assert want["kl_loss"].item() > 0
    compare_all(got, want)


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_policy_loss_linear_prefs_f64(device, n):
    x = widen_ratio(make_inputs(n, 5, 41, seed=n + 31, mask="holes"))
    for noon in (True, False):
        kw = dict(method="linear", noon=noon, prefs=make_prefs(n))
        got = run_policy_loss(ops, x.to(device=device), **kw)
        compare_all(got, run_policy_loss(ref, x, **kw))


@pytest.mark.parametrize("dual_clip", [3.0, 1.5, None])
@pytest.mark.parametrize("eps_lo,eps_hi", [(0.2, 0.2), (0.1, 0.28), (0.3, 0.05)])
def test_policy_loss_clip_params_f64(device, eps_lo, eps_hi, dual_clip):
    x = widen_ratio(make_inputs(3, 5, 37, seed=41), scale=0.6)
    for method, noon in (("pama", True), ("linear", False), ("mgda", False)):
        kw = dict(method=method, granularity="token", noon=noon, eps_lo=eps_lo, eps_hi=eps_hi)
        got = run_policy_loss(ops, x.to(device=device), dual_clip=dual_clip, **kw)
        want = run_policy_loss(ref, x, dual_clip=math.inf if dual_clip is None else dual_clip, **kw)
        compare_all(got, want)


@pytest.mark.parametrize("method,granularity", [("pama", "token"), ("pama", "sequence"), ("mgda", "batch")])
def test_policy_loss_long_rows_f64(device, method, granularity):
    """Rows longer than a CUDA chunk (1024 tokens): the chunked reductions and their combination."""
    x = widen_ratio(make_inputs(3, 3, 2500, seed=43))
    for agg in ref.AGG_MODES:
        kw = dict(method=method, granularity=granularity, agg=agg)
        got = run_policy_loss(ops, x.to(device=device), **kw)
        compare_all(got, run_policy_loss(ref, x, **kw))
    st = run_objective_stats(ops, x.to(device=device))
    compare_all(st, run_objective_stats(ref, x))


@pytest.mark.parametrize("dtype", LOWP_DTYPES, ids=str)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("method,granularity", [("pama", "token"), ("pama", "sequence"), ("pama", "batch"),
                                                ("linear", "batch"), ("mgda", "batch")])
@pytest.mark.parametrize("n,shape", [(2, (3, 47)), (8, (5, 130))], ids=str)
def test_policy_loss_lowp(native, device, n, shape, method, granularity, agg, dtype):
    x = widen_ratio(make_inputs(n, *shape, dtype=dtype, seed=n + shape[1]))
    kw = dict(method=method, granularity=granularity, agg=agg, beta_loss=0.05, use_ref=True)
    got = run_policy_loss(ops, x.to(device=device), **kw)
    check_dtypes(got, dtype, device, **POLICY_IO)
    compare_all(got, run_policy_loss(ref, x.as64(), **kw), run_policy_loss(ref, x, **kw), dtype)


@pytest.mark.parametrize("dtype", LOWP_DTYPES, ids=str)
def test_policy_loss_lowp_no_noon(native, device, dtype):
    x = widen_ratio(make_inputs(3, 5, 130, dtype=dtype, seed=77, mask="holes"), scale=0.5)
    for method in ("pama", "linear", "mgda"):
        kw = dict(method=method, noon=False, agg="seq-mean-token-mean")
        got = run_policy_loss(ops, x.to(device=device), **kw)
        compare_all(got, run_policy_loss(ref, x.as64(), **kw), run_policy_loss(ref, x, **kw), dtype)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(method="pama", granularity="sequence", agg="seq-mean-token-mean"),
    dict(method="mgda", agg="seq-mean-token-sum", beta_loss=0.2),
    dict(method="linear", noon=False, whiten=False, dual_clip=1.5),
    dict(method="pama", granularity="batch", noon=False, beta_loss=0.1),
], ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()) or "default")
def test_gradcheck_policy_loss(kw):
    x = widen_ratio(make_inputs(3, 3, 7, seed=51, mask="holes"), scale=0.4)
    ref_logp = x.ref_logp if kw.get("beta_loss") else None

    def f(logp):
        return ops.pama_policy_loss(logp, x.old_logp, x.advantages, x.mask, ref_logp, **kw)[0]

    assert torch.autograd.gradcheck(f, (x.logp.clone().requires_grad_(True),), **GC)


def test_policy_loss_grad_only_wrt_logp(device):
    """advantages (and mask) carry no gradient; requesting one is not an error."""
    x = make_inputs(2, 3, 11, seed=55).to(device=device)
    adv = x.advantages.clone().requires_grad_(True)
    logp = x.logp.clone().requires_grad_(True)
    loss, m = ops.pama_policy_loss(logp, x.old_logp, adv, x.mask)
    loss.backward()
    assert logp.grad is not None
    assert adv.grad is None or torch.count_nonzero(adv.grad) == 0
    for k, v in m.items():
        assert not v.requires_grad, f"metric {k} carries a gradient"


# ----------------------------------------------------------------------------------------------
# edge cases
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,granularity", [("pama", "token"), ("pama", "sequence"), ("pama", "batch"),
                                                ("linear", "batch"), ("mgda", "batch")])
def test_policy_loss_many_objectives_f64(device, method, granularity):
    """n = 64 (the maximum). More masked-in tokens than objectives: with fewer, the 64 indicator
    vectors have 0 in their convex hull (noon=False), MGDA's exact combined advantage is 0 up to
    rounding on every unclipped token, and the clip metrics would count the sign of rounding noise."""
    x = widen_ratio(make_inputs(64, 3, 45, seed=301, mask="holes"))
    for noon in (True, False):
        kw = dict(method=method, granularity=granularity, noon=noon)
        compare_all(run_policy_loss(ops, x.to(device=device), **kw), run_policy_loss(ref, x, **kw))
    compare_all(run_objective_stats(ops, x.to(device=device)), run_objective_stats(ref, x))
    compare_all(run_multi_gae(ops, x.to(device=device)), run_multi_gae(ref, x))
    compare_all(run_value_loss(ops, x.to(device=device)), run_value_loss(ref, x))


def test_policy_loss_log_ratio_clamp_f64(device):
    """|logp - old_logp| > 20 on some tokens: the ratio saturates at exp(+-20), gradient 0 there."""
    x = make_inputs(2, 3, 17, seed=302)
    x.logp = x.logp.clone()
    x.logp[0, 2] = x.old_logp[0, 2] + 25.0
    x.logp[1, 5] = x.old_logp[1, 5] - 30.0
    x.logp[2, 0] = x.old_logp[2, 0] + 19.5
    for kw in (dict(noon=False, method="linear"), dict(noon=True), dict(noon=False, dual_clip=1e12)):
        compare_all(run_policy_loss(ops, x.to(device=device), **kw), run_policy_loss(ref, x, **kw))


def vanilla_ppo(logp, old_logp, adv, mask, agg="token-mean", clip_lo=0.2, clip_hi=0.2, clip_ratio_c=3.0):
    """verl's vanilla PPO policy loss (dual clip); returns (loss, clipfrac, approx_kl)."""
    negative_approx_kl = torch.clamp(logp - old_logp, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    m = mask.to(logp.dtype)
    ppo_kl = (-negative_approx_kl * m).sum() / m.sum()
    pg_losses1 = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1 - clip_lo, 1 + clip_hi)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = (torch.gt(pg_losses2, pg_losses1).to(logp.dtype) * m).sum() / m.sum()
    pg_losses3 = -adv * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_losses = torch.where(adv < 0, clip_pg_losses2, clip_pg_losses1)
    return verl_agg(pg_losses, mask, agg), pg_clipfrac, ppo_kl


@pytest.mark.parametrize("impl", ["ops", "reference"])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("method,granularity", COMBOS)
def test_single_objective_is_vanilla_ppo(device, impl, method, granularity, agg):
    """algorithms §9: n = 1, noon=False, whiten=False is verl's vanilla PPO loss (dual clip 3, linear:
    token-mean; every combiner reduces to the identity for one objective, except CAGrad / RACO,
    whose single coefficient is a = w + c (d = g0 + c |g0| g0/|g0|): the loss scaled by 1 + c)."""
    mod = IMPLS[impl]
    B, T = 6, 37
    x = make_inputs(1, B, T, seed=71)
    g = torch.Generator().manual_seed(72)
    x.logp = x.old_logp + 0.35 * torch.randn(B, T, generator=g, dtype=F64)  # both clips active
    x.mask = nonempty_mask(B, T, 73) if agg != "token-mean" else x.mask
    xd = x.to(device=device)
    logp = xd.logp.clone().requires_grad_(True)
    loss, m = mod.pama_policy_loss(logp, xd.old_logp, xd.advantages, xd.mask, noon=False, whiten=False,
                                   method=method, granularity=granularity, agg=agg)
    loss.backward()

    lp = x.logp.clone().requires_grad_(True)
    want, clipfrac, approx_kl = vanilla_ppo(lp, x.old_logp, x.advantages[0], x.mask, agg)
    weight = 1.0 + CAGRAD_C if method in ("cagrad", "raco") else 1.0
    want = want * weight
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(logp.grad.cpu(), lp.grad, rtol=1e-9, atol=1e-12)
    assert m["pg_loss"].item() == pytest.approx(want.item(), rel=1e-10, abs=1e-12)
    assert m["clipfrac"].item() == pytest.approx(clipfrac.item(), rel=1e-12)
    assert 0 < clipfrac.item() < 1
    assert m["approx_kl"].item() == pytest.approx(approx_kl.item(), rel=1e-10, abs=1e-12)
    assert m["weights"].tolist() == [pytest.approx(weight, rel=1e-12)]


@pytest.mark.parametrize("impl", ["ops", "reference"])
def test_single_objective_dual_clip_binds(device, impl):
    """Same as above with a dual-clip constant that certainly binds on part of the tokens."""
    mod = IMPLS[impl]
    B, T = 6, 37
    x = make_inputs(1, B, T, seed=74)
    g = torch.Generator().manual_seed(75)
    x.logp = x.old_logp + 0.35 * torch.randn(B, T, generator=g, dtype=F64)
    a = x.advantages[0]
    ratio = torch.exp(x.logp - x.old_logp)
    l_clip = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2))
    bind = (a < 0) & (-a * 1.1 < l_clip) & x.mask
    assert bind.sum() > 0  # the test data reaches the dual clip
    xd = x.to(device=device)
    lp = xd.logp.clone().requires_grad_(True)
    loss, _ = mod.pama_policy_loss(lp, xd.old_logp, xd.advantages, xd.mask, noon=False, whiten=False,
                                   method="linear", dual_clip=1.1)
    loss.backward()
    lp2 = x.logp.clone().requires_grad_(True)
    want, _, _ = vanilla_ppo(lp2, x.old_logp, a, x.mask, clip_ratio_c=1.1)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-10)
    torch.testing.assert_close(lp.grad.cpu(), lp2.grad, rtol=1e-9, atol=1e-12)
    assert (lp.grad.cpu()[bind] == 0).all()


# ----------------------------------------------------------------------------------------------
# closed form under Noon: token granularity combines to min_i N_i
# ----------------------------------------------------------------------------------------------
def whiten_noon(adv, mask, whiten=True, noon=True):
    out = torch.empty_like(adv)
    for i in range(adv.shape[0]):
        sel = adv[i][mask]
        if whiten:
            mean = sel.mean() if sel.numel() else torch.zeros((), dtype=adv.dtype)
            var = sel.var(unbiased=True) if sel.numel() > 1 else torch.zeros((), dtype=adv.dtype)
            a = (adv[i] - mean) / torch.sqrt(var + 1e-8)
        else:
            a = adv[i]
        out[i] = a.clamp(min=0) if noon else a
    return out


@pytest.mark.parametrize("impl", ["ops", "reference"])
@pytest.mark.parametrize("noon", [True, False])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_token_granularity_closed_form(device, impl, n, noon):
    mod = IMPLS[impl]
    B, T = 4, 33
    x = make_inputs(n, B, T, seed=80 + n, mask="holes")
    g = torch.Generator().manual_seed(81)
    x.logp = x.old_logp + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    xd = x.to(device=device)
    logp = xd.logp.clone().requires_grad_(True)
    loss, m = mod.pama_policy_loss(logp, xd.old_logp, xd.advantages, xd.mask, noon=noon, method="pama",
                                   granularity="token")
    loss.backward()
    N = whiten_noon(x.advantages, x.mask, noon=noon)
    if noon:
        a_tilde = N.min(0).values  # algorithms §4: min_i N_i
    else:  # projection of 0 onto [min_i, max_i]
        a_tilde = torch.minimum(torch.maximum(torch.zeros(()), N.min(0).values), N.max(0).values)
    lp = x.logp.clone().requires_grad_(True)
    want, clipfrac, _ = vanilla_ppo(lp, x.old_logp, a_tilde, x.mask)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(logp.grad.cpu(), lp.grad, rtol=1e-8, atol=1e-12)
    assert m["active"].item() == pytest.approx(((a_tilde > 0) & x.mask).sum().item() / x.mask.sum().item())
    assert m["clipfrac"].item() == pytest.approx(clipfrac.item())
    # reported weights: mean over masked tokens of the per-token weights (ties share uniformly)
    w = torch.zeros(n, dtype=F64)
    for b, t in x.mask.nonzero().tolist():
        v = N[:, b, t]
        mn, mx = v.min(), v.max()
        if mn > 0:
            c = (v == mn).to(F64) / (v == mn).sum()
        elif mx < 0:
            c = (v == mx).to(F64) / (v == mx).sum()
        else:
            wmin = (mx / (mx - mn)) if mx > mn else torch.zeros((), dtype=F64)
            c = (v == mn).to(F64) * wmin / (v == mn).sum() + (v == mx).to(F64) * (1 - wmin) / (v == mx).sum()
        w += c
    w /= x.mask.sum()
    torch.testing.assert_close(m["weights"].cpu(), w, rtol=1e-9, atol=1e-12)
    assert m["weights"].sum().item() == pytest.approx(1.0)
    pos = torch.stack([((N[i] > 0) & x.mask).sum() for i in range(n)]).to(F64) / x.mask.sum()
    torch.testing.assert_close(m["pos"].cpu(), pos, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["ops", "reference"])
def test_batch_granularity_n2_closed_form(device, impl):
    """PAMA batch, n = 2: c_1 = clip(abar_2 / (abar_2 - abar_1), 0, 1) (algorithms §4, n = 2)."""
    mod = IMPLS[impl]
    x = make_inputs(2, 5, 40, seed=90, mask="holes")
    x.advantages[1] = -x.advantages[1] + 0.3  # make the two objectives conflict
    for noon in (True, False):
        xd = x.to(device=device)
        loss, m = mod.pama_policy_loss(xd.logp, xd.old_logp, xd.advantages, xd.mask, method="pama",
                                       granularity="batch", noon=noon)
        N = whiten_noon(x.advantages, x.mask, noon=noon)
        ind = (torch.exp(x.logp - x.old_logp) <= 1.2).to(F64)
        abar = [((N[i] * ind)[x.mask]).mean().item() for i in range(2)]
        torch.testing.assert_close(m["abar"].cpu(), torch.tensor(abar, dtype=F64), rtol=1e-9, atol=1e-12)
        i1, i2 = abar
        if i1 == i2:
            c1 = 0.5
        elif i1 > 0 and i2 > 0:
            c1 = 1.0 if i1 < i2 else 0.0
        elif i1 < 0 and i2 < 0:
            c1 = 1.0 if i1 > i2 else 0.0
        else:
            c1 = min(max(i2 / (i2 - i1), 0.0), 1.0)
        torch.testing.assert_close(m["weights"].cpu(), torch.tensor([c1, 1 - c1], dtype=F64), rtol=1e-9, atol=1e-12)
        a_tilde = c1 * N[0] + (1 - c1) * N[1]
        want, _, _ = vanilla_ppo(x.logp, x.old_logp, a_tilde, x.mask)
        assert loss.item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# mask dtypes (the CPU kernels read a float32 mask as it is, Backend::float_mask)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.float64, torch.uint8], ids=str)
def test_policy_loss_and_stats_mask_dtypes_match_bool(device, dtype, mask_dtype):
    """A mask of any real dtype is nonzero = in (NaN, -2 and 0.5 in, -0.0 out): the policy loss (single-
    pass options, plain PPO, the two-pass options; with and without the finite checks), its gradient,
    every metric, objective_stats and objective_moments are bitwise those of the bool mask, over rows
    of several chunks and a fully masked row."""
    x = widen_ratio(make_inputs(3, 4, 2500, dtype=dtype, seed=23, mask="holes"))
    x.mask[1] = False
    xb = x.to(device=device)
    xm = x.to(device=device)
    xm.mask = odd_mask(x.mask, mask_dtype).to(device)
    options = [dict(), dict(method="linear", check_finite=False, use_ref=True, beta_loss=0.1),
               dict(n_is_one=True, noon=False, whiten=False, method="linear", granularity="batch"),
               dict(method="pama", granularity="sequence", agg="seq-mean-token-mean"),
               dict(method="mgda", granularity="batch")]
    for kw in options:
        if kw.pop("n_is_one", False):  # the plain-PPO options: one objective
            xb1 = dataclasses.replace(xb, advantages=xb.advantages[:1])
            xm1 = dataclasses.replace(xm, advantages=xm.advantages[:1])
        else:
            xb1, xm1 = xb, xm
        a, b = run_policy_loss(ops, xb1, **kw), run_policy_loss(ops, xm1, **kw)
        for k in a:
            assert torch.equal(a[k], b[k]), (kw, k)
    assert torch.equal(ops.objective_stats(xb.advantages, xb.logp, xb.old_logp, xb.mask),
                       ops.objective_stats(xm.advantages, xm.logp, xm.old_logp, xm.mask))
    assert torch.equal(ops.objective_moments(xb.advantages, xb.mask), ops.objective_moments(xm.advantages, xm.mask))


# ----------------------------------------------------------------------------------------------
# fully masked batch (algorithms §9)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["ops", "reference"])
@pytest.mark.parametrize("noon,whiten", [(True, True), (False, False)])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("method,granularity", COMBOS)
def test_fully_masked_policy_loss(device, impl, method, granularity, agg, noon, whiten):
    mod = IMPLS[impl]
    x = make_inputs(3, 4, 13, seed=95, mask="empty").to(device=device)
    logp = x.logp.clone().requires_grad_(True)
    loss, m = mod.pama_policy_loss(logp, x.old_logp, x.advantages, x.mask, x.ref_logp, method=method,
                                   granularity=granularity, agg=agg, noon=noon, whiten=whiten, beta_loss=0.1)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(logp.grad) == 0
    for k, v in m.items():
        assert torch.isfinite(v).all(), k
    for k in ("pg_loss", "kl_loss", "clipfrac", "approx_kl", "active", "abar", "pos"):
        assert (m[k] == 0).all(), (k, m[k])


# ----------------------------------------------------------------------------------------------
# invariances
# ----------------------------------------------------------------------------------------------
def _policy(mod, x, **kw):
    return run_policy_loss(mod, x, **kw)


@pytest.mark.parametrize("method,granularity", [("pama", "token"), ("pama", "sequence"), ("pama", "batch"),
                                                ("linear", "batch"), ("mgda", "batch")])
@pytest.mark.parametrize("n", [2, 3])
def test_permuting_objectives(device, n, method, granularity):
    x = make_inputs(n, 4, 31, seed=110 + n, mask="holes").to(device=device)
    perm = torch.tensor([n - 1] + list(range(n - 1)))
    xp = x.to()
    xp.advantages = x.advantages[perm.to(device)].contiguous()
    for noon in (True, False):
        a = _policy(ops, x, method=method, granularity=granularity, noon=noon)
        b = _policy(ops, xp, method=method, granularity=granularity, noon=noon)
        tol = dict(rtol=1e-6, atol=1e-9) if method == "mgda" else dict(rtol=1e-12, atol=1e-14)
        for k in ("loss", "pg_loss", "clipfrac", "active", "grad_logp"):
            torch.testing.assert_close(a[k], b[k], **tol, msg=k)
        for k in ("abar", "pos", "weights"):
            torch.testing.assert_close(a[k][perm.to(device)], b[k], **tol, msg=k)


@pytest.mark.parametrize("method,granularity", [("pama", "token"), ("pama", "sequence"), ("pama", "batch"),
                                                ("linear", "batch"), ("mgda", "batch")])
def test_whitening_removes_affine_scale(device, method, granularity):
    """With whiten=True, A_i -> a_i * A_i + b_i (a_i > 0) changes nothing (up to the 1e-8 eps)."""
    n = 3
    x = make_inputs(n, 4, 31, seed=120, mask="holes").to(device=device)
    xs = x.to()
    a = torch.tensor([0.5, 3.0, 1.7], dtype=F64, device=device)[:, None, None]
    b = torch.tensor([2.0, -1.0, 0.1], dtype=F64, device=device)[:, None, None]
    xs.advantages = a * x.advantages + b
    r1 = _policy(ops, x, method=method, granularity=granularity)
    r2 = _policy(ops, xs, method=method, granularity=granularity)
    for k in ("loss", "clipfrac", "active", "abar", "pos", "weights", "grad_logp"):
        torch.testing.assert_close(r1[k], r2[k], rtol=1e-6, atol=1e-8, msg=k)


@pytest.mark.parametrize("noon", [True, False])
def test_linear_one_hot_prefs_select_one_objective(device, noon):
    n = 3
    x = make_inputs(n, 4, 31, seed=130, mask="holes").to(device=device)
    for k in range(n):
        prefs = torch.zeros(n, dtype=F64, device=device)
        prefs[k] = 1.0
        multi = _policy(ops, x, method="linear", prefs=prefs, noon=noon)
        x1 = x.to()
        x1.advantages = x.advantages[k : k + 1].contiguous()
        single = _policy(ops, x1, method="linear", noon=noon)
        for key in ("loss", "clipfrac", "active", "grad_logp"):
            torch.testing.assert_close(multi[key], single[key], rtol=1e-12, atol=1e-14, msg=key)
        torch.testing.assert_close(multi["weights"], prefs)


def test_linear_prefs_scale_the_loss(device):
    x = make_inputs(3, 4, 31, seed=131, mask="holes").to(device=device)
    x.logp = x.old_logp.clone()  # ratio 1 everywhere: no clipping, the loss is linear in prefs
    p = torch.tensor([0.2, 0.5, 0.3], dtype=F64, device=device)
    b = _policy(ops, x, method="linear", prefs=2 * p)
    c = _policy(ops, x, method="linear", prefs=p)
    assert c["loss"].item() != 0.0
    assert b["loss"].item() == pytest.approx(2 * c["loss"].item(), rel=1e-12)
    torch.testing.assert_close(b["grad_logp"], 2 * c["grad_logp"], rtol=1e-12, atol=1e-15)


def spec_policy_loss(x, *, method, granularity, agg, noon, whiten, eps_lo=0.2, eps_hi=0.2,
                     dual_clip=3.0, prefs=None, beta_loss=0.0):
    """algorithms §3/§4 with per-token loops (mgda only for n <= 2). Returns (loss, grad_logp, metrics)."""
    n, B, T = x.advantages.shape
    st = spec_stats(x.advantages, x.logp, x.old_logp, x.mask, eps_hi, whiten, noon)
    N, I = st["N"], st["I"]
    at = torch.zeros(B, T, dtype=F64)
    if method == "pama" and granularity == "token":
        for b in range(B):
            for t in range(T):
                at[b, t] = thm1_loop([N[i, b, t].item() for i in range(n)])[1]
    elif method == "pama" and granularity == "sequence":
        for b in range(B):
            ts = [t for t in range(T) if x.mask[b, t]]
            c, _ = thm1_loop([sum(I[i, b, t].item() for t in ts) / max(len(ts), 1) for i in range(n)])
            for t in range(T):
                at[b, t] = sum(c[i] * N[i, b, t].item() for i in range(n))
    else:
        if method == "pama":
            c, _ = thm1_loop(st["abar"])
        elif method == "linear":
            c = [1.0 / n] * n if prefs is None else prefs.tolist()
        else:
            G = st["gram"]
            if n == 1:
                c = [1.0]
            else:
                den = G[0][0] + G[1][1] - 2 * G[0][1]
                c0 = min(max((G[1][1] - G[0][1]) / den, 0.0), 1.0) if den > 0 else 0.5
                c = [c0, 1 - c0]
        for b in range(B):
            for t in range(T):
                at[b, t] = sum(c[i] * N[i, b, t].item() for i in range(n))
    logp = x.logp.clone().requires_grad_(True)
    u = torch.exp((logp - x.old_logp).clamp(-20, 20))
    l1 = -at * u
    l2 = -at * u.clamp(1 - eps_lo, 1 + eps_hi)
    l = torch.maximum(l1, l2)
    l = torch.where(at < 0, torch.minimum(l, -at * dual_clip), l)
    pg = torch.zeros((), dtype=F64)
    kl = torch.zeros((), dtype=F64)
    rows = [[t for t in range(T) if x.mask[b, t]] for b in range(B)]
    nonempty = [b for b in range(B) if rows[b]]
    cnt = sum(len(r) for r in rows)
    k3 = torch.exp(x.ref_logp - logp) - (x.ref_logp - logp) - 1

    def agg_(mat):
        if agg == "token-mean":
            return sum(mat[b, t] for b in range(B) for t in rows[b]) / max(cnt, 1) if cnt else mat.sum() * 0
        if not nonempty:
            return mat.sum() * 0
        if agg == "seq-mean-token-mean":
            return sum(sum(mat[b, t] for t in rows[b]) / len(rows[b]) for b in nonempty) / len(nonempty)
        return sum(sum(mat[b, t] for t in rows[b]) for b in nonempty) / len(nonempty)

    pg = agg_(l)
    if beta_loss:
        kl = agg_(k3)
    loss = pg + beta_loss * kl
    (grad,) = torch.autograd.grad(loss, logp, allow_unused=True)
    metrics = {"pg_loss": float(pg.detach()), "kl_loss": float(kl.detach()),
               "active": sum(1.0 for b, t in st["toks"] if at[b, t] > 0) / max(cnt, 1),
               "abar": st["abar"], "pos": st["pos"]}
    return loss.detach(), grad, metrics


@pytest.mark.parametrize(
    "method,granularity",
    [("pama", "token"), ("pama", "sequence"), ("pama", "batch"), ("linear", "batch"), ("mgda", "batch")],
)
@pytest.mark.parametrize("agg", ref.AGG_MODES)
@pytest.mark.parametrize("noon,whiten", [(True, True), (False, True), (True, False), (False, False)])
def test_policy_loss_reference_matches_spec_loops(method, granularity, agg, noon, whiten):
    n = 2
    x = make_inputs(n, 4, 8, seed=31, mask="holes")
    x.logp = x.old_logp + 0.4 * torch.randn(4, 8, generator=torch.Generator().manual_seed(2), dtype=F64)
    prefs = torch.tensor([0.3, 0.7], dtype=F64) if method == "linear" else None
    beta = 0.1 if agg == "token-mean" else 0.0
    logp = x.logp.clone().requires_grad_(True)
    loss, m = ref.pama_policy_loss(
        logp, x.old_logp, x.advantages, x.mask, x.ref_logp, noon=noon, whiten=whiten, method=method,
        granularity=granularity, prefs=prefs, agg=agg, beta_loss=beta,
    )
    loss.backward()
    want_loss, want_grad, want_m = spec_policy_loss(
        x, method=method, granularity=granularity, agg=agg, noon=noon, whiten=whiten, prefs=prefs, beta_loss=beta,
    )
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(logp.grad, want_grad, rtol=1e-10, atol=1e-12)
    for k in ("pg_loss", "kl_loss", "active"):
        assert m[k].item() == pytest.approx(want_m[k], rel=1e-10, abs=1e-12), k
    for k in ("abar", "pos"):
        torch.testing.assert_close(m[k], torch.tensor(want_m[k], dtype=F64), rtol=1e-10, atol=1e-12)


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


# ----------------------------------------------------------------------------------------------
# string options and prefs
# ----------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("path")  # native and fallback (conftest.py)
@pytest.mark.parametrize("opt,value", [("method", "pareto"), ("method", "PAMA"), ("method", ""),
                                       ("granularity", "row"), ("granularity", "tokens"),
                                       ("agg", "mean"), ("agg", "seq-mean-token-max")])
def test_unknown_options_policy(device, opt, value):
    x = bad_input_batch(device)
    expect_error(opt, ops.pama_policy_loss, x.logp, x.old_logp, x.advantages, x.mask, **{opt: value})


@pytest.mark.usefixtures("path")  # native and fallback (conftest.py)
@pytest.mark.parametrize("shape", [(2,), (4,), (1, 3), (3, 1)])
def test_prefs_wrong_shape(device, shape):
    x = bad_input_batch(device)
    prefs = torch.full(shape, 1 / 3, dtype=F64, device=device)
    expect_error("prefs", ops.pama_policy_loss, x.logp, x.old_logp, x.advantages, x.mask, method="linear",
                 prefs=prefs)


@pytest.mark.usefixtures("path")  # native and fallback (conftest.py)
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_prefs_is_an_error(device, value):
    """prefs has no mask: every entry is checked, in the same single check as the [B, T] inputs."""
    x = bad_input_batch(device)
    prefs = torch.full((x.advantages.shape[0],), 0.5, dtype=x.logp.dtype, device=device)
    prefs[-1] = value
    expect_error("prefs", ops.pama_policy_loss, x.logp, x.old_logp, x.advantages, x.mask, method="linear",
                 prefs=prefs)


@pytest.mark.usefixtures("path")  # native and fallback (conftest.py)
def test_prefs_non_contiguous(device):
    x = bad_input_batch(device)
    prefs = torch.tensor([[0.2, 0.0], [0.5, 0.0], [0.3, 0.0]], dtype=F64, device=device)[:, 0]
    assert not prefs.is_contiguous()
    a = run_policy_loss(ops, x, method="linear", prefs=prefs)
    b = run_policy_loss(ops, x, method="linear", prefs=prefs.contiguous())
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.usefixtures("path")  # native and fallback (conftest.py)
@pytest.mark.parametrize("value", BAD_NONNEG, ids=str)
def test_eps_hi_out_of_range(device, value):
    x = bad_input_batch(device)
    expect_error("eps_hi", ops.objective_stats, x.advantages, x.logp, x.old_logp, x.mask, eps_hi=value)
    expect_error("eps_hi", ops.pama_policy_loss, x.logp, x.old_logp, x.advantages, x.mask, eps_hi=value)


@pytest.mark.usefixtures("path")  # native and fallback (conftest.py)
@pytest.mark.parametrize("value", BAD_NONNEG, ids=str)
def test_beta_loss_out_of_range(device, value):
    x = bad_input_batch(device)
    expect_error("beta_loss", ops.pama_policy_loss, x.logp, x.old_logp, x.advantages, x.mask, x.ref_logp,
                 beta_loss=value)


@pytest.mark.usefixtures("path")  # native and fallback (conftest.py)
def test_beta_loss_without_ref_logp_is_an_error(device):
    """beta_loss > 0 with ref_logp=None used to drop the KL term silently."""
    x = bad_input_batch(device)
    msg = expect_error("ref_logp", ops.pama_policy_loss, x.logp, x.old_logp, x.advantages, x.mask, None,
                       beta_loss=0.1)
    assert names_arg(msg, "beta_loss"), msg
    loss, _ = ops.pama_policy_loss(x.logp, x.old_logp, x.advantages, x.mask, None, beta_loss=0.0)  # no KL: fine
    assert torch.isfinite(loss)


@pytest.mark.usefixtures("path")  # native and fallback (conftest.py)
@pytest.mark.parametrize("prefs", [[0.5, -0.1, 0.6], [0.0, 0.0, 0.0]], ids=["negative", "zero"])
def test_prefs_negative_or_all_zero_is_an_error(device, prefs):
    """prefs are weights used as given (not normalised): they must be >= 0 and not all 0, which
    check_finite checks in its single host read. Without the check they are used as given."""
    x = bad_input_batch(device)
    p = torch.tensor(prefs, dtype=F64, device=device)
    msg = expect_error("prefs", ops.pama_policy_loss, x.logp, x.old_logp, x.advantages, x.mask, method="linear",
                       prefs=p)
    assert ">= 0" in msg, msg
    loss, m = ops.pama_policy_loss(x.logp, x.old_logp, x.advantages, x.mask, method="linear", prefs=p,
                                   check_finite=False)
    torch.testing.assert_close(m["weights"], p, rtol=0, atol=0)
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------------------------
# whitening variance that overflows float32
# ----------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("path")  # native and fallback (conftest.py)
def test_variance_overflow_is_an_error(device):
    """|advantages| ~ 1e20 in float32: the variance (~1e40) does not fit in float32, whitening would
    divide every advantage to 0 (loss 0, gradient 0): an error naming advantages by default."""
    x = bad_input_batch(device, dtype=torch.float32)
    big = x.advantages * 1e20
    assert torch.isfinite(big).all()
    msg = expect_error("advantages", ops.pama_policy_loss, x.logp, x.old_logp, big, x.mask)
    assert "overflow" in msg, msg
    loss, _ = ops.pama_policy_loss(x.logp, x.old_logp, big, x.mask, whiten=False)  # nothing to whiten
    assert torch.isfinite(loss)
    var = ops.objective_moments(big, x.mask)[2 + 3:]  # the overflowed variances are +inf, not garbage
    assert torch.isinf(var).all()
