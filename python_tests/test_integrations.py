"""Tests of the verl and OpenRLHF adapters (pama_ext.integrations.verl / .openrlhf).

Neither framework is needed: the verl loss and estimator are exercised through a stand-in registry
that mirrors verl's (the same decorators and the keyword call its actor makes), and the OpenRLHF
module never imports OpenRLHF. Where verl itself can be imported (see docs/integrations.md), the
tests at the end also register into its real registry and compare with its own functions.

The default-path checks (algorithms §9) compare with the vanilla PPO loss written out here from the
frameworks' documented math, not with pama_ext's own reference.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types

import numpy as np
import pytest
import torch

from pama_ext.integrations import openrlhf as porl
from pama_ext.integrations import verl as pverl

DTYPES = [torch.float64, torch.float32]


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)


def _batch(B=5, T=9, n=1, dtype=torch.float64, seed=0, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 5:] = False
    mask[3, 2:] = False
    if B > 4:
        mask[4, :] = False  # an empty row
    old = -torch.rand(B, T, generator=g, dtype=dtype) * 2
    logp = old + spread * torch.randn(B, T, generator=g, dtype=dtype)
    adv = torch.randn(B, T, n, generator=g, dtype=dtype)
    return logp, old, adv, mask


@pytest.fixture
def vanilla_options():
    """Configure the verl loss for the default path (n=1, linear, no Noon, no whitening); restore after."""
    saved = pverl.options()
    pverl.configure(method="linear", noon=False, whiten=False, granularity="token", prefs=None, group=None)
    yield
    pverl._OPTIONS = saved  # noqa: SLF001 - restore the module state for the next test


# ------------------------------------------------------------------------------------------------
# the vanilla PPO loss, from the frameworks' documented math
# ------------------------------------------------------------------------------------------------
def vanilla_token_losses(logp, old, adv, eps_lo, eps_hi, dual_clip):
    """PPO clipped loss per token with the optional dual clip (ratio from the log-ratio clamped to ±20)."""
    ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - eps_lo, 1 + eps_hi)
    clipped = torch.maximum(l1, l2)
    if dual_clip is None:
        return clipped, (l2 > l1)
    return torch.where(adv < 0, torch.minimum(clipped, -adv * dual_clip), clipped), (l2 > l1)


def vanilla_kl_and_lower(logp, old, adv, mask, eps_lo, eps_hi, dual_clip):
    """verl's vanilla metrics: ppo_kl (log-ratio clamped to ±20) and pg_clipfrac_lower (the dual clip
    bounds a negative advantage), masked means with verl's ``+ 1e-8`` denominator."""
    m = mask.to(logp.dtype)
    denom = m.sum() + 1e-8
    neg_kl = torch.clamp(logp - old, -20.0, 20.0)
    ratio = torch.exp(neg_kl)
    clipped = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - eps_lo, 1 + eps_hi))
    lower = ((clipped > -adv * dual_clip) & (adv < 0)).to(logp.dtype)
    return (-neg_kl * m).sum() / denom, (lower * m).sum() / denom


def vanilla_agg(loss_mat, mask, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None, scale=None):
    """verl's documented loss_agg_mode semantics (sequences without tokens are left out of sequence means)."""
    m = mask.to(loss_mat.dtype)
    if mode == "token-mean":
        denom = m.sum() if batch_num_tokens is None else batch_num_tokens
        return (loss_mat * m).sum() / denom * dp_size
    if mode == "token-sum":
        return (loss_mat * m).sum() * dp_size
    tokens = m.sum(-1)
    nonempty = (tokens > 0).to(loss_mat.dtype)
    if mode == "seq-mean-token-mean":
        per_seq = (loss_mat * m).sum(-1) / tokens.clamp(min=1)
    else:  # seq-mean-token-sum(-norm)
        per_seq = (loss_mat * m).sum(-1)
    denom = nonempty.sum() if global_batch_size is None else global_batch_size
    out = (per_seq * nonempty).sum() / denom * dp_size
    if mode == "seq-mean-token-sum-norm":
        out = out / (mask.shape[-1] if scale is None else scale)
    return out


