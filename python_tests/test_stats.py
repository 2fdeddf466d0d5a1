"""objective_moments / objective_stats / pareto_weights: the kernels against pama_ext.reference
(float64 and the low-precision tolerance rule, DESIGN.md "Tests"), the statistics layout, and the
reference (Theorem 1, the statistics) against the spec loops.

Opcheck and the bad-input cases shared by every op live in test_opcheck_compile.py and
test_bad_input.py (one parametrisation over all ops).
"""
from __future__ import annotations

import pytest
import torch

from pama_ext import ops, reference as ref
from op_runners import run_objective_stats
from pama_testutils import (COMBOS, ERRORS, LOWP_DTYPES, NS, SHAPES, assert_on_simplex, bad_input_batch,
                            check_dtypes, compare, compare_all, expect_error, make_inputs, make_prefs,
                            names_arg, simplex_grid, spec_stats, thm1_loop)

F64 = torch.float64


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


# More chunk partials than the moments' merge tree has lanes (pama_math.h kMergeLanes = 256): 300 rows
# of one chunk, and 70 rows of 5 chunks (T = 9000 > the CPU's 2048 and CUDA's 1024 tokens per chunk);
# lanes with one, two or no partials, empty rows among them.
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
@pytest.mark.parametrize("B,T", [(300, 7), (70, 9000)])
def test_objective_moments_many_partials(device, B, T, dtype):
    x = make_inputs(3, B, T, dtype=dtype, seed=B, mask="holes")
    x.mask[::7] = False
    got = ops.objective_moments(x.advantages.to(device), x.mask.to(device))
    want = ref.objective_moments(x.advantages.double(), x.mask)
    if dtype == F64:
        compare("moments", got, want)
    else:
        compare("moments", got, want, ref.objective_moments(x.advantages, x.mask), dtype)


@pytest.mark.parametrize("dtype", LOWP_DTYPES, ids=str)
@pytest.mark.parametrize("n", [2, 8])
def test_objective_stats_lowp(native, device, n, dtype):
    x = make_inputs(n, 5, 130, dtype=dtype, seed=8)
    got = run_objective_stats(ops, x.to(device=device))
    check_dtypes(got, dtype, device, acc_keys=["stats"])
    compare_all(got, run_objective_stats(ref, x.as64()), run_objective_stats(ref, x), dtype)


# n = 20 and 64: more partial entries than a CUDA block has threads (each thread keeps several, and
# the Gram pairs i <= j past the first 256 entries), and the exact solvers' active-set path (n > 8)
# with their working arrays in the op's scratch memory on CUDA.
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
@pytest.mark.parametrize("n", [20, 64])
def test_objective_stats_many_objectives(device, n, dtype):
    x = make_inputs(n, 3, 70, dtype=dtype, seed=n + 5, mask="holes")
    got = run_objective_stats(ops, x.to(device=device))
    check_dtypes(got, dtype, device, acc_keys=["stats"])
    if dtype == F64:
        compare_all(got, run_objective_stats(ref, x))
    else:
        compare_all(got, run_objective_stats(ref, x.as64()), run_objective_stats(ref, x), dtype)
    stats = got["stats"].double().cpu()
    for method in ("mgda", "cagrad", "raco"):
        w = ops.pareto_weights(got["stats"].double(), method, "batch")
        compare("weights", w, ref.pareto_weights(stats, method, "batch"))


@pytest.mark.parametrize("method,granularity,with_prefs",
                         [(m, g, False) for m, g in COMBOS] + [("linear", g, True) for g in ref.GRANULARITIES])
