"""MOPO math (pama_ext.dpo.mopo): the tilt is normalised per prompt, the duals move the right way, and the
update reaches the constrained optimum of small tabular problems, solved independently here."""
from __future__ import annotations

import math

import pytest
import torch

from pama_ext.dpo import mopo


def _groups(sizes):
    return torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(sizes)])


def _random_log_base(group, n_groups, gen):
    x = torch.randn(group.shape[0], generator=gen, dtype=torch.float64)
    return x - mopo.group_logsumexp(x, group, n_groups)[group]


@pytest.mark.parametrize("tau", [0.08, 0.5, 3.0])
def test_tilt_has_mean_one_under_the_reference_per_prompt(tau):
    gen = torch.Generator().manual_seed(0)
    sizes = [1, 3, 5, 2, 7]
    group = _groups(sizes)
    R, G = group.shape[0], len(sizes)
    for log_base in (mopo.uniform_log_base(group, G).double(), _random_log_base(group, G, gen)):
        p = torch.rand(R, generator=gen, dtype=torch.float64)
        q = torch.rand(2, R, generator=gen, dtype=torch.float64)
        lam = torch.tensor([0.0, 3.0], dtype=torch.float64)
        log_rho = mopo.tilt_log_weights(p, q, lam, tau, log_base, group, G)
        mean = torch.zeros(G, dtype=torch.float64).index_add(0, group, torch.exp(log_base + log_rho))
        torch.testing.assert_close(mean, torch.ones(G, dtype=torch.float64))
        # the tilt is monotone in the tilted score within a prompt
        z = p + (lam[:, None] * q).sum(0)
        for g in range(G):
            idx = (group == g).nonzero().flatten()
            assert torch.equal(torch.argsort(z[idx]), torch.argsort(log_rho[idx]))


def test_tilt_is_stable_in_log_space():
    group = _groups([3])
    p = torch.tensor([0.0, 0.5, 1.0])
    log_base = mopo.uniform_log_base(group, 1)
    log_rho = mopo.tilt_log_weights(p, torch.zeros(0, 3), torch.zeros(0), 1e-3, log_base, group, 1)
    assert torch.isfinite(log_rho).all()  # exp(1000) would overflow without the log-space normalisation
    torch.testing.assert_close(torch.exp(log_base + log_rho).sum(), torch.tensor(1.0))


def test_uniform_and_lag_log_base_are_normalised():
    group = _groups([2, 4])
    lb0 = mopo.uniform_log_base(group, 2)
    torch.testing.assert_close(torch.exp(lb0), torch.tensor([0.5, 0.5, 0.25, 0.25, 0.25, 0.25]))
    lag = mopo.lag_log_base(torch.tensor([-3.0, -1.0, -2.0, -2.0, -5.0, -9.0]), torch.full((6,), -2.0), lb0, group, 2)
    s = torch.zeros(2).index_add(0, group, torch.exp(lag))
    torch.testing.assert_close(s, torch.ones(2))
    # same lagged policy as the reference: base unchanged
    torch.testing.assert_close(mopo.lag_log_base(torch.full((6,), -2.0), torch.full((6,), -2.0), lb0, group, 2), lb0)


def test_lambda_grows_while_violated_and_shrinks_when_slack():
    group = _groups([4, 4])
    lb = mopo.uniform_log_base(group, 2)
    p = torch.tensor([1.0, 0.8, 0.2, 0.0, 1.0, 0.6, 0.3, 0.1])
    q = (1 - p)[None]  # the constraint conflicts with the primary
    # violated: a threshold above what the tilt reaches
    d = mopo.MopoDuals.init(torch.tensor([0.9]))
    lam_prev = d.lam.clone()
    for _ in range(3):
        mopo.dual_step(d, p, q, lb, group, 2, tau=0.5, eps=0.0, eta=0.5)
        assert d.lam.item() > lam_prev.item()
        lam_prev = d.lam.clone()
    # slack: a threshold below what the tilt reaches -> λ shrinks towards 0 and stays >= 0
    d.b = torch.tensor([0.0])
    for _ in range(50):
        before = d.lam.clone()
        mopo.dual_step(d, p, q, lb, group, 2, tau=0.5, eps=0.0, eta=0.5)
        assert d.lam.item() <= before.item()
    assert d.lam.item() == 0.0


