"""verl's own trainer-side code with pama, on CPU: the route of docs/integrations.md (verl recipe).

reward manager ``"pama_multi"`` (built by verl's ``load_reward_manager`` from verl's registry, the
reward function loaded from a file as ``reward.custom_reward_function`` does) -> verl's
``assemble_rm_scores`` / ``extract_reward`` -> (optionally) verl's ``apply_kl_penalty`` -> verl's
``ray_trainer.compute_advantage`` with ``adv_estimator="pama_grpo"`` -> verl's
``ray_trainer.compute_data_metrics`` -> verl's padding removal and micro-batching
(``left_right_2_no_padding``, ``prepare_micro_batches``) -> verl's actor loss ``ppo_loss`` with
``loss_mode="pama"`` on the log-probs of a tiny GPT-2 (the tiny world's tokenizer and model code) ->
backward. Only the Ray actors, the rollout engine and FSDP are left out (they need a Ray cluster and,
for the rollout, vLLM / SGLang on a GPU).

Needs verl and its trainer dependencies (``make verl-deps``; ``make test-verl`` runs this file);
skipped without them unless ``PAMA_EXT_REQUIRE_VERL=1``, which turns the skip into a failure.
"""
from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest
import torch

from pama_ext.integrations import verl as pverl

if not pverl.VERL_AVAILABLE or pverl.TRAINER_HOOKS_ERROR is not None:
    _why = pverl.VERL_IMPORT_ERROR or pverl.TRAINER_HOOKS_ERROR
    if os.environ.get("PAMA_EXT_REQUIRE_VERL") == "1":
        raise RuntimeError(f"PAMA_EXT_REQUIRE_VERL=1 but verl's trainer stack cannot be imported: {_why!r}")
    pytest.skip(f"verl's trainer stack cannot be imported here ({_why!r}); run `make test-verl`",
                allow_module_level=True)

from omegaconf import OmegaConf  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.config import AlgoConfig  # noqa: E402
from verl.trainer.ppo import core_algos, ray_trainer  # noqa: E402
from verl.trainer.ppo.reward import extract_reward, load_reward_manager  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass  # noqa: E402
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402
from verl.workers.engine.utils import prepare_micro_batches  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding  # noqa: E402

from pama_ext import ops  # noqa: E402
from pama_ext.integrations import verl_reward  # noqa: E402
from pama_ext import tiny_world as tw  # noqa: E402

KEYS = ["length", "positive"]
REWARD_FN = textwrap.dedent('''
    def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
        words = solution_str.split()
        return {"length": len(words) / 8.0, "positive": float(ground_truth in words), "unused": 1.0}
''')


@pytest.fixture(scope="module")
def world():
    """The tiny world's tokenizer (trained on its reviews) and a one-layer tiny GPT-2 (untrained)."""
    tok = tw.build_tokenizer(tw.generate_reviews(300, seed=1))
    model = tw.make_model(tw.TinyWorldConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64), tok)
    return tok, model


