"""Sweep benchmark of the fused ops (CPU by default): each op family against its baselines, in one run.

Op families (``--ops``, default ``policy_loss,gae``; one module each, implementations in its IMPLS):

* ``policy_loss`` (``pama_policy_loss`` forward + ``loss.backward()`` on ``logp``): ``fused``
  (pama_ext.ops), ``eager`` (pama_ext.reference), ``compile`` (``torch.compile(reference,
  dynamic=False)``, compiled once per shape).
* ``gae`` (``multi_gae`` forward): ``fused``, ``eager``, ``compile`` (time-boxed, in a child
  process: the reference loops over T in Python, so dynamo unrolls T steps), and ``loop``, a
  per-timestep, per-objective Python loop the way TRL / verl write GAE.
* ``value_loss`` (``multi_value_loss`` forward + backward), ``token_rewards`` (forward),
  ``dpo_loss`` (``multi_dpo_loss`` forward + backward, B pairs of length T): ``fused``, ``eager``,
  ``compile``.

Writes ``<out>/bench_ops_<device>.csv`` (one row per op, n, B, T, impl), ``bench_ops_<device>.md``
(the table printed at the end, with the device) and ``bench_ops_<device>.png`` (plot_ops.py).

    python -m pama_ext.benchmarks.bench_ops                 # full sweep on CPU (pama-ext bench ops)
    python -m pama_ext.benchmarks.bench_ops --quick --out /tmp/bench   # CI smoke run (< 60 s)
    python -m pama_ext.benchmarks.bench_ops --device cuda
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from pama_ext import NATIVE_AVAILABLE

from . import common, dpo_loss, gae, policy_loss, token_rewards, value_loss

# the op families of the sweep: each module has IMPLS, nbytes(n, B, T, elt, mask_elt) and
# run_point(n, B, T, args, device, plan, state, bar) -> {impl: row}
FAMILIES = {"policy_loss": policy_loss, "gae": gae, "value_loss": value_loss, "token_rewards": token_rewards,
            "dpo_loss": dpo_loss}

SIZES: List[Tuple[int, int]] = [(8, 256), (16, 512), (32, 1024), (64, 1024), (64, 2048)]
NS = [2, 4, 8]
QUICK_SIZES = [(8, 256), (16, 512)]
QUICK_NS = [2]
IMPLS = {name: module.IMPLS for name, module in FAMILIES.items()}


def plan_for(args) -> common.TimingPlan:
    if args.quick:
        return common.TimingPlan(warmup=1, min_repeats=3, max_repeats=10, budget_s=0.15)
    return common.TimingPlan(warmup=2, min_repeats=5, max_repeats=args.max_repeats, budget_s=args.budget)


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def markdown_table(rows: List[Dict[str, object]]) -> str:
    by_key: Dict[Tuple, Dict[str, Dict]] = {}
    for r in rows:
        by_key.setdefault((r["op"], int(r["n"]), int(r["B"]), int(r["T"])), {})[r["impl"]] = r
    head = ("| op | n | B×T | fused ms | eager ms | compile ms | loop ms (GAE) | eager/fused | "
            "compile/fused | loop/fused | fused GB/s | fused % copy BW |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for (op, n, B, T), impls in by_key.items():
        def med(impl):
            r = impls.get(impl)
            return r.get("median_ms") if r and r.get("status") == "ok" else None

        def sp(impl):
            r = impls.get(impl)
            return r.get("speedup_of_fused") if r and r.get("status") == "ok" else None

        f = impls.get("fused", {})
        loop_ms = common.fmt_ms(med("loop")) if op == "gae" else "n/a"
        loop_sp = common.fmt_ratio(sp("loop")) if op == "gae" else "n/a"
        gbs = f"{float(f['gbps']):.2f}" if f.get("gbps") not in (None, "") else "—"
        frac = f"{100 * float(f['frac_copy_bw']):.0f}%" if f.get("frac_copy_bw") not in (None, "") else "—"
        lines.append(
            f"| {op} | {n} | {B}×{T} | {common.fmt_ms(med('fused'))} | {common.fmt_ms(med('eager'))} | "
            f"{common.fmt_ms(med('compile'))} | {loop_ms} | {common.fmt_ratio(sp('eager'))} | "
            f"{common.fmt_ratio(sp('compile'))} | {loop_sp} | {gbs} | {frac} |"
        )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="CI smoke run: 2 sizes, n=2, few repeats")
    p.add_argument("--out", default=common.RESULTS_DIR, help=f"output folder (default {common.RESULTS_DIR})")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    p.add_argument("--ops", default="policy_loss,gae", help="comma list of op families (" + ", ".join(FAMILIES)
                   + "; default policy_loss,gae)")
    p.add_argument("--sizes", default=None, help="override the B x T sweep, e.g. 8x256,64x1024")
    p.add_argument("--ns", default=None, help="override the n sweep, e.g. 2,4")
    p.add_argument("--dtype", default="float32", help="dtype of the floating inputs")
    p.add_argument("--mask-dtype", default="float32", help="dtype of the mask")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timed calls per (impl, shape)")
    p.add_argument("--max-repeats", type=int, default=50)
    p.add_argument("--compile-timeout", type=float, default=90.0,
                   help="time box (s) of one GAE compile + timing (child process)")
    p.add_argument("--gae-compile-max-t", type=int, default=256,
                   help="compile reference.multi_gae only for T <= this")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--no-plot", action="store_true")
    return p


def check_args(args, p: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None):
    """Validates the parsed options (``p.error`` on a bad one) and fills the derived fields."""
    args.command = common.command_line("pama_ext.benchmarks.bench_ops", argv)
    for flag in ("dtype", "mask_dtype"):
        dt = getattr(torch, getattr(args, flag), None)
        if not isinstance(dt, torch.dtype):
            p.error(f"--{flag.replace('_', '-')}: not a torch dtype: {getattr(args, flag)!r}")
        setattr(args, flag, dt)
    args.op_list = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in args.op_list if o not in FAMILIES]
    if bad:
        p.error(f"--ops: unknown op(s) {bad}; choose from {', '.join(FAMILIES)}")
    args.sizes = common.parse_sizes(args.sizes) or (QUICK_SIZES if args.quick else SIZES)
    args.ns = common.parse_ints(args.ns) or (QUICK_NS if args.quick else NS)
    return args


def parse_args(argv=None):
    p = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    return check_args(p.parse_args(argv), p, argv)


def run(args) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from tqdm import tqdm

    if not NATIVE_AVAILABLE:
        print("WARNING: pama_ext native library not loaded: 'fused' runs the reference fallback",
              file=sys.stderr)
    device = common.resolve_device(args.device)
    plan = plan_for(args)
    sizes, ns = args.sizes, args.ns
    desc = common.device_description(device)
    load_start = os.getloadavg()
    copy_bw = common.copy_bandwidth_gbs(device, mbytes=64 if args.quick else 256)
    print(f"device: {desc}\ncopy bandwidth: {copy_bw:.1f} GB/s (read + write); load average "
          f"{common.load_average(load_start)}", flush=True)

    elt = torch.empty((), dtype=args.dtype).element_size()
    mask_elt = torch.empty((), dtype=args.mask_dtype).element_size()
    tasks = [(op, n, B, T) for op in args.op_list for (B, T) in sizes for n in ns]
    rows: List[Dict[str, object]] = []
    states: Dict[str, Dict] = {op: {} for op in args.op_list}  # per family (e.g. the GAE compile time-outs)
    t_start = time.perf_counter()
    bar = tqdm(tasks, desc="bench_ops", unit="cfg", dynamic_ncols=True)
    for op, n, B, T in bar:
        family = FAMILIES[op]
        res = family.run_point(n, B, T, args, device, plan, states[op], bar)
        nbytes = family.nbytes(n, B, T, elt, mask_elt)
        fused_ms = res["fused"].get("median_ms")
        for impl in family.IMPLS:
            r = res.get(impl, common.skipped("not run"))
            row = {"op": op, "n": n, "B": B, "T": T, "tokens": B * T, "impl": impl,
                   "dtype": common.dtype_name(args.dtype), **r}
            if r.get("status") == "ok":
                row["speedup_of_fused"] = r["median_ms"] / fused_ms
                row["bytes"] = nbytes
                row["gbps"] = nbytes / (r["median_ms"] * 1e-3) / 1e9
                row["frac_copy_bw"] = row["gbps"] / copy_bw
            rows.append(row)
        rows = common.order_columns(rows)
        csv_path = common.write_csv(rows, "bench_ops", device.type, args.out)  # after every config
    bar.close()
    elapsed = time.perf_counter() - t_start

    table = markdown_table(rows)
    print()
    print(table)
    notes = sorted({f"- {r['op']} {r['impl']}: {r['reason']}" for r in rows if r.get("status") != "ok"})
    md = [
        f"# bench_ops ({device.type})",
        "",
        f"- device: {desc}",
        f"- copy bandwidth (measured, read + write of a {64 if args.quick else 256} MB copy): {copy_bw:.1f} GB/s",
        f"- load average (1/5/15 min) at start {common.load_average(load_start)}, at end "
        f"{common.load_average(os.getloadavg())} (other processes on the machine disturb CPU timings, OpenMP "
        "regions most)",
        f"- dtype {common.dtype_name(args.dtype)}, mask {common.dtype_name(args.mask_dtype)}; "
        f"gamma={gae.GAMMA}, lam={gae.LAM}",
        f"- command: `{args.command.strip()}` ({elapsed:.0f} s; {time.strftime('%Y-%m-%d %H:%M:%S')})",
        "- ms: median over repeated calls (p20/p80 in the CSV); X/fused = time of X / time of fused;"
        " GB/s counts the fused algorithm's minimal traffic (see README.md)",
        "- peak memory: " + ("in the CSV (torch.cuda.max_memory_allocated)" if device.type == "cuda"
                             else "not measured on CPU (no allocator statistics); column left empty"),
        "",
        table,
        "",
    ]
    if notes:
        md += ["Skipped / failed:", "", *notes, ""]
    md_path = common.write_text(os.path.join(args.out, f"bench_ops_{device.type}.md"), "\n".join(md))
    print(f"\ncopy bandwidth: {copy_bw:.1f} GB/s; device: {desc}")
    print(f"wrote {csv_path}\nwrote {md_path}")
    if not args.no_plot:
        try:
            from . import plot_ops

            png = plot_ops.plot(csv_path, os.path.join(args.out, f"bench_ops_{device.type}.png"), title=desc)
            print(f"wrote {png}")
        except ImportError as e:
            print(f"plot skipped: {e}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
