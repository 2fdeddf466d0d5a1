"""algorithms §9 invariants and other properties whose expected values are written here from the
formulas, without pama_ext.reference. Each test runs on the kernels (``ops``) and, where it applies,
on the reference too (a check of the reference against docs/algorithms.md).
"""
from __future__ import annotations


import pytest
import torch

from pama_ext import ops
from pama_ext import reference as ref_impl
from op_runners import run_multi_gae, run_objective_stats, run_policy_loss, run_token_rewards, run_value_loss
from pama_testutils import COMBOS, make_inputs
from pama_ext.vocab import CAGRAD_C

F64 = torch.float64
IMPLS = {"ops": ops, "reference": ref_impl}
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


# ----------------------------------------------------------------------------------------------
# vanilla PPO, written from verl's compute_policy_loss / agg_loss
# ----------------------------------------------------------------------------------------------
def verl_agg(loss_mat, mask, agg):
    m = mask.to(loss_mat.dtype)
    if agg == "token-mean":
        return (loss_mat * m).sum() / m.sum()
    keep = m.sum(-1) > 0  # CHOICE of algorithms §4: empty rows are not sequences
    if agg == "seq-mean-token-mean":
        per_seq = (loss_mat * m).sum(-1)[keep] / m.sum(-1)[keep]
    else:
        per_seq = (loss_mat * m).sum(-1)[keep]
    return per_seq.mean()


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


def _nonempty_mask(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    return torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)


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
    x.mask = _nonempty_mask(B, T, 73) if agg != "token-mean" else x.mask
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_fully_masked_nan_padding_is_not_an_error(device, dtype, native):
    """Everything masked out and the padding full of NaN/Inf: loss 0, gradient 0, no error."""
    x = make_inputs(2, 3, 9, seed=96, mask="empty").to(dtype, device)
    for t in (x.logp, x.old_logp, x.ref_logp, x.advantages, x.values, x.old_values, x.returns):
        t.view(-1)[::2] = float("nan")
        t.view(-1)[1::4] = float("inf")
    logp = x.logp.clone().requires_grad_(True)
    loss, m = ops.pama_policy_loss(logp, x.old_logp, x.advantages, x.mask, x.ref_logp, beta_loss=0.1)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(logp.grad) == 0
    assert all(torch.isfinite(v).all() for v in m.values())
    v = x.values.clone().requires_grad_(True)
    vloss, vm = ops.multi_value_loss(v, x.old_values, x.returns, x.mask)
    vloss.backward()
    assert vloss.item() == 0.0 and torch.count_nonzero(v.grad) == 0
    assert all(torch.isfinite(t).all() for t in vm.values())
    st = ops.objective_stats(x.advantages, x.logp, x.old_logp, x.mask)
    assert torch.isfinite(st).all()


@pytest.mark.parametrize("impl", ["ops", "reference"])
def test_fully_masked_other_ops(device, impl):
    mod = IMPLS[impl]
    x = make_inputs(3, 4, 13, seed=97, mask="empty").to(device=device)
    for agg in AGGS:
        for clip in (0.2, None):
            out = run_value_loss(mod, x, clip, agg)
            assert out["loss"].item() == 0.0 and torch.count_nonzero(out["grad_values"]) == 0
            assert all(torch.isfinite(v).all() for v in out.values())
    st = run_objective_stats(mod, x)["stats"]
    assert torch.isfinite(st).all()
    lay = ref_impl.stats_layout(3)
    assert st[lay["count"]].item() == 0 and st[lay["num_seqs"]].item() == 0
    for key in ("mean", "var", "abar", "pos", "gram"):
        assert (st[lay[key]] == 0).all(), key
    gae = run_multi_gae(mod, x)
    assert all(torch.isfinite(v).all() for v in gae.values())
    tr = run_token_rewards(mod, x, 0.1)
    assert (tr["rewards"] == 0).all()  # no valid position: no score, no (masked) KL penalty


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