def test_chi_gradient_matches_autograd_and_chi_step_raises_the_bound():
    gen = torch.Generator().manual_seed(1)
    R = 9
    v = torch.rand(2, R, generator=gen, dtype=torch.float64) * 2
    log_p = torch.log_softmax(torch.randn(R, generator=gen, dtype=torch.float64), 0)
    for eps in (0.05, 0.15, 0.5):
        chi = torch.tensor([0.3, 2.0], dtype=torch.float64, requires_grad=True)
        f = chi * torch.logsumexp(log_p - v / chi[:, None], -1) + chi * eps
        g_auto, = torch.autograd.grad(f.sum(), chi)
        torch.testing.assert_close(mopo.chi_gradient(v, log_p, chi.detach(), eps), g_auto)
        # a small χ step increases the lower bound (ascent), for both components
        c0 = chi.detach()
        c1 = (c0 - 0.01 * mopo.chi_gradient(v, log_p, c0, eps)).clamp_min(mopo.CHI_MIN)
        assert (mopo.robust_lower_bound(v, log_p, c1, eps) > mopo.robust_lower_bound(v, log_p, c0, eps)).all()
        # and it never exceeds the plain mean (the ε = 0 bound)
        assert (mopo.robust_lower_bound(v, log_p, c1, eps) <= (v * log_p.exp()).sum(-1)).all()


def test_effective_sample_size():
    torch.testing.assert_close(mopo.effective_sample_size(torch.full((7,), 0.3)), torch.tensor(7.0))
    torch.testing.assert_close(mopo.effective_sample_size(torch.tensor([1.0, 0.0, 0.0])), torch.tensor(1.0))
    w = torch.tensor([3.0, 1.0])
    torch.testing.assert_close(mopo.effective_sample_size(w), torch.tensor(16.0 / 10.0))


# -------------------------------------------------------------------------------------------------
# tabular problems: MOPO (duals + behaviour cloning of a softmax table) vs independent solutions
# -------------------------------------------------------------------------------------------------
def _conflicting_problem(seed, sizes):
    """(group, G, R, log_base, p̄, q̄ [1, R]): random stored responses whose secondary value conflicts with the
    primary (q̄ ≈ 1 − p̄ plus noise), with a random reference distribution per prompt."""
    gen = torch.Generator().manual_seed(seed)
    group = _groups(sizes)
    G, R = len(sizes), sum(sizes)
    log_base = _random_log_base(group, G, gen)
    p = torch.rand(R, generator=gen, dtype=torch.float64)
    q = (1 - p + 0.3 * torch.rand(R, generator=gen, dtype=torch.float64)).clamp(0, 1)[None]
    return group, G, R, log_base, p, q


