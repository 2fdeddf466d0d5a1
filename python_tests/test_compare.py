"""pama_ext.compare: the statistics on synthetic data (interval coverage, paired verdicts, hypervolume against an
independent computation), the grid runner (resume, failures), the report; the trainer pieces it measures
(--update-norm against the reference loss, the disagreement monitor, the conciseness / diversity objectives).

Coverage tolerance: over N simulated datasets the number of intervals that contain the truth is
Binomial(N, c). Under H0 "c = 0.95" the observed coverage lies within 0.95 +- z * sqrt(0.95 * 0.05 / N) with
probability 1 - alpha; we take alpha = 0.001 (z = 3.29), so with the fixed simulation seeds a correct interval
fails this test with probability 0.001 per regime, and an interval 3 points off nominal at N = 2000 is caught
(the percentile bootstrap over 3 seeds covers ~0.80 in the first regime).
"""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from pama_ext.compare import stats as st

Z_ALPHA = 3.29  # two-sided alpha = 0.001


def tolerance(n: int, c: float = st.LEVEL) -> float:
    return Z_ALPHA * math.sqrt(c * (1 - c) / n)


def crossed_data(rng, S, P, sd_seed, sd_prompt, sd_resid, mean=0.0):
    return mean + rng.normal(0, sd_seed, (S, 1)) + rng.normal(0, sd_prompt, (1, P)) + rng.normal(0, sd_resid, (S, P))


# -------------------------------------------------------------------------------------------------
# intervals
# -------------------------------------------------------------------------------------------------
# regimes with a seed (or prompt) variance component, as in the study (seed sd of the means >= eval se)
REGIMES = [(3, 64, 1.0, 0.3, 1.0), (5, 64, 1.0, 1.0, 1.0), (3, 64, 0.0, 1.0, 1.0), (3, 80, 0.2, 0.05, 1.0),
           (10, 32, 0.3, 0.3, 1.0)]


@pytest.mark.parametrize("S,P,sa,sb,se", REGIMES)
def test_crossed_interval_coverage(S, P, sa, sb, se):
    rng = np.random.default_rng(1000 + S * P)
    N = 2000
    hits = sum(st.crossed_interval(crossed_data(rng, S, P, sa, sb, se, mean=0.7)).contains(0.7) for _ in range(N))
    assert abs(hits / N - st.LEVEL) <= tolerance(N), hits / N


def test_crossed_interval_without_seed_or_prompt_effects_is_conservative():
    # only residual noise: the interval is wider than needed (documented), never narrower
    rng = np.random.default_rng(7)
    N = 2000
    hits = sum(st.crossed_interval(crossed_data(rng, 3, 64, 0, 0, 1)).contains(0.0) for _ in range(N))
    assert hits / N >= st.LEVEL - tolerance(N)


def test_crossed_interval_one_value_per_seed_is_the_t_interval():
    from scipy import stats as sps

    x = np.array([0.3, 0.5, 0.9, 0.4])
    iv = st.crossed_interval(x)
    lo, hi = sps.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
    assert iv.lo == pytest.approx(lo) and iv.hi == pytest.approx(hi) and iv.df == len(x) - 1


def test_crossed_interval_variance_is_the_anova_estimate():
    rng = np.random.default_rng(3)
    X = crossed_data(rng, 4, 9, 1.0, 1.0, 0.5)
    S, P = X.shape
    # the same quantity by a different route: expected mean squares solved for the variance components
    gm = X.mean()
    ss_s = P * ((X.mean(1) - gm) ** 2).sum()
    ss_p = S * ((X.mean(0) - gm) ** 2).sum()
    ss_e = ((X - gm) ** 2).sum() - ss_s - ss_p
    ms_s, ms_p, ms_e = ss_s / (S - 1), ss_p / (P - 1), ss_e / ((S - 1) * (P - 1))
    var_a, var_b = (ms_s - ms_e) / P, (ms_p - ms_e) / S
    want = var_a / S + var_b / P + ms_e / (S * P)
    assert st.crossed_interval(X).se == pytest.approx(math.sqrt(want))


