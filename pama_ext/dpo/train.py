"""``train_dpo(config)``: one preference-data run with its output directory, and ``pama-ext dpo``.

Output directory (files are written atomically)::

    config.yaml      the resolved configuration
    pairs.jsonl      the training pairs (with --data tiny: the sampled and judged pairs)
    data.json        facts about the data (size, conflict rate, tie rates; mopo: the response pool)
    metrics.jsonl    one line per optimizer step (losses, coefficients, Gram, ...; mopo: λ, χ, b, ESS)
    eval.json        win rates against the reference, judge means, KL; samples.jsonl the generations
    final.md         the one-row result table
    model/           the trained model and tokenizer (save_pretrained), unless --no-save-model

    heldout.jsonl    the held-out pairs of the pair-accuracy evaluation (--heldout-pairs)
    checkpoint/      the last checkpoint (:mod:`pama_ext.lm.checkpoint`, the PPO trainer's format: the LM and
                     tokenizer, value_heads.pt, trainer_state.pt, checkpoint.json with every file's SHA-256);
    checkpoint.prev/ the one before

``--resume`` continues from ``checkpoint/`` (saved every ``--save-every`` steps and at the end) and gives
bitwise the same parameters and metrics as an uninterrupted run (the LM, the optimizer, the data
generator and epoch order, MOPO's duals, reference weights and lagged log-probs and the global RNG
states are restored; the pairs are read back from ``pairs.jsonl`` / ``heldout.jsonl``). The
checkpoint is verified and loaded with ``weights_only=True``; a corrupt one falls back to
``checkpoint.prev/``. A fresh run that fails or is interrupted before its first checkpoint removes what
it wrote (and the output directory if it created it), so a rerun is not blocked.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

from ..lm.checkpoint import (CHECKPOINT, CORRUPT, PREVIOUS, STATE_FORMAT, CheckpointError, read_tensor_file,
                             save_policy_checkpoint, select_checkpoint, set_rng_states)
from ..lm.config import TINY, ConfigError, add_config_flags, flag, flag_overrides, resolve_device
from ..lm.files import (atomic_write_text, discard_run, jsonl_text, new_dirs, prepare_output_dir, read_jsonl,
                        remove_stale_temporaries)
from ..lm.hf import check_pretrained, hf_quiet, load_lm, load_tokenizer
from ..lm.prompts import load_prompts
from ..lm.seeding import derive_seed, seed_everything
from .config import METHODS, DPOConfig, load_dpo_config, normalize_dpo_keys

__all__ = ["train_dpo", "prepare_world", "load_data", "add_dpo_subcommand", "cmd_dpo"]

RUN_FILES = ("config.yaml", "pairs.jsonl", "heldout.jsonl", "data.json", "metrics.jsonl", "eval.json", "samples.jsonl",
             "final.md", "front.png")
RUN_DIRS = ("model", CHECKPOINT, PREVIOUS, CORRUPT)
#: settings that may differ between a run and its --resume
RESUME_MAY_CHANGE = {"steps", "save_every", "progress", "log_every", "plots", "output_dir", "resume", "overwrite",
                     "threads", "eval_batch_size", "tiny_world_cache", "tiny_world_seconds", "save_model"}


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
    # under torchrun only rank 0 touches the run directory
    rank0 = os.environ.get("RANK", "0") == "0"
    out = _prepare_output_dir(cfg) if rank0 else Path(cfg.output_dir)
    try:
        return _train_in_group(cfg, out, shared)
    except BaseException:
        if rank0 and not cfg.resume and not (out / CHECKPOINT).exists():
            discard_run(out, RUN_FILES, RUN_DIRS, created)
        raise


def _rank_device(cfg: DPOConfig):
    import torch

    device = resolve_device(cfg)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def _train_in_group(cfg: DPOConfig, out: Path, shared: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Under ``torchrun`` (WORLD_SIZE > 1): one process group (nccl on CUDA, gloo otherwise) for the run."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return _train_dpo(cfg, out, shared)
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("nccl" if _rank_device(cfg).type == "cuda" else "gloo")
    try:
        return _train_dpo(cfg, out, shared, group=dist.group.WORLD)
    finally:
        if own:
            dist.destroy_process_group()


def _prepare_output_dir(cfg: DPOConfig) -> Path:
    out = Path(cfg.output_dir)
    if cfg.resume:
        if not out.is_dir():
            raise ConfigError(f"--resume: no checkpoint in {str(out)!r} (nothing to resume)")
        remove_stale_temporaries(out, subdirs=())
        try:
            found = select_checkpoint(out, lambda msg: print(f"pama-ext dpo: warning: {msg}", file=sys.stderr))
        except CheckpointError as e:
            raise ConfigError(f"--resume: {e}") from None
        if found is None:
            raise ConfigError(f"--resume: no checkpoint in {str(out)!r} (nothing to resume)")
        return out
    return prepare_output_dir(out, RUN_FILES, RUN_DIRS, cfg.overwrite, stale_subdirs=(),
                              advice="pass --resume to continue it or --overwrite to start afresh")


def read_dpo_state(ck: Path, cfg: DPOConfig) -> Dict[str, Any]:
    """``trainer_state.pt`` of a dpo checkpoint (``weights_only=True``), checked against ``cfg``: only the
    settings of :data:`RESUME_MAY_CHANGE` may differ."""
    path = ck / "trainer_state.pt"
    try:
        state = read_tensor_file(path)
    except CheckpointError as e:
        raise ConfigError(f"--resume: {e}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("kind") != "dpo":
        raise ConfigError(f"--resume: {path}: not a pama-ext dpo trainer state of format {STATE_FORMAT}")
    saved = state["config"]
    for k, v in cfg.to_dict().items():
        if k not in RESUME_MAY_CHANGE and saved.get(k) != v:
            raise ConfigError(f"{flag(k)}: the run in {str(ck.parent)!r} was made with {saved.get(k)!r}; got {v!r} "
                              f"(only {', '.join(sorted(flag(x) for x in RESUME_MAY_CHANGE))} may change on --resume)")
    if state["trainer"]["step"] > cfg.steps:
        raise ConfigError(f"--steps: the checkpoint is at step {state['trainer']['step']}, beyond {cfg.steps}")
    return state


def save_dpo_checkpoint(out: Path, policy, tokenizer, trainer, cfg: DPOConfig) -> bool:
    """Replace ``out/checkpoint`` crash-safely (the PPO trainer's format; ``checkpoint.prev`` keeps the one
    before). Refuses (returns False, with a warning) when a parameter is not finite."""
    state = {"kind": "dpo", "trainer": trainer.state_dict(), "config": cfg.to_dict()}
    manifest = {"step": trainer.step_idx, "method": cfg.method, "objectives": cfg.objectives}
    return save_policy_checkpoint(out, policy, tokenizer, state, manifest)


def _train_dpo(cfg: DPOConfig, out: Path, shared: Optional[Dict[str, Any]], group=None) -> Dict[str, Any]:
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
    device = resolve_device(cfg) if group is None else _rank_device(cfg)
    main = group is None or torch.distributed.get_rank(group) == 0  # evaluates and writes the run directory
    write = atomic_write_text if main else (lambda *_a, **_k: None)
    ck = out / CHECKPOINT
    state = read_dpo_state(ck, cfg) if cfg.resume else None
    seed_everything(cfg.seed)

    import yaml

    write(out / "config.yaml", yaml.safe_dump(
        dataclasses.replace(cfg, overwrite=False, resume=False).to_dict(), sort_keys=False))
    sh = shared if shared is not None else {}
    if "world" not in sh:
        sh["world"] = prepare_world(cfg)
        sh["judges"] = build_objectives(dataclasses.replace(cfg, objectives=cfg.judged), device=str(device))
        sh["tokenizer"] = load_tokenizer(cfg.tokenizer or sh["world"]["model_path"])
        sh["ref_lm"] = frozen_copy(load_lm(sh["world"]["model_path"], device))
        sh["ref_logp"] = {}
    world, judges, tokenizer, ref_lm = sh["world"], sh["judges"], sh["tokenizer"], sh["ref_lm"]
    lm = load_lm(str(ck) if state is not None else world["model_path"], device)
    policy = PolicyWithValueHeads(lm, 1).to(device)
    for p in policy.value_heads.parameters():
        p.requires_grad_(False)

    if state is not None:  # the pairs of the run, as it wrote them
        from .data import load_jsonl

        data = load_jsonl(str(out / "pairs.jsonl"), cfg.objectives)
        heldout = load_jsonl(str(out / "heldout.jsonl"), cfg.objectives) if (out / "heldout.jsonl").is_file() else None
        data.info = json.loads((out / "data.json").read_text())
    else:
        if "data" not in sh:
            sh["data"] = load_data(cfg, world, ref_lm, tokenizer, judges)
        data = sh["data"]
        if list(data.objectives) != list(cfg.objectives):
            raise ConfigError(f"--objectives: the data labels {data.objectives}; got {cfg.objectives}")
        try:
            data, heldout = heldout_split(data, cfg.heldout_share, derive_seed(cfg.seed, "heldout", 0))
        except DataError as e:
            raise ConfigError(f"--heldout-pairs: {e}") from None
        write(out / "pairs.jsonl", jsonl_text(data.rows()))
        if heldout is not None:
            write(out / "heldout.jsonl", jsonl_text(heldout.rows()))
    t_data = time.perf_counter()
    trainer = make_trainer(cfg, policy, ref_lm, tokenizer, data, judges, device, ref_cache=sh["ref_logp"], group=group,
                           state=None if state is None else state["trainer"],
                           margin_cache=sh.setdefault("modpo_margins", {}))
    if state is None:
        info = dict(data.info, pairs=len(data), trained_pairs=getattr(trainer, "n_pairs", None),
                    heldout_pairs=0 if heldout is None else len(heldout))
        if getattr(trainer, "margin_info", None):
            info["modpo_margin"] = trainer.margin_info
        if cfg.is_mopo:
            info["pool"] = trainer.pool_info
        write(out / "data.json", json.dumps(info, indent=1))
    else:
        info = data.info

    metrics: List[Dict] = []
    if state is not None:
        policy.value_heads.load_state_dict(read_tensor_file(ck / "value_heads.pt", map_location=device))
        trainer.load_state_dict(state["trainer"])
        set_rng_states(state["rng"])
        metrics = [m for m in read_jsonl(out / "metrics.jsonl") if m.get("step", 0) <= trainer.step_idx]
        if main:
            print(f"[{cfg.method}] resuming {out} at step {trainer.step_idx}/{cfg.steps}", file=sys.stderr)

    def checkpoint() -> None:
        nonlocal metrics
        rows = trainer.flush_metrics()
        metrics += rows
        write(out / "metrics.jsonl", jsonl_text(metrics))
        if main:
            save_dpo_checkpoint(out, policy, tokenizer, trainer, cfg)

    use_bars = cfg.progress and sys.stderr.isatty() and main
    label = f"{cfg.method}" + (f" w={','.join(f'{x:.2f}' for x in cfg.normalized_weights())}"
                               if not cfg.is_mopo else f" primary={cfg.objectives[cfg.mopo_index]}")
    bar = tqdm(total=cfg.steps, initial=trainer.step_idx, desc=label, unit="step", disable=not use_bars,
               dynamic_ncols=True, leave=False)
    try:
        while trainer.step_idx < cfg.steps:
            trainer.step()
            bar.update(1)
            k = trainer.step_idx
            if (cfg.log_every and k % cfg.log_every == 0) or k == cfg.steps:
                rows = trainer.flush_metrics()
                metrics += rows
                write(out / "metrics.jsonl", jsonl_text(metrics))
                if cfg.log_every and main:
                    tqdm.write(_summary(cfg, rows[-1]), file=sys.stderr)
            if cfg.save_every and k % cfg.save_every == 0 and k != cfg.steps:
                checkpoint()
    finally:
        bar.close()
    if state is None or state["trainer"]["step"] != cfg.steps:
        checkpoint()  # before the evaluation, which draws from its own seeded generators
    if not main:  # the other ranks trained in step with rank 0 and leave the rest to it
        return {"method": cfg.method, "metrics": metrics, "output_dir": str(out), "config": cfg,
                "rank": torch.distributed.get_rank(group)}
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
    if cfg.is_mopo:
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
    if cfg.is_mopo:
        return (f"primary={cfg.objectives[cfg.mopo_index]} β={cfg.mopo_threshold_beta:g} t0={cfg.mopo_t0} "
                f"τ={cfg.mopo_tau:g} ε={cfg.mopo_epsilon:g}" + (f" σ={cfg.barrier_sigma:g}" if cfg.barrier_sigma else ""))
    w = "w=" + "/".join(f"{x:.2f}" for x in cfg.normalized_weights())
    if cfg.method == "modpo":
        learned = f" margin={'+'.join(cfg.margin_learned)} from labels" if cfg.margin_learned else ""
        return f"{w} target={cfg.objectives[cfg.modpo_index]}{learned}"
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
        "dpo", help=f"multi-objective preference-data alignment ({', '.join(METHODS)})",
        description="Preference-data alignment with the pama_ext ops: per-objective DPO losses combined by "
                    "RACO / CAGrad / a weighted sum / MODPO margins, or MOPO's constrained behaviour cloning. "
                    "Settings: defaults < --config FILE.yaml < flags. See docs/dpo.md.")
    add_config_flags(p, DPOConfig)
    p.set_defaults(func=cmd_dpo)
    return p


def config_from_args(args: argparse.Namespace) -> DPOConfig:
    return load_dpo_config(args.config, flag_overrides(args, DPOConfig))


def cmd_dpo(args: argparse.Namespace) -> int:
    cfg = None
    try:
        cfg = config_from_args(args)
        result = train_dpo(cfg)
    except ConfigError as e:
        print(f"pama-ext dpo: error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"pama-ext dpo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if cfg is not None and (Path(cfg.output_dir) / CHECKPOINT).is_dir():
            print("pama-ext dpo: stopped; continue with --resume (from the last checkpoint)", file=sys.stderr)
        else:
            print("pama-ext dpo: stopped before the first checkpoint (the partial output was removed): run again",
                  file=sys.stderr)
        return 130
    if "rank" in result:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    print(result["table_md"])
    t = result["time"]
    print(f"\noutput: {result['output_dir']} ({result['wall_s']:.1f} s: data {t['data']:.1f}, train {t['train']:.1f}, "
          f"evaluation {t['eval']:.1f})")
    return 0
