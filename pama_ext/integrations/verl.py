"""verl adapter: a policy loss ``"pama"`` and an advantage estimator ``"pama_grpo"`` for verl's registries.

Importing this module registers both with ``verl.trainer.ppo.core_algos`` when verl can be imported
(it is imported lazily, so this module also imports without verl); :func:`register` does the same
explicitly, or into any object that has verl's two decorators ``register_policy_loss(name)`` and
``register_adv_est(name)``. Registering is idempotent, also across ``importlib.reload``.

How per-objective advantages reach the loss
-------------------------------------------
verl's actor hands the registered loss exactly one advantage tensor, the batch's ``"advantages"``
field, and splits, shuffles and micro-batches every batch field along its first dimension. The
per-objective advantages therefore live in that same field, batch-first with the objectives last:
``advantages[b, t, i]`` is objective ``i``'s advantage of token ``t`` of response ``b`` (shape
``[B, T, n]``; a plain ``[B, T]`` tensor is one objective). The loss moves the objective axis to the
front (``[n, B, T]``, the layout of :func:`pama_ext.pama_policy_loss`). They get there in one of
two ways:

- the ``"pama_grpo"`` estimator (``algorithm.adv_estimator=pama_grpo``): the reward function
  writes one reward per objective, i.e. ``token_level_rewards`` of shape ``[B, T, n]`` (each
  objective's sequence score on the response's last token, as verl does for one reward), and the
  estimator normalises each objective within its prompt group (GRPO, per objective, no summing);
- critic-based PPO with one value head per objective: :func:`compute_multi_gae_advantage_return`
  runs :func:`pama_ext.multi_gae` on ``[B, T, n]`` rewards and values and whitens each objective.

verl's stock trainer (``main_ppo`` with ``trainer.use_v1=False``) carries one scalar reward per
response and computes its data metrics on ``[B, T]`` advantages. Where verl's trainer imports, this
module therefore also registers the reward manager ``"pama_multi"``
(:mod:`pama_ext.integrations.verl_reward`: one score per objective, as reward extra info under the keys
of ``algorithm.gdpo_reward_keys``) and wraps ``compute_advantage`` and ``compute_data_metrics`` in
``verl.trainer.ppo.ray_trainer`` (:func:`install_trainer_hooks`): ``"pama_grpo"`` then gets ``[B, T, n]``
token rewards built from those scores, and the metrics see the objective mean of ``[B, T, n]``
advantages (plus one entry per objective). The recipe is in docs/integrations.md.

Options of the combination (method, granularity, Noon, whitening, preferences, process group) are
set with :func:`configure` (verl's actor config has no free-form keys for them), or, for every
process that imports this module (verl's Ray workers included), from the environment variable
``PAMA_EXT_VERL_OPTIONS`` holding a JSON object of the same options, e.g.
``{"method": "pama", "granularity": "sequence"}``. The clip range, dual clip and loss aggregation
come from verl's actor config as for its ``"vanilla"`` loss.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import functional, ops
from ._common import (
    check_pama_options,
    call_policy_loss,
    objectives_first,
    rescale_to_global,
    scalar_metrics,
)

__all__ = [
    "LOSS_NAME",
    "ESTIMATOR_NAME",
    "PamaVerlOptions",
    "configure",
    "configure_from_env",
    "options",
    "compute_policy_loss_pama",
    "compute_pama_grpo_advantage",
    "compute_multi_gae_advantage_return",
    "vanilla_metrics",
    "config_value",
    "register",
    "replace_registered",
    "objective_keys",
    "per_objective_token_rewards",
    "make_compute_advantage",
    "make_compute_data_metrics",
    "install_trainer_hooks",
    "TRAINER_MODULE",
    "VERL_AVAILABLE",
    "VERL_IMPORT_ERROR",
    "TRAINER_HOOKS_ERROR",
]

LOSS_NAME = "pama"
ESTIMATOR_NAME = "pama_grpo"

#: verl's loss_agg_mode values and the op aggregation each one is computed with (then rescaled).
_VERL_AGG = {
    "token-mean": "token-mean",
    "token-sum": "token-mean",
    "seq-mean-token-mean": "seq-mean-token-mean",
    "seq-mean-token-sum": "seq-mean-token-sum",
    "seq-mean-token-sum-norm": "seq-mean-token-sum",
}


@dataclasses.dataclass
class PamaVerlOptions:
    """Options of the registered ``"pama"`` loss.

    ``whiten`` is off by default: verl's estimators (and ``"pama_grpo"``) already normalise the
    advantages over the whole batch before it is split into micro-batches, and the loss sees one
    micro-batch at a time. ``group`` is a ``torch.distributed`` process group over which the
    statistics and denominators are all-reduced (passed to the op only when set).
    """

    method: str = "pama"
    granularity: str = "token"
    noon: bool = True
    whiten: bool = False
    prefs: Optional[Any] = None
    group: Optional[Any] = None
    check_finite: bool = True

    def __post_init__(self) -> None:
        self.prefs = check_pama_options(self.method, self.granularity, self.prefs)


_OPTIONS = PamaVerlOptions()


def configure(**kwargs: Any) -> PamaVerlOptions:
    """Set the options of the registered ``"pama"`` loss (fields of :class:`PamaVerlOptions`).

    Unknown keys raise ``TypeError``; the options apply to every later call of the loss in this
    process (call it in the worker, e.g. from the module verl imports as ``external_lib``).
    """
    global _OPTIONS
    fields = {f.name for f in dataclasses.fields(PamaVerlOptions)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise TypeError(f"configure: unknown option(s) {unknown}; expected some of {sorted(fields)}")
    merged = {f: getattr(_OPTIONS, f) for f in fields}
    merged.update(kwargs)
    _OPTIONS = PamaVerlOptions(**merged)
    return _OPTIONS


def configure_from_env(var: str = "PAMA_EXT_VERL_OPTIONS") -> Optional[PamaVerlOptions]:
    """Apply the JSON options in environment variable ``var`` (if set); called on import."""
    text = os.environ.get(var, "").strip()
    if not text:
        return None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{var}: expected a JSON object of pama options, got {text!r} ({e})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{var}: expected a JSON object of pama options, got {text!r}")
    if "group" in values:
        raise ValueError(f"{var}: a process group cannot come from the environment; use configure(group=...)")
    return configure(**values)


def options() -> PamaVerlOptions:
    """The options the registered loss uses now."""
    return _OPTIONS


def config_value(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` from a verl config (dict, OmegaConf, dataclass with or without ``get``), else ``default``."""
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(key, default)
    getter = getattr(config, "get", None)
    if callable(getter):
        try:
            return getter(key, default)
        except Exception:  # noqa: BLE001 - dataclass configs without a permissive get
            pass
    return getattr(config, key, default)


