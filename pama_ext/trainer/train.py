"""``train(config)``: one multi-objective PPO run with its output directory, and ``pama-ext train``.

Output directory (every file is written to a temporary file and renamed into place)::

    config.yaml          the resolved configuration
    metrics.jsonl        one line per PPO step (rewards per objective, KL, KL coefficient, losses,
                         weights, clip fractions, timings, skipped updates)
    eval.jsonl           one line per evaluation (step 0 = the untrained model)
    samples/step_*.jsonl the evaluation generations
    final.md, final.json the final table (untrained vs trained, hypervolume)
    rewards.png          per-objective reward curves;  pareto.png  final per-objective means
    checkpoint/          save_pretrained of the policy LM and tokenizer, value_heads.pt,
                         trainer_state.pt (step, optimizer, KL controller, RNG states, data order),
                         checkpoint.json (with the size and SHA-256 of every file)
    checkpoint.prev/     the checkpoint before (see :mod:`pama_ext.lm.checkpoint`)

``--resume`` continues from ``checkpoint/`` and gives bitwise the same parameters and metrics as an
uninterrupted run (the sampling seed of every step is derived from (seed, step); the data order
generator, optimizer, KL controller and global RNG states are restored). The checkpoint is verified
and loaded with ``weights_only=True``; a corrupt one falls back to ``checkpoint.prev/``.

A first Ctrl-C (SIGINT) lets the current step finish, saves a checkpoint and stops with
:class:`TrainingStopped` ("stopped at step N; continue with --resume"; exit code 130 from the CLI); a
second one stops at once. A run that fails or is interrupted before its first checkpoint removes what it
wrote, so a corrected rerun is not blocked.

Under ``torchrun`` (WORLD_SIZE > 1) every rank trains on its shard of each global batch
(:mod:`pama_ext.trainer.ppo`); the process group is gloo on CPU and nccl on GPU (one GPU per local
rank); rank 0 alone evaluates and writes the output directory.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from ..lm.checkpoint import (CHECKPOINT, CORRUPT, PREVIOUS, STATE_FORMAT, CheckpointError, read_tensor_file,
                             save_policy_checkpoint, select_checkpoint, set_rng_states, verify_checkpoint)
from ..lm.config import TINY, ConfigError, add_config_flags, flag, flag_overrides, resolve_device
from ..lm.files import (atomic_write_text, discard_run, jsonl_text, new_dirs, prepare_output_dir, read_jsonl,
                        remove_stale_temporaries)
from ..lm.hf import check_pretrained, load_lm, load_tokenizer
from ..lm.prompts import load_prompts
from ..lm.seeding import seed_everything
from .config import TrainConfig, dump_yaml, load_config, load_yaml

__all__ = ["train", "add_train_subcommand", "cmd_train", "load_checkpoint", "save_checkpoint", "TrainingStopped",
           "CheckpointError", "deferred_sigint"]

#: settings that may differ between a run and its --resume
RESUME_MAY_CHANGE = {"steps", "eval_every", "save_every", "progress", "log_every", "plots", "output_dir", "resume",
                     "overwrite", "threads", "eval_batch_size", "tiny_world_cache", "tiny_world_seconds"}
RUN_FILES = ("config.yaml", "metrics.jsonl", "eval.jsonl", "final.md", "final.json", "rewards.png", "pareto.png")


#: directories of the trainer in a run directory (.checkpoint.old: the name before checkpoint.prev)
RUN_DIRS = (CHECKPOINT, PREVIOUS, CORRUPT, ".checkpoint.old", "samples")


# -------------------------------------------------------------------------------------------------
# model and data
# -------------------------------------------------------------------------------------------------
def _resolve_model(cfg: TrainConfig):
    """(model path, train prompts, eval prompts)."""
    train_p = load_prompts(cfg.train_prompts) if cfg.train_prompts else None
    eval_p = load_prompts(cfg.eval_prompts, "--eval-prompts") if cfg.eval_prompts else None
    if cfg.model == "tiny":
        from ..tiny_world import build_tiny_world

        world = build_tiny_world(cache_dir=cfg.tiny_world_cache, train_seconds=cfg.tiny_world_seconds,
                                 seed=0, progress=cfg.progress)
        path = str(world.path)
        train_p = train_p if train_p is not None else world.train_prompts
        eval_p = eval_p if eval_p is not None else world.eval_prompts
    else:
        path = cfg.model
        if train_p is None:
            raise ConfigError("--train-prompts: required when --model is not 'tiny'")
        if eval_p is None:
            raise ConfigError("--eval-prompts: required when --model is not 'tiny'")
    if cfg.eval_size is not None:
        eval_p = eval_p[:cfg.eval_size]
    if not train_p:
        raise ConfigError("--train-prompts: no prompts found")
    if not eval_p:
        raise ConfigError("--eval-prompts: no prompts found")
    return path, list(train_p), list(eval_p)


# -------------------------------------------------------------------------------------------------
# checkpoints
# -------------------------------------------------------------------------------------------------
def save_checkpoint(out: Path, policy, tokenizer, trainer, cfg: TrainConfig, extra: Dict) -> bool:
    """Replace ``out/checkpoint`` crash-safely (the one before becomes ``checkpoint.prev``); refuses
    (returns False) when a parameter is not finite. A LoRA run saves a plain LM: the adapters merged into
    a copy of the weights."""
    lm = None
    peft_model = getattr(trainer.ref_lm, "peft_model", None)  # a LoRA run (lm.lora.AdapterDisabled)
    if peft_model is not None:
        from ..lm.lora import merged_copy

        lm = merged_copy(peft_model)
    state = {"trainer": trainer.state_dict(), "config": cfg.to_dict(), **extra}
    manifest = {"step": trainer.step_idx, "method": cfg.method, "objectives": cfg.objectives,
                "value_heads_input": "final hidden state of the base model (lm.base_model(...)[0])"}
    return save_policy_checkpoint(out, policy, tokenizer, state, manifest, lm=lm)


def load_checkpoint(path: Union[str, Path], device: str = "cpu"):
    """``(policy, tokenizer, info)`` from a run directory or its ``checkpoint/``: the trained LM with its
    value heads (a :class:`PolicyWithValueHeads`) and the tokenizer. The files are checked against the
    checkpoint's manifest first (a :class:`CheckpointError` names a missing, truncated or corrupt one)."""
    from ..lm.policy import PolicyWithValueHeads

    p = Path(path)
    if (p / CHECKPOINT / "checkpoint.json").is_file():
        p = p / CHECKPOINT
    info = verify_checkpoint(p)
    lm = load_lm(str(p), device)
    policy = PolicyWithValueHeads(lm, int(info["value_heads"]), check=False)
    policy.value_heads.load_state_dict(read_tensor_file(p / "value_heads.pt", map_location=device))
    return policy, load_tokenizer(str(p)), info


