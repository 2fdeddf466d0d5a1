"""Statistics + weights family. On the CPU, bench_ops.py's ``stats`` family (:func:`run_point`). On
the GPU: ``objective_stats`` (its two launchers: moments and indicators, each a partials kernel + a
single-block finalize kernel) and ``pareto_weights`` (one launch), bench_gpu.py's
``stats`` section: whole-op times and per-kernel device times from torch.profiler, so the
finalize / weights cost is seen apart from the pass over the data.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Tuple

import torch

from pama_ext import ops, reference

from . import common, policy_loss

IMPLS = ["fused", "eager", "compile"]  # bench_ops.py's ``stats`` family
STATS_BT = (128, 8192)  # 2^20 tokens
STATS_NS = [1, 2, 4, 8, 16]
QUICK_STATS_NS = [2, 16]
WEIGHT_METHODS = [("pama", "batch"), ("pama", "token"), ("pama", "sequence"), ("mgda", "batch"), ("linear", "batch")]

_KERNEL_RE = re.compile(r"(\w+_kernel)")


def kernel_times(fn: Callable[[], object], iters: int) -> Dict[str, Tuple[float, int]]:
    """{kernel short name: (mean device µs per call of fn, launches per call)} from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    common.sync_all()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        common.sync_all()
    out: Dict[str, List[float]] = {}
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        m = _KERNEL_RE.search(e.key) if "pama" in e.key else None
        name = m.group(1) if m else e.key[:60]
        t, c = out.get(name, [0.0, 0])
        out[name] = [t + common.device_time_us(e), c + e.count]
    return {k: (t / iters, c // iters) for k, (t, c) in out.items()}


def nbytes(n: int, B: int, T: int, elt: int, mask_elt: int) -> int:
    """``objective_stats``'s two passes (the moments are needed before the indicators): moments read
    mask + advantages, indicators mask + advantages + logp + old_logp; nothing per token written."""
    return B * T * (2 * mask_elt + 2 * n * elt + 2 * elt)


def _stats_then_weights(stats_fn: Callable, weights_fn: Callable) -> Callable:
    def fn(advantages, logp, old_logp, mask):
        return weights_fn(stats_fn(advantages, logp, old_logp, mask), "pama", "batch")
    return fn


def make_inputs(n, B, T, seed, device, dtype, mask_dtype) -> Dict[str, torch.Tensor]:
    x = common.make_policy_inputs(n, B, T, seed, device, dtype, mask_dtype)
    x["logp"] = x["logp"].detach()
    return x


def run_point(n, B, T, args, device, plan, state: Dict, bar) -> Dict[str, Dict]:
    """bench_ops.py's ``stats`` family: ``objective_stats`` + ``pareto_weights`` (pama / batch), the
    statistics a pama/sequence, pama/batch or Gram-method policy loss computes before its loss pass:
    ``fused`` (pama_ext.ops), ``eager`` (the reference), ``compile`` (torch.compile of the reference)."""
    n_sets, sets = common.input_sets(make_inputs, n, B, T, args, device)
    fused = _stats_then_weights(ops.objective_stats, ops.pareto_weights)
    eager = _stats_then_weights(reference.objective_stats, reference.pareto_weights)

    def runner(f):
        return lambda i: f(sets[i]["advantages"], sets[i]["logp"], sets[i]["old_logp"], sets[i]["mask"])

    err = float((runner(fused)(0) - runner(eager)(0)).abs().max())
    with torch.no_grad():
        return common.fused_eager_compile(f"stats n={n} {B}x{T}", runner, fused, eager,
                                          lambda: torch.compile(eager, dynamic=False), n_sets, args, B, T, device,
                                          plan, bar, err)


def section(args, device, budget) -> None:
    B, T = args.stats_bt or STATS_BT
    ns = args.stats_ns or (QUICK_STATS_NS if args.quick else STATS_NS)
    dtypes = args.dtypes or (["float32"] if args.quick else policy_loss.PL_DTYPES)
    plan = args.plan
    rows: List[Dict[str, object]] = []
    for dname in dtypes:
        dtype = getattr(torch, dname)
        elt = torch.empty((), dtype=dtype).element_size()
        for n in ns:
            base = {"n": n, "B": B, "T": T, "tokens": B * T, "dtype": dname}
            if budget.over():
                rows.append(dict(base, what="objective_stats", **common.skipped(budget.reason())))
                continue
            print(f"  .. stats {dname} n={n} {B}x{T}", flush=True)
            n_sets, sets = policy_loss.gpu_sets(n, B, T, dtype, device, args.seed)

            def stats_fn(i, sets=sets):
                x = sets[i]
                return ops.objective_stats(x["advantages"], x["logp"], x["old_logp"], x["mask"])

            r = dict(base, what="objective_stats", **common.timed_row(stats_fn, n_sets, plan, device))
            common.add_rate(r, nbytes(n, B, T, elt, 1), args.copy_bw)
            rows.append(r)
            st = stats_fn(0)
            for method, gran in WEIGHT_METHODS:
                r = dict(base, what=f"pareto_weights[{method}/{gran}]",
                         **common.timed_row(lambda i: ops.pareto_weights(st, method, gran), 1, plan, device))
                rows.append(r)
            # per-kernel device times (the pass over the data vs the finalize / weights launches)
            kt = kernel_times(lambda: (stats_fn(0), ops.pareto_weights(st, "pama", "token"),
                                       ops.pareto_weights(st, "mgda", "batch")), iters=20)
            for name, (us, launches) in sorted(kt.items()):
                rows.append(dict(base, what=f"kernel:{name}", status="ok", median_ms=us / 1e3,
                                 launches_per_call=launches, reason="torch.profiler mean device time"))
            del sets
            common.write_csv(rows, "bench_gpu_stats", args.tag, args.out)
    head = "| dtype | n | what | median µs | p20 µs | p80 µs | GB/s | % copy BW |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.get("status") != "ok":
            continue
        us = lambda k: f"{1e3 * float(r[k]):.1f}" if r.get(k) not in (None, "") else "—"  # noqa: E731
        gb = f"{float(r['gbps']):.0f}" if r.get("gbps") else "—"
        lines.append(f"| {r['dtype']} | {r['n']} | {r['what']} | {us('median_ms')} | {us('p20_ms')} | {us('p80_ms')} | "
                     f"{gb} | {common.fmt_pct(r.get('frac_copy_bw'))} |")
    md = common.section_header(
        args, "stats", f"`objective_stats` (moments + indicators launchers) and `pareto_weights` at "
        f"{B}×{T} = 2^20 tokens. Op rows: do_bench / CUDA-event time of one call (includes launch latency). "
        "`kernel:` rows: mean device time per call from torch.profiler (objective_stats + "
        "pareto_weights pama/token + mgda/batch per call); the `*_partials_kernel` rows are the pass over "
        "the data, the `*_finalize_kernel` and `pareto_weights_kernel` rows are what the ≤ 20 µs target "
        "is about.")
    fin = [float(r["median_ms"]) * 1e3 for r in rows if str(r.get("what", "")).startswith("kernel:")
           and ("finalize" in r["what"] or "pareto_weights" in r["what"])]
    md += lines + [""]
    if fin:
        md.append(f"- worst single finalize/weights kernel: {max(fin):.1f} µs (target ≤ 20 µs: "
                  f"{'met' if max(fin) <= 20 else 'NOT met'})")
    common.write_section(args, "stats", rows, md + [""])