# ------------------------------------------------------------------------------------------------
# a stand-in for verl's registry module (verl.trainer.ppo.core_algos)
# ------------------------------------------------------------------------------------------------
def make_registry():
    """The registry API verl documents: two name -> function maps and their decorators and getters."""
    reg = types.SimpleNamespace(POLICY_LOSS_REGISTRY={}, ADV_ESTIMATOR_REGISTRY={})

    def register_policy_loss(name):
        def deco(fn):
            reg.POLICY_LOSS_REGISTRY[name] = fn
            return fn
        return deco

    def register_adv_est(name):
        def deco(fn):
            if name in reg.ADV_ESTIMATOR_REGISTRY and reg.ADV_ESTIMATOR_REGISTRY[name] != fn:
                raise ValueError(f"Adv estimator {name} has already been registered")
            reg.ADV_ESTIMATOR_REGISTRY[name] = fn
            return fn
        return deco

    def get_policy_loss_fn(name):
        if name not in reg.POLICY_LOSS_REGISTRY:
            raise ValueError(f"Unsupported loss mode: {name}")
        return reg.POLICY_LOSS_REGISTRY[name]

    def get_adv_estimator_fn(name):
        if name not in reg.ADV_ESTIMATOR_REGISTRY:
            raise ValueError(f"Unknown advantage estimator simply: {name}")
        return reg.ADV_ESTIMATOR_REGISTRY[name]

    reg.register_policy_loss = register_policy_loss
    reg.register_adv_est = register_adv_est
    reg.get_policy_loss_fn = get_policy_loss_fn
    reg.get_adv_estimator_fn = get_adv_estimator_fn
    return reg


@dataclasses.dataclass
class ActorCfg:
    """The fields of verl's actor config that a policy loss reads."""
    clip_ratio: float = 0.2
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: float = 3.0
    global_batch_info: dict = dataclasses.field(default_factory=dict)

    def get(self, key, default=None):
        return getattr(self, key, default)


def actor_call(reg, logp, old, adv, mask, agg, cfg):
    """The keyword call verl's actor makes (workers/utils/losses.py: ppo_loss)."""
    fn = reg.get_policy_loss_fn("pama")
    return fn(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, loss_agg_mode=agg,
              config=cfg, rollout_is_weights=None)


# ------------------------------------------------------------------------------------------------
# verl: the registered loss
# ------------------------------------------------------------------------------------------------
VERL_AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum", "seq-mean-token-sum-norm"]
GLOBAL_INFOS = [
    {},
    {"dp_size": 2, "batch_num_tokens": 57, "global_batch_size": 11},
    {"dp_size": 1, "batch_num_tokens": 23.0, "global_batch_size": 7.0, "loss_scale_factor": 4},
]


def test_register_into_registry():
    reg = make_registry()
    assert pverl.register(reg) is reg
    assert reg.get_policy_loss_fn("pama") is pverl.compute_policy_loss_pama
    assert reg.get_adv_estimator_fn("pama_grpo") is pverl.compute_pama_grpo_advantage
    pverl.register(reg)  # registering the same functions again is allowed by verl's decorators
    reg.register_adv_est("other")(lambda **kw: None)
    with pytest.raises(ValueError):  # and a clash under one name is not (the stand-in mirrors verl)
        reg.register_adv_est("pama_grpo")(lambda **kw: None)


def test_register_after_reload():
    """A reloaded module (importlib.reload, autoreload) registers its new functions in place of the old
    ones, without verl's clash error or a warning; VERL_AVAILABLE is computed afresh."""
    import importlib
    import warnings

    reg = pverl.register(make_registry())
    old_fn = reg.get_adv_estimator_fn("pama_grpo")
    available = pverl.VERL_AVAILABLE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            mod = importlib.reload(pverl)
        assert mod.compute_pama_grpo_advantage is not old_fn
        mod.register(reg)
        assert reg.get_adv_estimator_fn("pama_grpo") is mod.compute_pama_grpo_advantage
        assert reg.get_policy_loss_fn("pama") is mod.compute_policy_loss_pama
        assert mod.VERL_AVAILABLE == available
        with pytest.raises(ValueError):  # a foreign function under the name is still a clash
            reg.register_adv_est("pama_grpo")(lambda **kw: None)
    finally:
        importlib.reload(pverl)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("agg", VERL_AGGS)
