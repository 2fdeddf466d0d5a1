"""Configuration of the multi-objective PPO trainer: one dataclass, every field documented.

The same fields are the flags of ``pama-ext train`` (``--batch-size`` for ``batch_size``) and the
keys of a YAML file given with ``--config`` (either spelling); precedence is dataclass default <
YAML file < explicit flag. :meth:`TrainConfig.validate` checks every value up front and raises a
:class:`ConfigError` whose message starts with the flag it is about, e.g.
``--method: expected one of pama, morlhf, linear, mgda-ub, mgda; got 'foo'``. The plumbing (fields,
flags, YAML, coercion) is :mod:`pama_ext.lm.config`, shared with ``pama-ext dpo``.

The methods are one table, :data:`METHOD_TABLE`: what each passes to ``pama_policy_loss`` and how it
combines the objectives otherwise (see :mod:`pama_ext.trainer.ppo`).

This module imports nothing heavy (no torch, no transformers), so ``pama-ext --help`` stays fast.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

from .. import vocab
from ..lm import config as lmc
from ..lm.config import (DEVICES, OBJECTIVE_FORMS, TINY, ConfigError, check_number, check_objectives_and_weights,
                         check_run_fields, coerce_fields, config_dict, dump_yaml, flag, normalize_keys,
                         normalized_weights, option)

__all__ = ["TrainConfig", "Method", "METHOD_TABLE", "METHODS", "GRANULARITIES", "AGGS", "WHITEN_SCOPES", "DTYPES",
           "UPDATE_NORMS", "RATIO_TO", "NOON_ORDERS", "ConfigError", "load_config", "load_yaml", "dump_yaml", "flag"]


@dataclass(frozen=True)
class Method:
    """How a ``--method`` combines the objectives.

    ``op_method``: the weighting method of ``pama_policy_loss`` (one fused loss over the n objectives),
    or None for the MGDA methods (n per-objective losses, combined with the min-norm weights of the Gram
    of their gradients). ``granularity``: passes ``--granularity`` to the op. ``prefs``: passes the
    preference weights ``--weights`` to the op. ``steerable``: passes ``--weights`` to the op when they are
    given (pama: the weighted Theorem 1 of docs/algorithms.md §4b; without them, plain Theorem 1). ``scalarised``: the rewards are scalarised to
    ``sum_i w_i R_i`` before GAE (one value head). ``noon``: Noon clipping always (True), never (False) or
    as ``--noon`` says (None, default off). ``mgda_gradients``: what MGDA differentiates the losses with
    respect to, ``"hidden"`` (the final hidden states) or ``"parameters"`` (every trainable parameter).
    """
    op_method: Optional[str]
    noon: Optional[bool] = False
    granularity: bool = False
    prefs: bool = False
    steerable: bool = False
    scalarised: bool = False
    mgda_gradients: Optional[str] = None


#: every --method, in the order of the help text
METHOD_TABLE: Dict[str, Method] = {
    "pama": Method("pama", noon=True, granularity=True, steerable=True),
    "morlhf": Method("linear", scalarised=True),
    "linear": Method("linear", noon=None, prefs=True),
    "mgda-ub": Method(None, mgda_gradients="hidden"),
    "mgda": Method(None, mgda_gradients="parameters"),
}
METHODS = tuple(METHOD_TABLE)
GRANULARITIES = vocab.GRANULARITIES
AGGS = vocab.AGG_MODES
WHITEN_SCOPES = ("batch", "minibatch", "none")
#: --dtype: the autocast dtype of the forward passes (fp32: no autocast)
DTYPES = ("fp32", "bf16", "fp16")
#: --update-norm: how the policy-gradient loss of a Noon method is scaled
UPDATE_NORMS = ("none", "active")
#: --ratio-to: the policy the PPO ratio (and its clip) is taken against
RATIO_TO = ("rollout", "ref")
#: --noon-order: Noon on the whitened advantages (before: whiten, then clip) or on the raw ones (after)
NOON_ORDERS = ("whiten-first", "noon-first")


@dataclass
class TrainConfig:
    """Every setting of a training run (see docs/trainer.md)."""

    # --- model and data --------------------------------------------------------------------------
    model: str = option(TINY, "Hugging Face causal LM (local path or hub id), or 'tiny' for the embedded tiny "
                          "world (built on first use and cached; no downloads)", group="model and data")
    tokenizer: Optional[str] = option(None, "tokenizer path or id (default: the model's)", group="model and data")
    tiny_world_cache: Optional[str] = option(None, "parent directory of the tiny-world cache (default: "
                                               "$PAMA_EXT_CACHE or ~/.cache/pama_ext)", group="model and data")
    tiny_world_seconds: float = option(120.0, "pretraining wall time of the tiny world when it has to be built",
                                   group="model and data")
    train_prompts: Optional[str] = option(None, "training prompts: a .txt file (one per line), a .json list or "
                                            ".jsonl with a 'prompt' field (default: the tiny world's)",
                                      group="model and data")
    eval_prompts: Optional[str] = option(None, "held-out evaluation prompts, same formats (default: the tiny "
                                           "world's)", group="model and data")
    max_prompt_tokens: int = option(64, "prompts longer than this many tokens are cut on the left",
                                group="model and data")

    # --- objectives ------------------------------------------------------------------------------
    objectives: List[str] = option(["sentiment", "length"], f"objectives (one reward each): {OBJECTIVE_FORMS}",
                               group="objectives", metavar="OBJ")
    weights: Optional[List[float]] = option(None, "preference weights w of the objectives for morlhf / linear "
                                              "(normalised to sum 1; default uniform); for pama they steer Theorem 1 "
                                              "(weighted Tchebycheff per token: min_i N_i / (n w_i), docs/algorithms.md "
                                              "§4b; every weight > 0; token or batch granularity; default: plain "
                                              "Theorem 1)", group="objectives", metavar="W")
    length_l0: float = option(160.0, "length objective: clip(len_chars / L0, lo, hi); this is L0 (characters)",
                          group="objectives")
    length_lo: float = option(0.0, "length objective: lower clip bound lo", group="objectives")
    length_hi: float = option(1.0, "length objective: upper clip bound hi", group="objectives")

    # --- method ----------------------------------------------------------------------------------
    method: str = option("pama", "how the objectives are combined: pama (Noon PPO + closed-form Pareto weights), "
                             "morlhf (scalarised reward, one value head), linear (advantage-level weighted "
                             "sum), mgda-ub (min-norm weights of the gradients w.r.t. the final hidden "
                             "states), mgda (full parameter gradients; slow by design)",
                     choices=METHODS, group="method")
    granularity: str = option("token", "pama: apply Theorem 1 per token, per sequence or per batch",
                          choices=GRANULARITIES, group="method")
    noon: Optional[bool] = option(None, "linear only: clip negative whitened advantages to zero (default off; "
                                    "pama always uses Noon, morlhf / mgda-ub / mgda never do)", group="method")
    update_norm: str = option("none", "Noon methods (pama, linear --noon): 'active' divides the policy-gradient "
                                  "loss by the fraction of tokens whose combined advantage is positive (the "
                                  "loss becomes a mean over the active tokens, so the update is as large as "
                                  "PPO's; the direction, hence Theorem 1's, is unchanged); 'none' keeps the "
                                  "mean over all tokens", choices=UPDATE_NORMS, group="method")
    ratio_to: str = option("rollout", "the PPO ratio pi_theta / pi_x and its clip: x = the rollout policy (PPO, "
                                    "default) or the frozen reference model (ref, as in the PAMA paper's "
                                    "objective); the KL penalty is unchanged", choices=RATIO_TO, group="method")
    noon_order: str = option("whiten-first", "Noon methods with --whiten batch: whiten-first clips the whitened "
                                             "advantages, max((A - mean) / std, 0) (default); noon-first clips the "
                                             "raw GAE advantages first and then scales them to unit variance "
                                             "without re-centring, max(A, 0) / std(max(A, 0)) (centring would undo "
                                             "the clip)", choices=NOON_ORDERS, group="method")
    whiten: str = option("batch", "advantage whitening per objective over the whole rollout batch (as TRL/verl), "
                              "per minibatch (inside the fused loss) or none", choices=WHITEN_SCOPES,
                     group="method")

    # --- PPO -------------------------------------------------------------------------------------
    steps: int = option(40, "number of PPO steps (rollout + update)", group="PPO")
    batch_size: int = option(32, "prompts (responses) per rollout", group="PPO")
    minibatch_size: int = option(16, "responses per optimizer step", group="PPO")
    ppo_epochs: int = option(2, "passes over each rollout batch", group="PPO")
    rollout_chunk: int = option(64, "responses generated by one generate call; chunk k of a step is sampled with "
                                "its own seed (seed, step) + k, so a sharded run (torchrun) samples what one "
                                "process does when the chunk divides --batch-size / world size", group="PPO")
    lr: float = option(3e-4, "AdamW learning rate (constant)", group="PPO")
    weight_decay: float = option(0.0, "AdamW weight decay", group="PPO")
    adam_eps: float = option(1e-8, "AdamW epsilon", group="PPO")
    max_grad_norm: float = option(1.0, "gradient clipping by global norm (0 disables)", group="PPO")
    vf_coef: float = option(0.1, "weight of the value loss", group="PPO")
    cliprange: float = option(0.2, "PPO ratio clip epsilon (low side), in [0, 1)", group="PPO")
    cliprange_high: Optional[float] = option(None, "PPO ratio clip epsilon, high side (default: --cliprange)",
                                         group="PPO")
    dual_clip: Optional[float] = option(3.0, "dual-clip constant for negative advantages (null disables)",
                                    group="PPO")
    cliprange_value: float = option(0.2, "value clip epsilon", group="PPO")
    gamma: float = option(1.0, "GAE discount", group="PPO")
    lam: float = option(0.95, "GAE lambda", group="PPO")
    agg: str = option("token-mean", "loss aggregation (verl's agg_loss)", choices=AGGS, group="PPO")
    kl_coef: float = option(0.02, "initial coefficient of the per-token KL penalty in the rewards", group="PPO")
    adaptive_kl: bool = option(True, "adapt the KL coefficient towards --target-kl (TRL's controller)", group="PPO")
    target_kl: float = option(4.0, "target KL to the reference (nats per response, summed over tokens)",
                          group="PPO")
    kl_horizon: float = option(10000.0, "horizon of the adaptive KL controller (in responses)", group="PPO")
    kl_loss_coef: float = option(0.0, "weight of an extra k3 KL loss to the reference (GRPO style; 0 = off)",
                             group="PPO")

    # --- memory and precision --------------------------------------------------------------------
    dtype: str = option("fp32", "autocast dtype of the model's forward passes (rollout scoring and the update; "
                              "generation too); the weights, optimizer state, losses and statistics stay float32",
                    choices=DTYPES, group="memory and precision")
    gradient_checkpointing: bool = option(False, "recompute each transformer block's activations in the backward "
                                                 "instead of keeping them (the model's own checkpointing; dropout "
                                                 "stays off)", group="memory and precision")
    lora_r: int = option(0, "LoRA rank of the policy's adapters (through peft; 0: full fine-tuning). The reference "
                            "policy is the same model with its adapters off (no copy of the weights)",
                     group="memory and precision")
    lora_alpha: float = option(16.0, "LoRA alpha (the adapters' scale is alpha / r)", group="memory and precision")
    lora_targets: Optional[List[str]] = option(None, "module names the adapters go on (default: peft's for the "
                                                     "architecture, e.g. c_attn for GPT-2)",
                                               group="memory and precision", metavar="NAME")
    fused_linear: Optional[bool] = option(None, "the output layer fused with the log-probs and the policy loss "
                                                "(pama_ext.fused_linear): the [B, T, V] logits are never "
                                                "materialised. Default: on where the update's loss takes the "
                                                "single pass (pama at token granularity, linear, morlhf: no "
                                                "extra output-layer matmul, less memory), off where it would "
                                                "cost one more output-layer matmul (sequence / batch "
                                                "granularity, mgda-ub, mgda; --fused-linear trades it for the "
                                                "memory)", group="memory and precision")

    # --- generation ------------------------------------------------------------------------------
    max_new_tokens: int = option(32, "maximum response length in tokens", group="generation")
    temperature: float = option(1.0, "sampling temperature (log-probs use the same temperature)", group="generation")
    top_k: int = option(0, "top-k sampling (0 = off)", group="generation")
    top_p: float = option(1.0, "nucleus sampling (1 = off)", group="generation")

    # --- evaluation ------------------------------------------------------------------------------
    eval_every: int = option(0, "evaluate every k steps (0: only before training and at the end)",
                         group="evaluation")
    eval_size: Optional[int] = option(None, "number of evaluation prompts to use (default: all)", group="evaluation")
    eval_batch_size: int = option(64, "responses per generate call during evaluation", group="evaluation")
    eval_greedy: bool = option(False, "evaluate with greedy decoding instead of sampling with --eval-seed",
                           group="evaluation")
    eval_seed: int = option(1234, "seed of the evaluation sampling (the same for every evaluation and method)",
                        group="evaluation")
    hv_ref: Optional[List[float]] = option(None, "hypervolume reference point, one value per objective "
                                             "(default: the untrained model's means minus --hv-margin)",
                                       group="evaluation", metavar="V")
    hv_margin: float = option(0.1, "margin below the untrained model's means for the default reference point",
                          group="evaluation")

    # --- run -------------------------------------------------------------------------------------
    output_dir: str = option("runs/train", "output directory (config, metrics, tables, plots, checkpoint)",
                         group="run")
    resume: bool = option(False, "continue the run in --output-dir from its checkpoint (bitwise the same run)",
                      group="run")
    overwrite: bool = option(False, "start afresh even if --output-dir already holds a run", group="run")
    save_every: int = option(0, "save a checkpoint every k steps (0: only at the end)", group="run")
    seed: int = option(0, "seed of everything (prompt order, sampling, evaluation order)", group="run")
    device: str = option("cpu", "cpu, cuda or auto", choices=DEVICES, group="run")
    threads: Optional[int] = option(None, "torch CPU threads (default: torch's choice)", group="run")
    progress: bool = option(True, "tqdm progress bars (shown when stderr is a terminal)", group="run")
    log_every: int = option(1, "print a one-line summary every k steps (0: never)", group="run")
    plots: bool = option(True, "write PNG plots at the end (needs matplotlib)", group="run")

    # ---------------------------------------------------------------------------------------------
    @property
    def n_objectives(self) -> int:
        return len(self.objectives)

    @property
    def method_spec(self) -> "Method":
        return METHOD_TABLE[self.method]

    @property
    def n_heads(self) -> int:
        """Value heads: one per objective, one for a scalarised method (morlhf)."""
        return 1 if self.method_spec.scalarised else len(self.objectives)

    @property
    def use_noon(self) -> bool:
        noon = self.method_spec.noon
        return noon if noon is not None else bool(self.noon)

    @property
    def eps_hi(self) -> float:
        return self.cliprange if self.cliprange_high is None else self.cliprange_high

    def normalized_weights(self) -> List[float]:
        return normalized_weights(self.weights, len(self.objectives))

    def to_dict(self) -> Dict[str, Any]:
        return config_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "TrainConfig":
        return cls(**normalize_keys(data, source, cls))

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        """Ranks of a ``torchrun`` launch (the WORLD_SIZE environment variable), 1 otherwise."""
        return int(os.environ.get("WORLD_SIZE", "1") or 1)

    def _validate_data_parallel(self) -> None:
        k = self.world_size
        for name in ("batch_size", "minibatch_size"):
            if getattr(self, name) % k:
                raise ConfigError(f"{flag(name)}: must be divisible by the number of ranks ({k}) under torchrun; "
                                  f"got {getattr(self, name)}")
        per_rank = self.batch_size // k
        chunk = min(self.rollout_chunk, per_rank)
        if per_rank % chunk:
            raise ConfigError(f"--rollout-chunk: must divide --batch-size / ranks ({per_rank}) under torchrun; "
                              f"got {self.rollout_chunk}")
        if self.method_spec.mgda_gradients is not None:
            raise ConfigError(f"--method: {self.method} computes its weights from per-rank gradients and is not "
                              f"supported under torchrun; use pama, linear or morlhf")

    def validate(self) -> "TrainConfig":
        """Coerce types and check every value; raises :class:`ConfigError` naming the flag."""
        coerce_fields(self)

        def positive(name, strict=True):
            check_number(self, name, strict)

        for name in ("steps", "batch_size", "minibatch_size", "ppo_epochs", "rollout_chunk", "max_new_tokens",
                     "eval_batch_size", "max_prompt_tokens", "lr", "temperature", "length_l0", "kl_horizon",
                     "tiny_world_seconds"):
            positive(name)
        for name in ("weight_decay", "adam_eps", "max_grad_norm", "vf_coef", "cliprange_value",
                     "kl_coef", "kl_loss_coef", "eval_every", "save_every", "log_every", "top_k",
                     "hv_margin"):
            positive(name, strict=False)
        if not (0.0 <= self.cliprange < 1.0):  # the ratio's lower clip bound 1 - eps must stay positive
            raise ConfigError(f"--cliprange: expected a number in [0, 1); got {self.cliprange!r}")
        if self.cliprange_high is not None:
            positive("cliprange_high", strict=False)
        if self.dual_clip is not None and not (self.dual_clip > 1.0):
            raise ConfigError(f"--dual-clip: expected a number > 1 (or null to disable); got {self.dual_clip!r}")
        if self.adaptive_kl:
            positive("target_kl")
        for name in ("gamma", "lam", "top_p"):
            v = getattr(self, name)
            if not (0.0 <= v <= 1.0):
                raise ConfigError(f"{flag(name)}: expected a number in [0, 1]; got {v!r}")
        if self.top_p <= 0:
            raise ConfigError(f"--top-p: expected a number in (0, 1]; got {self.top_p!r}")
        if self.minibatch_size > self.batch_size:
            raise ConfigError(f"--minibatch-size: must be at most --batch-size ({self.batch_size}); "
                              f"got {self.minibatch_size}")
        if self.world_size > 1:
            self._validate_data_parallel()
        check_run_fields(self)
        if self.lora_r < 0:
            raise ConfigError(f"--lora-r: expected an integer >= 0 (0: no LoRA); got {self.lora_r!r}")
        if self.lora_r:
            positive("lora_alpha")
            if self.resume:
                raise ConfigError("--resume: not supported with --lora-r (the checkpoint holds the merged weights, "
                                  "not the base model and its adapters)")
        if self.lora_targets is not None and not self.lora_targets:
            raise ConfigError("--lora-targets: expected at least one module name (or leave it unset)")
        if self.resume and self.overwrite:
            raise ConfigError("--resume: cannot be combined with --overwrite")

        # objectives
        check_objectives_and_weights(self.objectives, self.weights)
        n = len(self.objectives)
        if self.hv_ref is not None:
            if len(self.hv_ref) != n:
                raise ConfigError(f"--hv-ref: expected {n} values (one per objective); got {len(self.hv_ref)}")
            if any(not math.isfinite(x) for x in self.hv_ref):
                raise ConfigError(f"--hv-ref: expected finite values; got {self.hv_ref}")
        if self.weights is not None and self.method_spec.steerable:
            if any(not w > 0 for w in self.weights):
                raise ConfigError(f"--weights: --method {self.method} divides by the weights (the weighted Theorem 1, "
                                  f"docs/algorithms.md §4b); expected every weight > 0; got {self.weights}")
            if self.granularity == "sequence":
                raise ConfigError(f"--weights: --method {self.method} takes preference weights at --granularity token "
                                  f"or batch; got --granularity sequence")
        if self.noon_order != "whiten-first" and not (self.use_noon and self.whiten == "batch"):
            raise ConfigError(f"--noon-order: only for Noon methods (pama, or linear with --noon) with --whiten batch; "
                              f"got {self.noon_order!r} with --method {self.method} --whiten {self.whiten}")
        if self.noon is not None and self.method_spec.noon not in (None, self.noon):
            raise ConfigError(f"--noon: only configurable for --method linear (pama always uses Noon; "
                              f"{self.method} never does); got {self.noon} with --method {self.method}")
        if self.update_norm != "none" and not self.use_noon:
            raise ConfigError(f"--update-norm: only for Noon methods (pama, or linear with --noon); got "
                              f"{self.update_norm!r} with --method {self.method}")
        for name, path in (("train_prompts", self.train_prompts), ("eval_prompts", self.eval_prompts)):
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"{flag(name)}: no such file: {path!r}")
        return self


def load_yaml(path: str) -> Dict[str, Any]:
    """The settings of a YAML file, keys checked against :class:`TrainConfig`."""
    return lmc.load_yaml(path, TrainConfig)


def load_config(path: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None) -> TrainConfig:
    """Defaults < YAML file < ``overrides``; validated."""
    return lmc.load_config(TrainConfig, path, overrides)
