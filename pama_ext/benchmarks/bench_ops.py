"""Sweep benchmark of the fused ops (CPU by default): each op family against its baselines, in one run.

Op families (``--ops``, default ``policy_loss,gae``; one module each, implementations in its IMPLS):

* ``policy_loss`` (``pama_policy_loss`` forward + ``loss.backward()`` on ``logp``): ``fused``
  (pama_ext.ops), ``eager`` (pama_ext.reference), ``compile`` (``torch.compile(reference,
  dynamic=False)``, compiled once per shape).
  At n = 1 also the options under which the op is the plain PPO loss (n = 1, noon=False,
  method="linear", whiten=False): ``fused_ppo`` (the op with them) against ``ppo_eager`` /
  ``ppo_compile`` (baselines.plain_ppo_loss, eager and torch.compile).
* ``gae`` (``multi_gae`` forward): ``fused``, ``eager``, ``compile`` (time-boxed, in a child
  process: the reference loops over T in Python, so dynamo unrolls T steps), ``loop``, a
  per-timestep, per-objective Python loop the way TRL / verl write GAE, and ``loop_folded``, the same
  loop with the objectives folded into the batch (one loop over t for all n).
* ``gae_fb`` (``multi_gae`` forward + backward, autograd.grad of both outputs): ``fused``, ``eager``.
* ``value_loss`` (``multi_value_loss`` forward + backward), ``token_rewards`` (forward),
  ``dpo_loss`` (``multi_dpo_loss`` forward + backward, B pairs of length T): ``fused``, ``eager``,
  ``compile``.

Every thread count of ``--threads`` (default ``1,2``) runs the whole sweep in the same process, with
the copy bandwidth measured at that thread count. The load average is recorded at the start and the
end; above ``--max-load`` (1-minute load at the start, or at the end less the benchmark's own
threads) the results are printed but not written, unless ``--force`` (other processes on the machine
slow the many-small-op baselines more than one fused call, so a loaded run flatters the fused ops).

Writes ``<out>/bench_ops_<device>.csv`` (one row per threads, op, n, B, T, impl),
``bench_ops_<device>.md`` (the table printed at the end, with the device, the copy bandwidth and the
load) and ``bench_ops_<device>.png`` (plot_ops.py).

    python -m pama_ext.benchmarks.bench_ops                 # full sweep on CPU (pama-ext bench ops)
    python -m pama_ext.benchmarks.bench_ops --quick --out /tmp/bench --force  # smoke run (< 60 s)
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

from . import common, dpo_loss, gae, policy_loss, stats, token_rewards, value_loss

# the op families of the sweep: each module has IMPLS, nbytes(n, B, T, elt, mask_elt) and
# run_point(n, B, T, args, device, plan, state, bar) -> {impl: row}
FAMILIES = {"policy_loss": policy_loss, "gae": gae, "gae_fb": gae.FWD_BWD, "value_loss": value_loss,
            "token_rewards": token_rewards, "dpo_loss": dpo_loss, "stats": stats}

SIZES: List[Tuple[int, int]] = [(16, 1024), (32, 4096), (256, 4096)]  # 2^14, 2^17, 2^20 tokens
NS = [1, 2, 4, 8]
QUICK_SIZES = [(8, 256), (16, 512)]
QUICK_NS = [1, 2]
IMPLS = {name: module.IMPLS for name, module in FAMILIES.items()}


def plan_for(args) -> common.TimingPlan:
    if args.quick:
        return common.TimingPlan(warmup=1, min_repeats=3, max_repeats=10, budget_s=0.15)
    return common.TimingPlan(warmup=2, min_repeats=5, max_repeats=args.max_repeats, budget_s=args.budget)


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def _ratio(impls: Dict[str, Dict], num: str, den: str) -> str:
    """time of ``num`` / time of ``den`` (how many times faster ``den`` is), or '—'."""
    a, b = impls.get(num, {}), impls.get(den, {})
    if a.get("status") == "ok" and b.get("status") == "ok":
        return common.fmt_ratio(float(a["median_ms"]) / float(b["median_ms"]))
    return "—"


def markdown_table(rows: List[Dict[str, object]]) -> str:
    by_key: Dict[Tuple, Dict[str, Dict]] = {}
    for r in rows:
        key = (int(r.get("threads") or 0), r["op"], int(r["n"]), int(r["B"]), int(r["T"]))
        by_key.setdefault(key, {})[r["impl"]] = r
    head = ("| threads | op | n | B×T | fused ms | eager/fused | compile/fused | loop/fused | loop_folded/fused "
            "| fused_ppo ms | ppo_eager/fused_ppo | ppo_compile/fused_ppo | MB moved / minimal | GB/s of minimal "
            "| % copy BW |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for (threads, op, n, B, T), impls in by_key.items():
        f = impls.get("fused", {})
        fp = impls.get("fused_ppo", {})
        ok = f.get("status") == "ok"
        mb = f"{float(f['bytes']) / 1e6:.1f} / {float(f['min_bytes']) / 1e6:.1f}" if ok else "—"
        gbs = f"{float(f['gbps_min']):.2f}" if ok else "—"
        frac = f"{100 * float(f['frac_copy_bw_min']):.0f}%" if ok else "—"
        fused_ms = common.fmt_ms(f.get("median_ms")) if f.get("status") == "ok" else "—"
        ppo_ms = common.fmt_ms(fp.get("median_ms")) if fp.get("status") == "ok" else "—"
        lines.append(
            f"| {threads} | {op} | {n} | {B}×{T} | {fused_ms} | {_ratio(impls, 'eager', 'fused')} | "
            f"{_ratio(impls, 'compile', 'fused')} | {_ratio(impls, 'loop', 'fused')} | "
            f"{_ratio(impls, 'loop_folded', 'fused')} | {ppo_ms} | {_ratio(impls, 'ppo_eager', 'fused_ppo')} | "
            f"{_ratio(impls, 'ppo_compile', 'fused_ppo')} | {mb} | {gbs} | {frac} |"
        )
    return "\n".join(lines)


def load_gate(load_start: Tuple[float, ...], load_end: Tuple[float, ...], threads: int,
              max_load: float) -> Optional[str]:
    """Why the results may not be published (None: they may): the 1-minute load average at the
    start, or at the end less the benchmark's own ``threads``, above ``max_load``."""
    own = max(0.0, load_end[0] - threads)
    if load_start[0] > max_load or own > max_load:
        return (f"load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end (less this "
                f"benchmark's {threads} thread(s): {own:.2f}) is above --max-load={max_load}")
    return None


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
    p.add_argument("--threads", default="1,2",
                   help="comma list of intra-op thread counts, each a full sweep in this run (default 1,2)")
    p.add_argument("--max-load", type=float, default=0.5,
                   help="refuse to write results when the 1-minute load average is above this (default 0.5)")
    p.add_argument("--force", action="store_true", help="write the results whatever the load average")
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
    try:
        args.thread_list = common.parse_ints(args.threads) or [torch.get_num_threads()]
    except ValueError:
        p.error(f"--threads: a comma list of positive integers, got {args.threads!r}")
    if any(t < 1 for t in args.thread_list):
        p.error(f"--threads: a comma list of positive integers, got {args.threads!r}")
    return args


