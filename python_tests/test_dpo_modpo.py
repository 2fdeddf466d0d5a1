"""MODPO's first stage (``--modpo-margin labels``): a margin reward model per other objective, trained by DPO on
that objective's labels, whose implicit reward β·log π_r/π_ref is the margin of the second stage. Checked: the
trained model ranks held-out pairs of its objective better than chance on the tiny world; the second stage's
margin is exactly w_j·Δr_j of that model; 'auto' keeps judges where they exist; a label-only data set runs
modpo from the CLI; --resume takes the first stage's margins from the checkpoint instead of training again."""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("vaderSentiment")
pytest.importorskip("yaml")

from pama_ext.dpo.config import DPOConfig  # noqa: E402
from pama_testutils import dpo_config, dpo_policy, dpo_world  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:the cached tiny world:UserWarning")


def _cfg(world_cache, tmp_path, **kw):
    d = dict(batch_size=16, micro_batch_size=16, pool_prompts=60, responses_per_prompt=4, max_new_tokens=16,
             max_response_tokens=20, lr=2e-3, method="modpo", weights=[0.6, 0.4], modpo_margin="labels",
             modpo_margin_steps=15)
    d.update(kw)
    return dpo_config(world_cache, d.pop("output_dir", tmp_path / "run"), **d)


@pytest.fixture(scope="module")
def setup(world_cache, tmp_path_factory):
    return dpo_world(_cfg(world_cache, tmp_path_factory.mktemp("x")))


def test_margin_objectives_follow_the_option():
    c = DPOConfig(method="modpo", weights=[0.6, 0.4]).validate()
    assert (c.margin_objectives, c.margin_judged, c.margin_learned) == (["length"], ["length"], [])
    c = DPOConfig(method="modpo", weights=[0.6, 0.4], modpo_margin="labels").validate()
    assert (c.margin_judged, c.margin_learned, c.margin_steps) == ([], ["length"], c.steps)
    c = DPOConfig(data="pku:x", method="modpo", modpo_margin_steps=5).validate()  # label-only: auto learns
    assert (c.margin_judged, c.margin_learned, c.margin_steps) == ([], ["safe"], 5)
    assert DPOConfig(method="modpo", weights=[1.0, 0.0]).validate().margin_objectives == []


def test_margin_reward_model_ranks_heldout_pairs_of_its_objective(setup, world_cache, tmp_path):
    """The first stage's model for 'length', trained on 70 % of the pairs, orders the other 30 % (pairs it never
    saw, between the data set's responses -- where MODPO's second stage uses it) by its implicit reward better
    than chance; the reference scores exactly 0.5 (h = 0). (Held-out *prompts* are a harder test this test
    world, pretrained for 5 steps, does not pass reliably: docs/dpo.md, "modpo".)"""
    from pama_ext.dpo import methods as Mth

    world, judges, tok, ref, data = setup
    cfg = _cfg(world_cache, tmp_path)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(11)).tolist()
    k = int(0.3 * len(data))
    train, held = data.subset(sorted(perm[k:])), data.subset(sorted(perm[:k]))
    rm = Mth.train_margin_reward(cfg, "length", dpo_policy(world), ref, tok, train, torch.device("cpu"))
    rc = Mth.implicit_rewards(cfg, rm, ref, tok, held.prompts, held.chosen, "cpu")
    rr = Mth.implicit_rewards(cfg, rm, ref, tok, held.prompts, held.rejected, "cpu")
    lab = held.labels[held.objectives.index("length")]
    m = lab != 0
    n = int(m.sum())
    acc = float(((lab * (rc - rr))[m] > 0).float().mean())
    # one-sided binomial test against 0.5 at the 1 % level (normal approximation)
    assert n >= 50 and acc > 0.5 + 2.33 * 0.5 / math.sqrt(n), (acc, n)


