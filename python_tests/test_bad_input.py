"""Bad input gives a clear error (RuntimeError or ValueError) whose message names the argument;
NaN/Inf on masked-in positions is an error by default (check_finite=True) and ignored on masked-out
positions; non-contiguous inputs give the same results as contiguous ones.

Every test runs twice: on the compiled ops ("native") and on the reference fallback that
pama_ext uses when the compiled library cannot be loaded ("fallback", forced by clearing
pama_ext._native.NATIVE_AVAILABLE, the ``path`` fixture of conftest.py): both paths keep one
contract (algorithms §9). The cases here are parametrised over every op (or compare the two paths
call by call); the bad-input cases of a single op live in its file (test_gae.py, test_stats.py,
test_policy_loss.py, test_value_loss.py, test_token_rewards.py).
"""
from __future__ import annotations

import pytest
import torch

import pama_ext
from pama_ext import _native, ops, pareto
from op_runners import run_multi_gae, run_objective_stats, run_policy_loss, run_token_rewards, run_value_loss
from pama_testutils import (BAD_NONNEG, BAD_UNIT, ERRORS, bad_input_batch, expect_error, names_arg,
                            resolve_device)

F64 = torch.float64
# every test here runs twice, on the compiled ops and on the fallback (the path fixture, conftest.py)
pytestmark = pytest.mark.usefixtures("path")


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
    x = bad_input_batch(device)
    fn, a = args_of(x, op)
    a[arg] = a[arg].unsqueeze(0)  # one dimension too many
    expect_error(arg, _call, fn, a)
    fn, a = args_of(x, op)
    a[arg] = a[arg].reshape(-1)  # flattened
    expect_error(arg, _call, fn, a)


@pytest.mark.parametrize("op,arg", CASES)
def test_wrong_shape(device, op, arg):
    x = bad_input_batch(device)
    fn, a = args_of(x, op)
    t = a[arg]
    a[arg] = torch.cat([t, t[..., :1]], -1)  # T + 1
    expect_error(arg, _call, fn, a)
    fn, a = args_of(x, op)
    a[arg] = t[..., :-1, :] if t.dim() >= 2 and arg != "scores" else t[..., :-1]  # B - 1
    expect_error(arg, _call, fn, a)


@pytest.mark.parametrize("op,arg", [(op, arg) for op, arg in CASES if arg in ("old_values", "returns")])
def test_wrong_num_objectives(device, op, arg):
    x = bad_input_batch(device)
    fn, a = args_of(x, op)
    a[arg] = a[arg][:2]
    expect_error(arg, _call, fn, a)