@pytest.mark.parametrize("info", GLOBAL_INFOS, ids=["local", "dp2", "global"])
@pytest.mark.parametrize("shape", ["BT", "BT1"])
def test_verl_default_path_is_vanilla_ppo(vanilla_options, dtype, agg, info, shape):
    """algorithms §9 through verl: n=1, linear, noon=False, whiten=False is verl's vanilla PPO loss."""
    reg = pverl.register(make_registry())
    logp, old, adv, mask = _batch(dtype=dtype)
    adv_in = adv[..., 0] if shape == "BT" else adv
    cfg = ActorCfg(global_batch_info=dict(info))
    lp = logp.clone().requires_grad_()
    loss, metrics = actor_call(reg, lp, old, adv_in, mask, agg, cfg)
    loss.backward()

    lp2 = logp.clone().requires_grad_()
    tok, clipped = vanilla_token_losses(lp2, old, adv[..., 0], cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_c)
    want = vanilla_agg(tok, mask, agg, info.get("dp_size", 1), info.get("batch_num_tokens"),
                       info.get("global_batch_size"), info.get("loss_scale_factor"))
    want.backward()
    torch.testing.assert_close(loss.to(dtype), want.detach(), **_tol(dtype))
    torch.testing.assert_close(lp.grad, lp2.grad, **_tol(dtype))
    m = mask.to(dtype)
    torch.testing.assert_close(metrics["actor/pg_clipfrac"].to(dtype), (clipped.to(dtype) * m).sum() / m.sum(),
                               **_tol(dtype))
    kl, lower = vanilla_kl_and_lower(logp, old, adv[..., 0], mask, cfg.clip_ratio_low, cfg.clip_ratio_high,
                                     cfg.clip_ratio_c)
    torch.testing.assert_close(metrics["actor/ppo_kl"].to(dtype), kl, **_tol(dtype))
    torch.testing.assert_close(metrics["actor/pg_clipfrac_lower"].to(dtype), lower, **_tol(dtype))


def test_verl_metrics_clamped_like_vanilla(vanilla_options):
    """Extreme log-ratios: ppo_kl uses verl's ±20 clamp; pg_clipfrac_lower counts the dual-clipped tokens
    (for n objectives: averaged over the objectives)."""
    reg = pverl.register(make_registry())
    logp, old, adv, mask = _batch(n=2, spread=30.0, seed=9)
    assert bool(((logp - old).abs() > 20).any())
    pverl.configure(prefs=[0.5, 0.5])
    _, metrics = actor_call(reg, logp, old, adv, mask, "token-mean", ActorCfg())
    kl, lower0 = vanilla_kl_and_lower(logp, old, adv[..., 0], mask, 0.2, 0.28, 3.0)
    _, lower1 = vanilla_kl_and_lower(logp, old, adv[..., 1], mask, 0.2, 0.28, 3.0)
    torch.testing.assert_close(metrics["actor/ppo_kl"], kl, **_tol(torch.float64))
    torch.testing.assert_close(metrics["actor/pg_clipfrac_lower"], (lower0 + lower1) / 2, **_tol(torch.float64))
    assert float(lower0) > 0
    _, no_dual = actor_call(reg, logp, old, adv, mask, "token-mean", dataclasses.replace(ActorCfg(), clip_ratio_c=None))
    assert float(no_dual["actor/pg_clipfrac_lower"]) == 0.0