def parse_args(argv=None):
    p = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    return check_args(p.parse_args(argv), p, argv)


def sweep(args, device, plan, threads: int, copy_bw: float) -> List[Dict[str, object]]:
    """Every (op, B, T, n) of the sweep at ``threads`` intra-op threads: one row per implementation."""
    from tqdm import tqdm

    torch.set_num_threads(threads)
    elt = torch.empty((), dtype=args.dtype).element_size()
    mask_elt = torch.empty((), dtype=args.mask_dtype).element_size()
    tasks = [(op, n, B, T) for op in args.op_list for (B, T) in args.sizes for n in args.ns]
    rows: List[Dict[str, object]] = []
    states: Dict[str, Dict] = {op: {} for op in args.op_list}  # per family (e.g. the GAE compile time-outs)
    bar = tqdm(tasks, desc=f"bench_ops threads={threads}", unit="cfg", dynamic_ncols=True)
    for op, n, B, T in bar:
        family = FAMILIES[op]
        res = family.run_point(n, B, T, args, device, plan, states[op], bar)
        nbytes = family.nbytes(n, B, T, elt, mask_elt)
        min_bytes = getattr(family, "min_nbytes", family.nbytes)(n, B, T, elt, mask_elt)
        fused_ms = res["fused"].get("median_ms")
        for impl in family.IMPLS:
            r = res.get(impl, common.skipped("not run"))
            row = {"threads": threads, "op": op, "n": n, "B": B, "T": T, "tokens": B * T, "impl": impl,
                   "dtype": common.dtype_name(args.dtype), "copy_bw_gbs": copy_bw, **r}
            if r.get("status") == "ok":
                row["speedup_of_fused"] = r["median_ms"] / fused_ms
                row["bytes"] = nbytes
                row["gbps"] = nbytes / (r["median_ms"] * 1e-3) / 1e9
                row["frac_copy_bw"] = row["gbps"] / copy_bw
                row["min_bytes"] = min_bytes
                row["gbps_min"] = min_bytes / (r["median_ms"] * 1e-3) / 1e9
                row["frac_copy_bw_min"] = row["gbps_min"] / copy_bw
            rows.append(row)
    bar.close()
    return rows


