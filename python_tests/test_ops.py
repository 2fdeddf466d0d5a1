"""Checks across every op of pama_ext.ops (DESIGN.md "Tests"): the native library is loaded, the
public API, mask dtypes, bitwise determinism, tiny and large batches, overflow and double backward.

The per-op comparisons against pama_ext.reference (float64 within ~1e-7 relative; float32 / bfloat16 /
float16 by the tolerance rule, max|kernel - ref64| <= 2 max|ref_dtype - ref64| + floor) and the
gradchecks live in the per-op files: test_token_rewards.py, test_gae.py, test_stats.py,
test_policy_loss.py, test_value_loss.py.

Without the compiled library, pama_ext.ops falls back to the reference and these comparisons are
vacuous; the low-precision tests (whose output-dtype contract only the kernels keep) then skip.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import pama_ext
from pama_ext import ops
from pama_ext import reference as ref
from op_runners import run_multi_gae, run_objective_stats, run_policy_loss, run_token_rewards, run_value_loss
from pama_testutils import compare_all, make_inputs, require_native, widen_ratio


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
    x = widen_ratio(make_inputs(*size, seed=61, mask="holes")).to(torch.float32, device)
    a = _all_outputs(x, method=method, granularity=granularity)
    b = _all_outputs(x, method=method, granularity=granularity)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between two identical calls"


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
    x = widen_ratio(make_inputs(3, 48, 1500, seed=304, mask="random"))
    for kw in (dict(method="pama", granularity="sequence", agg="seq-mean-token-mean"), dict(method="mgda")):
        compare_all(run_policy_loss(ops, x.to(device=device), **kw), run_policy_loss(ref, x, **kw))
    compare_all(run_value_loss(ops, x.to(device=device), agg="seq-mean-token-sum"),
                run_value_loss(ref, x, agg="seq-mean-token-sum"))


# ----------------------------------------------------------------------------------------------
# huge finite advantages: the float32 moments must not overflow where the variance fits
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1e19, 3e18])
def test_huge_finite_advantages_f32(device, scale):
    """float32 advantages ~1e19: Σ (a - mean)² overflows float32 although the variance (~1e38)
    fits. The moments used to come back +inf, whitening divided every advantage to 0, and the loss
    and gradient were 0 without an error; the scaled moments keep every output right."""
    x = widen_ratio(make_inputs(2, 5, 130, seed=71, mask="holes")).to(torch.float32)
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
# return_a_tilde=False (the entry point): the same loss, metrics, coefficients and gradient, no Ã
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,granularity,whiten", [("linear", "token", False), ("pama", "token", True),
                                                       ("pama", "sequence", True), ("mgda", "batch", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_policy_loss_without_a_tilde_is_the_same_op(device, method, granularity, whiten, dtype):
    require_native()
    x = make_inputs(3, 5, 301, seed=11, mask="holes").to(dtype, device)
    op = torch.ops.pama_ext.pama_policy_loss

    def call(flag):
        logp = x.logp.detach().clone().requires_grad_(True)
        out = op(logp, x.old_logp, x.advantages, x.mask, x.ref_logp, None, 0.2, 0.25, 3.0, True, whiten, method,
                 granularity, "seq-mean-token-mean", 0.1, True, None, 0.4, flag)
        (g,) = torch.autograd.grad(out[0] * 1.7, logp)
        return out, g

    (with_a, g_with), (without, g_without) = call(True), call(False)
    assert with_a[2].shape == x.logp.shape and without[2].shape == (0,)
    for k in (0, 1, 3, 4):  # loss, metrics, row_scale, dlogp: bit for bit
        assert torch.equal(with_a[k], without[k]), k
    assert torch.equal(g_with, g_without)
    # and Ã is still what pama_policy_loss_backward takes: the op's own gradient, recomputed from it
    g_op = torch.ops.pama_ext.pama_policy_loss_backward(
        torch.tensor(1.7, dtype=with_a[0].dtype, device=device), x.logp, x.old_logp, x.ref_logp, x.mask, with_a[2],
        with_a[3], 0.2, 0.25, 3.0, 0.1)
    assert torch.equal(g_op, g_with)


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
