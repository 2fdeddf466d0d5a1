"""Self-checks of pama_ext.reference against docs/algorithms.md, independent of the compiled kernels.

The reference is the ground truth of every other test, so here it is checked against brute force
(Theorem 1 and MGDA over a simplex grid) and against per-element Python loops written from the
docs/algorithms.md formulas (GAE, token rewards, statistics, aggregation, the policy loss).
"""
from __future__ import annotations

import math

import pytest
import torch

from pama_ext import reference as ref
from pama_testutils import make_inputs, make_mask

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# simplex grids
# ----------------------------------------------------------------------------------------------
def simplex_grid(n: int, steps: int) -> torch.Tensor:
    """All points of the simplex with coordinates in {0, 1/steps, ..., 1} ([P, n], float64)."""
    if n == 1:
        return torch.ones(1, 1, dtype=F64)
    if n == 2:
        a = torch.linspace(0, 1, steps + 1, dtype=F64)
        return torch.stack([a, 1 - a], 1)
    if n == 3:
        i, j = torch.meshgrid(torch.arange(steps + 1), torch.arange(steps + 1), indexing="ij")
        keep = (i + j) <= steps
        i, j = i[keep].to(F64), j[keep].to(F64)
        return torch.stack([i, j, steps - i - j], 1) / steps
    raise NotImplementedError


def assert_on_simplex(c: torch.Tensor, tol: float = 1e-12):
    assert (c >= -tol).all(), c
    assert abs(c.sum().item() - 1.0) <= tol * max(1, c.numel()), c


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


# ----------------------------------------------------------------------------------------------
# MGDA min-norm weights
# ----------------------------------------------------------------------------------------------
def _gram_cases(n: int):
    g = torch.Generator().manual_seed(200 + n)

    def rn(*s):
        return torch.randn(*s, generator=g, dtype=F64)

    out = []
    for k in (1, 2, n, 5):  # rank-1, rank-deficient, full-rank PSD
        for _ in range(4):
            X = rn(n, k)
            out.append((f"rank{min(k, n)}", X @ X.T))
    for scale in (1e-3, 1e-6):  # near-collinear gradients
        for _ in range(3):
            X = rn(1, 6) + scale * rn(n, 6)
            out.append((f"collinear{scale:g}", X @ X.T))
    for _ in range(3):  # conflicting (opposite) directions
        base = rn(1, 4)
        sign = torch.tensor([1.0, -0.5, 2.0][:n], dtype=F64).unsqueeze(1)
        X = sign * base + 0.1 * rn(n, 4)
        out.append(("conflicting", X @ X.T))
    out.append(("diagonal", torch.diag(torch.rand(n, generator=g, dtype=F64) + 0.1)))
    out.append(("zero", torch.zeros(n, n, dtype=F64)))
    X = rn(1, 3).expand(n, 3)
    out.append(("identical", X @ X.T))
    return out


@pytest.mark.parametrize("n", [2, 3])
def test_mgda_weights_near_grid_minimum(n):
    steps = 20000 if n == 2 else 300
    grid = simplex_grid(n, steps)
    for kind, G in _gram_cases(n):
        c = ref.mgda_weights(G)
        assert c.shape == (n,), kind
        assert_on_simplex(c, 1e-10)
        f = (c @ G @ c).item()
        fgrid = torch.einsum("pi,ij,pj->p", grid, G, grid).min().item()
        lam_max = torch.linalg.eigvalsh(G).max().clamp(min=0).item()
        # exact (face enumeration): at least as good as every grid point, up to rounding
        tol = 1e-12 * (1 + lam_max)
        assert f <= fgrid + tol, (kind, G, c, f, fgrid)
        # never worse than the uniform starting point (line search is monotone)
        u = torch.full((n,), 1.0 / n, dtype=F64)
        assert f <= (u @ G @ u).item() + 1e-12, (kind, f)


def test_mgda_weights_n2_closed_form_spec():
    # min_c c^T G c on the segment: c_1 = clip((G22 - G12) / (G11 + G22 - 2 G12), 0, 1)
    g = torch.Generator().manual_seed(9)
    for _ in range(100):
        X = torch.randn(2, 3, generator=g, dtype=F64)
        G = X @ X.T
        c = ref.mgda_weights(G)
        den = (G[0, 0] + G[1, 1] - 2 * G[0, 1]).item()
        c1 = min(max((G[1, 1] - G[0, 1]).item() / den, 0.0), 1.0)
        assert c[0].item() == pytest.approx(c1, abs=1e-12)
        assert c[1].item() == pytest.approx(1 - c1, abs=1e-12)
    # equal gradients: every c is optimal; the tie rule takes the first face, the vertex e_0
    G = torch.ones(2, 2, dtype=F64)
    assert ref.mgda_weights(G).tolist() == [1.0, 0.0]