def read_trainer_state(ck: Path) -> Dict[str, Any]:
    """``trainer_state.pt`` of a checkpoint, loaded with ``weights_only=True`` and checked."""
    path = ck / "trainer_state.pt"
    state = read_tensor_file(path)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not a trainer state of format {STATE_FORMAT} (got {got!r})")
    for k in ("trainer", "rng", "config", "init_eval"):
        if k not in state:
            raise CheckpointError(f"{path}: no {k!r} entry; corrupt or not a pama_ext trainer state")
    return state


# -------------------------------------------------------------------------------------------------
# interruption
# -------------------------------------------------------------------------------------------------
class TrainingStopped(KeyboardInterrupt):
    """The run was interrupted (Ctrl-C / SIGINT). ``step``: the steps completed; ``checkpoint_step``: the
    step of the last checkpoint (None: nothing saved). The message says how to continue."""

    def __init__(self, step: int, checkpoint_step: Optional[int]):
        self.step, self.checkpoint_step = step, checkpoint_step
        if checkpoint_step is None:
            msg = f"stopped at step {step} before any checkpoint was saved; nothing to resume: run again"
        elif checkpoint_step == step:
            msg = f"stopped at step {step}; continue with --resume"
        else:
            msg = f"stopped at step {step}; continue with --resume (from the checkpoint at step {checkpoint_step})"
        super().__init__(msg)


