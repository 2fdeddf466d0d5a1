"""Configuration of the multi-objective PPO trainer: one dataclass, every field documented.

The same fields are the flags of ``pama-ext train`` (``--batch-size`` for ``batch_size``) and the
keys of a YAML file given with ``--config`` (either spelling); precedence is dataclass default <
YAML file < explicit flag. :meth:`TrainConfig.validate` checks every value up front and raises a
:class:`ConfigError` whose message starts with the flag it is about, e.g.
``--method: expected one of pama, morlhf, linear, mgda-ub, mgda; got 'foo'``.

This module imports nothing heavy (no torch, no transformers), so ``pama-ext --help`` stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

METHODS = ("pama", "morlhf", "linear", "mgda-ub", "mgda")
GRANULARITIES = ("token", "sequence", "batch")
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
WHITEN_SCOPES = ("batch", "minibatch", "none")
DEVICES = ("cpu", "cuda", "auto")
BUILTIN_OBJECTIVES = ("sentiment", "length")
OBJECTIVE_FORMS = "sentiment, length, hf:<path>[#<label>[:logit|:prob]], py:<module>:<function>"
TINY = "tiny"


class ConfigError(ValueError):
    """A bad configuration value; the message names the flag (``--field-name: ...``)."""


def flag(name: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def _f(default: Any, help: str, choices: Optional[tuple] = None, group: str = "", metavar: Optional[str] = None,
       **kw) -> Any:
    meta = {"help": help, "group": group}
    if metavar is not None:
        meta["metavar"] = metavar
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class TrainConfig:
    """Every setting of a training run (see docs/trainer.md)."""

    # --- model and data --------------------------------------------------------------------------
    model: str = _f(TINY, "Hugging Face causal LM (local path or hub id), or 'tiny' for the embedded tiny "
                          "world (built on first use and cached; no downloads)", group="model and data")
    tokenizer: Optional[str] = _f(None, "tokenizer path or id (default: the model's)", group="model and data")
    tiny_world_cache: Optional[str] = _f(None, "parent directory of the tiny-world cache (default: "
                                               "$PAMA_EXT_CACHE or ~/.cache/pama_ext)", group="model and data")
    tiny_world_seconds: float = _f(120.0, "pretraining wall time of the tiny world when it has to be built",
                                   group="model and data")
    train_prompts: Optional[str] = _f(None, "training prompts: a .txt file (one per line), a .json list or "
                                            ".jsonl with a 'prompt' field (default: the tiny world's)",
                                      group="model and data")
    eval_prompts: Optional[str] = _f(None, "held-out evaluation prompts, same formats (default: the tiny "
                                           "world's)", group="model and data")
    max_prompt_tokens: int = _f(64, "prompts longer than this many tokens are cut on the left",
                                group="model and data")

    # --- objectives ------------------------------------------------------------------------------
    objectives: List[str] = _f(["sentiment", "length"], f"objectives (one reward each): {OBJECTIVE_FORMS}",
                               group="objectives", metavar="OBJ")
    weights: Optional[List[float]] = _f(None, "preference weights w of the objectives for morlhf / linear "
                                              "(normalised to sum 1; default uniform)", group="objectives", metavar="W")
    length_l0: float = _f(160.0, "length objective: clip(len_chars / L0, lo, hi); this is L0 (characters)",
                          group="objectives")
    length_lo: float = _f(0.0, "length objective: lower clip bound lo", group="objectives")
    length_hi: float = _f(1.0, "length objective: upper clip bound hi", group="objectives")

    # --- method ----------------------------------------------------------------------------------
    method: str = _f("pama", "how the objectives are combined: pama (Noon PPO + closed-form Pareto weights), "
                             "morlhf (scalarised reward, one value head), linear (advantage-level weighted "
                             "sum), mgda-ub (min-norm weights of the gradients w.r.t. the final hidden "
                             "states), mgda (full parameter gradients; slow by design)",
                     choices=METHODS, group="method")
    granularity: str = _f("token", "pama: apply Theorem 1 per token, per sequence or per batch",
                          choices=GRANULARITIES, group="method")
    noon: Optional[bool] = _f(None, "linear only: clip negative whitened advantages to zero (default off; "
                                    "pama always uses Noon, morlhf / mgda-ub / mgda never do)", group="method")
    whiten: str = _f("batch", "advantage whitening per objective over the whole rollout batch (as TRL/verl), "
                              "per minibatch (inside the fused loss) or none", choices=WHITEN_SCOPES,
                     group="method")

    # --- PPO -------------------------------------------------------------------------------------
    steps: int = _f(40, "number of PPO steps (rollout + update)", group="PPO")
    batch_size: int = _f(32, "prompts (responses) per rollout", group="PPO")
    minibatch_size: int = _f(16, "responses per optimizer step", group="PPO")
    ppo_epochs: int = _f(2, "passes over each rollout batch", group="PPO")
    rollout_chunk: int = _f(64, "responses generated by one generate call; chunk k of a step is sampled with "
                                "its own seed (seed, step) + k, so a sharded run (torchrun) samples what one "
                                "process does when the chunk divides --batch-size / world size", group="PPO")
    lr: float = _f(3e-4, "AdamW learning rate (constant)", group="PPO")
    weight_decay: float = _f(0.0, "AdamW weight decay", group="PPO")
    adam_eps: float = _f(1e-8, "AdamW epsilon", group="PPO")
    max_grad_norm: float = _f(1.0, "gradient clipping by global norm (0 disables)", group="PPO")
    vf_coef: float = _f(0.1, "weight of the value loss", group="PPO")
    cliprange: float = _f(0.2, "PPO ratio clip epsilon (low side), in [0, 1)", group="PPO")
    cliprange_high: Optional[float] = _f(None, "PPO ratio clip epsilon, high side (default: --cliprange)",
                                         group="PPO")
    dual_clip: Optional[float] = _f(3.0, "dual-clip constant for negative advantages (null disables)",
                                    group="PPO")
    cliprange_value: float = _f(0.2, "value clip epsilon", group="PPO")
    gamma: float = _f(1.0, "GAE discount", group="PPO")
    lam: float = _f(0.95, "GAE lambda", group="PPO")
    agg: str = _f("token-mean", "loss aggregation (verl's agg_loss)", choices=AGGS, group="PPO")
    kl_coef: float = _f(0.02, "initial coefficient of the per-token KL penalty in the rewards", group="PPO")
    adaptive_kl: bool = _f(True, "adapt the KL coefficient towards --target-kl (TRL's controller)", group="PPO")
    target_kl: float = _f(4.0, "target KL to the reference (nats per response, summed over tokens)",
                          group="PPO")
    kl_horizon: float = _f(10000.0, "horizon of the adaptive KL controller (in responses)", group="PPO")
    kl_loss_coef: float = _f(0.0, "weight of an extra k3 KL loss to the reference (GRPO style; 0 = off)",
                             group="PPO")

    # --- generation ------------------------------------------------------------------------------
    max_new_tokens: int = _f(32, "maximum response length in tokens", group="generation")
    temperature: float = _f(1.0, "sampling temperature (log-probs use the same temperature)", group="generation")
    top_k: int = _f(0, "top-k sampling (0 = off)", group="generation")
    top_p: float = _f(1.0, "nucleus sampling (1 = off)", group="generation")

    # --- evaluation ------------------------------------------------------------------------------
    eval_every: int = _f(0, "evaluate every k steps (0: only before training and at the end)",
                         group="evaluation")
    eval_size: Optional[int] = _f(None, "number of evaluation prompts to use (default: all)", group="evaluation")
    eval_batch_size: int = _f(64, "responses per generate call during evaluation", group="evaluation")
    eval_greedy: bool = _f(False, "evaluate with greedy decoding instead of sampling with --eval-seed",
                           group="evaluation")
    eval_seed: int = _f(1234, "seed of the evaluation sampling (the same for every evaluation and method)",
                        group="evaluation")
    hv_ref: Optional[List[float]] = _f(None, "hypervolume reference point, one value per objective "
                                             "(default: the untrained model's means minus --hv-margin)",
                                       group="evaluation", metavar="V")
    hv_margin: float = _f(0.1, "margin below the untrained model's means for the default reference point",
                          group="evaluation")

    # --- run -------------------------------------------------------------------------------------
    output_dir: str = _f("runs/train", "output directory (config, metrics, tables, plots, checkpoint)",
                         group="run")
    resume: bool = _f(False, "continue the run in --output-dir from its checkpoint (bitwise the same run)",
                      group="run")
    overwrite: bool = _f(False, "start afresh even if --output-dir already holds a run", group="run")
    save_every: int = _f(0, "save a checkpoint every k steps (0: only at the end)", group="run")
    seed: int = _f(0, "seed of everything (prompt order, sampling, evaluation order)", group="run")
    device: str = _f("cpu", "cpu, cuda or auto", choices=DEVICES, group="run")
    threads: Optional[int] = _f(None, "torch CPU threads (default: torch's choice)", group="run")
    progress: bool = _f(True, "tqdm progress bars (shown when stderr is a terminal)", group="run")
    log_every: int = _f(1, "print a one-line summary every k steps (0: never)", group="run")
    plots: bool = _f(True, "write PNG plots at the end (needs matplotlib)", group="run")

    # ---------------------------------------------------------------------------------------------
    @property
    def n_objectives(self) -> int:
        return len(self.objectives)

    @property
    def n_heads(self) -> int:
        """Value heads: one per objective, one for morlhf (the scalarised reward)."""
        return 1 if self.method == "morlhf" else len(self.objectives)

    @property
    def use_noon(self) -> bool:
        if self.method == "pama":
            return True
        if self.method == "linear":
            return bool(self.noon) if self.noon is not None else False
        return False

    @property
    def eps_hi(self) -> float:
        return self.cliprange if self.cliprange_high is None else self.cliprange_high

    def normalized_weights(self) -> List[float]:
        n = len(self.objectives)
        w = [1.0] * n if self.weights is None else [float(x) for x in self.weights]
        s = sum(w)
        return [x / s for x in w]

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "TrainConfig":
        return cls(**normalize_keys(data, source))

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
        if self.method in ("mgda", "mgda-ub"):
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
        if self.noon is not None and self.method != "linear" and self.noon != (self.method == "pama"):
            raise ConfigError(f"--noon: only configurable for --method linear (pama always uses Noon; "
                              f"{self.method} never does); got {self.noon} with --method {self.method}")
        for name, path in (("train_prompts", self.train_prompts), ("eval_prompts", self.eval_prompts)):
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"{flag(name)}: no such file: {path!r}")
        return self


def coerce_fields(cfg) -> None:
    """Coerce every field of a config dataclass to its declared type and check ``choices``;
    raises :class:`ConfigError` naming the flag."""
    for f in dataclasses.fields(cfg):
        setattr(cfg, f.name, _coerce(f, getattr(cfg, f.name)))
        choices = f.metadata.get("choices")
        v = getattr(cfg, f.name)
        if choices is not None and v not in choices:
            raise ConfigError(f"{flag(f.name)}: expected one of {', '.join(choices)}; got {v!r}")


def check_number(cfg, name: str, strict: bool = True) -> None:
    """``cfg.<name>`` must be a finite number, > 0 (``strict``) or >= 0."""
    v = getattr(cfg, name)
    ok = (v > 0) if strict else (v >= 0)
    if not (ok and math.isfinite(v)):
        raise ConfigError(f"{flag(name)}: expected a {'positive' if strict else 'non-negative'} "
                          f"finite number; got {v!r}")


def resolve_device(cfg):
    """``--device`` as a torch.device (``auto``: cuda when available); an error when cuda is asked
    for and there is no GPU."""
    import torch

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: cuda requested but no GPU is available")
    return device


def check_run_fields(cfg) -> None:
    """The fields the PPO and the DPO configs share: length judge range, evaluation size, threads,
    model and output directory."""
    if not (cfg.length_lo <= cfg.length_hi):
        raise ConfigError(f"--length-lo: must be <= --length-hi ({cfg.length_hi}); got {cfg.length_lo}")
    if cfg.eval_size is not None and cfg.eval_size < 1:
        raise ConfigError(f"--eval-size: expected a positive integer; got {cfg.eval_size!r}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"--threads: expected a positive integer; got {cfg.threads!r}")
    if not cfg.model:
        raise ConfigError("--model: expected a path, a hub id or 'tiny'; got ''")
    if not cfg.output_dir:
        raise ConfigError("--output-dir: expected a directory; got ''")


def check_objectives_and_weights(objectives: List[str], weights: Optional[List[float]]) -> None:
    """``--objectives`` (1..64 valid, distinct specs) and ``--weights`` (one non-negative finite
    weight per objective, positive sum); raises :class:`ConfigError` naming the flag."""
    if not objectives:
        raise ConfigError("--objectives: expected at least one objective")
    if len(objectives) > 64:
        raise ConfigError(f"--objectives: at most 64 objectives are supported; got {len(objectives)}")
    for spec in objectives:
        check_objective_spec(spec)
    if len(set(objectives)) != len(objectives):
        raise ConfigError(f"--objectives: duplicate objective in {objectives}")
    if weights is not None:
        if len(weights) != len(objectives):
            raise ConfigError(f"--weights: expected {len(objectives)} weights (one per objective {objectives}); "
                              f"got {len(weights)}")
        if any(not (math.isfinite(w) and w >= 0) for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"--weights: expected non-negative finite weights with a positive sum; got {weights}")


def check_objective_spec(spec: str) -> None:
    """Syntax check of one objective (the function itself is resolved when the trainer starts)."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"--objectives: unknown objective {spec!r} (expected {OBJECTIVE_FORMS})")
    if spec in BUILTIN_OBJECTIVES:
        return
    if spec.startswith("hf:"):
        path, _, label = spec[3:].partition("#")
        if not path:
            raise ConfigError(f"--objectives: {spec!r}: expected hf:<path>[#<label>[:logit|:prob]]")
        if label:
            idx, _, kind = label.partition(":")
            if not idx.lstrip("-").isdigit() or kind not in ("", "logit", "prob"):
                raise ConfigError(f"--objectives: {spec!r}: expected hf:<path>[#<label index>[:logit|:prob]]")
        return
    if spec.startswith("py:"):
        parts = spec[3:].split(":")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"--objectives: {spec!r}: expected py:<module>:<function>")
        return
    raise ConfigError(f"--objectives: unknown objective {spec!r} (expected {OBJECTIVE_FORMS})")


