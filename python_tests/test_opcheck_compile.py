"""torch.library.opcheck of every raw op (schema, autograd registration, fake tensor, AOT dispatch)
and torch.compile(fullgraph=True) of a PPO step chaining the ops, compared with eager.

Arguments of the raw ops are built from their runtime schemas by argument name, so a schema change
shows up here as a failure naming the unknown argument rather than as a silently skipped check.
"""
from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

from pama_ext import ops
from pama_testutils import make_inputs, require_native

PUBLIC_OPS = ["token_rewards", "multi_gae", "objective_moments", "objective_stats", "pareto_weights",
              "pama_policy_loss", "multi_value_loss"]
BACKWARD_OPS = ["multi_gae_backward", "pama_policy_loss_backward", "multi_value_loss_backward"]
#: preference-data ops, opchecked in test_preference_ops.py
PREFERENCE_OPS = ["multi_dpo_loss", "multi_dpo_loss_backward", "gradient_gram", "combine_gradients", "gram_weights"]
#: inputs that carry a gradient, per differentiable op
DIFFERENTIABLE = {
    "token_rewards": ("scores", "old_logp", "ref_logp"),
    "multi_gae": ("rewards", "values"),
    "pama_policy_loss": ("logp",),
    "multi_value_loss": ("values",),
}
#: options of the Python API with non-default values, to get past the trivial paths
OPTIONS = dict(beta_kl=0.05, gamma=0.99, lam=0.9, eps_hi=0.25, eps_lo=0.15, whiten=True, noon=True,
               dual_clip=3.0, method="pama", granularity="sequence", agg="seq-mean-token-mean",
               beta_loss=0.1, check_finite=True, clip=0.2, cagrad_c=0.7)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pool(dtype, device, seed=0):
    x = make_inputs(3, 4, 19, seed=seed, mask="holes").to(dtype, device)
    pool = dict(x.dict())
    pool.update(OPTIONS)
    st = ops.objective_stats(x.advantages, x.logp, x.old_logp, x.mask)
    pool["stats"] = st
    pool["global_stats"] = None  # the data-parallel inputs (algorithms §8) are None here; see test_opcheck_global_inputs
    pool["moments"] = None
    pool["denominators"] = None
    pool["with_gram"] = True
    pool["prefs"] = None
    pool["return_a_tilde"] = True
    g = torch.Generator().manual_seed(seed + 1)
    pool["grad_advantages"] = torch.randn(x.values.shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    pool["grad_returns"] = torch.randn(x.values.shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    pool["grad_loss"] = torch.tensor(1.3, dtype=_acc(dtype), device=device)
    # forward residuals needed by the backward ops
    schema = torch.ops.pama_ext.pama_policy_loss.default._schema
    out = torch.ops.pama_ext.pama_policy_loss.default(*_args(schema, pool))
    names = [r.name for r in schema.returns]
    pool.update({k: v for k, v in zip(names, out) if k in ("a_tilde", "row_scale")})
    vschema = torch.ops.pama_ext.multi_value_loss.default._schema
    vout = torch.ops.pama_ext.multi_value_loss.default(*_args(vschema, pool))
    pool["value_row_scale"] = dict(zip([r.name for r in vschema.returns], vout))["row_scale"]
    return pool


def _args(schema, pool, op_name=None, rename=None):
    args = []
    for a in schema.arguments:
        key = (rename or {}).get(a.name, a.name)
        if key not in pool:
            pytest.fail(f"{schema.name}: argument {a.name!r} unknown to the test (schema: {schema})")
        args.append(pool[key])
    return tuple(args)


def _opcheck_device(device):
    require_native()
    return device


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", PUBLIC_OPS)
def test_opcheck_public_ops(device, name, dtype, requires_grad):
    _opcheck_device(device)
    if requires_grad and name not in DIFFERENTIABLE:
        pytest.skip(f"{name} is not differentiable")
    pool = _pool(dtype, device)
    if requires_grad:
        for k in DIFFERENTIABLE[name]:
            pool[k] = pool[k].detach().clone().requires_grad_(True)
    op = getattr(torch.ops.pama_ext, name).default
    args = _args(op._schema, pool)
    opcheck(op, args)


@pytest.mark.parametrize("method,granularity", [("pama", "token"), ("pama", "batch"), ("linear", "token"),
                                                ("mgda", "batch"), ("cagrad", "batch"), ("raco", "batch"),
                                                ("pcgrad", "batch")])
def test_opcheck_policy_loss_variants(device, method, granularity):
    _opcheck_device(device)
    pool = _pool(torch.float64, device, seed=3)
    pool.update(method=method, granularity=granularity, agg="token-mean", ref_logp=None, beta_loss=0.0)
    if method in ("linear", "cagrad", "raco"):
        pool["prefs"] = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64, device=device)
    pool["logp"] = pool["logp"].detach().clone().requires_grad_(True)
    op = torch.ops.pama_ext.pama_policy_loss.default
    opcheck(op, _args(op._schema, pool))
    op = torch.ops.pama_ext.pareto_weights.default
    opcheck(op, _args(op._schema, pool))


@pytest.mark.parametrize("method,granularity", [("linear", "token"), ("pama", "sequence")])
def test_opcheck_policy_loss_without_a_tilde(device, method, granularity):
    """return_a_tilde=False (what the entry point asks for): an empty a_tilde, in the fake too."""
    _opcheck_device(device)
    pool = _pool(torch.float32, device, seed=4)
    pool.update(method=method, granularity=granularity, return_a_tilde=False)
    pool["logp"] = pool["logp"].detach().clone().requires_grad_(True)
    op = torch.ops.pama_ext.pama_policy_loss.default
    opcheck(op, _args(op._schema, pool))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_global_inputs(device, dtype):
    """The ops with supplied global statistics / moments / denominators (data parallelism)."""
    device = _opcheck_device(device)
    pool = _pool(dtype, device)
    st = torch.ops.pama_ext.objective_stats.default(*_args(torch.ops.pama_ext.objective_stats.default._schema, pool))
    n = pool["advantages"].shape[0]
    pool["global_stats"] = st
    pool["moments"] = st[: 2 + 2 * n].clone()
    pool["denominators"] = st[:2].clone()
    pool["with_gram"] = False
    for name in ("objective_stats", "pama_policy_loss", "multi_value_loss"):
        op = getattr(torch.ops.pama_ext, name).default
        if name != "objective_stats":
            pool["logp"] = pool["logp"].detach().requires_grad_(True)
            pool["values"] = pool["values"].detach().requires_grad_(True)
        opcheck(op, _args(op._schema, pool))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", BACKWARD_OPS)
def test_opcheck_backward_ops(device, name, dtype):
    _opcheck_device(device)
    pool = _pool(dtype, device)
    if not hasattr(torch.ops.pama_ext, name):
        pytest.skip(f"no raw op {name}")
    op = getattr(torch.ops.pama_ext, name).default
    rename = {"row_scale": "value_row_scale"} if name == "multi_value_loss_backward" else None
    opcheck(op, _args(op._schema, pool, rename=rename))


def test_all_registered_ops_are_checked():
    require_native()
    names = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("pama_ext::")}
    # tensor-free introspection ops (no kernel to check; test_vocab.py tests what they return)
    introspection = {"has_cuda_kernels", "weighting_methods", "stats_layout"}
    unchecked = names - set(PUBLIC_OPS) - set(BACKWARD_OPS) - set(PREFERENCE_OPS) - introspection
    assert not unchecked, f"raw ops without an opcheck test: {sorted(unchecked)}"


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------
def ppo_step(scores, old_logp, ref_logp, mask, values, old_values, logp, method: str, granularity: str):
    rewards = ops.token_rewards(scores, old_logp, ref_logp, mask, beta_kl=0.05)
    adv, ret = ops.multi_gae(rewards, values.detach(), mask, gamma=1.0, lam=0.95)
    ploss, pm = ops.pama_policy_loss(logp, old_logp, adv, mask, ref_logp, method=method, granularity=granularity,
                                     beta_loss=0.1, agg="seq-mean-token-mean")
    vloss, vm = ops.multi_value_loss(values, old_values, ret, mask, clip=0.2)
    stats = ops.objective_stats(adv, logp, old_logp, mask)
    w = ops.pareto_weights(stats, "mgda", "batch")
    return ploss + 0.5 * vloss, pm["weights"], pm["clipfrac"], vm["head_loss"], adv, ret, w


