"""Zero host synchronisation and CUDA-graph capture of a whole loss step (CUDA only).

Without a GPU every test here skips (``PAMA_EXT_REQUIRE_CUDA=1`` turns the skip into a failure,
through pama_testutils.resolve_device, as for the ``device`` fixture of conftest.py).

* ``test_invariants.test_no_host_sync_on_cuda`` already runs token_rewards -> multi_gae ->
  objective_stats -> pareto_weights -> policy loss (pama/token, pama/sequence, mgda/batch) fwd/bwd
  -> value loss fwd/bwd under ``torch.cuda.set_sync_debug_mode("error")`` in float32 with
  token-mean aggregation. ``test_loss_step_has_no_host_sync`` below adds what that test leaves
  out: bfloat16 and float16 inputs, the sequence aggregation modes, ``linear`` with preferences,
  pama/batch, noon/whiten off, and the nn.Module front ends.
* ``test_cuda_graph_replay_matches_eager`` captures token_rewards -> multi_gae ->
  pama_policy_loss fwd/bwd (+ multi_value_loss fwd/bwd) in a ``torch.cuda.CUDAGraph`` on static
  inputs, replays it after copying NEW values (new mask included) into the static tensors, and
  compares every output and gradient with an eager run on those new values.
"""
from __future__ import annotations

import pytest
import torch

import pama_ext
from pama_ext import ops
from pama_testutils import make_inputs, require_native, resolve_device

GAMMA, LAM, BETA_KL = 1.0, 0.95, 0.05


@pytest.fixture
def cuda():
    """'cuda' when a GPU and the CUDA kernels are there; skip otherwise (fail under
    PAMA_EXT_REQUIRE_CUDA=1). The fused kernels are what is tested here, so the compiled
    library is required too."""
    dev = resolve_device("cuda")
    require_native()
    return dev


