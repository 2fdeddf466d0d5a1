"""Weighting methods on a Gram matrix (pama_ext.pareto, algorithms §4/§6): MGDA, CAGrad / RACO's
CAGrad-clip, PCGrad, linear.

Gram matrices are built from explicit gradients g [n, d] (G = g g^T), including singular, rank-1,
near-collinear and zero-gradient cases. Checks: the exact solvers against independent ones (SciPy's
Lawson-Hanson NNLS for the min-norm point, and a root search over CAGrad's multiplier on top of it)
on random, ill-conditioned, rank-deficient, Pareto-stationary and anti-parallel gradients, n up to
16, with the documented accuracy (objective within GRAM_ACCURACY of max_i G_ii); optimality
certificates (Frank-Wolfe gaps); kernels against the reference twins; MGDA and CAGrad against a
brute-force search over the simplex; CAGrad through its duality (the primal value at the solver's p
and the dual value min_i <g_i, d> must agree); CAGrad's conflict-averse guarantee; PCGrad against the
vector-form algorithm.
"""
from __future__ import annotations

import math

import pytest
import torch

from pama_ext import ops, pareto, reference
from pama_ext import reference as ref
from pama_testutils import NS, assert_on_simplex, require_native, simplex_grid

F64 = torch.float64
KINDS = ["random", "singular", "rank1", "collinear", "conflict", "zero_row"]
#: The accuracy the solvers guarantee (README, docs/algorithms.md): objective within this fraction
#: of max_i G_ii of the optimum.
GRAM_ACCURACY = 1e-10


def make_g(kind: str, n: int, seed: int, d: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    if kind == "random":
        return randn(n, d)
    if kind == "singular":  # rank n - 1 (rank 1 for n = 2)
        base = randn(max(n - 1, 1), d)
        mix = randn(n, max(n - 1, 1))
        return mix @ base
    if kind == "rank1":  # parallel gradients of mixed signs
        return randn(n, 1) * randn(1, d)
    if kind == "collinear":
        return randn(1, d) + 1e-4 * randn(n, d)
    if kind == "conflict":  # pairs pointing against each other
        u = randn(1, d)
        sign = torch.tensor([(-1.0) ** i for i in range(n)], dtype=F64)[:, None]
        return sign * u + 0.5 * randn(n, d)
    if kind == "zero_row":
        x = randn(n, d)
        x[0] = 0
        return x
    raise ValueError(kind)


def simplex_w(n: int, seed: int) -> torch.Tensor:
    w = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.05
    return w / w.sum()


def simplex_points(n: int, seed: int = 0) -> torch.Tensor:
    """A dense grid of the simplex for n = 2, 3; random points (Dirichlet, vertices, edge midpoints)
    otherwise."""
    if n == 1:
        return torch.ones(1, 1, dtype=F64)
    if n == 2:
        lam = torch.linspace(0, 1, 200001, dtype=F64)
        return torch.stack([lam, 1 - lam], 1)
    if n == 3:
        m = 600
        i, j = torch.meshgrid(torch.arange(m + 1), torch.arange(m + 1), indexing="ij")
        keep = i + j <= m
        i, j = i[keep].to(F64) / m, j[keep].to(F64) / m
        return torch.stack([i, j, 1 - i - j], 1)
    g = torch.Generator().manual_seed(seed)
    pts = [torch.distributions.Dirichlet(torch.full((n,), a, dtype=F64)).sample((40000,)) for a in (0.3, 1.0)]
    eye = torch.eye(n, dtype=F64)
    mids = (eye[:, None, :] + eye[None, :, :]).reshape(-1, n) / 2
    del g
    return torch.cat(pts + [eye, mids])


def grid_radius(n: int) -> float:
    """Largest distance from a simplex point to the grid of simplex_points (n = 2, 3)."""
    return {1: 0.0, 2: math.sqrt(2) / 200000, 3: math.sqrt(2) / 600}[n]


def refine(f, P: torch.Tensor, rounds: int = 60, keep: int = 16, seed: int = 0) -> torch.Tensor:
    """Local refinement of the best points of P by random simplex moves with a shrinking step."""
    g = torch.Generator().manual_seed(seed)
    vals = f(P)
    best = P[vals.argsort()[:keep]]
    step = 0.05
    for _ in range(rounds):
        cand = best.repeat(32, 1) + step * torch.randn(best.shape[0] * 32, best.shape[1], generator=g, dtype=F64)
        cand = cand.clamp(min=0)
        cand = cand / cand.sum(1, keepdim=True)
        allp = torch.cat([best, cand])
        best = allp[f(allp).argsort()[:keep]]
        step *= 0.85
    return best


def brute_min(f, n: int, seed: int = 0) -> float:
    P = simplex_points(n, seed)
    if n > 3:
        P = torch.cat([P, refine(f, P, seed=seed)])
    return f(P).min().item()


# ----------------------------------------------------------------------------------------------
# kernels vs reference twins
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", NS + [5])
def test_solvers_match_reference(device, n, kind):
    require_native()
    g = make_g(kind, n, seed=n)
    G = (g @ g.T).to(device)
    w = simplex_w(n, n).to(device)
    for clip in (True, False):
        for ww in (w, None):
            got = pareto.cagrad_weights(G, ww, c=0.5, clip=clip).cpu()
            want = reference.cagrad_weights(G.cpu(), None if ww is None else ww.cpu(), 0.5, clip)
            if kind == "zero_row":
                # g_0 = 0: the optimal direction is not unique (and a_0 multiplies a zero gradient),
                # so compare the value reached, min_i <g_i, d> = F*, not the coefficients
                torch.testing.assert_close((G.cpu() @ got).min(), (G.cpu() @ want).min(), rtol=1e-9,
                                           atol=1e-9 * G.abs().max().item())
            else:
                # both exact (the same faces, the same tie rule); they differ by the rounding of two
                # linear solvers, amplified by the conditioning of the face (collinear: ~1e8)
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9, msg=f"cagrad clip={clip}")
    got, want = pareto.mgda_weights(G).cpu(), reference.mgda_weights(G.cpu())
    Gc = G.cpu()
    assert abs((got @ Gc @ got).item() - (want @ Gc @ want).item()) <= GRAM_ACCURACY * Gc.diagonal().max().item()
    if kind == "random":  # a unique minimiser
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(pareto.pcgrad_weights(G).cpu(), reference.pcgrad_weights(G.cpu()), rtol=1e-9,
                               atol=1e-12)
    torch.testing.assert_close(pareto.linear_weights(G, w).cpu(), w.cpu())
    torch.testing.assert_close(pareto.linear_weights(G).cpu(), torch.full((n,), 1.0 / n, dtype=F64))