def test_verl_metrics_are_scalar_device_tensors():
    reg = pverl.register(make_registry())
    logp, old, adv, mask = _batch(n=3)
    loss, metrics = actor_call(reg, logp, old, adv, mask, "token-mean", ActorCfg())
    assert loss.dim() == 0 and bool(loss.isfinite())
    assert {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pama/active", "actor/pama/weights/2"} <= set(metrics)
    for key, value in metrics.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0, key
        assert value.device == logp.device and not value.requires_grad, key
    w = torch.stack([metrics[f"actor/pama/weights/{i}"] for i in range(3)])
    torch.testing.assert_close(w.sum(), torch.ones((), dtype=w.dtype))


@pytest.mark.parametrize("which", [0, 1, 2])
def test_verl_objectives_last_layout(vanilla_options, which):
    """[B, T, n]: objective i is advantages[..., i] (a one-hot 'linear' preference selects it)."""
    prefs = [0.0, 0.0, 0.0]
    prefs[which] = 1.0
    pverl.configure(prefs=prefs)
    reg = pverl.register(make_registry())
    logp, old, adv, mask = _batch(n=3, seed=3)
    lp = logp.clone().requires_grad_()
    loss, _ = actor_call(reg, lp, old, adv, mask, "seq-mean-token-mean", ActorCfg())
    tok, _ = vanilla_token_losses(logp, old, adv[..., which], 0.2, 0.28, 3.0)
    want = vanilla_agg(tok, mask, "seq-mean-token-mean")
    torch.testing.assert_close(loss, want, **_tol(torch.float64))


def test_verl_pama_combines_the_objectives():
    """Default options (pama, token, Noon): the loss is the PPO loss of min_i max(A_i, 0) per token."""
    reg = pverl.register(make_registry())
    logp, old, adv, mask = _batch(n=2, seed=5)
    loss, metrics = actor_call(reg, logp, old, adv, mask, "token-mean", ActorCfg())
    combined = adv.clamp(min=0).amin(-1)
    tok, _ = vanilla_token_losses(logp, old, combined, 0.2, 0.28, 3.0)
    torch.testing.assert_close(loss, vanilla_agg(tok, mask, "token-mean"), **_tol(torch.float64))
    m = mask.to(adv.dtype)
    torch.testing.assert_close(metrics["actor/pama/active"], ((combined > 0).to(adv.dtype) * m).sum() / m.sum(),
                               **_tol(torch.float64))


def test_verl_bad_input():
    reg = pverl.register(make_registry())
    logp, old, adv, mask = _batch(n=2)
    with pytest.raises(ValueError, match=r"advantages.*permute\(1, 2, 0\)"):
        actor_call(reg, logp, old, adv.permute(2, 0, 1).contiguous(), mask, "token-mean", ActorCfg())
    with pytest.raises(ValueError, match="advantages"):
        actor_call(reg, logp, old, adv[:, :4], mask, "token-mean", ActorCfg())
    with pytest.raises(ValueError, match="loss_agg_mode"):
        actor_call(reg, logp, old, adv, mask, "token-median", ActorCfg())
    with pytest.raises(ValueError, match="rollout_is_weights"):
        pverl.compute_policy_loss_pama(old, logp, adv, mask, "token-mean", ActorCfg(), torch.ones_like(logp))
    with pytest.raises(ValueError, match="batch_num_tokens"):
        actor_call(reg, logp, old, adv, mask, "token-mean", ActorCfg(global_batch_info={"dp_size": 4}))
    with pytest.raises(ValueError, match="clip_ratio_c"):
        actor_call(reg, logp, old, adv, mask, "token-mean", ActorCfg(clip_ratio_c=0.5))
    with pytest.raises(TypeError, match="granularty"):
        pverl.configure(granularty="token")
    with pytest.raises(ValueError, match="method"):
        pverl.configure(method="nash")
    saved = pverl.options()
    try:
        pverl.configure(prefs=[1.0, 2.0, 3.0])
        with pytest.raises(ValueError, match="prefs"):
            actor_call(reg, logp, old, adv, mask, "token-mean", ActorCfg())
    finally:
        pverl._OPTIONS = saved  # noqa: SLF001


def test_verl_group_is_passed_only_when_configured(monkeypatch):
    """``group=`` reaches the op only when a process group is configured (the op accepts it from then on)."""
    import torch.distributed as dist

    from pama_ext import ops

    seen = []
    real = ops.pama_policy_loss

    def spy(*args, **kwargs):
        seen.append(dict(kwargs))
        kwargs.pop("group", None)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "pama_policy_loss", spy)
    reg = pverl.register(make_registry())
    logp, old, adv, mask = _batch(n=2)
    base, _ = actor_call(reg, logp, old, adv, mask, "token-mean", ActorCfg())
    assert "group" not in seen[-1]

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    saved = pverl.options()
    try:
        group = dist.new_group([0])
        pverl.configure(group=group)
        info = {"dp_size": 1, "batch_num_tokens": 31}
        loss, _ = actor_call(reg, logp, old, adv, mask, "token-mean", ActorCfg(global_batch_info=info))
        assert seen[-1].get("group") is group
        # one rank: the group count is the local count, so this is the verl global normalisation
        torch.testing.assert_close(loss, base * mask.sum().to(base.dtype) / 31)
        porl.PolicyLoss(group=group)(logp, old, adv, action_mask=mask)
        assert seen[-1].get("group") is group
    finally:
        pverl._OPTIONS = saved  # noqa: SLF001
        if created:
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# verl: the estimators
# ------------------------------------------------------------------------------------------------
def grpo_loop(scores, index, eps, norm):
    """verl's documented GRPO outcome advantage for one reward: per-group mean/std, group of one -> (0, 1)."""
    out = torch.empty_like(scores)
    for u in set(index):
        rows = [i for i, v in enumerate(index) if v == u]
        s = scores[rows]
        mean, std = (s.mean(), s.std()) if len(rows) > 1 else (torch.tensor(0.0, dtype=s.dtype), torch.tensor(1.0, dtype=s.dtype))
        out[rows] = (s - mean) / (std + eps) if norm else s - mean
    return out


