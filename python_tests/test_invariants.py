"""algorithms §9 invariants that span several ops (fully masked batches, masked-out values, padding,
determinism, no host synchronisation), with expected values written here from the formulas, without
pama_ext.reference. The per-op invariants and closed forms live in the per-op files. Each test runs on the kernels (``ops``) and, where it applies,
on the reference too (a check of the reference against docs/algorithms.md).
"""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch

import pama_ext
from pama_ext import ops
from pama_ext import reference as ref_impl
from op_runners import run_multi_gae, run_objective_stats, run_policy_loss, run_token_rewards, run_value_loss
from pama_testutils import AGGS, IMPLS, make_inputs

F64 = torch.float64


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

    def run():
        out = {}
        out.update({f"pl.{k}": v for k, v in run_policy_loss(ops, x, method="pama", granularity="sequence").items()})
        out.update({f"vl.{k}": v for k, v in run_value_loss(ops, x).items()})
        out.update({f"st.{k}": v for k, v in run_objective_stats(ops, x).items()})
        out.update({f"gae.{k}": v for k, v in run_multi_gae(ops, x).items()})
        return out

    _assert_same_for_thread_counts(run)


def test_gae_and_token_rewards_deterministic_across_thread_counts():
    """multi_gae (forward and adjoint, in groups of 8 sequences with a partial last group and a
    partial last block of T) and token_rewards give bitwise the same results with 1, 2 and 3 threads."""
    x = make_inputs(3, 11, 257, seed=194, mask="holes").to(torch.float32)

    def run():
        out = {f"gae.{k}": v for k, v in run_multi_gae(ops, x, 0.99, 0.95).items()}
        out.update({f"tr.{k}": v for k, v in run_token_rewards(ops, x, 0.05).items()})
        return out

    _assert_same_for_thread_counts(run)


def _assert_same_for_thread_counts(run, counts=(1, 2, 3)):
    """run() (a dict of tensors) gives bitwise the same tensors with each intra-op thread count."""
    prev = torch.get_num_threads()
    try:
        res = []
        for th in counts:
            torch.set_num_threads(th)
            res.append(run())
    finally:
        torch.set_num_threads(prev)
    for r in res[1:]:
        for k in r:
            assert torch.equal(r[k], res[0][k]), k


@pytest.mark.parametrize("method,granularity,whiten", [("pama", "token", True), ("linear", "batch", False)])
def test_single_pass_policy_loss_deterministic_across_thread_counts(method, granularity, whiten):
    """The single-pass CPU policy loss (linear and pama/token: counts, indicator metrics and finite
    checks inside the loss pass) over rows of several chunks gives bitwise the same loss, metrics and
    gradient with 1, 2 and 3 threads."""
    x = make_inputs(3, 6, 5000, seed=193, mask="holes").to(torch.float32)
    _assert_same_for_thread_counts(lambda: run_policy_loss(ops, x, use_ref=True, beta_loss=0.05, method=method,
                                                           granularity=granularity, whiten=whiten))


def test_dpo_loss_deterministic_across_thread_counts():
    """multi_dpo_loss (forward sums over fixed tasks of pairs, then an ordered finalize) and its
    backward give bitwise the same losses, coef and gradients with 1, 2 and 3 threads, on a pair
    count spanning several tasks and a partial tile, with length normalisation."""
    g = torch.Generator().manual_seed(193)
    P, n = 5 * 8192 + 77, 3
    pc, pr, rc, rr = (-(20 + 10 * torch.rand(P, generator=g)) for _ in range(4))
    labels = torch.randint(-1, 2, (n, P), generator=g).float()
    lengths = torch.randint(1, 40, (P,), generator=g)

    def run():
        leaves = [t.clone().requires_grad_(True) for t in (pc, pr, rc, rr)]
        losses, coef = pama_ext.multi_dpo_loss(*leaves, labels, 0.1, chosen_lengths=lengths, rejected_lengths=lengths + 3)
        grads = torch.autograd.grad((losses * torch.arange(1.0, n + 1)).sum(), leaves)
        return {"losses": losses, "coef": coef, **{f"grad{k}": v for k, v in enumerate(grads)}}

    _assert_same_for_thread_counts(run)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_value_loss_deterministic_across_thread_counts(dtype):
    """multi_value_loss (finite checks inside the loss pass) over rows of several chunks, odd T, holes
    and a fully masked row: bitwise the same loss, metrics and gradient with 1, 2 and 3 threads."""
    x = make_inputs(5, 7, 4099, seed=194, mask="holes").to(dtype)
    x.mask[3] = False
    for agg in ("token-mean", "seq-mean-token-sum"):
        _assert_same_for_thread_counts(lambda: run_value_loss(ops, x, 0.2, agg))


def _thread_cpu_ticks():
    """CPU time (utime + stime, clock ticks) of every thread of this process, from /proc."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[int(tid)] = int(fields[11]) + int(fields[12])  # fields 14, 15 of proc(5)
    return out


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads per-thread CPU time from /proc")
def test_cpu_kernels_use_several_threads(native):
    """A chunked CPU kernel spreads its chunks over the intra-op threads: with 2 threads, a second
    thread spends CPU time inside the op (the library is built with torch's parallel backend; an
    OpenMP region compiled without it runs on the calling thread alone). Per-thread CPU time, not
    wall time: a loaded machine slows both threads but does not move the work off either."""
    x = make_inputs(4, 64, 2048, seed=192, mask="holes").to(torch.float32)
    mask = x.mask.to(torch.bool)
    gae = torch.ops.pama_ext.multi_gae
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        gae(x.rewards, x.values, mask, 1.0, 0.95)  # starts the thread pool
        me = threading.get_native_id()
        before = _thread_cpu_ticks()
        deadline = time.monotonic() + 60.0
        # only the raw op in the loop: no other torch op could account for a second busy thread
        while _thread_cpu_ticks().get(me, 0) - before.get(me, 0) < 40 and time.monotonic() < deadline:
            for _ in range(10):
                gae(x.rewards, x.values, mask, 1.0, 0.95)
        after = _thread_cpu_ticks()
    finally:
        torch.set_num_threads(prev)
    busy = {tid: after[tid] - before.get(tid, 0) for tid in after}
    mine = busy.get(me, 0)
    assert mine >= 40, f"the calling thread got only {mine} ticks of CPU time in 60 s"
    others = sorted((d for tid, d in busy.items() if tid != me), reverse=True)
    assert others and others[0] >= mine // 4, (
        f"multi_gae ran on one thread: calling thread {mine} ticks, other threads {others[:4]}"
    )


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
