"""Bad input gives a clear error (RuntimeError or ValueError) whose message names the argument;
NaN/Inf on masked-in positions is an error by default (check_finite=True) and ignored on masked-out
positions; non-contiguous inputs give the same results as contiguous ones.
"""
from __future__ import annotations

import re

import pytest
import torch

from pama_ext import ops
from op_runners import run_multi_gae, run_objective_stats, run_policy_loss, run_token_rewards, run_value_loss
from pama_testutils import make_inputs, resolve_device

F64 = torch.float64
ERRORS = (RuntimeError, ValueError)

# argument checking is the compiled library's job: without it (pure-Python fallback) these tests
# are skipped, and fail under PAMA_EXT_REQUIRE_NATIVE=1
pytestmark = pytest.mark.usefixtures("native")


def names_arg(msg: str, arg: str) -> bool:
    """``arg`` appears as a word of its own ("logp" does not match inside "old_logp")."""
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(arg)}(?![A-Za-z0-9_])", msg) is not None


def expect_error(arg: str, fn, *args, **kwargs):
    with pytest.raises(ERRORS) as ei:
        fn(*args, **kwargs)
    msg = str(ei.value)
    assert names_arg(msg, arg), f"error message does not name {arg!r}: {msg!r}"
    return msg


def X(device, n=3, B=4, T=11, dtype=F64, mask="holes", seed=0):
    return make_inputs(n, B, T, seed=seed, mask=mask).to(dtype, device)


# every op, called with keyword-free positional tensors so a single argument can be swapped
def call_token_rewards(scores, old_logp, ref_logp, mask, **kw):
    return ops.token_rewards(scores, old_logp, ref_logp, mask, **kw)


def call_multi_gae(rewards, values, mask, **kw):
    return ops.multi_gae(rewards, values, mask, **kw)


def call_objective_stats(advantages, logp, old_logp, mask, **kw):
    return ops.objective_stats(advantages, logp, old_logp, mask, **kw)


def call_policy(logp, old_logp, advantages, mask, ref_logp=None, **kw):
    return ops.pama_policy_loss(logp, old_logp, advantages, mask, ref_logp, **kw)


def call_value(values, old_values, returns, mask, **kw):
    return ops.multi_value_loss(values, old_values, returns, mask, **kw)


OPS = {
    "token_rewards": (call_token_rewards, ("scores", "old_logp", "ref_logp", "mask")),
    "multi_gae": (call_multi_gae, ("rewards", "values", "mask")),
    "objective_stats": (call_objective_stats, ("advantages", "logp", "old_logp", "mask")),
    "pama_policy_loss": (call_policy, ("logp", "old_logp", "advantages", "mask", "ref_logp")),
    "multi_value_loss": (call_value, ("values", "old_values", "returns", "mask")),
}
PER_OBJECTIVE = {"scores", "rewards", "values", "advantages", "old_values", "returns"}


def args_of(x, op):
    fn, names = OPS[op]
    return fn, {k: getattr(x, k) for k in names}


def _call(fn, a, **kw):
    names = list(a)
    return fn(*[a[k] for k in names], **kw)


CASES = [(op, arg) for op, (_, names) in OPS.items() for arg in names]


# ----------------------------------------------------------------------------------------------
# rank, shape, dtype
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,arg", CASES)
def test_wrong_rank(device, op, arg):
    x = X(device)
    fn, a = args_of(x, op)
    a[arg] = a[arg].unsqueeze(0)  # one dimension too many
    expect_error(arg, _call, fn, a)
    fn, a = args_of(x, op)
    a[arg] = a[arg].reshape(-1)  # flattened
    expect_error(arg, _call, fn, a)


@pytest.mark.parametrize("op,arg", CASES)
def test_wrong_shape(device, op, arg):
    x = X(device)
    fn, a = args_of(x, op)
    t = a[arg]
    a[arg] = torch.cat([t, t[..., :1]], -1)  # T + 1
    expect_error(arg, _call, fn, a)
    fn, a = args_of(x, op)
    a[arg] = t[..., :-1, :] if t.dim() >= 2 and arg != "scores" else t[..., :-1]  # B - 1
    expect_error(arg, _call, fn, a)


