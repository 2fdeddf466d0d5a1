"""Config plumbing shared by ``pama-ext train`` and ``pama-ext dpo``: one dataclass per command, every
field a documented flag (``--batch-size`` for ``batch_size``) and a YAML key (either spelling);
precedence is dataclass default < YAML file (``--config``) < explicit flag.

- :func:`option` declares a field with its help text, flag group and choices;
- :func:`coerce_fields` / :func:`check_number` / :func:`check_run_fields` / :func:`check_objectives_and_weights`
  check values and raise a :class:`ConfigError` whose message starts with the flag, e.g.
  ``--method: expected one of pama, morlhf, linear, mgda-ub, mgda; got 'foo'``;
- :func:`load_config` / :func:`load_yaml` / :func:`dump_yaml` / :func:`normalize_keys`: the YAML side;
- :func:`add_config_flags` / :func:`flag_overrides`: the command-line side.

This module imports nothing heavy (no torch, no transformers), so ``pama-ext --help`` stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import field
from typing import Any, Dict, List, Mapping, Optional

__all__ = ["ConfigError", "DEVICES", "TINY", "BUILTIN_OBJECTIVES", "OBJECTIVE_FORMS", "flag", "option",
           "config_dict", "normalized_weights", "coerce_fields", "check_number", "resolve_device",
           "check_run_fields", "check_objectives_and_weights", "check_objective_spec", "is_judge_spec",
           "is_label_name", "field_kind", "field_optional", "coerce_value", "split_list", "normalize_keys", "load_yaml",
           "dump_yaml", "load_config",
           "none_or", "add_config_flags", "flag_overrides"]

DEVICES = ("cpu", "cuda", "auto")
BUILTIN_OBJECTIVES = ("sentiment", "length", "conciseness", "diversity")
OBJECTIVE_FORMS = "sentiment, length, conciseness, diversity, hf:<path>[#<label>[:logit|:prob]], py:<module>:<function>"
#: ``--model`` / ``--data`` value of the embedded tiny world
TINY = "tiny"


class ConfigError(ValueError):
    """A bad configuration value; the message names the flag (``--field-name: ...``)."""


def flag(name: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def option(default: Any, help: str, choices: Optional[tuple] = None, group: str = "",
           metavar: Optional[str] = None, **kw) -> Any:
    """A dataclass field with its ``--flag`` help text, argument ``group``, ``choices`` and ``metavar``."""
    meta = {"help": help, "group": group}
    if metavar is not None:
        meta["metavar"] = metavar
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def config_dict(cfg) -> Dict[str, Any]:
    """A config dataclass as a dict of plain values (tuples become lists)."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def normalized_weights(weights: Optional[List[float]], n: int) -> List[float]:
    """``--weights`` normalised to sum 1 (uniform over ``n`` objectives when None)."""
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    s = sum(w)
    return [x / s for x in w]


def coerce_fields(cfg) -> None:
    """Coerce every field of a config dataclass to its declared type and check ``choices``;
    raises :class:`ConfigError` naming the flag."""
    for f in dataclasses.fields(cfg):
        setattr(cfg, f.name, coerce_value(f, getattr(cfg, f.name)))
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


def check_objectives_and_weights(objectives: List[str], weights: Optional[List[float]],
                                 label_names: bool = False) -> None:
    """``--objectives`` (1..64 valid, distinct specs) and ``--weights`` (one non-negative finite
    weight per objective, positive sum); raises :class:`ConfigError` naming the flag. ``label_names``:
    a plain name (:func:`is_label_name`, e.g. ``helpful``) is accepted too (a label-only objective of
    ``pama-ext dpo``: it has labels in the data and no judge)."""
    if not objectives:
        raise ConfigError("--objectives: expected at least one objective")
    if len(objectives) > 64:
        raise ConfigError(f"--objectives: at most 64 objectives are supported; got {len(objectives)}")
    for spec in objectives:
        if not (label_names and is_label_name(spec)):
            check_objective_spec(spec)
    if len(set(objectives)) != len(objectives):
        raise ConfigError(f"--objectives: duplicate objective in {objectives}")
    if weights is not None:
        if len(weights) != len(objectives):
            raise ConfigError(f"--weights: expected {len(objectives)} weights (one per objective {objectives}); "
                              f"got {len(weights)}")
        if any(not (math.isfinite(w) and w >= 0) for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"--weights: expected non-negative finite weights with a positive sum; got {weights}")


#: a label-only objective's name: a letter or underscore, then letters, digits, ``_``, ``.``, ``-``
_LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


def is_judge_spec(spec: str) -> bool:
    """Whether ``spec`` names a judge (a built-in, ``hf:...`` or ``py:...``), syntax aside."""
    return spec in BUILTIN_OBJECTIVES or spec.startswith(("hf:", "py:"))


def is_label_name(spec: str) -> bool:
    """A plain name that is not a judge: a label-only objective of ``pama-ext dpo``."""
    return isinstance(spec, str) and not is_judge_spec(spec) and bool(_LABEL_NAME.fullmatch(spec))


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


def coerce_value(f: dataclasses.Field, v: Any) -> Any:
    """``v`` as the declared type of field ``f``; a :class:`ConfigError` naming the flag otherwise."""
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


def normalize_keys(data: Mapping[str, Any], source: str, config_cls) -> Dict[str, Any]:
    """Accepts ``batch-size`` or ``batch_size``; a key that is not a field of ``config_cls`` is an error
    naming the key and ``source``."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    out = {}
    for k, v in data.items():
        key = str(k).replace("-", "_")
        if key not in names:
            raise ConfigError(f"{source}: unknown key {k!r}")
        out[key] = v
    return out


def load_yaml(path: str, config_cls) -> Dict[str, Any]:
    """The settings of a YAML file (``--config``), keys normalised against ``config_cls``."""
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
    return normalize_keys(data, f"--config {path}", config_cls)


def dump_yaml(cfg) -> str:
    """A config dataclass as YAML (the keys :func:`load_yaml` reads back)."""
    import yaml

    return yaml.safe_dump(config_dict(cfg), sort_keys=False)


def load_config(config_cls, path: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None):
    """A ``config_cls`` from its defaults < the YAML file ``path`` < ``overrides``; validated."""
    data: Dict[str, Any] = {}
    if path:
        data.update(load_yaml(path, config_cls))
    if overrides:
        data.update(normalize_keys(overrides, "overrides", config_cls))
    return config_cls(**data).validate()


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
