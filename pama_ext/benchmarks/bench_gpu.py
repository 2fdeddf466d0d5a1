"""GPU benchmark suite of pama_ext: bandwidth, PAMA vs full-gradient MGDA, share of a PPO step.

The GPU issue's measurements: bandwidth targets of the fused ops, PAMA vs full-gradient MGDA,
and the share of a PPO step spent in pama_ext ops.

Sections (``--only`` takes a comma list; default: all, in this order):

* ``bandwidth``   measured device copy bandwidth (``common.copy_bandwidth_gbs``, read + write),
                  the 100 % of every "% of copy BW" column.
* ``policy_loss`` ``pama_policy_loss`` forward + backward, float32 and bfloat16 inputs (bool mask),
                  B×T from 16×512 to 64×8192 plus 128×8192 / 256×8192 (2^20 / 2^21 tokens, where
                  the bandwidth target applies), n ∈ {1, 2, 4, 8}: ``fused`` (check_finite=False:
                  no host sync), ``fused_checked`` (the default check_finite=True: one extra read of
                  the inputs and one host read-back), ``eager`` (pama_ext.reference) and ``compile``
                  (torch.compile of baselines.reference_policy_loss_flat, which works around the
                  loss/metrics aliasing problem of compiling the metrics dict, see there).
* ``gae``         ``multi_gae`` forward: fused vs reference eager vs the per-timestep Python loop
                  that TRL/verl use (baselines.gae_python_loop) at T = 1024 (and T = 256) vs
                  torch.compile(reference) where it compiles in time (gae.compile_row: a
                  time-boxed child process; dynamo unrolls the loop over T), plus large sizes
                  for the bandwidth figure.
* ``stats``       ``objective_stats`` (its two launchers: moments and indicators, each a partials
                  kernel + a single-block finalize kernel) and ``pareto_weights`` (one launch) for
                  n ∈ {1, 2, 4, 8, 16} at 2^20 tokens: whole-op times (do_bench) and per-kernel
                  device times from torch.profiler, so the finalize/weights cost is seen apart
                  from the pass over the data.
* ``headline``    one weighting step: PAMA (objective_stats + pareto_weights on the advantages)
                  vs full-gradient MGDA (n backward passes of per-objective PPO losses through a
                  randomly initialised GPT-2-small (124M, fp32) and a ~1B GPT-2-shaped model
                  (n_layer 24, n_embd 1792, bf16; TF32 matmuls for fp32), flattened gradients, Gram in fp32,
                  Frank-Wolfe via pama_ext.reference.mgda_weights), n ∈ {2, 4, 8}: time, peak
                  memory, and one ordinary backward pass for scale. Uses transformers' GPT2LMHeadModel
                  when importable, else a plain-PyTorch GPT-2 of the same shapes (the CSV says which).
* ``e2e``         share of a PPO step spent in pama_ext ops on a random GPT-2-small, from
                  torch.profiler: (a) ``update``: a PPO update written here (scoring forward,
                  token_rewards, multi_gae, policy forward, pama_policy_loss + multi_value_loss,
                  backward, AdamW); (b) ``trainer``: pama_ext.trainer's PPOTrainer.step (rollout
                  with generate, rewards, updates) when transformers is installed. Share = the
                  host time inside top-level ``pama_ext::`` ops, and the device time of pama
                  kernels, over the step's wall time.

Timing: ``common.time_fn`` (triton.testing.do_bench median/p20/p80 when triton is importable,
CUDA events otherwise), rotating over several input sets; peak memory from
torch.cuda.max_memory_allocated. Byte counts: policy_loss.nbytes / gae.nbytes (the fused
algorithm's DRAM traffic, the same count for every implementation; see benchmarks/README.md).

Outputs in ``--out`` (default benchmarks/results/), ``<tag>`` = the device name in lower case:
``bench_gpu_<section>_<tag>.csv`` and ``.md`` per section, ``bench_gpu_<tag>.md`` (every section's
table that exists in the folder), ``bench_gpu_policy_loss_<tag>.png``, ``bench_gpu_gae_<tag>.png``,
``bench_gpu_headline_<tag>.png``.

    python -m pama_ext.benchmarks.bench_gpu --quick                 # every section, small sweep (~3 min)
    python -m pama_ext.benchmarks.bench_gpu --time-limit 900        # full sweep, stops starting new configs after 15 min
    python -m pama_ext.benchmarks.bench_gpu --only headline,e2e
    python -m pama_ext.benchmarks.bench_gpu --cpu                   # headline + e2e measured on the CPU (tag cpu)

``--cpu`` runs the two model sections on the CPU at CPU-sized defaults (gpt2-small, headline B×T =
4×128, e2e 8 sequences of 64 tokens): the same code and measurements, times from the wall clock and
peak memory from the process's resident set (``common.peak_memory_mb``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import torch

from pama_ext import NATIVE_AVAILABLE, ops

from . import common, e2e, gae, headline, policy_loss, stats
from .headline import CPU_HEADLINE_BT, HEADLINE_BT
from .models import MODELS, SMOKE_MODELS

SECTIONS = common.GPU_SECTIONS
CPU_SECTIONS = ("headline", "e2e")  # what --cpu runs


def section_bandwidth(args, device, budget) -> None:
    """Measured device copy bandwidth (the 100 % of every "% of copy BW" column) and the theoretical
    DRAM bandwidth where the device properties give it."""
    rows = []
    for mb in ([256] if args.quick else [256, 1024]):
        bw = common.copy_bandwidth_gbs(device, mbytes=mb, repeats=20)
        rows.append({"what": "copy", "mbytes": mb, "gbps": bw})
    peak = None
    try:  # theoretical DRAM bandwidth, when the properties expose the memory clock and bus width
        p = torch.cuda.get_device_properties(device)
        peak = 2 * p.memory_clock_rate * 1e3 * (p.memory_bus_width / 8) / 1e9
    except (AttributeError, AssertionError, RuntimeError, ValueError):
        pass
    md = common.section_header(args, "bandwidth", "`dst.copy_(src)` of a float32 tensor; GB/s = (bytes read + "
                               "written) / median time.")
    md += ["| copy size | GB/s |", "|---|---|"] + [f"| {r['mbytes']} MB | {r['gbps']:.0f} |" for r in rows]
    if peak:
        md += ["", f"Theoretical DRAM bandwidth from the device properties: {peak:.0f} GB/s "
               f"(measured copy = {100 * args.copy_bw / peak:.0f}% of it)."]
        rows.append({"what": "theoretical", "mbytes": "", "gbps": peak})
    common.write_section(args, "bandwidth", rows, md)


RUNNERS = {"bandwidth": section_bandwidth, "policy_loss": policy_loss.section, "gae": gae.section,
           "stats": stats.section, "headline": headline.section, "e2e": e2e.section}


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ("Sections: " + ", ".join(SECTIONS) + ". Needs a CUDA GPU and pama_ext built with its CUDA kernels "
                "(PAMA_EXT_CUDA=1), except --cpu.")
    p.add_argument("--quick", action="store_true", help="small sweep of every section (a few minutes)")
    p.add_argument("--only", default=None, help="comma list of sections (default: all; --cpu: headline,e2e)")
    p.add_argument("--out", default=common.RESULTS_DIR, help=f"output folder (default {common.RESULTS_DIR})")
    p.add_argument("--time-limit", type=float, default=0.0,
                   help="seconds; once exceeded, configs not yet started are recorded as skipped (0: none)")
    p.add_argument("--budget", type=float, default=0.2, help="seconds of timed calls per (impl, shape)")
    p.add_argument("--max-repeats", type=int, default=200)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    p.add_argument("--static-compile", action="store_true",
                   help="policy_loss: compile per shape with dynamic=False (slow; default: dynamic=True, one "
                        "compile per dtype) and only from 2^18 tokens")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--dtypes", default=None, help="policy_loss/stats dtypes, e.g. float32,bfloat16")
    p.add_argument("--ns", default=None, help="override n of policy_loss and gae, e.g. 1,2,4,8")
    p.add_argument("--sizes", default=None, help="override the policy_loss B x T sweep, e.g. 16x512,64x8192")
    p.add_argument("--gae-sizes", default=None, help="override the gae B x T sweep")
    p.add_argument("--gae-compile-ns", default="4", help="n values at which GAE compile is tried (T <= max-t)")
    p.add_argument("--gae-compile-max-t", type=int, default=256)
    p.add_argument("--compile-timeout", type=float, default=150.0, help="time box (s) of one GAE compile child")
    p.add_argument("--stats-ns", default=None, help="override n of the stats section, e.g. 1,2,4,8,16")
    p.add_argument("--models", default=None,
                   help="headline models: " + ", ".join(MODELS) + " (default: both; --cpu: gpt2-small)")
    p.add_argument("--headline-ns", default=None, help="override n of the headline (default 2,4,8)")
    p.add_argument("--headline-bt", default=None,
                   help=f"headline batch B x T (default {HEADLINE_BT[0]}x{HEADLINE_BT[1]}; --cpu: "
                        f"{CPU_HEADLINE_BT[0]}x{CPU_HEADLINE_BT[1]})")
    p.add_argument("--headline-repeats", type=int, default=3, help="timed MGDA steps per config")
    p.add_argument("--e2e-batch", type=int, default=None, help="e2e: sequences per PPO step (default 32; --cpu: 8)")
    p.add_argument("--e2e-minibatch", type=int, default=None, help="default 16; --cpu: 4")
    p.add_argument("--e2e-response", type=int, default=None, help="e2e: response tokens T (default 256; --cpu: 64)")
    p.add_argument("--cpu", action="store_true",
                   help="run the model sections (" + ", ".join(CPU_SECTIONS) + ") on the CPU at CPU-sized "
                        "defaults: a real measurement, outputs tagged cpu (the bandwidth sections are GPU-only; "
                        "the CPU op benchmark is bench_ops)")
    # developer check of the code paths on a machine without a GPU: tiny sizes and models on the CPU,
    # numbers meaningless; outputs tagged cpu_smoke
    p.add_argument("--smoke-cpu", action="store_true", help=argparse.SUPPRESS)
    return p


def check_args(args, p: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None):
    """Validates the parsed options (``p.error`` on a bad one) and fills the derived fields."""
    args.command = common.command_line("pama_ext.benchmarks.bench_gpu", argv)
    if args.cpu and args.smoke_cpu:
        p.error("--cpu and --smoke-cpu exclude each other")
    args.sections = [s.strip() for s in (args.only or ",".join(CPU_SECTIONS if args.cpu else SECTIONS)).split(",")
                     if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        p.error(f"--only: unknown section(s) {bad}; choose from {', '.join(SECTIONS)}")
    if args.cpu and any(s not in CPU_SECTIONS for s in args.sections):
        p.error(f"--cpu runs only {', '.join(CPU_SECTIONS)}; the op sections measure GPU bandwidth "
                "(on a CPU use pama_ext.benchmarks.bench_ops)")
    cpu = args.cpu
    args.models = args.models or ("gpt2-small" if cpu else "gpt2-small,gpt2-1b")
    args.headline_bt = args.headline_bt or "x".join(map(str, CPU_HEADLINE_BT if cpu else HEADLINE_BT))
    args.e2e_batch = args.e2e_batch or (8 if cpu else 32)
    args.e2e_minibatch = args.e2e_minibatch or (4 if cpu else 16)
    args.e2e_response = args.e2e_response or (64 if cpu else 256)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        p.error(f"--models: unknown {bad}; choose from {', '.join(MODELS)}")
    args.model_specs = dict(MODELS)
    args.pl_sizes = common.parse_sizes(args.sizes)
    args.gae_sizes = common.parse_sizes(args.gae_sizes)
    args.ns = common.parse_ints(args.ns)
    args.stats_ns = common.parse_ints(args.stats_ns)
    args.stats_bt = None
    args.headline_ns = common.parse_ints(args.headline_ns)
    args.gae_compile_ns = common.parse_ints(args.gae_compile_ns) or []
    args.headline_bt = common.parse_sizes(args.headline_bt)[0]
    args.dtypes = [d.strip() for d in args.dtypes.split(",")] if args.dtypes else None
    if args.quick:
        args.models = [m for m in args.models if m != "gpt2-1b"] or args.models
        args.e2e_batch, args.e2e_response = min(args.e2e_batch, 16), min(args.e2e_response, 128)
    return args


def parse_args(argv=None):
    p = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    return check_args(p.parse_args(argv), p, argv)


def smoke_settings(args) -> None:
    """--smoke-cpu: tiny models and sizes on the CPU (code paths only; numbers meaningless)."""
    args.model_specs = dict(SMOKE_MODELS)
    args.stats_bt = (4, 300)
    args.pl_sizes = args.pl_sizes or [(4, 64), (8, 130)]
    args.gae_sizes = args.gae_sizes or [(4, 64), (2, 1024)]
    args.ns = args.ns or [1, 3]
    args.stats_ns = args.stats_ns or [2, 16]
    args.headline_bt = (2, 32)
    args.headline_ns = args.headline_ns or [2, 3]
    args.e2e_batch, args.e2e_minibatch, args.e2e_response = 4, 2, 8


def run(args) -> int:
    if args.smoke_cpu:
        smoke_settings(args)
    elif args.cpu:
        common.malloc_returns_large_blocks()  # before any large tensor: RSS peaks then measure each call
    elif not torch.cuda.is_available():
        print(f"bench_gpu: CUDA is not available (torch {torch.__version__}, CUDA runtime "
              f"{torch.version.cuda}); the GPU benchmarks need an NVIDIA GPU. On a CPU use bench_ops "
              "(or bench_gpu --cpu for the model sections).", file=sys.stderr)
        return 2
    elif not (NATIVE_AVAILABLE and ops.has_cuda_kernels()):
        print("bench_gpu: pama_ext has no CUDA kernels loaded (native library "
              f"{'loaded' if NATIVE_AVAILABLE else 'not loaded'}); build it with "
              "`PAMA_EXT_CUDA=1 pip install --no-build-isolation -e .`", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke_cpu or args.cpu else "cuda")
    torch.set_float32_matmul_precision("high")  # TF32 for the fp32 model passes, as GPU training runs them
    args.tag = "cpu_smoke" if args.smoke_cpu else "cpu" if args.cpu else common.device_tag(device)
    args.desc = common.device_description(device)
    args.plan = (common.TimingPlan(warmup=2, min_repeats=5, max_repeats=50, budget_s=0.1) if args.quick else
                 common.TimingPlan(warmup=3, min_repeats=10, max_repeats=args.max_repeats, budget_s=args.budget))
    args.slow_plan = common.TimingPlan(warmup=1, min_repeats=3, max_repeats=10, budget_s=0.5)  # Python loops
    budget = common.Budget(args.time_limit)
    os.makedirs(args.out, exist_ok=True)
    args.copy_bw = common.copy_bandwidth_gbs(device, mbytes=256 if args.quick else 1024, repeats=20)
    print(f"device: {args.desc}\ncopy bandwidth: {args.copy_bw:.0f} GB/s (read + write)\nsections: "
          f"{', '.join(args.sections)}; out: {args.out}", flush=True)
    failed = []
    for s in SECTIONS:
        if s not in args.sections:
            continue
        t0 = time.perf_counter()
        print(f"== {s} (elapsed {budget.elapsed():.0f} s)", flush=True)
        try:
            RUNNERS[s](args, device, budget)
        except Exception as e:  # noqa: BLE001 - one broken section must not lose the others
            import traceback

            traceback.print_exc()
            failed.append(f"{s}: {type(e).__name__}: {e}")
        torch.cuda.empty_cache()
        print(f"== {s} done in {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"\nreport: {os.path.join(args.out, f'bench_gpu_{args.tag}.md')}")
    if failed:
        print("FAILED sections:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
