"""verl reward manager ``"pama_multi"``: one score per objective, for verl's reward loop.

verl 0.9's reward loop (``verl.experimental.reward_loop``) calls a registered reward manager once per
response (``run_single``) and puts one scalar per response into ``rm_scores``; what the manager
returns as ``reward_extra_info`` lands in the batch's ``non_tensor_batch`` under its own keys. This
manager therefore returns

- ``reward_extra_info[key]``: objective ``key``'s score, for every key of ``algorithm.gdpo_reward_keys``
  (verl's config field naming the per-objective keys of a reward function's returned dict), and
- ``reward_score``: their weighted sum (``algorithm.gdpo_reward_weights``, default all 1), which verl
  logs as ``critic/score``;

and the trainer hook of :mod:`pama_ext.integrations.verl` turns the per-objective scores into the
``[B, T, n]`` token rewards of the ``"pama_grpo"`` estimator. The scores come from the user's reward
function (verl's ``reward.custom_reward_function``, called as verl calls ``compute_score``) returning
a dict with one entry per objective, or from ``reward_fns={key: fn}`` (one function per objective,
same call) when the manager is built in Python.

Importing this module needs verl's reward loop (verl's trainer dependencies); :func:`register` puts
the manager into verl's reward-manager registry (``pama_ext.integrations.verl`` calls it on import).
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Dict, Mapping, Optional

from verl.experimental.reward_loop.reward_manager import register as register_reward_manager
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase
from verl.experimental.reward_loop.reward_manager.registry import REWARD_MANAGER

from .verl import config_value, objective_keys, replace_registered

__all__ = ["REWARD_MANAGER_NAME", "PamaMultiObjectiveRewardManager", "objective_scores", "register"]

REWARD_MANAGER_NAME = "pama_multi"


def objective_scores(result: Any, keys: list) -> list:
    """The per-objective scores (floats, in ``keys`` order) from a reward function's returned dict."""
    if not isinstance(result, Mapping):
        raise TypeError(f"compute_score: expected a dict with one score per objective {keys}, "
                        f"got {type(result).__name__}")
    missing = [k for k in keys if k not in result]
    if missing:
        raise ValueError(f"compute_score: the returned dict has no {missing} (algorithm.gdpo_reward_keys "
                         f"= {keys}; got keys {sorted(result)})")
    scores = [float(result[k]) for k in keys]
    bad = [k for k, v in zip(keys, scores) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"compute_score: non-finite score for objective(s) {bad}")
    return scores


class PamaMultiObjectiveRewardManager(RewardManagerBase):
    """One score per objective per response (see the module docstring); registered as ``"pama_multi"``."""

    def __init__(self, config: Any, tokenizer: Any, compute_score: Optional[Callable[..., Any]] = None,
                 reward_router_address: Optional[str] = None, reward_model_tokenizer: Any = None,
                 reward_fns: Optional[Mapping[str, Callable[..., Any]]] = None):
        super().__init__(config, tokenizer, compute_score)
        algo = config_value(config, "algorithm", None)
        if reward_fns:
            self.reward_fns: Optional[Dict[str, Callable[..., Any]]] = dict(reward_fns)
            keys = list(self.reward_fns)
            configured = objective_keys(algo)
            if configured is not None and configured != keys:
                raise ValueError(f"reward_fns: objectives {keys} differ from algorithm.gdpo_reward_keys {configured}")
        else:
            self.reward_fns = None
            keys = objective_keys(algo)
            if not keys:
                raise ValueError("algorithm.gdpo_reward_keys: the 'pama_multi' reward manager needs the list of "
                                 "per-objective keys the reward function returns (or reward_fns=...)")
            if compute_score is None:
                raise ValueError("compute_score: the 'pama_multi' reward manager needs a reward function "
                                 "(reward.custom_reward_function.path / name) returning one score per objective")
        self.keys = keys
        weights = config_value(algo, "gdpo_reward_weights", None)
        self.weights = [1.0] * len(keys) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(keys):
            raise ValueError(f"algorithm.gdpo_reward_weights: {len(self.weights)} weights for {len(keys)} objectives")
        self.reward_router_address = reward_router_address
        self.reward_model_tokenizer = reward_model_tokenizer

    async def _call(self, fn: Callable[..., Any], kwargs: Dict[str, Any]) -> Any:
        if inspect.iscoroutinefunction(fn):
            return await fn(**kwargs)
        return await self.loop.run_in_executor(None, lambda: fn(**kwargs))

    async def run_single(self, data: Any) -> dict:
        item = data[-1:][0]  # as verl's managers: the last sequence of a multi-sequence output
        response_ids = item.batch["responses"]
        valid = item.batch["attention_mask"][-response_ids.shape[-1]:].sum()
        solution = await self.loop.run_in_executor(
            None, lambda: self.tokenizer.decode(response_ids[:valid], skip_special_tokens=True))
        extra_info = dict(item.non_tensor_batch.get("extra_info", None) or {})
        extra_info["num_turns"] = item.non_tensor_batch.get("__num_turns__", None)
        kwargs = dict(data_source=item.non_tensor_batch["data_source"], solution_str=solution,
                      ground_truth=item.non_tensor_batch["reward_model"]["ground_truth"], extra_info=extra_info)
        if self.reward_router_address is not None:
            kwargs.update(reward_router_address=self.reward_router_address,
                          reward_model_tokenizer=self.reward_model_tokenizer)
        if self.reward_fns is not None:
            result = {k: await self._call(fn, kwargs) for k, fn in self.reward_fns.items()}
        else:
            result = await self._call(self.compute_score, kwargs)
        scores = objective_scores(result, self.keys)
        total = sum(w * s for w, s in zip(self.weights, scores))
        return {"reward_score": total, "reward_extra_info": dict(zip(self.keys, scores))}


def register() -> None:
    """Register :class:`PamaMultiObjectiveRewardManager` as ``"pama_multi"`` in verl's reward-manager
    registry (idempotent, also after a reload of this module)."""
    replace_registered(REWARD_MANAGER, REWARD_MANAGER_NAME, PamaMultiObjectiveRewardManager)
    register_reward_manager(REWARD_MANAGER_NAME)(PamaMultiObjectiveRewardManager)
