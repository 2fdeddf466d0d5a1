"""Configuration of ``pama-ext dpo``: one dataclass, every field a documented flag and YAML key.

Precedence: dataclass default < ``--config FILE.yaml`` < explicit flag. :meth:`DPOConfig.validate`
checks every value up front and raises :class:`~pama_ext.lm.config.ConfigError` whose message
starts with the flag, e.g. ``--method: expected one of raco, cagrad, dpo-lw, modpo, mopo, mopo-lb; got 'x'``.
The field helpers, the type coercion, the YAML loader and the objective syntax are shared with the PPO
trainer (:mod:`pama_ext.lm.config`). Imports nothing heavy.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

from ..lm import config as lmc
from ..lm.config import (DEVICES, OBJECTIVE_FORMS, TINY, ConfigError, check_number, check_objectives_and_weights,
                         check_run_fields, coerce_fields, config_dict, flag, is_judge_spec, normalize_keys,
                         normalized_weights, option)

#: every method of ``pama-ext dpo`` (the one list: the CLI choices, the demo and the tests read it)
METHODS = ("raco", "cagrad", "dpo-lw", "modpo", "mopo", "mopo-lb")
#: the methods trained on MOPO's response pool by its importance-weighted behaviour cloning
MOPO_METHODS = ("mopo", "mopo-lb")
#: where modpo's margin rewards come from (--modpo-margin)
MODPO_MARGINS = ("auto", "judge", "labels")
#: --objectives of --data tiny when not given
TINY_OBJECTIVES = ("sentiment", "length")
#: --heldout-pairs when not given and some objective has no judge
HELDOUT_DEFAULT = 0.1
#: the micro-batch size when --micro-batch-size is not given (capped at --batch-size for the pair methods)
MICRO_BATCH_DEFAULT = 16

__all__ = ["DPOConfig", "METHODS", "MOPO_METHODS", "load_dpo_config", "normalize_dpo_keys"]


@dataclass
class DPOConfig:
    """Every setting of a preference-data run (see docs/dpo.md)."""

    # --- model and data --------------------------------------------------------------------------
    model: str = option(TINY, "Hugging Face causal LM (local path or hub id), or 'tiny' for the embedded tiny world",
                    group="model and data")
    tokenizer: Optional[str] = option(None, "tokenizer path or id (default: the model's)", group="model and data")
    tiny_world_cache: Optional[str] = option(None, "parent directory of the tiny-world cache (default: $PAMA_EXT_CACHE "
                                               "or ~/.cache/pama_ext)", group="model and data")
    tiny_world_seconds: float = option(120.0, "pretraining wall time of the tiny world when it has to be built",
                                   group="model and data")
    data: str = option(TINY, "preference pairs: a JSONL file (see docs/dpo.md), hf:<dataset>[:<split>] for a local "
                         "Hugging Face dataset, SCHEMA:SOURCE for a published schema (pku, hh, scores, "
                         "ultrafeedback, raco; SOURCE a local .jsonl/.json/.parquet file or save_to_disk directory; "
                         "hh:OBJ=SOURCE,OBJ=SOURCE), or 'tiny' to sample and judge pairs from the model on the tiny "
                         "world's prompts", group="model and data")
    heldout_pairs: Optional[float] = option(None, "share of the --data prompts (with all their pairs) held out for "
                                              "the pair-accuracy evaluation (default: 0.1 when an objective has no "
                                              "judge, else 0)", group="model and data")
    eval_prompts: Optional[str] = option(None, "evaluation prompts: .txt (one per line), .json list or .jsonl with a "
                                           "'prompt' field (default: the tiny world's held-out prompts)",
                                     group="model and data")
    max_prompt_tokens: int = option(64, "prompts longer than this many tokens are cut on the left", group="model and data")
    max_response_tokens: int = option(64, "responses longer than this many tokens (with EOS) are cut",
                                  group="model and data")
    pool_prompts: int = option(128, "--data tiny: number of training prompts to sample responses for",
                           group="model and data")
    responses_per_prompt: int = option(4, "--data tiny: responses sampled per prompt (every distinct pair is labelled)",
                                   group="model and data")
    tie_margin: float = option(0.02, "two judge scores closer than this are a tie (label 0; also the tie rule of the "
                                 "win rates)", group="model and data")

    # --- objectives ------------------------------------------------------------------------------
    objectives: Optional[List[str]] = option(
        None, f"objectives = label keys; a judge ({OBJECTIVE_FORMS}) or a plain name (label-only: no judge, evaluated "
              f"by held-out pair accuracy). Default: helpful safe for pku, the subset names for hh, the choice "
              f"keys for raco, required for scores and ultrafeedback, else sentiment length",
        group="objectives", metavar="OBJ")
    weights: Optional[List[float]] = option(None, "preference weights w (normalised to sum 1; default uniform): the "
                                              "user weights of raco / cagrad, the scalarisation of dpo-lw, the "
                                              "margin weights of modpo", group="objectives", metavar="W")
    length_l0: float = option(160.0, "length judge: clip(len_chars / L0, lo, hi); this is L0 (characters)",
                          group="objectives")
    length_lo: float = option(0.0, "length judge: lower clip bound lo", group="objectives")
    length_hi: float = option(1.0, "length judge: upper clip bound hi", group="objectives")

    # --- method ----------------------------------------------------------------------------------
    method: str = option("raco", "raco (CAGrad-clip on per-objective DPO gradients), cagrad (the same, unclipped), "
                             "dpo-lw (sum of w_i L_i), modpo (DPO on one objective with margins from the others' "
                             "judges, or reward models trained from their labels), mopo (constrained "
                             "importance-weighted behaviour cloning, dual ascent), mopo-lb (the same with a log-barrier "
                             "instead of the multipliers)",
                     choices=METHODS, group="method")
    beta: Optional[float] = option(None, "DPO temperature beta of raco, cagrad, dpo-lw and modpo (default: 0.2 for raco "
                                     "and cagrad, RACO's setting in algorithms §7; 0.1 otherwise)", group="method")
    cagrad_c: float = option(0.4, "raco / cagrad: conflict-averse radius c", group="method")
    length_normalize: bool = option(False, "divide each response log-prob by its token count in the DPO margin",
                                group="method")
    modpo_target: Optional[str] = option(None, "modpo: the objective whose labels are trained on (default: the first)",
                                     group="method")
    modpo_margin: str = option("auto", "modpo: the margin rewards r_j of the other objectives: 'judge' (their judges' "
                                       "scores), 'labels' (MODPO's first stage: a reward model per objective, DPO "
                                       "on its labels, reward beta*log(pi_j/pi_ref)), 'auto' (the judge when the "
                                       "objective names one, else labels)", choices=MODPO_MARGINS, group="method")
    modpo_margin_steps: Optional[int] = option(None, "modpo, first stage: optimizer steps of each margin reward "
                                                     "model (none: as many as --steps)", group="method")
    mopo_primary: Optional[str] = option(None, "mopo: the primary (maximised) objective; the others are constrained "
                                           "(default: the first)", group="method")
    mopo_tau: float = option(0.08, "mopo: KL temperature tau of the closed-form tilt", group="method")
    mopo_epsilon: float = option(0.15, "mopo: KL radius of the robust lower bound of each constraint (the paper's "
                                   "0.15; 0 = plain means); the thresholds are measured with the same bound",
                                 group="method")
    mopo_barrier_sigma: float = option(1e-4, "mopo-lb: weight sigma of the log-barrier sigma * log(LB - b) that "
                                         "replaces the multipliers (lambda = sigma / (LB - b))", group="method")
    mopo_threshold_beta: float = option(0.9995, "mopo: threshold factor beta, b = beta * (secondary values of the "
                                            "lagged policy)", group="method")
    mopo_t0: int = option(500, "mopo: every t0 steps update the thresholds and the reference to the policy of t0 "
                           "steps before (0 = never)", group="method")
    mopo_dual_lr: float = option(0.5, "mopo: step size eta of the lambda / chi updates", group="method")

    # --- optimisation ----------------------------------------------------------------------------
    steps: int = option(60, "optimizer steps", group="optimisation")
    batch_size: int = option(32, "pairs per optimizer step (mopo: prompts per step, each with its stored responses)",
                         group="optimisation")
    micro_batch_size: Optional[int] = option(None, "pairs (mopo: responses) per forward/backward; gradients accumulate "
                                               "over the micro-batches of a step (default: min(--batch-size, "
                                               f"{MICRO_BATCH_DEFAULT}); mopo: {MICRO_BATCH_DEFAULT})",
                                         group="optimisation")
    lr: float = option(2e-4, "AdamW learning rate (constant)", group="optimisation")
    weight_decay: float = option(0.0, "AdamW weight decay", group="optimisation")
    adam_eps: float = option(1e-8, "AdamW epsilon", group="optimisation")
    max_grad_norm: float = option(1.0, "gradient clipping by global norm (0 disables)", group="optimisation")

    # --- generation and evaluation ---------------------------------------------------------------
    max_new_tokens: int = option(40, "response length limit when sampling (tiny pairs and evaluation)",
                             group="evaluation")
    temperature: float = option(1.0, "sampling temperature (tiny pairs and evaluation)", group="evaluation")
    eval_size: Optional[int] = option(64, "number of evaluation prompts (default: all)", group="evaluation")
    eval_samples: int = option(2, "responses per evaluation prompt, for the policy and for the reference",
                           group="evaluation")
    eval_batch_size: int = option(128, "responses per generate call during evaluation", group="evaluation")
    eval_seed: int = option(1234, "seed of the evaluation sampling (the same for every method and for the reference)",
                        group="evaluation")

    # --- run -------------------------------------------------------------------------------------
    output_dir: str = option("runs/dpo", "output directory (config, data, metrics, evaluation, plot, model)", group="run")
    overwrite: bool = option(False, "replace a run already in --output-dir", group="run")
    resume: bool = option(False, "continue the run in --output-dir from its checkpoint (bitwise the same run; "
                                 "--steps may grow)", group="run")
    save_every: int = option(0, "save a checkpoint every k steps (0: only at the end)", group="run")
    save_model: bool = option(True, "save the trained model and tokenizer under <output-dir>/model", group="run")
    seed: int = option(0, "seed of everything (data sampling, batch order)", group="run")
    device: str = option("cpu", "cpu, cuda or auto", choices=DEVICES, group="run")
    threads: Optional[int] = option(None, "torch CPU threads (default: torch's choice)", group="run")
    progress: bool = option(True, "tqdm progress bars (shown when stderr is a terminal)", group="run")
    log_every: int = option(10, "read the step metrics back and print a summary every k steps (0: only at the end)",
                        group="run")
    plots: bool = option(True, "write a PNG plot at the end (needs matplotlib)", group="run")

    # ---------------------------------------------------------------------------------------------
    def normalized_weights(self) -> List[float]:
        return normalized_weights(self.weights, len(self.objectives))

    @property
    def dpo_beta(self) -> float:
        """``--beta``, or its method default (0.2 for raco / cagrad, 0.1 otherwise)."""
        if self.beta is not None:
            return float(self.beta)
        return 0.2 if self.method in ("raco", "cagrad") else 0.1

    @property
    def loss_beta(self) -> float:
        """The temperature ``multi_dpo_loss`` gets: ``--beta``, divided by the target's weight for modpo."""
        if self.method == "modpo":
            return self.dpo_beta / float(self.normalized_weights()[self.modpo_index])
        return self.dpo_beta

    @property
    def judged(self) -> List[str]:
        """The objectives that name a judge (the others are label-only)."""
        return [o for o in self.objectives if is_judge_spec(o)]

    @property
    def heldout_share(self) -> float:
        """``--heldout-pairs``, or its default (0.1 when an objective has no judge and the data is not tiny)."""
        if self.heldout_pairs is not None:
            return float(self.heldout_pairs)
        return HELDOUT_DEFAULT if (self.data != TINY and len(self.judged) < len(self.objectives)) else 0.0

    @property
    def modpo_index(self) -> int:
        return self.objectives.index(self.modpo_target) if self.modpo_target else 0

    @property
    def margin_objectives(self) -> List[str]:
        """modpo: the objectives of the margin (every other objective with a positive weight)."""
        k = self.objectives[self.modpo_index]
        return [o for o, w in zip(self.objectives, self.normalized_weights()) if o != k and w > 0]

    @property
    def margin_judged(self) -> List[str]:
        """modpo: the margin objectives scored by their judges."""
        if self.modpo_margin == "labels":
            return []
        return [o for o in self.margin_objectives if is_judge_spec(o)]

    @property
    def margin_learned(self) -> List[str]:
        """modpo: the margin objectives whose reward model the first stage trains from their labels."""
        return [o for o in self.margin_objectives if o not in self.margin_judged]

    @property
    def margin_steps(self) -> int:
        """``--modpo-margin-steps``, or ``--steps``."""
        return int(self.modpo_margin_steps) if self.modpo_margin_steps is not None else int(self.steps)

    @property
    def is_mopo(self) -> bool:
        """mopo or mopo-lb (trained on the response pool)."""
        return self.method in MOPO_METHODS

    @property
    def barrier_sigma(self) -> float:
        """σ of MOPO-LB's barrier; 0 for mopo (dual ascent on λ)."""
        return float(self.mopo_barrier_sigma) if self.method == "mopo-lb" else 0.0

    @property
    def mopo_index(self) -> int:
        return self.objectives.index(self.mopo_primary) if self.mopo_primary else 0

    def to_dict(self) -> Dict[str, Any]:
        return config_dict(self)

    def replace(self, **changes) -> "DPOConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "DPOConfig":
        """Coerce types and check every value; raises ConfigError naming the flag."""
        coerce_fields(self)
        from .readers import default_objectives, is_schema_spec

        if self.objectives is None:
            if not is_schema_spec(self.data):
                self.objectives = list(TINY_OBJECTIVES)
            elif self.data.startswith(("scores:", "ultrafeedback:")):
                raise ConfigError(f"--objectives: required for --data {self.data.partition(':')[0]}:... (the score "
                                  f"columns / annotation aspects to turn into pair labels)")
            else:
                self.objectives = default_objectives(self.data)
        if self.micro_batch_size is None:
            self.micro_batch_size = (MICRO_BATCH_DEFAULT if self.is_mopo
                                     else min(self.batch_size, MICRO_BATCH_DEFAULT))

        def positive(name, strict=True):
            check_number(self, name, strict)

        if self.beta is not None:
            positive("beta")
        if self.modpo_margin_steps is not None:
            positive("modpo_margin_steps")
        for name in ("steps", "batch_size", "micro_batch_size", "lr", "max_prompt_tokens",
                     "max_response_tokens", "pool_prompts", "max_new_tokens", "temperature", "eval_samples",
                     "eval_batch_size", "length_l0", "mopo_tau", "mopo_dual_lr", "mopo_barrier_sigma",
                     "tiny_world_seconds"):
            positive(name)
        for name in ("weight_decay", "adam_eps", "max_grad_norm", "tie_margin", "cagrad_c", "mopo_epsilon",
                     "mopo_t0", "log_every", "save_every"):
            positive(name, strict=False)
        if self.responses_per_prompt < 2:
            raise ConfigError(f"--responses-per-prompt: expected at least 2 (pairs need two); got "
                              f"{self.responses_per_prompt}")
        if not (0.0 < self.mopo_threshold_beta <= 1.0):
            raise ConfigError(f"--mopo-threshold-beta: expected a number in (0, 1]; got {self.mopo_threshold_beta!r}")
        if self.micro_batch_size > self.batch_size and not self.is_mopo:
            raise ConfigError(f"--micro-batch-size: must be at most --batch-size ({self.batch_size}); "
                              f"got {self.micro_batch_size}")
        check_run_fields(self)
        if self.resume and self.overwrite:
            raise ConfigError("--resume: cannot be combined with --overwrite")
        if not self.data:
            raise ConfigError("--data: expected a JSONL file, hf:<dataset>[:<split>], SCHEMA:SOURCE or 'tiny'; got ''")
        if (self.data != TINY and not self.data.startswith("hf:") and not is_schema_spec(self.data)
                and not os.path.isfile(self.data)):
            raise ConfigError(f"--data: no such file: {self.data!r}")
        if self.heldout_pairs is not None and not (0.0 <= self.heldout_pairs < 1.0):
            raise ConfigError(f"--heldout-pairs: expected a share in [0, 1); got {self.heldout_pairs!r}")
        if self.heldout_pairs and self.data == TINY:
            raise ConfigError("--heldout-pairs: only for a --data file (the tiny world's pairs are judged)")
        if self.data == TINY and self.model != TINY:
            raise ConfigError("--data: 'tiny' samples pairs on the tiny world's prompts and needs --model tiny; give "
                              "a JSONL file or hf:<dataset> for another model")
        if self.eval_prompts is not None and not os.path.isfile(self.eval_prompts):
            raise ConfigError(f"--eval-prompts: no such file: {self.eval_prompts!r}")
        if self.objectives is None:  # the data's label keys: train_dpo validates again once they are known
            return self
        if self.eval_prompts is None and self.model != TINY and self.judged:
            raise ConfigError("--eval-prompts: required when --model is not 'tiny' and an objective has a judge")

        check_objectives_and_weights(self.objectives, self.weights, label_names=True)
        unjudged = [o for o in self.objectives if not is_judge_spec(o)]
        if self.data == TINY and unjudged:
            raise ConfigError(f"--objectives: --data tiny labels pairs with judges; {unjudged[0]!r} is not one "
                              f"({OBJECTIVE_FORMS})")
        for name in ("modpo_target", "mopo_primary"):
            v = getattr(self, name)
            if v is not None and v not in self.objectives:
                raise ConfigError(f"{flag(name)}: expected one of the objectives {self.objectives}; got {v!r}")
        if self.method == "modpo" and self.normalized_weights()[self.modpo_index] <= 0:
            raise ConfigError(f"--weights: modpo divides by the weight of its target objective "
                              f"{self.objectives[self.modpo_index]!r}, which must be positive; got {self.weights}")
        if not math.isfinite(self.loss_beta):
            raise ConfigError(f"--weights: modpo's temperature --beta / (weight of {self.objectives[self.modpo_index]!r}"
                              f") = {self.dpo_beta} / {self.normalized_weights()[self.modpo_index]!r} overflows; "
                              f"got {self.weights}")
        if self.method == "modpo" and self.modpo_margin == "judge":
            need = [o for o in self.margin_objectives if o in unjudged]
            if need:
                raise ConfigError(f"--modpo-margin: 'judge' needs a judge for every other objective with a "
                                  f"positive weight; {need[0]!r} has none (use --modpo-margin labels or auto, "
                                  f"give it weight 0, or a judge)")
        return self


def normalize_dpo_keys(data: Mapping[str, Any], source: str) -> Dict[str, Any]:
    """Accepts ``batch-size`` or ``batch_size``; an unknown key is an error naming it."""
    return normalize_keys(data, source, DPOConfig)


def load_dpo_config(path: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None) -> DPOConfig:
    """Defaults < YAML file < ``overrides``; validated."""
    return lmc.load_config(DPOConfig, path, overrides)
