"""``train_dpo(config)``: one preference-data run with its output directory, and ``pama-ext dpo``.

Output directory (files are written atomically)::

    config.yaml      the resolved configuration
    pairs.jsonl      the training pairs (with --data tiny: the sampled and judged pairs)
    data.json        facts about the data (size, conflict rate, tie rates; mopo: the response pool)
    metrics.jsonl    one line per optimizer step (losses, coefficients, Gram, ...; mopo: λ, χ, b, ESS)
    eval.json        win rates against the reference, judge means, KL; samples.jsonl the generations
    final.md         the one-row result table
    model/           the trained model and tokenizer (save_pretrained), unless --no-save-model

A run that fails or is interrupted removes what it wrote (and the output directory if it created it):
there is no --resume for these runs, and a rerun is not blocked.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

from ..lm.config import TINY, ConfigError, add_config_flags, flag_overrides, resolve_device
from ..lm.files import atomic_write_text, discard_run, jsonl_text, new_dirs, prepare_output_dir
from ..lm.hf import check_pretrained, hf_quiet, load_lm, load_tokenizer
from ..lm.prompts import load_prompts
from ..lm.seeding import derive_seed, seed_everything
from .config import DPOConfig, load_dpo_config, normalize_dpo_keys

__all__ = ["train_dpo", "prepare_world", "load_data", "add_dpo_subcommand", "cmd_dpo"]

RUN_FILES = ("config.yaml", "pairs.jsonl", "heldout.jsonl", "data.json", "metrics.jsonl", "eval.json", "samples.jsonl",
             "final.md", "front.png")
RUN_DIRS = ("model",)


def prepare_world(cfg: DPOConfig) -> Dict[str, Any]:
    """Model path, training prompts (for --data tiny) and evaluation prompts."""
    eval_p = load_prompts(cfg.eval_prompts, "--eval-prompts") if cfg.eval_prompts else None
    train_p: List[str] = []
    if cfg.model == "tiny":
        from ..tiny_world import build_tiny_world

        world = build_tiny_world(cache_dir=cfg.tiny_world_cache, train_seconds=cfg.tiny_world_seconds, seed=0,
                                 progress=cfg.progress)
        path = str(world.path)
        train_p = world.train_prompts
        eval_p = eval_p if eval_p is not None else world.eval_prompts
    else:
        path = cfg.model
    if eval_p is not None and cfg.eval_size is not None:
        eval_p = eval_p[:cfg.eval_size]
    if not eval_p and cfg.judged:
        raise ConfigError("--eval-prompts: no prompts found")
    eval_p = eval_p or []
    return {"model_path": path, "train_prompts": list(train_p), "eval_prompts": list(eval_p)}


def load_data(cfg: DPOConfig, world: Mapping, ref_lm=None, tokenizer=None, judges=None):
    """The preference pairs of ``--data`` (sampled and judged from the reference for 'tiny')."""
    from .data import DataError, build_tiny_pairs, load_hf_dataset, load_jsonl
    from .readers import is_schema_spec, load_schema

    try:
        if cfg.data == "tiny":
            from tqdm.auto import tqdm

            from ..lm.rollout import GenSettings

            prompts = world["train_prompts"][:cfg.pool_prompts]
            gen = GenSettings(max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=cfg.temperature)
            with tqdm(total=len(prompts) * cfg.responses_per_prompt, desc="sampling pairs", unit="resp", leave=False,
                      disable=not (cfg.progress and sys.stderr.isatty()), dynamic_ncols=True) as bar:
                return build_tiny_pairs(ref_lm, tokenizer, prompts, judges, cfg.responses_per_prompt, gen,
                                        derive_seed(cfg.seed, "pairs", 0), cfg.tie_margin, cfg.max_prompt_tokens,
                                        bar=bar)
        if cfg.data.startswith("hf:"):
            name, _, split = cfg.data[3:].partition(":")
            return load_hf_dataset(name, split or "train", cfg.objectives)
        if is_schema_spec(cfg.data):
            return load_schema(cfg.data, cfg.objectives)
        return load_jsonl(cfg.data, cfg.objectives)
    except DataError as e:
        raise ConfigError(f"--data: {e}") from None


def train_dpo(config: Union[DPOConfig, Dict[str, Any]], shared: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Run one preference-data training run; returns the evaluation, metrics and paths.

    ``shared``: a dict that runs of one sweep pass along (same model, data, objectives and evaluation
    settings; only the method and its settings differ): it keeps the reference model, the tokenizer, the
    judges, the data, the reference's log-probs and its evaluation samples after the first run, so later
    runs skip loading and sampling them again. The caller owns it; it is filled on first use."""
    cfg = config if isinstance(config, DPOConfig) else DPOConfig(**normalize_dpo_keys(config, "config"))
    cfg = dataclasses.replace(cfg).validate()
    if cfg.objectives is None:  # the data's label keys define them: read the data first, then check again
        pre = load_data(cfg, {})
        cfg = dataclasses.replace(cfg, objectives=list(pre.objectives)).validate()
        shared = {} if shared is None else shared
        shared.setdefault("data", pre)
    if cfg.model != TINY:
        check_pretrained(cfg.model, "--model")
    if cfg.tokenizer:
        check_pretrained(cfg.tokenizer, "--tokenizer", need=None)
    created = new_dirs(cfg.output_dir)
    out = prepare_output_dir(cfg.output_dir, RUN_FILES, RUN_DIRS, cfg.overwrite, stale_subdirs=())
    try:
        return _train_dpo(cfg, out, shared)
    except BaseException:
        discard_run(out, RUN_FILES, RUN_DIRS, created)
        raise