def _run_tabular_mopo(p, q, log_base, group, G, b, tau, steps=1500, eta=1.0, lr=0.2):
    """MOPO's loop on a tabular policy: dual_step on the whole pool, then one Adam step on the
    behaviour-cloning loss −Σ W log π_θ (π_θ = per-prompt softmax of a logit table)."""
    theta = torch.zeros(group.shape[0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    d = mopo.MopoDuals.init(torch.as_tensor(b, dtype=torch.float64))
    for _ in range(steps):
        log_rho, _ = mopo.dual_step(d, p, q, log_base, group, G, tau=tau, eps=0.0, eta=eta)
        w = mopo.bc_weights(log_rho, log_base, G)
        logpi = theta - mopo.group_logsumexp(theta, group, G)[group]
        loss = -(w * logpi).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pi = torch.exp(theta - mopo.group_logsumexp(theta, group, G)[group])
    return pi, d


def _objective(pi, p, q, log_base, group, G, tau):
    """(E_x[E_π p̄ − τ KL(π‖π_ref)], E_x E_π q̄) in float64 (prompts weighted equally)."""
    ref = torch.exp(log_base)
    kl_terms = torch.where(pi > 0, pi * (torch.log(pi.clamp_min(1e-300)) - torch.log(ref)), torch.zeros_like(pi))
    J = ((pi * p).sum() - tau * kl_terms.sum()) / G
    C = (pi * q).sum(-1) / G
    return J, C


def test_tabular_single_prompt_matches_a_grid_search_over_the_simplex():
    # one prompt, three stored responses; the primary and the secondary conflict
    group = _groups([3])
    log_base = torch.log(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    p = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.4, 0.95]], dtype=torch.float64)
    tau = 0.2
    # threshold between the unconstrained optimum's secondary value and the best possible one
    pi_free = torch.softmax(log_base + p / tau, 0)
    c_free = float((pi_free * q[0]).sum())
    b = c_free + 0.5 * (0.95 - c_free)

    # independent: brute force over a fine grid of the 2-simplex
    N = 800
    best, best_pi = -math.inf, None
    i = torch.arange(N + 1, dtype=torch.float64)
    a1, a2 = torch.meshgrid(i / N, i / N, indexing="ij")
    a3 = 1 - a1 - a2
    ok = a3 >= -1e-12
    P = torch.stack([a1[ok], a2[ok], a3[ok].clamp_min(0)], -1)  # [M, 3]
    ref = torch.exp(log_base)
    kl = torch.where(P > 0, P * (torch.log(P.clamp_min(1e-300)) - torch.log(ref)), torch.zeros_like(P)).sum(-1)
    J = (P * p).sum(-1) - tau * kl
    feasible = (P * q[0]).sum(-1) >= b
    assert feasible.any()
    J = torch.where(feasible, J, torch.full_like(J, -math.inf))
    k = int(torch.argmax(J))
    best, best_pi = float(J[k]), P[k]

    pi, d = _run_tabular_mopo(p, q, log_base, group, 1, [b], tau)
    J_m, C_m = _objective(pi, p, q, log_base, group, 1, tau)
    assert float(C_m[0]) >= b - 2e-3, (float(C_m[0]), b)  # respects the threshold
    assert (pi - best_pi).abs().max() < 3.0 / N + 2e-3, (pi, best_pi)
    assert abs(float(J_m) - best) < 5e-3
    assert d.lam.item() > 0  # the constraint binds


def _lagrangian_solution(p, q, log_base, group, G, b, tau):
    """Independent float64 solve: π_λ ∝ π_ref exp((p̄ + λq̄)/τ) per prompt; the smallest λ ≥ 0 with
    E_x E_{π_λ} q̄ ≥ b (bisection; the constraint value is non-decreasing in λ)."""
    ref = torch.exp(log_base)

    def pi_of(lam):
        out = torch.empty_like(p)
        for g in range(G):
            idx = (group == g).nonzero().flatten()
            logits = torch.log(ref[idx]) + (p[idx] + lam * q[0, idx]) / tau
            out[idx] = torch.softmax(logits, 0)
        return out

    def cons(lam):
        return float((pi_of(lam) * q[0]).sum() / G)

    if cons(0.0) >= b:
        return pi_of(0.0), 0.0
    lo, hi = 0.0, 1.0
    while cons(hi) < b:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cons(mid) < b else (lo, mid)
    return pi_of(hi), hi


@pytest.mark.parametrize("seed", [0, 1])
def test_tabular_several_prompts_reach_the_lagrangian_optimum(seed):
    group, G, R, log_base, p, q = _conflicting_problem(seed, [3, 4, 2])
    tau = 0.3
    pi0, _ = _lagrangian_solution(p, q, log_base, group, G, -1.0, tau)  # unconstrained
    c_free = float((pi0 * q[0]).sum() / G)
    c_max = float(sum(q[0, group == g].max() for g in range(G)) / G)
    b = c_free + 0.4 * (c_max - c_free)
    pi_star, lam_star = _lagrangian_solution(p, q, log_base, group, G, b, tau)
    assert lam_star > 0

    pi, d = _run_tabular_mopo(p, q, log_base, group, G, [b], tau)
    _, C = _objective(pi, p, q, log_base, group, G, tau)
    assert float(C[0]) >= b - 2e-3
    assert (pi - pi_star).abs().max() < 1e-2, (pi, pi_star)
    assert abs(d.lam.item() - lam_star) < 0.05 * max(1.0, lam_star), (d.lam.item(), lam_star)
    # and no feasible point of a random search does better (the optimum is a maximum, not just a KKT point)
    J_star, _ = _objective(pi_star, p, q, log_base, group, G, tau)
    M = 4000
    cand = torch.empty(M, R, dtype=torch.float64)
    for g in range(G):
        idx = (group == g).nonzero().flatten()
        cand[:, idx] = torch.distributions.Dirichlet(torch.ones(len(idx), dtype=torch.float64)).sample((M,))
    ref = torch.exp(log_base)
    kl = torch.where(cand > 0, cand * (torch.log(cand.clamp_min(1e-300)) - torch.log(ref)), torch.zeros_like(cand))
    Jc = ((cand * p).sum(-1) - tau * kl.sum(-1)) / G
    Cc = (cand * q[0]).sum(-1) / G
    assert (Cc >= b).any()
    assert float(Jc[Cc >= b].max()) <= float(J_star) + 1e-9