@pytest.mark.parametrize("n", [2, 3, 8])
def test_float32_gram(device, n):
    """float32 in, float32 out; MGDA and CAGrad are solved in float64 inside, PCGrad in float32."""
    require_native()
    g = make_g("random", n, seed=3 + n)
    G32 = (g @ g.T).float().to(device)
    w = simplex_w(n, 1).float().to(device)
    a = pareto.cagrad_weights(G32, w)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a.cpu(), reference.cagrad_weights(G32.cpu().double(), w.cpu().double()).float(),
                               rtol=1e-6, atol=1e-7)
    for fn in (pareto.mgda_weights, pareto.pcgrad_weights):
        out = fn(G32)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.cpu(), getattr(reference, fn.__name__)(G32.cpu()), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# MGDA: one solver, brute force
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("n", NS)
def test_mgda_is_the_policy_loss_solver(device, n, dtype):
    """pareto.mgda_weights(G) and pareto_weights(stats, 'mgda') run the same solver."""
    require_native()
    g = make_g("conflict", n, seed=11)
    G = (g @ g.T).to(dtype).to(device)
    stats = torch.zeros((n + 3) ** 2 - 7, dtype=dtype, device=device)
    stats[reference.stats_layout(n)["gram"]] = G.reshape(-1)
    assert torch.equal(pareto.mgda_weights(G), ops.pareto_weights(stats, "mgda", "batch"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_mgda_brute_force(device, n, kind):
    """c^T G c at the solver is never above the best point a brute-force search finds (within
    GRAM_ACCURACY of max G_ii)."""
    require_native()
    g = make_g(kind, n, seed=21 + n)
    G = g @ g.T
    c = pareto.mgda_weights(G.to(device)).cpu()
    assert (c >= 0).all() and abs(c.sum().item() - 1) < 1e-12
    val = (c @ G @ c).item()
    best = brute_min(lambda P: ((P @ G) * P).sum(1), n)
    scale = torch.diagonal(G).max().item()
    assert val <= best + GRAM_ACCURACY * scale, (val, best)


# ----------------------------------------------------------------------------------------------
# CAGrad: duality, brute force, clip, guarantee
# ----------------------------------------------------------------------------------------------
def cagrad_parts(G: torch.Tensor, w: torch.Tensor, c: float):
    b = G @ w
    s = c * torch.sqrt(torch.clamp(w @ b, min=0))
    return b, s


def cagrad_objective(G, b, s):
    return lambda P: P @ b + s * torch.sqrt(torch.clamp(((P @ G) * P).sum(1), min=0))


@pytest.mark.parametrize("c", [0.2, 0.4, 0.9])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_cagrad_optimal(device, n, kind, c):
    """p* recovered from the unclipped coefficients (a - w is proportional to p*) is optimal.

    Weak duality: for every d in the ball |d - g0| <= s, min_i <g_i, d> <= F* = min_p F(p), with
    F(p) = p^T b + s |g_p|. The solver's direction d = sum_i a_i g_i is in the ball, so
    min_i (G a)_i <= F* <= F(p_solver): the gap certifies optimality. A brute-force search never
    finds a better point than p_solver (up to the same tolerance).
    """
    require_native()
    g = make_g(kind, n, seed=31 + n)
    G = g @ g.T
    w = simplex_w(n, 5)
    b, s = cagrad_parts(G, w, c)
    F = cagrad_objective(G, b, s)
    a = pareto.cagrad_weights(G.to(device), w.to(device), c=c, clip=False).cpu()
    dual = (G @ a).min().item()
    scale = torch.diagonal(G).max().item()
    tol = GRAM_ACCURACY * scale
    best = brute_min(F, n, seed=n)
    diff = a - w
    if diff.abs().max().item() == 0:
        # a = w: the optimum has g_p* = 0 (a Pareto-stationary point), so F* = 0 (or s = 0)
        assert s.item() == 0 or abs(best) <= tol + 1e-3 * scale, (best, s)
        return
    p = diff / diff.sum()
    primal = F(p[None])[0].item()
    assert (p >= -1e-12).all()
    assert dual <= primal + tol, "weak duality violated: d is not in the ball"
    assert primal - dual <= tol, f"duality gap {primal - dual:.3e}: p is not optimal"
    assert best >= primal - tol, f"brute force found {best} < solver's {primal}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [2, 3, 8])
def test_cagrad_clip_formula(device, n, kind):
    """clip=True uses the same p* as clip=False, then a = w + s/|g_p~| p~ with p~ = min(p*, w)."""
    require_native()
    g = make_g(kind, n, seed=41 + n)
    G = g @ g.T
    w = simplex_w(n, 7)
    c = 0.4
    b, s = cagrad_parts(G, w, c)
    a_plain = pareto.cagrad_weights(G.to(device), w.to(device), c=c, clip=False).cpu()
    a_clip = pareto.cagrad_weights(G.to(device), w.to(device), c=c, clip=True).cpu()
    diff = a_plain - w
    if diff.abs().max().item() == 0:
        torch.testing.assert_close(a_clip, w)
        return
    p = diff / diff.sum()
    pt = torch.minimum(p, w)
    nrm = torch.sqrt(pt @ G @ pt)
    want = w + (s / nrm) * pt if nrm > 0 else w
    torch.testing.assert_close(a_clip, want, rtol=1e-6, atol=1e-9)


def test_cagrad_n2_closed_form_matches_grid(device):
    """n = 2: the solver's value equals the dense-grid minimum within the grid's Lipschitz error."""
    require_native()
    for seed in range(20):
        for kind in KINDS:
            g = make_g(kind, 2, seed=seed)
            G = g @ g.T
            w = simplex_w(2, seed)
            b, s = cagrad_parts(G, w, 0.4)
            F = cagrad_objective(G, b, s)
            a = pareto.cagrad_weights(G.to(device), w.to(device), clip=False).cpu()
            diff = a - w
            P = simplex_points(2)
            best = F(P).min().item()
            lip = (b.norm() + s * torch.linalg.matrix_norm(g, 2)).item()
            err = lip * grid_radius(2)
            if diff.abs().max().item() == 0:
                assert abs(best) <= err + 1e-12
                continue
            val = F((diff / diff.sum())[None])[0].item()
            assert best - err - 1e-12 <= val <= best + 1e-12, (seed, kind, val, best, err)


def certify_nonnegative(g: torch.Tensor, w: torch.Tensor, c: float, seed: int, strict: bool = False) -> bool:
    """Solver-independent certificate of F* >= 0, or F* > 0 when strict (CAGrad's condition: every
    convex combination g_p makes an angle with g0 whose cosine is >= -c, resp. > -c).

    n <= 3: dense grid minimum minus its Lipschitz error bound >= 0 (> 0). Any n: some d' in the ball
    |d' - g0| <= c |g0| with min_i <g_i, d'> >= 0 (> 0) (weak duality), trying g0 and random points.
    """
    n = g.shape[0]
    G = g @ g.T
    b, s = cagrad_parts(G, w, c)
    if n <= 3:
        best = cagrad_objective(G, b, s)(simplex_points(n)).min().item()
        lip = (b.norm() + s * torch.linalg.matrix_norm(g, 2)).item()
        if best - lip * grid_radius(n) > 0:
            return True
    g0 = w @ g
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(2000, g.shape[1], generator=gen, dtype=F64)
    u = u / u.norm(dim=1, keepdim=True) * torch.rand(2000, 1, generator=gen, dtype=F64)
    cands = torch.cat([g0[None], g0[None] + s * u])
    low = (cands @ g.T).min(1).values
    return bool((low > 0).any() if strict else (low >= 0).any())


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_cagrad_conflict_averse_guarantee(device, n):
    """CAGrad (clip=False), c < 1: whenever F* > 0 (certified independently of the solver; then the
    minimiser has g_p* != 0, since g_p = 0 gives F(p) = 0, and algorithms §6's d = g0 + s g_p*/|g_p*| is
    CAGrad's max-min direction), the update d = sum_i a_i g_i satisfies <d, g_i> >= F* > 0 for every
    objective. For both clip settings, <d, g0> >= (1 - c)|g0|^2 (d stays in the ball around g0).
    F* = 0 with g_p* = 0 is the degenerate case of test_cagrad_stationary_fallback_can_conflict."""
    require_native()
    certified = 0
    for seed in range(60):
        kind = KINDS[seed % len(KINDS)]
        g = make_g(kind, n, seed=100 + seed)
        w = simplex_w(n, seed)
        c = [0.2, 0.5, 0.8, 0.95][seed % 4]
        G = g @ g.T
        g0 = w @ g
        scale = torch.diagonal(G).max().item()
        for clip in (False, True):
            a = pareto.cagrad_weights(G.to(device), w.to(device), c=c, clip=clip).cpu()
            d = a @ g
            assert (d @ g0).item() >= (1 - c) * (g0 @ g0).item() - 1e-9 * scale
        a = pareto.cagrad_weights(G.to(device), w.to(device), c=c, clip=False).cpu()
        if certify_nonnegative(g, w, c, seed, strict=True):
            certified += 1
            assert (g @ (a @ g)).min().item() >= -1e-9 * scale, (seed, kind, c)
    assert certified >= 10, "too few certified cases: the test would not test anything"


def test_raco_clip_does_not_keep_the_guarantee(device):
    """algorithms §6's clip (p~ = min(p*, w)) can make d conflict with an objective where plain CAGrad
    does not (documented in the preference-ops report): a fixed counterexample."""
    require_native()
    g = torch.tensor([[0.6142703209420908, -0.10592365023833446, -0.6801430519747544, -1.3718088499542105,
                       -0.47411732265847173],
                      [0.716782759925882, -1.4410981863882273, 0.17563216543342042, 0.7393460037737476,
                       -1.2601534669765397],
                      [0.7729620829237464, 1.467785475952778, -0.4103357102092524, -1.0365870011557017,
                       2.0445242458669934]], dtype=F64)
    w = torch.tensor([0.33305962776826015, 0.3282735213682237, 0.33866685086351606], dtype=F64)
    c = 0.8016538351774215
    assert certify_nonnegative(g, w, c, 0, strict=True)
    G = (g @ g.T).to(device)
    plain = pareto.cagrad_weights(G, w.to(device), c=c, clip=False).cpu()
    clipped = pareto.cagrad_weights(G, w.to(device), c=c, clip=True).cpu()
    assert (g @ (plain @ g)).min().item() >= 0
    assert (g @ (clipped @ g)).min().item() < -0.1


def test_raco_keeps_the_guarantee_for_two_objectives(device):
    """n = 2: RACO's direction does keep CAGrad's guarantee (the counterexample above needs n = 3).

    With p* != w one coordinate is clipped, say p~ = (w_1, p*_2) with p*_2 < w_2; then g~ = sum_i
    p~_i g_i points between g0 and g_p* inside the cone of g_1, g_2 (its weight ratio w_1 : p*_2
    lies between w_1 : w_2 and p*_1 : p*_2), and a linear function <g_i, .> on such an arc of unit
    vectors is smallest at an endpoint (the arc, inside the cone, cannot contain -g_i/|g_i|). So

        <g_i, d_raco> = <g_i, g0> + s <g_i, u~>  >=  min(<g_i, g0> (1 + s/|g0|), <g_i, d_cagrad>):

    d_raco conflicts with no objective whenever g0 and CAGrad's direction conflict with none, in
    particular whenever g0 does (CAGrad's guarantee: min_i <g_i, d_cagrad> >= min_i <g_i, g0>)."""
    require_native()
    gen = torch.Generator().manual_seed(5)
    covered = 0
    for t in range(400):
        kind = KINDS[t % len(KINDS)]
        g = make_g(kind, 2, seed=300 + t) * (1 + 9 * torch.rand(2, 1, generator=gen, dtype=F64))
        if t % 2:  # a strong conflict
            g[1] = -g[0] * 3 * torch.rand(1, generator=gen, dtype=F64) + 0.3 * g[1]
        w = simplex_w(2, t)
        c = 0.99 * torch.rand(1, generator=gen, dtype=F64).item()
        G = g @ g.T
        g0 = w @ g
        s = c * g0.norm()
        d_raco = pareto.cagrad_weights(G.to(device), w.to(device), c=c, clip=True).cpu() @ g
        d_cagrad = pareto.cagrad_weights(G.to(device), w.to(device), c=c, clip=False).cpu() @ g
        scale = (g.norm(dim=1).max() * g0.norm()).item() + 1e-300
        lower = torch.minimum((g @ g0) * (1 + s / g0.norm().clamp(min=1e-300)), g @ d_cagrad)
        assert ((g @ d_raco) >= lower - 1e-9 * scale).all(), (t, kind, c)
        if (g @ g0).min() >= 0:
            covered += 1
            assert (g @ d_raco).min() >= -1e-9 * scale, (t, kind, c)
    assert covered >= 50


def test_cagrad_stationary_fallback_can_conflict(device):
    """algorithms §6's fallback a = w when |g_p~| = 0 (the minimiser is a Pareto-stationary point, F* = 0):
    d = g0 can conflict with an objective although a non-conflicting d in the ball exists
    (documented in the preference-ops report): a fixed counterexample, implemented as docs/algorithms.md §6 says."""
    require_native()
    g = torch.tensor([[0.0, 0.0], [-1.0, -3.0], [-2.0, 3.0]], dtype=F64)
    w = torch.tensor([0.2, 0.2, 0.6], dtype=F64)
    c = 0.8
    assert certify_nonnegative(g, w, c, 0)
    a = pareto.cagrad_weights((g @ g.T).to(device), w.to(device), c=c, clip=False).cpu()
    assert torch.equal(a, w)
    assert (g @ (a @ g)).min().item() < -1


# ----------------------------------------------------------------------------------------------
# exactness: independent solvers (SciPy), certificates, the documented accuracy
# ----------------------------------------------------------------------------------------------
EXACT_KINDS = ["random", "illcond", "rankdef", "stationary", "antiparallel", "stationary_illcond"]


def make_case(kind: str, n: int, seed: int) -> torch.Tensor:
    """Gradients g [n, d] of one test class, scaled so that max_i |g_i| = 1."""
    gen = torch.Generator().manual_seed(1000 * n + seed)
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    d = n + 2
    if kind == "random":
        g = randn(n, d)
    elif kind in ("illcond", "stationary_illcond"):  # gradient norms spread over 10^±3 (ratios to 1e6)
        g = randn(n, d) * 10.0 ** (6 * torch.rand(n, 1, generator=gen, dtype=F64) - 3)
    elif kind == "rankdef":  # rank max(1, n // 2) < n
        r = max(1, n // 2)
        g = randn(n, r) @ randn(r, d)
    elif kind == "antiparallel":  # g_1 = -alpha g_0 (n = 2: exactly anti-parallel)
        g = randn(n, d)
        g[1] = -(0.5 + torch.rand(1, generator=gen, dtype=F64)) * g[0]
    else:
        g = randn(n, d)
    if kind.startswith("stationary"):  # sum_i lam_i g_i = 0 for some lam in the simplex
        lam = torch.rand(n, generator=gen, dtype=F64) + 0.1
        g[-1] = -(lam[:-1] @ g[:-1]) / lam[-1]
    return g / g.norm(dim=1).max()


def nnls_min_norm(g: torch.Tensor):
    """Independent min-norm point of the convex hull of the rows of g, by least-distance programming
    through SciPy's NNLS (Lawson-Hanson): min |x| s.t. g_i.x >= 1 is solved by u = NNLS([g^T; 1^T],
    [0; 1]) (x = -r[:d] / r[d] with the residual r), and x is parallel to the min-norm point, which is
    therefore sum_i c_i g_i with c = u / sum(u) (where 0 is in the hull, NNLS solves sum u_i g_i = 0,
    sum u_i = 1 exactly). Returns (c, point)."""
    nnls = pytest.importorskip("scipy.optimize").nnls
    import numpy as np

    gn = g.numpy()
    n, d = gn.shape
    E = np.vstack([gn.T, np.ones((1, n))])
    f = np.zeros(d + 1)
    f[-1] = 1.0
    u, _ = nnls(E, f, maxiter=50 * n)
    c = torch.from_numpy(u / u.sum())
    return c, c @ g


def cagrad_independent(g: torch.Tensor, w: torch.Tensor, c: float) -> torch.Tensor:
    """Independent CAGrad dual minimiser p* of F(p) = p.b + s |g_p| (b = G w, s = c |g0|): for a
    multiplier k > 0, argmin_p p.b + k/2 |g_p|^2 is the min-norm point of the hull of g_i + g0 / k
    (NNLS above); F's optimality condition is k |g_p(k)| = s, found by Brent's method on log k.
    Where k |g_p(k)| stays below s (the optimum is a Pareto-stationary point, g_p* = 0), the
    min-norm weights themselves."""
    brentq = pytest.importorskip("scipy.optimize").brentq
    g0 = w @ g
    s = c * g0.norm().item()

    def p_of(logk):
        return nnls_min_norm(g + g0 / math.exp(logk))[0]

    def phi(logk):
        return math.exp(logk) * (p_of(logk) @ g).norm().item() - s

    lo, hi = -25.0, 30.0
    if s == 0 or phi(hi) < 0:
        return nnls_min_norm(g)[0]
    if phi(lo) > 0:
        return p_of(lo)
    return p_of(brentq(phi, lo, hi, xtol=1e-13, rtol=1e-15, maxiter=400))


def cagrad_F(g: torch.Tensor, w: torch.Tensor, c: float, p: torch.Tensor) -> float:
    g0 = w @ g
    return (p @ g @ g0 + c * g0.norm() * (p @ g).norm()).item()


def cagrad_p(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """p* from CAGrad's unclipped coefficients: a - w is proportional to p*; None when a = w."""
    diff = a - w
    return None if diff.abs().max().item() == 0 else diff / diff.sum()


@pytest.mark.parametrize("kind", EXACT_KINDS)
@pytest.mark.parametrize("n", [2, 3, 4, 8, 16])
def test_mgda_matches_independent_solver(device, n, kind):
    """MGDA: the objective c^T G c equals the NNLS solver's within GRAM_ACCURACY of max_i G_ii and
    the direction sum_i c_i g_i equals its min-norm point (|x - x*|^2 <= objective gap); the
    Frank-Wolfe gap (c^T G c - min_i (G c)_i, an upper bound of the distance to the optimum, no
    solver needed) is within the accuracy too."""
    require_native()
    for seed in range(4):
        g = make_case(kind, n, seed)
        G = g @ g.T
        c = pareto.mgda_weights(G.to(device)).cpu()
        assert (c >= 0).all() and abs(c.sum().item() - 1) < 1e-12
        _, x_star = nnls_min_norm(g)
        val, best = (c @ G @ c).item(), (x_star @ x_star).item()
        assert abs(val - best) <= GRAM_ACCURACY, (seed, val, best)
        assert ((c @ g - x_star).norm() ** 2).item() <= 2 * GRAM_ACCURACY, seed
        assert val - (G @ c).min().item() <= GRAM_ACCURACY, f"Frank-Wolfe gap at seed {seed}"


@pytest.mark.parametrize("c", [0.4, 0.8, 2.0])
@pytest.mark.parametrize("kind", EXACT_KINDS)
@pytest.mark.parametrize("n", [2, 3, 4, 8, 16])
def test_cagrad_matches_independent_solver(device, n, kind, c):
    """CAGrad / RACO: F at the solver's p* equals F at the independent p* within GRAM_ACCURACY, and
    the unclipped update direction d = sum_i a_i g_i = g0 + s g_p*/|g_p*| (unique even where p* is
    not) matches; with clip, where p* is unique (full-rank random / ill-conditioned gradients), the
    coefficients a match too."""
    require_native()
    for seed in range(2):
        g = make_case(kind, n, seed)
        G = g @ g.T
        w = simplex_w(n, seed)
        a = pareto.cagrad_weights(G.to(device), w.to(device), c=c, clip=False).cpu()
        p_ind = cagrad_independent(g, w, c)
        f_ind = cagrad_F(g, w, c, p_ind)
        p = cagrad_p(a, w)
        f = 0.0 if p is None else cagrad_F(g, w, c, p)  # a = w only at g_p* = 0, where F = 0
        assert abs(f - f_ind) <= GRAM_ACCURACY, (seed, f, f_ind)
        g0 = w @ g
        s = c * g0.norm()
        x_ind = p_ind @ g
        nx = x_ind.norm()
        kink = not nx ** 2 > 64 * torch.finfo(F64).eps * (p_ind @ G.abs() @ p_ind)  # 0 up to rounding
        d_ind = g0 if kink else g0 + s * x_ind / nx
        torch.testing.assert_close(a @ g, d_ind, rtol=0, atol=1e-5, msg=f"direction, seed {seed}")
        if kind in ("random", "illcond") and not kink:
            pt = torch.minimum(p_ind, w)
            want = w + s / (pt @ g).norm() * pt
            got = pareto.cagrad_weights(G.to(device), w.to(device), c=c, clip=True).cpu()
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8, msg=f"clip, seed {seed}")


def test_mgda_ill_conditioned_example(device):
    """Gradient norms 10, 0.01 and sqrt(2): the min-norm point is c ~ (1e-6, 1 - 1e-6, 0) with
    |d|^2 ~ 1e-4 (a pairwise Frank-Wolfe solver stopped at c = (0.021, 0.769, 0.210), 22x too long).
    Checked against the NNLS solver and the optimality conditions of the two-point face {g_0, g_1}:
    c_0 = G11 / (G00 + G11) (G01 = 0)."""
    require_native()
    g = torch.tensor([[10.0, 0.0], [0.0, 0.01], [-1.0, 1.0]], dtype=F64)
    G = g @ g.T
    c = pareto.mgda_weights(G.to(device)).cpu()
    c0 = G[1, 1] / (G[0, 0] + G[1, 1])
    torch.testing.assert_close(c, torch.stack([c0, 1 - c0, torch.zeros((), dtype=F64)]), rtol=1e-9, atol=1e-15)
    _, x_star = nnls_min_norm(g)
    assert abs((c @ G @ c).item() - (x_star @ x_star).item()) <= GRAM_ACCURACY * G.diagonal().max().item()


def test_cagrad_pareto_stationary_example(device):
    """g_0 + g_1 + g_2 = 0, w = (0.3, 0.3, 0.4), c = 2: the optimum is p* = (1/3, 1/3, 1/3) with
    g_p* = 0, so p~ = min(p*, w) = (0.3, 0.3, 1/3) and a = w + s / |g_p~| p~ (the old line search
    lost every interior candidate to rounding and returned (0.5, 0.5, 0.4))."""
    require_native()
    g = torch.tensor([[-2.0, -1.0], [1.0, 0.0], [1.0, 1.0]], dtype=F64)
    w = torch.tensor([0.3, 0.3, 0.4], dtype=F64)
    G = g @ g.T
    s = 2.0 * (w @ g).norm()
    pt = torch.tensor([0.3, 0.3, 1 / 3], dtype=F64)
    want = w + s / (pt @ g).norm() * pt
    got = pareto.cagrad_weights(G.to(device), w.to(device), c=2.0, clip=True).cpu()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    # n = 2, exactly anti-parallel gradients, c >= 1: p* = (1/3, 2/3) puts g_p* at 0
    g2 = torch.tensor([[2.0, 0.0], [-1.0, 0.0]], dtype=F64)
    w2 = torch.tensor([0.5, 0.5], dtype=F64)
    s2 = 1.5 * (w2 @ g2).norm()
    pt2 = torch.minimum(torch.tensor([1 / 3, 2 / 3], dtype=F64), w2)
    want2 = w2 + s2 / (pt2 @ g2).norm() * pt2
    got2 = pareto.cagrad_weights((g2 @ g2.T).to(device), w2.to(device), c=1.5, clip=True).cpu()
    torch.testing.assert_close(got2, want2, rtol=1e-9, atol=1e-12)


def test_cagrad_near_stationary_small_gradient(device):
    """Near-stationary n = 3 with one small gradient and c = 0.8 (the old pair descent ended at
    a = (7.64, 7.51, 13.68)): the objective matches the independent solver."""
    require_native()
    gen = torch.Generator().manual_seed(7)
    for t in range(20):
        g = torch.randn(3, 4, generator=gen, dtype=F64)
        g[2] = -(g[0] + g[1]) + 1e-6 * torch.randn(4, generator=gen, dtype=F64)
        g[0] *= 1e-3
        g = g / g.norm(dim=1).max()
        w = simplex_w(3, t)
        a = pareto.cagrad_weights((g @ g.T).to(device), w.to(device), c=0.8, clip=False).cpu()
        p = cagrad_p(a, w)
        f = 0.0 if p is None else cagrad_F(g, w, 0.8, p)
        f_ind = cagrad_F(g, w, 0.8, cagrad_independent(g, w, 0.8))
        assert abs(f - f_ind) <= GRAM_ACCURACY, (t, f, f_ind)


@pytest.mark.parametrize("method", ["mgda", "cagrad"])
def test_non_finite_gram_gives_nan(device, method):
    """A NaN or Inf anywhere in G (or in w) gives NaN weights, never a plausible answer."""
    require_native()
    for n in (2, 3, 9):
        for bad in (float("nan"), float("inf")):
            G = torch.eye(n, dtype=F64)
            G[0, n - 1] = G[n - 1, 0] = bad
            w = torch.full((n,), 1.0 / n, dtype=F64)
            fn = pareto.mgda_weights if method == "mgda" else pareto.cagrad_weights
            assert fn(G.to(device)).isnan().all(), (n, bad)
            assert reference.mgda_weights(G).isnan().all() if method == "mgda" else \
                reference.cagrad_weights(G, w).isnan().all()
            if method == "cagrad":
                w[1] = bad
                assert pareto.cagrad_weights(torch.eye(n, dtype=F64, device=device), w.to(device)).isnan().all()


@pytest.mark.parametrize("n", [9, 10, 12])
def test_active_set_matches_enumeration(device, n):
    """n > 8 runs the active-set method; the reference enumerates every face (n <= 12): same
    objective, same direction."""
    require_native()
    for kind in EXACT_KINDS:
        g = make_case(kind, n, 3)
        G = g @ g.T
        w = simplex_w(n, 3)
        c = pareto.mgda_weights(G.to(device)).cpu()
        cr = reference.mgda_weights(G)
        assert abs((c @ G @ c).item() - (cr @ G @ cr).item()) <= GRAM_ACCURACY, kind
        for cc in (0.4, 2.0):
            a = pareto.cagrad_weights(G.to(device), w.to(device), c=cc, clip=False).cpu()
            ar = reference.cagrad_weights(G, w, cc, clip=False)
            torch.testing.assert_close(a @ g, ar @ g, rtol=0, atol=1e-6, msg=f"{kind} c={cc}")


# ----------------------------------------------------------------------------------------------
# PCGrad
# ----------------------------------------------------------------------------------------------
def pcgrad_vectors(g: torch.Tensor) -> torch.Tensor:
    """PCGrad on explicit gradients, objectives projected in the fixed order j = 0..n-1."""
    out = torch.zeros_like(g[0])
    for i in range(g.shape[0]):
        gi = g[i].clone()
        for j in range(g.shape[0]):
            if j == i:
                continue
            dot = gi @ g[j]
            nj = g[j] @ g[j]
            if dot < 0 and nj > 0:
                gi = gi - dot / nj * g[j]
        out = out + gi
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", NS)
def test_pcgrad_matches_vector_form(device, n, kind):
    require_native()
    g = make_g(kind, n, seed=51 + n)
    v = pareto.pcgrad_weights((g @ g.T).to(device)).cpu()
    want = pcgrad_vectors(g)
    torch.testing.assert_close(v @ g, want, rtol=1e-9, atol=1e-9 * g.abs().max().item())


# ----------------------------------------------------------------------------------------------
# bad input, fallback
# ----------------------------------------------------------------------------------------------
def _err(arg, fn, *args, **kw):
    with pytest.raises((RuntimeError, ValueError)) as ei:
        fn(*args, **kw)
    assert arg in str(ei.value), f"error does not name {arg!r}: {ei.value}"


def test_bad_input(device):
    require_native()
    G = torch.eye(3, dtype=F64, device=device)
    for fn in (pareto.mgda_weights, pareto.cagrad_weights, pareto.pcgrad_weights, pareto.linear_weights):
        _err("G", fn, G[:2])
        _err("G", fn, G[0])
        _err("G", fn, torch.zeros(0, 0, dtype=F64, device=device))  # n = 0
        _err("G", fn, G.long())
        _err("G", fn, torch.eye(65, dtype=F64, device=device))
    _err("c", pareto.cagrad_weights, G, c=-0.1)
    op = torch.ops.pama_ext.gram_weights
    _err("w", op, G, torch.ones(2, dtype=F64, device=device), "cagrad", 0.4)
    _err("method", op, G, None, "nash", 0.4)
    _err("c", op, G, None, "cagrad", float("nan"))
    _err("G", op, G[:2], None, "mgda", 0.4)


def test_reference_fallback_agrees(device):
    """The pure-PyTorch twins (used without the compiled library) give the kernels' answers on
    device tensors, without reading back to the host."""
    require_native()
    g = make_g("conflict", 4, seed=9)
    G = (g @ g.T).to(device)
    w = simplex_w(4, 9).to(device)
    torch.testing.assert_close(reference.cagrad_weights(G, w), pareto.cagrad_weights(G, w), rtol=1e-9, atol=1e-12)
    assert reference.cagrad_weights(G, w).device == G.device


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