def compute_policy_loss_pama(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config: Optional[Any] = None,
    rollout_is_weights: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """verl policy loss (signature of verl's ``PolicyLossFn``) with the PAMA combination.

    ``advantages``: ``[B, T]`` or ``[B, T, n]`` (objectives last). Clip range from
    ``config.clip_ratio`` / ``clip_ratio_low`` / ``clip_ratio_high``, dual clip from
    ``config.clip_ratio_c`` (default 3), global normalisation from ``config.global_batch_info``
    (``dp_size``, ``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor``) as verl's
    ``agg_loss`` applies it. Returns ``(loss, metrics)``; the metrics are scalar device tensors
    (``actor/pg_clipfrac``, ``actor/ppo_kl`` and ``actor/pg_clipfrac_lower`` as verl's vanilla loss
    reports them, ``actor/pama/...`` per objective).
    """
    if rollout_is_weights is not None:
        raise ValueError(
            "rollout_is_weights: per-token rollout-correction weights are not supported by the 'pama' loss "
            "(disable the actor's policy_loss.rollout_correction)"
        )
    if loss_agg_mode not in _VERL_AGG:
        raise ValueError(f"loss_agg_mode: expected one of {tuple(_VERL_AGG)}, got {loss_agg_mode!r}")
    opts = _OPTIONS
    clip = config_value(config, "clip_ratio", 0.2)
    eps_lo = config_value(config, "clip_ratio_low", None)
    eps_hi = config_value(config, "clip_ratio_high", None)
    eps_lo = clip if eps_lo is None else eps_lo
    eps_hi = clip if eps_hi is None else eps_hi
    dual_clip = config_value(config, "clip_ratio_c", 3.0)
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"clip_ratio_c: the dual-clip constant must be > 1, got {dual_clip}")
    info = dict(config_value(config, "global_batch_info", None) or {})

    adv = objectives_first(advantages, response_mask, "objectives last, as verl's batch carries them")
    n = adv.shape[0]
    agg = _VERL_AGG[loss_agg_mode]
    loss, metrics = call_policy_loss(
        log_prob, old_log_prob, adv, response_mask, None, opts.group,
        eps_lo=float(eps_lo), eps_hi=float(eps_hi), dual_clip=dual_clip, noon=opts.noon, whiten=opts.whiten,
        method=opts.method, granularity=opts.granularity, prefs=opts.prefs, agg=agg, check_finite=opts.check_finite,
    )
    global_count = info.get("batch_num_tokens") if agg == "token-mean" else info.get("global_batch_size")
    if loss_agg_mode == "token-sum":
        global_count = 1  # sum = mean * count
    dp_size = info.get("dp_size")
    loss = rescale_to_global(
        loss, response_mask, agg, dp_size=1 if dp_size is None else dp_size,
        batch_num_tokens=global_count if agg == "token-mean" else None,
        global_batch_size=global_count if agg != "token-mean" else None, group=opts.group,
    )
    if loss_agg_mode == "seq-mean-token-sum-norm":
        factor = info.get("loss_scale_factor")
        loss = loss / float(response_mask.shape[-1] if factor is None else factor)

    out = {"actor/pg_clipfrac": metrics["clipfrac"].detach()}
    out.update(vanilla_metrics(old_log_prob, log_prob, adv, response_mask, float(eps_lo), float(eps_hi), dual_clip))
    out.update(scalar_metrics(metrics, "actor/pama/", n))
    return loss, out


