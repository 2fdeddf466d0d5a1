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

from pama_ext import ops  # noqa: E402
from pama_ext.integrations.trl import (  # noqa: E402
    LOSS_TYPE_AGG,
    PamaGRPOTrainer,
    group_normalized_advantages,
    trl_normalized_loss,
)

pytestmark = pytest.mark.filterwarnings("ignore:the cached tiny world:UserWarning")

NUM_GEN = 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small tiny world (the trainer tests' size) in a module cache."""
    from pama_ext import tiny_world as tw

    cache = tmp_path_factory.mktemp("pama_trl_cache")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tw.build_tiny_world(cache_dir=cache, n_reviews=500, train_steps=5, progress=False,
                                   config=tw.TinyWorldConfig(n_layer=2, n_embd=64, n_head=2))


def chars_reward(completions, **kwargs):
    return [len(c) / 10.0 for c in completions]


def vowel_reward(completions, **kwargs):
    return [sum(ch in "aeiou" for ch in c) / max(1, len(c)) for c in completions]


def make_trainer(world, tmp_path, reward_funcs, *, loss_type="grpo", beta=0.0, grad_accum=1, max_steps=2,
                 mask_truncated_completions=False, temperature=1.0, model=None, peft_config=None, bf16=None,
                 cast_lm_head_to_fp32=False, **pama):
    torch.manual_seed(0)
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=NUM_GEN,
        max_completion_length=5, max_steps=max_steps, gradient_accumulation_steps=grad_accum, logging_steps=1,
        report_to="none", use_cpu=True, save_strategy="no", learning_rate=1e-2, seed=0, loss_type=loss_type,
        beta=beta, use_bias_correction_kl=False, mask_truncated_completions=mask_truncated_completions,
        temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32, **({} if bf16 is None else {"bf16": bf16}),
    )
    ds = Dataset.from_dict({"prompt": world.train_prompts[:8]})
    extra = {} if peft_config is None else {"peft_config": peft_config}
    return PamaGRPOTrainer(model=world.load_model() if model is None else model, reward_funcs=reward_funcs,
                           args=args, train_dataset=ds, processing_class=world.load_tokenizer(), **extra, **pama)


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


def zero_rows(inputs, rows):
    """Fully mask ``rows`` the way GRPOConfig(mask_truncated_completions=True) masks truncated
    completions: their completion mask is zeroed and the batch's active-token count follows."""
    keep = torch.ones(inputs["completion_mask"].shape[0], 1, dtype=inputs["completion_mask"].dtype)
    keep[list(rows)] = 0
    inputs["completion_mask"] = inputs["completion_mask"] * keep
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum()


@pytest.mark.parametrize("loss_type,beta,grad_accum,empty", [
    ("grpo", 0.0, 1, ()), ("bnpo", 0.0, 2, ()), ("dr_grpo", 0.0, 1, ()), ("dapo", 0.0, 2, ()), ("grpo", 0.1, 1, ()),
    # fully masked rows: TRL still counts them in grpo's mean over rows and in dr_grpo's B.
    # "truncated": GRPOConfig(mask_truncated_completions=True) itself (3 of the 4 completions of 5 tokens
    # are truncated here); a tuple: those rows masked as it does
    ("grpo", 0.0, 1, "truncated"), ("dr_grpo", 0.0, 2, "truncated"), ("bnpo", 0.0, 1, "truncated"),
    ("dapo", 0.0, 2, "truncated"), ("grpo", 0.1, 2, (0, 3)), ("dr_grpo", 0.1, 1, (1,)), ("bnpo", 0.0, 2, (0, 1)),
    ("dapo", 0.1, 1, (2,)),
])
@pytest.mark.parametrize("fused", [False, True])
def test_default_path_is_trl_grpo_loss(world, tmp_path, loss_type, beta, grad_accum, empty, fused):
    """algorithms §9 through TRL: one reward function, linear, no Noon, no whitening = TRL's GRPO loss,
    also with fully masked (truncated) completions. ``fused``: the loss through the fused output layer
    (float32: under GRPOConfig's default bf16 autocast the two output layers round differently,
    test_fused_linear_bf16_autocast); otherwise on TRL's own log-probs (GRPOConfig's defaults)."""
    trainer = make_trainer(world, tmp_path, [chars_reward], loss_type=loss_type, beta=beta, grad_accum=grad_accum,
                           mask_truncated_completions=empty == "truncated", method="linear", noon=False,
                           whiten=False, fused_linear=fused, bf16=False if fused else None)
    trainer.current_gradient_accumulation_steps = grad_accum
    inputs = generation_batch(world, trainer)
    if empty:
        if empty != "truncated":
            zero_rows(inputs, empty)
        active = inputs["completion_mask"].any(-1)
        assert bool(active.any()) and not bool(active.all())
        assert bool((inputs["advantages"][active] != 0).any())
    # move the rollout policy away from the current one so that ratios differ from 1 and clipping happens
    g = torch.Generator().manual_seed(1)
    mask = inputs["completion_mask"]
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        am = torch.cat([inputs["prompt_mask"], mask], 1)
        logp, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, am, mask.shape[1])
    inputs["old_per_token_logps"] = logp + 0.3 * torch.randn(logp.shape, generator=g)
    inputs = moved_reference(inputs)  # beta > 0: a KL term with a gradient
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


