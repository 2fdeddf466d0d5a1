"""Fused output layer + policy loss (``pama_ext.fused_linear_policy_loss``) against the unfused
composition and Liger-Kernel's ``LigerFusedLinearGRPOLoss``, forward + backward, time and peak memory.

Implementations (one fresh child process per case, so that each peak is that case's alone):

* ``unfused``: ``logits = hidden @ weightᵀ`` ([B, T, V]), ``log_softmax``, gather, ``pama_policy_loss``;
* ``liger`` (n = 1 only): ``LigerFusedLinearGRPOLoss(beta=0, use_ref_model=False, chunk_size=1,
  compiled=--liger-compiled)``, sequence-level advantages ``[B]``, its default ``dapo`` loss (a token mean);
* ``fused-1pass``: ``fused_linear_policy_loss`` (default chunk) on its single-pass path (3 output-layer
  matmuls; the options below are eligible);
* ``fused-2pass``: the same with ``single_pass=False`` (forward, loss, chunked recompute backward: 4 matmuls).

At n = 1 the pama_ext losses run the single-objective PPO loss Liger runs (method linear, whiten and
noon off, no dual clip, token-mean, the advantage of each row broadcast over its tokens); at n > 1
the default PAMA options (token granularity, whitening, Noon).

Peak memory: the child's resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` after the inputs exist) above its resident set before the first call, with
glibc returning large blocks to the system (common.malloc_returns_large_blocks); ``peak_rss_mb`` is
the child's whole ``ru_maxrss``. Time: median of ``--repeats`` calls after that first one, or with
``--repeats 0`` the first call itself (``first_ms``; the calls take seconds, so the first call's
allocations are a small part of it). ``--cases`` replaces the V x B·T x n x impl grid by a list of
sub-grids, so that one command can run a chosen set (e.g. the large unfused cases only where they fit).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

from . import common

IMPLS = ("unfused", "liger", "fused-1pass", "fused-2pass")
MODULE = "pama_ext.benchmarks.fused_linear"


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--hidden", type=int, default=768, help="H (default 768)")
    p.add_argument("--vocabs", default="32768,131072", help="comma list of V (default 32768,131072)")
    p.add_argument("--tokens", default="2048,4096,8192,16384,32768,65536",
                   help="comma list of B·T (default 2k to 64k)")
    p.add_argument("--seq-len", type=int, default=512, help="T; B = tokens / T (default 512)")
    p.add_argument("--ns", default="1,2,4", help="comma list of n (default 1,2,4; liger runs at n = 1)")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {IMPLS}")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed calls after the first (default 2; 0: time the first call)")
    p.add_argument("--cases", default=None,
                   help="semicolon list of V:B·T list:n list:impl list sub-grids (comma lists; impls 'all' for every "
                        "one), e.g. '32768:2048,4096:1,4:all;131072:16384:1:fused-1pass'; replaces --vocabs/"
                        "--tokens/--ns/--impls"),
    p.add_argument("--max-gb", type=float, default=20.0,
                   help="skip a case whose estimated peak exceeds this many GB (default 20)")
    p.add_argument("--case-timeout", type=float, default=1800.0, help="seconds per case (default 1800)")
    p.add_argument("--liger-compiled", action="store_true", help="Liger with compiled=True (torch.compile)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in the children (0: default)")
    p.add_argument("--quick", action="store_true", help="smoke run: V = 32768, B·T = 1024, 2048, n = 1, 4, 1 repeat")
    p.add_argument("--out", default=common.RESULTS_DIR, help=f"output folder (default {common.RESULTS_DIR})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interleave", type=int, default=0,
                   help="instead of the fresh-process sweep: per (V, B·T, n) one process that times every "
                        "implementation round-robin this many rounds after a warm-up call each (ratios less "
                        "exposed to load drift); writes bench_fused_linear_interleaved_cpu.{csv,md}")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # child mode: impl,n,V,tokens
    p.add_argument("--case-interleave", default=None, help=argparse.SUPPRESS)  # child mode: impl+impl,n,V,tokens
    return p


def parse_args(argv=None):
    return add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0])).parse_args(argv)


def estimate_gb(impl: str, n: int, V: int, tokens: int, H: int) -> float:
    """Rough peak of a case (float32): inputs, weight + its gradient, and the logits the unfused path keeps."""
    base = 4 * (2 * tokens * H + 2 * V * H + (n + 4) * tokens) / 1e9
    if impl == "unfused":
        return base + 3 * 4 * tokens * V / 1e9
    return base + 2 * 4 * 4096 * V / 1e9


# ------------------------------------------------------------------------------------------------
# child: one case
# ------------------------------------------------------------------------------------------------
def make_case(impl: str, n: int, V: int, tokens: int, args):
    import pama_ext

    T = min(args.seq_len, tokens)
    B = tokens // T
    H = args.hidden
    g = torch.Generator().manual_seed(args.seed)
    hidden = torch.randn(B, T, H, generator=g).requires_grad_(True)
    weight = (0.02 * torch.randn(V, H, generator=g)).requires_grad_(True)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    old_logp = -torch.rand(B, T, generator=g) - torch.log(torch.tensor(float(V)))
    seq_adv = torch.randn(n, B, generator=g)
    adv = seq_adv.unsqueeze(-1).expand(n, B, T).contiguous()
    single = dict(method="linear", whiten=False, noon=False, dual_clip=None, agg="token-mean")
    options = single if n == 1 else {}
    params = (hidden, weight)

    if impl == "unfused":
        def call():
            logits = hidden @ weight.t()
            logp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
            return pama_ext.pama_policy_loss(logp, old_logp, adv, mask, **options)[0]
    elif impl in ("fused-1pass", "fused-2pass"):
        single_pass = impl == "fused-1pass"

        def call():
            return pama_ext.fused_linear_policy_loss(hidden, weight, None, ids, mask, old_logp, adv,
                                                     single_pass=single_pass, **options)[0]
    elif impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, chunk_size=1,
                                           compiled=bool(args.liger_compiled))

        def call():
            out = loss_fn(hidden, weight, ids, mask, seq_adv[0], old_per_token_logps=old_logp)
            return out[0] if isinstance(out, tuple) else out
    else:
        raise SystemExit(f"unknown impl {impl!r}")
    return call, params


def run_case(args) -> int:
    impl, n, V, tokens = args.case.split(",")
    n, V, tokens = int(n), int(V), int(tokens)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    common.malloc_returns_large_blocks()
    call, params = make_case(impl, n, V, tokens, args)

    def step():
        for p in params:
            p.grad = None
        call().backward()

    print(json.dumps(common.first_call_then_repeats(step, args.repeats)))
    return 0


def run_interleaved_case(args) -> int:
    impls, n, V, tokens = args.case_interleave.split(",")
    n, V, tokens = int(n), int(V), int(tokens)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    steps = {}
    for impl in impls.split("+"):
        call, params = make_case(impl, n, V, tokens, args)

        def step(call=call, params=params):
            for p in params:
                p.grad = None
            call().backward()

        steps[impl] = step
    times: Dict[str, List[float]] = {impl: [] for impl in steps}
    for step in steps.values():
        step()  # warm-up
    for _ in range(args.interleave):
        for impl, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[impl].append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({impl: statistics.median(t) for impl, t in times.items()}))
    return 0


def grid_lines(grid):
    """(V, B·T, n, impls) of every line of a grid, liger kept at n = 1 only."""
    for vocabs, token_list, ns, impls in grid:
        for V in vocabs:
            for tokens in token_list:
                for n in ns:
                    yield V, tokens, n, [i for i in impls if i != "liger" or n == 1]


def start_report():
    """(load average, device description, command line) of a run, the first two printed."""
    load = common.load_average(os.getloadavg())
    desc = common.device_description(torch.device("cpu"))
    print(f"device: {desc}; load average {load}", flush=True)
    return load, desc, common.command_line(MODULE)


def run_interleaved(args, grid) -> int:
    load, desc, cmd = start_report()
    rows: List[Dict[str, object]] = []
    # liger only where installed (else the whole process would fail)
    has_liger = importlib.util.find_spec("liger_kernel") is not None
    for V, tokens, n, impls in grid_lines(grid):
        chosen = [i for i in impls if i != "liger" or has_liger]
        argv = ["--case-interleave", f"{'+'.join(chosen)},{n},{V},{tokens}", "--hidden", str(args.hidden),
                "--seq-len", str(args.seq_len), "--interleave", str(args.interleave), "--seed",
                str(args.seed), "--threads", str(args.threads)]
        load_now = round(os.getloadavg()[0], 2)
        res = common.child_result(MODULE, argv, args.case_timeout)
        for impl in chosen:
            row = dict(impl=impl, n=n, V=V, tokens=tokens, H=args.hidden, load=load_now, rounds=args.interleave,
                       status=res["status"])
            if res["status"] == "ok":
                row["median_ms"] = res[impl]
            else:
                row["reason"] = res["reason"]
            rows.append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    common.finish_cpu_report(rows, "bench_fused_linear_interleaved", args.out, interleaved_table, desc, load, cmd)
    return 0


def interleaved_table(rows: List[Dict[str, object]], header: str) -> str:
    """Markdown: per (V, B·T, n) the round-robin medians and their ratios."""
    def ms(V, tokens, n, impl):
        r = next((r for r in rows if (r["V"], r["tokens"], r["n"], r["impl"]) == (V, tokens, n, impl)
                  and r.get("status") == "ok"), None)
        return None if r is None else r["median_ms"]

    def ratio(a, b):
        return "—" if a is None or b is None else f"{a / b:.2f}x"

    lines = [header, "", "Times: median of the rounds, every implementation timed round-robin in one process "
             "(after a warm-up call each).", "",
             "| V | B·T | n | unfused ms | liger ms | 1-pass ms | 2-pass ms | 1-pass / unfused | 1-pass / liger(n=1) "
             "| 2-pass / liger(n=1) | 2-pass / 1-pass | load |", "|" + "---|" * 12]
    for V, tokens, n in sorted({(r["V"], r["tokens"], r["n"]) for r in rows}):
        u, lg = ms(V, tokens, n, "unfused"), ms(V, tokens, 1, "liger")
        f1, f2 = ms(V, tokens, n, "fused-1pass"), ms(V, tokens, n, "fused-2pass")
        load = next(r["load"] for r in rows if (r["V"], r["tokens"], r["n"]) == (V, tokens, n))

        def fmt(x):
            return "—" if x is None else f"{x:.0f}"

        lines.append(f"| {V} | {tokens} | {n} | {fmt(u)} | {fmt(lg if n == 1 else None)} | {fmt(f1)} | {fmt(f2)} "
                     f"| {ratio(f1, u)} | {ratio(f1, lg)} | {ratio(f2, lg)} | {ratio(f2, f1)} | {load} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# parent: the sweep
# ------------------------------------------------------------------------------------------------
def run(args) -> int:
    if args.case:
        return run_case(args)
    if args.case_interleave:
        return run_interleaved_case(args)
    if args.quick:
        grid = [([32768], [1024, 2048], [1, 4], list(IMPLS))]
        repeats = 1
    elif args.cases:
        grid = parse_cases(args.cases)
        repeats = args.repeats
    else:
        grid = [(common.parse_ints(args.vocabs), common.parse_ints(args.tokens), common.parse_ints(args.ns),
                 [i for i in args.impls.split(",") if i])]
        repeats = args.repeats
    bad = sorted({i for _, _, _, impls in grid for i in impls} - set(IMPLS))
    if bad:
        raise SystemExit(f"--impls / --cases: unknown {bad}; choose from {IMPLS}")
    if args.interleave > 0:
        return run_interleaved(args, grid)
    load, desc, cmd = start_report()
    rows: List[Dict[str, object]] = []
    for V, tokens, n, impls in grid_lines(grid):
        for impl in impls:
            rows.append(run_one(args, impl, n, V, tokens, repeats))
            print(" ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    common.finish_cpu_report(rows, "bench_fused_linear", args.out, table, desc, load, cmd)
    return 0


def parse_cases(spec: str):
    """``--cases``: [(vocabs, tokens, ns, impls)] from 'V:B·T:n:impls;...' (comma lists, impls 'all')."""
    grid = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        fields = part.split(":")
        if len(fields) != 4:
            raise SystemExit(f"--cases: expected V:B·T:n:impls, got {part!r}")
        impls = list(IMPLS) if fields[3] == "all" else [i for i in fields[3].split(",") if i]
        grid.append((common.parse_ints(fields[0]), common.parse_ints(fields[1]), common.parse_ints(fields[2]), impls))
    return grid


def run_one(args, impl: str, n: int, V: int, tokens: int, repeats: int) -> Dict[str, object]:
    """One case in a fresh child process (or the reason it was skipped), with the load average at its start."""
    row: Dict[str, object] = dict(impl=impl, n=n, V=V, tokens=tokens, H=args.hidden, T=min(args.seq_len, tokens),
                                  load=round(os.getloadavg()[0], 2))
    gb = estimate_gb(impl, n, V, tokens, args.hidden)
    if impl == "liger" and importlib.util.find_spec("liger_kernel") is None:
        row.update(status="skipped", reason="liger-kernel not installed (pip install liger-kernel==0.8.5)")
    elif gb > args.max_gb:
        row.update(status="skipped", reason=f"estimated {gb:.1f} GB > --max-gb {args.max_gb}")
    else:
        argv = ["--case", f"{impl},{n},{V},{tokens}", "--hidden", str(args.hidden), "--seq-len",
                str(args.seq_len), "--repeats", str(repeats), "--seed", str(args.seed),
                "--threads", str(args.threads)] + (["--liger-compiled"] if args.liger_compiled else [])
        row.update(common.child_result(MODULE, argv, args.case_timeout))
    return row


def table(rows: List[Dict[str, object]], header: str) -> str:
    """Markdown: one line per (V, B·T, n), each implementation's time and extra peak side by side, and
    the ratios to Liger (n = 1) and to the unfused peak."""
    def get(V, tokens, n, impl):
        for r in rows:
            if (r["V"], r["tokens"], r["n"], r["impl"]) == (V, tokens, n, impl) and r.get("status") == "ok":
                return r
        return None

    def fmt(x, unit=""):
        return "—" if x is None else f"{x:.0f}{unit}"

    lines = [header, "",
             "| V | B·T | n | unfused ms | liger ms | 1-pass ms | 2-pass ms | 1-pass / liger(n=1) | "
             "2-pass / liger(n=1) | 2-pass / 1-pass | unfused MB | liger MB | 1-pass MB | 2-pass MB | "
             "unfused / 1-pass MB | load |", "|" + "---|" * 16]
    keys = sorted({(r["V"], r["tokens"], r["n"]) for r in rows})

    def ratio(a, b, key, digits=2, unit="x"):
        if a is None or b is None or not a.get(key) or not b.get(key):
            return "—"
        return f"{a[key] / b[key]:.{digits}f}{unit}"

    for V, tokens, n in keys:
        u, lg = get(V, tokens, n, "unfused"), get(V, tokens, 1, "liger")
        f1, f2 = get(V, tokens, n, "fused-1pass"), get(V, tokens, n, "fused-2pass")
        loads = [r["load"] for r in rows if (r["V"], r["tokens"], r["n"]) == (V, tokens, n) and "load" in r]
        load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "—"
        lines.append(
            f"| {V} | {tokens} | {n} | {fmt(u and u.get('median_ms'))} | {fmt(lg and n == 1 and lg.get('median_ms') or None)} "
            f"| {fmt(f1 and f1.get('median_ms'))} | {fmt(f2 and f2.get('median_ms'))} "
            f"| {ratio(f1, lg, 'median_ms')} | {ratio(f2, lg, 'median_ms')} | {ratio(f2, f1, 'median_ms')} "
            f"| {fmt(u and u.get('extra_mb'))} | {fmt(lg and n == 1 and lg.get('extra_mb') or None)} "
            f"| {fmt(f1 and f1.get('extra_mb'))} | {fmt(f2 and f2.get('extra_mb'))} "
            f"| {ratio(u, f1, 'extra_mb', 1)} | {load} |")
    skipped = [r for r in rows if r.get("status") != "ok"]
    if skipped:
        lines += ["", "Not run: " + "; ".join(f"{r['impl']} n={r['n']} V={r['V']} B·T={r['tokens']} ({r['status']}: "
                                                 f"{r.get('reason')})" for r in skipped)]
    lines += ["", "MB: the peak resident set of the first forward + backward above the resident set before it "
              "(fresh process per case); ms: median of the following calls (the first call with --repeats 0); "
              "load: the 1-minute load average at the start of each case of the line."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