@pytest.mark.parametrize("norm", [True, False])
def test_pama_grpo_estimator(norm):
    g = torch.Generator().manual_seed(1)
    B, T, n = 7, 6, 3
    mask = torch.ones(B, T)
    mask[2, 3:] = 0
    rewards = torch.zeros(B, T, n)
    last = mask.sum(-1).long() - 1
    scores = torch.randn(B, n, generator=g)
    rewards[torch.arange(B), last] = scores
    index = np.array(["p0", "p1", "p0", "p2", "p1", "p0", "p1"], dtype=object)  # p2 is a group of one
    reg = pverl.register(make_registry())
    adv, ret = reg.get_adv_estimator_fn("pama_grpo")(token_level_rewards=rewards, response_mask=mask,
                                                     index=index, norm_adv_by_std_in_grpo=norm, config=None)
    assert adv.shape == (B, T, n) and torch.equal(adv, ret)
    for i in range(n):
        want = grpo_loop(scores[:, i], list(index), 1e-6, norm)
        torch.testing.assert_close(adv[..., i], want[:, None] * mask, rtol=1e-5, atol=1e-6)
    via_config, _ = pverl.compute_pama_grpo_advantage(rewards, mask, index=index,
                                                      config={"norm_adv_by_std_in_grpo": norm})
    torch.testing.assert_close(via_config, adv)  # verl passes its algorithm config, not the flag
    one, _ = pverl.compute_pama_grpo_advantage(rewards[..., 0], mask, index=index, norm_adv_by_std_in_grpo=norm)
    assert one.shape == (B, T)
    torch.testing.assert_close(one, adv[..., 0])
    with pytest.raises(ValueError, match="index"):
        pverl.compute_pama_grpo_advantage(rewards, mask)
    with pytest.raises(ValueError, match="index"):
        pverl.compute_pama_grpo_advantage(rewards, mask, index=index[:3])


def gae_loop(rewards, values, mask, gamma, lam):
    """verl's documented GAE recursion for one objective (masked positions carry the recursion through)."""
    B, T = rewards.shape
    nextv = torch.zeros(B, dtype=rewards.dtype)
    last = torch.zeros(B, dtype=rewards.dtype)
    out = torch.zeros_like(rewards)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * nextv - values[:, t]
        a = delta + gamma * lam * last
        m = mask[:, t]
        nextv = values[:, t] * m + (1 - m) * nextv
        last = a * m + (1 - m) * last
        out[:, t] = last
    return out, out + values


def test_multi_gae_helper():
    g = torch.Generator().manual_seed(2)
    B, T, n = 4, 8, 2
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 5:] = 0
    mask[2, 0] = 0
    r = torch.randn(B, T, n, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, n, generator=g, dtype=torch.float64)
    adv, ret = pverl.compute_multi_gae_advantage_return(r, v, mask, gamma=0.9, lam=0.8, whiten=False)
    wadv, _ = pverl.compute_multi_gae_advantage_return(r, v, mask, gamma=0.9, lam=0.8, whiten=True)
    for i in range(n):
        a, rt = gae_loop(r[..., i], v[..., i], mask, 0.9, 0.8)
        torch.testing.assert_close(adv[..., i], a)
        torch.testing.assert_close(ret[..., i], rt)
        sel = a[mask.bool()]
        torch.testing.assert_close(wadv[..., i], (a - sel.mean()) / torch.sqrt(sel.var() + 1e-8))
    with pytest.raises(ValueError, match="values"):
        pverl.compute_multi_gae_advantage_return(r, v[..., :1], mask)


# ------------------------------------------------------------------------------------------------
# OpenRLHF
# ------------------------------------------------------------------------------------------------
ORL_INFOS = [{}, {"dp_size": 4, "batch_num_tokens": 80.0, "global_batch_size": 16.0}]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("token_level", [True, False])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("info", ORL_INFOS, ids=["local", "global"])
def test_openrlhf_default_path_is_vanilla_ppo(dtype, token_level, dual_clip, info):
    """algorithms §9 through OpenRLHF: same constructor, same call, same return tuple, same numbers."""
    logp, old, adv, mask = _batch(dtype=dtype, seed=7, spread=0.6)
    fn = porl.PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.3, dual_clip=dual_clip, token_level_loss=token_level,
                         noon=False, method="linear", whiten=False)
    lp = logp.clone().requires_grad_()
    out = fn(lp, old, adv[..., 0], action_mask=mask, rollout_log_probs=None, **info)
    assert isinstance(out, tuple) and len(out) == 5 and out[3] is None and out[4] is None
    loss, clip_ratio, ppo_kl = out[:3]
    loss.backward()

    lp2 = logp.clone().requires_grad_()
    tok, clipped = vanilla_token_losses(lp2, old, adv[..., 0], 0.2, 0.3, dual_clip)
    mode = "token-mean" if token_level else "seq-mean-token-mean"
    want = vanilla_agg(tok, mask, mode, info.get("dp_size", 1), info.get("batch_num_tokens"),
                       info.get("global_batch_size"))
    want.backward()
    torch.testing.assert_close(loss.to(dtype), want.detach(), **_tol(dtype))
    torch.testing.assert_close(lp.grad, lp2.grad, **_tol(dtype))
    m = mask.to(dtype)
    torch.testing.assert_close(clip_ratio.to(dtype), (clipped.to(dtype) * m).sum() / m.sum(), **_tol(dtype))
    torch.testing.assert_close(ppo_kl.to(dtype), ((old - logp) * m).sum() / m.sum(), **_tol(dtype))