# ------------------------------------------------------------------------------------------------
# the loss_type normalisation on its own: fully masked rows, and the data-parallel path
# ------------------------------------------------------------------------------------------------
EPS, MAX_LEN = 0.2, 6


def trl_loss(logp, old, adv, mask, loss_type, accumulation=1.0, dapo_normalizer=None):
    """TRL 1.16 GRPOTrainer._compute_loss's clipped token loss and loss_type aggregation, written out
    (token-level importance sampling, no KL, as for one process)."""
    ratio = torch.exp(logp - old)
    a = adv[:, None]
    per_token = -torch.min(ratio * a, ratio.clamp(1 - EPS, 1 + EPS) * a)
    m = mask.to(per_token.dtype)
    if loss_type == "grpo":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean() / accumulation
    if loss_type == "bnpo":
        return (per_token * m).sum() / m.sum().clamp(min=1.0) / accumulation
    if loss_type == "dr_grpo":
        return (per_token * m).sum() / (per_token.size(0) * MAX_LEN) / accumulation
    assert loss_type == "dapo"
    return (per_token * m).sum() / dapo_normalizer


def ours(logp, old, adv, mask, loss_type, accumulation=1.0, dapo_normalizer=None, group=None):
    kw = {} if group is None else {"group": group}
    loss, _ = ops.pama_policy_loss(logp, old, adv[None, :, None].expand(1, *mask.shape).contiguous(), mask,
                                   eps_lo=EPS, eps_hi=EPS, dual_clip=None, noon=False, whiten=False,
                                   method="linear", agg=LOSS_TYPE_AGG[loss_type], **kw)
    return trl_normalized_loss(loss, mask, loss_type, max_completion_length=MAX_LEN, accumulation=accumulation,
                               dapo_normalizer=dapo_normalizer, group=group)


def normalization_batch(B, T, seed, empty_rows):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) > 0.3).to(torch.int64)
    mask[:, 0] = 1
    mask[list(empty_rows)] = 0
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5
    logp = old + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return logp, old, adv, mask


@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPE_AGG))
@pytest.mark.parametrize("empty_rows", [(), (1,), (0, 3, 4), (0, 1, 2, 3, 4)])
def test_trl_normalization_with_empty_rows(native, loss_type, empty_rows):
    """Fully masked rows (truncated completions under mask_truncated_completions) count in TRL's
    grpo row mean and dr_grpo's B; loss and gradient equal TRL's, an all-empty micro-batch gives 0."""
    logp, old, adv, mask = normalization_batch(5, 4, 3, empty_rows)
    kw = {"accumulation": 2.0, "dapo_normalizer": torch.tensor(7.5, dtype=torch.float64)}
    lp_ours, lp_trl = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    got, want = ours(lp_ours, old, adv, mask, loss_type, **kw), trl_loss(lp_trl, old, adv, mask, loss_type, **kw)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(lp_ours.grad, lp_trl.grad, rtol=1e-12, atol=1e-14)