def _train_dpo(cfg: DPOConfig, out: Path, shared: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    import torch
    from tqdm.auto import tqdm

    from ..lm.policy import PolicyWithValueHeads, frozen_copy
    from ..lm.rewards import build_objectives
    from .data import DataError, heldout_split
    from .evaluate import evaluate_policy, pair_accuracy, reference_samples
    from .methods import make_trainer

    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg)
    seed_everything(cfg.seed)

    import yaml

    atomic_write_text(out / "config.yaml", yaml.safe_dump(dataclasses.replace(cfg, overwrite=False).to_dict(),
                                                          sort_keys=False))
    sh = shared if shared is not None else {}
    if "world" not in sh:
        sh["world"] = prepare_world(cfg)
        sh["judges"] = build_objectives(dataclasses.replace(cfg, objectives=cfg.judged), device=str(device))
        sh["tokenizer"] = load_tokenizer(cfg.tokenizer or sh["world"]["model_path"])
        sh["ref_lm"] = frozen_copy(load_lm(sh["world"]["model_path"], device))
        sh["ref_logp"] = {}
    world, judges, tokenizer, ref_lm = sh["world"], sh["judges"], sh["tokenizer"], sh["ref_lm"]
    lm = load_lm(world["model_path"], device)
    policy = PolicyWithValueHeads(lm, 1).to(device)
    for p in policy.value_heads.parameters():
        p.requires_grad_(False)

    if "data" not in sh:
        sh["data"] = load_data(cfg, world, ref_lm, tokenizer, judges)
    data = sh["data"]
    if list(data.objectives) != list(cfg.objectives):
        raise ConfigError(f"--objectives: the data labels {data.objectives}; got {cfg.objectives}")
    try:
        data, heldout = heldout_split(data, cfg.heldout_share, derive_seed(cfg.seed, "heldout", 0))
    except DataError as e:
        raise ConfigError(f"--heldout-pairs: {e}") from None
    atomic_write_text(out / "pairs.jsonl", jsonl_text(data.rows()))
    if heldout is not None:
        atomic_write_text(out / "heldout.jsonl", jsonl_text(heldout.rows()))
    t_data = time.perf_counter()
    trainer = make_trainer(cfg, policy, ref_lm, tokenizer, data, judges, device, ref_cache=sh["ref_logp"])
    info = dict(data.info, pairs=len(data), trained_pairs=getattr(trainer, "n_pairs", None),
                heldout_pairs=0 if heldout is None else len(heldout))
    if cfg.method == "mopo":
        info["pool"] = trainer.pool_info
    atomic_write_text(out / "data.json", json.dumps(info, indent=1))

    metrics: List[Dict] = []
    use_bars = cfg.progress and sys.stderr.isatty()
    label = f"{cfg.method}" + (f" w={','.join(f'{x:.2f}' for x in cfg.normalized_weights())}"
                               if cfg.method != "mopo" else f" primary={cfg.objectives[cfg.mopo_index]}")
    bar = tqdm(total=cfg.steps, desc=label, unit="step", disable=not use_bars, dynamic_ncols=True, leave=False)
    try:
        while trainer.step_idx < cfg.steps:
            trainer.step()
            bar.update(1)
            k = trainer.step_idx
            if (cfg.log_every and k % cfg.log_every == 0) or k == cfg.steps:
                rows = trainer.flush_metrics()
                metrics += rows
                atomic_write_text(out / "metrics.jsonl", jsonl_text(metrics))
                if cfg.log_every:
                    tqdm.write(_summary(cfg, rows[-1]), file=sys.stderr)
    finally:
        bar.close()
    t_train = time.perf_counter()

    if judges:
        if "reference_eval" not in sh:
            sh["reference_eval"] = reference_samples(ref_lm, tokenizer, judges, world["eval_prompts"], cfg, device)
        ev = evaluate_policy(policy, ref_lm, tokenizer, judges, world["eval_prompts"], cfg, sh["reference_eval"])
        atomic_write_text(out / "samples.jsonl", jsonl_text(ev.pop("samples")))
    else:  # label-only objectives: no sampling, the held-out pairs are the evaluation
        ev = {"n": 0, "objectives": [], "win_rate": {}, "mean": {}, "ref_mean": {}, "kl": None, "response_len": None}
    if heldout is not None:
        ev.update(pair_accuracy(policy, ref_lm, tokenizer, heldout, cfg, device, ref_cache=sh["ref_logp"]))
    ess = None
    if cfg.method == "mopo":
        ess = sum(m["ess"] for m in metrics) / max(1, len(metrics))
        ev["mean_ess"] = ess
        ev["mean_ess_frac"] = sum(m["ess_frac"] for m in metrics) / max(1, len(metrics))
        ev["final_lambda"] = metrics[-1]["lam"] if metrics else None
    atomic_write_text(out / "eval.json", json.dumps(ev, indent=1))
    if cfg.save_model:
        with hf_quiet():
            policy.lm.save_pretrained(str(out / "model"))
            tokenizer.save_pretrained(str(out / "model"))
    result = {"method": cfg.method, "setting": setting_label(cfg), "eval": ev, "ess": ess, "metrics": metrics,
              "data_info": info, "output_dir": str(out), "config": cfg,
              "wall_s": time.perf_counter() - t_start,
              "time": {"data": t_data - t_start, "train": t_train - t_data, "eval": time.perf_counter() - t_train}}
    from .evaluate import format_results, results_table

    md = format_results(results_table([result], cfg.objectives))
    what = (f"Win rates against the reference on {ev['n']} sampled responses; " if judges else "")
    if heldout is not None:
        what += f"pair accuracy (implicit reward margin) on {len(heldout)} held-out pairs; "
    atomic_write_text(out / "final.md", f"# {cfg.method} on {cfg.data} ({cfg.steps} steps)\n\n{md}\n\n{what}data: "
                                        f"{len(data)} pairs, conflict rate {data.info.get('conflict_rate', 0):.3f}.\n")
    result["table_md"] = md
    if cfg.plots and judges:
        from .plots import plot_fronts

        result["plot"] = plot_fronts([result], cfg.judged, str(out / "front.png"), title=setting_label(cfg))
    return result


