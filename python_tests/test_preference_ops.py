"""Preference-data ops (algorithms §6-§7): multi_dpo_loss, gradient_gram, combine_gradients.

Kernels against the float64 reference (pama_ext.reference) on odd batch sizes, every n of the grid,
labels with ties, length normalisation and the low-precision dtypes (DESIGN tolerance rule);
gradcheck and opcheck of the raw ops; the Gram kernel against the concatenate-then-matmul
formulation; combine_gradients against the explicit sum; determinism; bad input; no host sync.
"""
from __future__ import annotations

import math
import os
import re

import pytest
import torch
from torch.library import opcheck

import pama_ext
from pama_ext.vocab import GRAM_METHODS
from pama_ext import reference
from pama_ext.pareto import gram_weights
from pama_testutils import LOWP_DTYPES, NS, compare, require_native

F64 = torch.float64
ERRORS = (RuntimeError, ValueError)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCHES = [1, 7, 33]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def dpo_inputs(n, B, *, seed=0, lengths=False, label_dtype=torch.int64, device="cpu"):
    """Four [B] log-prob tensors (float64), labels [n, B] in {-1, 0, +1} with ties, optional lengths."""
    g = _gen(seed)
    pc = -(20 + 10 * torch.rand(B, generator=g, dtype=F64))
    pr = -(20 + 10 * torch.rand(B, generator=g, dtype=F64))
    rc = pc + 3 * torch.randn(B, generator=g, dtype=F64)
    rr = pr + 3 * torch.randn(B, generator=g, dtype=F64)
    labels = torch.randint(-1, 2, (n, B), generator=g)
    if B >= 3:
        labels[:, 0] = 0  # a pair tied on every objective
    out = dict(pc=pc, pr=pr, rc=rc, rr=rr, labels=labels.to(label_dtype))
    if lengths:
        out["chosen_lengths"] = torch.randint(0, 40, (B,), generator=g)  # 0 is clamped to 1
        out["rejected_lengths"] = torch.randint(1, 40, (B,), generator=g).to(F64)
    else:
        out["chosen_lengths"] = out["rejected_lengths"] = None
    return {k: (v.to(device) if v is not None else None) for k, v in out.items()}


def run_dpo(fn, x, dtype, beta=0.1, seed=1):
    """(losses, coef, grad pc, grad pr, grad rc, grad rr) of fn on x's log-probs cast to dtype."""
    leaves = [x[k].detach().to(dtype).requires_grad_(True) for k in ("pc", "pr", "rc", "rr")]
    losses, coef = fn(*leaves, x["labels"], beta, chosen_lengths=x["chosen_lengths"],
                      rejected_lengths=x["rejected_lengths"])
    up = torch.randn(losses.shape, generator=_gen(seed), dtype=F64).to(losses.dtype).to(losses.device)
    grads = torch.autograd.grad((losses * up).sum(), leaves)
    return [losses, coef, *grads]


NAMES = ("losses", "coef", "grad_policy_chosen", "grad_policy_rejected", "grad_ref_chosen", "grad_ref_rejected")


# ----------------------------------------------------------------------------------------------
# multi_dpo_loss
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lengths", [False, True], ids=["sum", "length-norm"])
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("n", NS)
def test_dpo_float64(device, n, B, lengths):
    require_native()
    x = dpo_inputs(n, B, seed=n * 100 + B, lengths=lengths, device=device)
    got = run_dpo(pama_ext.multi_dpo_loss, x, F64)
    want = run_dpo(reference.multi_dpo_loss, {k: (v.cpu() if v is not None else None) for k, v in x.items()}, F64)
    for name, a, b in zip(NAMES, got, want):
        compare(name, a, b)
    assert got[0].dtype == F64 and got[1].dtype == F64


@pytest.mark.parametrize("dtype", LOWP_DTYPES, ids=str)
@pytest.mark.parametrize("lengths", [False, True], ids=["sum", "length-norm"])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_dpo_low_precision(device, dtype, n, lengths):
    """Tolerance rule: error vs float64 <= 2x the reference's own error in dtype + floor."""
    require_native()
    x = dpo_inputs(n, 33, seed=7 + n, lengths=lengths, device=device)
    # the same rounded inputs for every run
    x = {k: (v.to(dtype).to(F64) if k in ("pc", "pr", "rc", "rr") else v) for k, v in x.items()}
    cpu = {k: (v.cpu() if v is not None else None) for k, v in x.items()}
    got = run_dpo(pama_ext.multi_dpo_loss, x, dtype)
    ref64 = run_dpo(reference.multi_dpo_loss, cpu, F64)
    reflow = run_dpo(reference.multi_dpo_loss, cpu, dtype)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    for name, a, b, c in zip(NAMES, got, ref64, reflow):
        compare(name, a, b, c, dtype)
    for g in got[2:]:
        assert g.dtype == dtype