def test_trl_normalization_issue_case(native):
    """The smallest case of the report: B = 2, T = 1, mask [[1], [0]], dr_grpo (TRL: sum / (B * L))."""
    logp = torch.tensor([[-1.0], [-2.0]], dtype=torch.float64)
    adv = torch.tensor([0.5, 0.3], dtype=torch.float64)
    mask = torch.tensor([[1], [0]])
    for loss_type in ("grpo", "dr_grpo"):
        got = ours(logp, logp, adv, mask, loss_type)
        torch.testing.assert_close(got, trl_loss(logp, logp, adv, mask, loss_type), rtol=1e-12, atol=0)
        torch.testing.assert_close(got, torch.tensor(-0.5 / (2 * (MAX_LEN if loss_type == "dr_grpo" else 1)),
                                                     dtype=torch.float64), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="loss_type"):
        trl_normalized_loss(got, mask, "sapo", max_completion_length=MAX_LEN)
    with pytest.raises(ValueError, match="dapo_normalizer"):
        trl_normalized_loss(got, mask, "dapo", max_completion_length=MAX_LEN)


# rank r holds rows DP_SHARDS[r] of one batch; the empty rows make the non-empty row and token counts
# differ between the ranks (rank 1 has a single active row)
DP_EMPTY = (1, 3, 5)
DP_SHARDS = (slice(0, 3), slice(3, 6))