# -------------------------------------------------------------------------------------------------
# the robust bound's exact value, the ε = 0.15 regime, and MOPO-LB, against independent computations
# -------------------------------------------------------------------------------------------------
def _scipy_robust_value(v, p, eps):
    """sup_χ −χ log Σ p e^{−v/χ} − χε by scipy's bounded scalar search on log χ (numpy, float64)."""
    import numpy as np
    from scipy.optimize import minimize_scalar
    from scipy.special import logsumexp

    v, p = np.asarray(v, dtype=np.float64), np.asarray(p, dtype=np.float64)

    def neg(lc):
        c = np.exp(lc)
        return c * logsumexp(-v / c, b=p) + c * eps

    r = minimize_scalar(neg, bounds=(np.log(mopo.CHI_MIN), np.log(mopo.CHI_MAX)), method="bounded",
                        options={"xatol": 1e-12})
    return -r.fun


@pytest.mark.parametrize("eps", [0.0, 0.05, 0.15, 0.6])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_robust_value_is_the_bounds_supremum_over_chi(eps, seed):
    gen = torch.Generator().manual_seed(seed)
    K, R = 3, 11
    v = torch.rand(K, R, generator=gen, dtype=torch.float64) * torch.tensor([[1.0], [4.0], [0.2]], dtype=torch.float64)
    log_p = torch.log_softmax(torch.randn(R, generator=gen, dtype=torch.float64), 0)
    got = mopo.robust_value(v, log_p, eps)
    for k in range(K):
        want = float((v[k] * log_p.exp()).sum()) if eps == 0 else _scipy_robust_value(v[k], log_p.exp(), eps)
        assert abs(float(got[k]) - want) < 1e-9, (k, float(got[k]), want)
        # a lower bound: never above the mean, and above the minimum
        assert float(got[k]) <= float((v[k] * log_p.exp()).sum()) + 1e-12
        assert float(got[k]) >= float(v[k].min()) - eps * mopo.CHI_MIN - 1e-12


def test_secondary_values_use_the_constraint_functional():
    gen = torch.Generator().manual_seed(3)
    group = _groups([4, 3, 5])
    log_base = _random_log_base(group, 3, gen)
    q = torch.rand(2, 12, generator=gen, dtype=torch.float64)
    log_p = log_base - math.log(3)
    torch.testing.assert_close(mopo.secondary_values(q, log_base, 3), (q * log_base.exp()).sum(-1) / 3)
    torch.testing.assert_close(mopo.secondary_values(q, log_base, 3, 0.15), mopo.robust_value(q, log_p, 0.15))
    assert (mopo.secondary_values(q, log_base, 3, 0.15) < mopo.secondary_values(q, log_base, 3)).all()