@pytest.mark.parametrize("op,arg", [(op, arg) for op, arg in CASES if arg in ("old_values", "returns")])
def test_wrong_num_objectives(device, op, arg):
    x = X(device)
    fn, a = args_of(x, op)
    a[arg] = a[arg][:2]
    expect_error(arg, _call, fn, a)


def test_wrong_num_objectives_gae(device):
    x = X(device)
    expect_error("values", ops.multi_gae, x.rewards, x.values[:2], x.mask)


@pytest.mark.parametrize("bad_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("op,arg", [(op, arg) for op, arg in CASES if arg != "mask"])
def test_integer_float_argument(device, op, arg, bad_dtype):
    x = X(device)
    fn, a = args_of(x, op)
    a[arg] = (a[arg] * 10).to(bad_dtype)
    expect_error(arg, _call, fn, a)


@pytest.mark.parametrize("op,arg", [(op, arg) for op, arg in CASES if arg != "mask"])
def test_dtype_mismatch(device, op, arg):
    x = X(device)
    fn, a = args_of(x, op)
    a[arg] = a[arg].float()  # float32 among float64 arguments
    expect_error(arg, _call, fn, a)


@pytest.mark.parametrize("op,arg", [(op, arg) for op, arg in CASES if arg != "mask"])
def test_complex_argument(device, op, arg):
    x = X(device)
    fn, a = args_of(x, op)
    a[arg] = a[arg].to(torch.complex128)
    expect_error(arg, _call, fn, a)


@pytest.mark.parametrize("n", [0, 65, 100])
@pytest.mark.parametrize("op", ["token_rewards", "multi_gae", "objective_stats", "pama_policy_loss",
                                "multi_value_loss"])
def test_bad_number_of_objectives(device, op, n):
    x = X(device, n=max(n, 1) if n <= 64 else n, B=2, T=3)
    if n == 0:
        for k in PER_OBJECTIVE:
            setattr(x, k, getattr(x, k)[:0])
    fn, a = args_of(x, op)
    with pytest.raises(ERRORS) as ei:
        _call(fn, a)
    msg = str(ei.value)
    assert names_arg(msg, "n") or "objective" in msg, msg


def test_max_objectives_is_accepted(device):
    x = X(device, n=64, B=2, T=5)
    loss, m = ops.pama_policy_loss(x.logp, x.old_logp, x.advantages, x.mask, method="mgda")
    assert torch.isfinite(loss) and m["weights"].shape == (64,)


def test_pareto_weights_bad_stats(device):
    x = X(device)
    st = ops.objective_stats(x.advantages, x.logp, x.old_logp, x.mask)
    expect_error("stats", ops.pareto_weights, st[:-1])
    expect_error("stats", ops.pareto_weights, st.reshape(1, -1))
    expect_error("stats", ops.pareto_weights, torch.zeros(0, dtype=F64, device=device))
    n65 = torch.zeros((65 + 3) ** 2 - 7, dtype=F64, device=device)
    with pytest.raises(ERRORS) as ei:
        ops.pareto_weights(n65)
    assert names_arg(str(ei.value), "n") or names_arg(str(ei.value), "stats"), str(ei.value)
    expect_error("method", ops.pareto_weights, st, "pareto")
    expect_error("granularity", ops.pareto_weights, st, "pama", "row")
    expect_error("prefs", ops.pareto_weights, st, "linear", "batch", torch.ones(4, dtype=F64, device=device))
    expect_error("prefs", ops.pareto_weights, st, "linear", "batch", torch.ones(1, 3, dtype=F64, device=device))


# ----------------------------------------------------------------------------------------------
# string options and prefs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opt,value", [("method", "pareto"), ("method", "PAMA"), ("method", ""),
                                       ("granularity", "row"), ("granularity", "tokens"),
                                       ("agg", "mean"), ("agg", "seq-mean-token-max")])
def test_unknown_options_policy(device, opt, value):
    x = X(device)
    expect_error(opt, ops.pama_policy_loss, x.logp, x.old_logp, x.advantages, x.mask, **{opt: value})