def test_mgda_weights_n1_and_larger_n():
    assert ref.mgda_weights(torch.eye(1, dtype=F64) * 3).tolist() == [1.0]
    # orthogonal gradients of norms d_i: min-norm weights are proportional to 1/d_i^2
    d = torch.tensor([1.0, 2.0, 4.0, 0.5, 1.5], dtype=F64)
    c = ref.mgda_weights(torch.diag(d**2))
    want = (1 / d**2) / (1 / d**2).sum()
    f, fstar = (c @ torch.diag(d**2) @ c).item(), (want @ torch.diag(d**2) @ want).item()
    assert_on_simplex(c, 1e-10)
    lam_max = (d**2).max().item()
    # the optimum up to rounding (pairwise Frank-Wolfe converges linearly; it can land an ulp below fstar)
    assert fstar - 1e-12 * lam_max <= f <= fstar + 1e-9 * lam_max


# ----------------------------------------------------------------------------------------------
# GAE and token rewards against per-row Python loops of algorithms §1/§2
# ----------------------------------------------------------------------------------------------
def gae_loop(rewards, values, mask, gamma, lam):
    n, B, T = values.shape
    adv = torch.zeros(n, B, T, dtype=F64)
    r, v, m = rewards.tolist(), values.tolist(), (mask != 0).tolist()
    for i in range(n):
        for b in range(B):
            next_v, last_a = 0.0, 0.0
            for t in reversed(range(T)):
                delta = r[i][b][t] + gamma * next_v - v[i][b][t]
                a = delta + gamma * lam * last_a
                if m[b][t]:
                    next_v, last_a = v[i][b][t], a
                adv[i, b, t] = last_a
    return adv, adv + values


@pytest.mark.parametrize("mask_kind", ["random", "holes", "full", "empty"])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0), (1.0, 1.0)])
def test_gae_reference_matches_python_loop(mask_kind, gamma, lam):
    x = make_inputs(3, 4, 23, seed=11, mask=mask_kind)
    adv, ret = ref.multi_gae(x.rewards, x.values, x.mask, gamma=gamma, lam=lam)
    want_adv, want_ret = gae_loop(x.rewards, x.values, x.mask, gamma, lam)
    torch.testing.assert_close(adv, want_adv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, want_ret, rtol=1e-12, atol=1e-12)


def test_gae_reference_closed_form_full_mask():
    # gamma = lam = 1 and a full mask: A[t] = sum_{t' >= t} r[t'] - V[t]
    x = make_inputs(2, 3, 17, seed=12, mask="full")
    adv, ret = ref.multi_gae(x.rewards, x.values, x.mask, gamma=1.0, lam=1.0)
    want = x.rewards.flip(-1).cumsum(-1).flip(-1) - x.values
    torch.testing.assert_close(adv, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, want + x.values, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("mask_kind", ["random", "holes"])
def test_token_rewards_reference_matches_spec(mask_kind, beta):
    x = make_inputs(3, 5, 19, seed=13, mask=mask_kind)
    r = ref.token_rewards(x.scores, x.old_logp, x.ref_logp, x.mask, beta_kl=beta)
    assert r.shape == (3, 5, 19)
    m = x.mask.tolist()
    for b in range(5):
        valid = [t for t in range(19) if m[b][t]]
        last = valid[-1] if valid else None
        for t in valid:  # algorithms §1 on the masked-in positions
            want = -beta * (x.old_logp[b, t] - x.ref_logp[b, t]) + (x.scores[:, b] if t == last else 0.0)
            torch.testing.assert_close(r[:, b, t], want * torch.ones(3, dtype=F64), rtol=1e-13, atol=1e-13)
        # the score is placed nowhere else
        others = [t for t in range(19) if t != last]
        if others and beta == 0.0:
            assert (r[:, b, others] == 0).all()


# ----------------------------------------------------------------------------------------------
# statistics, aggregation and the policy loss against loops written from algorithms §3/§4
# ----------------------------------------------------------------------------------------------
def spec_stats(adv, logp, old_logp, mask, eps_hi, whiten, noon):
    """Per-token loops of algorithms §3 (n, B, T small). Returns dict of float lists/tensors."""
    n, B, T = adv.shape
    toks = [(b, t) for b in range(B) for t in range(T) if mask[b, t]]
    cnt = len(toks)
    mean, var = [], []
    for i in range(n):
        xs = [adv[i, b, t].item() for b, t in toks]
        mu = sum(xs) / cnt if cnt else 0.0
        v = sum((x - mu) ** 2 for x in xs) / (cnt - 1) if cnt > 1 else 0.0
        mean.append(mu)
        var.append(v)

    def N(i, b, t):
        a = adv[i, b, t].item()
        if whiten:
            a = (a - mean[i]) / math.sqrt(var[i] + 1e-8)
        return max(a, 0.0) if noon else a

    def ind(b, t):
        u = math.exp(min(max(logp[b, t].item() - old_logp[b, t].item(), -20), 20))
        return 1.0 if u <= 1 + eps_hi else 0.0

    Nv = torch.zeros(n, B, T, dtype=F64)
    I = torch.zeros(n, B, T, dtype=F64)
    for b in range(B):
        for t in range(T):
            for i in range(n):
                Nv[i, b, t] = N(i, b, t)
                I[i, b, t] = Nv[i, b, t] * ind(b, t)
    den = max(cnt, 1)
    abar = [sum(I[i, b, t].item() for b, t in toks) / den for i in range(n)]
    pos = [sum(1.0 for b, t in toks if Nv[i, b, t] > 0) / den for i in range(n)]
    gram = [[sum(I[i, b, t].item() * I[j, b, t].item() for b, t in toks) / den for j in range(n)] for i in range(n)]
    return dict(count=cnt, mean=mean, var=var, N=Nv, I=I, abar=abar, pos=pos, gram=gram, toks=toks)


def thm1_loop(v):
    """Theorem 1 written from algorithms §4 with ties shared uniformly: (c list, s)."""
    n = len(v)
    mn, mx = min(v), max(v)
    jmin = [i for i in range(n) if v[i] == mn]
    jmax = [i for i in range(n) if v[i] == mx]
    c = [0.0] * n
    if mn > 0:
        w_min, s = 1.0, mn
    elif mx < 0:
        w_min, s = 0.0, mx
    else:
        w_min, s = (mx / (mx - mn) if mx > mn else 0.0), 0.0
    for i in jmin:
        c[i] += w_min / len(jmin)
    for i in jmax:
        c[i] += (1 - w_min) / len(jmax)
    return c, s


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


def agg_loop(loss, mask, agg):
    B, T = mask.shape
    rows = [[loss[b, t].item() for t in range(T) if mask[b, t]] for b in range(B)]
    rows_ne = [r for r in rows if r]
    if agg == "token-mean":
        tot = sum(len(r) for r in rows)
        return sum(sum(r) for r in rows) / tot if tot else 0.0
    if not rows_ne:
        return 0.0
    if agg == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in rows_ne) / len(rows_ne)
    return sum(sum(r) for r in rows_ne) / len(rows_ne)