def _two_rank_trl_normalization(rank, init_file, result_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        logp, old, adv, mask = normalization_batch(6, 5, 11, DP_EMPTY)
        rows = DP_SHARDS[rank]
        normalizer = mask.sum().to(torch.float64) / 2  # dapo: the generation batch's tokens per process
        out = {}
        for loss_type in sorted(LOSS_TYPE_AGG):
            lp = logp[rows].clone().requires_grad_()
            ours(lp, old[rows], adv[rows], mask[rows], loss_type, accumulation=2.0, dapo_normalizer=normalizer,
                 group=dist.group.WORLD).backward()
            out[loss_type] = lp.grad
        torch.save(out, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_trl_normalization_data_parallel_two_ranks(native, tmp_path):
    """With process_group= the op normalises by the group's counts; the adapter must still give each
    rank the gradient of TRL's loss on its own micro-batch (DDP then averages them as under TRL),
    counting the empty rows as TRL does."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    init_file, result = tmp_path / "init", tmp_path / "result"
    mp.spawn(_two_rank_trl_normalization, args=(str(init_file), str(result)), nprocs=2, join=True)
    logp, old, adv, mask = normalization_batch(6, 5, 11, DP_EMPTY)
    normalizer = mask.sum().to(torch.float64) / 2
    wrong = []
    for rank, rows in enumerate(DP_SHARDS):
        got = torch.load(f"{result}.{rank}")
        for loss_type in sorted(LOSS_TYPE_AGG):
            lp = logp[rows].clone().requires_grad_()
            trl_loss(lp, old[rows], adv[rows], mask[rows], loss_type, accumulation=2.0,
                     dapo_normalizer=normalizer).backward()
            assert bool(lp.grad.abs().sum() > 0)
            if not torch.allclose(got[loss_type], lp.grad, rtol=1e-12, atol=1e-14):
                wrong.append(f"{loss_type} on rank {rank}: max |diff| {float((got[loss_type] - lp.grad).abs().max())}")
    assert not wrong, "gradients differ from TRL's: " + "; ".join(wrong)


@pytest.mark.parametrize("method,granularity,grad_accum,fused", [
    ("pama", "token", 1, True), ("linear", "token", 1, True), ("pama", "sequence", 2, True), ("pama", "token", 1, False),
])
def test_training_runs_and_logs(world, tmp_path, method, granularity, grad_accum, fused):
    """Two optimizer steps; with gradient accumulation TRL splits and shuffles the generation batch,
    objective advantages included. The entropy metric exists only on TRL's log-prob path."""
    trainer = make_trainer(world, tmp_path, [chars_reward, vowel_reward], method=method, granularity=granularity,
                           grad_accum=grad_accum, fused_linear=fused)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        assert ("entropy" in h) == (not fused)
        for key in ("pama/weights/chars_reward", "pama/weights/vowel_reward", "pama/active", "clip_ratio/region_mean"):
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


# ------------------------------------------------------------------------------------------------
# fused_linear=True: the loss from the last hidden states and the output layer's weight
# ------------------------------------------------------------------------------------------------
def loss_and_grads(trainer, inputs, fused, model=None):
    """The adapter's loss and every trainable parameter's gradient, on the fused path or on TRL's log-probs."""
    trainer.pama_fused_linear = fused
    if not hasattr(trainer, "current_gradient_accumulation_steps"):  # set by train()
        trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model if model is None else model, inputs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


def grad_error(got, want):
    """(largest |difference| of any gradient entry, largest |entry| of want's gradients)."""
    return (max(float((a - b).abs().max()) for a, b in zip(got[1], want[1])),
            max(float(b.abs().max()) for b in want[1]))


def assert_same_loss_and_grads(got, want):
    """float32 against float32 (no autocast; both paths take the logsumexp in float32, the two differ
    by summation order only, measured 1e-7 of the largest gradient entry)."""
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    diff, scale = grad_error(got, want)
    assert scale > 0 and diff <= 1e-5 * scale, (diff, scale)


def differs(got, want):
    """True when ``got`` is outside assert_same_loss_and_grads' tolerance of ``want``."""
    try:
        assert_same_loss_and_grads(got, want)
    except AssertionError:
        return True
    return False


def off_policy(trainer, inputs, seed=1):
    """Rollout log-probs away from the current policy (ratios differ from 1, some clipped)."""
    g = torch.Generator().manual_seed(seed)
    mask = inputs["completion_mask"]
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        am = torch.cat([inputs["prompt_mask"], mask], 1)
        logp, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, am, mask.shape[1])
    return dict(moved_reference(inputs, seed + 1), old_per_token_logps=logp + 0.3 * torch.randn(logp.shape, generator=g))


def moved_reference(inputs, seed=2):
    """The reference log-probs (beta > 0) away from the policy's: the reference starts as a copy of
    the policy, where the k3 KL term and its gradient are 0."""
    ref = inputs.get("ref_per_token_logps")
    if ref is None:
        return inputs
    g = torch.Generator().manual_seed(seed)
    return dict(inputs, ref_per_token_logps=ref + 0.2 * torch.randn(ref.shape, generator=g))


TEMPERATURE = 0.7


@pytest.mark.parametrize("method", ["pama", "linear"])
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_fused_linear_matches_trl_log_probs(world, tmp_path, method, loss_type, beta):
    """Two objectives, token granularity, temperature 0.7: the fused path's loss and every parameter's
    gradient equal those of the same loss on TRL's own log-probs, with rollout log-probs (the op's
    single pass) and without them (on-policy: fused_linear_logp, then the loss); a wrong temperature
    on the fused path is detected."""
    trainer = make_trainer(world, tmp_path, [chars_reward, vowel_reward], loss_type=loss_type, beta=beta, grad_accum=2,
                           temperature=TEMPERATURE, method=method, fused_linear=True, bf16=False)
    trainer.current_gradient_accumulation_steps = 2
    on_policy = moved_reference(generation_batch(world, trainer, n_prompts=4))
    assert on_policy.get("old_per_token_logps") is None
    assert (beta != 0) == (on_policy.get("ref_per_token_logps") is not None)
    for inputs in (off_policy(trainer, on_policy), on_policy):
        want = loss_and_grads(trainer, inputs, fused=False)
        assert_same_loss_and_grads(loss_and_grads(trainer, inputs, fused=True), want)
    trainer.temperature = TEMPERATURE * 1.05  # the fused path reads it at each call; TRL's head keeps 0.7
    assert differs(loss_and_grads(trainer, inputs, fused=True), want)


def test_fused_linear_sequence_granularity_and_wrapper(world, tmp_path):
    """pama at sequence granularity (the op's two-pass path) equals TRL's log-probs path, also when the
    model is called through a wrapper module (as DDP wraps it): the wrapper's forward runs once per loss."""
    trainer = make_trainer(world, tmp_path, [chars_reward, vowel_reward], beta=0.1, method="pama",
                           granularity="sequence", fused_linear=True, bf16=False)
    inputs = off_policy(trainer, generation_batch(world, trainer, n_prompts=4))
    want = loss_and_grads(trainer, inputs, fused=False)
    assert_same_loss_and_grads(loss_and_grads(trainer, inputs, fused=True), want)

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.module(*args, **kwargs)

    wrapper = Wrapper(trainer.model)
    forward = trainer.model.forward  # TRL's fused-LM-head forward, an instance attribute
    trainer.accelerator.unwrap_model = lambda m, **kw: m.module if isinstance(m, Wrapper) else m
    assert_same_loss_and_grads(loss_and_grads(trainer, inputs, fused=True, model=wrapper), want)
    assert wrapper.calls == 1 and trainer.model.forward == forward


def test_fused_linear_peft(world, tmp_path):
    """A LoRA policy (TRL wraps it with peft; the reference is the adapter disabled): the fused path
    reads the base model's backbone (LoRA layers inside) and output layer; gradients of the LoRA weights."""
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM", init_lora_weights=False)
    trainer = make_trainer(world, tmp_path, [chars_reward, vowel_reward], beta=0.1, temperature=TEMPERATURE,
                           peft_config=cfg, method="pama", fused_linear=True, bf16=False)
    assert any("lora" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    inputs = off_policy(trainer, generation_batch(world, trainer, n_prompts=4))
    assert_same_loss_and_grads(loss_and_grads(trainer, inputs, fused=True), loss_and_grads(trainer, inputs, fused=False))


def test_output_layer_cost(world, tmp_path):
    """What one loss step (forward + backward, torch profiler) costs in the output layer. TRL 1.16's
    tiled LM head scores every position of prompt + completion on the CPU: its first tile holds the
    logits of B·(L-1) rows at once (tiles of 4096 tokens x 32768 vocabulary; on CUDA only the
    completion's tokens), not kept for the backward, which recomputes them: 4 matmuls. The fused path
    reads the completion's B·T rows only (one chunk here), 3 matmuls with rollout log-probs (single
    pass), 4 without them (log-probs first). Matmuls in units of one B·T x H x V matmul."""
    from pama_ext.benchmarks.trl_step import output_layer_profile

    trainer = make_trainer(world, tmp_path, [chars_reward, vowel_reward], fused_linear=True, bf16=False)
    on_policy = generation_batch(world, trainer, n_prompts=4)
    off = off_policy(trainer, on_policy)
    V = trainer.model.get_output_embeddings().weight.shape[0]
    B, T = on_policy["completion_ids"].shape
    L = T + on_policy["prompt_ids"].shape[1]

    H = trainer.model.get_output_embeddings().weight.shape[1]

    def cost(inputs, fused):  # (matmuls of B·T x H x V, rows of logits at once)
        macs, rows = output_layer_profile(lambda: loss_and_grads(trainer, inputs, fused), V)
        return macs / (B * T * H * V), rows

    assert cost(off, False) == cost(on_policy, False) == (4 * (L - 1) / T, B * (L - 1))
    assert cost(off, True) == (3, B * T)
    assert cost(on_policy, True) == (4, B * T)


def test_fused_linear_bf16_autocast(world, tmp_path):
    """GRPOConfig's default bf16 autocast on CPU: the fused path's error against the float32 loss and
    gradients (TRL's log-probs path with autocast off) is at most 2x that of TRL's own bf16 path plus
    a small floor (the project's dtype rule)."""
    import contextlib

    trainer = make_trainer(world, tmp_path, [chars_reward, vowel_reward], beta=0.1, temperature=TEMPERATURE,
                           method="pama", fused_linear=True)
    assert trainer.accelerator.mixed_precision == "bf16"
    inputs = off_policy(trainer, generation_batch(world, trainer, n_prompts=4))
    fused, trl_bf16 = loss_and_grads(trainer, inputs, fused=True), loss_and_grads(trainer, inputs, fused=False)
    autocast = trainer.accelerator.autocast
    trainer.accelerator.autocast = contextlib.nullcontext
    try:
        want = loss_and_grads(trainer, inputs, fused=False)
    finally:
        trainer.accelerator.autocast = autocast
    loss_err = [float((x[0] - want[0]).abs()) for x in (fused, trl_bf16)]
    (g_err, scale), (g_err_trl, _) = grad_error(fused, want), grad_error(trl_bf16, want)
    assert g_err_trl > 1e-4 * scale  # bf16 is in play
    assert loss_err[0] <= 2 * loss_err[1] + 1e-5 * abs(float(want[0])), loss_err
    assert g_err <= 2 * g_err_trl + 1e-5 * scale, (g_err, g_err_trl, scale)


def test_fused_linear_cast_lm_head_to_fp32(world, tmp_path):
    """GRPOConfig(cast_lm_head_to_fp32=True) under the default bf16 autocast: TRL runs its head in float32
    on float32 hidden states; so does the fused path, and both agree to float32 precision. (TRL's cast
    needs an untied output layer on GPT-2 and no reference model.)"""
    model = world.load_model()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    trainer = make_trainer(world, tmp_path, [chars_reward, vowel_reward], temperature=TEMPERATURE, method="pama",
                           model=model, cast_lm_head_to_fp32=True, fused_linear=True)
    assert trainer.accelerator.mixed_precision == "bf16"
    assert trainer.model.get_output_embeddings().weight.dtype == torch.float32
    inputs = off_policy(trainer, generation_batch(world, trainer, n_prompts=4))
    assert_same_loss_and_grads(loss_and_grads(trainer, inputs, fused=True), loss_and_grads(trainer, inputs, fused=False))


def test_call_through_wrapper():
    """The call runs as the inner module's forward, called through the wrapper with the arguments;
    the inner module's own forward (a class method, or an instance one as accelerate and TRL patch
    it) is back afterwards, also when the call raises."""
    from pama_ext.integrations.trl import call_through_wrapper

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return ("wrapped", self.module(*args, **kwargs))

    inner = torch.nn.Linear(2, 2)
    assert call_through_wrapper(inner, inner, lambda x, y=0: x + y, 3, y=1) == 4
    assert call_through_wrapper(Wrapper(inner), inner, lambda x, y=0: x + y, 3, y=1) == ("wrapped", 4)
    assert "forward" not in inner.__dict__
    own = inner.forward = lambda x: x
    assert call_through_wrapper(Wrapper(inner), inner, lambda: inner.forward) == ("wrapped", own)
    assert inner.forward is own

    def boom():
        raise KeyError("x")

    with pytest.raises(KeyError):
        call_through_wrapper(Wrapper(inner), inner, boom)
    assert inner.forward is own


def test_fused_linear_under_ddp(world, tmp_path):
    """The fused path with the model wrapped in DistributedDataParallel (one gloo process): the loss
    runs through DDP's forward and gives the unwrapped model's loss and gradients."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    trainer = make_trainer(world, tmp_path, [chars_reward, vowel_reward], method="pama", fused_linear=True, bf16=False)
    inputs = off_policy(trainer, generation_batch(world, trainer, n_prompts=4))
    want = loss_and_grads(trainer, inputs, fused=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'ddp_init'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(trainer.model)
        assert trainer.accelerator.unwrap_model(ddp) is trainer.model
        assert_same_loss_and_grads(loss_and_grads(trainer, inputs, fused=True, model=ddp), want)
    finally:
        dist.destroy_process_group()


def test_fused_linear_refuses_what_it_cannot_compute(world, tmp_path):
    """A model whose logits are not lm_head(hidden) under a declared transform (here: GPT-2 ignores a
    logit_scale its config carries) and a non-boolean option raise at construction, naming the option."""
    with pytest.raises(ValueError, match="fused_linear: expected True or False"):
        make_trainer(world, tmp_path, [chars_reward], fused_linear="yes")
    model = world.load_model()
    model.config.logit_scale = 2.0
    with pytest.raises(ValueError, match=r"not lm_head\(base_model.*fused_linear=False"):
        make_trainer(world, tmp_path, [chars_reward], model=model, fused_linear=True)


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