def test_openrlhf_multi_objective_path():
    logp, old, adv, mask = _batch(n=3, seed=9)
    fn = porl.PolicyLoss(method="linear", noon=False, prefs=[0.0, 1.0, 0.0])
    loss = fn(logp, old, adv, action_mask=mask)[0]
    tok, _ = vanilla_token_losses(logp, old, adv[..., 1], 0.2, 0.2, None)
    torch.testing.assert_close(loss, vanilla_agg(tok, mask, "token-mean"), **_tol(torch.float64))

    pama = porl.PamaPolicyLoss()  # defaults: pama, token granularity, Noon
    loss, _, _, _, _ = pama(logp, old, adv, action_mask=mask)
    tok, _ = vanilla_token_losses(logp, old, adv.clamp(min=0).amin(-1), 0.2, 0.2, None)
    torch.testing.assert_close(loss, vanilla_agg(tok, mask, "token-mean"), **_tol(torch.float64))
    assert {"pama/weights/0", "pama/abar/2", "pama/active"} <= set(pama.metrics)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in pama.metrics.values())
    assert math.isclose(float(sum(pama.metrics[f"pama/weights/{i}"] for i in range(3))), 1.0, rel_tol=1e-6)


def test_openrlhf_bad_input():
    logp, old, adv, mask = _batch(n=2)
    with pytest.raises(ValueError, match="policy_loss_type"):
        porl.PolicyLoss(policy_loss_type="gspo")
    with pytest.raises(ValueError, match="is_correction_level"):
        porl.PolicyLoss(is_correction_level="token")
    with pytest.raises(ValueError, match="dual_clip"):
        porl.PolicyLoss(dual_clip=0.9)
    with pytest.raises(ValueError, match="granularity"):
        porl.PolicyLoss(granularity="episode")
    with pytest.raises(ValueError, match="prefs"):
        porl.PolicyLoss(method="linear", prefs=[1.0, 0.0, 0.0])(logp, old, adv, action_mask=mask)
    with pytest.raises(ValueError, match=r"advantages.*permute"):
        porl.PolicyLoss()(logp, old, adv.permute(2, 0, 1).contiguous(), action_mask=mask)
    with pytest.raises(ValueError, match="batch_num_tokens"):
        porl.PolicyLoss()(logp, old, adv, action_mask=mask, dp_size=2)


# ------------------------------------------------------------------------------------------------
# verl itself, where it can be imported
# ------------------------------------------------------------------------------------------------
def _real_verl():
    if not pverl.VERL_AVAILABLE:
        if os.environ.get("PAMA_EXT_REQUIRE_VERL") == "1":  # make test-verl: no silent skips
            pytest.fail(f"PAMA_EXT_REQUIRE_VERL=1 but verl cannot be imported ({pverl.VERL_IMPORT_ERROR!r})")
        pytest.skip(f"verl cannot be imported here ({pverl.VERL_IMPORT_ERROR}); see docs/integrations.md")
    from verl.trainer.ppo import core_algos

    return core_algos


@pytest.mark.parametrize("spread", [0.4, 30.0], ids=["ratios", "extreme-ratios"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_real_verl_registry_and_vanilla(vanilla_options, agg, spread):
    ca = _real_verl()
    from verl.workers.config import ActorConfig

    assert ca.get_policy_loss_fn("pama") is pverl.compute_policy_loss_pama
    assert ca.get_adv_estimator_fn("pama_grpo") is pverl.compute_pama_grpo_advantage
    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2,
                      clip_ratio_high=0.28)
    logp, old, adv, mask = _batch(dtype=torch.float32, seed=11, spread=spread)
    want, want_metrics = ca.get_policy_loss_fn("vanilla")(old_log_prob=old, log_prob=logp, advantages=adv[..., 0],
                                                          response_mask=mask, loss_agg_mode=agg, config=cfg,
                                                          rollout_is_weights=None)
    got, metrics = ca.get_policy_loss_fn("pama")(old_log_prob=old, log_prob=logp, advantages=adv[..., 0],
                                                 response_mask=mask, loss_agg_mode=agg, config=cfg,
                                                 rollout_is_weights=None)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)
    for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        assert math.isclose(float(metrics[key]), want_metrics[key], abs_tol=1e-6), key


