"""Tests of PamaGRPOTrainer (pama_ext.integrations.trl) with the real ``trl`` package on the tiny world.

Tiny budgets (4 completions of at most 5 tokens, 2 steps): these check the machinery -- the
per-objective advantages are TRL's group normalisation applied per reward function, the default
path reproduces TRL's own GRPO loss and gradient for every supported loss type, training runs and
logs the PAMA metrics -- not learning quality.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("datasets")
pytest.importorskip("accelerate")
trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from pama_ext.integrations.trl import PamaGRPOTrainer, group_normalized_advantages  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:the cached tiny world:UserWarning")

NUM_GEN = 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small tiny world (the trainer tests' size) in a module cache."""
    from pama_ext.trainer import tiny_world as tw

    cache = tmp_path_factory.mktemp("pama_trl_cache")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tw.build_tiny_world(cache_dir=cache, n_reviews=500, train_steps=5, progress=False,
                                   config=tw.TinyWorldConfig(n_layer=2, n_embd=64, n_head=2))


def chars_reward(completions, **kwargs):
    return [len(c) / 10.0 for c in completions]


def vowel_reward(completions, **kwargs):
    return [sum(ch in "aeiou" for ch in c) / max(1, len(c)) for c in completions]


def make_trainer(world, tmp_path, reward_funcs, *, loss_type="grpo", beta=0.0, grad_accum=1, max_steps=2, **pama):
    torch.manual_seed(0)
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=NUM_GEN,
        max_completion_length=5, max_steps=max_steps, gradient_accumulation_steps=grad_accum, logging_steps=1,
        report_to="none", use_cpu=True, save_strategy="no", learning_rate=1e-2, seed=0, loss_type=loss_type,
        beta=beta, use_bias_correction_kl=False,
    )
    ds = Dataset.from_dict({"prompt": world.train_prompts[:8]})
    return PamaGRPOTrainer(model=world.load_model(), reward_funcs=reward_funcs, args=args, train_dataset=ds,
                           processing_class=world.load_tokenizer(), **pama)


def generation_batch(world, trainer, n_prompts=2):
    trainer.model.train()
    prompts = world.train_prompts[:n_prompts]
    return trainer._generate_and_score_completions([{"prompt": p} for p in prompts for _ in range(NUM_GEN)])


# ------------------------------------------------------------------------------------------------
def grpo_loop(rewards, k, scale):
    """TRL's documented group normalisation for one reward column (NaN ignored, std unbiased, eps 1e-4)."""
    out = torch.zeros_like(rewards)
    valid = ~torch.isnan(rewards)
    batch_std = rewards[valid].std() if scale == "batch" else None
    for start in range(0, len(rewards), k):
        r = rewards[start : start + k]
        v = r[~torch.isnan(r)]
        a = r - v.mean()
        if scale == "group":
            a = a / (v.std() + 1e-4)
        elif scale == "batch":
            a = a / (batch_std + 1e-4)
        out[start : start + k] = torch.nan_to_num(a, nan=0.0)
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_normalized_advantages(scale):
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(12, 3, generator=g, dtype=torch.float64)
    rewards[4, 1] = float("nan")  # a reward function returned None for this completion
    adv = group_normalized_advantages(rewards, 3, scale)
    for i in range(3):
        torch.testing.assert_close(adv[:, i], grpo_loop(rewards[:, i], 3, scale))
    assert adv[4, 1] == 0
    with pytest.raises(ValueError, match="num_generations"):
        group_normalized_advantages(rewards, 5)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_normalized_advantages(rewards, 3, "global")


def test_per_objective_advantages(world, tmp_path):
    trainer = make_trainer(world, tmp_path, [chars_reward, vowel_reward])
    out = generation_batch(world, trainer)
    obj = out["objective_advantages"]
    rewards = trainer._pama_rewards
    assert obj.shape == (2 * NUM_GEN, 2) and rewards.shape == (2 * NUM_GEN, 2)
    for i in range(2):
        torch.testing.assert_close(obj[:, i], grpo_loop(rewards[:, i], NUM_GEN, "group"))
    # the rewards are the reward functions' values on the generated completions
    texts = trainer.processing_class.batch_decode(out["completion_ids"], skip_special_tokens=True)
    torch.testing.assert_close(rewards[:, 0], torch.tensor(chars_reward(texts)), rtol=1e-6, atol=1e-6)


def test_one_objective_matches_trl_advantages(world, tmp_path):
    trainer = make_trainer(world, tmp_path, [chars_reward])
    out = generation_batch(world, trainer, n_prompts=3)
    torch.testing.assert_close(out["objective_advantages"][:, 0], out["advantages"], rtol=1e-5, atol=1e-6)


