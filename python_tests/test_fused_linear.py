"""pama_ext.fused_linear_policy_loss / fused_linear_logp against the unfused composition
(materialised logits -> log_softmax -> gather -> pama_policy_loss): loss, metrics and the gradients
of hidden, weight and bias, in float64 and with the tolerance rule in bf16 / fp16; argument errors;
a memory probe (no tensor of B·T·V elements); the Triton epilogue under TRITON_INTERPRET=1 and
compiled ahead of time for sm_80 / sm_90 (subprocesses, so this process never imports triton in
interpreter mode)."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pama_ext
from pama_ext import fused_linear as fl
from pama_testutils import AGGS, COMBOS, F64, METRIC_KEYS, assert_close_f64, assert_tolerance_rule, make_mask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TRITON = importlib.util.find_spec("triton") is not None
# the installed triton's version, read without importing it (importing triton here would initialise it in
# the test process; the Triton tests run in subprocesses)
TRITON_INSTALLED = importlib.metadata.version("triton") if HAS_TRITON else None
with open(importlib.util.find_spec("pama_ext.triton_kernels").origin) as _f:  # the tested package's pin
    TRITON_PINNED = re.search(r'^TRITON_VERSION = "([^"]+)"$', _f.read(), re.M).group(1)


def make_case(n, B, T, H, V, *, dtype=F64, seed=0, mask="random", bias=True):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    hidden = randn(B, T, H)
    weight = randn(V, H) / H ** 0.5 * 2
    b = randn(V) * 0.5 if bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    m = make_mask(B, T, g, mask)
    logp = unfused_logp(hidden, weight, b, ids)
    c = dict(hidden=hidden, weight=weight, bias=b, token_ids=ids, mask=m,
             old_logp=logp + 0.3 * randn(B, T), ref_logp=logp + 0.1 * randn(B, T), advantages=randn(n, B, T))
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in c.items()}


def unfused_logp(hidden, weight, bias, ids, logit_scale=1.0, softcap=None):
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return torch.log_softmax(z, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


path_of_last = [None]  # the path of the last fused run(): "single" or "two-pass"


def path_of(loss) -> str:
    """"single" when the loss came from the single pass (its gradients attached), else "two-pass"."""
    return "single" if type(loss.grad_fn).__name__ == "_AttachGradsBackward" else "two-pass"


def run(fused, c, grads=("hidden", "weight", "bias"), logit_scale=1.0, softcap=None, chunk_size=None,
        single_pass=None, **options):
    """(loss, metrics, {name: grad}) of the fused op or of the composition, on leaf copies of ``c``."""
    leaves = {k: c[k].detach().clone().requires_grad_(True) for k in grads
              if c[k] is not None and c[k].is_floating_point()}
    x = {**c, **leaves}
    if fused:
        loss, metrics = pama_ext.fused_linear_policy_loss(
            x["hidden"], x["weight"], x["bias"], x["token_ids"], x["mask"], x["old_logp"], x["advantages"],
            x["ref_logp"], chunk_size=chunk_size, logit_scale=logit_scale, softcap=softcap, single_pass=single_pass,
            **options)
    else:
        logp = unfused_logp(x["hidden"], x["weight"], x["bias"], x["token_ids"], logit_scale, softcap)
        loss, metrics = pama_ext.pama_policy_loss(logp.to(c["old_logp"].dtype), x["old_logp"], x["advantages"],
                                                  x["mask"], x["ref_logp"], **options)
    if fused:
        path_of_last[0] = path_of(loss)
    names = list(leaves)
    g = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True) if names else []
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, dict(zip(names, g))


def assert_same64(got, want):
    (l1, m1, g1), (l2, m2, g2) = got, want
    assert_close_f64("loss", l1, l2)
    assert set(m1) == set(m2) == set(METRIC_KEYS)
    for k in METRIC_KEYS:
        assert_close_f64(k, m1[k], m2[k])
    assert set(g1) == set(g2)
    for k in g2:
        assert g1[k] is not None, f"no gradient for {k}"
        assert_close_f64(f"grad_{k}", g1[k], g2[k])


# ------------------------------------------------------------------------------------------------
# float64: every method / granularity / agg, shapes, chunk sizes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,granularity", COMBOS)
@pytest.mark.parametrize("agg", AGGS)
def test_matches_composition_f64(method, granularity, agg):
    c = make_case(3, 4, 9, 6, 13, seed=hash((method, granularity, agg)) % 1000)
    kw = dict(method=method, granularity=granularity, agg=agg)
    assert_same64(run(True, c, chunk_size=5, **kw), run(False, c, **kw))


@pytest.mark.parametrize("n,B,T,H,V,chunk", [
    (1, 1, 1, 1, 1, 1),  # one token, one vocabulary entry
    (2, 3, 47, 5, 7, 10),  # chunk does not divide B·T = 141
    (1, 5, 13, 3, 101, 64),
    (4, 2, 3, 8, 5, 1000),  # one chunk larger than B·T
    (2, 3, 7, 4, 9, None),  # the default chunk
    (2, 2, 0, 3, 5, 4),  # no tokens
    (2, 0, 3, 3, 5, 4),  # no rows
])
@pytest.mark.parametrize("bias", [True, False])
def test_shapes_and_chunks_f64(n, B, T, H, V, chunk, bias):
    c = make_case(n, B, T, H, V, bias=bias, seed=B * T + V)
    assert_same64(run(True, c, chunk_size=chunk), run(False, c))
    if not bias:
        assert "bias" not in run(True, c, chunk_size=chunk)[2]


@pytest.mark.parametrize("options", [
    dict(eps_lo=0.1, eps_hi=0.3, dual_clip=None, noon=False, whiten=False),
    dict(noon=False, dual_clip=2.0, method="linear"),
    dict(beta_loss=0.05, method="mgda", granularity="batch"),
    dict(method="cagrad", cagrad_c=0.7, granularity="batch"),
    dict(check_finite=False, agg="seq-mean-token-sum"),
])
def test_options_f64(options):
    c = make_case(3, 4, 11, 5, 17, seed=7)
    assert_same64(run(True, c, chunk_size=6, **options), run(False, c, **options))


def test_prefs_f64():
    c = make_case(3, 3, 8, 4, 10, seed=3)
    prefs = torch.tensor([0.2, 0.5, 0.9], dtype=F64)
    assert_same64(run(True, c, chunk_size=7, method="linear", prefs=prefs),
                  run(False, c, method="linear", prefs=prefs))


@pytest.mark.parametrize("logit_scale,softcap", [(0.25, None), (1.0, 2.0), (1.7, 5.0)])
def test_logit_scale_and_softcap_f64(logit_scale, softcap):
    c = make_case(2, 3, 10, 4, 12, seed=11)
    kw = dict(logit_scale=logit_scale, softcap=softcap)
    assert_same64(run(True, c, chunk_size=4, **kw), run(False, c, **kw))


@pytest.mark.parametrize("mask", ["empty", "holes", "full"])
def test_masks_f64(mask):
    c = make_case(2, 4, 6, 3, 8, mask=mask, seed=5)
    got = run(True, c, chunk_size=5, granularity="sequence", agg="seq-mean-token-mean")
    assert_same64(got, run(False, c, granularity="sequence", agg="seq-mean-token-mean"))
    if mask == "empty":
        assert got[0].item() == 0.0
        assert all((g == 0).all() for g in got[2].values())


def test_padding_ids_outside_mask():
    """Masked-out positions may hold any id (e.g. -100 padding): they are read as 0 and get no gradient."""
    c = make_case(2, 4, 6, 3, 8, seed=9)
    padded = dict(c, token_ids=torch.where(c["mask"], c["token_ids"], torch.full_like(c["token_ids"], -100)))
    clean = dict(c, token_ids=torch.where(c["mask"], c["token_ids"], torch.zeros_like(c["token_ids"])))
    assert_same64(run(True, padded, chunk_size=5), run(False, clean))


def test_logp_entry_point_f64():
    c = make_case(1, 3, 5, 4, 9, seed=2)
    h = c["hidden"].clone().requires_grad_(True)
    w = c["weight"].clone().requires_grad_(True)
    out = pama_ext.fused_linear_logp(h, w, c["bias"], c["token_ids"], chunk_size=4)
    want = unfused_logp(h, w, c["bias"], c["token_ids"])
    assert out.dtype == F64 and out.shape == (3, 5)
    assert_close_f64("logp", out, want)
    probe = torch.randn(3, 5, dtype=F64)
    for a, b, name in zip(torch.autograd.grad((out * probe).sum(), (h, w)),
                          torch.autograd.grad((want * probe).sum(), (h, w)), ("hidden", "weight")):
        assert_close_f64(f"grad_{name}", a, b)
    assert torch.autograd.gradcheck(
        lambda hh, ww, bb: pama_ext.fused_linear_logp(hh, ww, bb, c["token_ids"][:, :2], chunk_size=4),
        (c["hidden"][:, :2].clone().requires_grad_(True), c["weight"].clone().requires_grad_(True),
         c["bias"].clone().requires_grad_(True)), eps=1e-6, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# the single-pass path (3 matmuls): which options take it, and that it is the composition
# ------------------------------------------------------------------------------------------------
#: (method, granularity, n) that take the single pass, written out (not derived from the rule)
ELIGIBLE = [("linear", g, n) for g in ("token", "sequence", "batch") for n in (1, 3)] + \
    [("pama", "token", 3), ("pama", "token", 1), ("pama", "sequence", 1), ("pama", "batch", 1)]


def test_single_pass_rule_covers_every_method():
    """The rule, over every method x granularity x n in {1, 3}: exactly the combinations listed in
    ELIGIBLE take the single pass, the call takes that path, and single_pass=True is refused for the
    others."""
    from pama_ext.vocab import GRANULARITIES, METHODS

    c = make_case(3, 2, 4, 3, 7, seed=31)
    c1 = dict(c, advantages=c["advantages"][:1])
    for method in METHODS:
        for granularity in GRANULARITIES:
            for case, n in ((c, 3), (c1, 1)):
                want = (method, granularity, n) in ELIGIBLE
                assert fl.single_pass_eligible(method, granularity, n) == want, (method, granularity, n)
                x = dict(case, hidden=case["hidden"].clone().requires_grad_(True))
                loss, _ = pama_ext.fused_linear_policy_loss(
                    x["hidden"], x["weight"], x["bias"], x["token_ids"], x["mask"], x["old_logp"], x["advantages"],
                    method=method, granularity=granularity)
                assert path_of(loss) == ("single" if want else "two-pass"), (method, granularity, n)
                if not want:
                    with pytest.raises(ValueError, match="single_pass"):
                        pama_ext.fused_linear_policy_loss(
                            x["hidden"], x["weight"], x["bias"], x["token_ids"], x["mask"], x["old_logp"],
                            x["advantages"], method=method, granularity=granularity, single_pass=True)


@pytest.mark.parametrize("method,granularity,n", ELIGIBLE)
@pytest.mark.parametrize("agg", AGGS)
def test_single_pass_every_accepted_option_f64(method, granularity, n, agg):
    """Every option combination the single pass accepts (noon, whiten, dual clip, KL loss; prefs for
    linear) against the composition, and against the forced two-pass path, in float64."""
    c = make_case(n, 3, 5, 3, 7, seed=hash((method, granularity, n, agg)) % 1000, mask="holes")
    prefs = [None] + ([torch.tensor([0.3, 1.1, 0.6][:n], dtype=F64)] if method == "linear" else [])
    for noon in (True, False):
        for whiten in (True, False):
            for dual_clip in (3.0, None):
                for beta_loss in (0.0, 0.1):
                    for pr in prefs:
                        kw = dict(method=method, granularity=granularity, agg=agg, noon=noon, whiten=whiten,
                                  dual_clip=dual_clip, beta_loss=beta_loss, prefs=pr)
                        got = run(True, c, chunk_size=4, **kw)
                        assert path_of_last[0] == "single"
                        assert_same64(got, run(False, c, **kw))
    kw = dict(method=method, granularity=granularity, agg=agg, prefs=prefs[-1])
    assert_same64(run(True, c, chunk_size=4, **kw), run(True, c, chunk_size=6, single_pass=False, **kw))
    assert path_of_last[0] == "two-pass"


@pytest.mark.parametrize("logit_scale,softcap,bias", [(1.0, None, False), (0.5, None, True), (1.3, 3.0, True)])
def test_single_pass_logit_scale_softcap_f64(logit_scale, softcap, bias):
    c = make_case(2, 3, 9, 5, 13, seed=17, bias=bias)
    kw = dict(logit_scale=logit_scale, softcap=softcap, beta_loss=0.05)
    got = run(True, c, chunk_size=5, **kw)
    assert_same64(got, run(False, c, **kw))


def test_single_pass_uses_the_ops_backward_coefficients():
    """dL/dlogp of every token in the single pass is what pama_policy_loss_backward gives the unfused
    composition, bit for bit (the op is called per chunk, each token a row with its row's scale)."""
    from pama_ext import op_table

    c = make_case(3, 4, 9, 5, 13, seed=23, mask="holes")
    kw = dict(agg="seq-mean-token-sum", beta_loss=0.2)
    seen = []
    real = op_table.call_native

    def spy(op, args):
        out = real(op, args)
        if op == "pama_policy_loss_backward":
            seen.append(out.detach().reshape(-1).clone())
        return out

    op_table.call_native = spy
    try:
        run(True, c, chunk_size=5, **kw)
        per_chunk = torch.cat(seen)
        seen.clear()
        # the same log-probs (the chunked epilogue's, bit for bit) through the unfused loss
        logp = pama_ext.fused_linear_logp(c["hidden"], c["weight"], c["bias"], c["token_ids"], c["mask"],
                                          chunk_size=5).requires_grad_(True)
        want_loss, _ = pama_ext.pama_policy_loss(logp, c["old_logp"], c["advantages"], c["mask"], c["ref_logp"], **kw)
        (want,) = torch.autograd.grad(want_loss, logp)
    finally:
        op_table.call_native = real
    assert per_chunk.shape == (4 * 9,)
    assert torch.equal(per_chunk, want.reshape(-1))


def test_single_pass_gradient_scaling_and_partial_grads():
    """The backward scales the saved gradients by the incoming one (loss used twice, scaled), only
    the inputs that require a gradient get one (e.g. a frozen output layer), and a second backward
    is a clear error."""
    c = make_case(2, 3, 6, 4, 10, seed=29)
    for req in (("hidden",), ("weight",), ("weight", "bias"), ("hidden", "weight", "bias")):
        x = {k: (c[k].clone().requires_grad_(True) if k in req else c[k]) for k in c}
        y = {k: (c[k].clone().requires_grad_(True) if k in req else c[k]) for k in c}
        loss, _ = pama_ext.fused_linear_policy_loss(x["hidden"], x["weight"], x["bias"], x["token_ids"], x["mask"],
                                                    x["old_logp"], x["advantages"])
        assert path_of(loss) == "single"
        got = torch.autograd.grad(2.5 * loss - 0.5 * loss, [x[k] for k in req])
        logp = unfused_logp(y["hidden"], y["weight"], y["bias"], y["token_ids"])
        want_loss, _ = pama_ext.pama_policy_loss(logp, y["old_logp"], y["advantages"], y["mask"])
        want = torch.autograd.grad(2.0 * want_loss, [y[k] for k in req])
        for k, a, b in zip(req, got, want):
            assert_close_f64(f"grad_{k}", a, b)
    h = c["hidden"].clone().requires_grad_(True)
    loss, _ = pama_ext.fused_linear_policy_loss(h, c["weight"], c["bias"], c["token_ids"], c["mask"], c["old_logp"],
                                                c["advantages"])
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already backpropagated"):
        loss.backward()


def test_no_grad_takes_the_forward_only_path():
    """Without a gradient to compute the single pass would only add work: the forward-only path runs,
    with the same loss and metrics."""
    c = make_case(2, 3, 6, 4, 10, seed=37)
    with torch.no_grad():
        loss, metrics = pama_ext.fused_linear_policy_loss(c["hidden"], c["weight"], c["bias"], c["token_ids"],
                                                          c["mask"], c["old_logp"], c["advantages"])
    assert loss.grad_fn is None
    want = run(False, c)
    assert_close_f64("loss", loss, want[0])
    for k in METRIC_KEYS:
        assert_close_f64(k, metrics[k], want[1][k])


def test_single_pass_bad_flag():
    c = make_case(2, 2, 3, 4, 5, seed=1)
    with pytest.raises(ValueError, match="single_pass"):
        run(True, c, single_pass="yes")


# ------------------------------------------------------------------------------------------------
# bf16 / fp16: the tolerance rule against the composition in float64 and in the low dtype
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method,granularity", [("pama", "token"), ("linear", "batch"), ("mgda", "batch"),
                                                ("pama", "sequence")])