@pytest.mark.parametrize("noon", [True, False])
@pytest.mark.parametrize("n", NS)
def test_pareto_weights_f64(device, n, noon, method, granularity, with_prefs):
    x = make_inputs(n, 5, 41, seed=n + 17, mask="holes")
    stats = ref.objective_stats(x.advantages, x.logp, x.old_logp, x.mask, noon=noon)
    prefs = make_prefs(n) if with_prefs else None
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
# Theorem 1
# ----------------------------------------------------------------------------------------------
def _thm1_cases(n: int):
    g = torch.Generator().manual_seed(100 + n)
    cases = [torch.randn(n, generator=g, dtype=F64) for _ in range(40)]
    cases += [torch.rand(n, generator=g, dtype=F64) + 0.1 for _ in range(5)]  # all positive
    cases += [-torch.rand(n, generator=g, dtype=F64) - 0.1 for _ in range(5)]  # all negative
    cases += [torch.zeros(n, dtype=F64), torch.full((n,), 0.7, dtype=F64), torch.full((n,), -0.3, dtype=F64)]
    if n >= 2:
        v = torch.rand(n, generator=g, dtype=F64)
        v[0] = 0.0
        cases.append(v)  # min exactly 0 (the Noon situation)
        cases.append(torch.tensor([1e-300] + [1.0] * (n - 1), dtype=F64))
    return cases


@pytest.mark.parametrize("n", [2, 3])
def test_thm1_matches_simplex_brute_force(n):
    steps = 2000 if n == 2 else 300
    grid = simplex_grid(n, steps)
    for v in _thm1_cases(n):
        c, s = ref.thm1_weights(v)
        assert c.shape == (n,) and s.shape == ()
        assert_on_simplex(c)
        # s is the combination the weights actually produce
        assert abs((c * v).sum().item() - s.item()) <= 1e-12 * (1 + v.abs().max().item())
        # s* = projection of 0 onto [min v, max v]
        assert s.item() == pytest.approx(min(max(0.0, v.min().item()), v.max().item()), abs=1e-15)
        obj = s.item() ** 2
        brute = ((grid @ v) ** 2).min().item()
        # optimal: never worse than any grid point ...
        assert obj <= brute + 1e-12, (v, c, obj, brute)
        # ... and the grid gets within its resolution of it
        width = (v.max() - v.min()).item()
        assert brute - obj <= (n * width / steps) ** 2 + 1e-12, (v, obj, brute)


def test_thm1_ties_share_uniformly():
    # expected values from algorithms §4 ("ties -> uniform over the tied objectives")
    cases = [
        ([1.0, 1.0, 2.0], [0.5, 0.5, 0.0]),  # all positive, two minima
        ([0.0, 0.0, 3.0], [0.5, 0.5, 0.0]),  # Noon: min 0, tied zeros share
        ([-1.0, 2.0, 2.0], [2 / 3, 1 / 6, 1 / 6]),  # mixed, tied maxima share c_k
        ([-2.0, -2.0, -5.0], [0.5, 0.5, 0.0]),  # all negative, one-hot on (tied) argmax
        ([0.4, 0.4, 0.4, 0.4], [0.25] * 4),
        ([0.0, 0.0], [0.5, 0.5]),
        ([3.0, 1.0, 2.0, 5.0], [0.0, 1.0, 0.0, 0.0]),
        ([-3.0, -1.0, -2.0], [0.0, 1.0, 0.0]),
        ([-1.0, 0.5, 3.0], [0.75, 0.0, 0.25]),
    ]
    for v, want in cases:
        c, s = ref.thm1_weights(torch.tensor(v, dtype=F64))
        torch.testing.assert_close(c, torch.tensor(want, dtype=F64), rtol=0, atol=1e-15)
        assert s.item() == pytest.approx(min(max(0.0, min(v)), max(v)), abs=1e-15)


def test_thm1_n2_spec_formula():
    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        v = torch.randn(2, generator=g, dtype=F64) * torch.rand(1, generator=g, dtype=F64) * 4
        c, _ = ref.thm1_weights(v)
        i1, i2 = v.tolist()
        c1 = 0.5 if i1 == i2 else min(max(i2 / (i2 - i1), 0.0), 1.0)
        assert c[0].item() == pytest.approx(c1, abs=1e-14)
        assert c[1].item() == pytest.approx(1 - c1, abs=1e-14)