@pytest.mark.parametrize("bad, message", [
    (np.ones((1, 5)), "at least 2 seeds"),
    (np.array([[1.0, float("nan")], [1.0, 2.0]]), "non-finite"),
    (np.ones((2, 2, 2)), "expected a [seeds, prompts] matrix"),
])
def test_crossed_interval_bad_input(bad, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        st.crossed_interval(bad)


# -------------------------------------------------------------------------------------------------
# paired differences and verdicts
# -------------------------------------------------------------------------------------------------
def test_paired_difference_uses_the_pairing():
    # large shared seed and prompt effects, a small true improvement: the paired interval sees it, the two
    # unpaired intervals overlap
    rng = np.random.default_rng(11)
    S, P = 3, 80
    shared = crossed_data(rng, S, P, 1.0, 1.0, 0.0)
    base = shared + rng.normal(0, 0.2, (S, P))
    better = shared + 0.3 + rng.normal(0, 0.2, (S, P))
    d = st.paired_difference(better, base)
    assert st.verdict(d) == "better" and st.verdict(st.paired_difference(base, better)) == "worse"
    a, b = st.crossed_interval(better), st.crossed_interval(base)
    assert a.lo < b.hi  # unpaired: overlapping
    assert st.verdict(d, higher_is_better=False) == "worse"


def test_verdict_rates_under_the_null_and_an_effect():
    rng = np.random.default_rng(5)
    N, S, P = 1000, 3, 64
    null = [st.verdict(st.paired_difference(crossed_data(rng, S, P, 0.3, 0.3, 1.0),
                                            crossed_data(rng, S, P, 0.3, 0.3, 1.0))) for _ in range(N)]
    # no difference: "within noise" at the confidence level (both columns drawn from the same model)
    assert abs(null.count("within noise") / N - st.LEVEL) <= tolerance(N)
    assert abs(null.count("better") - null.count("worse")) <= Z_ALPHA * math.sqrt(N * (1 - st.LEVEL))
    big = [st.verdict(st.paired_difference(crossed_data(rng, S, P, 0.05, 0.05, 0.3, mean=1.0),
                                           crossed_data(rng, S, P, 0.05, 0.05, 0.3))) for _ in range(50)]
    assert big == ["better"] * 50


def test_paired_difference_shapes_must_pair():
    with pytest.raises(ValueError, match="baseline: shape"):
        st.paired_difference(np.zeros((3, 4)), np.zeros((3, 5)))


# -------------------------------------------------------------------------------------------------
# hypervolume
# -------------------------------------------------------------------------------------------------
def hv_inclusion_exclusion(points, ref):
    """Volume of the union of the boxes [ref, p] by inclusion-exclusion over every subset (independent of the
    sweep / slicing implementation)."""
    pts = [p for p in points if all(x > r for x, r in zip(p, ref))]
    total = 0.0
    for k in range(1, len(pts) + 1):
        for sub in itertools.combinations(pts, k):
            corner = np.min(np.array(sub), axis=0)
            total += (-1) ** (k + 1) * float(np.prod(np.clip(corner - np.array(ref), 0, None)))
    return total


@pytest.mark.parametrize("d", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", range(6))
def test_hypervolume_against_inclusion_exclusion(d, seed):
    rng = np.random.default_rng(seed * 10 + d)
    k = int(rng.integers(1, 8))
    pts = rng.uniform(-0.2, 1.0, (k, d))
    if seed % 3 == 0:  # duplicates and dominated points
        pts = np.vstack([pts, pts[:1], pts[:1] - 0.1])
    ref = rng.uniform(-0.3, 0.1, d)
    assert st.hypervolume(pts, ref) == pytest.approx(hv_inclusion_exclusion(pts, ref), rel=1e-12, abs=1e-12)


def test_hypervolume_known_fronts():
    assert st.hypervolume([[1, 1]], [0, 0]) == pytest.approx(1.0)
    # staircase 2-D front: 3 unit steps
    assert st.hypervolume([[1, 3], [2, 2], [3, 1]], [0, 0]) == pytest.approx(6.0)
    # points below the reference contribute nothing
    assert st.hypervolume([[-1, 5], [0.5, 0.5]], [0, 0]) == pytest.approx(0.25)


def test_hypervolume_interval_coverage():
    rng = np.random.default_rng(21)
    mu = np.array([[0.6, 0.3], [0.4, 0.5], [0.2, 0.6]])
    ref = [0.0, 0.0]
    truth = st.hypervolume(mu, ref)
    N, S, P = 500, 3, 64
    hits = 0
    for _ in range(N):
        data = [m[:, None, None] + rng.normal(0, 0.05, (2, S, 1)) + rng.normal(0, 0.3, (2, S, P)) for m in mu]
        hits += st.hypervolume_interval(data, ref).contains(truth)
    assert abs(hits / N - st.LEVEL) <= tolerance(N)


def test_hypervolume_interval_centre_and_errors():
    data = [np.full((2, 3, 4), 0.5) + np.arange(3)[None, :, None] * 0.01]
    iv = st.hypervolume_interval(data, [0.0, 0.0])
    assert iv.mean == pytest.approx(st.hypervolume([np.asarray(data[0]).mean((1, 2))], [0, 0]))
    assert iv.lo < iv.mean < iv.hi
    with pytest.raises(ValueError, match="ref: expected 2 values"):
        st.hypervolume_interval(data, [0.0])


# -------------------------------------------------------------------------------------------------
# matched KL
# -------------------------------------------------------------------------------------------------
def test_interpolate_at():
    assert st.interpolate_at([0, 2, 4], [0.0, 1.0, 3.0], 3.0) == pytest.approx(2.0)
    assert st.interpolate_at([0, 2, 4], [0.0, 1.0, 3.0], 2.0) == pytest.approx(1.0)
    assert st.interpolate_at([0, 2, 4], [0.0, 1.0, 3.0], 5.0) is None
    # the first crossing in training order
    assert st.interpolate_at([0, 4, 2, 6], [0.0, 4.0, 9.0, 9.0], 3.0) == pytest.approx(3.0)


def test_discordance():
    from pama_ext.compare.report import discordance

    x = np.arange(10.0)
    assert discordance(x, 2 * x) == 0.0
    assert discordance(x, -x) == 1.0
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=400), rng.normal(size=400)
    assert abs(discordance(a, b) - 0.5) < 0.05


# -------------------------------------------------------------------------------------------------
# the trainer pieces: --update-norm, the disagreement monitor, the objectives
# -------------------------------------------------------------------------------------------------
def _loss_inputs(n=2, B=5, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64)).requires_grad_()
    old = logp.detach() + 0.05 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp.detach() + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(n, B, T, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.25).to(torch.float64)
    mask[0] = 0  # an empty row
    return logp, old, adv, mask, ref