def _small_pool(seed=0, P=40, n=4, corr=-0.3):
    """Pairwise win-rates of n responses per prompt under two correlated scores (the demo's regime: 4 per prompt)."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(P, n, 2, generator=gen, dtype=torch.float64)
    s[..., 1] = corr * s[..., 0] + 0.95 * s[..., 1]
    wr = ((s[:, :, None] > s[:, None, :]).double().sum(-2)) / (n - 1)  # [P, n, 2]: share of the others beaten
    group = torch.arange(P).repeat_interleave(n)
    return wr[..., 0].flatten(), wr[..., 1].flatten()[None], group, P


def _product_bound(p, q, group, P, lam, eps, tau=0.08):
    """The bound of the importance-weighted product, sup_χ −χ log E_base e^{−ρ̃ q̄/χ} − χε (scipy; uniform base)."""
    log_base = mopo.uniform_log_base(group, P).double()
    lr = mopo.tilt_log_weights(p, q, torch.tensor([lam], dtype=torch.float64), tau, log_base, group, P)
    return _scipy_robust_value((lr.exp() * q[0]).numpy(), (log_base.exp() / P).numpy(), eps)


def test_eps_015_cause_the_product_bound_cannot_certify_the_reference():
    """Why ε = 0.15 made λ diverge on small pools: with 4 responses per prompt and τ = 0.08 every tilt is nearly
    one-hot, and the robust bound of the product ρ̃·q̄ under the reference penalises the dispersion of the weights
    themselves: for every λ it stays far below the threshold (the plain mean of the reference's q̄, and even
    the reference's own robust value), so λ ← λ + η (b − LB) can only grow. The bound of the tilted policy
    (what dual_step uses) reaches both."""
    p, q, group, P = _small_pool()
    log_base = mopo.uniform_log_base(group, P).double()
    eps = 0.15
    plain = float(mopo.secondary_values(q, log_base, P))
    robust_ref = _scipy_robust_value(q[0].numpy(), (log_base.exp() / P).numpy(), eps)
    best_product = max(_product_bound(p, q, group, P, lam, eps) for lam in [0.0, 0.1, 0.3, 1, 3, 10, 100])
    assert best_product < robust_ref - 0.05 and robust_ref < plain
    lr = mopo.tilt_log_weights(p, q, torch.tensor([100.0], dtype=torch.float64), 0.08, log_base, group, P)
    policy_bound = _scipy_robust_value(q[0].numpy(), (log_base.exp() / P * lr.exp()).numpy(), eps)
    assert policy_bound > plain


def test_eps_015_lambda_binds_and_stays_bounded_on_a_small_pool():
    """The same pool, batches of 8 prompts as in the demo, thresholds β·G with G measured by the constraint's
    own functional (MopoTrainer): λ binds and stays bounded over 300 steps."""
    p, q, group, P = _small_pool()
    log_base = mopo.uniform_log_base(group, P).double()
    eps = 0.15
    d = mopo.MopoDuals.init(0.9995 * mopo.secondary_values(q, log_base, P, eps))
    gen = torch.Generator().manual_seed(1)
    lams = []
    for t in range(300):
        pick = torch.randperm(P, generator=gen)[:8]
        idx = torch.cat([(group == i).nonzero().flatten() for i in pick.tolist()])
        grp = torch.arange(8).repeat_interleave(4)
        mopo.dual_step(d, p[idx], q[:, idx], log_base[idx], grp, 8, tau=0.08, eps=eps, eta=0.5)
        lams.append(float(d.lam))
    assert max(lams) < 2.0 and sum(x > 0 for x in lams[-100:]) > 50, (max(lams), lams[-100:])


def _policy_bound(p, q, log_base, group, G, lam, eps, tau):
    lr = mopo.tilt_log_weights(p, q, torch.tensor([lam], dtype=torch.float64), tau, log_base, group, G)
    return _scipy_robust_value(q[0].numpy(), (log_base.exp() / G * lr.exp()).numpy(), eps)


def test_full_batch_dual_ascent_with_eps_reaches_the_root_of_the_robust_constraint():
    """ε = 0.15, the whole pool every step (no batch noise): λ converges to the λ* with LB_ε(π_λ*) = b, found
    independently (scipy's bound and brentq)."""
    from scipy.optimize import brentq

    group, G, R, log_base, p, q = _conflicting_problem(7, [3, 4, 2, 5])
    tau, eps = 0.3, 0.15
    lo_v, hi_v = _policy_bound(p, q, log_base, group, G, 0.0, eps, tau), _policy_bound(p, q, log_base, group, G,
                                                                                          50.0, eps, tau)
    b = lo_v + 0.5 * (hi_v - lo_v)
    lam_star = brentq(lambda x: _policy_bound(p, q, log_base, group, G, x, eps, tau) - b, 0.0, 50.0, xtol=1e-10)
    d = mopo.MopoDuals.init(torch.tensor([b], dtype=torch.float64))
    for _ in range(6000):
        mopo.dual_step(d, p, q, log_base, group, G, tau=tau, eps=eps, eta=0.2)
    assert abs(float(d.lam) - lam_star) < 1e-3 * max(1.0, lam_star), (float(d.lam), lam_star)
    # χ reached the bound's maximiser: the bound at the iterate is the exact supremum
    lr = mopo.tilt_log_weights(p, q, d.lam, tau, log_base, group, G)
    lp = log_base - math.log(G) + lr
    assert abs(float(mopo.robust_lower_bound(q, lp, d.chi, eps)) - float(mopo.robust_value(q, lp, eps))) < 1e-8


@pytest.mark.parametrize("seed", [0, 1])
def test_mopo_lb_tilt_maximises_the_barrier_objective(seed):
    """ε = 0: the tilt at MOPO-LB's λ maximises E_π p̄ − τ KL(π‖π_ref) + σ log(E_π q̄ − b) over every policy on
    the stored responses (scipy, softmax-parametrised, several starts), even where the threshold is above the
    unconstrained optimum's value (the barrier then binds hard)."""
    import numpy as np
    from scipy.optimize import minimize

    group, G, R, log_base, p, q = _conflicting_problem(seed, [3, 4, 2])
    tau, sigma = 0.3, 0.02
    zero = torch.zeros(1, dtype=torch.float64)
    c_free = float(mopo.secondary_values(q, log_base + mopo.tilt_log_weights(p, q, zero, tau, log_base, group, G), G))
    b = c_free + 0.05  # above the unconstrained optimum's value: the constraint binds
    d = mopo.MopoDuals.init(torch.tensor([b], dtype=torch.float64))
    g = mopo.barrier_lambda(d, p, q, log_base, group, G, tau, 0.0, sigma)
    pi = torch.exp(log_base + mopo.tilt_log_weights(p, q, d.lam, tau, log_base, group, G)).numpy()
    lb_np, gnp, p_np, q_np = log_base.numpy(), group.numpy(), p.numpy(), q[0].numpy()

    def policy(theta):
        out = np.empty(R)
        for k in range(G):
            i = gnp == k
            z = theta[i] + lb_np[i]
            out[i] = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        return out

    def neg_obj(theta):
        x = policy(theta)
        kl = (x * (np.log(x) - lb_np)).sum() / G
        c = (x * q_np).sum() / G
        return 1e6 if c <= b else -((x * p_np).sum() / G - tau * kl + sigma * np.log(c - b))

    rng = np.random.default_rng(seed)
    starts = [np.log(np.maximum(pi, 1e-300)) - lb_np] + [rng.normal(size=R) for _ in range(3)]
    feas = [x for x in starts if neg_obj(x) < 1e6]
    best = min((minimize(neg_obj, x, method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-14,
                                                                    "maxiter": 60000, "maxfev": 60000})
                for x in feas), key=lambda r: r.fun)
    pi_star = policy(best.x)
    assert np.abs(pi - pi_star).max() < 1e-3, (pi, pi_star)
    assert -neg_obj(np.log(pi) - lb_np) >= -best.fun - 1e-9  # nothing scipy found is better
    gap = float((pi * q_np).sum() / G) - b
    assert gap > 0 and abs(float(d.lam) * gap - sigma) < 1e-9 and abs(float(g[0]) - b - gap) < 1e-12


def test_mopo_lb_root_with_the_robust_bound_and_the_cap():
    """ε > 0: λ (LB_ε(π_λ) − b) = σ with LB computed independently (scipy); an unreachable threshold gives the cap."""
    gen = torch.Generator().manual_seed(5)
    group = _groups([3, 4])
    log_base = _random_log_base(group, 2, gen)
    p = torch.rand(7, generator=gen, dtype=torch.float64)
    q = torch.rand(1, 7, generator=gen, dtype=torch.float64)
    tau, sigma, eps = 0.5, 0.01, 0.15
    b = _policy_bound(p, q, log_base, group, 2, 0.0, eps, tau) + 0.02
    d = mopo.MopoDuals.init(torch.tensor([b], dtype=torch.float64))
    mopo.barrier_lambda(d, p, q, log_base, group, 2, tau, eps, sigma)
    lb = _policy_bound(p, q, log_base, group, 2, float(d.lam), eps, tau)
    assert lb > b and abs(float(d.lam) * (lb - b) - sigma) < 1e-7, (float(d.lam), lb - b)
    d2 = mopo.MopoDuals.init(torch.tensor([float(q.max()) + 1.0], dtype=torch.float64))
    mopo.barrier_lambda(d2, p, q, log_base, group, 2, tau, eps, sigma)
    assert float(d2.lam) == pytest.approx(mopo.BARRIER_LAMBDA_MAX)