def test_thm1_vectorised_over_trailing_dims():
    g = torch.Generator().manual_seed(4)
    v = torch.randn(5, 3, 7, generator=g, dtype=F64).clamp(min=-0.2)
    v[:, 0, 0] = 0.0
    v[:2, 1, 1] = 0.5
    c, s = ref.thm1_weights(v)
    assert c.shape == v.shape and s.shape == (3, 7)
    for b in range(3):
        for t in range(7):
            cc, ss = ref.thm1_weights(v[:, b, t])
            assert torch.equal(c[:, b, t], cc)
            assert torch.equal(s[b, t], ss)


@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("noon", [True, False])
@pytest.mark.parametrize("mask_kind", ["random", "holes", "empty"])
def test_objective_stats_reference_matches_spec_loops(whiten, noon, mask_kind):
    n, B, T = 3, 4, 9
    x = make_inputs(n, B, T, seed=21, mask=mask_kind)
    st = ref.objective_stats(x.advantages, x.logp, x.old_logp, x.mask, eps_hi=0.1, whiten=whiten, noon=noon)
    assert st.shape == ((n + 3) ** 2 - 7,)
    lay = ref.stats_layout(n)
    want = spec_stats(x.advantages, x.logp, x.old_logp, x.mask, 0.1, whiten, noon)
    assert st[lay["count"]].item() == want["count"]
    nseq = sum(1 for b in range(B) if x.mask[b].any())
    assert st[lay["num_seqs"]].item() == nseq
    for key in ("mean", "var", "abar", "pos"):
        torch.testing.assert_close(st[lay[key]], torch.tensor(want[key], dtype=F64), rtol=1e-12, atol=1e-12)
    G = st[lay["gram"]].reshape(n, n)
    torch.testing.assert_close(G, torch.tensor(want["gram"], dtype=F64), rtol=1e-12, atol=1e-12)
    assert torch.equal(G, G.T)
    assert torch.linalg.eigvalsh(G).min() >= -1e-12
    # ctok: mean over masked tokens of the per-token Thm-1 weights of N
    ctok = [0.0] * n
    for b, t in want["toks"]:
        c, _ = thm1_loop([want["N"][i, b, t].item() for i in range(n)])
        ctok = [a + w for a, w in zip(ctok, c)]
    ctok = [a / max(want["count"], 1) for a in ctok]
    torch.testing.assert_close(st[lay["ctok"]], torch.tensor(ctok, dtype=F64), rtol=1e-12, atol=1e-12)
    # cseq: mean over non-empty rows of the Thm-1 weights of the per-row means of I
    cseq = [0.0] * n
    for b in range(B):
        ts = [t for t in range(T) if x.mask[b, t]]
        if not ts:
            continue
        c, _ = thm1_loop([sum(want["I"][i, b, t].item() for t in ts) / len(ts) for i in range(n)])
        cseq = [a + w for a, w in zip(cseq, c)]
    cseq = [a / max(nseq, 1) for a in cseq]
    torch.testing.assert_close(st[lay["cseq"]], torch.tensor(cseq, dtype=F64), rtol=1e-12, atol=1e-12)


def test_unbiased_variance_matches_torch_var():
    x = make_inputs(2, 6, 31, seed=5, mask="holes")
    st = ref.objective_stats(x.advantages, x.logp, x.old_logp, x.mask)
    lay = ref.stats_layout(2)
    for i in range(2):
        sel = x.advantages[i][x.mask]
        assert st[lay["mean"]][i].item() == pytest.approx(sel.mean().item(), rel=1e-12)
        assert st[lay["var"]][i].item() == pytest.approx(sel.var(unbiased=True).item(), rel=1e-12)


def test_stats_layout_size():
    for n in range(1, 65):
        lay = ref.stats_layout(n)
        size = lay["gram"].stop
        assert size == (n + 3) ** 2 - 7
        assert ref.stats_num_objectives(size) == n
    for bad in (0, 1, 8, 10, 17):
        with pytest.raises(ValueError, match="stats"):
            ref.stats_num_objectives(bad)


@pytest.mark.usefixtures("path")  # native and fallback (conftest.py)
def test_pareto_weights_bad_stats(device):
    x = bad_input_batch(device)
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