@pytest.mark.parametrize("kl_loss_coef", [0.0, 0.3])
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_update_norm_active_is_the_reference_loss_over_the_active_fraction(kl_loss_coef, granularity):
    from pama_ext import functional, reference
    from pama_ext.trainer.config import TrainConfig
    from pama_ext.trainer.ppo import PPOTrainer

    logp, old, adv, mask, ref = _loss_inputs()
    cfg = TrainConfig(method="pama", update_norm="active", kl_loss_coef=kl_loss_coef, granularity=granularity,
                      whiten="none").validate()
    tr = PPOTrainer.__new__(PPOTrainer)
    tr.cfg, tr.group, tr.prefs = cfg, None, torch.tensor(cfg.normalized_weights(), dtype=torch.float64)
    loss, m, _ = tr.policy_loss(logp, old, adv, mask, ref, None, whiten_in_op=False)
    kw = dict(eps_lo=cfg.cliprange, eps_hi=cfg.eps_hi, dual_clip=cfg.dual_clip, agg=cfg.agg, noon=True,
              whiten=False, method="pama", granularity=granularity)
    want_pg, rm = reference.pama_policy_loss(logp, old, adv, mask, ref, **kw)
    assert 0 < float(rm["active"]) < 1
    want = want_pg / rm["active"] + kl_loss_coef * functional.agg_loss(functional.k3_kl(logp, ref), mask, cfg.agg)
    torch.testing.assert_close(loss, want)
    g, = torch.autograd.grad(loss, logp)
    gw, = torch.autograd.grad(want, logp, retain_graph=True)
    torch.testing.assert_close(g, gw)
    if kl_loss_coef == 0:  # the same direction as the unnormalised loss, scaled by 1 / active
        g0, = torch.autograd.grad(want_pg, logp)
        torch.testing.assert_close(g, g0 / rm["active"])


