"""Property tests (hypothesis): random n, B, T, masks, values and options; the kernels against the
float64 reference (CPU, and CUDA when present).

Inputs on which the float64 answer is itself decided by rounding are discarded with ``assume``
(e.g. PAMA batch weights with whiten=True, noon=False and no clipped token: every abar_i is 0 up
to rounding, so Theorem 1 picks its weights from noise), and quantities that are arbitrary by
construction (the weight split between bitwise-identical objectives, the sign of a combined
advantage that is 0 up to rounding) are compared only where they are defined.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("hypothesis")  # make test installs it; a GPU machine without a registry may lack it
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st

from pama_ext import ops
from pama_ext import reference as ref
from op_runners import run_multi_gae, run_policy_loss, run_value_loss
from pama_testutils import COMBOS, Inputs, compare

F64 = torch.float64
# PAMA_EXT_HYPOTHESIS_EXAMPLES=N: a longer, randomised (not derandomised) exploration run
_EXPLORE = int(os.environ.get("PAMA_EXT_HYPOTHESIS_EXAMPLES", "0"))
SETTINGS = settings(max_examples=_EXPLORE or 40, deadline=None, database=None, derandomize=not _EXPLORE,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@st.composite
def batches(draw, max_n=6, max_b=6, max_t=40):
    n = draw(st.integers(1, max_n))
    B = draw(st.integers(1, max_b))
    T = draw(st.integers(1, max_t))
    seed = draw(st.integers(0, 2**31 - 1))
    mask_style = draw(st.sampled_from(["prefix", "bits", "all", "none"]))
    g = torch.Generator().manual_seed(seed)
    if mask_style == "prefix":
        lengths = draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
        mask = torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    elif mask_style == "bits":
        bits = draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T))
        mask = torch.tensor(bits, dtype=torch.bool).reshape(B, T)
    else:
        mask = torch.full((B, T), mask_style == "all")
    adv_scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    ratio_scale = draw(st.sampled_from([0.0, 0.05, 0.5]))

    def randn(*s):
        return torch.randn(*s, generator=g, dtype=F64)

    logp = -(1 + 0.5 * randn(B, T)).abs()
    old_logp = logp + ratio_scale * randn(B, T)
    advantages = adv_scale * randn(n, B, T)
    if draw(st.booleans()):  # ties between objectives (identical or one-signed objectives)
        advantages[-1] = advantages[0]
    values = randn(n, B, T)
    return Inputs(
        scores=randn(n, B), logp=logp, old_logp=old_logp, ref_logp=logp + 0.1 * randn(B, T),
        advantages=advantages, rewards=randn(n, B, T), values=values,
        old_values=values + 0.3 * randn(n, B, T), returns=values + randn(n, B, T), mask=mask,
    )


def _noon_whitened(x, noon, whiten):
    """N_i of algorithms §3 in float64 (for the conditioning checks below)."""
    m = x.mask
    out = []
    for a in x.advantages:
        sel = a[m]
        if whiten:
            mean = sel.mean() if sel.numel() else torch.zeros((), dtype=F64)
            var = sel.var() if sel.numel() > 1 else torch.zeros((), dtype=F64)
            a = (a - mean) / torch.sqrt(var + 1e-8)
        out.append(a.clamp(min=0) if noon else a)
    return torch.stack(out)


def _duplicate_groups(adv):
    """Groups of objectives with bitwise identical advantages (their weight split is arbitrary)."""
    n = adv.shape[0]
    groups, seen = [], set()
    for i in range(n):
        if i in seen:
            continue
        grp = [j for j in range(i, n) if torch.equal(adv[i], adv[j])]
        seen.update(grp)
        groups.append(grp)
    return groups


def _near_degenerate(v, groups, tol=1e-9):
    """Theorem-1 input v [n] whose min/max selection is decided by rounding: a nonzero entry at
    the noise level, or two distinct objectives equal up to noise."""
    reps = [g[0] for g in groups]
    w = v[reps]
    if ((w != 0) & (w.abs() < tol)).any():
        return True
    d = (w[:, None] - w[None, :]).abs()
    d.fill_diagonal_(float("inf"))
    return bool(((d > 0) & (d < tol)).any())


@SETTINGS
@given(x=batches(),
       combo=st.sampled_from(COMBOS),
       agg=st.sampled_from(ref.AGG_MODES), noon=st.booleans(), whiten=st.booleans(),
       beta_loss=st.sampled_from([0.0, 0.2]), eps=st.sampled_from([(0.2, 0.2), (0.1, 0.3)]))
def test_policy_loss_matches_reference(device, x, combo, agg, noon, whiten, beta_loss, eps):
    method, granularity = combo
    n = x.advantages.shape[0]
    groups = _duplicate_groups(x.advantages)
    m = x.mask
    cnt = max(int(m.sum()), 1)
    # --- inputs on which the float64 answer itself is decided by rounding are discarded --------
    N = _noon_whitened(x, noon, whiten)
    ind = (torch.exp((x.logp - x.old_logp).clamp(-20, 20)) <= 1 + eps[1]).to(F64)
    I = N * ind * m
    if method == "pama" and granularity == "batch":
        assume(not _near_degenerate(I.sum((1, 2)) / cnt, groups))
    if method == "pama" and granularity == "sequence":
        rows = m.sum(-1)
        for b in range(m.shape[0]):
            if rows[b] > 0:
                assume(not _near_degenerate(I[:, b].sum(-1) / rows[b], groups))
    if method == "mgda" and n > 1:
        # the min-norm weights are unique only for a nonsingular Gram of the distinct objectives
        reps = [g[0] for g in groups]
        G = torch.einsum("ibt,jbt->ij", I[reps], I[reps]) / cnt
        ev = torch.linalg.eigvalsh(G)
        assume(len(reps) == 1 or ev.min() > 1e-6 * max(ev.max().item(), 1e-300))
    kw = dict(method=method, granularity=granularity, agg=agg, noon=noon, whiten=whiten, beta_loss=beta_loss,
              use_ref=beta_loss > 0, eps_lo=eps[0], eps_hi=eps[1])
    got = run_policy_loss(ops, x.to(device=device), **kw)
    want = run_policy_loss(ref, x, **kw)
    assert math.isfinite(got["loss"].item())
    # tokens whose combined advantage is zero only up to rounding: their sign (active) and clip
    # decision are arbitrary, so those two counts may differ by that many tokens
    a_tilde = ref.combined_advantage(x.advantages, x.logp, x.old_logp, x.mask, eps_hi=eps[1], noon=noon,
                                     whiten=whiten, method=method, granularity=granularity)[0]
    ambiguous = int(((a_tilde != 0) & (a_tilde.abs() < 1e-9) & m).sum())
    for k, w in want.items():
        g = got[k]
        if k == "weights":  # the split of weight between identical objectives is arbitrary
            g = torch.stack([g[grp].sum() for grp in groups])
            w = torch.stack([w[grp].sum() for grp in groups])
        if k in ("active", "clipfrac") and ambiguous:
            assert abs(g.item() - w.item()) <= ambiguous / cnt + 1e-12, (k, g, w, ambiguous)
            continue
        compare(k, g, w)


@SETTINGS
@given(x=batches(), gamma=st.sampled_from([1.0, 0.99, 0.5]), lam=st.sampled_from([0.95, 1.0, 0.0]))
def test_multi_gae_matches_reference(device, x, gamma, lam):
    got = run_multi_gae(ops, x.to(device=device), gamma, lam)
    want = run_multi_gae(ref, x, gamma, lam)
    for k, w in want.items():
        compare(k, got[k], w)


@settings(SETTINGS, max_examples=_EXPLORE or 25)
@given(x=batches(), clip=st.sampled_from([0.2, 0.01, None]), agg=st.sampled_from(ref.AGG_MODES))
def test_value_loss_matches_reference(device, x, clip, agg):
    got = run_value_loss(ops, x.to(device=device), clip, agg)
    want = run_value_loss(ref, x, clip, agg)
    for k, w in want.items():
        compare(k, got[k], w)