@pytest.mark.parametrize("value", ["mean", "sum", "token-sum"])
def test_unknown_agg_value_loss(device, value):
    x = X(device)
    expect_error("agg", ops.multi_value_loss, x.values, x.old_values, x.returns, x.mask, agg=value)


@pytest.mark.parametrize("shape", [(2,), (4,), (1, 3), (3, 1)])
def test_prefs_wrong_shape(device, shape):
    x = X(device)
    prefs = torch.full(shape, 1 / 3, dtype=F64, device=device)
    expect_error("prefs", ops.pama_policy_loss, x.logp, x.old_logp, x.advantages, x.mask, method="linear",
                 prefs=prefs)


# ----------------------------------------------------------------------------------------------
# devices
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,arg", CASES)
def test_mixed_devices(op, arg):
    resolve_device("cuda")
    x = X("cuda")
    fn, a = args_of(x, op)
    a[arg] = a[arg].cpu()
    expect_error(arg, _call, fn, a)


# ----------------------------------------------------------------------------------------------
# NaN / Inf
# ----------------------------------------------------------------------------------------------
FINITE_CASES = [("pama_policy_loss", a) for a in ("logp", "old_logp", "advantages", "ref_logp")] + \
               [("multi_value_loss", a) for a in ("values", "old_values", "returns")]


def _poison(t, mask, value, inside: bool):
    """A copy of t with ``value`` at one masked-in (inside=True) or every masked-out position."""
    t = t.clone()
    m = mask.bool()
    if t.dim() == 3:
        m = m.unsqueeze(0).expand_as(t)
    if inside:
        idx = m.reshape(-1).nonzero()[-1]
        t.view(-1)[idx] = value
    else:
        t[~m] = value
    return t


def _finite_call(op, x, arg, value, inside, check_finite=True):
    if op == "pama_policy_loss":
        a = dict(logp=x.logp, old_logp=x.old_logp, advantages=x.advantages, ref_logp=x.ref_logp)
        a[arg] = _poison(a[arg], x.mask, value, inside)
        return ops.pama_policy_loss(a["logp"], a["old_logp"], a["advantages"], x.mask, a["ref_logp"],
                                    beta_loss=0.1, check_finite=check_finite)
    a = dict(values=x.values, old_values=x.old_values, returns=x.returns)
    a[arg] = _poison(a[arg], x.mask, value, inside)
    return ops.multi_value_loss(a["values"], a["old_values"], a["returns"], x.mask, check_finite=check_finite)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op,arg", FINITE_CASES)
def test_non_finite_masked_in_is_an_error(device, op, arg, dtype, value):
    x = X(device, dtype=dtype)
    expect_error(arg, _finite_call, op, x, arg, value, True)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_prefs_is_an_error(device, value):
    """prefs has no mask: every entry is checked, in the same single check as the [B, T] inputs."""
    x = X(device)
    prefs = torch.full((x.advantages.shape[0],), 0.5, dtype=x.logp.dtype, device=device)
    prefs[-1] = value
    expect_error("prefs", ops.pama_policy_loss, x.logp, x.old_logp, x.advantages, x.mask, method="linear",
                 prefs=prefs)


def test_first_non_finite_argument_is_named(device):
    """With several bad inputs the error names the first in argument order (logp before advantages)."""
    x = X(device)
    logp = _poison(x.logp, x.mask, float("nan"), True)
    adv = _poison(x.advantages, x.mask, float("inf"), True)
    with pytest.raises(ValueError, match=r"pama_policy_loss: logp has NaN or Inf"):
        ops.pama_policy_loss(logp, x.old_logp, adv, x.mask)


@pytest.mark.parametrize("op,arg", FINITE_CASES)
def test_check_finite_false_skips_the_check(device, op, arg):
    x = X(device)
    loss, _ = _finite_call(op, x, arg, float("nan"), True, check_finite=False)  # no error
    assert loss.shape == ()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("op,arg", FINITE_CASES)