@pytest.mark.parametrize("impl", ["ops", "reference"])
def test_masked_out_values_do_not_matter(device, impl):
    mod = IMPLS[impl]
    x = make_inputs(3, 5, 23, seed=140, mask="holes")
    y = x.to()
    g = torch.Generator().manual_seed(141)
    out = ~x.mask
    for name in ("logp", "old_logp", "ref_logp"):
        t = getattr(y, name)
        t[out] = 5 * torch.randn(int(out.sum()), generator=g, dtype=F64) - 3
    for name in ("advantages", "rewards", "values", "old_values", "returns"):
        t = getattr(y, name)
        t[:, out] = 50 * torch.randn(3, int(out.sum()), generator=g, dtype=F64)
    xd, yd = x.to(device=device), y.to(device=device)
    md = x.mask.to(device)
    checks = [
        (run_policy_loss, dict(method="pama", granularity="sequence", use_ref=True, beta_loss=0.1,
                               agg="seq-mean-token-mean")),
        (run_policy_loss, dict(method="mgda", use_ref=True, beta_loss=0.1)),
        (run_value_loss, dict(agg="seq-mean-token-sum")),
        (run_objective_stats, {}),
        (run_multi_gae, dict(gamma=0.99, lam=0.9, grad=False)),
        (run_token_rewards, dict(beta_kl=0.2, grad=False)),
    ]
    for runner, kw in checks:
        a, b = runner(mod, xd, **kw), runner(mod, yd, **kw)
        for k in a:
            va, vb = a[k], b[k]
            if k.startswith("grad_"):
                va, vb = va * md, vb * md  # gradients at masked-out positions are unconstrained
            if k in ("advantages", "returns", "rewards"):
                va, vb = va[:, md], vb[:, md]
            torch.testing.assert_close(va, vb, rtol=1e-12, atol=1e-12, msg=f"{runner.__name__}:{k}")


@pytest.mark.parametrize("impl", ["ops", "reference"])
def test_padding_and_empty_rows_change_nothing(device, impl):
    """Appending masked-out columns, or whole empty rows, leaves every loss and metric unchanged."""
    mod = IMPLS[impl]
    x = make_inputs(2, 3, 20, seed=150, mask="holes")
    pad_t = make_inputs(2, 3, 27, seed=151, mask="holes")
    pad_b = make_inputs(2, 5, 20, seed=152, mask="holes")
    for name in ("logp", "old_logp", "ref_logp"):
        getattr(pad_t, name)[:, :20] = getattr(x, name)
        getattr(pad_b, name)[:3] = getattr(x, name)
    for name in ("advantages", "rewards", "values", "old_values", "returns"):
        getattr(pad_t, name)[:, :, :20] = getattr(x, name)
        getattr(pad_b, name)[:, :3] = getattr(x, name)
    pad_t.mask[:] = False
    pad_t.mask[:, :20] = x.mask
    pad_b.mask[:] = False
    pad_b.mask[:3] = x.mask
    pad_t.scores, pad_b.scores[:, :3] = x.scores, x.scores
    for agg in AGGS:
        for kw in (dict(method="pama", granularity="sequence"), dict(method="mgda"), dict(method="pama")):
            base = run_policy_loss(mod, x.to(device=device), agg=agg, use_ref=True, beta_loss=0.05, **kw)
            for padded, sl in ((pad_t, (slice(None), slice(0, 20))), (pad_b, (slice(0, 3), slice(None)))):
                got = run_policy_loss(mod, padded.to(device=device), agg=agg, use_ref=True, beta_loss=0.05, **kw)
                for k in base:
                    g = got[k][sl] if k == "grad_logp" else got[k]
                    torch.testing.assert_close(g, base[k], rtol=1e-12, atol=1e-13, msg=f"{agg} {kw} {k}")
        vb = run_value_loss(mod, x.to(device=device), agg=agg)
        for padded in (pad_t, pad_b):
            vg = run_value_loss(mod, padded.to(device=device), agg=agg)
            for k in ("loss", "clipfrac", "head_loss"):
                torch.testing.assert_close(vg[k], vb[k], rtol=1e-12, atol=1e-13)
    gb = run_multi_gae(mod, x.to(device=device), grad=False)
    gt = run_multi_gae(mod, pad_t.to(device=device), grad=False)
    m = x.mask.to(device)
    for k in ("advantages", "returns"):
        torch.testing.assert_close(gt[k][:, :, :20][:, m], gb[k][:, m], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# value loss, token rewards, GAE closed forms
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["ops", "reference"])
@pytest.mark.parametrize("agg", AGGS)
def test_value_loss_without_clip_is_half_mse(device, impl, agg):
    mod = IMPLS[impl]
    B, T = 5, 29
    x = make_inputs(3, B, T, seed=160)
    x.mask = _nonempty_mask(B, T, 161)
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