def test_update_norm_needs_noon():
    from pama_ext.lm.config import ConfigError
    from pama_ext.trainer.config import TrainConfig

    with pytest.raises(ConfigError, match="--update-norm: only for Noon methods"):
        TrainConfig(method="morlhf", update_norm="active").validate()
    TrainConfig(method="linear", noon=True, update_norm="active").validate()


def test_disagreement_against_a_loop():
    from pama_ext.trainer.ppo import disagreement

    _, _, adv, mask, _ = _loss_inputs(n=3, seed=4)
    n, B, T = adv.shape
    cnt = tot = 0
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                signs = {bool(adv[i, b, t] > 0) for i in range(n)}
                cnt += len(signs) == 2
                tot += 1
    assert float(disagreement(adv, mask)) == pytest.approx(cnt / tot)
    assert float(disagreement(adv[:1], mask)) == 0.0


def test_conciseness_and_diversity_objectives():
    from pama_ext.lm.rewards import DIVERSITY_WORDS, ConcisenessReward, diversity_reward

    c = ConcisenessReward(10.0)
    assert c(["p"] * 3, ["", "12345", "x" * 30]).tolist() == [1.0, 0.5, 0.0]
    words = " ".join(f"w{chr(97 + i)}" for i in range(DIVERSITY_WORDS + 4))
    got = diversity_reward(["p"] * 3, ["", "Good good GOOD film.", words]).tolist()
    assert got == [0.0, pytest.approx(2 / DIVERSITY_WORDS), 1.0]


# -------------------------------------------------------------------------------------------------
# the runner and the report (a tiny grid on the test world)
# -------------------------------------------------------------------------------------------------
def test_parse_method():
    from pama_ext.compare.runner import parse_method
    from pama_ext.lm.config import ConfigError

    m = parse_method("morlhf:weights=0.8/0.2:lr=1e-3")
    assert m.method == "morlhf" and dict(m.overrides) == {"weights": [0.8, 0.2], "lr": 1e-3}
    assert m.family == "morlhf:lr=0.001" and m.weights == [0.8, 0.2]
    with pytest.raises(ConfigError, match="expected name:key=value"):
        parse_method("pama:bogus=1")


def test_build_grid_names_the_bad_method(world_cache):
    from pama_ext.compare.runner import build_grid
    from pama_ext.lm.config import ConfigError

    with pytest.raises(ConfigError, match="'morlhf:update_norm=active' in setting 'n2': --update-norm"):
        build_grid(["pama", "morlhf:update_norm=active"], ["n2"], [0], cache_dir=str(world_cache))
    with pytest.raises(ConfigError, match="--settings: unknown setting 'nope'"):
        build_grid(["pama"], ["nope"], [0], cache_dir=str(world_cache))