def vanilla_metrics(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                    eps_lo: float, eps_hi: float, dual_clip: Optional[float]) -> Dict[str, Tensor]:
    """``actor/ppo_kl`` and ``actor/pg_clipfrac_lower`` as verl's vanilla loss computes them.

    ``ppo_kl``: the masked mean of ``-clamp(log_prob - old_log_prob, -20, 20)`` (verl's ``masked_mean``,
    ``+ 1e-8`` in the denominator). ``pg_clipfrac_lower``: the fraction of tokens where the dual clip
    bounds the loss of a negative advantage; ``advantages`` is objective-first ``[n, B, T]`` and the
    fraction is averaged over the objectives (for one objective it is verl's number). Scalar device
    tensors, no gradient.
    """
    with torch.no_grad():
        m = (response_mask != 0).to(log_prob.dtype)
        denom = m.sum() + 1e-8
        neg_kl = torch.clamp(log_prob.detach() - old_log_prob.to(log_prob.dtype), min=-20.0, max=20.0)
        out = {"actor/ppo_kl": (-neg_kl * m).sum() / denom}
        if dual_clip is None:
            out["actor/pg_clipfrac_lower"] = torch.zeros((), dtype=log_prob.dtype, device=log_prob.device)
            return out
        adv = advantages.to(log_prob.dtype)
        ratio = torch.exp(neg_kl)
        clipped = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - eps_lo, 1.0 + eps_hi))
        lower = ((clipped > -adv * float(dual_clip)) & (adv < 0)).to(log_prob.dtype).mean(0)
        out["actor/pg_clipfrac_lower"] = (lower * m).sum() / denom
    return out


def _group_ids(index: Any, device: torch.device) -> Tuple[Tensor, int]:
    """Dense group ids ``[B]`` from verl's host-side ``uid`` array (any hashable values) and their number."""
    seen: Dict[Any, int] = {}
    ids = [seen.setdefault(u, len(seen)) for u in np.asarray(index, dtype=object).tolist()]
    return torch.as_tensor(ids, dtype=torch.long, device=device), len(seen)