@contextlib.contextmanager
def deferred_sigint(enabled: bool = True, notice: str = "interrupt: finishing the current step, then saving a "
                                                           "checkpoint (Ctrl-C again stops at once)"):
    """Inside the block a first SIGINT only sets ``flag["requested"]`` (and prints ``notice``); a second
    one raises KeyboardInterrupt. Installed only in the main thread, when SIGINT is not ignored and
    ``enabled``; the previous handler is restored on exit."""
    flag = {"requested": False}
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous in (signal.SIG_IGN, None):
        yield flag
        return

    def handler(signum, frame):
        if flag["requested"]:
            raise KeyboardInterrupt
        flag["requested"] = True
        print(f"pama-ext: {notice}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


# -------------------------------------------------------------------------------------------------
# the run
# -------------------------------------------------------------------------------------------------
def _summary_line(cfg: TrainConfig, m: Dict) -> str:
    from ..lm.rewards import short_name

    parts = [f"[{cfg.method}] step {m['step']}/{cfg.steps}"]
    parts.append(" ".join(f"{short_name(k)} {v:+.3f}" for k, v in m["rewards"].items()))
    parts.append(f"kl {m['kl']:.2f} (coef {m['kl_coef']:.3f})")
    if "pg_loss" in m:
        parts.append(f"pg {m['pg_loss']:+.4f} vf {m['vf_loss']:.4f} clip {m['clipfrac']:.2f}")
        parts.append("w " + "/".join(f"{w:.2f}" for w in m["weights"]))
    parts.append(f"len {m['response_len']:.1f}")
    if m["skipped"]:
        parts.append(f"SKIPPED {m['skipped']}")
    parts.append(f"{m['time']['step']:.2f}s")
    return " | ".join(parts)


def _prepare_output_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.output_dir)
    if cfg.resume:
        if not out.is_dir():
            raise ConfigError(f"--resume: no checkpoint in {str(out)!r} (nothing to resume)")
        remove_stale_temporaries(out)
        found = select_checkpoint(out, lambda msg: print(f"pama-ext train: warning: {msg}", file=sys.stderr))
        if found is None:
            raise ConfigError(f"--resume: no checkpoint in {str(out)!r} (nothing to resume)")
        return out
    return prepare_output_dir(out, RUN_FILES, RUN_DIRS, cfg.overwrite, markers=(CHECKPOINT, PREVIOUS),
                              advice="pass --resume to continue it or --overwrite to start afresh")


def train(config: Union[TrainConfig, Dict[str, Any]]) -> Dict[str, Any]:
    """Run (or resume) one training run; returns a dict with the evaluations, the final table and paths.

    Raises :class:`ConfigError` / :class:`CheckpointError` (naming the flag or the file) for bad settings
    and unusable checkpoints, and :class:`TrainingStopped` on Ctrl-C. A fresh run that fails or stops
    before its first checkpoint removes what it wrote (and the output directory if it created it)."""
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    cfg = dataclasses.replace(cfg).validate()
    if cfg.model != TINY:
        check_pretrained(cfg.model, "--model")
    if cfg.tokenizer:
        check_pretrained(cfg.tokenizer, "--tokenizer", need=None)
    # under torchrun only rank 0 touches the run directory
    created = new_dirs(cfg.output_dir)
    out = _prepare_output_dir(cfg) if os.environ.get("RANK", "0") == "0" else None
    try:
        return _train_in_group(cfg, out)
    except BaseException:
        if out is not None and not cfg.resume and not (out / CHECKPOINT).exists():
            discard_run(out, RUN_FILES, RUN_DIRS, created)
        raise