@pytest.mark.parametrize("impl", ["ops", "reference"])
def test_token_rewards_place_score_on_last_valid_token(device, impl):
    mod = IMPLS[impl]
    x = make_inputs(3, 6, 17, seed=170, mask="holes")
    r = mod.token_rewards(*(t.to(device) for t in (x.scores, x.old_logp, x.ref_logp, x.mask))).cpu()
    for b in range(6):
        valid = x.mask[b].nonzero().flatten().tolist()
        if valid:
            want = torch.zeros(3, 17, dtype=F64)
            want[:, valid[-1]] = x.scores[:, b]
            assert torch.equal(r[:, b], want), b
        else:
            assert (r[:, b] == 0).all()
    # with the KL penalty, the masked-in positions carry -beta * (old - ref)
    beta = 0.3
    r = mod.token_rewards(*(t.to(device) for t in (x.scores, x.old_logp, x.ref_logp, x.mask)), beta_kl=beta).cpu()
    kl = -beta * (x.old_logp - x.ref_logp)
    for b in range(6):
        valid = x.mask[b].nonzero().flatten().tolist()
        for t in valid:
            want = kl[b, t] + (x.scores[:, b] if t == valid[-1] else 0.0)
            torch.testing.assert_close(r[:, b, t], want * torch.ones(3, dtype=F64), rtol=1e-12, atol=1e-14)


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
# determinism (algorithms §9)
# ----------------------------------------------------------------------------------------------
def test_deterministic_repeated_calls(device):
    x = make_inputs(4, 8, 300, seed=190, mask="holes").to(torch.float32, device)
    outs = [run_policy_loss(ops, x, method="mgda", use_ref=True, beta_loss=0.1) for _ in range(3)]
    outs_v = [run_value_loss(ops, x) for _ in range(3)]
    outs_g = [run_multi_gae(ops, x) for _ in range(3)]
    for group in (outs, outs_v, outs_g):
        for o in group[1:]:
            for k in o:
                assert torch.equal(o[k], group[0][k]), k


def test_deterministic_across_thread_counts():
    """CPU results do not depend on the intra-op thread count (fixed-order reductions)."""
    x = make_inputs(4, 16, 700, seed=191, mask="holes").to(torch.float32)
    prev = torch.get_num_threads()
    try:
        res = []
        for th in (1, 2, 3):
            torch.set_num_threads(th)
            out = {}
            out.update({f"pl.{k}": v for k, v in run_policy_loss(ops, x, method="pama", granularity="sequence").items()})
            out.update({f"vl.{k}": v for k, v in run_value_loss(ops, x).items()})
            out.update({f"st.{k}": v for k, v in run_objective_stats(ops, x).items()})
            out.update({f"gae.{k}": v for k, v in run_multi_gae(ops, x).items()})
            res.append(out)
    finally:
        torch.set_num_threads(prev)
    for r in res[1:]:
        for k in r:
            assert torch.equal(r[k], res[0][k]), k


# ----------------------------------------------------------------------------------------------
# no host synchronisation (algorithms §9), CUDA only
# ----------------------------------------------------------------------------------------------
def test_no_host_sync_on_cuda():
    from pama_testutils import resolve_device

    device = resolve_device("cuda")
    x = make_inputs(3, 8, 300, seed=200, mask="holes").to(torch.float32, device)
    logp = x.logp.clone().requires_grad_(True)
    values = x.values.clone().requires_grad_(True)
    scores = x.scores.clone().requires_grad_(True)
    g_out = torch.ones((), device=device)
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        r = ops.token_rewards(scores, x.old_logp, x.ref_logp, x.mask, beta_kl=0.05)
        adv, ret = ops.multi_gae(r, values, x.mask, gamma=1.0, lam=0.95)
        st = ops.objective_stats(adv, logp, x.old_logp, x.mask)
        w = ops.pareto_weights(st, "mgda", "batch")
        for method, gran in (("pama", "token"), ("pama", "sequence"), ("mgda", "batch")):
            pl, pm = ops.pama_policy_loss(logp, x.old_logp, adv, x.mask, x.ref_logp, method=method,
                                          granularity=gran, beta_loss=0.1, check_finite=False)
            pl.backward(g_out)
        vl, vm = ops.multi_value_loss(values, x.old_values, ret.detach(), x.mask, check_finite=False)
        # backward through the value loss, the GAE adjoint and the token-rewards backward
        (vl + 1e-3 * (adv.square().mean() + ret.mean())).backward(g_out)
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    torch.cuda.synchronize()
    assert torch.isfinite(w).all() and logp.grad is not None and values.grad is not None
    assert scores.grad is not None and torch.isfinite(scores.grad).all()