def make_batch(tok, B=8, P=6, R=7, seed=0):
    """A padded verl rollout batch: prompts left-padded, responses right-padded, 2 responses per prompt."""
    g = torch.Generator().manual_seed(seed)
    words = [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    plain = torch.tensor([i for i, w in enumerate(words) if w.isalpha() and not w.startswith("<")])
    prompts = torch.full((B, P), tok.pad_token_id)
    responses = torch.full((B, R), tok.pad_token_id)
    p_mask = torch.zeros(B, P, dtype=torch.long)
    r_mask = torch.zeros(B, R, dtype=torch.long)
    for b in range(B):
        lp = int(torch.randint(2, P + 1, (1,), generator=g))
        lr = R if b % 3 == 0 else int(torch.randint(1, R, (1,), generator=g))
        prompts[b, P - lp:] = plain[torch.randint(len(plain), (lp,), generator=g)]
        responses[b, :lr] = plain[torch.randint(len(plain), (lr,), generator=g)]
        p_mask[b, P - lp:] = 1
        r_mask[b, :lr] = 1
    attention_mask = torch.cat([p_mask, r_mask], -1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    # the word each prompt's responses are rewarded for: a word of the first response of the group
    truth = [tok.decode(responses[b - b % 2, :1]) for b in range(B)]
    return DataProto.from_dict(
        tensors={"prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], -1),
                 "attention_mask": attention_mask, "position_ids": position_ids, "response_mask": r_mask},
        non_tensors={"uid": np.array([f"prompt-{b // 2}" for b in range(B)], dtype=object),
                     "data_source": np.array(["tiny_world"] * B, dtype=object),
                     "reward_model": np.array([{"ground_truth": t} for t in truth], dtype=object)},
    )


def recipe():
    """The verl recipe of docs/integrations.md: its environment variables and its Hydra overrides."""
    import pathlib
    import re
    import shlex

    doc = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "integrations.md").read_text()
    blocks = re.findall(r"<!-- recipe: verl -->\s*```bash\n(.*?)```", doc, re.S)
    assert len(blocks) == 1, "docs/integrations.md needs exactly one verl recipe"
    env, overrides = {}, []
    for word in shlex.split(blocks[0].replace("\\\n", " "), comments=True):
        if "=" in word and word.split("=", 1)[0].isupper():
            env.update([word.split("=", 1)])
        elif "=" in word:
            overrides.append(word)
    return env, overrides


def trainer_config(tmp_path, *extra):
    """verl's own Hydra config (ppo_trainer.yaml) composed with the recipe's overrides, the reward
    function written to a file the way the recipe's user has it."""
    import verl
    from hydra import compose, initialize_config_dir

    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD_FN)
    _, overrides = recipe()
    overrides = [o if not o.startswith("reward.custom_reward_function.path=") else
                 f"reward.custom_reward_function.path={path}" for o in overrides]
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides + list(extra))


def test_recipe_is_what_the_test_runs(tmp_path, monkeypatch):
    env, overrides = recipe()
    assert env["VERL_USE_EXTERNAL_MODULES"] == "pama_ext.integrations.verl"
    saved = pverl.options()
    try:
        monkeypatch.setenv("PAMA_EXT_VERL_OPTIONS", env["PAMA_EXT_VERL_OPTIONS"])
        assert pverl.configure_from_env().method == "pama"
    finally:
        pverl._OPTIONS = saved  # noqa: SLF001
    cfg = trainer_config(tmp_path)
    assert list(cfg.algorithm.gdpo_reward_keys) == KEYS
    assert (cfg.algorithm.adv_estimator, cfg.reward.reward_manager.name) == ("pama_grpo", "pama_multi")
    assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == "pama" and cfg.trainer.use_v1 is False


def score_batch(batch, config, tok):
    """What verl's reward loop does with a reward manager: run_single per response, then rm_scores."""
    manager = load_reward_manager(config, tok)
    assert isinstance(manager, verl_reward.PamaMultiObjectiveRewardManager)
    outs = manager.loop.run_until_complete(
        _gather([manager.run_single(batch[i:i + 1]) for i in range(len(batch))]))
    rm_scores = type(manager).assemble_rm_scores(batch, [o["reward_score"] for o in outs])
    extra_keys = list(outs[0]["reward_extra_info"])
    batch.batch["rm_scores"] = rm_scores
    batch.meta_info["reward_extra_keys"] = extra_keys
    batch.non_tensor_batch.update({k: np.array([o["reward_extra_info"][k] for o in outs]) for k in extra_keys})
    return outs


async def _gather(coros):
    import asyncio

    return await asyncio.gather(*coros)