def _run_step(fn, x, method, granularity):
    logp = x.logp.detach().clone().requires_grad_(True)
    values = x.values.detach().clone().requires_grad_(True)
    out = fn(x.scores, x.old_logp, x.ref_logp, x.mask, values, x.old_values, logp, method, granularity)
    out[0].backward()
    return [o.detach() for o in out] + [logp.grad, values.grad]


@pytest.mark.parametrize("method,granularity", [("pama", "token"), ("mgda", "batch")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_compile_fullgraph_matches_eager(device, dtype, method, granularity):
    require_native()
    torch._dynamo.reset()
    x = make_inputs(3, 4, 23, seed=7, mask="holes").to(dtype, device)
    eager = _run_step(ppo_step, x, method, granularity)
    compiled = torch.compile(ppo_step, fullgraph=True, backend="aot_eager")
    got = _run_step(compiled, x, method, granularity)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for i, (a, b) in enumerate(zip(got, eager)):
        torch.testing.assert_close(a, b, **tol, msg=f"output {i}")


def test_compile_dynamic_shapes(device):
    require_native()
    torch._dynamo.reset()
    compiled = torch.compile(ppo_step, fullgraph=True, backend="aot_eager", dynamic=True)
    for n, B, T in ((2, 3, 17), (3, 5, 29), (1, 2, 40)):
        x = make_inputs(n, B, T, seed=B, mask="random").to(torch.float64, device)
        got = _run_step(compiled, x, "pama", "sequence")
        want = _run_step(ppo_step, x, "pama", "sequence")
        for i, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"{(n, B, T)} output {i}")


def test_compile_inductor(device):
    """The default backend (inductor) too: the ops stay opaque calls inside generated code."""
    require_native()
    torch._dynamo.reset()
    x = make_inputs(2, 3, 15, seed=8, mask="holes").to(torch.float32, device)
    eager = _run_step(ppo_step, x, "pama", "batch")
    got = _run_step(torch.compile(ppo_step, fullgraph=True), x, "pama", "batch")
    for i, (a, b) in enumerate(zip(got, eager)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"output {i}")