def test_low_precision_tolerance_rule(dtype, method, granularity):
    """Single pass (pama / token, linear) and two passes (mgda, pama / sequence)."""
    c = make_case(2, 4, 16, 8, 33, dtype=dtype, seed=13)
    c64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in c.items()}
    kw = dict(method=method, granularity=granularity)
    got = run(True, c, chunk_size=9, **kw)
    ref64 = run(False, c64, **kw)
    reflow = run(False, c, **kw)
    assert_tolerance_rule("loss", got[0], ref64[0], reflow[0], dtype)
    for k in ("pg_loss", "approx_kl", "weights"):
        assert_tolerance_rule(k, got[1][k], ref64[1][k], reflow[1][k], dtype)
    for k in ("hidden", "weight", "bias"):
        assert got[2][k].dtype == dtype
        assert_tolerance_rule(f"grad_{k}", got[2][k], ref64[2][k], reflow[2][k], dtype)


# ------------------------------------------------------------------------------------------------
# bad input: errors naming the argument
# ------------------------------------------------------------------------------------------------
def _bad(**change):
    c = make_case(2, 2, 3, 4, 5, seed=1)
    c.update(change)
    return c


@pytest.mark.parametrize("change,exc,match", [
    (dict(hidden=torch.randn(6, 4, dtype=F64)), RuntimeError, "hidden"),
    (dict(hidden=torch.zeros(2, 3, 4, dtype=torch.int64)), RuntimeError, "hidden"),
    (dict(weight=torch.randn(5, 3, dtype=F64)), RuntimeError, "weight"),
    (dict(weight=torch.randn(5, 4, dtype=torch.float32)), RuntimeError, "weight"),
    (dict(bias=torch.randn(4, dtype=F64)), RuntimeError, "bias"),
    (dict(token_ids=torch.zeros(2, 3)), RuntimeError, "token_ids"),
    (dict(token_ids=torch.zeros(2, 4, dtype=torch.long)), RuntimeError, "token_ids"),
    (dict(mask=torch.ones(3, 3, dtype=torch.bool)), RuntimeError, "mask"),
    (dict(old_logp=torch.zeros(2, 3, dtype=torch.long)), RuntimeError, "old_logp"),
    (dict(advantages=torch.randn(2, 2, 4, dtype=F64)), RuntimeError, "advantages"),
])
def test_bad_tensors(change, exc, match):
    with pytest.raises(exc, match=match):
        run(True, _bad(**change))