def _train_in_group(cfg: TrainConfig, out: Optional[Path]) -> Dict[str, Any]:
    import torch

    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg)
    group, own_group = None, False
    if cfg.world_size > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            own_group = True
        group = dist.group.WORLD
    try:
        return _train(cfg, out, device, group, t_start)
    finally:
        if own_group:
            torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, out: Optional[Path], device, group, t_start: float) -> Dict[str, Any]:
    import torch

    from ..lm.policy import PolicyWithValueHeads, frozen_copy
    from ..lm.rewards import build_objectives
    from .evaluate import default_hv_ref, evaluate, means
    from .ppo import PPOTrainer

    main = group is None or torch.distributed.get_rank(group) == 0  # evaluates and writes the run directory
    out = out if out is not None else Path(cfg.output_dir)

    state = None
    ck = out / CHECKPOINT
    if cfg.resume:
        state = read_trainer_state(ck)
        saved_cfg = state["config"]
        for k, v in cfg.to_dict().items():
            if k not in RESUME_MAY_CHANGE and saved_cfg.get(k) != v:
                raise ConfigError(f"{flag(k)}: the run in {str(out)!r} was made with {saved_cfg.get(k)!r}; got {v!r} "
                                  f"(only {', '.join(sorted(flag(x) for x in RESUME_MAY_CHANGE))} may change on "
                                  f"--resume)")
        if state["trainer"]["step"] > cfg.steps:
            raise ConfigError(f"--steps: the checkpoint is at step {state['trainer']['step']}, beyond {cfg.steps}")

    seed_everything(cfg.seed)

    model_path, train_prompts, eval_prompts = _resolve_model(cfg)
    objectives = build_objectives(cfg, device=str(device))
    names = [o.name for o in objectives]
    tokenizer = load_tokenizer(cfg.tokenizer or model_path)
    lm = load_lm(str(ck), device) if cfg.resume else load_lm(model_path, device)
    if cfg.lora_r:  # the reference is the same model with its adapters off
        from ..lm import lora

        peft_model = lora.add_lora(lm, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets)
        ref_lm = lora.AdapterDisabled(peft_model)
        lm = peft_model.get_base_model()
    else:
        ref_lm = frozen_copy(load_lm(model_path, device))
    policy = PolicyWithValueHeads(lm, cfg.n_heads).to(device)
    trainer = PPOTrainer(cfg, policy, ref_lm, tokenizer, objectives, train_prompts, device, group=group)
    if main:
        atomic_write_text(out / "config.yaml", dump_yaml(dataclasses.replace(cfg, resume=False, overwrite=False)))

    metrics: List[Dict] = []
    evals: List[Dict] = []
    if state is not None:
        policy.value_heads.load_state_dict(read_tensor_file(ck / "value_heads.pt", map_location=device))
        trainer.load_state_dict(state["trainer"])
        set_rng_states(state["rng"])
        step0 = trainer.step_idx
        metrics = [m for m in read_jsonl(out / "metrics.jsonl") if m.get("step", 0) <= step0]
        evals = [e for e in read_jsonl(out / "eval.jsonl") if e.get("step", 0) <= step0]
        init_eval = state["init_eval"]
        print(f"[{cfg.method}] resuming {out} at step {step0}/{cfg.steps}", file=sys.stderr)
    else:
        init_eval = None

    def run_eval(step: int) -> Dict:
        summ, samples = evaluate(policy, ref_lm, tokenizer, objectives, eval_prompts, cfg, step)
        atomic_write_text(out / "samples" / f"step_{step:06d}.jsonl", jsonl_text(samples))
        evals.append(summ)
        atomic_write_text(out / "eval.jsonl", jsonl_text(evals))
        return summ

    if not main:  # the other ranks train in step with rank 0 and leave the rest to it
        while trainer.step_idx < cfg.steps:
            metrics.append(trainer.step(None))
        return {"output_dir": str(out), "config": cfg, "metrics": metrics, "rank": torch.distributed.get_rank(group),
                "wall_s": time.perf_counter() - t_start}
    if init_eval is None:
        init_eval = run_eval(0)
    hv_ref = list(cfg.hv_ref) if cfg.hv_ref is not None else default_hv_ref(means(init_eval, names), cfg.hv_margin)
    saved = {"step": trainer.step_idx if state is not None else None}

    def checkpoint() -> None:
        if save_checkpoint(out, policy, tokenizer, trainer, cfg, {"init_eval": init_eval, "model_path": model_path}):
            saved["step"] = trainer.step_idx

    try:
        return _train_loop(cfg, out, trainer, metrics, evals, names, run_eval, checkpoint, saved, init_eval, hv_ref,
                           t_start, single=group is None)
    except TrainingStopped:
        raise
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the loop: the last checkpoint stands
        raise TrainingStopped(trainer.step_idx, saved["step"]) from None


