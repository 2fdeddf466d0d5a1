"""``PamaGRPOTrainer``'s loss step (``compute_loss`` forward + backward, no generation) on TRL's
log-probs (``fused_linear=False``: TRL 1.16's tiled LM head, ``fused_lm_head=True``) against the
fused output layer (``fused_linear=True``: ``pama_ext.fused_linear_policy_loss`` from the last
hidden states), one fresh process per case, on a randomly initialised GPT-2-shaped model.

Cases:

* ``trl``: ``fused_linear=False`` (TRL's log-probs and entropy, then the PAMA loss), with rollout
  log-probs (``old_per_token_logps``; TRL's cost is the same without them);
* ``fused``: ``fused_linear=True`` with rollout log-probs: the op's single pass (3 output-layer matmuls);
* ``fused-onpolicy``: ``fused_linear=True`` without them (``num_iterations = 1``, TRL's default): the
  log-probs through ``fused_linear_logp`` first, then the loss (4 matmuls).

Per case: the peak resident set of the first step above the resident set before it (``VmHWM`` after
``clear_refs``, glibc returning large blocks: common.peak_memory_mb), the process's whole ``ru_maxrss``,
the median time of ``--repeats`` further steps, and, from one more step under the profiler
(:func:`output_layer_profile`), the output layer's matmul work per step in units of one
``B·T × H × V`` matmul and the most rows of a ``[rows, V]`` tensor the step reads (``B·T`` rows: the
completion's logits materialised at once).
Options: method ``pama``, token granularity, two objectives, loss type ``grpo``, ``beta`` 0, float32
(``bf16=False``; ``--bf16`` for GRPOConfig's bf16 autocast).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from typing import Callable, Dict, List, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

from . import common

MODULE = "pama_ext.benchmarks.trl_step"
CASES = ("trl", "fused", "fused-onpolicy")
_MATMULS = frozenset(("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"))
_WITH_ADDEND = frozenset(("aten::addmm", "aten::addmm_", "aten::baddbmm"))  # (addend, m1, m2, ...)
#: ops that call those (not counted twice; their operands are no logits either)
_MATMUL_WRAPPERS = frozenset(("aten::matmul", "aten::linear"))


def output_layer_profile(fn: Callable[[], object], vocab: int) -> Tuple[int, int]:
    """``(macs, rows)`` of one call ``fn()`` under the torch profiler (forward and backward, custom
    autograd functions included): the multiply-adds of the matmuls (aten mm / addmm / bmm) with an
    operand of a dimension ``vocab`` (the output layer's; one ``N × H × V`` matmul is ``N·H·V``), and
    the most rows of a tensor ``[..., vocab]`` that any other op reads (``B·T`` rows: the completion's
    logits materialised at once)."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    macs = rows = 0
    for e in prof.events():
        shapes = [list(s) if isinstance(s, (list, tuple)) else [] for s in e.input_shapes]
        if e.name in _MATMULS:
            a, b = shapes[1:3] if e.name in _WITH_ADDEND else shapes[:2]
            if vocab in a or vocab in b:
                macs += math.prod(a) * b[-1]
        elif e.name not in _MATMUL_WRAPPERS:
            rows = max([rows] + [math.prod(s[:-1]) for s in shapes if len(s) >= 2 and s[-1] == vocab])
    return macs, rows


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {CASES}")
    p.add_argument("--batch", type=int, default=8, help="B: completions per micro-batch (default 8)")
    p.add_argument("--response", type=int, default=256, help="T: completion tokens (default 256)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    p.add_argument("--hidden", type=int, default=256, help="H (default 256)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--vocab", type=int, default=32768, help="V (default 32768)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps after the first (default 3)")
    p.add_argument("--bf16", action="store_true", help="GRPOConfig(bf16=True): bf16 autocast (default float32)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in the children (0: default)")
    p.add_argument("--case-timeout", type=float, default=1800.0, help="seconds per case (default 1800)")
    p.add_argument("--out", default=common.RESULTS_DIR, help=f"output folder (default {common.RESULTS_DIR})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # child mode: one case
    return p


def parse_args(argv=None):
    return add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0])).parse_args(argv)


def _length_reward(completions, **kwargs):
    return [len(c) / 100.0 for c in completions]


def _distinct_reward(completions, **kwargs):
    return [len(set(c.split())) / max(1, len(c.split())) for c in completions]