def test_real_verl_grpo_per_objective():
    ca = _real_verl()
    g = torch.Generator().manual_seed(4)
    B, T, n = 6, 5, 2
    mask = torch.ones(B, T)
    rewards = torch.zeros(B, T, n)
    rewards[:, -1] = torch.randn(B, n, generator=g)
    index = np.array(["a", "b", "a", "b", "a", "c"], dtype=object)
    adv, _ = pverl.compute_pama_grpo_advantage(rewards, mask, index=index)
    for i in range(n):
        want, _ = ca.compute_grpo_outcome_advantage(rewards[..., i], mask, index)
        torch.testing.assert_close(adv[..., i], want, rtol=1e-5, atol=1e-6)


def test_verl_options_from_environment(monkeypatch):
    saved = pverl.options()
    try:
        monkeypatch.setenv("PAMA_EXT_VERL_OPTIONS", '{"method": "mgda", "noon": false}')
        opts = pverl.configure_from_env()
        assert (opts.method, opts.noon, opts.granularity) == ("mgda", False, saved.granularity)
        assert pverl.options() is opts
        monkeypatch.setenv("PAMA_EXT_VERL_OPTIONS", "method=pama")
        with pytest.raises(ValueError, match="PAMA_EXT_VERL_OPTIONS"):
            pverl.configure_from_env()
        monkeypatch.setenv("PAMA_EXT_VERL_OPTIONS", '{"granularity": "episode"}')
        with pytest.raises(ValueError, match="granularity"):
            pverl.configure_from_env()
        monkeypatch.delenv("PAMA_EXT_VERL_OPTIONS")
        assert pverl.configure_from_env() is None
    finally:
        pverl._OPTIONS = saved  # noqa: SLF001


# ------------------------------------------------------------------------------------------------
# docs/integrations.md: the snippets run as written
# ------------------------------------------------------------------------------------------------
def doc_snippet(name):
    """The ```python block that follows ``<!-- snippet: name -->`` in docs/integrations.md."""
    import pathlib
    import re

    doc = pathlib.Path(__file__).resolve().parent.parent / "docs" / "integrations.md"
    found = re.findall(r"<!-- snippet: " + re.escape(name) + r" -->\s*```python\n(.*?)```", doc.read_text(), re.S)
    assert len(found) == 1, f"docs/integrations.md has {len(found)} '{name}' snippets"
    return found[0]


def test_doc_snippet_verl():
    saved = pverl.options()
    try:
        scope = {}
        exec(compile(doc_snippet("verl"), "docs/integrations.md (verl)", "exec"), scope)
    finally:
        pverl._OPTIONS = saved  # noqa: SLF001
    assert scope["advantages"].shape == (4, 6, 2)
    assert scope["pg_loss"].dim() == 0 and bool(scope["pg_loss"].isfinite())
    assert scope["log_prob"].grad is not None and bool(scope["log_prob"].grad.isfinite().all())
    assert all(isinstance(v, torch.Tensor) for v in scope["pg_metrics"].values())


def test_doc_snippet_openrlhf():
    scope = {}
    exec(compile(doc_snippet("openrlhf"), "docs/integrations.md (openrlhf)", "exec"), scope)
    assert scope["experience_advantages"].shape == (4, 8, 2)
    assert bool(scope["loss"].isfinite()) and scope["vllm_kl"] is None
    assert scope["log_probs"].grad is not None and bool(scope["log_probs"].grad.isfinite().all())