def _train_loop(cfg, out, trainer, metrics, evals, names, run_eval, checkpoint, saved, init_eval, hv_ref,
                t_start, single) -> Dict[str, Any]:
    from tqdm.auto import tqdm

    from .evaluate import comparison_table, format_table, hypervolume, means

    bars = {}
    # bars only on a terminal: in a log file nested bars are noise (the summary lines remain)
    use_bars = cfg.progress and sys.stderr.isatty()
    outer = tqdm(total=cfg.steps, initial=trainer.step_idx, desc=f"{cfg.method}", unit="step",
                 disable=not use_bars, dynamic_ncols=True)
    if use_bars:
        bars["rollout"] = tqdm(total=cfg.batch_size, desc="  rollout", unit="seq", leave=False, position=1,
                               dynamic_ncols=True)
        bars["update"] = tqdm(total=1, desc="  update", unit="mb", leave=False, position=2, dynamic_ncols=True)
    # A first Ctrl-C finishes the step, saves and stops. One process only: under torchrun the ranks could not
    # agree on the step to stop at, so there every Ctrl-C stops at once and the last checkpoint stands.
    with deferred_sigint(enabled=single) as sigint:
        try:
            while trainer.step_idx < cfg.steps:
                m = trainer.step(bars)
                metrics.append(m)
                atomic_write_text(out / "metrics.jsonl", jsonl_text(metrics))
                k = trainer.step_idx
                if cfg.log_every and (k % cfg.log_every == 0 or k == cfg.steps):
                    tqdm.write(_summary_line(cfg, m), file=sys.stderr)
                outer.update(1)
                if cfg.eval_every and k % cfg.eval_every == 0 and k != cfg.steps:
                    e = run_eval(k)
                    tqdm.write(f"[{cfg.method}] eval step {k}: " + " ".join(
                        f"{n} {e['objectives'][n]['mean']:+.3f}" for n in names) + f" kl {e['kl']:.2f}",
                        file=sys.stderr)
                if cfg.save_every and k % cfg.save_every == 0 and k != cfg.steps:
                    checkpoint()
                if sigint["requested"]:
                    if saved["step"] != k:
                        checkpoint()
                    raise TrainingStopped(k, saved["step"])
        finally:
            for b in list(bars.values()) + [outer]:
                b.close()

    final_eval = evals[-1] if evals and evals[-1]["step"] == cfg.steps and cfg.steps > 0 else run_eval(cfg.steps)
    checkpoint()

    col_init, col_final = "untrained", cfg.method
    columns = {col_init: init_eval, col_final: final_eval}
    hv = {c: hypervolume([means(s, names)], hv_ref) for c, s in columns.items()}
    table = comparison_table(columns, names, hv)
    table["hv_ref"] = hv_ref
    table["method"] = cfg.method
    table["steps"] = cfg.steps
    table["skipped_updates"] = trainer.skipped_total
    md = format_table(table)
    atomic_write_text(out / "final.json", json.dumps(table, indent=1))
    atomic_write_text(out / "final.md", f"# {cfg.method}: {cfg.steps} steps on {cfg.model}\n\n{md}\n\n"
                                        f"Hypervolume reference point: {hv_ref}. Evaluation: "
                                        f"{final_eval['decoding']} on {final_eval['n']} prompts.\n")
    plots = {}
    if cfg.plots:
        from .plots import plot_pareto, plot_reward_curves

        plots["rewards"] = plot_reward_curves({cfg.method: metrics}, {cfg.method: evals}, names,
                                              str(out / "rewards.png"))
        plots["pareto"] = plot_pareto({col_init: means(init_eval, names), col_final: means(final_eval, names)},
                                      names, str(out / "pareto.png"), ref=hv_ref,
                                      trajectories={col_final: [means(e, names) for e in evals]})
    return {
        "output_dir": str(out), "config": cfg, "init_eval": init_eval, "final_eval": final_eval, "evals": evals,
        "metrics": metrics, "hv_ref": hv_ref, "hypervolume": hv, "table": table, "table_md": md,
        "skipped_updates": trainer.skipped_total, "wall_s": time.perf_counter() - t_start, "plots": plots,
        "checkpoint": str(out / CHECKPOINT),
    }


