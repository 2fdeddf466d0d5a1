"""Gram solvers family: the weighting methods that solve for weights from an n×n Gram matrix
(``pama_ext.pareto``: mgda, cagrad / raco, pcgrad), the native solver (``fused``: one launch of the
gram_weights op) against the plain-PyTorch reference solver (``eager``), n ∈ {2, 3, 4, 8, 16}.

The Gram matrices are those of n random gradients (rank min(n, 64)), in float64 (float32 with
--dtype float32). Reported: median and p20/p80 time of one call, and the largest absolute weight
difference of fused vs eager.

    python -m pama_ext.benchmarks.gram_solvers                  # pama-ext bench gram-solvers
    python -m pama_ext.benchmarks.gram_solvers --quick --out /tmp/bench

Writes ``<out>/bench_gram_solvers_<device>.csv`` and ``.md``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Tuple

import torch

from pama_ext import pareto, reference

from . import common

NS = [2, 3, 4, 8, 16]
QUICK_NS = [2, 4]
# method: (native solver, reference solver), both on a Gram matrix G
METHODS: Dict[str, Tuple[Callable, Callable]] = {
    "mgda": (pareto.mgda_weights, reference.mgda_weights),
    "cagrad": (pareto.cagrad_weights, reference.cagrad_weights),
    "pcgrad": (pareto.pcgrad_weights, reference.pcgrad_weights),
}


def make_grams(n: int, n_sets: int, seed: int, dtype, device) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_sets):
        grads = torch.randn(n, 64, generator=g, dtype=torch.float64) * (0.5 + torch.rand(n, 1, generator=g,
                                                                                            dtype=torch.float64))
        out.append((grads @ grads.T).to(device=device, dtype=dtype))
    return out


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--ns", default=None, help="comma list of n (default 2,3,4,8,16)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ", ".join(METHODS))
    p.add_argument("--budget", type=float, default=0.5, help="seconds of timed calls per (impl, n, method)")
    p.add_argument("--max-repeats", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: n = 2, 4, few repeats")
    p.add_argument("--out", default=common.RESULTS_DIR, help=f"output folder (default {common.RESULTS_DIR})")
    return p


def run(args) -> int:
    device = common.resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    ns = common.parse_ints(args.ns) or (QUICK_NS if args.quick else NS)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    plan = (common.TimingPlan(warmup=1, min_repeats=3, max_repeats=10, budget_s=0.05) if args.quick else
            common.TimingPlan(warmup=3, min_repeats=10, max_repeats=args.max_repeats, budget_s=args.budget))
    desc = common.device_description(device)
    print(f"device: {desc}; Gram dtype {args.dtype}", flush=True)
    rows: List[Dict[str, object]] = []
    for n in ns:
        grams = make_grams(n, 4, args.seed + n, dtype, device)
        for method in methods:
            native, ref = METHODS[method]
            err = float((native(grams[0]) - ref(grams[0].double()).to(dtype)).abs().max())
            for impl, fn in (("fused", native), ("eager", ref)):
                t = common.time_fn(lambda i: fn(grams[i]), len(grams), plan, device)
                rows.append(dict(method=method, n=n, impl=impl, dtype=args.dtype, status="ok", median_ms=t.median_ms,
                                 p20_ms=t.p20_ms, p80_ms=t.p80_ms, repeats=t.repeats,
                                 max_abs_err_vs_eager=err if impl == "fused" else None))
            print(f"n={n} {method:<7} fused {rows[-2]['median_ms']:.4f} ms  eager {rows[-1]['median_ms']:.4f} ms",
                  flush=True)
    csv_path = common.write_csv(rows, "bench_gram_solvers", device.type, args.out)
    lines = [f"Device: {desc}; Gram {args.dtype}; command: `{common.command_line('pama_ext.benchmarks.gram_solvers')}`.", "",
             "| method | n | fused ms | eager ms | eager/fused | max abs err |", "|---|---|---|---|---|---|"]
    for (method, n), im in common.index_rows(rows, keys=("method", "n")).items():
        f, e = im["fused"], im["eager"]
        lines.append(f"| {method} | {n} | {common.fmt_ms(f['median_ms'])} | {common.fmt_ms(e['median_ms'])} | "
                     f"{common.fmt_ratio(e['median_ms'] / f['median_ms'])} | {f['max_abs_err_vs_eager']:.1e} |")
    md = "\n".join(lines) + "\n"
    md_path = common.write_text(os.path.join(args.out, f"bench_gram_solvers_{device.type}.md"), md)
    print(md)
    print(f"wrote {csv_path}\nwrote {md_path}")
    return 0


def main(argv=None) -> int:
    return run(add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0])).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