def test_second_stage_consumes_the_margin_models(setup, world_cache, tmp_path):
    """The modpo trainer's margin is w_length·(r(chosen) − r(rejected)) of the first-stage model (trained on all of
    the run's pairs with a length label), and the loss is MODPO's with that margin."""
    from pama_ext.dpo import methods as Mth

    world, judges, tok, ref, data = setup
    cfg = _cfg(world_cache, tmp_path, modpo_margin_steps=3)
    cache: dict = {}
    tr = Mth.make_trainer(cfg, dpo_policy(world), ref, tok, data, judges, torch.device("cpu"), margin_cache=cache)
    assert tr.margin_info["length"]["source"] == "labels" and tr.margin_info["length"]["steps"] == 3
    rm = Mth.train_margin_reward(cfg, "length", dpo_policy(world), ref, tok, data, torch.device("cpu"))
    d = tr.data
    want = 0.4 * (Mth.implicit_rewards(cfg, rm, ref, tok, d.prompts, d.chosen, "cpu")
                  - Mth.implicit_rewards(cfg, rm, ref, tok, d.prompts, d.rejected, "cpu"))
    torch.testing.assert_close(tr.margin, want, rtol=1e-5, atol=1e-6)
    assert float(tr.margin.abs().max()) > 0
    # a second run of the sweep (another w) reuses the first stage
    calls = []
    orig = Mth.train_margin_reward
    try:
        Mth.train_margin_reward = lambda *a, **k: calls.append(1) or orig(*a, **k)
        tr2 = Mth.make_trainer(cfg.replace(weights=[0.3, 0.7]), dpo_policy(world), ref, tok, data, judges,
                               torch.device("cpu"), margin_cache=cache)
    finally:
        Mth.train_margin_reward = orig
    assert calls == []
    torch.testing.assert_close(tr2.margin, want / 0.4 * 0.7, rtol=1e-5, atol=1e-6)
    # and the judge margin stays the default on judged objectives
    tr3 = Mth.make_trainer(cfg.replace(modpo_margin="auto"), dpo_policy(world), ref, tok, data, judges,
                           torch.device("cpu"))
    assert tr3.margin_info == {"length": {"source": "judge"}}


def test_resume_takes_the_first_stage_from_the_checkpoint(world_cache, tmp_path, monkeypatch):
    from pama_ext.dpo import methods as Mth
    from pama_ext.dpo.train import train_dpo

    kw = dict(pool_prompts=6, batch_size=4, micro_batch_size=2, max_new_tokens=8, max_response_tokens=12,
              modpo_margin_steps=2)
    a, b = tmp_path / "a", tmp_path / "b"
    train_dpo(_cfg(world_cache, tmp_path, output_dir=str(a), steps=4, **kw))
    train_dpo(_cfg(world_cache, tmp_path, output_dir=str(b), steps=2, **kw))
    info = json.loads((b / "data.json").read_text())["modpo_margin"]
    assert info["length"]["source"] == "labels"

    def no_first_stage(*a, **k):
        raise AssertionError("--resume trained the margin reward model again")

    monkeypatch.setattr(Mth, "train_margin_reward", no_first_stage)
    train_dpo(_cfg(world_cache, tmp_path, output_dir=str(b), steps=4, resume=True, **kw))
    from safetensors.torch import load_file

    pa, pb = load_file(str(a / "checkpoint" / "model.safetensors")), load_file(str(b / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()


def test_label_only_modpo_runs_from_the_cli(world_cache, tmp_path, capsys):
    """PKU-style data (no judge at all): modpo trains the 'safe' margin model from the labels, then the 'helpful'
    target; evaluated by held-out pair accuracy."""
    from pama_ext.cli import main

    rows = []
    for i in range(12):
        a, b = f"Sure, here is how {i}.", f"No, I will not help with {i}, it is unsafe."
        rows.append({"prompt": f"Question {i}?", "response_0": a, "response_1": b, "is_response_0_safe": False,
                     "is_response_1_safe": True, "better_response_id": i % 2, "safer_response_id": 1})
    src = tmp_path / "pku.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    rc = main(["dpo", "--data", f"pku:{src}", "--method", "modpo", "--tiny-world-cache", world_cache, "--steps", "2",
               "--modpo-margin-steps", "2", "--batch-size", "4", "--max-response-tokens", "12", "--output-dir",
               str(out), "--no-progress", "--log-every", "0", "--no-plots", "--no-save-model"])
    assert rc == 0, capsys.readouterr().err
    info = json.loads((out / "data.json").read_text())
    assert info["modpo_margin"]["safe"]["source"] == "labels" and info["modpo_margin"]["safe"]["pairs"] > 0
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["pair_accuracy"]) == {"helpful", "safe"}