# -------------------------------------------------------------------------------------------------
# command line
# -------------------------------------------------------------------------------------------------
def add_train_subcommand(subparsers) -> argparse.ArgumentParser:
    """Adds ``train`` to a ``pama-ext`` subparsers object (every TrainConfig field is a flag)."""
    p = subparsers.add_parser(
        "train", help="multi-objective PPO (pama, morlhf, linear, mgda-ub, mgda) on a Hugging Face causal LM",
        description="Multi-objective PPO with the pama_ext fused ops. Settings come from the defaults, then "
                    "--config FILE.yaml (keys as the flags, with - or _), then the flags. With --resume the "
                    "run's saved config.yaml is the base. See docs/trainer.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, TrainConfig)
    p.set_defaults(func=cmd_train)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = flag_overrides(args, TrainConfig)
    data: Dict[str, Any] = {}
    if overrides.get("resume"):
        out = overrides.get("output_dir") or (load_yaml(args.config).get("output_dir") if args.config else None) \
            or TrainConfig().output_dir
        saved = Path(out) / "config.yaml"
        if saved.is_file():
            data.update(load_yaml(str(saved)))
            data["resume"] = True
            data["overwrite"] = False
    if args.config:
        data.update(load_yaml(args.config))
    data.update(overrides)
    return load_config(None, data)


#: exit status of a run stopped by Ctrl-C (128 + SIGINT, the shell's convention)
EXIT_INTERRUPTED = 130


def cmd_train(args: argparse.Namespace) -> int:
    cfg = None
    try:
        cfg = config_from_args(args)
        result = train(cfg)
    except (ConfigError, CheckpointError) as e:
        print(f"pama-ext train: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"pama-ext train: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # before the first step (loading, the first evaluation)
        print("pama-ext train: stopped before the first step; " + (
            "continue with --resume" if cfg is not None and cfg.resume else "nothing was saved: run again"),
            file=sys.stderr)
        return EXIT_INTERRUPTED
    if "table_md" in result:  # rank 0 (or the only process)
        print(result["table_md"])
        print(f"\noutput: {result['output_dir']} ({result['wall_s']:.1f} s)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pama_ext.trainer.train")
    sub = ap.add_subparsers(dest="command", required=True)
    add_train_subcommand(sub)
    args = ap.parse_args(["train", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