def compute_pama_grpo_advantage(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: Optional[Any] = None,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: Optional[bool] = None,
    config: Optional[Any] = None,
    **kwargs: Any,
) -> Tuple[Tensor, Tensor]:
    """Per-objective GRPO advantages (verl's estimator signature), objectives last.

    ``token_level_rewards``: ``[B, T, n]`` (or ``[B, T]`` for one objective). For each objective,
    the sequence score ``s_i[b] = sum_t r_i[b, t]`` is normalised within its prompt group (``index``,
    verl's ``uid``): ``(s - mean_group) / (std_group + epsilon)`` (``std`` unbiased; a group of one
    gets mean 0 and std 1, as verl's GRPO), or ``s - mean_group`` when ``norm_adv_by_std_in_grpo`` is
    False (default: ``config.norm_adv_by_std_in_grpo`` of verl's algorithm config, else True -- verl
    passes only ``token_level_rewards``, ``response_mask``, ``index`` and ``config`` to a registered
    estimator); then broadcast over the response tokens. Returns ``(advantages, returns)``, both
    ``[B, T, n]`` (equal, as for verl's outcome estimators).
    """
    del kwargs
    if norm_adv_by_std_in_grpo is None:
        norm_adv_by_std_in_grpo = bool(config_value(config, "norm_adv_by_std_in_grpo", True))
    if index is None:
        raise ValueError("index: pama_grpo needs the prompt-group ids (verl's non_tensor_batch['uid'])")
    adv = objectives_first(token_level_rewards, response_mask, "one reward per objective, objectives last")
    with torch.no_grad():
        scores = adv.sum(-1).to(torch.float32)  # [n, B]
        B = scores.shape[1]
        if len(index) != B:
            raise ValueError(f"index: {len(index)} group ids for a batch of {B} responses")
        g, groups = _group_ids(index, scores.device)
        count = torch.zeros(groups, device=scores.device).index_add_(0, g, torch.ones(B, device=scores.device))
        mean = torch.zeros(scores.shape[0], groups, device=scores.device).index_add_(1, g, scores) / count
        dev = scores - mean[:, g]
        var = torch.zeros_like(mean).index_add_(1, g, dev.square()) / (count - 1).clamp(min=1)
        single = (count == 1)[g]
        mean_b = torch.where(single, torch.zeros_like(dev), mean[:, g])
        std_b = torch.where(single, torch.ones_like(dev), var.sqrt()[:, g])
        a = scores - mean_b
        if norm_adv_by_std_in_grpo:
            a = a / (std_b + epsilon)
        m = (response_mask != 0).to(token_level_rewards.dtype)
        out = a.to(token_level_rewards.dtype)[:, :, None] * m  # [n, B, T]
        out = out.permute(1, 2, 0)
        if token_level_rewards.dim() == 2:
            out = out[..., 0]
        out = out.contiguous()
    return out, out


def compute_multi_gae_advantage_return(
    token_level_rewards: Tensor,
    values: Tensor,
    response_mask: Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
    whiten: bool = True,
) -> Tuple[Tensor, Tensor]:
    """Multi-objective GAE for a critic with one value head per objective, objectives last.

    ``token_level_rewards`` and ``values``: ``[B, T, n]``. Runs :func:`pama_ext.multi_gae` (all
    objectives and rows in one launch) and, with ``whiten``, whitens each objective over the
    masked tokens as verl's GAE estimator does. Returns ``(advantages, returns)``, ``[B, T, n]``.
    """
    layout = "one reward / value per objective, objectives last"
    r = objectives_first(token_level_rewards, response_mask, layout)
    v = objectives_first(values, response_mask, layout)
    if r.shape != v.shape:
        raise ValueError(f"values: shape {tuple(values.shape)} does not match token_level_rewards "
                         f"{tuple(token_level_rewards.shape)}")
    with torch.no_grad():
        adv, ret = ops.multi_gae(r, v, response_mask, gamma, lam)
        if whiten:
            adv = functional.masked_whiten(adv, response_mask)
        adv, ret = adv.permute(1, 2, 0).contiguous(), ret.permute(1, 2, 0).contiguous()
    return adv, ret