@pytest.mark.parametrize("agg", ref.AGG_MODES)
@pytest.mark.parametrize("mask_kind", ["random", "holes", "empty", "full"])
def test_agg_loss_reference(agg, mask_kind):
    g = torch.Generator().manual_seed(6)
    loss = torch.randn(5, 13, generator=g, dtype=F64)
    mask = make_mask(5, 13, g, mask_kind)
    got = ref.agg_loss(loss, mask, agg)
    assert got.item() == pytest.approx(agg_loop(loss, mask, agg), rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError, match="agg"):
        ref.agg_loss(loss, mask, "mean")


def spec_policy_loss(x, *, method, granularity, agg, noon, whiten, eps_lo=0.2, eps_hi=0.2,
                     dual_clip=3.0, prefs=None, beta_loss=0.0):
    """algorithms §3/§4 with per-token loops (mgda only for n <= 2). Returns (loss, grad_logp, metrics)."""
    n, B, T = x.advantages.shape
    st = spec_stats(x.advantages, x.logp, x.old_logp, x.mask, eps_hi, whiten, noon)
    N, I = st["N"], st["I"]
    at = torch.zeros(B, T, dtype=F64)
    if method == "pama" and granularity == "token":
        for b in range(B):
            for t in range(T):
                at[b, t] = thm1_loop([N[i, b, t].item() for i in range(n)])[1]
    elif method == "pama" and granularity == "sequence":
        for b in range(B):
            ts = [t for t in range(T) if x.mask[b, t]]
            c, _ = thm1_loop([sum(I[i, b, t].item() for t in ts) / max(len(ts), 1) for i in range(n)])
            for t in range(T):
                at[b, t] = sum(c[i] * N[i, b, t].item() for i in range(n))
    else:
        if method == "pama":
            c, _ = thm1_loop(st["abar"])
        elif method == "linear":
            c = [1.0 / n] * n if prefs is None else prefs.tolist()
        else:
            G = st["gram"]
            if n == 1:
                c = [1.0]
            else:
                den = G[0][0] + G[1][1] - 2 * G[0][1]
                c0 = min(max((G[1][1] - G[0][1]) / den, 0.0), 1.0) if den > 0 else 0.5
                c = [c0, 1 - c0]
        for b in range(B):
            for t in range(T):
                at[b, t] = sum(c[i] * N[i, b, t].item() for i in range(n))
    logp = x.logp.clone().requires_grad_(True)
    u = torch.exp((logp - x.old_logp).clamp(-20, 20))
    l1 = -at * u
    l2 = -at * u.clamp(1 - eps_lo, 1 + eps_hi)
    l = torch.maximum(l1, l2)
    l = torch.where(at < 0, torch.minimum(l, -at * dual_clip), l)
    pg = torch.zeros((), dtype=F64)
    kl = torch.zeros((), dtype=F64)
    rows = [[t for t in range(T) if x.mask[b, t]] for b in range(B)]
    nonempty = [b for b in range(B) if rows[b]]
    cnt = sum(len(r) for r in rows)
    k3 = torch.exp(x.ref_logp - logp) - (x.ref_logp - logp) - 1

    def agg_(mat):
        if agg == "token-mean":
            return sum(mat[b, t] for b in range(B) for t in rows[b]) / max(cnt, 1) if cnt else mat.sum() * 0
        if not nonempty:
            return mat.sum() * 0
        if agg == "seq-mean-token-mean":
            return sum(sum(mat[b, t] for t in rows[b]) / len(rows[b]) for b in nonempty) / len(nonempty)
        return sum(sum(mat[b, t] for t in rows[b]) for b in nonempty) / len(nonempty)

    pg = agg_(l)
    if beta_loss:
        kl = agg_(k3)
    loss = pg + beta_loss * kl
    (grad,) = torch.autograd.grad(loss, logp, allow_unused=True)
    metrics = {"pg_loss": float(pg.detach()), "kl_loss": float(kl.detach()),
               "active": sum(1.0 for b, t in st["toks"] if at[b, t] > 0) / max(cnt, 1),
               "abar": st["abar"], "pos": st["pos"]}
    return loss.detach(), grad, metrics


