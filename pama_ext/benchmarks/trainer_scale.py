"""The trainer past toy models: one PPO step (``PPOTrainer.step``: rollout with ``generate``, scoring,
one update) of a randomly initialised GPT-2-small-shaped model (transformers' ``GPT2Config()``
defaults: 12 layers, H = 768, V = 50257, 124M parameters) at B × T = ``--batch`` × ``--response``,
under each combination of the memory and precision options (``--configs``), one fresh process each.

Per configuration: the peak resident set of the whole process (``ru_maxrss``: model, reference,
optimizer state and the step; what must fit the machine), the resident set after the setup (model,
reference policy, tokenizer) and the step's wall time split into rollout and update. The step is the
process's first (no warm-up: each configuration would otherwise cost two steps); the model generates
until ``--response`` tokens (a random model practically never samples its end-of-text token).

Configurations (names joined with '+', any order): ``fp32`` (no autocast) or ``bf16`` (autocast,
float32 master weights), ``lora`` (``--lora-r 16``, the reference = adapters off), ``ckpt``
(``--gradient-checkpointing``), ``fused`` (``--fused-linear``; without it ``--no-fused-linear``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Dict, List

import torch

from . import common

MODULE = "pama_ext.benchmarks.trainer_scale"
#: configuration words -> TrainConfig fields
WORDS = {
    "fp32": dict(dtype="fp32"),
    "bf16": dict(dtype="bf16"),
    "lora": dict(lora_r=16, lora_alpha=32.0),
    "ckpt": dict(gradient_checkpointing=True),
    "fused": dict(fused_linear=True),
}
DEFAULT_CONFIGS = "fp32,fp32+fused,bf16+lora+ckpt,bf16+lora+ckpt+fused"


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help=f"comma list of configurations, words joined by '+' from {sorted(WORDS)} "
                        f"(default {DEFAULT_CONFIGS})")
    p.add_argument("--batch", type=int, default=8, help="B: responses per step (default 8)")
    p.add_argument("--response", type=int, default=256, help="T: response tokens (default 256)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--layers", type=int, default=12, help="transformer blocks (default 12: GPT-2 small)")
    p.add_argument("--hidden", type=int, default=768, help="H (default 768)")
    p.add_argument("--heads", type=int, default=12, help="attention heads (default 12)")
    p.add_argument("--vocab", type=int, default=50257, help="V (default 50257)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in the children (0: default)")
    p.add_argument("--case-timeout", type=float, default=1800.0, help="seconds per configuration (default 1800)")
    p.add_argument("--out", default=common.RESULTS_DIR, help=f"output folder (default {common.RESULTS_DIR})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # child mode: one configuration
    return p


def parse_args(argv=None):
    return add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0])).parse_args(argv)


def config_fields(name: str) -> Dict[str, object]:
    """The TrainConfig fields of a configuration name such as ``bf16+lora+ckpt+fused``."""
    words = [w for w in name.split("+") if w]
    bad = sorted(set(words) - set(WORDS))
    if bad or not words:
        raise SystemExit(f"--configs: unknown word(s) {bad or [name]} in {name!r}; choose from {sorted(WORDS)}")
    if "fp32" in words and "bf16" in words:
        raise SystemExit(f"--configs: {name!r} names two dtypes")
    out: Dict[str, object] = dict(fused_linear=False)  # explicit: without "fused" the unfused output layer
    for w in words:
        out.update(WORDS[w])
    return out


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1e3
    return float("nan")


# ------------------------------------------------------------------------------------------------
# child: one configuration
# ------------------------------------------------------------------------------------------------
def run_case(args) -> int:
    from transformers import GPT2Config, GPT2LMHeadModel

    from pama_ext.lm import lora
    from .e2e import distinct_words, word_tokenizer

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    common.malloc_returns_large_blocks()
    fields = config_fields(args.case)
    tr = common.trainer_api()
    torch.manual_seed(args.seed)
    lm = GPT2LMHeadModel(GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=args.heads,
                                    vocab_size=args.vocab)).eval()
    n_params = sum(p.numel() for p in lm.parameters())
    tok = word_tokenizer(args.vocab)
    cfg = tr.TrainConfig(model="random-gpt2", objectives=["length", "py:pama_ext.benchmarks.e2e:distinct_words"],
                         method="pama", granularity="token", batch_size=args.batch, minibatch_size=args.batch,
                         ppo_epochs=1, max_new_tokens=args.response, max_prompt_tokens=args.prompt, device="cpu",
                         progress=False, seed=args.seed, **fields)
    cfg.validate()
    objectives = [tr.Objective("length", tr.LengthReward(cfg.length_l0, cfg.length_lo, cfg.length_hi)),
                  tr.Objective("distinct", distinct_words)]
    g = torch.Generator().manual_seed(args.seed)
    prompts = [" ".join(f"w{int(i)}" for i in torch.randint(0, args.vocab - 1, (args.prompt,), generator=g))
               for _ in range(4 * args.batch)]
    if cfg.lora_r:  # as pama_ext.trainer.train builds it: the reference is the adapters switched off
        peft_model = lora.add_lora(lm, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets)
        ref = lora.AdapterDisabled(peft_model)
        lm = peft_model.get_base_model()
    else:
        ref = tr.frozen_copy(lm)
    policy = tr.PolicyWithValueHeads(lm, cfg.n_heads)
    trainer = tr.PPOTrainer(cfg, policy, ref, tok, objectives, prompts, torch.device("cpu"))
    trainable = sum(p.numel() for p in trainer.params)
    setup_rss = rss_mb()
    t0 = time.perf_counter()
    res = trainer.step()
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # KiB on Linux
    T = int(trainer.last_rollout.mask.shape[1])
    print(json.dumps(dict(params=n_params, trainable=trainable, setup_rss_mb=setup_rss, peak_rss_mb=peak,
                          step_s=wall, rollout_s=res["time"]["rollout"], update_s=res["time"]["update"],
                          response_len=T, finite=bool(torch.isfinite(torch.tensor(float(res["loss"])))),
                          skipped=res["skipped"],
                          fused_loss=bool(trainer.fused_loss_path()))))
    return 0


# ------------------------------------------------------------------------------------------------
# parent
# ------------------------------------------------------------------------------------------------
def run(args) -> int:
    if args.case:
        return run_case(args)
    names = [c for c in args.configs.split(",") if c]
    for c in names:
        config_fields(c)  # fail early on a bad name
    load = common.load_average(os.getloadavg())
    desc = common.device_description(torch.device("cpu"))
    cmd = common.command_line(MODULE)
    print(f"device: {desc}; load average {load}", flush=True)
    rows: List[Dict[str, object]] = []
    for name in names:
        argv = ["--case", name, "--batch", str(args.batch), "--response", str(args.response), "--prompt",
                str(args.prompt), "--layers", str(args.layers), "--hidden", str(args.hidden), "--heads",
                str(args.heads), "--vocab", str(args.vocab), "--threads", str(args.threads), "--seed", str(args.seed)]
        row: Dict[str, object] = dict(config=name, load=round(os.getloadavg()[0], 2))
        row.update(common.child_result(MODULE, argv, args.case_timeout))
        rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    common.finish_cpu_report(rows, "bench_trainer_scale", args.out, table, desc, load, cmd)
    return 0


def table(rows: List[Dict[str, object]], header: str) -> str:
    base = next((r for r in rows if r.get("status") == "ok"), None)
    lines = [header, "", "peak RSS: the process's resident-set high-water mark (ru_maxrss) after setup + one step; "
             "setup RSS: after building model, reference and trainer; times of the process's first step; load: the "
             "1-minute load average when the configuration started.", "",
             "| configuration | trainable params | peak RSS MB | setup RSS MB | step s | rollout s | update s | "
             "peak / first | step / first | load |", "|" + "---|" * 10]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['config']} | {r.get('status')}: {r.get('reason', '')} |||||||||")
            continue
        lines.append(
            f"| {r['config']} | {r['trainable'] / 1e6:.2f}M | {r['peak_rss_mb']:.0f} | {r['setup_rss_mb']:.0f} | "
            f"{r['step_s']:.1f} | {r['rollout_s']:.1f} | {r['update_s']:.1f} | "
            f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f} | {r['step_s'] / base['step_s']:.2f} | {r['load']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
