"""verl adapter: a policy loss ``"pama"`` and an advantage estimator ``"pama_grpo"`` for verl's registries.

Importing this module registers both with ``verl.trainer.ppo.core_algos`` when verl can be imported
(it is imported lazily, so this module also imports without verl); :func:`register` does the same
explicitly, or into any object that has verl's two decorators ``register_policy_loss(name)`` and
``register_adv_est(name)``.

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

from .. import ops, reference
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
    "register",
    "VERL_AVAILABLE",
    "VERL_IMPORT_ERROR",
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


def _cfg(config: Any, key: str, default: Any = None) -> Any:
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
    (``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pama/...`` per objective).
    """
    if rollout_is_weights is not None:
        raise ValueError(
            "rollout_is_weights: per-token rollout-correction weights are not supported by the 'pama' loss "
            "(disable the actor's policy_loss.rollout_correction)"
        )
    if loss_agg_mode not in _VERL_AGG:
        raise ValueError(f"loss_agg_mode: expected one of {tuple(_VERL_AGG)}, got {loss_agg_mode!r}")
    opts = _OPTIONS
    clip = _cfg(config, "clip_ratio", 0.2)
    eps_lo = _cfg(config, "clip_ratio_low", None)
    eps_hi = _cfg(config, "clip_ratio_high", None)
    eps_lo = clip if eps_lo is None else eps_lo
    eps_hi = clip if eps_hi is None else eps_hi
    dual_clip = _cfg(config, "clip_ratio_c", 3.0)
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"clip_ratio_c: the dual-clip constant must be > 1, got {dual_clip}")
    info = dict(_cfg(config, "global_batch_info", None) or {})

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

    out = {
        "actor/pg_clipfrac": metrics["clipfrac"].detach(),
        "actor/ppo_kl": metrics["approx_kl"].detach(),
    }
    out.update(scalar_metrics(metrics, "actor/pama/", n))
    return loss, out


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
        norm_adv_by_std_in_grpo = bool(_cfg(config, "norm_adv_by_std_in_grpo", True))
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
            adv = reference.masked_whiten(adv, response_mask)
        adv, ret = adv.permute(1, 2, 0).contiguous(), ret.permute(1, 2, 0).contiguous()
    return adv, ret


def register(registry: Optional[Any] = None, loss_name: str = LOSS_NAME,
             estimator_name: str = ESTIMATOR_NAME) -> Any:
    """Register the loss and the estimator; returns the registry used.

    ``registry`` defaults to ``verl.trainer.ppo.core_algos`` (imported here); any object with
    ``register_policy_loss(name)`` and ``register_adv_est(name)`` decorators works.
    """
    if registry is None:
        from verl.trainer.ppo import core_algos as registry  # noqa: PLC0415 - lazy: verl is optional
    registry.register_policy_loss(loss_name)(compute_policy_loss_pama)
    registry.register_adv_est(estimator_name)(compute_pama_grpo_advantage)
    return registry


configure_from_env()

VERL_IMPORT_ERROR: Optional[BaseException] = None
try:  # register on import where verl is installed (its workers import this module as an external lib)
    register()
    VERL_AVAILABLE = True
except ImportError as _e:  # verl, or one of its import-time dependencies (ray, tensordict, ...), is absent
    VERL_AVAILABLE = False
    VERL_IMPORT_ERROR = _e
except Exception as _e:  # noqa: BLE001 - an installed but incompatible verl: say so, keep this module usable
    import warnings

    VERL_AVAILABLE = False
    VERL_IMPORT_ERROR = _e
    warnings.warn(f"pama_ext.integrations.verl: could not register with verl ({_e!r}); "
                  f"call register() once verl imports", RuntimeWarning, stacklevel=2)