def make_step(case: str, args):
    """(step function, trainer) of one case: the trainer on a random GPT-2 and one synthetic micro-batch."""
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel
    from trl import GRPOConfig

    from pama_ext.integrations.trl import PamaGRPOTrainer
    from .e2e import word_tokenizer

    torch.manual_seed(args.seed)
    B, T, P, V = args.batch, args.response, args.prompt, args.vocab
    lm = GPT2LMHeadModel(GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=args.heads, vocab_size=V,
                                    n_positions=max(1024, P + T)))
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="pama_trl_step_"), per_device_train_batch_size=B,
                     num_generations=2, max_completion_length=T, report_to="none", use_cpu=True, save_strategy="no",
                     bf16=bool(args.bf16), seed=args.seed)
    ds = Dataset.from_dict({"prompt": ["w1 w2"] * B})
    trainer = PamaGRPOTrainer(model=lm, reward_funcs=[_length_reward, _distinct_reward], args=cfg, train_dataset=ds,
                              processing_class=word_tokenizer(V), fused_linear=case != "trl")
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    g = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(T // 2, T + 1, (B, 1), generator=g)
    inputs = dict(prompt_ids=torch.randint(0, V - 1, (B, P), generator=g),
                  prompt_mask=torch.ones(B, P, dtype=torch.long),
                  completion_ids=torch.randint(0, V - 1, (B, T), generator=g),
                  completion_mask=(torch.arange(T)[None] < lengths).long(),
                  objective_advantages=torch.randn(B, 2, generator=g), advantages=torch.randn(B, generator=g))
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
    if case != "fused-onpolicy":
        inputs["old_per_token_logps"] = -torch.rand(B, T, generator=g) - torch.log(torch.tensor(float(V)))
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        trainer.compute_loss(trainer.model, inputs).backward()

    return step, trainer


def run_case(args) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    common.malloc_returns_large_blocks()
    step, trainer = make_step(args.case, args)
    result = common.first_call_then_repeats(step, args.repeats)
    macs, rows = output_layer_profile(step, args.vocab)
    full = args.batch * args.response * args.hidden * args.vocab  # one B·T x H x V matmul
    print(json.dumps(dict(result, head_matmuls=macs / full, max_vocab_rows=rows)))
    return 0


def run(args) -> int:
    if args.case:
        return run_case(args)
    cases = [c for c in args.cases.split(",") if c]
    bad = sorted(set(cases) - set(CASES))
    if bad:
        raise SystemExit(f"--cases: unknown {bad}; choose from {CASES}")
    load = common.load_average(os.getloadavg())
    desc = common.device_description(torch.device("cpu"))
    cmd = common.command_line(MODULE)
    print(f"device: {desc}; load average {load}", flush=True)
    rows: List[Dict[str, object]] = []
    for case in cases:
        argv = ["--case", case] + [f"--{k}={getattr(args, k)}" for k in ("batch", "response", "prompt", "layers",
                                                                        "hidden", "heads", "vocab", "repeats",
                                                                        "threads", "seed")]
        if args.bf16:
            argv.append("--bf16")
        row: Dict[str, object] = dict(case=case, B=args.batch, T=args.response, P=args.prompt, H=args.hidden,
                                      V=args.vocab, bf16=bool(args.bf16), load=round(os.getloadavg()[0], 2))
        row.update(common.child_result(MODULE, argv, args.case_timeout))
        rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    common.finish_cpu_report(rows, "bench_trl_step_bf16" if args.bf16 else "bench_trl_step", args.out, table, desc,
                             load, cmd)
    return 0


def table(rows: List[Dict[str, object]], header: str) -> str:
    base = next((r for r in rows if r.get("status") == "ok" and r["case"] == "trl"), None)
    lines = [header, "",
             "step: PamaGRPOTrainer.compute_loss + backward on one micro-batch (no generation); extra MB: peak resident "
             "set of the first step above the resident set before it; peak RSS: the whole process; ms: median of the "
             "timed steps; head matmuls: the output layer's matmul work per step in units of one B·T x H x V "
             "matmul; max [rows, V]: the most rows of a V-wide tensor the step reads; load: 1-minute load average when the case started.", "",
             "| case | B | T | H | V | ms | ms / trl | extra MB | extra / trl | peak RSS MB | head matmuls | "
             "max [rows, V] | load |", "|" + "---|" * 13]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['case']} | {r.get('status')}: {r.get('reason', '')} ||||||||||||")
            continue
        ratio = (lambda k: f"{r[k] / base[k]:.2f}x" if base and base[k] else "—")
        lines.append(f"| {r['case']} | {r['B']} | {r['T']} | {r['H']} | {r['V']} | {r['median_ms']:.0f} | "
                     f"{ratio('median_ms')} | {r['extra_mb']:.0f} | {ratio('extra_mb')} | {r['peak_rss_mb']:.0f} | "
                     f"{r['head_matmuls']:.2f} | {r['max_vocab_rows']} | {r['load']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
