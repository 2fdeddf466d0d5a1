"""Every op of pama_ext.ops against pama_ext.reference (DESIGN.md "Tests").

float64: forward, every metric and every gradient within ~1e-7 relative of the float64 reference.
float32 / bfloat16 / float16: the tolerance rule, max|kernel - ref64| <= 2 max|ref_dtype - ref64| +
floor, where ref64 is the reference in float64 on the same (rounded) inputs and ref_dtype the
reference run in the kernel's dtype. Plus gradcheck (float64, CPU) and bitwise determinism.

Without the compiled library, pama_ext.ops falls back to the reference and these comparisons are
vacuous; the low-precision tests (whose output-dtype contract only the kernels keep) then skip.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import pama_ext
from pama_ext import ops
from pama_ext import reference as ref
from op_runners import run_multi_gae, run_objective_stats, run_policy_loss, run_token_rewards, run_value_loss
from pama_testutils import (
    COMBOS,
    LOWP_DTYPES,
    NS,
    SHAPES,
    acc_dtype,
    compare,
    make_inputs,
    require_native,
)

F64 = torch.float64


def compare_all(got: dict, want64: dict, want_lowp: dict = None, dtype=F64, skip=()):
    assert set(want64) <= set(got), f"missing outputs: {set(want64) - set(got)}"
    for k, w in want64.items():
        if k in skip:
            continue
        g = got[k]
        assert g is not None, f"{k}: no gradient from the kernel"
        compare(k, g, w, None if want_lowp is None else want_lowp[k], dtype)


def check_dtypes(got: dict, dtype, device, acc_keys=(), io_keys=()):
    for k in acc_keys:
        assert got[k].dtype == acc_dtype(dtype), f"{k}: dtype {got[k].dtype}, want {acc_dtype(dtype)}"
        assert got[k].device.type == torch.device(device).type, f"{k} on {got[k].device}"
    for k in io_keys:
        assert got[k].dtype == dtype, f"{k}: dtype {got[k].dtype}, want {dtype}"
        assert got[k].device.type == torch.device(device).type, f"{k} on {got[k].device}"


def test_native_library_loaded():
    """Under PAMA_EXT_REQUIRE_NATIVE=1 the compiled library must be what is being tested."""
    require_native()
    assert pama_ext.NATIVE_AVAILABLE
    assert hasattr(torch.ops.pama_ext, "pama_policy_loss")


def test_native_import_does_not_depend_on_import_order():
    """`import pama_ext` as the first import of a process must load the compiled library too."""
    require_native()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PAMA_EXT_REQUIRE_NATIVE", None)
    code = "import pama_ext, sys; sys.stdout.write(str(pama_ext.NATIVE_AVAILABLE) + ' ' + str(pama_ext.NATIVE_ERROR))"
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=root, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("True"), f"fresh `import pama_ext` did not load the library: {res.stdout}"


def test_public_api_reexported():
    for name in ("token_rewards", "multi_gae", "objective_stats", "pareto_weights", "pama_policy_loss",
                 "multi_value_loss", "PamaPolicyLoss", "MultiValueLoss", "NATIVE_AVAILABLE"):
        assert hasattr(pama_ext, name), name
    for name in ("token_rewards", "multi_gae", "objective_stats", "pareto_weights", "pama_policy_loss",
                 "multi_value_loss"):
        assert getattr(pama_ext, name) is getattr(ops, name)
        assert hasattr(ref, name)


# ----------------------------------------------------------------------------------------------
# token_rewards
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta_kl", [0.0, 0.05])
@pytest.mark.parametrize("mask_kind", ["random", "holes"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n", NS)
def test_token_rewards_f64(device, n, shape, mask_kind, beta_kl):
    x = make_inputs(n, *shape, seed=n * 7 + shape[1], mask=mask_kind)
    got = run_token_rewards(ops, x.to(device=device), beta_kl)
    want = run_token_rewards(ref, x, beta_kl)
    check_dtypes(got, F64, device, io_keys=["rewards", "grad_scores", "grad_old_logp", "grad_ref_logp"])
    compare_all(got, want)


@pytest.mark.parametrize("dtype", LOWP_DTYPES, ids=str)
@pytest.mark.parametrize("n", [2, 8])
def test_token_rewards_lowp(native, device, n, dtype):
    x = make_inputs(n, 5, 130, dtype=dtype, seed=3)
    got = run_token_rewards(ops, x.to(device=device), 0.05)
    check_dtypes(got, dtype, device, io_keys=["rewards", "grad_scores", "grad_old_logp", "grad_ref_logp"])
    compare_all(got, run_token_rewards(ref, x.as64(), 0.05), run_token_rewards(ref, x, 0.05), dtype)


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


# ----------------------------------------------------------------------------------------------
# objective_stats and pareto_weights
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("whiten,noon", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n", NS)
def test_objective_stats_f64(device, n, shape, whiten, noon):
    mask_kind = ("random", "holes")[(n + whiten + noon) % 2]
    x = make_inputs(n, *shape, seed=n * 13 + shape[1], mask=mask_kind)
    x.logp = x.old_logp + 0.3 * torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    kw = dict(eps_hi=0.15, whiten=whiten, noon=noon)
    got = run_objective_stats(ops, x.to(device=device), **kw)
    assert got["stats"].shape == ((n + 3) ** 2 - 7,)
    check_dtypes(got, F64, device, acc_keys=["stats"])
    compare_all(got, run_objective_stats(ref, x, **kw))


@pytest.mark.parametrize("mask_kind", ["empty", "full"])
@pytest.mark.parametrize("n", [1, 3])
def test_objective_stats_masks_f64(device, n, mask_kind):
    x = make_inputs(n, 4, 29, seed=n + 3, mask=mask_kind)
    for whiten, noon in ((True, True), (False, False)):
        got = run_objective_stats(ops, x.to(device=device), whiten=whiten, noon=noon)
        compare_all(got, run_objective_stats(ref, x, whiten=whiten, noon=noon))


@pytest.mark.parametrize("dtype", LOWP_DTYPES, ids=str)
@pytest.mark.parametrize("n", [2, 8])
def test_objective_stats_lowp(native, device, n, dtype):
    x = make_inputs(n, 5, 130, dtype=dtype, seed=8)
    got = run_objective_stats(ops, x.to(device=device))
    check_dtypes(got, dtype, device, acc_keys=["stats"])
    compare_all(got, run_objective_stats(ref, x.as64()), run_objective_stats(ref, x), dtype)


def _prefs(n, dtype=F64):
    return torch.linspace(1.0, 2.0, n, dtype=dtype) / n  # not uniform, not summing to 1


@pytest.mark.parametrize("method,granularity,with_prefs",
                         [(m, g, False) for m, g in COMBOS] + [("linear", g, True) for g in ref.GRANULARITIES])
@pytest.mark.parametrize("noon", [True, False])
@pytest.mark.parametrize("n", NS)
def test_pareto_weights_f64(device, n, noon, method, granularity, with_prefs):
    x = make_inputs(n, 5, 41, seed=n + 17, mask="holes")
    stats = ref.objective_stats(x.advantages, x.logp, x.old_logp, x.mask, noon=noon)
    prefs = _prefs(n) if with_prefs else None
    got = ops.pareto_weights(stats.to(device), method, granularity, None if prefs is None else prefs.to(device))
    want = ref.pareto_weights(stats, method, granularity, prefs)
    assert got.dtype == F64 and got.shape == (n,)
    compare("weights", got, want)


@pytest.mark.parametrize("method,granularity", COMBOS)
@pytest.mark.parametrize("n", [2, 3, 8])
def test_pareto_weights_f32_stats(device, n, method, granularity):
    """Weights from the float32 statistics the kernels produce for fp32/bf16/fp16 inputs."""
    x = make_inputs(n, 5, 41, seed=n + 19)
    stats32 = ref.objective_stats(x.advantages, x.logp, x.old_logp, x.mask).float()
    got = ops.pareto_weights(stats32.to(device), method, granularity)
    assert got.dtype == torch.float32
    compare("weights", got, ref.pareto_weights(stats32.double(), method, granularity),
            ref.pareto_weights(stats32, method, granularity), torch.float32)


@pytest.mark.parametrize("n", [3, 4, 8])
def test_pareto_weights_mgda_degenerate_grams(device, n):
    """MGDA on statistics whose Gram matrix is singular (few tokens, zero columns)."""
    for seed, (B, T) in enumerate([(1, 1), (1, 2), (2, 2), (1, 5)]):
        x = make_inputs(n, B, T, seed=seed, mask="full")
        for noon in (True, False):
            stats = ref.objective_stats(x.advantages, x.logp, x.old_logp, x.mask, noon=noon)
            got = ops.pareto_weights(stats.to(device), "mgda", "batch")
            compare(f"weights B={B} T={T} noon={noon}", got, ref.pareto_weights(stats, "mgda", "batch"))


# ----------------------------------------------------------------------------------------------
# pama_policy_loss
# ----------------------------------------------------------------------------------------------
POLICY_IO = dict(acc_keys=["loss", "pg_loss", "kl_loss", "clipfrac", "approx_kl", "active", "abar", "pos",
                           "weights"], io_keys=["grad_logp"])


def _widen_ratio(x, scale=0.3, seed=1):
    """logp further from old_logp, so both PPO clips (and the dual clip) are exercised."""
    g = torch.Generator().manual_seed(seed)
    x.logp = (x.old_logp.double() + scale * torch.randn(x.logp.shape, generator=g, dtype=F64)).to(x.logp.dtype)
    return x


@pytest.mark.parametrize("method,granularity", COMBOS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n", NS)
def test_policy_loss_grid_f64(device, n, shape, method, granularity):
    # agg cycles with the grid position, so that every (method, granularity, agg) triple and every
    # (n, shape, agg) triple is covered without the full cross product
    agg = ref.AGG_MODES[(NS.index(n) + SHAPES.index(shape) + COMBOS.index((method, granularity))) % 3]
    x = _widen_ratio(make_inputs(n, *shape, seed=n * 3 + shape[1]))
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
    x = _widen_ratio(make_inputs(n, 3, 47, seed=n + 100, mask="holes"), scale=0.5)
    kw = dict(method=method, granularity=granularity, agg=agg, noon=noon, whiten=whiten)
    got = run_policy_loss(ops, x.to(device=device), **kw)
    compare_all(got, run_policy_loss(ref, x, **kw))


@pytest.mark.parametrize("mask_kind", ["holes", "full", "empty"])
@pytest.mark.parametrize("method,granularity", [("pama", "token"), ("pama", "sequence"), ("pama", "batch"),
                                                ("linear", "token"), ("mgda", "batch")])
@pytest.mark.parametrize("n", [2, 8])
def test_policy_loss_masks_f64(device, n, method, granularity, mask_kind):
    x = _widen_ratio(make_inputs(n, 4, 29, seed=n + 7, mask=mask_kind))
    for noon in (True, False):
        kw = dict(method=method, granularity=granularity, noon=noon, agg="seq-mean-token-mean")
        got = run_policy_loss(ops, x.to(device=device), **kw)
        compare_all(got, run_policy_loss(ref, x, **kw))


@pytest.mark.parametrize("beta_loss", [0.1, 0.0])
@pytest.mark.parametrize("agg", ref.AGG_MODES)
@pytest.mark.parametrize("method,granularity", [("pama", "token"), ("pama", "batch"), ("mgda", "sequence")])
@pytest.mark.parametrize("n", [1, 3])
def test_policy_loss_kl_f64(device, n, method, granularity, agg, beta_loss):
    x = _widen_ratio(make_inputs(n, 3, 47, seed=n + 23))
    kw = dict(method=method, granularity=granularity, agg=agg, beta_loss=beta_loss, use_ref=True)
    got = run_policy_loss(ops, x.to(device=device), **kw)
    want = run_policy_loss(ref, x, **kw)
    if beta_loss > 0:
        assert want["kl_loss"].item() > 0
    compare_all(got, want)


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_policy_loss_linear_prefs_f64(device, n):
    x = _widen_ratio(make_inputs(n, 5, 41, seed=n + 31, mask="holes"))
    for noon in (True, False):
        kw = dict(method="linear", noon=noon, prefs=_prefs(n))
        got = run_policy_loss(ops, x.to(device=device), **kw)
        compare_all(got, run_policy_loss(ref, x, **kw))


@pytest.mark.parametrize("dual_clip", [3.0, 1.5, None])
@pytest.mark.parametrize("eps_lo,eps_hi", [(0.2, 0.2), (0.1, 0.28), (0.3, 0.05)])
def test_policy_loss_clip_params_f64(device, eps_lo, eps_hi, dual_clip):
    x = _widen_ratio(make_inputs(3, 5, 37, seed=41), scale=0.6)
    for method, noon in (("pama", True), ("linear", False), ("mgda", False)):
        kw = dict(method=method, granularity="token", noon=noon, eps_lo=eps_lo, eps_hi=eps_hi)
        got = run_policy_loss(ops, x.to(device=device), dual_clip=dual_clip, **kw)
        want = run_policy_loss(ref, x, dual_clip=math.inf if dual_clip is None else dual_clip, **kw)
        compare_all(got, want)


@pytest.mark.parametrize("method,granularity", [("pama", "token"), ("pama", "sequence"), ("mgda", "batch")])
def test_policy_loss_long_rows_f64(device, method, granularity):
    """Rows longer than a CUDA chunk (1024 tokens): the chunked reductions and their combination."""
    x = _widen_ratio(make_inputs(3, 3, 2500, seed=43))
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
    x = _widen_ratio(make_inputs(n, *shape, dtype=dtype, seed=n + shape[1]))
    kw = dict(method=method, granularity=granularity, agg=agg, beta_loss=0.05, use_ref=True)
    got = run_policy_loss(ops, x.to(device=device), **kw)
    check_dtypes(got, dtype, device, **POLICY_IO)
    compare_all(got, run_policy_loss(ref, x.as64(), **kw), run_policy_loss(ref, x, **kw), dtype)


@pytest.mark.parametrize("dtype", LOWP_DTYPES, ids=str)
def test_policy_loss_lowp_no_noon(native, device, dtype):
    x = _widen_ratio(make_inputs(3, 5, 130, dtype=dtype, seed=77, mask="holes"), scale=0.5)
    for method in ("pama", "linear", "mgda"):
        kw = dict(method=method, noon=False, agg="seq-mean-token-mean")
        got = run_policy_loss(ops, x.to(device=device), **kw)
        compare_all(got, run_policy_loss(ref, x.as64(), **kw), run_policy_loss(ref, x, **kw), dtype)


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


# ----------------------------------------------------------------------------------------------
# mask dtypes: bool / uint8 / int / float masks are the same mask
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.int32, torch.int64, torch.float64, torch.float32],
                         ids=str)
def test_mask_dtypes_equivalent(device, mask_dtype):
    x = make_inputs(3, 4, 21, seed=10, mask="holes")
    xb = x.to(device=device)
    xm = x.to(device=device)
    # nonzero = in: use values other than 1 for the numeric masks
    xm.mask = (x.mask.to(mask_dtype) * 3).to(device)
    if mask_dtype.is_floating_point:
        xm.mask = (x.mask.to(mask_dtype) * 0.5).to(device)
    for runner, kw in ((run_token_rewards, dict(beta_kl=0.1)), (run_multi_gae, {}), (run_objective_stats, {}),
                       (run_policy_loss, dict(method="pama", granularity="sequence", agg="seq-mean-token-mean")),
                       (run_value_loss, {})):
        a, b = runner(ops, xb, **kw), runner(ops, xm, **kw)
        for k in a:
            assert torch.equal(a[k], b[k]), (runner.__name__, k)


# ----------------------------------------------------------------------------------------------
# gradcheck (float64, CPU)
# ----------------------------------------------------------------------------------------------
GC = dict(eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(method="pama", granularity="sequence", agg="seq-mean-token-mean"),
    dict(method="mgda", agg="seq-mean-token-sum", beta_loss=0.2),
    dict(method="linear", noon=False, whiten=False, dual_clip=1.5),
    dict(method="pama", granularity="batch", noon=False, beta_loss=0.1),
], ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()) or "default")
def test_gradcheck_policy_loss(kw):
    x = _widen_ratio(make_inputs(3, 3, 7, seed=51, mask="holes"), scale=0.4)
    ref_logp = x.ref_logp if kw.get("beta_loss") else None

    def f(logp):
        return ops.pama_policy_loss(logp, x.old_logp, x.advantages, x.mask, ref_logp, **kw)[0]

    assert torch.autograd.gradcheck(f, (x.logp.clone().requires_grad_(True),), **GC)


@pytest.mark.parametrize("clip,agg", [(0.2, "token-mean"), (None, "seq-mean-token-mean"), (0.1, "seq-mean-token-sum")])
def test_gradcheck_value_loss(clip, agg):
    x = make_inputs(3, 3, 7, seed=52, mask="holes")

    def f(values):
        return ops.multi_value_loss(values, x.old_values, x.returns, x.mask, clip=clip, agg=agg)[0]

    assert torch.autograd.gradcheck(f, (x.values.clone().requires_grad_(True),), **GC)


@pytest.mark.parametrize("gamma,lam", GAE_PARAMS)
def test_gradcheck_multi_gae(gamma, lam):
    x = make_inputs(2, 3, 9, seed=53, mask="holes")

    def f(rewards, values):
        return ops.multi_gae(rewards, values, x.mask, gamma=gamma, lam=lam)

    args = (x.rewards.clone().requires_grad_(True), x.values.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(f, args, **GC)


@pytest.mark.parametrize("beta_kl", [0.0, 0.3])
def test_gradcheck_token_rewards(beta_kl):
    x = make_inputs(2, 3, 9, seed=54, mask="random")

    def f(scores, old_logp, ref_logp):
        return ops.token_rewards(scores, old_logp, ref_logp, x.mask, beta_kl=beta_kl)

    args = tuple(t.clone().requires_grad_(True) for t in (x.scores, x.old_logp, x.ref_logp))
    assert torch.autograd.gradcheck(f, args, **GC)


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
# determinism
# ----------------------------------------------------------------------------------------------
def _all_outputs(x, **policy_kw):
    out = {}
    for name, res in (("tr", run_token_rewards(ops, x, 0.1)), ("gae", run_multi_gae(ops, x)),
                      ("st", run_objective_stats(ops, x)), ("pl", run_policy_loss(ops, x, use_ref=True,
                                                                                  beta_loss=0.1, **policy_kw)),
                      ("vl", run_value_loss(ops, x))):
        out.update({f"{name}.{k}": v for k, v in res.items()})
    return out


@pytest.mark.parametrize("method,granularity", [("pama", "token"), ("pama", "sequence"), ("mgda", "batch")])
@pytest.mark.parametrize("size", [(3, 3, 47), (4, 16, 3000)], ids=str)
def test_deterministic_bitwise(device, size, method, granularity):
    x = _widen_ratio(make_inputs(*size, seed=61, mask="holes")).to(torch.float32, device)
    a = _all_outputs(x, method=method, granularity=granularity)
    b = _all_outputs(x, method=method, granularity=granularity)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between two identical calls"


# ----------------------------------------------------------------------------------------------
# edge cases
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,granularity", [("pama", "token"), ("pama", "sequence"), ("pama", "batch"),
                                                ("linear", "batch"), ("mgda", "batch")])
def test_policy_loss_many_objectives_f64(device, method, granularity):
    """n = 64 (the maximum). More masked-in tokens than objectives: with fewer, the 64 indicator
    vectors have 0 in their convex hull (noon=False), MGDA's exact combined advantage is 0 up to
    rounding on every unclipped token, and the clip metrics would count the sign of rounding noise."""
    x = _widen_ratio(make_inputs(64, 3, 45, seed=301, mask="holes"))
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


@pytest.mark.parametrize("B,T", [(1, 1), (1, 2), (2, 1), (2, 2), (1, 3)])
def test_tiny_batches_f64(device, B, T):
    """One or two tokens: var = 0 when count <= 1 (no 0/0), unbiased variance with count = 2."""
    for n in (1, 3):
        x = make_inputs(n, B, T, seed=303 + B + T, mask="full")
        for kw in (dict(), dict(noon=False), dict(method="mgda"), dict(granularity="sequence", whiten=False)):
            compare_all(run_policy_loss(ops, x.to(device=device), **kw), run_policy_loss(ref, x, **kw))
        compare_all(run_objective_stats(ops, x.to(device=device)), run_objective_stats(ref, x))


def test_large_batch_f64(device):
    """More rows than threads and rows longer than a CUDA chunk, in float64."""
    x = _widen_ratio(make_inputs(3, 48, 1500, seed=304, mask="random"))
    for kw in (dict(method="pama", granularity="sequence", agg="seq-mean-token-mean"), dict(method="mgda")):
        compare_all(run_policy_loss(ops, x.to(device=device), **kw), run_policy_loss(ref, x, **kw))
    compare_all(run_value_loss(ops, x.to(device=device), agg="seq-mean-token-sum"),
                run_value_loss(ref, x, agg="seq-mean-token-sum"))


def test_value_loss_metrics_carry_no_gradient(device):
    x = make_inputs(2, 3, 11, seed=305).to(device=device)
    v = x.values.clone().requires_grad_(True)
    loss, m = ops.multi_value_loss(v, x.old_values, x.returns, x.mask)
    assert loss.requires_grad
    for k, t in m.items():
        assert not t.requires_grad, f"metric {k} carries a gradient"


# ----------------------------------------------------------------------------------------------
# huge finite advantages: the float32 moments must not overflow where the variance fits
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1e19, 3e18])
def test_huge_finite_advantages_f32(device, scale):
    """float32 advantages ~1e19: Σ (a - mean)² overflows float32 although the variance (~1e38)
    fits. The moments used to come back +inf, whitening divided every advantage to 0, and the loss
    and gradient were 0 without an error; the scaled moments keep every output right."""
    x = _widen_ratio(make_inputs(2, 5, 130, seed=71, mask="holes")).to(torch.float32)
    x.advantages = x.advantages * scale
    x64 = x.as64()
    count, _, var64 = ref.masked_moments(x64.advantages, x64.mask)
    f32max = torch.finfo(torch.float32).max
    assert (var64 < f32max).all() and ((count - 1) * var64 > f32max).all()  # fits; the plain sum does not
    for kw in (dict(method="pama", granularity="token"), dict(method="linear", granularity="batch"),
               dict(method="mgda", granularity="batch")):
        got = run_policy_loss(ops, x.to(device=device), **kw)
        compare_all(got, run_policy_loss(ref, x64, **kw), run_policy_loss(ref, x, **kw), torch.float32)
        assert got["loss"].item() != 0 and got["grad_logp"].abs().max().item() > 0
    got = run_objective_stats(ops, x.to(device=device))
    compare_all(got, run_objective_stats(ref, x64), run_objective_stats(ref, x), torch.float32)
    # the float32 reference (the fallback path) is right as well
    moments32 = ref.objective_moments(x.advantages, x.mask)
    torch.testing.assert_close(moments32.double(), ref.objective_moments(x64.advantages, x64.mask), rtol=1e-5, atol=0)
    torch.testing.assert_close(ops.objective_moments(x.advantages.to(device), x.mask.to(device)).cpu().double(),
                               ref.objective_moments(x64.advantages, x64.mask), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------------------
# double backward: an error, not a second derivative that silently misses the op's term
# ----------------------------------------------------------------------------------------------
def _second_derivative(total, leaf):
    """d/dleaf of |d total / d leaf|²; ``total`` includes leaf³ so the first gradient always has a
    graph (without the check, the op's share of the second derivative was silently dropped)."""
    (g,) = torch.autograd.grad(total, leaf, create_graph=True)
    return torch.autograd.grad(g.square().sum(), leaf)


def test_double_backward_is_an_error(native):
    x = make_inputs(2, 3, 9, seed=3, mask="holes")
    cases = []
    logp = x.logp.clone().requires_grad_()
    loss, _ = ops.pama_policy_loss(logp, x.old_logp, x.advantages, x.mask, x.ref_logp, beta_loss=0.1)
    cases.append(("pama_policy_loss", loss, logp))
    values = x.values.clone().requires_grad_()
    loss, _ = ops.multi_value_loss(values, x.old_values, x.returns, x.mask)
    cases.append(("multi_value_loss", loss, values))
    rewards = x.rewards.clone().requires_grad_()
    adv, ret = ops.multi_gae(rewards, x.values, x.mask)
    cases.append(("multi_gae", (adv * ret).sum(), rewards))
    pc = -(20 + x.scores[0].abs()).clone().requires_grad_()
    losses, _ = pama_ext.multi_dpo_loss(pc, pc.detach() - 1, pc.detach() + 0.5, pc.detach() - 0.3,
                                        torch.tensor([[1, -1, 0]]))
    cases.append(("multi_dpo_loss", losses.sum(), pc))
    for name, out, leaf in cases:
        with pytest.raises(RuntimeError, match=rf"pama_ext\.{name}: double backward is not supported"):
            _second_derivative(out + leaf.pow(3).sum(), leaf)
        (g,) = torch.autograd.grad(out + leaf.pow(3).sum(), leaf, create_graph=True)  # first order still works
        assert torch.isfinite(g).all()
