"""Preference-steered PAMA (algorithms §4b, the weighted Theorem 1): ``pama_policy_loss(method="pama",
prefs=w)`` against pama_ext.reference in float64 (random inputs, odd shapes, empty rows, forward,
metrics and gradients), the reference against a per-token loop, uniform weights against today's PAMA
bit for bit, the bad-weight errors on both paths, and the trainer flags of issue 14 (``--weights`` for
pama, ``--ratio-to``, ``--noon-order``) against the reference loss.
"""
from __future__ import annotations

import pytest
import torch

from pama_ext import ops, reference as ref
from op_runners import run_policy_loss
from pama_testutils import compare_all, expect_error, make_inputs, widen_ratio

F64 = torch.float64


def rand_prefs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(n, generator=g, dtype=F64))  # positive, far from uniform, not summing to 1


def steer_inputs(n, B=3, T=47, seed=0, mask="holes"):
    x = widen_ratio(make_inputs(n, B, T, seed=seed, mask=mask))
    x.mask[1] = 0  # an empty row
    return x


@pytest.mark.parametrize("noon,whiten", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("granularity", ["token", "batch"])
@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_weighted_pama_f64(device, n, granularity, noon, whiten):
    x = steer_inputs(n, seed=50 + n)
    for agg in ("token-mean", "seq-mean-token-sum"):
        kw = dict(method="pama", granularity=granularity, noon=noon, whiten=whiten, agg=agg,
                  prefs=rand_prefs(n, n + 7))
        got = run_policy_loss(ops, x.to(device=device), **kw)
        compare_all(got, run_policy_loss(ref, x, **kw))


@pytest.mark.parametrize("mask", ["empty", "full"])
def test_weighted_pama_masks_f64(device, mask):
    x = make_inputs(3, 4, 29, seed=61, mask=mask)
    kw = dict(method="pama", granularity="token", prefs=rand_prefs(3, 5), use_ref=True, beta_loss=0.1)
    got = run_policy_loss(ops, x.to(device=device), **kw)
    compare_all(got, run_policy_loss(ref, x, **kw))


@pytest.mark.parametrize("noon", [True, False])
@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_reference_weighted_combine_against_a_token_loop(n, noon):
    """Ã[b, t] = the projection of 0 onto [min_i u_i, max_i u_i], u_i = N_i · (Σ_j w_j) / (n w_i), written
    per token (with Noon: min_i N_i / ρ_i, the weighted Tchebycheff of the clipped advantages)."""
    x = steer_inputs(n, B=2, T=13, seed=70 + n)
    w = rand_prefs(n, n)
    a_tilde, _, _ = ref.combined_advantage(x.advantages, x.logp, x.old_logp, x.mask, noon=noon, whiten=True,
                                           method="pama", granularity="token", prefs=w)
    _, mean, var = ref.masked_moments(x.advantages, x.mask)
    for b in range(2):
        for t in range(13):
            u = []
            for i in range(n):
                v = (float(x.advantages[i, b, t]) - float(mean[i])) / (float(var[i]) + 1e-8) ** 0.5
                v = max(v, 0.0) if noon else v
                u.append(v * float(w.sum()) / (n * float(w[i])))
            want = min(u) if min(u) > 0 else (max(u) if max(u) < 0 else 0.0)
            if x.mask[b, t]:
                assert float(a_tilde[b, t]) == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_weights_steer_towards_the_preferred_objective():
    """With Noon, a heavier weight on objective 0 makes Ã follow N_0 more closely (the point of §4b)."""
    x = make_inputs(2, 8, 64, seed=3, mask="full")
    corr = []
    for w0 in (0.2, 0.5, 0.8):
        a, _, _ = ref.combined_advantage(x.advantages, x.logp, x.old_logp, x.mask, method="pama",
                                         granularity="token", prefs=torch.tensor([w0, 1 - w0], dtype=F64))
        n0 = ref.masked_whiten(x.advantages, x.mask)[0].clamp(min=0)
        corr.append(float(torch.corrcoef(torch.stack([a.flatten(), n0.flatten()]))[0, 1]))
    assert corr[0] < corr[1] < corr[2]


@pytest.mark.parametrize("granularity", ["token", "batch"])
@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_uniform_weights_are_todays_pama_exactly(device, n, granularity):
    x = steer_inputs(n, seed=80 + n).to(device=device)
    base = run_policy_loss(ops, x, method="pama", granularity=granularity)
    for w in (torch.ones(n), torch.full((n,), 1.0 / n), torch.full((n,), 3.7)):
        got = run_policy_loss(ops, x, method="pama", granularity=granularity, prefs=w)
        for k, v in base.items():
            assert torch.equal(got[k], v), f"{k} differs with prefs={w.tolist()}"
    # the reference too (it is the spec of the same identity)
    xr = steer_inputs(n, seed=80 + n)
    want = run_policy_loss(ref, xr, method="pama", granularity=granularity)
    got = run_policy_loss(ref, xr, method="pama", granularity=granularity, prefs=torch.full((n,), 1.0 / n))
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_pareto_weights_batch_with_prefs_f64(device):
    x = steer_inputs(3, seed=90)
    st = ref.objective_stats(x.advantages, x.logp, x.old_logp, x.mask)
    w = rand_prefs(3, 2)
    got = ops.pareto_weights(st.to(device), method="pama", granularity="batch", prefs=w.to(device))
    want = ref.pareto_weights(st, "pama", "batch", w)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-14)
    # the weights c_i / ρ_i combine abar into s* of the rescaled abar
    abar = st[ref.stats_layout(3)["abar"]]
    f = w.sum() / (3 * w)
    s = ref.thm1_weights(abar * f)[1]
    torch.testing.assert_close((want * abar).sum(), s)


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("bad,what", [([0.5, -0.1, 0.6], "> 0"), ([0.5, 0.0, 0.5], "> 0"),
                                      ([0.5, 0.5], "[n]"), ([0.5, float("nan"), 0.5], "NaN")])