@pytest.mark.parametrize("kw,exc,match", [
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=2.5), ValueError, "chunk_size"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(logit_scale=float("nan")), ValueError, "logit_scale"),
    (dict(granulatiry="batch"), TypeError, "granulatiry"),
    (dict(method="nope"), ValueError, "method"),
])
def test_bad_options(kw, exc, match):
    with pytest.raises(exc, match=match):
        run(True, _bad(), **kw)


# ------------------------------------------------------------------------------------------------
# memory: no op of the forward + backward allocates anything near B·T·V elements
# ------------------------------------------------------------------------------------------------
class LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("granularity", ["token", "batch"])
def test_memory_bounded_by_chunk(granularity):
    B, T, H, V, chunk = 4, 64, 8, 1000, 32  # B·T·V = 256k elements; chunk·V = 32k; V·H = 8k
    c = make_case(2, B, T, H, V, dtype=torch.float32, seed=4)
    sizes = {}
    for fused in (True, False):
        with LargestOutput() as probe:
            run(fused, c, chunk_size=chunk, granularity=granularity)
        sizes[fused] = probe.largest
    assert sizes[False] >= B * T * V, "the probe must see the unfused logits (else it proves nothing)"
    assert sizes[True] <= max(chunk * V, V * H, B * T * H), sizes