# -------------------------------------------------------------------------------------------------
# type handling shared by the YAML loader and the CLI
# -------------------------------------------------------------------------------------------------
def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def field_kind(f: dataclasses.Field) -> str:
    """'bool', 'int', 'float', 'str', 'list[str]' or 'list[float]' (Optional is handled separately)."""
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    t = t.replace("Optional[", "").rstrip("]")
    if t.startswith("List[str"):
        return "list[str]"
    if t.startswith("List[float"):
        return "list[float]"
    return t


def field_optional(f: dataclasses.Field) -> bool:
    return "Optional[" in str(f.type)


def _coerce(f: dataclasses.Field, v: Any) -> Any:
    name, kind = f.name, field_kind(f)
    if v is None:
        if field_optional(f):
            return None
        raise ConfigError(f"{flag(name)}: a value is required")
    if isinstance(v, str) and v.strip().lower() in ("none", "null") and field_optional(f):
        return None
    try:
        if kind == "bool":
            if isinstance(v, bool):
                return v
            if isinstance(v, str) and v.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(v, str) and v.strip().lower() in ("0", "false", "no", "off"):
                return False
            if isinstance(v, int) and v in (0, 1):
                return bool(v)
            raise ValueError
        if kind == "int":
            if isinstance(v, bool):
                raise ValueError
            if isinstance(v, float):
                if not v.is_integer():
                    raise ValueError
                return int(v)
            return int(v)
        if kind == "float":
            if isinstance(v, bool):
                raise ValueError
            return float(v)
        if kind == "str":
            if not isinstance(v, str):
                raise ValueError
            return v
        if kind in ("list[str]", "list[float]"):
            items = split_list(v)
            return [float(x) if kind == "list[float]" else str(x) for x in items]
    except (TypeError, ValueError):
        raise ConfigError(f"{flag(name)}: expected {'an integer' if kind == 'int' else 'a ' + kind}; "
                          f"got {v!r}") from None
    return v