def setting_label(cfg: DPOConfig) -> str:
    if cfg.method == "mopo":
        return (f"primary={cfg.objectives[cfg.mopo_index]} β={cfg.mopo_threshold_beta:g} t0={cfg.mopo_t0} "
                f"τ={cfg.mopo_tau:g}")
    w = "w=" + "/".join(f"{x:.2f}" for x in cfg.normalized_weights())
    if cfg.method == "modpo":
        return f"{w} target={cfg.objectives[cfg.modpo_index]}"
    return w


def _summary(cfg: DPOConfig, m: Mapping) -> str:
    parts = [f"[{cfg.method}] step {m['step']}/{cfg.steps}"]
    if "losses" in m:
        ls = m["losses"] if isinstance(m["losses"], list) else [m["losses"]]
        parts.append("loss " + "/".join(f"{x:.4f}" for x in ls))
        parts.append(f"margin>0 {m['margin_positive']:.2f}")
    if "coeffs" in m:
        parts.append("a " + "/".join(f"{x:.3f}" for x in m["coeffs"]) + f" cos {m['cos']:+.3f}")
    if "lam" in m:
        parts.append(f"loss {m['loss']:.3f} ESS {m['ess']:.1f} ({m['ess_frac']:.2f}) λ " +
                     "/".join(f"{x:.3f}" for x in m["lam"]) + " b " + "/".join(f"{x:.3f}" for x in m["b"]) +
                     " LB " + "/".join(f"{x:.3f}" for x in m["lower_bound"]))
    parts.append(f"|g| {m['grad_norm']:.3f}")
    return " | ".join(parts)


# -------------------------------------------------------------------------------------------------
# command line
# -------------------------------------------------------------------------------------------------
def add_dpo_subcommand(subparsers) -> argparse.ArgumentParser:
    """Adds ``dpo`` to a ``pama-ext`` subparsers object (every DPOConfig field is a flag)."""
    p = subparsers.add_parser(
        "dpo", help="multi-objective preference-data alignment (raco, cagrad, dpo-lw, modpo, mopo)",
        description="Preference-data alignment with the pama_ext ops: per-objective DPO losses combined by "
                    "RACO / CAGrad / a weighted sum / MODPO margins, or MOPO's constrained behaviour cloning. "
                    "Settings: defaults < --config FILE.yaml < flags. See docs/dpo.md.")
    add_config_flags(p, DPOConfig)
    p.set_defaults(func=cmd_dpo)
    return p


def config_from_args(args: argparse.Namespace) -> DPOConfig:
    return load_dpo_config(args.config, flag_overrides(args, DPOConfig))


def cmd_dpo(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        result = train_dpo(cfg)
    except ConfigError as e:
        print(f"pama-ext dpo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pama-ext dpo: stopped; dpo runs cannot be resumed (the partial output was removed): run again",
              file=sys.stderr)
        return 130
    print(result["table_md"])
    t = result["time"]
    print(f"\noutput: {result['output_dir']} ({result['wall_s']:.1f} s: data {t['data']:.1f}, train {t['train']:.1f}, "
          f"evaluation {t['eval']:.1f})")
    return 0