def run(args) -> int:
    if not NATIVE_AVAILABLE:
        print("WARNING: pama_ext native library not loaded: 'fused' runs the reference fallback",
              file=sys.stderr)
    device = common.resolve_device(args.device)
    plan = plan_for(args)
    desc = common.device_description(device)
    load_start = os.getloadavg()
    print(f"device: {desc}\nload average at the start {common.load_average(load_start)}", flush=True)
    t_start = time.perf_counter()
    rows: List[Dict[str, object]] = []
    copy_bws: Dict[int, float] = {}
    prev_threads = torch.get_num_threads()
    try:
        for threads in args.thread_list:
            torch.set_num_threads(threads)
            copy_bws[threads] = common.copy_bandwidth_gbs(device, mbytes=64 if args.quick else 256)
            print(f"threads={threads}: copy bandwidth {copy_bws[threads]:.1f} GB/s (read + write)", flush=True)
            rows += sweep(args, device, plan, threads, copy_bws[threads])
    finally:
        torch.set_num_threads(prev_threads)
    rows = common.order_columns(rows)
    elapsed = time.perf_counter() - t_start
    load_end = os.getloadavg()
    refused = None if args.force else load_gate(load_start, load_end, max(args.thread_list), args.max_load)

    table = markdown_table(rows)
    print()
    print(table)
    notes = sorted({f"- {r['op']} {r['impl']}: {r['reason']}" for r in rows if r.get("status") != "ok"})
    bw = ", ".join(f"{bw:.1f} GB/s with {t} thread(s)" for t, bw in copy_bws.items())
    md = [
        f"# bench_ops ({device.type})",
        "",
        f"- device: {desc}",
        f"- copy bandwidth (measured in this run, read + write of a {64 if args.quick else 256} MB copy): {bw}",
        f"- load average (1/5/15 min) at start {common.load_average(load_start)}, at end "
        f"{common.load_average(load_end)} (--max-load {args.max_load}"
        f"{', --force' if args.force else ''}; other processes on the machine disturb CPU timings, the "
        "many-small-op baselines and OpenMP regions most)",
        f"- dtype {common.dtype_name(args.dtype)}, mask {common.dtype_name(args.mask_dtype)}; "
        f"gamma={gae.GAMMA}, lam={gae.LAM}",
        f"- command: `{args.command.strip()}` ({elapsed:.0f} s; {time.strftime('%Y-%m-%d %H:%M:%S')})",
        "- ms: median over repeated calls (p20/p80 in the CSV); X/fused = time of X / time of fused;"
        " MB moved: the bytes the fused kernels move, pass by pass (each family's nbytes); minimal: what"
        " the op must move (min_nbytes where a family has one, else the same); GB/s and % copy BW: the"
        " minimal bytes over the fused median",
        f"- policy loss passes: {policy_loss.PASSES}",
        "- peak memory: " + ("in the CSV (torch.cuda.max_memory_allocated)" if device.type == "cuda"
                             else "not measured on CPU (no allocator statistics); column left empty"),
        "",
        table,
        "",
    ]
    if notes:
        md += ["Skipped / failed:", "", *notes, ""]
    print(f"\ncopy bandwidth: {bw}; device: {desc}; load average at the end {common.load_average(load_end)}")
    if refused is not None:
        print(f"NOT WRITTEN: {refused}; wait for an idle machine or pass --force", file=sys.stderr)
        return 3
    csv_path = common.write_csv(rows, "bench_ops", device.type, args.out)
    md_path = common.write_text(os.path.join(args.out, f"bench_ops_{device.type}.md"), "\n".join(md))
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