def test_bad_weights_name_prefs(bad, what):
    x = steer_inputs(3, seed=95)
    msg = expect_error("prefs", ops.pama_policy_loss, x.logp, x.old_logp, x.advantages, x.mask,
                       prefs=torch.tensor(bad, dtype=F64), method="pama")
    assert what in msg


@pytest.mark.usefixtures("path")
def test_prefs_at_sequence_granularity_is_an_error():
    x = steer_inputs(2, seed=96)
    msg = expect_error("prefs", ops.pama_policy_loss, x.logp, x.old_logp, x.advantages, x.mask,
                       prefs=torch.tensor([0.3, 0.7], dtype=F64), method="pama", granularity="sequence")
    assert "granularity" in msg


# ---- the trainer flags ---------------------------------------------------------------------------
def _trainer(**cfg_kw):
    from pama_ext.trainer.config import TrainConfig
    from pama_ext.trainer.ppo import PPOTrainer

    cfg = TrainConfig(**cfg_kw).validate()
    tr = PPOTrainer.__new__(PPOTrainer)
    tr.cfg, tr.group, tr.prefs = cfg, None, torch.tensor(cfg.normalized_weights(), dtype=F64)
    return tr


def test_trainer_weights_steer_pama():
    x = steer_inputs(2, seed=97)
    logp = x.logp.clone().requires_grad_(True)
    for weights, granularity in (([0.8, 0.2], "token"), ([1.0, 3.0], "batch"), (None, "token")):
        tr = _trainer(method="pama", weights=weights, granularity=granularity, whiten="none")
        loss, m, _ = tr.policy_loss(logp, x.old_logp, x.advantages, x.mask, x.ref_logp, None, whiten_in_op=False)
        c = tr.cfg
        prefs = None if weights is None else torch.tensor(c.normalized_weights(), dtype=F64)
        want, _ = ref.pama_policy_loss(logp, x.old_logp, x.advantages, x.mask, x.ref_logp, eps_lo=c.cliprange,
                                       eps_hi=c.eps_hi, dual_clip=c.dual_clip, agg=c.agg, noon=True, whiten=False,
                                       method="pama", granularity=granularity, prefs=prefs,
                                       beta_loss=c.kl_loss_coef)
        torch.testing.assert_close(loss, want)
        g, = torch.autograd.grad(loss, logp)
        gw, = torch.autograd.grad(want, logp)
        torch.testing.assert_close(g, gw)


def test_trainer_weights_errors():
    from pama_ext.lm.config import ConfigError
    from pama_ext.trainer.config import TrainConfig

    with pytest.raises(ConfigError, match="--weights: .*every weight > 0"):
        TrainConfig(method="pama", weights=[1.0, 0.0]).validate()
    with pytest.raises(ConfigError, match="--weights: .*granularity"):
        TrainConfig(method="pama", weights=[0.3, 0.7], granularity="sequence").validate()
    with pytest.raises(ConfigError, match="--weights: expected 2 weights"):
        TrainConfig(method="pama", weights=[0.3, 0.3, 0.4]).validate()
    TrainConfig(method="morlhf", weights=[1.0, 0.0]).validate()  # a zero weight is fine for a weighted sum


def test_noon_first_whitening_against_the_reference():
    """--noon-order noon-first: N = max(A, 0) / sqrt(var(max(A, 0)) + 1e-8) over the batch, then the
    reference loss with Noon (a no-op on N >= 0) and no whitening in the op."""
    x = steer_inputs(2, seed=98)
    tr = _trainer(method="pama", noon_order="noon-first")
    got = tr.batch_whiten(x.advantages, x.mask)
    clipped = ref.zero_padding(x.advantages, x.mask).clamp(min=0)
    _, _, var = ref.masked_moments(clipped, x.mask)
    want = clipped / torch.sqrt(var + 1e-8)[:, None, None]
    m = x.mask != 0
    torch.testing.assert_close(got[:, m], want[:, m])
    assert bool((got[:, m] >= 0).all())
    # the default is today's whitening
    got0 = _trainer(method="pama").batch_whiten(x.advantages, x.mask)
    torch.testing.assert_close(got0[:, m], ref.masked_whiten(x.advantages, x.mask)[:, m])


def test_noon_order_and_ratio_flags_are_checked():
    from pama_ext.lm.config import ConfigError
    from pama_ext.trainer.config import TrainConfig

    with pytest.raises(ConfigError, match="--noon-order"):
        TrainConfig(method="morlhf", noon_order="noon-first").validate()
    with pytest.raises(ConfigError, match="--noon-order"):
        TrainConfig(method="pama", noon_order="noon-first", whiten="minibatch").validate()
    with pytest.raises(ConfigError, match="--ratio-to"):
        TrainConfig(method="pama", ratio_to="old").validate()


def test_compare_sweep_expands_the_preference_methods():
    from pama_ext.compare.cli import with_sweep

    got = with_sweep(["pama", "morlhf", "mgda-ub", "linear:weights=0.5/0.5", "pama:granularity=batch"],
                     ["0.8/0.2", "0.2/0.8"])
    assert got == ["pama", "pama:weights=0.8/0.2", "pama:weights=0.2/0.8",
                   "morlhf", "morlhf:weights=0.8/0.2", "morlhf:weights=0.2/0.8", "mgda-ub", "linear:weights=0.5/0.5",
                   "pama:granularity=batch", "pama:granularity=batch:weights=0.8/0.2",
                   "pama:granularity=batch:weights=0.2/0.8"]