def _same_definition(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are the same function or class, possibly from two loads of one module
    (``importlib.reload``, autoreload): same module and qualified name."""
    return a is b or (getattr(a, "__module__", None) == getattr(b, "__module__", None)
                      and getattr(a, "__qualname__", None) == getattr(b, "__qualname__", None))


def replace_registered(table: Any, name: str, obj: Any) -> None:
    """Drop ``table[name]`` when it holds an earlier load of ``obj`` so that registering ``obj`` again
    (after a reload of this module) replaces it instead of failing; anything else under the name is
    left for the registry's own clash check."""
    if isinstance(table, dict) and name in table and _same_definition(table[name], obj):
        del table[name]


def register(registry: Optional[Any] = None, loss_name: str = LOSS_NAME,
             estimator_name: str = ESTIMATOR_NAME) -> Any:
    """Register the loss and the estimator; returns the registry used.

    ``registry`` defaults to ``verl.trainer.ppo.core_algos`` (imported here); any object with
    ``register_policy_loss(name)`` and ``register_adv_est(name)`` decorators works. Registering again
    is allowed, also after this module was reloaded (the reloaded functions replace the old ones);
    another function already registered under one of the names is an error (verl's check).
    """
    if registry is None:
        from verl.trainer.ppo import core_algos as registry  # noqa: PLC0415 - lazy: verl is optional
    replace_registered(getattr(registry, "POLICY_LOSS_REGISTRY", None), loss_name, compute_policy_loss_pama)
    replace_registered(getattr(registry, "ADV_ESTIMATOR_REGISTRY", None), estimator_name,
                       compute_pama_grpo_advantage)
    registry.register_policy_loss(loss_name)(compute_policy_loss_pama)
    registry.register_adv_est(estimator_name)(compute_pama_grpo_advantage)
    return registry


# ------------------------------------------------------------------------------------------------
# verl's trainer (driver side): per-objective rewards into the estimator, [B, T, n] into the metrics
# ------------------------------------------------------------------------------------------------
def objective_keys(algo_config: Any) -> Optional[list]:
    """The per-objective reward keys of verl's algorithm config (``algorithm.gdpo_reward_keys``: the
    keys of the reward function's returned dict, one per objective), or None."""
    keys = config_value(algo_config, "gdpo_reward_keys", None)
    return None if keys is None else [str(k) for k in keys]


def per_objective_token_rewards(data: Any, keys: list) -> Tensor:
    """``[B, T, n]`` token rewards from the per-objective scores in ``data.non_tensor_batch[key]``.

    Each objective's score sits on the response's last token (verl's placement of a scalar reward).
    Where verl's KL-in-reward changed the rewards (``token_level_rewards - token_level_scores``), that
    penalty is added to every objective.
    """
    nt = data.non_tensor_batch
    missing = [k for k in keys if k not in nt]
    if missing:
        raise ValueError(
            f"algorithm.gdpo_reward_keys: {missing} not in the batch's reward extra info (has {sorted(nt)}); "
            f"use reward.reward_manager.name=pama_multi or a compute_score that returns these keys"
        )
    batch = data.batch
    mask = batch["response_mask"]
    B, T = mask.shape
    scores = torch.as_tensor(np.stack([np.asarray(nt[k], dtype=np.float32) for k in keys], axis=-1),
                             device=mask.device)
    if "prompts" in batch.keys() and "attention_mask" in batch.keys():
        length = batch["attention_mask"][:, batch["prompts"].shape[-1]:].sum(-1)
    else:
        length = (mask != 0).sum(-1)
    last = (length.long() - 1).clamp(min=0)
    rewards = torch.zeros(B, T, len(keys), dtype=torch.float32, device=mask.device)
    rewards[torch.arange(B, device=mask.device), last] = scores
    if "token_level_rewards" in batch.keys() and "token_level_scores" in batch.keys():
        penalty = batch["token_level_rewards"] - batch["token_level_scores"]
        if penalty.dim() == 2:
            rewards = rewards + penalty.to(rewards.dtype).unsqueeze(-1)
    return rewards


def _hook(fn: Any, original: Any) -> Any:
    fn.__wrapped__ = original
    fn.pama_hook = True
    return fn


def _unhooked(fn: Any) -> Any:
    while getattr(fn, "pama_hook", False):
        fn = fn.__wrapped__
    return fn


def make_compute_advantage(original: Any) -> Any:
    """verl's ``compute_advantage`` that, for ``adv_estimator == "pama_grpo"`` with
    ``algorithm.gdpo_reward_keys`` set, hands the estimator ``[B, T, n]`` token rewards built from the
    per-objective scores (:func:`per_objective_token_rewards`); ``token_level_rewards`` itself keeps
    verl's ``[B, T]`` (the summed score). Every other estimator goes to ``original`` untouched."""
    original = _unhooked(original)

    def compute_advantage(data: Any, adv_estimator: Any, *args: Any, **kwargs: Any) -> Any:
        keys = objective_keys(kwargs.get("config"))
        if str(getattr(adv_estimator, "value", adv_estimator)) != ESTIMATOR_NAME or not keys:
            return original(data, adv_estimator, *args, **kwargs)
        flat = data.batch["token_level_rewards"]
        data.batch["token_level_rewards"] = per_objective_token_rewards(data, keys)
        try:
            out = original(data, adv_estimator, *args, **kwargs)
        finally:
            data.batch["token_level_rewards"] = flat
        return out

    return _hook(compute_advantage, original)


def make_compute_data_metrics(original: Any) -> Any:
    """verl's ``compute_data_metrics`` that accepts per-objective ``[B, T, n]`` advantages and returns.

    verl's metrics are computed on the mean over the objectives (``critic/advantages/*`` and
    ``critic/returns/*`` then describe that summary) and each objective adds
    ``critic/pama/advantages/<i>/{mean,max,min}``. ``[B, T]`` batches go to ``original`` untouched.
    """
    original = _unhooked(original)

    def compute_data_metrics(batch: Any, use_critic: bool = True) -> Dict[str, Any]:
        td = batch.batch
        adv = td["advantages"]
        if adv.dim() != 3:
            return original(batch=batch, use_critic=use_critic)
        saved = {k: td[k] for k in ("advantages", "returns", "values") if k in td.keys() and td[k].dim() == 3}
        try:
            for k, v in saved.items():
                td[k] = v.mean(-1)
            metrics = original(batch=batch, use_critic=use_critic)
        finally:
            for k, v in saved.items():
                td[k] = v
        mask = td["response_mask"].bool()
        with torch.no_grad():
            for i in range(adv.shape[-1]):
                valid = torch.masked_select(adv[..., i], mask)
                if valid.numel() == 0:
                    continue
                for stat, fn in (("mean", torch.mean), ("max", torch.max), ("min", torch.min)):
                    metrics[f"critic/pama/advantages/{i}/{stat}"] = fn(valid).item()
        return metrics

    return _hook(compute_data_metrics, original)


#: verl's trainer modules whose module-level ``compute_advantage`` / ``compute_data_metrics`` the
#: hooks replace (the legacy ``RayPPOTrainer.fit`` looks both up there at every step).
TRAINER_MODULE = "verl.trainer.ppo.ray_trainer"


def install_trainer_hooks(module: Optional[Any] = None) -> Any:
    """Replace ``compute_advantage`` and ``compute_data_metrics`` in verl's trainer module (default:
    ``verl.trainer.ppo.ray_trainer``, imported here) by :func:`make_compute_advantage` /
    :func:`make_compute_data_metrics` around verl's own. Idempotent, also across reloads of this
    module; returns the module."""
    if module is None:
        import importlib

        module = importlib.import_module(TRAINER_MODULE)
    module.compute_advantage = make_compute_advantage(module.compute_advantage)
    module.compute_data_metrics = make_compute_data_metrics(module.compute_data_metrics)
    return module


configure_from_env()

VERL_IMPORT_ERROR: Optional[BaseException] = None
TRAINER_HOOKS_ERROR: Optional[BaseException] = None
VERL_AVAILABLE = False
try:  # register on import where verl is installed (its workers import this module as an external lib)
    register()
    VERL_AVAILABLE = True
except ImportError as _e:  # verl, or one of its import-time dependencies (ray, tensordict, ...), is absent
    VERL_IMPORT_ERROR = _e
except Exception as _e:  # noqa: BLE001 - an installed but incompatible verl: say so, keep this module usable
    import warnings

    VERL_IMPORT_ERROR = _e
    warnings.warn(f"pama_ext.integrations.verl: could not register with verl ({_e!r}); "
                  f"call register() once verl imports", RuntimeWarning, stacklevel=2)
if VERL_AVAILABLE:
    try:  # the reward manager and the driver-side hooks need verl's trainer stack (ray, torchdata, ...)
        from . import verl_reward

        verl_reward.register()
        install_trainer_hooks()
    except ImportError as _e:
        TRAINER_HOOKS_ERROR = _e