@pytest.mark.parametrize(
    "method,granularity",
    [("pama", "token"), ("pama", "sequence"), ("pama", "batch"), ("linear", "batch"), ("mgda", "batch")],
)
@pytest.mark.parametrize("agg", ref.AGG_MODES)
@pytest.mark.parametrize("noon,whiten", [(True, True), (False, True), (True, False), (False, False)])
def test_policy_loss_reference_matches_spec_loops(method, granularity, agg, noon, whiten):
    n = 2
    x = make_inputs(n, 4, 8, seed=31, mask="holes")
    x.logp = x.old_logp + 0.4 * torch.randn(4, 8, generator=torch.Generator().manual_seed(2), dtype=F64)
    prefs = torch.tensor([0.3, 0.7], dtype=F64) if method == "linear" else None
    beta = 0.1 if agg == "token-mean" else 0.0
    logp = x.logp.clone().requires_grad_(True)
    loss, m = ref.pama_policy_loss(
        logp, x.old_logp, x.advantages, x.mask, x.ref_logp, noon=noon, whiten=whiten, method=method,
        granularity=granularity, prefs=prefs, agg=agg, beta_loss=beta,
    )
    loss.backward()
    want_loss, want_grad, want_m = spec_policy_loss(
        x, method=method, granularity=granularity, agg=agg, noon=noon, whiten=whiten, prefs=prefs, beta_loss=beta,
    )
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(logp.grad, want_grad, rtol=1e-10, atol=1e-12)
    for k in ("pg_loss", "kl_loss", "active"):
        assert m[k].item() == pytest.approx(want_m[k], rel=1e-10, abs=1e-12), k
    for k in ("abar", "pos"):
        torch.testing.assert_close(m[k], torch.tensor(want_m[k], dtype=F64), rtol=1e-10, atol=1e-12)


def test_value_loss_reference_matches_spec():
    x = make_inputs(3, 4, 11, seed=41, mask="holes")
    loss, m = ref.multi_value_loss(x.values, x.old_values, x.returns, x.mask, clip=0.2)
    tot, heads, clipped, cnt = 0.0, [], 0, 0
    for i in range(3):
        s, c = 0.0, 0
        for b in range(4):
            for t in range(11):
                if not x.mask[b, t]:
                    continue
                v, ov, r = x.values[i, b, t].item(), x.old_values[i, b, t].item(), x.returns[i, b, t].item()
                vc = ov + min(max(v - ov, -0.2), 0.2)
                l1, l2 = (v - r) ** 2, (vc - r) ** 2
                s += max(l1, l2)
                c += 1
                clipped += l2 > l1
                cnt += 1
        heads.append(0.5 * s / c)
    assert loss.item() == pytest.approx(sum(heads), rel=1e-12)
    torch.testing.assert_close(m["head_loss"], torch.tensor(heads, dtype=F64), rtol=1e-12, atol=0)
    assert m["clipfrac"].item() == pytest.approx(clipped / cnt, rel=1e-12)