def test_objective_advantages_follow_the_batch_split(world, tmp_path):
    """TRL shuffles and splits a generation batch over accumulation steps; the objective advantages
    must stay with their completions (one objective: they equal TRL's own advantages row by row)."""
    trainer = make_trainer(world, tmp_path, [chars_reward], grad_accum=2, max_steps=1)
    seen = []
    inner = trainer._compute_loss

    def checked(model, inputs):
        seen.append((inputs["objective_advantages"][:, 0].clone(), inputs["advantages"].clone()))
        return inner(model, inputs)

    trainer._compute_loss = checked
    trainer.train()
    assert len(seen) == 2
    assert any(bool((theirs != 0).any()) for _, theirs in seen)
    for ours, theirs in seen:
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type,beta,grad_accum", [
    ("grpo", 0.0, 1), ("bnpo", 0.0, 2), ("dr_grpo", 0.0, 1), ("dapo", 0.0, 2), ("grpo", 0.1, 1),
])
def test_default_path_is_trl_grpo_loss(world, tmp_path, loss_type, beta, grad_accum):
    """SPEC §9 through TRL: one reward function, linear, no Noon, no whitening = TRL's GRPO loss."""
    trainer = make_trainer(world, tmp_path, [chars_reward], loss_type=loss_type, beta=beta, grad_accum=grad_accum,
                           method="linear", noon=False, whiten=False)
    trainer.current_gradient_accumulation_steps = grad_accum
    inputs = generation_batch(world, trainer)
    # move the rollout policy away from the current one so that ratios differ from 1 and clipping happens
    g = torch.Generator().manual_seed(1)
    mask = inputs["completion_mask"]
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        am = torch.cat([inputs["prompt_mask"], mask], 1)
        logp, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, am, mask.shape[1])
    inputs["old_per_token_logps"] = logp + 0.3 * torch.randn(logp.shape, generator=g)
    assert bool((inputs["advantages"] != 0).any())

    params = [p for p in trainer.model.parameters() if p.requires_grad]
    trainer.model.zero_grad()
    ours = trainer._compute_loss(trainer.model, inputs)
    ours.backward()
    g_ours = [p.grad.clone() for p in params]
    trainer.model.zero_grad()
    theirs = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    theirs.backward()
    g_theirs = [p.grad.clone() for p in params]

    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    num = sum(float((a - b).abs().max()) for a, b in zip(g_ours, g_theirs))
    scale = max(float(b.abs().max()) for b in g_theirs)
    assert scale > 0 and num <= 1e-4 * scale + 1e-7


@pytest.mark.parametrize("method,granularity,grad_accum", [("pama", "token", 1), ("linear", "token", 1),
                                                           ("pama", "sequence", 2)])
def test_training_runs_and_logs(world, tmp_path, method, granularity, grad_accum):
    """Two optimizer steps; with gradient accumulation TRL splits and shuffles the generation batch,
    objective advantages included."""
    trainer = make_trainer(world, tmp_path, [chars_reward, vowel_reward], method=method, granularity=granularity,
                           grad_accum=grad_accum)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        for key in ("pama/weights/chars_reward", "pama/weights/vowel_reward", "pama/active", "entropy",
                    "clip_ratio/region_mean"):
            assert key in h and math.isfinite(h[key]), key
        w = (h["pama/weights/chars_reward"], h["pama/weights/vowel_reward"])
        if method == "linear":  # linear uses GRPOConfig's reward_weights (default 1 each), as TRL's sum does
            assert w == (1.0, 1.0)
        else:  # a point of the simplex
            assert math.isclose(sum(w), 1.0, rel_tol=1e-5) and min(w) >= 0
        assert math.isfinite(h["loss"])
    if method == "linear":  # with continuous rewards some token always has a positive combined advantage
        assert any(h["grad_norm"] > 0 for h in logs)
        assert any(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.model.parameters()))


def test_unsupported_settings(world, tmp_path):
    with pytest.raises(ValueError, match="loss_type='sapo'"):
        make_trainer(world, tmp_path, [chars_reward], loss_type="sapo")
    with pytest.raises(ValueError, match="granularity"):
        make_trainer(world, tmp_path, [chars_reward], granularity="episode")
    with pytest.raises(ValueError, match="prefs"):
        make_trainer(world, tmp_path, [chars_reward, vowel_reward], method="linear", prefs=[1.0, 0.0, 0.0])


def test_doc_snippet_trl(world, tmp_path, monkeypatch):
    """docs/integrations.md's TRL snippet runs as written (on the module's tiny world, in a temp dir)."""
    from test_integrations import doc_snippet

    monkeypatch.setenv("PAMA_EXT_CACHE", str(world.path.parent))
    monkeypatch.chdir(tmp_path)
    scope = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(doc_snippet("trl"), "docs/integrations.md (trl)", "exec"), scope)
    assert scope["trainer"].state.global_step == 2
    assert math.isfinite(scope["trainer"].state.log_history[-2]["pama/weights/length_reward"])