def test_grid_resume_report_and_plots(world_cache, tmp_path, monkeypatch):
    from pama_ext.compare import runner
    from pama_ext.compare.plots import plot_fronts, plot_kl_curves
    from pama_ext.compare.report import analyse, format_report

    tiny = dict(steps=2, batch_size=4, minibatch_size=2, ppo_epochs=1, max_new_tokens=6, eval_size=6,
                eval_batch_size=6, eval_every=1)
    methods = ["pama", "pama:update_norm=active", "morlhf:weights=0.7/0.3", "morlhf:weights=0.3/0.7"]
    specs = runner.build_grid(methods, ["n2"], [0, 1], tiny, cache_dir=str(world_cache))
    out = tmp_path / "cmp"
    r = runner.run_grid(specs, out, jobs=1, progress=False, log=lambda s: None)
    assert r == {"ran": 8, "skipped": 0, "failed": {}}
    assert not (specs[0].run_dir(out) / "checkpoint").exists()
    # resume: everything done is skipped; a run without its result (a crash) is run again, only it
    (specs[3].run_dir(out) / runner.RESULT).unlink()
    calls = []
    real = runner.run_one
    monkeypatch.setattr(runner, "run_one", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    r = runner.run_grid(specs, out, jobs=1, progress=False, log=lambda s: None)
    assert r == {"ran": 1, "skipped": 7, "failed": {}} and calls == [str(specs[3].run_dir(out))]
    # a changed configuration is not mistaken for a finished run
    specs2 = runner.build_grid(methods[:1], ["n2"], [0], dict(tiny, lr=1e-3), cache_dir=str(world_cache))
    assert not runner._result_matches(specs2[0].run_dir(out) / runner.RESULT, specs2[0], out)

    results = runner.load_results(specs, out)
    res = json.loads((specs[0].run_dir(out) / runner.RESULT).read_text())
    assert [e["step"] for e in res["evals"]] == [0, 1, 2]
    assert len(res["evals"][-1]["per_prompt"]["sentiment"]) == 6
    assert all("disagree" in m and len(m["pos"]) == 2 for m in res["monitor"])
    rep = analyse(results, baseline="morlhf:weights=0.7/0.3")
    s = rep["settings"]["n2"]
    assert s["seeds"] == [0, 1] and list(s["rows"]) == methods
    assert s["fronts"]["morlhf"]["labels"] == methods[2:]
    row = s["rows"]["pama"]
    assert row["diff"]["sentiment"]["verdict"] in st.VERDICTS
    assert "pama" not in s["rows"]["morlhf:weights=0.7/0.3"]["diff"]
    nadir = analyse(results, baseline="pama", hv_ref="nadir")["settings"]["n2"]
    for j, n in enumerate(s["objectives"]):
        worst = min(r["objectives"][n]["mean"] for r in s["rows"].values())
        assert nadir["hv_ref"][j] == pytest.approx(worst - 0.1)
    md = format_report(rep)
    assert "Paired differences vs `morlhf:weights=0.7/0.3`" in md
    assert ("Matched KL" in md) == (s["kl_star"] > 0)  # two tiny steps may not move the KL at all
    for fn in (plot_fronts, plot_kl_curves):
        p = fn("n2", s, str(tmp_path / f"{fn.__name__}.png"))
        assert p is None or (tmp_path / f"{fn.__name__}.png").stat().st_size > 1000


def test_grid_failure_is_reported_and_others_run(world_cache, tmp_path, monkeypatch):
    from pama_ext.compare import runner

    tiny = dict(steps=1, batch_size=4, minibatch_size=2, ppo_epochs=1, max_new_tokens=4, eval_size=4, eval_every=0)
    specs = runner.build_grid(["pama", "morlhf"], ["n2"], [0], tiny, cache_dir=str(world_cache))
    real = runner.run_one

    def flaky(cfg, run_dir, label, setting, keep=False):
        if label == "pama":
            raise RuntimeError("boom")
        return real(cfg, run_dir, label, setting, keep)

    monkeypatch.setattr(runner, "run_one", flaky)
    r = runner.run_grid(specs, tmp_path, jobs=1, progress=False, log=lambda s: None)
    assert r["ran"] == 1 and list(r["failed"]) == [str(specs[0].run_dir(tmp_path))]
    assert "RuntimeError: boom" in r["failed"][str(specs[0].run_dir(tmp_path))]
    assert (specs[1].run_dir(tmp_path) / runner.RESULT).is_file()


def test_grid_in_a_process_pool(world_cache, tmp_path):
    from pama_ext.compare import runner

    tiny = dict(steps=1, batch_size=4, minibatch_size=2, ppo_epochs=1, max_new_tokens=4, eval_size=4, eval_every=0)
    specs = runner.build_grid(["pama", "mgda-ub"], ["n3"], [0], tiny, cache_dir=str(world_cache))
    r = runner.run_grid(specs, tmp_path, jobs=2, progress=False, log=lambda s: None)
    assert r == {"ran": 2, "skipped": 0, "failed": {}}
    res = runner.load_results(specs, tmp_path)
    assert [x["label"] for x in res] == ["pama", "mgda-ub"] and res[0]["objectives"][2] == "diversity"