def test_non_finite_masked_out_is_ignored(device, op, arg, value):
    """NaN/Inf padding changes nothing: same loss, metrics and gradient as finite padding."""
    x = X(device)
    clean = x.to()
    for name in ("logp", "old_logp", "ref_logp"):
        getattr(clean, name)[~x.mask] = 0.5
    clean.advantages[:, ~x.mask] = 0.5
    clean.values[:, ~x.mask] = 0.5
    clean.old_values[:, ~x.mask] = 0.5
    clean.returns[:, ~x.mask] = 0.5
    dirty = clean.to()
    setattr(dirty, arg, _poison(getattr(clean, arg), x.mask, value, inside=False))
    if op == "pama_policy_loss":
        for kw in (dict(method="pama", granularity="sequence"), dict(method="mgda", agg="seq-mean-token-sum")):
            a = run_policy_loss(ops, clean, use_ref=True, beta_loss=0.1, **kw)
            b = run_policy_loss(ops, dirty, use_ref=True, beta_loss=0.1, **kw)
            assert torch.isfinite(b["loss"])
            for k in a:  # gradients included: 0 (not NaN) on the padding
                torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
        if arg in ("logp", "old_logp", "advantages"):
            s1, s2 = run_objective_stats(ops, clean)["stats"], run_objective_stats(ops, dirty)["stats"]
            torch.testing.assert_close(s2, s1, rtol=0, atol=0)
    else:
        a, b = run_value_loss(ops, clean), run_value_loss(ops, dirty)
        assert torch.isfinite(b["loss"])
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


# ----------------------------------------------------------------------------------------------
# non-contiguous inputs
# ----------------------------------------------------------------------------------------------
def _noncontig(t, kind):
    if kind == "transposed":  # same values, transposed storage
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "strided":  # every other element of a bigger tensor
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]
    if kind == "objective_last" and t.dim() == 3:  # [B, T, n] storage viewed as [n, B, T]
        return t.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    if kind == "expanded" and t.dim() == 3:  # stride 0 along objectives
        return t[:1].expand_as(t)
    return t


@pytest.mark.parametrize("kind", ["transposed", "strided", "objective_last", "expanded"])
def test_non_contiguous_inputs(device, kind):
    x = X(device, B=5, T=13, seed=3)
    if kind == "expanded":
        for k in ("advantages", "rewards", "values", "old_values", "returns", "scores"):
            setattr(x, k, getattr(x, k)[:1].expand_as(getattr(x, k)).contiguous())
    y = x.to()
    for k, v in x.dict().items():
        setattr(y, k, _noncontig(v, kind))
    assert any(not t.is_contiguous() for t in y.dict().values())
    for runner, kw in ((run_token_rewards, dict(beta_kl=0.1)), (run_multi_gae, {}), (run_objective_stats, {}),
                       (run_policy_loss, dict(method="pama", granularity="sequence", use_ref=True, beta_loss=0.1)),
                       (run_policy_loss, dict(method="mgda", agg="seq-mean-token-sum")),
                       (run_value_loss, {})):
        a, b = runner(ops, x, **kw), runner(ops, y, **kw)
        for k in a:
            assert a[k].shape == b[k].shape, k
            torch.testing.assert_close(b[k], a[k], rtol=1e-12, atol=1e-14, msg=f"{runner.__name__}:{k}")


def test_expanded_mask(device):
    """A broadcast [1, T] -> [B, T] mask (stride 0) is a valid mask."""
    x = X(device, B=4, T=9, mask="full")
    row = torch.arange(9, device=device) < 6
    x.mask = row.unsqueeze(0).expand(4, 9)
    y = x.to()
    y.mask = x.mask.contiguous()
    for runner in (run_policy_loss, run_value_loss, run_multi_gae, run_token_rewards):
        a, b = runner(ops, x), runner(ops, y)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_prefs_non_contiguous(device):
    x = X(device)
    prefs = torch.tensor([[0.2, 0.0], [0.5, 0.0], [0.3, 0.0]], dtype=F64, device=device)[:, 0]
    assert not prefs.is_contiguous()
    a = run_policy_loss(ops, x, method="linear", prefs=prefs)
    b = run_policy_loss(ops, x, method="linear", prefs=prefs.contiguous())
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