@pytest.mark.parametrize("bad_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("op,arg", [(op, arg) for op, arg in CASES if arg != "mask"])
def test_integer_float_argument(device, op, arg, bad_dtype):
    x = bad_input_batch(device)
    fn, a = args_of(x, op)
    a[arg] = (a[arg] * 10).to(bad_dtype)
    expect_error(arg, _call, fn, a)


@pytest.mark.parametrize("op,arg", [(op, arg) for op, arg in CASES if arg != "mask"])
def test_dtype_mismatch(device, op, arg):
    x = bad_input_batch(device)
    fn, a = args_of(x, op)
    a[arg] = a[arg].float()  # float32 among float64 arguments
    expect_error(arg, _call, fn, a)


@pytest.mark.parametrize("op,arg", [(op, arg) for op, arg in CASES if arg != "mask"])
def test_complex_argument(device, op, arg):
    x = bad_input_batch(device)
    fn, a = args_of(x, op)
    a[arg] = a[arg].to(torch.complex128)
    expect_error(arg, _call, fn, a)


@pytest.mark.parametrize("n", [0, 65, 100])
@pytest.mark.parametrize("op", ["token_rewards", "multi_gae", "objective_stats", "pama_policy_loss",
                                "multi_value_loss"])
def test_bad_number_of_objectives(device, op, n):
    x = bad_input_batch(device, n=max(n, 1) if n <= 64 else n, B=2, T=3)
    if n == 0:
        for k in PER_OBJECTIVE:
            setattr(x, k, getattr(x, k)[:0])
    fn, a = args_of(x, op)
    with pytest.raises(ERRORS) as ei:
        _call(fn, a)
    msg = str(ei.value)
    assert names_arg(msg, "n") or "objective" in msg, msg


def test_max_objectives_is_accepted(device):
    x = bad_input_batch(device, n=64, B=2, T=5)
    loss, m = ops.pama_policy_loss(x.logp, x.old_logp, x.advantages, x.mask, method="mgda")
    assert torch.isfinite(loss) and m["weights"].shape == (64,)


# ----------------------------------------------------------------------------------------------
# devices
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,arg", CASES)
def test_mixed_devices(op, arg):
    resolve_device("cuda")
    x = bad_input_batch("cuda")
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
    x = bad_input_batch(device, dtype=dtype)
    expect_error(arg, _finite_call, op, x, arg, value, True)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_non_finite_found_in_any_chunk(device, threads, where):
    """The check of a large input (several chunks of the compiled check, split over threads) finds one
    NaN wherever it lies, on the last objective of the advantages too, and ignores it when masked out."""
    gen = torch.Generator().manual_seed(0)
    n, B, T = 3, 4, 40_000
    logp = (-torch.rand(B, T, generator=gen)).to(device)
    adv = torch.randn(n, B, T, generator=gen).to(device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    k = {"first": 0, "middle": B * T // 2 + 12_345, "last": B * T - 1}[where]
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        bad = adv.clone()
        bad[-1].view(-1)[k] = float("nan")
        with pytest.raises(ValueError, match="advantages has NaN or Inf"):
            ops.pama_policy_loss(logp, logp, bad, mask)
        hole = mask.clone()
        hole.view(-1)[k] = False
        loss, _ = ops.pama_policy_loss(logp, logp, bad, hole)
        assert torch.isfinite(loss)
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("arg", ["values", "old_values", "returns"])
def test_value_loss_non_finite_found_in_any_chunk(device, arg, threads, where):
    """multi_value_loss checks its inputs inside the loss pass on CPU: one Inf on the last head, in
    any chunk of rows of several chunks, with 1 or 2 threads, is an error naming the argument, and
    nothing when masked out."""
    gen = torch.Generator().manual_seed(1)
    n, B, T = 3, 3, 5000
    a = {k: torch.randn(n, B, T, generator=gen).to(device) for k in ("values", "old_values", "returns")}
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    k = {"first": 0, "middle": B * T // 2 + 1_234, "last": B * T - 1}[where]
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        bad = dict(a)
        bad[arg] = a[arg].clone()
        bad[arg][-1].view(-1)[k] = float("inf")
        with pytest.raises(ValueError, match=f"multi_value_loss: {arg} has NaN or Inf"):
            ops.multi_value_loss(bad["values"], bad["old_values"], bad["returns"], mask)
        hole = mask.clone()
        hole.view(-1)[k] = False
        loss, _ = ops.multi_value_loss(bad["values"], bad["old_values"], bad["returns"], hole)
        assert torch.isfinite(loss)
    finally:
        torch.set_num_threads(prev)


def test_value_loss_first_non_finite_argument_is_named(device):
    """Several bad inputs: the error names the first in argument order (values before returns), wherever
    the bad positions lie."""
    x = bad_input_batch(device)
    m = x.mask.bool()
    first, last = m.reshape(-1).nonzero()[0], m.reshape(-1).nonzero()[-1]
    values, returns = x.values.clone(), x.returns.clone()
    values[-1].view(-1)[last] = float("nan")
    returns[0].view(-1)[first] = float("inf")
    with pytest.raises(ValueError, match=r"multi_value_loss: values has NaN or Inf"):
        ops.multi_value_loss(values, x.old_values, returns, x.mask)


def test_first_non_finite_argument_is_named(device):
    """With several bad inputs the error names the first in argument order (logp before advantages)."""
    x = bad_input_batch(device)
    logp = _poison(x.logp, x.mask, float("nan"), True)
    adv = _poison(x.advantages, x.mask, float("inf"), True)
    with pytest.raises(ValueError, match=r"pama_policy_loss: logp has NaN or Inf"):
        ops.pama_policy_loss(logp, x.old_logp, adv, x.mask)


@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("method,granularity", [("linear", "batch"), ("pama", "token"), ("pama", "sequence"),
                                                ("mgda", "batch")])
@pytest.mark.parametrize("arg", ["logp", "old_logp", "advantages", "ref_logp"])
def test_non_finite_same_error_on_every_path(device, arg, method, granularity, whiten):
    """linear and pama/token check the inputs inside the loss pass (CPU single pass), the other methods
    in a pass of their own: the same error either way (ref_logp checked with beta_loss = 0 too), and
    NaN on masked-out positions changes nothing."""
    x = bad_input_batch(device)
    a = dict(logp=x.logp, old_logp=x.old_logp, advantages=x.advantages, ref_logp=x.ref_logp)
    kw = dict(method=method, granularity=granularity, whiten=whiten)
    for beta in (0.0, 0.1):
        bad = dict(a, **{arg: _poison(a[arg], x.mask, float("nan"), True)})
        with pytest.raises(ValueError, match=f"pama_policy_loss: {arg} has NaN or Inf"):
            ops.pama_policy_loss(bad["logp"], bad["old_logp"], bad["advantages"], x.mask, bad["ref_logp"],
                                 beta_loss=beta, **kw)
        pad = dict(a, **{arg: _poison(a[arg], x.mask, float("nan"), False)})
        got = ops.pama_policy_loss(pad["logp"], pad["old_logp"], pad["advantages"], x.mask, pad["ref_logp"],
                                   beta_loss=beta, **kw)
        want = ops.pama_policy_loss(a["logp"], a["old_logp"], a["advantages"], x.mask, a["ref_logp"],
                                    beta_loss=beta, **kw)
        assert torch.equal(got[0], want[0])
        for k in want[1]:
            assert torch.equal(got[1][k], want[1][k]), k


def test_single_pass_checks_inputs_before_prefs(device):
    """With a NaN logp and negative prefs (method linear, checked inside the loss pass), the error names
    logp first, as in argument order; with finite inputs it names prefs."""
    x = bad_input_batch(device)
    n = x.advantages.shape[0]
    prefs = torch.full((n,), -1.0, dtype=x.logp.dtype, device=x.logp.device)
    logp = _poison(x.logp, x.mask, float("nan"), True)
    with pytest.raises(ValueError, match=r"pama_policy_loss: logp has NaN or Inf"):
        ops.pama_policy_loss(logp, x.old_logp, x.advantages, x.mask, method="linear", prefs=prefs)
    with pytest.raises(ValueError, match=r"pama_policy_loss: prefs must be >= 0"):
        ops.pama_policy_loss(x.logp, x.old_logp, x.advantages, x.mask, method="linear", prefs=prefs)


@pytest.mark.parametrize("op,arg", FINITE_CASES)
def test_check_finite_false_skips_the_check(device, op, arg):
    x = bad_input_batch(device)
    loss, _ = _finite_call(op, x, arg, float("nan"), True, check_finite=False)  # no error
    assert loss.shape == ()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("op,arg", FINITE_CASES)
def test_non_finite_masked_out_is_ignored(device, op, arg, value):
    """NaN/Inf padding changes nothing: same loss, metrics and gradient as finite padding."""
    x = bad_input_batch(device)
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
    x = bad_input_batch(device, B=5, T=13, seed=3)
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
    x = bad_input_batch(device, B=4, T=9, mask="full")
    row = torch.arange(9, device=device) < 6
    x.mask = row.unsqueeze(0).expand(4, 9)
    y = x.to()
    y.mask = x.mask.contiguous()
    for runner in (run_policy_loss, run_value_loss, run_multi_gae, run_token_rewards):
        a, b = runner(ops, x), runner(ops, y)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


# ----------------------------------------------------------------------------------------------
# a meta tensor among CPU tensors: the dispatcher sends such a call to the fake (meta) kernel,
# which must reject it rather than hand back uninitialised memory (or write it into .grad)
# ----------------------------------------------------------------------------------------------
def _dpo_tensors():
    g = torch.Generator().manual_seed(5)
    a = {k: -(20 + 10 * torch.rand(5, generator=g, dtype=F64))
         for k in ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")}
    a["labels"] = torch.randint(-1, 2, (2, 5), generator=g)
    a["chosen_lengths"] = torch.full((5,), 3.0, dtype=F64)
    a["rejected_lengths"] = torch.full((5,), 4.0, dtype=F64)
    return a


def _grad_tensors():
    g = torch.Generator().manual_seed(6)
    return {f"grads[{i}][{k}]": torch.randn(*s, generator=g, dtype=F64)
            for i in range(2) for k, s in enumerate([(3, 2), (4,)])}


def _table(a):
    return [[a[f"grads[{i}][{k}]"] for k in range(2)] for i in range(2)]


def _combine(a):
    params = [torch.zeros(3, 2, dtype=F64), torch.zeros(4, dtype=F64)]
    pama_ext.combine_gradients(_table(a), a["coeffs"], params)
    return params


def _tensors_of(op):
    x = bad_input_batch("cpu")
    base = {k: getattr(x, k) for k in ("scores", "logp", "old_logp", "ref_logp", "advantages", "rewards", "values",
                                        "old_values", "returns", "mask")}
    base["prefs"] = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    if op == "pareto_weights":
        base["stats"] = ops.objective_stats(x.advantages, x.logp, x.old_logp, x.mask)
    if op == "multi_dpo_loss":
        base = _dpo_tensors()
    if op in ("gradient_gram", "combine_gradients"):
        base = _grad_tensors()
        base["coeffs"] = torch.tensor([0.3, 0.7], dtype=F64)
    if op == "gram_weights":
        J = torch.tensor([[1.0, 0.0], [0.5, 2.0]], dtype=F64)
        base = {"G": J @ J.T, "w": torch.tensor([0.4, 0.6], dtype=F64)}
    return base


META_OPS = {
    "token_rewards": (lambda a: ops.token_rewards(a["scores"], a["old_logp"], a["ref_logp"], a["mask"], 0.1),
                      ("scores", "old_logp", "ref_logp", "mask")),
    "multi_gae": (lambda a: ops.multi_gae(a["rewards"], a["values"], a["mask"]), ("rewards", "values", "mask")),
    "objective_moments": (lambda a: ops.objective_moments(a["advantages"], a["mask"]), ("advantages", "mask")),
    "objective_stats": (lambda a: ops.objective_stats(a["advantages"], a["logp"], a["old_logp"], a["mask"]),
                        ("advantages", "logp", "old_logp", "mask")),
    "pareto_weights": (lambda a: ops.pareto_weights(a["stats"], "linear", "batch", a["prefs"]), ("stats", "prefs")),
    "pama_policy_loss": (lambda a: ops.pama_policy_loss(a["logp"], a["old_logp"], a["advantages"], a["mask"],
                                                        a["ref_logp"], method="linear", prefs=a["prefs"],
                                                        beta_loss=0.1),
                         ("logp", "old_logp", "advantages", "mask", "ref_logp", "prefs")),
    "multi_value_loss": (lambda a: ops.multi_value_loss(a["values"], a["old_values"], a["returns"], a["mask"]),
                         ("values", "old_values", "returns", "mask")),
    "multi_dpo_loss": (lambda a: pama_ext.multi_dpo_loss(
        a["policy_chosen_logps"], a["policy_rejected_logps"], a["ref_chosen_logps"], a["ref_rejected_logps"],
        a["labels"], chosen_lengths=a["chosen_lengths"], rejected_lengths=a["rejected_lengths"]),
        ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "labels",
         "chosen_lengths", "rejected_lengths")),
    "gradient_gram": (lambda a: pama_ext.gradient_gram(_table(a)), ("grads[0][0]", "grads[1][0]", "grads[1][1]")),
    "combine_gradients": (_combine, ("grads[0][1]", "grads[1][0]", "coeffs")),
    "gram_weights": (lambda a: pareto.cagrad_weights(a["G"], a["w"]), ("G", "w")),
}


@pytest.mark.parametrize("op,arg", [(op, arg) for op, (_, args) in META_OPS.items() for arg in args])
def test_meta_tensor_among_cpu_tensors_is_an_error(op, arg):
    fn, _ = META_OPS[op]
    a = _tensors_of(op)
    a[arg] = a[arg].to("meta")
    expect_error(arg, fn, a)


def test_combine_gradients_failure_leaves_grad_untouched():
    """A call that fails its checks (shape, or a meta coefficient vector) changes no .grad: a
    missing one stays None (not uninitialised memory), an existing one keeps its values."""
    a = _grad_tensors()
    table = _table(a)
    bad_shape = [[table[0][0], table[0][1]], [table[1][0], table[1][1][:3]]]
    coeffs = torch.tensor([0.3, 0.7], dtype=F64)
    for grads, c, arg in ((bad_shape, coeffs, "grads[1][1]"), (table, coeffs.to("meta"), "coeffs")):
        for accumulate in (False, True):
            fresh, held = torch.zeros(3, 2, dtype=F64), torch.zeros(4, dtype=F64)
            held.grad = torch.full((4,), 7.0, dtype=F64)
            expect_error(arg, pama_ext.combine_gradients, grads, c, [fresh, held], accumulate=accumulate)
            assert fresh.grad is None
            assert torch.equal(held.grad, torch.full((4,), 7.0, dtype=F64))


# ----------------------------------------------------------------------------------------------
# the two paths raise the same errors, word for word
# ----------------------------------------------------------------------------------------------
def _bad_calls():
    """(label, thunk) pairs: every argument of every op broken in each way, and the value checks."""
    x = bad_input_batch("cpu")
    breakers = {"rank": lambda t: t.unsqueeze(0), "flat": lambda t: t.reshape(-1),
                "T+1": lambda t: torch.cat([t, t[..., :1]], -1), "dtype": lambda t: t.float(),
                "int": lambda t: (t * 10).long(), "complex": lambda t: t.to(torch.complex128)}
    calls = []
    for op, arg in CASES:
        for how, brk in breakers.items():
            if arg == "mask" and how in ("dtype", "int"):  # any real mask dtype is valid
                continue
            fn, a = args_of(x, op)
            a[arg] = brk(a[arg])
            calls.append((f"{op}:{arg}:{how}", lambda fn=fn, a=a: _call(fn, a)))
    pl = lambda **kw: ops.pama_policy_loss(*(kw.pop(k, getattr(x, k)) for k in ("logp", "old_logp", "advantages",
                                                                               "mask")), **kw)  # noqa: E731
    for value in BAD_UNIT:
        calls.append((f"gamma={value}", lambda v=value: ops.multi_gae(x.rewards, x.values, x.mask, gamma=v)))
        calls.append((f"lam={value}", lambda v=value: ops.multi_gae(x.rewards, x.values, x.mask, lam=v)))
    for value in BAD_NONNEG:
        calls.append((f"stats eps_hi={value}",
                      lambda v=value: ops.objective_stats(x.advantages, x.logp, x.old_logp, x.mask, eps_hi=v)))
        calls.append((f"eps_hi={value}", lambda v=value: pl(eps_hi=v)))
        calls.append((f"beta_loss={value}", lambda v=value: pl(ref_logp=x.ref_logp, beta_loss=v)))
    calls += [("no ref_logp", lambda: pl(beta_loss=0.1)),
              ("eps_lo", lambda: pl(eps_lo=1.0)), ("dual_clip", lambda: pl(dual_clip=1.0)),
              ("method", lambda: pl(method="pareto")), ("granularity", lambda: pl(granularity="row")),
              ("agg", lambda: pl(agg="mean")),
              ("prefs shape", lambda: pl(method="linear", prefs=torch.ones(4, dtype=F64))),
              ("prefs negative", lambda: pl(method="linear", prefs=torch.tensor([1.0, -1.0, 1.0], dtype=F64))),
              ("prefs zero", lambda: pl(method="linear", prefs=torch.zeros(3, dtype=F64))),
              ("prefs nan", lambda: pl(method="linear", prefs=torch.tensor([1.0, float("nan"), 1.0], dtype=F64))),
              ("pama prefs zero entry", lambda: pl(method="pama", prefs=torch.tensor([1.0, 0.0, 1.0], dtype=F64))),
              ("pama prefs negative", lambda: pl(method="pama", prefs=torch.tensor([1.0, -1.0, 1.0], dtype=F64))),
              ("pama prefs shape", lambda: pl(method="pama", prefs=torch.ones(2, dtype=F64))),
              ("pama prefs sequence", lambda: pl(method="pama", granularity="sequence",
                                                 prefs=torch.ones(3, dtype=F64))),
              ("variance", lambda: pl(advantages=x.advantages.float() * 1e20, logp=x.logp.float(),
                                      old_logp=x.old_logp.float())),
              ("value clip", lambda: ops.multi_value_loss(x.values, x.old_values, x.returns, x.mask, clip=-1.0)),
              ("value agg", lambda: ops.multi_value_loss(x.values, x.old_values, x.returns, x.mask, agg="sum")),
              ("stats", lambda: ops.pareto_weights(torch.zeros(10, dtype=F64))),
              ("stats method", lambda: ops.pareto_weights(torch.zeros(20, dtype=F64), "pareto"))]
    for op, arg in FINITE_CASES:
        calls.append((f"nan {op}:{arg}", lambda op=op, arg=arg: _finite_call(op, x, arg, float("nan"), True)))
    d = _dpo_tensors()
    dpo = lambda **kw: pama_ext.multi_dpo_loss(*(kw.pop(k, d[k]) for k in (  # noqa: E731
        "policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "labels")), **kw)
    calls += [("dpo pc", lambda: dpo(policy_chosen_logps=d["policy_chosen_logps"][None])),
              ("dpo pr", lambda: dpo(policy_rejected_logps=d["policy_rejected_logps"][:4])),
              ("dpo rc", lambda: dpo(ref_chosen_logps=d["ref_chosen_logps"].float())),
              ("dpo labels", lambda: dpo(labels=d["labels"][0])),
              ("dpo bool labels", lambda: dpo(labels=d["labels"] > 0)),
              ("dpo lengths", lambda: dpo(chosen_lengths=torch.ones(4))),
              ("dpo beta", lambda: dpo(beta=0.0))]
    t = _table(_grad_tensors())
    params = [torch.zeros(3, 2, dtype=F64), torch.zeros(4, dtype=F64)]
    c = torch.ones(2, dtype=F64)
    calls += [("gram shape", lambda: pama_ext.gradient_gram([t[0], [t[1][0].T, t[1][1]]])),
              ("gram dtype", lambda: pama_ext.gradient_gram([t[0], [t[1][0], t[1][1].float()]])),
              ("gram n", lambda: pama_ext.gradient_gram([t[0]] * 65)),
              ("combine coeffs", lambda: pama_ext.combine_gradients(t, torch.ones(3), params)),
              ("combine params", lambda: pama_ext.combine_gradients(t, c, [params[0].T, params[1]])),
              ("combine params dtype", lambda: pama_ext.combine_gradients(t, c, [params[0], params[1].float()]))]
    return calls


def _error_of(thunk):
    try:
        thunk()
    except Exception as e:  # noqa: BLE001 - the type is part of what is compared
        return type(e), str(e).split("\n")[0]
    return None


def test_fallback_raises_the_errors_of_the_compiled_ops(path, monkeypatch):
    """Every bad call above raises on the compiled path, and the reference fallback (pama_ext.checks)
    raises the same exception type with the same message."""
    if path == "fallback":
        pytest.skip("compares both paths itself (runs once, under 'native')")
    calls = _bad_calls()
    native = [(label, _error_of(thunk)) for label, thunk in calls]
    monkeypatch.setattr(_native, "NATIVE_AVAILABLE", False)
    fallback = [(label, _error_of(thunk)) for label, thunk in calls]
    for (label, a), (_, b) in zip(native, fallback):
        assert a is not None, f"{label}: the compiled op raised nothing"
        assert b == a, f"{label}:\n  native:   {a}\n  fallback: {b}"