# ------------------------------------------------------------------------------------------------
# Triton: interpreter on CPU tensors, ahead-of-time compile for sm_80 / sm_90
# ------------------------------------------------------------------------------------------------
def _subprocess(code: str, tmp_path, interpret: bool):
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.dirname(os.path.abspath(__file__)),
                                           os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"subprocess failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed (pip install triton==3.9.0; the GPU epilogue)")
@pytest.mark.skipif(TRITON_INSTALLED != TRITON_PINNED,
                    reason=f"triton {TRITON_INSTALLED} installed: the interpreter test runs with the pinned "
                    f"triton {TRITON_PINNED} (torch 2.11's triton 3.6 interpreter cannot "
                    "index a runtime loop bound with recent numpy; compiled kernels are not affected)")
def test_triton_interpreter_epilogue(tmp_path):
    """The @triton.jit epilogue kernels run by the interpreter on CPU tensors, against the PyTorch
    epilogue; then the whole fused op routed through them against the composition."""
    _subprocess("""
        import torch
        import pama_ext
        from pama_ext import fused_linear as fl, triton_kernels as tk
        import test_fused_linear as t
        assert tk.AVAILABLE
        g = torch.Generator().manual_seed(0)
        for rows, V in [(1, 1), (3, 5), (4, 1024), (5, 2500)]:
            x = torch.randn(rows, V, generator=g) * 4
            if rows > 2:
                x[1] = -1e30  # a row of huge negative logits
            ids = torch.randint(0, V, (rows,), generator=g)
            lse, logp = torch.empty(rows), torch.empty(rows)
            tk.epilogue_forward(x, ids, lse, logp)
            lse_ref, logp_ref = fl.epilogue_forward(x, ids)
            torch.testing.assert_close(lse, lse_ref, rtol=1e-6, atol=1e-5)
            torch.testing.assert_close(logp, logp_ref, rtol=1e-6, atol=1e-5)
            gr = torch.randn(rows, generator=g)
            got = tk.epilogue_backward(x.clone(), ids, lse_ref, gr)
            want = fl.epilogue_backward(x.clone(), ids, lse_ref, gr)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        fl._use_triton = lambda tensor: True  # route the CPU op through the interpreted kernels
        c = t.make_case(2, 3, 7, 4, 9, dtype=torch.float32, seed=1)
        c64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in c.items()}
        got, want = t.run(True, c, chunk_size=5, granularity="batch"), t.run(False, c64, granularity="batch")
        torch.testing.assert_close(got[0].double(), want[0], rtol=1e-4, atol=1e-5)
        for k in got[2]:
            torch.testing.assert_close(got[2][k].double(), want[2][k], rtol=1e-4, atol=1e-5)
        # logp.sum(): an expanded (stride 0) incoming gradient
        h = c["hidden"].clone().requires_grad_(True)
        pama_ext.fused_linear_logp(h, c["weight"], c["bias"], c["token_ids"], chunk_size=4).sum().backward()
        h64 = c64["hidden"].clone().requires_grad_(True)
        t.unfused_logp(h64, c64["weight"], c64["bias"], c["token_ids"]).sum().backward()
        torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
        print("ok")
    """, tmp_path, interpret=True)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed (pip install triton==3.9.0; the GPU epilogue)")
