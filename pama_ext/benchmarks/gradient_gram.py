"""Benchmark of the full-gradient step of MGDA / RACO: the Gram matrix of n per-objective parameter
gradients and their weighted combination into p.grad.

Implementations, per (n, d) of the sweep (d = total parameter count, split over a transformer-like
list of parameter tensors; gradients fp32 unless --dtype):

* ``fused``: ``pama_ext.gradient_gram(grads)`` (one multi-tensor pass) and
  ``pama_ext.combine_gradients(grads, a, params)`` (one multi-tensor pass, writes p.grad in place).
* ``concat``: the usual formulation, ``M = stack([cat([g.flatten() for g in grads[i]])])`` (n x d),
  ``G = M @ M.T``, ``combined = a @ M`` split back into per-parameter views assigned to p.grad.

Two measurements each: ``gram`` (G only) and ``gram+combine`` (the whole step). Reported: median and
p20/p80 time, achieved bandwidth of the gradient reads (n·d·bytes for ``gram``) against the
machine's copy bandwidth, and peak extra memory of one call (CUDA: max_memory_allocated; CPU: the
process's peak resident set above its size before the call, via /proc/self/clear_refs + VmHWM).

    python -m pama_ext.benchmarks.gradient_gram --threads 1              # CPU, d up to 100M
    python -m pama_ext.benchmarks.gradient_gram --device cuda --max-d 1e9
    python -m pama_ext.benchmarks.gradient_gram --quick --out /tmp/bench # smoke run
    pama-ext bench gradient-gram ...                                     # the same

Writes ``<out>/bench_gradient_gram_<device>.csv``, ``.md`` (the table) and ``.png``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

import torch

import pama_ext

from . import common

DS = [10_000_000, 30_000_000, 100_000_000, 300_000_000, 1_000_000_000]
NS = [2, 3, 4, 8]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def param_shapes(d: int, hidden: int = 2048) -> List[tuple]:
    """A transformer-like parameter list of about d elements: blocks of four h x h and two h x 4h
    matrices plus two h vectors, then one odd-sized tail tensor so the total is exactly d."""
    shapes: List[tuple] = []
    block = [(hidden, hidden)] * 4 + [(hidden, 4 * hidden), (4 * hidden, hidden), (hidden,), (hidden,)]
    per_block = sum(int(torch.Size(s).numel()) for s in block)
    total = 0
    while total + per_block <= d:
        shapes += block
        total += per_block
    if d - total > 0:
        shapes.append((d - total,))
    return shapes


def make_grads(n: int, shapes, dtype, device, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    return [[torch.randn(s, generator=g, device=device, dtype=torch.float32).to(dtype) for s in shapes]
            for _ in range(n)]


# ------------------------------------------------------------------------------------------------
# the two formulations
# ------------------------------------------------------------------------------------------------
def fused_gram(grads, coeffs, params):
    return pama_ext.gradient_gram(grads)


def fused_step(grads, coeffs, params):
    G = pama_ext.gradient_gram(grads)
    pama_ext.combine_gradients(grads, coeffs, params)
    return G


def concat_rows(grads):
    return torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in grads])


def concat_gram(grads, coeffs, params):
    M = concat_rows(grads)
    acc = torch.float64 if M.dtype == torch.float64 else torch.float32
    return (M @ M.T).to(acc)


def concat_step(grads, coeffs, params):
    M = concat_rows(grads)
    acc = torch.float64 if M.dtype == torch.float64 else torch.float32
    G = (M @ M.T).to(acc)
    combined = coeffs.to(M.dtype) @ M
    for p, chunk in zip(params, combined.split([p.numel() for p in params])):
        p.grad = chunk.view(p.shape)
    return G


IMPLS = {("fused", "gram"): fused_gram, ("fused", "gram+combine"): fused_step,
         ("concat", "gram"): concat_gram, ("concat", "gram+combine"): concat_step}


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--ds", default=None, help="comma list of d (overrides the sweep), e.g. 1e7,3e7")
    p.add_argument("--max-d", type=float, default=1e8, help="largest d of the sweep (default 1e8)")
    p.add_argument("--ns", default=None, help="comma list of n, default 2,3,4,8")
    p.add_argument("--max-gb", type=float, default=8.0,
                   help="skip an (n, d) whose gradients plus the concat buffer exceed this many GB")
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per (impl, shape)")
    p.add_argument("--max-repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="smoke run: d = 1e6, 3e6, n = 2, 3")
    p.add_argument("--out", default=common.RESULTS_DIR, help=f"output folder (default {common.RESULTS_DIR})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true")
    return p


def parse_args(argv=None):
    return add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0])).parse_args(argv)


def plot(rows: List[Dict[str, object]], path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({r["n"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for n in ns:
        for impl, style in (("fused", "-o"), ("concat", "--s")):
            rs = sorted((r for r in rows if r["n"] == n and r["impl"] == impl and r["op"] == "gram+combine"),
                        key=lambda r: r["d"])
            if not rs:
                continue
            xs = [r["d"] / 1e6 for r in rs]
            axes[0].plot(xs, [r["median_ms"] for r in rs], style, label=f"{impl} n={n}")
            if rs[0]["peak_mb"] is not None:
                axes[1].plot(xs, [r["peak_mb"] for r in rs], style, label=f"{impl} n={n}")
    for ax, ylab in zip(axes, ("time of Gram + combine (ms, median)", "peak extra memory (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("d (millions of parameters)")
        ax.set_ylabel(ylab)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    return run(parse_args(argv))


def run(args) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    if device.type == "cpu":
        common.malloc_returns_large_blocks()
    dtype = DTYPES[args.dtype]
    if args.quick:
        ds, ns = [1_000_000, 3_000_000], [2, 3]
    else:
        ds = [int(float(x)) for x in args.ds.split(",")] if args.ds else [d for d in DS if d <= args.max_d]
        ns = [int(x) for x in args.ns.split(",")] if args.ns else NS
    plan = common.TimingPlan(warmup=1, min_repeats=3, max_repeats=args.max_repeats, budget_s=args.budget)
    desc = common.device_description(device)
    bw = common.copy_bandwidth_gbs(device)
    elt = torch.tensor([], dtype=dtype).element_size()
    print(f"device: {desc}; copy bandwidth {bw:.1f} GB/s; native={pama_ext.NATIVE_AVAILABLE}; dtype {args.dtype}")
    rows: List[Dict[str, object]] = []
    for d in ds:
        shapes = param_shapes(d)
        for n in ns:
            need_gb = 2.2 * n * d * elt / 1e9  # gradients + the concat copy + combined vector
            if need_gb > args.max_gb:
                print(f"skip n={n} d={d}: needs ~{need_gb:.1f} GB > --max-gb {args.max_gb}")
                continue
            grads = make_grads(n, shapes, dtype, device, args.seed + n)
            coeffs = torch.softmax(torch.randn(n, device=device), 0)
            params = [torch.zeros(s, dtype=dtype, device=device, requires_grad=True) for s in shapes]
            for (impl, op), fn in IMPLS.items():
                for p in params:
                    p.grad = None
                t = common.time_fn(lambda i: fn(grads, coeffs, params), 1, plan, device)
                for p in params:
                    p.grad = None
                common.sync(device)
                peak = common.peak_memory_mb(lambda: fn(grads, coeffs, params), device)
                read_gb = n * d * elt / 1e9
                gbs = read_gb / (t.median_ms / 1e3)
                rows.append(dict(device=device.type, dtype=args.dtype, n=n, d=d, params=len(shapes), impl=impl,
                                 op=op, median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, repeats=t.repeats,
                                 grad_read_gbs=gbs if op == "gram" else None,
                                 frac_copy_bw=gbs / bw if op == "gram" else None, peak_mb=peak))
                r = rows[-1]
                print(f"n={n} d={d / 1e6:.0f}M {impl:>6} {op:<13} {t.median_ms:10.2f} ms "
                      f"[{t.p20_ms:.2f}, {t.p80_ms:.2f}] peak {peak if peak is None else round(peak, 1)} MB",
                      flush=True)
                del r
            del grads, params
    os.makedirs(args.out, exist_ok=True)
    name = "bench_gradient_gram" + ("" if args.dtype == "float32" else f"_{args.dtype}")  # one file set per dtype
    csv_path = common.write_csv(rows, name, device.type, args.out)
    lines = [f"Device: {desc}; copy bandwidth {bw:.1f} GB/s; gradients {args.dtype}.", "",
             "| n | d | op | fused ms (p20-p80) | concat ms (p20-p80) | speed-up | fused peak MB | concat peak MB |",
             "|---|---|---|---|---|---|---|---|"]
    for d in ds:
        for n in ns:
            for op in ("gram", "gram+combine"):
                f = [r for r in rows if r["d"] == d and r["n"] == n and r["op"] == op and r["impl"] == "fused"]
                c = [r for r in rows if r["d"] == d and r["n"] == n and r["op"] == op and r["impl"] == "concat"]
                if not f or not c:
                    continue
                f, c = f[0], c[0]

                def mb(x):
                    return "n/a" if x is None else f"{x:.0f}"

                lines.append(f"| {n} | {d / 1e6:.0f}M | {op} | {f['median_ms']:.1f} ({f['p20_ms']:.1f}-{f['p80_ms']:.1f}) "
                             f"| {c['median_ms']:.1f} ({c['p20_ms']:.1f}-{c['p80_ms']:.1f}) "
                             f"| {c['median_ms'] / f['median_ms']:.2f}x | {mb(f['peak_mb'])} | {mb(c['peak_mb'])} |")
    md = "\n".join(lines) + "\n"
    common.write_text(os.path.join(args.out, f"{name}_{device.type}.md"), md)
    print(md)
    print(f"wrote {csv_path}")
    if not args.no_plot and rows:
        try:
            png = plot(rows, os.path.join(args.out, f"{name}_{device.type}.png"), title=desc)
            print(f"wrote {png}")
        except Exception as e:  # noqa: BLE001 - matplotlib missing: the CSV and table are the result
            print(f"plot skipped: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