# ----------------------------------------------------------------------------------------------
# zero host sync: the cases test_invariants.test_no_host_sync_on_cuda does not cover
# ----------------------------------------------------------------------------------------------
# (method, granularity, agg, extra options)
SYNC_CASES = [
    ("pama", "batch", "seq-mean-token-mean", {}),
    ("pama", "token", "seq-mean-token-sum", {"noon": False, "whiten": False}),
    ("linear", "batch", "seq-mean-token-mean", {"prefs": (0.2, 0.5, 0.3), "dual_clip": None}),
    ("mgda", "batch", "seq-mean-token-sum", {"beta_loss": 0.1}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_loss_step_has_no_host_sync(cuda, dtype):
    x = make_inputs(3, 8, 1500, dtype=dtype, device=cuda, seed=310, mask="holes")
    logp = x.logp.clone().requires_grad_(True)
    values = x.values.clone().requires_grad_(True)
    scores = x.scores.clone().requires_grad_(True)
    # modules are moved to the device before the step (a CPU prefs buffer would be copied H2D)
    modules = [
        pama_ext.PamaPolicyLoss(method="linear", granularity="batch", prefs=torch.tensor([0.6, 0.3, 0.1]),
                                check_finite=False).to(cuda),
        pama_ext.PamaPolicyLoss(method="pama", granularity="sequence", agg="seq-mean-token-mean",
                                check_finite=False),
    ]
    v_module = pama_ext.MultiValueLoss(clip=0.2, agg="seq-mean-token-sum", check_finite=False)
    prefs = [None if "prefs" not in o else torch.tensor(o["prefs"], dtype=dtype, device=cuda)
             for (_, _, _, o) in SYNC_CASES]
    g_out = torch.ones((), device=cuda)
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        r = ops.token_rewards(scores, x.old_logp, x.ref_logp, x.mask, beta_kl=BETA_KL)
        adv, ret = ops.multi_gae(r, values, x.mask, gamma=GAMMA, lam=LAM)
        st = ops.objective_stats(adv, logp, x.old_logp, x.mask, whiten=False, noon=False)
        w = [ops.pareto_weights(st, m, g) for m in ("pama", "mgda") for g in ("token", "sequence", "batch")]
        losses = []
        for (method, gran, agg, opts), p in zip(SYNC_CASES, prefs):
            opts = {k: v for k, v in opts.items() if k != "prefs"}
            loss, metrics = ops.pama_policy_loss(logp, x.old_logp, adv, x.mask, x.ref_logp, method=method,
                                                 granularity=gran, agg=agg, prefs=p, check_finite=False, **opts)
            losses.append(loss)
        for mod in modules:
            losses.append(mod(logp, x.old_logp, adv, x.mask)[0])
        vl, vm = v_module(values, x.old_values, ret.detach(), x.mask)
        total = sum(losses) + vl + 1e-3 * (adv.float().square().mean() + ret.float().mean())
        total.backward(g_out)
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    torch.cuda.synchronize()
    assert all(bool(torch.isfinite(t).all()) for t in w)
    assert torch.isfinite(total)
    for leaf in (logp, values, scores):
        assert leaf.grad is not None and leaf.grad.dtype == dtype and bool(torch.isfinite(leaf.grad).all())


# ----------------------------------------------------------------------------------------------
# CUDA graph: capture once, replay with new inputs, compare with eager
# ----------------------------------------------------------------------------------------------
def _step(scores, old_logp, ref_logp, mask, values, logp, new_values, method, granularity):
    """token_rewards -> multi_gae -> policy loss + value loss, forward and backward. Returns every
    output; gradients land in logp.grad / new_values.grad."""
    r = ops.token_rewards(scores, old_logp, ref_logp, mask, beta_kl=BETA_KL)
    adv, ret = ops.multi_gae(r, values, mask, gamma=GAMMA, lam=LAM)
    loss, metrics = ops.pama_policy_loss(logp, old_logp, adv, mask, ref_logp, method=method,
                                         granularity=granularity, beta_loss=0.05, check_finite=False)
    v_loss, v_metrics = ops.multi_value_loss(new_values, values, ret, mask, clip=0.2, check_finite=False)
    (loss + v_loss).backward()
    out = {"rewards": r, "advantages": adv, "returns": ret, "loss": loss, "v_loss": v_loss}
    out.update({f"m.{k}": v for k, v in metrics.items()})
    out.update({f"vm.{k}": v for k, v in v_metrics.items()})
    return out


def _inputs(n, B, T, dtype, device, seed):
    x = make_inputs(n, B, T, dtype=dtype, device=device, seed=seed, mask="random")
    # new_values: the value heads' current predictions (the value loss's differentiable input)
    return {"scores": x.scores, "old_logp": x.old_logp, "ref_logp": x.ref_logp, "mask": x.mask,
            "values": x.values, "logp": x.logp, "new_values": x.old_values}


def _tolerance(t: torch.Tensor):
    """Bitwise is expected (the same kernels, deterministic reductions); allow the rounding of
    the tensor's dtype in case a launch configuration differs between capture and eager."""
    eps = torch.finfo(t.dtype).eps
    return dict(rtol=2 * eps, atol=2 * eps)


def _compare(got, want, what):
    for k in want:
        g, w = got[k], want[k]
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what} {k}: {g.dtype}{tuple(g.shape)} vs {w.dtype}{tuple(w.shape)}"
        torch.testing.assert_close(g, w, **_tolerance(w), msg=lambda m: f"{what} {k}: graph replay vs eager\n{m}")


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method,granularity", [("pama", "token"), ("mgda", "batch")])
def test_cuda_graph_replay_matches_eager(cuda, method, granularity, dtype, n):
    B, T = 5, 1500  # T > the CUDA chunk length (1024): multi-chunk reductions are captured too
    static = _inputs(n, B, T, dtype, cuda, seed=400)
    for k in ("logp", "new_values"):
        static[k].requires_grad_(True)

    def run():
        return _step(**static, method=method, granularity=granularity)

    # warm up on a side stream (lazy initialisation must not happen during capture)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            static["logp"].grad = None
            static["new_values"].grad = None
            run()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    static["logp"].grad = None  # the captured backward allocates .grad from the graph's pool
    static["new_values"].grad = None
    with torch.cuda.graph(graph):
        out = run()
    out["grad_logp"] = static["logp"].grad
    out["grad_new_values"] = static["new_values"].grad

    graph.replay()
    torch.cuda.synchronize()
    first = {k: v.detach().clone() for k, v in out.items()}

    for seed in (401, 402):
        new = _inputs(n, B, T, dtype, cuda, seed=seed)
        with torch.no_grad():
            for k, v in new.items():
                static[k].copy_(v)
        graph.replay()
        torch.cuda.synchronize()
        got = {k: v.detach().clone() for k, v in out.items()}

        leaves = {k: v.clone() for k, v in new.items()}
        for k in ("logp", "new_values"):
            leaves[k].requires_grad_(True)
        want = _step(**leaves, method=method, granularity=granularity)
        want["grad_logp"] = leaves["logp"].grad
        want["grad_new_values"] = leaves["new_values"].grad
        want = {k: v.detach() for k, v in want.items()}

        _compare(got, want, f"seed {seed}")
        # the replay did use the new inputs (the mask changed too)
        assert not torch.equal(got["grad_logp"], first["grad_logp"])
        assert not torch.equal(got["loss"], first["loss"])
        assert torch.isfinite(got["loss"]) and bool(torch.isfinite(got["grad_logp"]).all())