def test_triton_aot_compile(tmp_path):
    """Both kernels compile to cubin for sm_80 and sm_90 without a GPU, with no register spills
    (local memory) or stack: they hold one BLOCK_V vector per thread block."""
    out = _subprocess("""
        import json
        from pama_ext import triton_kernels as tk
        rows = []
        for cap in (80, 90):
            for name in tk.SIGNATURES:
                k = tk.compile_for(name, cap)
                rows.append(dict(cap=cap, name=name, cubin=len(k.asm["cubin"]), **tk.resource_usage(k)))
        print(json.dumps(rows))
    """, tmp_path, interpret=False)
    rows = json.loads(out.strip().splitlines()[-1])
    assert len(rows) == 4
    for r in rows:
        print(f"sm_{r['cap']} {r['name']}: {r['REG']} registers, {r['LOCAL']} B local (spills), {r['STACK']} B stack")
        assert r["cubin"] > 0 and r["REG"] > 0
        assert r["LOCAL"] == 0 and r["STACK"] == 0, r


def test_triton_pin_is_one_version():
    """The Makefile's install target, pyproject's ``triton`` extra and pama_ext.triton_kernels name
    the same triton release."""
    from pama_ext import triton_kernels

    with open(os.path.join(ROOT, "Makefile")) as f:
        make = re.search(r"^TRITON_VERSION \?= (\S+)$", f.read(), re.M)
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        pyproject = re.search(r'^triton = \["triton==([^"]+)"\]$', f.read(), re.M)
    assert make and pyproject
    assert make.group(1) == pyproject.group(1) == triton_kernels.TRITON_VERSION


def test_autocast_does_not_recast_the_chunks():
    """Under an enclosing autocast the op computes in its inputs' dtype (float32 here), so the result
    is the float32 one, not a bf16 matmul's."""
    c = make_case(2, 3, 6, 8, 40, dtype=torch.float32, seed=21)
    plain = pama_ext.fused_linear_logp(c["hidden"], c["weight"], c["bias"], c["token_ids"], chunk_size=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = pama_ext.fused_linear_logp(c["hidden"], c["weight"], c["bias"], c["token_ids"], chunk_size=5)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, plain, rtol=0, atol=0)