@pytest.mark.parametrize("label_dtype", [torch.int8, torch.int32, torch.float32, torch.float64], ids=str)
def test_dpo_label_dtypes_and_signs(device, label_dtype):
    """Labels of any integer/float dtype; read through their sign (documented CHOICE)."""
    require_native()
    x = dpo_inputs(3, 7, seed=3, label_dtype=label_dtype, device=device)
    base = run_dpo(pama_ext.multi_dpo_loss, x, F64)
    scaled = dict(x, labels=x["labels"] * 3)  # +-3 reads as +-1
    for a, b in zip(base, run_dpo(pama_ext.multi_dpo_loss, scaled, F64)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dpo_ties_and_sign_flip(device):
    """A tie gives log 2 and zero coefficient; flipping both the label and the pair is a no-op."""
    require_native()
    x = dpo_inputs(2, 7, seed=5, device=device)
    x["labels"][0] = 0
    losses, coef = pama_ext.multi_dpo_loss(x["pc"], x["pr"], x["rc"], x["rr"], x["labels"], 0.3)
    torch.testing.assert_close(losses[0], torch.tensor(2.0, dtype=F64, device=device).log())
    assert (coef[0] == 0).all()
    l2, c2 = pama_ext.multi_dpo_loss(x["pr"], x["pc"], x["rr"], x["rc"], -x["labels"], 0.3)
    torch.testing.assert_close(l2, losses)
    torch.testing.assert_close(c2, -coef)


def test_dpo_coef_is_dl_dh(device):
    """coef[i, b] = dL_i / dh_b, checked through autograd of the reference on h itself."""
    require_native()
    x = dpo_inputs(3, 7, seed=9, lengths=True, device=device)
    _, coef = pama_ext.multi_dpo_loss(x["pc"], x["pr"], x["rc"], x["rr"], x["labels"], 0.2,
                                      chosen_lengths=x["chosen_lengths"], rejected_lengths=x["rejected_lengths"])
    h = reference.dpo_margins(x["pc"], x["pr"], x["rc"], x["rr"], x["chosen_lengths"], x["rejected_lengths"])
    h = h.detach().requires_grad_(True)
    zeros = torch.zeros_like(h)
    losses, _ = reference.multi_dpo_loss(h, zeros, zeros, zeros, x["labels"], 0.2)
    jac = torch.stack([torch.autograd.grad(losses[i], h, retain_graph=True)[0] for i in range(3)])
    compare("coef", coef, jac)


def test_dpo_empty_batch(device):
    require_native()
    e = torch.empty(0, dtype=F64, device=device)
    losses, coef = pama_ext.multi_dpo_loss(e, e, e, e, torch.empty(2, 0, device=device), 0.1)
    assert losses.shape == (2,) and coef.shape == (2, 0)
    assert (losses == 0).all()


@pytest.mark.parametrize("lengths", [False, True])
def test_dpo_gradcheck(device, lengths):
    require_native()
    x = dpo_inputs(3, 5, seed=11, lengths=lengths, device=device)
    leaves = [x[k].detach().clone().requires_grad_(True) for k in ("pc", "pr", "rc", "rr")]

    def f(pc, pr, rc, rr):
        return pama_ext.multi_dpo_loss(pc, pr, rc, rr, x["labels"], 0.5, chosen_lengths=x["chosen_lengths"],
                                       rejected_lengths=x["rejected_lengths"])[0]

    assert torch.autograd.gradcheck(f, leaves)


def test_dpo_deterministic(device):
    require_native()
    x = dpo_inputs(8, 33, seed=2, lengths=True, device=device)
    a = run_dpo(pama_ext.multi_dpo_loss, x, torch.float32)
    b = run_dpo(pama_ext.multi_dpo_loss, x, torch.float32)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


# odd pair counts around the CPU kernel's tile (256) and task (8192) sizes, and many tasks
DPO_SIZES = [1, 7, 255, 257, 100_003]


def dpo_edge_inputs(n, P, *, seed, lengths, device):
    """dpo_inputs with float labels whose ties are 0 or NaN; lengths: "none", "chosen" (one side only)
    or "both"."""
    x = dpo_inputs(n, P, seed=seed, lengths=lengths != "none", label_dtype=F64, device=device)
    x["labels"].view(-1)[1::5] = float("nan")  # NaN reads as a tie
    if lengths == "chosen":
        x["rejected_lengths"] = None
    return x


@pytest.mark.parametrize("lengths", ["none", "chosen", "both"])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("P", DPO_SIZES)
@pytest.mark.parametrize("n", [1, 8])
def test_dpo_odd_sizes(device, n, P, dtype, lengths):
    """Forward and backward against the reference on pair counts off the kernel's tile and task
    boundaries, with 0 and NaN ties and each length option (float32: the tolerance rule)."""
    require_native()
    x = dpo_edge_inputs(n, P, seed=P + n, lengths=lengths, device=device)
    x = {k: (v.to(dtype).to(F64) if k in ("pc", "pr", "rc", "rr") and v is not None else v) for k, v in x.items()}
    cpu = {k: (v.cpu() if v is not None else None) for k, v in x.items()}
    got = run_dpo(pama_ext.multi_dpo_loss, x, dtype)
    ref64 = run_dpo(reference.multi_dpo_loss, cpu, F64)
    reflow = run_dpo(reference.multi_dpo_loss, cpu, dtype)
    for name, a, b, c in zip(NAMES, got, ref64, reflow):
        compare(name, a, b, c, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_dpo_extreme_margins(device, dtype):
    """|z| = beta |h| up to 1e4 (past the float32 exponential's range on both sides): finite losses,
    coefficients and gradients, equal to the reference's (a tie there is still log 2). No h = 0: the
    reference's autograd takes a one-sided derivative of its clamp at that kink."""
    require_native()
    mags = torch.tensor([1e-6, 1e-3, 0.5, 1.0, 5.0, 17.0, 20.0, 85.0, 86.0, 87.0, 88.8, 89.0, 103.0, 104.0,
                         1e3, 1e4], dtype=F64)
    h = torch.cat([mags, -mags])
    P = h.numel()
    signs = torch.tensor([1.0, -1.0, 0.0, float("nan")], dtype=F64)
    labels = signs.repeat_interleave(P).view(4, P)
    z = torch.zeros(P, dtype=F64)
    x = dict(pc=h.to(device), pr=z.to(device), rc=z.to(device), rr=z.to(device), labels=labels.to(device),
             chosen_lengths=None, rejected_lengths=None)
    cpu = {k: (v.cpu() if v is not None else None) for k, v in x.items()}
    got = run_dpo(pama_ext.multi_dpo_loss, x, dtype, beta=1.0)
    for name, a in zip(NAMES, got):
        assert torch.isfinite(a).all(), f"{name}: not finite: {a}"
    ref64 = run_dpo(reference.multi_dpo_loss, cpu, F64, beta=1.0)
    reflow = run_dpo(reference.multi_dpo_loss, cpu, dtype, beta=1.0)
    for name, a, b, c in zip(NAMES, got, ref64, reflow):
        compare(name, a, b, c, dtype)
    # per pair (B = 1): -log sigmoid(z) itself, where float32 has no sum to hide an error in (the
    # float32 exponential of the CPU kernels returns 0 below -86, cpu/vec.h: atol = exp(-86))
    for k in range(h.numel()):
        one = {key: (v[..., k:k + 1] if v is not None else None) for key, v in x.items()}
        l1 = run_dpo(pama_ext.multi_dpo_loss, one, dtype, beta=1.0)[0]
        l64 = run_dpo(reference.multi_dpo_loss, {key: (v.cpu() if v is not None else None) for key, v in one.items()},
                      F64, beta=1.0)[0]
        torch.testing.assert_close(l1.double().cpu(), l64, rtol=4 * torch.finfo(dtype).eps,
                                   atol=math.exp(-86) if dtype == torch.float32 else 0.0)


# ----------------------------------------------------------------------------------------------
# gradient_gram / combine_gradients
# ----------------------------------------------------------------------------------------------
SHAPES = [(3, 5), (0,), (7,), (1,), (2, 0, 3), (33, 17), (70001,), (4, 4, 4), (1, 1)]


def grad_table(n, shapes=SHAPES, *, dtype=F64, seed=0, none=True, device="cpu"):
    g = _gen(seed)
    table = [[(torch.randn(s, generator=g, dtype=F64)).to(dtype).to(device) for s in shapes] for _ in range(n)]
    if none and n >= 2:
        table[1][0] = None  # one objective without a gradient for a parameter
        table[0][2] = None
    if none:
        for i in range(n):
            table[i][len(shapes) - 1] = None  # a parameter no objective touches
    return table


def stacked_gram(table, acc=F64):
    """The concatenate-then-matmul formulation: M = [flat g_i] (n x d), G = M M^T."""
    shapes = [next((g for g in col if g is not None), None) for col in zip(*table)]
    rows = []
    for row in table:
        flat = [(g if g is not None else torch.zeros_like(like)).reshape(-1).to(acc)
                for g, like in zip(row, shapes) if like is not None]
        rows.append(torch.cat(flat) if flat else torch.zeros(0, dtype=acc))
    M = torch.stack(rows)
    return M @ M.T


@pytest.mark.parametrize("n", NS)
def test_gram_float64(device, n):
    require_native()
    t = grad_table(n, seed=n, device=device)
    G = pama_ext.gradient_gram(t)
    assert G.dtype == F64 and G.shape == (n, n) and G.device.type == device
    want = stacked_gram([[g.cpu() if g is not None else None for g in row] for row in t])
    compare("gram", G, want)
    assert torch.equal(G, G.T)


# n = 23 and 64: more (pair, slice) items than a CUDA block has threads (SL = 1, several items per
# thread), and n rows of a tile shorter than 256 elements (the tile loader steps over rows).
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
@pytest.mark.parametrize("n", [23, 64])
def test_gram_many_objectives(device, n, dtype):
    require_native()
    t = grad_table(n, [(3, 5), (70001,), (33, 17)], seed=n, dtype=dtype, device=device)
    G = pama_ext.gradient_gram(t)
    cpu = [[g.cpu() if g is not None else None for g in row] for row in t]
    if dtype == F64:
        compare("gram", G, stacked_gram(cpu))
    else:
        ref64, ref32 = stacked_gram(cpu, F64), stacked_gram(cpu, torch.float32)
        scale = ref64.abs().max()
        compare("gram", G.double().cpu() / scale, ref64 / scale, ref32.double() / scale, torch.float32)
    assert torch.equal(G, G.T)
    G64 = G.double()
    for method in ("mgda", "cagrad", "raco"):
        compare("weights", gram_weights(G64, method=method), reference.gram_weights(G64.cpu(), None, method))


@pytest.mark.parametrize("dtype", LOWP_DTYPES, ids=str)
@pytest.mark.parametrize("n", [2, 3, 8])
def test_gram_low_precision(device, dtype, n):
    """bf16/fp16/fp32 gradients accumulate in float32: error <= 2x float32 matmul's + floor."""
    require_native()
    t = grad_table(n, seed=10 + n, dtype=dtype, device=device)
    G = pama_ext.gradient_gram(t)
    assert G.dtype == torch.float32
    cpu = [[g.cpu() if g is not None else None for g in row] for row in t]
    ref64 = stacked_gram(cpu, F64)
    ref32 = stacked_gram(cpu, torch.float32)
    # relative form of the rule (G has entries ~1e4): compare G / scale
    scale = ref64.abs().max()
    compare("gram", G.double().cpu() / scale, ref64 / scale, ref32.double() / scale, torch.float32)


def test_gram_matches_reference_and_edge_cases(device):
    require_native()
    t = grad_table(3, seed=4, device=device)
    compare("gram", pama_ext.gradient_gram(t), reference.gradient_gram(t))
    # every entry None: zeros
    G = pama_ext.gradient_gram([[None, None], [None, None]])
    assert G.shape == (2, 2) and (G == 0).all()
    # no parameters at all
    assert (pama_ext.gradient_gram([[], []]) == 0).all()
    # non-contiguous gradients
    a = torch.randn(6, 10, dtype=F64, device=device).T
    b = torch.randn(10, 6, dtype=F64, device=device)
    compare("gram", pama_ext.gradient_gram([[a], [b]]), stacked_gram([[a.cpu()], [b.cpu()]]))


def test_gram_bitwise_independent_of_threads():
    require_native()
    t = grad_table(4, shapes=[(300000,), (5, 7), (131072,)], dtype=torch.float32, seed=3)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = pama_ext.gradient_gram(t)
        torch.set_num_threads(max(2, prev))
        b = pama_ext.gradient_gram(t)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(a, b)


def explicit_combine(table, coeffs, shapes, acc=F64):
    out = []
    for k, s in enumerate(shapes):
        total = torch.zeros(s, dtype=acc)
        for i, row in enumerate(table):
            if row[k] is not None:
                total = total + coeffs[i].to(acc) * row[k].cpu().to(acc)
        out.append(total)
    return out


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("n", NS)
def test_combine_float64(device, n, accumulate):
    require_native()
    t = grad_table(n, seed=20 + n, device=device)
    coeffs = torch.randn(n, generator=_gen(n), dtype=F64).to(device)
    params = [torch.zeros(s, dtype=F64, device=device, requires_grad=True) for s in SHAPES]
    prior = [torch.randn(s, generator=_gen(k), dtype=F64) for k, s in enumerate(SHAPES)]
    for k in range(0, len(params), 2):  # half the parameters already hold a .grad
        params[k].grad = prior[k].clone().to(device)
    pama_ext.combine_gradients(t, coeffs, params, accumulate=accumulate)
    want = explicit_combine(t, coeffs.cpu(), SHAPES)
    for k, (p, w) in enumerate(zip(params, want)):
        if accumulate and k % 2 == 0:
            w = prior[k] + w
        compare(f"grad[{k}]", p.grad, w)
        assert p.grad.dtype == F64


@pytest.mark.parametrize("dtype", LOWP_DTYPES, ids=str)
def test_combine_low_precision(device, dtype):
    require_native()
    n = 3
    t = grad_table(n, seed=30, dtype=dtype, device=device)
    coeffs = torch.tensor([0.7, -1.3, 0.25], device=device)
    params = [torch.zeros(s, dtype=dtype, device=device, requires_grad=True) for s in SHAPES]
    pama_ext.combine_gradients(t, coeffs, params)
    want64 = explicit_combine(t, coeffs.cpu(), SHAPES)
    # the reference in the kernel's dtype: float32 sum rounded to dtype
    want_low = [w.to(torch.float32).to(dtype) for w in explicit_combine(t, coeffs.cpu(), SHAPES, torch.float32)]
    for k, (p, w, wl) in enumerate(zip(params, want64, want_low)):
        assert p.grad.dtype == dtype
        compare(f"grad[{k}]", p.grad, w, wl, dtype)


def test_combine_matches_reference_mixed_dtypes_and_layouts(device):
    """bf16 gradients into float32 .grad, a non-contiguous .grad, accumulate on top."""
    require_native()
    t = grad_table(2, shapes=[(6, 10), (5,)], dtype=torch.bfloat16, seed=5, none=False, device=device)
    coeffs = torch.tensor([0.5, 2.0], device=device)
    mk = lambda: [torch.zeros(6, 10, device=device, requires_grad=True),  # noqa: E731
                  torch.zeros(5, device=device, requires_grad=True)]
    got, want = mk(), mk()
    for ps in (got, want):
        ps[0].grad = torch.ones(10, 6, device=device).T  # non-contiguous
        ps[1].grad = torch.full((5,), 2.0, device=device)
    pama_ext.combine_gradients(t, coeffs, got, accumulate=True)
    reference.combine_gradients(t, coeffs, want, accumulate=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)
    assert not got[0].grad.is_contiguous()


def test_combine_then_gram_is_quadratic_form(device):
    """<sum_i a_i g_i, sum_j a_j g_j> = a^T G a: the two ops agree with each other."""
    require_native()
    n = 4
    t = grad_table(n, seed=8, device=device)
    a = torch.randn(n, generator=_gen(1), dtype=F64).to(device)
    params = [torch.zeros(s, dtype=F64, device=device, requires_grad=True) for s in SHAPES]
    pama_ext.combine_gradients(t, a, params)
    sq = sum((p.grad.double() ** 2).sum() for p in params)
    G = pama_ext.gradient_gram(t)
    torch.testing.assert_close(sq, a @ G @ a, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# opcheck (schema, fake tensors, autograd registration)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("lengths", [False, True])
def test_opcheck_dpo(device, dtype, lengths):
    require_native()
    x = dpo_inputs(3, 7, seed=1, lengths=lengths, device=device)
    lp = [x[k].to(dtype).requires_grad_(True) for k in ("pc", "pr", "rc", "rr")]
    args = (*lp, x["labels"], 0.1, x["chosen_lengths"], x["rejected_lengths"])
    opcheck(torch.ops.pama_ext.multi_dpo_loss.default, args)
    _, coef = torch.ops.pama_ext.multi_dpo_loss.default(*args)
    g = torch.randn(3, dtype=coef.dtype, device=device)
    opcheck(torch.ops.pama_ext.multi_dpo_loss_backward.default,
            (g, coef, lp[0].detach(), x["chosen_lengths"], x["rejected_lengths"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64], ids=str)
def test_opcheck_gram_and_combine(device, dtype):
    require_native()
    shapes = [(3, 5), (0,), (7,)]
    t = grad_table(2, shapes=shapes, dtype=dtype, seed=2, device=device)
    flat = [g for row in t for g in row]
    opcheck(torch.ops.pama_ext.gradient_gram.default, (flat, 2))
    outs = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    coeffs = torch.tensor([0.3, -0.7], device=device)
    for acc in (False, True):
        opcheck(torch.ops.pama_ext.combine_gradients.default, (flat, 2, coeffs, outs, acc))


@pytest.mark.parametrize("method", GRAM_METHODS)
def test_opcheck_gram_weights(device, method):
    require_native()
    g = torch.randn(3, 6, generator=_gen(0), dtype=F64).to(device)
    w = torch.tensor([0.2, 0.3, 0.5], dtype=F64, device=device)
    for G in (g @ g.T, (g @ g.T).float()):
        opcheck(torch.ops.pama_ext.gram_weights.default, (G, w.to(G.dtype), method, 0.4))
        opcheck(torch.ops.pama_ext.gram_weights.default, (G, None, method, 0.4))


def test_compile_fullgraph(device):
    """A RACO step on statistics compiles without graph breaks (no host reads in the ops)."""
    require_native()
    torch._dynamo.reset()
    from pama_ext import pareto

    def step(pc, pr, rc, rr, labels, w):
        losses, coef = pama_ext.multi_dpo_loss(pc, pr, rc, rr, labels, 0.1)
        G = coef @ coef.T  # G = A K A^T with K = I
        a = pareto.cagrad_weights(G, w)
        return (a.detach() * losses).sum(), pareto.mgda_weights(G), pareto.pcgrad_weights(G)

    x = dpo_inputs(3, 7, seed=4, device=device)
    w = torch.tensor([0.2, 0.3, 0.5], dtype=F64, device=device)
    leaves = [x[k].clone().requires_grad_(True) for k in ("pc", "pr", "rc", "rr")]
    eager = step(*leaves, x["labels"], w)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*leaves, x["labels"], w)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# bad input: errors name the argument
# ----------------------------------------------------------------------------------------------
def _names(msg, arg):
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(arg)}(?![A-Za-z0-9_])", msg) is not None


def expect_error(arg, fn, *args, **kwargs):
    with pytest.raises(ERRORS) as ei:
        fn(*args, **kwargs)
    assert _names(str(ei.value), arg), f"error does not name {arg!r}: {ei.value}"


def test_dpo_bad_input(device):
    require_native()
    x = dpo_inputs(2, 5, seed=0, device=device)
    pc, pr, rc, rr, lab = x["pc"], x["pr"], x["rc"], x["rr"], x["labels"]
    f = pama_ext.multi_dpo_loss
    expect_error("policy_chosen_logps", f, pc[None], pr, rc, rr, lab)
    expect_error("policy_rejected_logps", f, pc, pr[:4], rc, rr, lab)
    expect_error("ref_chosen_logps", f, pc, pr, rc.float(), rr, lab)
    expect_error("ref_rejected_logps", f, pc, pr, rc, rr.long(), lab)
    expect_error("labels", f, pc, pr, rc, rr, lab[0])
    expect_error("labels", f, pc, pr, rc, rr, lab[:, :4])
    expect_error("labels", f, pc, pr, rc, rr, lab[:0])  # n = 0
    expect_error("labels", f, pc, pr, rc, rr, lab > 0)  # bool labels: False would read as a tie
    expect_error("chosen_lengths", f, pc, pr, rc, rr, lab, chosen_lengths=torch.ones(4, device=device))
    expect_error("rejected_lengths", f, pc, pr, rc, rr, lab, rejected_lengths=torch.ones(5, 1, device=device))
    expect_error("beta", f, pc, pr, rc, rr, lab, 0.0)


def test_gram_and_combine_bad_input(device):
    require_native()
    t = grad_table(2, shapes=[(3, 5), (7,)], seed=0, none=False, device=device)
    expect_error("grads", pama_ext.gradient_gram, [])  # n = 0
    expect_error("grads[1]", pama_ext.gradient_gram, [t[0], t[1][:1]])  # ragged table
    expect_error("grads[1][0]", pama_ext.gradient_gram, [t[0], [t[1][0].T, t[1][1]]])  # shape
    expect_error("grads[1][1]", pama_ext.gradient_gram, [t[0], [t[1][0], t[1][1].float()]])  # dtype
    expect_error("grads[0][1]", pama_ext.gradient_gram, [[t[0][0], t[0][1].long()], t[1]])  # integer
    expect_error("grads", pama_ext.gradient_gram, [t[0]] * 65)  # n > 64
    params = [torch.zeros(3, 5, dtype=F64, device=device), torch.zeros(7, dtype=F64, device=device)]
    c = torch.ones(2, dtype=F64, device=device)
    expect_error("coeffs", pama_ext.combine_gradients, t, torch.ones(3, device=device), params)
    expect_error("coeffs", pama_ext.combine_gradients, t, torch.ones(2, dtype=torch.long, device=device), params)
    expect_error("params", pama_ext.combine_gradients, t, c, params[:1])
    bad = [torch.zeros(5, 3, dtype=F64, device=device), params[1]]
    expect_error("params[0]", pama_ext.combine_gradients, t, c, bad)


# ----------------------------------------------------------------------------------------------
# no host synchronisation
# ----------------------------------------------------------------------------------------------
HOST_READS = re.compile(r"\.item\(|\.tolist\(|\.cpu\(|\.numpy\(|\.item<|\.to\(at::kCPU|\.to\(\"cpu\"|torch\.equal|is_nonzero")


@pytest.mark.parametrize("path", ["pama_ext/preference.py", "pama_ext/pareto.py", "csrc/preference_ops.cpp",
                                  "csrc/cuda/preference.cu"])
def test_sources_have_no_host_reads(path):
    # Python sources from the package that is imported (the installed wheel under verify_wheel.sh)
    pkg = os.path.dirname(os.path.abspath(pama_ext.__file__))
    full = os.path.join(pkg, path.split("/", 1)[1]) if path.startswith("pama_ext/") else os.path.join(ROOT, path)
    with open(full) as f:
        text = f.read()
    hits = [line.strip() for line in text.splitlines() if HOST_READS.search(line)]
    assert not hits, f"{path}: host reads in the op path: {hits}"


def test_no_host_sync_on_cuda():
    """Forward, backward, Gram, combine and solvers under torch.cuda.set_sync_debug_mode('error')."""
    from pama_testutils import resolve_device

    resolve_device("cuda")
    require_native()
    from pama_ext import pareto

    x = dpo_inputs(3, 33, seed=1, lengths=True, device="cuda")
    leaves = [x[k].float().requires_grad_(True) for k in ("pc", "pr", "rc", "rr")]
    t = grad_table(3, seed=1, dtype=torch.bfloat16, device="cuda")
    params = [torch.zeros(s, dtype=torch.bfloat16, device="cuda", requires_grad=True) for s in SHAPES]
    w = torch.tensor([0.2, 0.3, 0.5], device="cuda")
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses, coef = pama_ext.multi_dpo_loss(*leaves, x["labels"], 0.1, chosen_lengths=x["chosen_lengths"],
                                               rejected_lengths=x["rejected_lengths"])
        losses.sum().backward()
        G = pama_ext.gradient_gram(t)
        for a in (pareto.cagrad_weights(G, w), pareto.mgda_weights(G), pareto.pcgrad_weights(G),
                  pareto.cagrad_weights(G, w, clip=False)):
            pama_ext.combine_gradients(t, a, params, accumulate=True)
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    torch.cuda.synchronize()
