"""Weighting methods on a Gram matrix (pama_ext.pareto, SPEC §4/§6): MGDA, CAGrad / RACO's
CAGrad-clip, PCGrad, linear.

Gram matrices are built from explicit gradients g [n, d] (G = g g^T), including singular, rank-1,
near-collinear and zero-gradient cases. Checks: kernels against the reference twins; MGDA against a
brute-force search over the simplex within the Frank-Wolfe convergence bound; CAGrad through its
duality (the primal value at the solver's p and the dual value min_i <g_i, d> must agree) and against
a brute-force search; CAGrad's conflict-averse guarantee; PCGrad against the vector-form algorithm.
"""
from __future__ import annotations

import math

import pytest
import torch

from pama_ext import ops, pareto, reference
from pama_testutils import NS, require_native

F64 = torch.float64
KINDS = ["random", "singular", "rank1", "collinear", "conflict", "zero_row"]


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
                # pair descent stops after a fixed iteration count: the two implementations (different
                # summation orders) agree to the iterate's accuracy, ~1e-7 relative on these cases
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9, msg=f"cagrad clip={clip}")
    torch.testing.assert_close(pareto.mgda_weights(G).cpu(), reference.mgda_weights(G.cpu()), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(pareto.pcgrad_weights(G).cpu(), reference.pcgrad_weights(G.cpu()), rtol=1e-9,
                               atol=1e-12)
    torch.testing.assert_close(pareto.linear_weights(G, w).cpu(), w.cpu())
    torch.testing.assert_close(pareto.linear_weights(G).cpu(), torch.full((n,), 1.0 / n, dtype=F64))


@pytest.mark.parametrize("n", [2, 3, 8])
def test_float32_gram(device, n):
    """float32 in, float32 out; CAGrad is solved in float64 (SPEC §6), MGDA/PCGrad in float32."""
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
    """pareto.mgda_weights(G) and pareto_weights(stats, 'mgda') run the same Frank-Wolfe."""
    require_native()
    g = make_g("conflict", n, seed=11)
    G = (g @ g.T).to(dtype).to(device)
    stats = torch.zeros((n + 3) ** 2 - 7, dtype=dtype, device=device)
    stats[reference.stats_layout(n)["gram"]] = G.reshape(-1)
    assert torch.equal(pareto.mgda_weights(G), ops.pareto_weights(stats, "mgda", "batch"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_mgda_brute_force(device, n, kind):
    """c^T G c at the solver is at the best point a brute-force search finds: n = 2 is exact, and
    for n > 2 the pairwise Frank-Wolfe steps converge linearly, so after MGDA_FW_ITERS steps the
    solver is within 1e-9 of max G_ii of the search's minimum (plain Frank-Wolfe with 100 steps
    stayed up to 4e-3 above it on these matrices, inside its O(1/k) bound 2 C_f / (k + 2))."""
    require_native()
    g = make_g(kind, n, seed=21 + n)
    G = g @ g.T
    c = pareto.mgda_weights(G.to(device)).cpu()
    assert (c >= 0).all() and abs(c.sum().item() - 1) < 1e-12
    val = (c @ G @ c).item()
    best = brute_min(lambda P: ((P @ G) * P).sum(1), n)
    scale = torch.diagonal(G).max().item()
    assert val <= best + 1e-9 * scale, (val, best)


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
    tol = 1e-7 * scale
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
    """n = 2 is exact (SPEC §6 closed form): the solver's value equals the dense-grid minimum
    within the grid's Lipschitz error."""
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
    minimiser has g_p* != 0, since g_p = 0 gives F(p) = 0, and SPEC §6's d = g0 + s g_p*/|g_p*| is
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
    """SPEC §6's clip (p~ = min(p*, w)) can make d conflict with an objective where plain CAGrad
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
    """SPEC §6's fallback a = w when |g_p~| = 0 (the minimiser is a Pareto-stationary point, F* = 0):
    d = g0 can conflict with an objective although a non-conflicting d in the ball exists
    (documented in the preference-ops report): a fixed counterexample, implemented as SPEC says."""
    require_native()
    g = torch.tensor([[0.0, 0.0], [-1.0, -3.0], [-2.0, 3.0]], dtype=F64)
    w = torch.tensor([0.2, 0.2, 0.6], dtype=F64)
    c = 0.8
    assert certify_nonnegative(g, w, c, 0)
    a = pareto.cagrad_weights((g @ g.T).to(device), w.to(device), c=c, clip=False).cpu()
    assert torch.equal(a, w)
    assert (g @ (a @ g)).min().item() < -1


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
    _err("w", op, G, torch.ones(2, dtype=F64, device=device), "cagrad", 0.4, True, 10)
    _err("method", op, G, None, "nash", 0.4, True, 10)
    _err("iters", op, G, None, "mgda", 0.4, True, -1)
    _err("G", op, G[:2], None, "mgda", 0.4, True, 10)


def test_reference_fallback_agrees(device):
    """The pure-PyTorch twins (used without the compiled library) give the kernels' answers on
    device tensors, without reading back to the host."""
    require_native()
    g = make_g("conflict", 4, seed=9)
    G = (g @ g.T).to(device)
    w = simplex_w(4, 9).to(device)
    torch.testing.assert_close(reference.cagrad_weights(G, w), pareto.cagrad_weights(G, w), rtol=1e-9, atol=1e-12)
    assert reference.cagrad_weights(G, w).device == G.device