def log_probs(model, td):
    """Per-token log-probs of a no-padding TensorDict, in verl's layout: one value per valid token of
    each sequence, the value at position j being log p(token j+1) (the model output ppo_loss expects)."""
    out = []
    for ids in td["input_ids"].unbind():
        logits = model(input_ids=ids[None]).logits[0].float()
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[1:, None])[:, 0]
        out.append(torch.cat([lp, lp.new_zeros(1)]))
    return torch.cat(out)


def actor_config(loss_mode, agg="token-mean"):
    return ActorConfig(strategy="fsdp", rollout_n=2, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=4,
                       clip_ratio_high=0.28, loss_agg_mode=agg, use_kl_loss=True, kl_loss_coef=0.01,
                       kl_loss_type="low_var_kl", policy_loss=PolicyLossConfig(loss_mode=loss_mode))


def actor_step(model, batch, cfg, micro=4):
    """verl's actor update for one mini-batch: no-padding, micro-batches, ppo_loss, backward."""
    td = left_right_2_no_padding(batch.to_tensordict())
    tu.assign_non_tensor(td, use_dynamic_bsz=False, micro_batch_size_per_gpu=micro, dp_size=1,
                         batch_num_tokens=int(batch.batch["response_mask"].sum()), global_batch_size=len(batch))
    model.zero_grad()
    total, metrics = 0.0, []
    micro_batches, _ = prepare_micro_batches(td)
    for mb in micro_batches:
        loss, m = ppo_loss(cfg, {"log_probs": log_probs(model, mb)}, mb)
        loss.backward()
        total = total + loss.detach()
        metrics.append(m)
    grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    return total, grads, metrics


def metric_value(m):
    """A number from what ppo_loss reports (verl's ``Metric`` wrapper, or a plain value)."""
    return float(m.aggregate()) if hasattr(m, "aggregate") else float(m)


@pytest.fixture
def pama_options():
    saved = pverl.options()
    pverl.configure(method="pama", granularity="token", noon=True, whiten=False, prefs=None, group=None)
    yield
    pverl._OPTIONS = saved  # noqa: SLF001