# ------------------------------------------------------------------------------------------------
# the group path of the global rescaling, on two processes
# ------------------------------------------------------------------------------------------------
def _two_rank_rescale(rank, init_file, result_file):
    import torch.distributed as dist

    from pama_ext.integrations._common import rescale_to_global

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        g = torch.Generator().manual_seed(0)
        masks = [torch.rand(3, 6, generator=g) > 0.4 for _ in range(2)]
        masks[1][2] = False  # an empty row on rank 1
        per_token = [torch.randn(3, 6, generator=g, dtype=torch.float64) for _ in range(2)]
        m = masks[rank]
        out = {}
        for agg, total in (("token-mean", 50.0), ("seq-mean-token-mean", 9.0)):
            # what the op returns with a group: the group's mean, whose gradient reaches this shard's terms
            if agg == "token-mean":
                counts = [mk.sum() for mk in masks]
                sums = [(p * mk).sum() for p, mk in zip(per_token, masks)]
            else:
                rows = lambda p, mk: ((p * mk).sum(-1) / mk.sum(-1).clamp(min=1))  # noqa: E731
                counts = [mk.any(-1).sum() for mk in masks]
                sums = [rows(p, mk).sum() for p, mk in zip(per_token, masks)]
            group_mean = sum(sums) / sum(counts)
            kw = {"batch_num_tokens": total} if agg == "token-mean" else {"global_batch_size": total}
            got = rescale_to_global(group_mean, m, agg, dp_size=2, group=dist.group.WORLD, **kw)
            # verl / OpenRLHF semantics: the group's sum over the global denominator, times dp_size
            out[agg] = (float(got), float(sum(sums) / total * 2))
            out[agg + "/nocount"] = float(rescale_to_global(group_mean, m, agg, group=dist.group.WORLD))
            out[agg + "/mean"] = float(group_mean)
        torch.save(out, f"{result_file}.{rank}")
        dist.barrier()  # both ranks are done with the group before either tears it down
    finally:
        dist.destroy_process_group()


def test_group_rescale_two_ranks(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    init_file, result = tmp_path / "init", tmp_path / "result"
    mp.spawn(_two_rank_rescale, args=(str(init_file), str(result)), nprocs=2, join=True)
    for rank in range(2):
        out = torch.load(f"{result}.{rank}")
        for agg in ("token-mean", "seq-mean-token-mean"):
            got, global_value = out[agg]
            # the value is the global loss (every rank the same); the shard's gradient share is unchanged
            assert math.isclose(got, global_value, rel_tol=1e-12)
            assert math.isclose(out[agg + "/nocount"], 2 * out[agg + "/mean"], rel_tol=1e-12)


def _op_takes_group() -> bool:
    import inspect

    from pama_ext import ops

    return "group" in inspect.signature(ops.pama_policy_loss).parameters


def _dp_batch():
    g = torch.Generator().manual_seed(21)
    B, T, n = 6, 7, 2
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[4] = False
    old = -torch.rand(B, T, generator=g, dtype=torch.float64)
    logp = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, n, generator=g, dtype=torch.float64)
    return logp, old, adv, mask


DP_OPTIONS = dict(method="pama", granularity="batch", whiten=True, noon=True)


def _two_rank_verl(rank, init_file, result_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        pverl.configure(group=dist.group.WORLD, **DP_OPTIONS)
        logp, old, adv, mask = _dp_batch()
        rows = slice(3 * rank, 3 * rank + 3)
        info = {"dp_size": 2, "batch_num_tokens": int(mask.sum())}
        lp = logp[rows].clone().requires_grad_()
        loss, _ = pverl.compute_policy_loss_pama(old[rows], lp, adv[rows], mask[rows], "token-mean",
                                                 ActorCfg(global_batch_info=info))
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": lp.grad}, f"{result_file}.{rank}")
        dist.barrier()  # both ranks are done with the group before either tears it down
    finally:
        # The module-level options held the group: a ProcessGroupGloo that outlives
        # destroy_process_group is destroyed during interpreter shutdown, when its worker threads can no
        # longer be joined cleanly ("terminate called without an active exception", SIGABRT). Drop the
        # reference first, so the group dies here, with the process still fully alive.
        pverl.configure(group=None)
        dist.destroy_process_group()


def test_verl_loss_data_parallel_two_ranks(tmp_path):
    """With a group, two ranks holding halves of a batch train like one process holding all of it
    (verl's convention: each rank's loss is dp_size times the global mean; DDP averages gradients)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if not _op_takes_group():
        pytest.skip("pama_ext.pama_policy_loss has no group= argument in this build")
    saved = pverl.options()
    try:
        pverl.configure(group=None, **DP_OPTIONS)
        logp, old, adv, mask = _dp_batch()
        lp = logp.clone().requires_grad_()
        full, _ = pverl.compute_policy_loss_pama(old, lp, adv, mask, "token-mean", ActorCfg())
        full.backward()
    finally:
        pverl._OPTIONS = saved  # noqa: SLF001
    mp.spawn(_two_rank_verl, args=(str(tmp_path / "init"), str(tmp_path / "result")), nprocs=2, join=True)
    for rank in range(2):
        out = torch.load(f"{tmp_path / 'result'}.{rank}")
        torch.testing.assert_close(out["loss"] / 2, full.detach())
        torch.testing.assert_close(out["grad"] / 2, lp.grad[3 * rank : 3 * rank + 3])