def split_list(v: Any) -> List[Any]:
    """``"a,b"``, ``["a", "b"]`` and ``["a,b"]`` all give ``["a", "b"]``."""
    if isinstance(v, (list, tuple)):
        out: List[Any] = []
        for x in v:
            out += split_list(x) if isinstance(x, str) else [x]
        return out
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    return [v]


def normalize_keys(data: Mapping[str, Any], source: str, config_cls=None) -> Dict[str, Any]:
    """Accepts ``batch-size`` or ``batch_size``; unknown keys (not fields of ``config_cls``, default
    :class:`TrainConfig`) are an error naming the key."""
    names = {f.name for f in dataclasses.fields(config_cls or TrainConfig)}
    out = {}
    for k, v in data.items():
        key = str(k).replace("-", "_")
        if key not in names:
            raise ConfigError(f"{source}: unknown key {k!r}")
        out[key] = v
    return out


def load_yaml(path: str) -> Dict[str, Any]:
    import yaml

    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path!r}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {path!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path!r} must hold a mapping of settings; got {type(data).__name__}")
    return normalize_keys(data, f"--config {path}")


def dump_yaml(cfg: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def load_config(path: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None) -> TrainConfig:
    """Defaults < YAML file < ``overrides``; validated."""
    data: Dict[str, Any] = {}
    if path:
        data.update(load_yaml(path))
    if overrides:
        data.update(normalize_keys(overrides, "overrides"))
    return TrainConfig(**data).validate()


# -------------------------------------------------------------------------------------------------
# command-line flags from a config dataclass (pama-ext train, pama-ext dpo)
# -------------------------------------------------------------------------------------------------
def none_or(conv):
    """An argparse type: ``none``/``null`` -> None, anything else through ``conv``."""
    def parse(s: str):
        if s.strip().lower() in ("none", "null"):
            return None
        return conv(s)
    parse.__name__ = getattr(conv, "__name__", "value")
    return parse


def add_config_flags(parser, config_cls) -> None:
    """``--config FILE.yaml`` and one flag per field of ``config_cls`` (``batch_size`` ->
    ``--batch-size``), in argument groups by the field's ``group``, with the default shown; unset
    flags stay absent (argparse.SUPPRESS)."""
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help="YAML file with any of the settings below (flags override it)")
    groups: Dict[str, Any] = {}
    defaults = config_cls()
    for f in dataclasses.fields(config_cls):
        g = f.metadata.get("group", "")
        if g not in groups:
            groups[g] = parser.add_argument_group(g or "other")
        kind, optional = field_kind(f), field_optional(f)
        default = getattr(defaults, f.name)
        shown = "none" if default is None else (",".join(map(str, default)) if isinstance(default, list) else default)
        help_ = f"{f.metadata['help']} (default: {shown})".replace("%", "%%")
        kw: Dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_)
        if kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif kind.startswith("list"):
            kw.update(nargs="+", metavar=f.metadata.get("metavar", "X"))
            if optional:
                kw["help"] = help_ + "; 'none' for the default"
        else:
            conv = {"int": int, "float": float, "str": str}[kind]
            kw["type"] = none_or(conv) if optional else conv
            kw["metavar"] = f.metadata.get("metavar", kind.upper())
            if "choices" in f.metadata:
                kw["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
        groups[g].add_argument(flag(f.name), **kw)


def flag_overrides(args, config_cls) -> Dict[str, Any]:
    """The fields of ``config_cls`` given on the command line (a lone ``none`` list value -> None)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    for k, v in list(overrides.items()):
        if isinstance(v, list) and len(v) == 1 and str(v[0]).lower() in ("none", "null"):
            overrides[k] = None
    return overrides
