"""Tests of the multi-objective PPO trainer (pama_ext.trainer) on a small tiny world.

Budgets are tiny (2-4 PPO steps, 4 responses, 6 new tokens): these tests check the machinery --
every method runs with finite metrics, checkpoints reload and generate, --resume is bitwise exact,
bad rewards and bad settings give clear errors, the hypervolume is exact -- not learning quality
(that is the demo's job).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import random
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("vaderSentiment")
pytest.importorskip("yaml")
pytest.importorskip("tqdm")

from pama_ext import ops  # noqa: E402
from pama_testutils import all_finite  # noqa: E402
from pama_ext.trainer import config as tconfig  # noqa: E402
from pama_ext.trainer.config import ConfigError, TrainConfig  # noqa: E402
from pama_ext.trainer.evaluate import hypervolume  # noqa: E402
from pama_ext.lm.rewards import LengthReward, RewardError, sentiment_reward  # noqa: E402
from pama_ext.lm.rollout import response_mask  # noqa: E402

METHODS = ["pama", "morlhf", "linear", "mgda-ub", "mgda"]

# the session world is deliberately small; the trainer's build_tiny_world call reuses it with a warning
pytestmark = pytest.mark.filterwarnings("ignore:the cached tiny world:UserWarning")


# -------------------------------------------------------------------------------------------------
# fixtures
# -------------------------------------------------------------------------------------------------
@pytest.fixture
def base_cfg(world_cache, tmp_path):
    def make(**kw):
        d = dict(model="tiny", tiny_world_cache=world_cache, steps=2, batch_size=4, minibatch_size=2, ppo_epochs=1,
                 max_new_tokens=6, eval_size=4, eval_batch_size=4, output_dir=str(tmp_path / "run"),
                 progress=False, log_every=0, plots=False, threads=None)
        d.update(kw)
        return TrainConfig(**d)
    return make


def _strip_time(rows):
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


# -------------------------------------------------------------------------------------------------
# configuration
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, message", [
    (dict(method="foo"), "--method: expected one of pama, morlhf, linear, mgda-ub, mgda; got 'foo'"),
    (dict(objectives=["sentiment", "bar"]), "--objectives: unknown objective 'bar'"),
    (dict(objectives=[]), "--objectives: expected at least one objective"),
    (dict(objectives=["py:onlymodule"]), "--objectives: 'py:onlymodule': expected py:<module>:<function>"),
    (dict(lr=-1e-4), "--lr: expected a positive finite number; got -0.0001"),
    (dict(lr=float("nan")), "--lr: expected a positive finite number"),
    (dict(steps=0), "--steps: expected a positive finite number; got 0"),
    (dict(batch_size=4, minibatch_size=8), "--minibatch-size: must be at most --batch-size (4); got 8"),
    (dict(weights=[1.0]), "--weights: expected 2 weights"),
    (dict(weights=[1.0, -1.0]), "--weights: expected non-negative finite weights"),
    (dict(granularity="word"), "--granularity: expected one of token, sequence, batch; got 'word'"),
    (dict(gamma=1.5), "--gamma: expected a number in [0, 1]; got 1.5"),
    (dict(hv_ref=[0.0]), "--hv-ref: expected 2 values"),
    (dict(noon=True, method="morlhf"), "--noon: only configurable for --method linear"),
    (dict(steps="many"), "--steps: expected an integer; got 'many'"),
    (dict(dual_clip=0.5), "--dual-clip: expected a number > 1"),
    (dict(train_prompts="/nonexistent/prompts.txt"), "--train-prompts: no such file"),
    (dict(resume=True, overwrite=True), "--resume: cannot be combined with --overwrite"),
])
def test_bad_config_values_name_the_flag(changes, message):
    with pytest.raises(ConfigError) as ei:
        TrainConfig(**changes).validate()
    assert str(ei.value).startswith(message), str(ei.value)


def test_good_config_coerces_and_round_trips(tmp_path):
    cfg = TrainConfig(steps="3", lr="1e-3", objectives="sentiment,length", weights="1,3", noon=None).validate()
    assert cfg.steps == 3 and cfg.lr == 1e-3 and cfg.objectives == ["sentiment", "length"]
    assert cfg.normalized_weights() == [0.25, 0.75]
    assert cfg.n_heads == 2 and cfg.replace(method="morlhf").n_heads == 1
    text = tconfig.dump_yaml(cfg)
    p = tmp_path / "c.yaml"
    p.write_text(text)
    assert tconfig.load_config(str(p)) == cfg


def test_yaml_file_and_flags(tmp_path):
    from pama_ext.trainer.train import add_train_subcommand, config_from_args

    p = tmp_path / "c.yaml"
    p.write_text("method: morlhf\nbatch-size: 8\nminibatch_size: 4\nobjectives: [sentiment, length]\n")
    ap = argparse.ArgumentParser()
    add_train_subcommand(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["train", "--config", str(p), "--batch-size", "16", "--no-adaptive-kl",
                          "--objectives", "length", "sentiment", "--hv-ref", "none"])
    cfg = config_from_args(args)
    assert (cfg.method, cfg.batch_size, cfg.minibatch_size) == ("morlhf", 16, 4)  # flag > file > default
    assert cfg.objectives == ["length", "sentiment"] and cfg.adaptive_kl is False and cfg.hv_ref is None
    p.write_text("methd: pama\n")
    with pytest.raises(ConfigError, match=r"unknown key 'methd'"):
        config_from_args(ap.parse_args(["train", "--config", str(p)]))


def test_cli_help_documents_every_flag(capsys):
    from pama_ext.trainer.train import add_train_subcommand

    ap = argparse.ArgumentParser(prog="pama-ext")
    add_train_subcommand(ap.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        ap.parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert tconfig.flag(f.name) in text, f.name
    assert "--config" in text and "(default: pama)" in text


def test_cli_bad_value_exits_with_clear_message(capsys):
    from pama_ext.trainer.train import add_train_subcommand

    ap = argparse.ArgumentParser(prog="pama-ext")
    add_train_subcommand(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["train", "--method", "foo"])
    assert args.func(args) == 2
    assert "--method: expected one of pama, morlhf, linear, mgda-ub, mgda; got 'foo'" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------
# rewards
# -------------------------------------------------------------------------------------------------
def test_builtin_rewards():
    s = sentiment_reward(["", ""], ["What a wonderful, brilliant film!", "A terrible, boring mess."])
    assert s.shape == (2,) and s[0] > 0.5 and s[1] < -0.5
    L = LengthReward(10.0, 0.0, 1.0)(["", "", ""], ["", "abcde", "x" * 50])
    assert L.tolist() == [0.0, 0.5, 1.0]


def _write_module(tmp_path, monkeypatch, name, body):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)


def test_reward_errors_name_the_objective(tmp_path, monkeypatch):
    _write_module(tmp_path, monkeypatch, "my_bad_rewards", """
        import torch
        def boom(prompts, responses):
            raise KeyError("no such thing")
        def wrong_shape(prompts, responses):
            return torch.zeros(len(responses), 2)
        def nan(prompts, responses):
            return [float("nan")] + [0.0] * (len(responses) - 1)
        def good(prompts, responses):
            return [float(len(r)) for r in responses]
    """)
    from pama_ext.lm.rewards import build_objectives

    cfg = TrainConfig(objectives=["py:my_bad_rewards:boom", "py:my_bad_rewards:wrong_shape", "py:my_bad_rewards:nan",
                                  "py:my_bad_rewards:good"]).validate()
    boom, shape, nan, good = build_objectives(cfg)
    with pytest.raises(RewardError, match=r"objective 'py:my_bad_rewards:boom': the reward function raised KeyError"):
        boom(["a", "b"], ["x", "y"])
    with pytest.raises(RewardError, match=r"objective 'py:my_bad_rewards:wrong_shape': expected a reward of shape "
                                          r"\[2\] \(one per response\); got shape \[2, 2\]"):
        shape(["a", "b"], ["x", "y"])
    with pytest.raises(RewardError, match=r"objective 'py:my_bad_rewards:nan': non-finite reward"):
        nan(["a", "b"], ["x", "y"])
    assert good(["a", "b"], ["x", "yy"]).tolist() == [1.0, 2.0]
    bad = TrainConfig(objectives=["py:no_such_module_xyz:f"]).validate()
    with pytest.raises(ConfigError, match=r"--objectives: 'py:no_such_module_xyz:f': cannot import module"):
        build_objectives(bad)
    with pytest.raises(ConfigError, match=r"has no callable 'missing'"):
        build_objectives(TrainConfig(objectives=["py:my_bad_rewards:missing"]).validate())


def test_failing_reward_in_training_names_the_objective(base_cfg, tmp_path, monkeypatch):
    _write_module(tmp_path, monkeypatch, "my_train_rewards", """
        def wrong(prompts, responses):
            return [0.0] * (len(responses) + 1)
    """)
    from pama_ext.trainer.train import train

    with pytest.raises(RewardError, match=r"objective 'py:my_train_rewards:wrong': expected a reward of shape \[4\]"):
        train(base_cfg(objectives=["sentiment", "py:my_train_rewards:wrong"]))


def test_hf_classifier_reward(world_cache, tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    from pama_ext.lm.rewards import build_objectives
    from pama_ext.tiny_world import world_path

    tok = AutoTokenizer.from_pretrained(str(world_path(world_cache)))
    torch.manual_seed(0)
    m = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                                 num_labels=2, pad_token_id=tok.pad_token_id))
    m.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    cfg = TrainConfig(objectives=[f"hf:{tmp_path / 'clf'}#1", f"hf:{tmp_path / 'clf'}#0:prob"]).validate()
    logit, prob = build_objectives(cfg)
    r = ["a great movie", "bad", "the plot was dull but the acting was great"]
    a, b = logit(["x"] * 3, r), prob(["x"] * 3, r)
    assert a.shape == (3,) and b.shape == (3,) and bool(((b > 0) & (b < 1)).all())
    with pytest.raises(ConfigError, match=r"label index 5 out of range"):
        build_objectives(TrainConfig(objectives=[f"hf:{tmp_path / 'clf'}#5"]).validate())


# -------------------------------------------------------------------------------------------------
# pieces of the step
# -------------------------------------------------------------------------------------------------
def test_response_mask_up_to_first_eos():
    resp = torch.tensor([[5, 6, 2, 0, 0], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0], [5, 2, 7, 2, 0]])
    m = response_mask(resp, [2])
    assert m.int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]


def test_batch_whitening_matches_the_fused_op():
    from pama_ext.trainer.ppo import masked_whiten

    g = torch.Generator().manual_seed(0)
    adv = torch.randn(2, 5, 7, generator=g)
    mask = torch.rand(5, 7, generator=g) > 0.3
    logp = -torch.rand(5, 7, generator=g)
    old = logp + 0.05 * torch.randn(5, 7, generator=g)
    for method in ("pama", "linear"):
        a, _ = ops.pama_policy_loss(logp, old, adv, mask, method=method, whiten=True)
        b, _ = ops.pama_policy_loss(logp, old, masked_whiten(adv, mask), mask, method=method, whiten=False)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adaptive_kl_controller():
    from pama_ext.trainer.ppo import AdaptiveKLController

    c = AdaptiveKLController(0.1, target=1.0, horizon=100)
    c.update(10.0, 10)  # far above target: +20% * 10/100
    assert c.value == pytest.approx(0.1 * 1.02)
    c.update(0.0, 10)
    assert c.value == pytest.approx(0.1 * 1.02 * 0.98)
    fixed = AdaptiveKLController(0.1, 1.0, 100, adaptive=False)
    fixed.update(10.0, 10)
    assert fixed.value == 0.1


# -------------------------------------------------------------------------------------------------
# hypervolume
# -------------------------------------------------------------------------------------------------
def test_hypervolume_hand_cases():
    assert hypervolume([[1.0]], [0.0]) == 1.0
    assert hypervolume([[2.0, 3.0]], [0.0, 0.0]) == 6.0
    # two boxes overlapping in [0,1]x[0,1]: 2*1 + 1*2 - 1 = 3
    assert hypervolume([[2.0, 1.0], [1.0, 2.0]], [0.0, 0.0]) == 3.0
    # a dominated point and a duplicate change nothing
    assert hypervolume([[2.0, 1.0], [1.0, 2.0], [0.5, 0.5], [1.0, 2.0]], [0.0, 0.0]) == 3.0
    # points that do not strictly dominate the reference are ignored
    assert hypervolume([[-1.0, 5.0], [1.0, 0.0]], [0.0, 0.0]) == 0.0
    assert hypervolume([], [0.0, 0.0]) == 0.0
    assert hypervolume([[1.0, 1.0, 1.0]], [0.0, 0.0, 0.0]) == 1.0
    # three unit-overlapping boxes in 3-D by inclusion-exclusion: 3*2 - 3*1 + 1 = 4
    pts = [[2.0, 1.0, 1.0], [1.0, 2.0, 1.0], [1.0, 1.0, 2.0]]
    assert hypervolume(pts, [0.0, 0.0, 0.0]) == 4.0
    assert hypervolume([[0.5, 0.25]], [-0.5, -0.25]) == 0.5
    with pytest.raises(ValueError):
        hypervolume([[1.0, 2.0]], [0.0, 0.0, 0.0])


def _hv_brute(points, ref):
    """Exact hypervolume by inclusion-exclusion over all subsets (the box intersection is the min)."""
    total = 0.0
    pts = [p for p in points if all(x > r for x, r in zip(p, ref))]
    for k in range(1, len(pts) + 1):
        for sub in itertools.combinations(pts, k):
            corner = [min(c) for c in zip(*sub)]
            total += (-1) ** (k + 1) * math.prod(c - r for c, r in zip(corner, ref))
    return total


@pytest.mark.parametrize("d", [2, 3, 4])
def test_hypervolume_matches_inclusion_exclusion_and_monte_carlo(d):
    rng = random.Random(d)
    for _ in range(20):
        pts = [[rng.uniform(-0.2, 1.0) for _ in range(d)] for _ in range(rng.randint(1, 7))]
        ref = [0.0] * d
        assert hypervolume(pts, ref) == pytest.approx(_hv_brute(pts, ref), rel=1e-9, abs=1e-12)
    # Monte Carlo in the unit box
    g = torch.Generator().manual_seed(d)
    pts = [[rng.uniform(0.1, 1.0) for _ in range(d)] for _ in range(6)]
    u = torch.rand(400_000, d, generator=g, dtype=torch.float64)
    P = torch.tensor(pts, dtype=torch.float64)
    inside = (u[:, None, :] <= P[None]).all(-1).any(-1).double()
    mc, se = inside.mean().item(), inside.std().item() / math.sqrt(u.shape[0])
    assert abs(hypervolume(pts, [0.0] * d) - mc) < 5 * se + 1e-9


# -------------------------------------------------------------------------------------------------
# training runs
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, extra", [
    ("pama", {}),
    ("pama", {"granularity": "sequence", "whiten": "minibatch"}),
    ("pama", {"weights": [0.8, 0.2], "ratio_to": "ref"}),  # issue 14: steered PAMA, the ratio to pi_ref
    ("pama", {"granularity": "batch", "noon_order": "noon-first"}),
    ("morlhf", {"weights": [0.3, 0.7]}),
    ("linear", {"noon": True}),
    ("mgda-ub", {}),
    ("mgda", {"kl_loss_coef": 0.1}),
])
def test_every_method_runs_with_finite_metrics(base_cfg, method, extra):
    from pama_ext.trainer.train import train

    r = train(base_cfg(method=method, **extra))
    assert len(r["metrics"]) == 2
    n_w = 2
    for m in r["metrics"]:
        assert all_finite(m), m
        assert m["skipped"] == 0 and m["updates"] == 2
        assert len(m["weights"]) == n_w and abs(sum(m["weights"]) - 1) < 1e-4, m["weights"]
        assert len(m["head_loss"]) == (1 if method == "morlhf" else 2)
        assert set(m["rewards"]) == {"sentiment", "length"}
    assert all_finite(r["final_eval"]) and all_finite(r["hypervolume"])
    out = Path(r["output_dir"])
    for f in ("config.yaml", "metrics.jsonl", "eval.jsonl", "final.md", "final.json", "samples/step_000000.jsonl",
              "samples/step_000002.jsonl", "checkpoint/config.json", "checkpoint/value_heads.pt",
              "checkpoint/trainer_state.pt", "checkpoint/tokenizer_config.json"):
        assert (out / f).is_file(), f
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert not list(out.glob(".*tmp*")), "temporary files left behind"


def test_checkpoint_reloads_and_generates(base_cfg):
    from pama_ext.lm.rollout import GenSettings, decode, generate_responses, tokenize_prompts
    from pama_ext.trainer.train import load_checkpoint, train

    r = train(base_cfg(plots=True, eval_every=1, steps=2))
    out = Path(r["output_dir"])
    assert (out / "rewards.png").is_file() and (out / "pareto.png").is_file()
    assert [e["step"] for e in r["evals"]] == [0, 1, 2]
    policy, tok, info = load_checkpoint(out)
    assert info["step"] == 2 and policy.n_heads == 2
    assert bool(policy.value_heads.weight.abs().sum() > 0)  # trained (zero-initialised)
    ids, am = tokenize_prompts(tok, ["This movie", "The plot was"], 16, "cpu")
    resp, mask = generate_responses(policy.lm, tok, ids, am, GenSettings(max_new_tokens=5), seed=0)
    texts = decode(tok, resp, mask)
    assert len(texts) == 2 and resp.shape[0] == 2 and bool(mask[:, 0].all())
    cfg = tconfig.load_config(str(out / "config.yaml"))
    assert cfg.steps == 2 and cfg.method == "pama"


def test_resume_continues_bitwise_identically(base_cfg, tmp_path):
    from safetensors.torch import load_file

    from pama_ext.trainer.train import train

    common = dict(steps=4, eval_every=3, ppo_epochs=2, batch_size=4, minibatch_size=2)
    a = train(base_cfg(output_dir=str(tmp_path / "straight"), **common))
    train(base_cfg(output_dir=str(tmp_path / "resumed"), **dict(common, steps=2)))
    b = train(base_cfg(output_dir=str(tmp_path / "resumed"), resume=True, **common))
    assert _strip_time(a["metrics"]) == _strip_time(b["metrics"])
    assert [e["step"] for e in b["evals"]] == [0, 2, 3, 4]
    assert a["final_eval"] == b["final_eval"]
    wa = load_file(str(tmp_path / "straight" / "checkpoint" / "model.safetensors"))
    wb = load_file(str(tmp_path / "resumed" / "checkpoint" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ha = torch.load(tmp_path / "straight" / "checkpoint" / "value_heads.pt")
    hb = torch.load(tmp_path / "resumed" / "checkpoint" / "value_heads.pt")
    assert all(torch.equal(ha[k], hb[k]) for k in ha)
    sa = torch.load(tmp_path / "straight" / "checkpoint" / "trainer_state.pt", weights_only=True)
    sb = torch.load(tmp_path / "resumed" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert sa["trainer"]["kl_ctl"] == sb["trainer"]["kl_ctl"]
    for (ka, va), (kb, vb) in zip(sa["trainer"]["optimizer"]["state"].items(),
                                  sb["trainer"]["optimizer"]["state"].items()):
        assert all(torch.equal(va[x], vb[x]) for x in va)
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2, 3, 4]


def test_output_dir_guard_and_resume_errors(base_cfg, tmp_path):
    from pama_ext.trainer.train import train

    with pytest.raises(ConfigError, match=r"--resume: no checkpoint in"):
        train(base_cfg(output_dir=str(tmp_path / "empty"), resume=True))
    train(base_cfg(output_dir=str(tmp_path / "r"), steps=1))
    with pytest.raises(ConfigError, match=r"--output-dir: .* already holds a run; pass --resume"):
        train(base_cfg(output_dir=str(tmp_path / "r"), steps=1))
    with pytest.raises(ConfigError, match=r"--method: the run in .* was made with 'pama'; got 'morlhf'"):
        train(base_cfg(output_dir=str(tmp_path / "r"), steps=2, method="morlhf", resume=True))
    r = train(base_cfg(output_dir=str(tmp_path / "r"), steps=1, overwrite=True))
    assert len(r["metrics"]) == 1


@pytest.mark.parametrize("fused_linear", [False, True])
def test_non_finite_loss_skips_the_update(base_cfg, monkeypatch, fused_linear):
    """The first update's loss made NaN (the unfused loss op, or the fused output-layer loss of the
    default --fused-linear path): that update is skipped, the next one runs."""
    from pama_ext.trainer import ppo
    from pama_ext.trainer.train import train

    calls = {"n": 0}

    def poisoned(real):
        def fn(*args, **kw):
            calls["n"] += 1
            loss, m = real(*args, **kw)
            if calls["n"] == 1:
                loss = loss * float("nan")
            return loss, m

        return fn

    if fused_linear:
        monkeypatch.setattr(ppo, "fused_linear_policy_loss", poisoned(ppo.fused_linear_policy_loss))
    else:
        class FakeOps:
            pama_policy_loss = staticmethod(poisoned(ops.pama_policy_loss))

            def __getattr__(self, name):
                return getattr(ops, name)

        monkeypatch.setattr(ppo, "ops", FakeOps())
    with pytest.warns(RuntimeWarning, match=r"non-finite loss .* skipped"):
        r = train(base_cfg(steps=2, fused_linear=fused_linear))
    assert calls["n"] > 0
    assert [m["skipped"] for m in r["metrics"]] == [1, 0]
    assert r["metrics"][-1]["skipped_total"] == 1 and r["skipped_updates"] == 1
    from safetensors.torch import load_file

    w = load_file(str(Path(r["output_dir"]) / "checkpoint" / "model.safetensors"))
    assert all(bool(torch.isfinite(v).all()) for v in w.values())