@pytest.mark.parametrize("kl_in_reward", [False, True])
def test_verl_trainer_route_multi_objective(tmp_path, world, pama_options, kl_in_reward):
    tok, model = world
    batch = make_batch(tok)
    B, T = batch.batch["responses"].shape
    config = trainer_config(tmp_path, f"algorithm.use_kl_in_reward={kl_in_reward}",
                            "algorithm.kl_ctrl.kl_coef=0.05")

    # 1. rewards: the registered multi-objective manager, as verl's reward loop runs it
    outs = score_batch(batch, config, tok)
    reward_tensor, extra = extract_reward(batch)  # verl's trainer reads the rewards this way
    per_obj = np.stack([extra[k] for k in KEYS], -1).astype(np.float32)
    assert reward_tensor.shape == (B, T) and per_obj.shape == (B, 2)
    torch.testing.assert_close(reward_tensor.sum(-1), torch.as_tensor(per_obj.sum(-1)))
    assert all(set(o["reward_extra_info"]) == set(KEYS) for o in outs)
    batch.batch["token_level_scores"] = reward_tensor
    with torch.no_grad():
        lp = log_probs(model, left_right_2_no_padding(batch.to_tensordict()))
        lp = no_padding_2_padding(lp, left_right_2_no_padding(batch.to_tensordict()))
    g = torch.Generator().manual_seed(3)
    batch.batch["old_log_probs"] = lp + 0.3 * torch.randn(lp.shape, generator=g)
    batch.batch["ref_log_prob"] = lp + 0.1 * torch.randn(lp.shape, generator=g)
    algo = omega_conf_to_dataclass(config.algorithm)  # what RayPPOTrainer passes as config=
    if algo.use_kl_in_reward:
        batch, kl_metrics = ray_trainer.apply_kl_penalty(
            batch, kl_ctrl=core_algos.get_kl_controller(algo.kl_ctrl), kl_penalty=algo.kl_penalty)
        assert np.isfinite(kl_metrics["actor/reward_kl_penalty"])
    else:
        batch.batch["token_level_rewards"] = batch.batch["token_level_scores"]

    # 2. advantages: verl's compute_advantage with the registered estimator, per objective
    flat_rewards = batch.batch["token_level_rewards"].clone()
    batch = ray_trainer.compute_advantage(batch, adv_estimator=algo.adv_estimator, gamma=algo.gamma, lam=algo.lam,
                                          num_repeat=2, norm_adv_by_std_in_grpo=algo.norm_adv_by_std_in_grpo,
                                          config=algo)
    adv = batch.batch["advantages"]
    assert adv.shape == (B, T, 2) and batch.batch["returns"].shape == (B, T, 2)
    torch.testing.assert_close(batch.batch["token_level_rewards"], flat_rewards)  # left as verl made it
    mask = batch.batch["response_mask"]
    last = mask.sum(-1) - 1
    penalty = flat_rewards - batch.batch["token_level_scores"]
    for i, key in enumerate(KEYS):  # each objective is verl's own GRPO on that objective's rewards
        r = penalty.clone()
        r[torch.arange(B), last] += torch.as_tensor(per_obj[:, i])
        want, _ = core_algos.compute_grpo_outcome_advantage(r, mask, batch.non_tensor_batch["uid"])
        torch.testing.assert_close(adv[..., i], want, rtol=1e-5, atol=1e-6, msg=key)

    # 3. verl's data metrics on [B, T, n] advantages: the objective mean, plus one entry per objective
    metrics = ray_trainer.compute_data_metrics(batch=batch, use_critic=False)
    valid = mask.bool()
    assert metrics["critic/advantages/mean"] == pytest.approx(float(adv.mean(-1)[valid].mean()), rel=1e-5)
    assert metrics["critic/score/mean"] == pytest.approx(float(per_obj.sum(-1).mean()), rel=1e-5)
    for i in range(2):
        assert metrics[f"critic/pama/advantages/{i}/max"] == pytest.approx(float(adv[..., i][valid].max()))
    assert all(np.isfinite(v) for v in metrics.values() if isinstance(v, float))
    assert batch.batch["advantages"].shape == (B, T, 2)  # the batch the actor gets is unchanged

    # 4. the actor: verl's micro-batching and ppo_loss with loss_mode="pama", then backward
    cfg = omega_conf_to_dataclass(config.actor_rollout_ref.actor)  # the recipe's actor config
    total, grads, step_metrics = actor_step(model, batch, cfg, micro=4)
    assert grads and all(bool(gr.isfinite().all()) for gr in grads)
    assert any(bool(gr.abs().sum() > 0) for gr in grads)
    for m in step_metrics:
        for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower", "actor/pama/weights/1"):
            assert key in m, key
    # micro-batching does not change the token-granularity loss: one micro-batch of 8 gives the same
    whole, whole_grads, _ = actor_step(model, batch, cfg, micro=8)
    torch.testing.assert_close(total, whole, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # and the policy-gradient part is the fused op on the objective-first advantages of the whole batch
    td = left_right_2_no_padding(batch.to_tensordict())
    with torch.no_grad():
        lp_now = no_padding_2_padding(log_probs(model, td), td)
    want, _ = ops.pama_policy_loss(lp_now, batch.batch["old_log_probs"], adv.permute(2, 0, 1).contiguous(),
                                   mask.bool(), None, eps_lo=cfg.clip_ratio_low, eps_hi=cfg.clip_ratio_high,
                                   dual_clip=cfg.clip_ratio_c, noon=True, whiten=False, method="pama",
                                   granularity="token", agg=cfg.loss_agg_mode)
    got = sum(metric_value(m["actor/pg_loss"]) for m in step_metrics)
    assert got == pytest.approx(float(want), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_verl_trainer_route_single_objective_is_vanilla(world, agg):
    """One objective, linear, no Noon: verl's actor step with "pama" is its "vanilla" step (loss, grads)."""
    tok, model = world
    batch = make_batch(tok, seed=5)
    B, T = batch.batch["responses"].shape
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        td = left_right_2_no_padding(batch.to_tensordict())
        lp = no_padding_2_padding(log_probs(model, td), td)
    batch.batch["old_log_probs"] = lp + 0.4 * torch.randn(lp.shape, generator=g)
    batch.batch["ref_log_prob"] = lp + 0.1 * torch.randn(lp.shape, generator=g)
    batch.batch["advantages"] = 2 * torch.randn(B, T, generator=g) * batch.batch["response_mask"]
    saved = pverl.options()
    try:
        pverl.configure(method="linear", noon=False, whiten=False, granularity="token", prefs=None, group=None)
        got, got_grads, got_m = actor_step(model, batch, actor_config("pama", agg))
    finally:
        pverl._OPTIONS = saved  # noqa: SLF001
    want, want_grads, want_m = actor_step(model, batch, actor_config("vanilla", agg))
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for gm, wm in zip(got_m, want_m):  # the dashboards see verl's names and values
        for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
            assert metric_value(gm[key]) == pytest.approx(metric_value(wm[key]), abs=1e-6), key


def test_reward_manager_errors(tmp_path, world):
    tok, _ = world
    batch = make_batch(tok, B=2)
    config = trainer_config(tmp_path)
    config.algorithm.gdpo_reward_keys = ["length", "missing"]
    with pytest.raises(ValueError, match="missing"):
        score_batch(batch, config, tok)
    config.algorithm.gdpo_reward_keys = None
    with pytest.raises(ValueError, match="gdpo_reward_keys"):
        load_reward_manager(config, tok)
    # reward_fns: one function per objective, in Python
    config.algorithm.gdpo_reward_keys = None
    manager = verl_reward.PamaMultiObjectiveRewardManager(
        config, tok, reward_fns={"a": lambda **kw: 1.0, "b": lambda solution_str, **kw: len(solution_str)})
    out = manager.loop.run_until_complete(manager.run_single(batch[0:1]))
    assert list(out["reward_extra_info"]) == ["a", "b"] and out["reward_score"] == 1.0 + out["reward_extra_info"]["b"]


def test_estimator_hook_needs_the_objective_scores(world):
    tok, _ = world
    batch = make_batch(tok, B=4)
    batch.batch["token_level_scores"] = batch.batch["token_level_rewards"] = torch.zeros(4, 7)
    with pytest.raises(ValueError, match="gdpo_reward_keys.*pama_multi"):
        ray_trainer.compute_advantage(batch, adv_estimator="pama_grpo",
                                      config=AlgoConfig(adv_estimator="pama_grpo", gdpo_reward_keys=KEYS))
    # without gdpo_reward_keys, verl's [B, T] rewards are one objective (the estimator as registered)
    out = ray_trainer.compute_advantage(batch, adv_estimator="pama_grpo", config=AlgoConfig(adv_estimator="pama_grpo"))
    assert out.batch["advantages"].shape == (4, 7)


def test_hooks_and_registration_survive_reload():
    import importlib
    import warnings

    from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls

    original = ray_trainer.compute_advantage.__wrapped__
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "already registered" warning
        mod = importlib.reload(pverl)
        importlib.reload(verl_reward)
        verl_reward.register()
        mod.install_trainer_hooks()
    try:
        assert mod.VERL_AVAILABLE and mod.TRAINER_HOOKS_ERROR is None
        assert core_algos.get_policy_loss_fn("pama") is mod.compute_policy_loss_pama
        assert core_algos.get_adv_estimator_fn("pama_grpo") is mod.compute_pama_grpo_advantage
        assert get_reward_manager_cls("pama_multi") is verl_reward.PamaMultiObjectiveRewardManager
        assert ray_trainer.compute_advantage.__wrapped__ is original  # wrapped once, not twice
    finally:
        importlib.reload(pverl)
