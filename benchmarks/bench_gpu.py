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
                  (torch.compile of bench_ops.reference_policy_loss_flat, which works around the
                  loss/metrics aliasing problem of compiling the metrics dict, see bench_ops.py).
* ``gae``         ``multi_gae`` forward: fused vs reference eager vs the per-timestep Python loop
                  that TRL/verl use (bench_ops.gae_python_loop) at T = 1024 (and T = 256) vs
                  torch.compile(reference) where it compiles in time (bench_ops._gae_compile: a
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
torch.cuda.max_memory_allocated. Byte counts: bench_ops.policy_loss_bytes / gae_bytes (the fused
algorithm's DRAM traffic, the same count for every implementation; see benchmarks/README.md).

Outputs in ``--out`` (default benchmarks/results/), ``<tag>`` = the device name in lower case:
``bench_gpu_<section>_<tag>.csv`` and ``.md`` per section, ``bench_gpu_<tag>.md`` (every section's
table that exists in the folder), ``bench_gpu_policy_loss_<tag>.png``, ``bench_gpu_gae_<tag>.png``,
``bench_gpu_headline_<tag>.png``.

    python benchmarks/bench_gpu.py --quick                 # every section, small sweep (~3 min)
    python benchmarks/bench_gpu.py --time-limit 900        # full sweep, stops starting new configs after 15 min
    python benchmarks/bench_gpu.py --only headline,e2e
    python benchmarks/bench_gpu.py --cpu                   # headline + e2e measured on the CPU (tag cpu)

``--cpu`` runs the two model sections on the CPU at CPU-sized defaults (gpt2-small, headline B×T =
4×128, e2e 8 sequences of 64 tokens): the same code and measurements, times from the wall clock and
peak memory from the process's resident set (``common.peak_memory_mb``).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import sys
import time
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_ops  # noqa: E402  (benchmarks/bench_ops.py: baselines, byte counts, row helpers)
import common  # noqa: E402  (benchmarks/common.py: timing, bandwidth, inputs, CSV)

from pama_ext import NATIVE_AVAILABLE, ops, reference  # noqa: E402

SECTIONS = ("bandwidth", "policy_loss", "gae", "stats", "headline", "e2e")
GAMMA, LAM = bench_ops.GAMMA, bench_ops.LAM

PL_SIZES = [(16, 512), (64, 1024), (64, 4096), (64, 8192), (128, 8192), (256, 8192)]
PL_NS = [1, 2, 4, 8]
PL_DTYPES = ["float32", "bfloat16"]
QUICK_PL_SIZES = [(16, 512), (64, 4096), (128, 8192)]
QUICK_PL_NS = [2, 8]
COMPILE_MIN_TOKENS = 2 ** 18  # the compile target applies from here; smaller sizes are not compiled

GAE_SIZES = [(64, 256), (16, 1024), (64, 1024), (256, 1024), (64, 8192), (256, 8192)]
GAE_NS = [1, 2, 4, 8]
QUICK_GAE_SIZES = [(64, 1024), (256, 8192)]
QUICK_GAE_NS = [4]
GAE_LOOP_MAX_T = 1024  # the Python loop costs ~n*T*6 launches per call: only up to T = 1024

STATS_BT = (128, 8192)  # 2^20 tokens
STATS_NS = [1, 2, 4, 8, 16]
QUICK_STATS_NS = [2, 16]
WEIGHT_METHODS = [("pama", "batch"), ("pama", "token"), ("pama", "sequence"), ("mgda", "batch"), ("linear", "batch")]

# GPT-2 shapes: "gpt2-small" = transformers' GPT2Config() defaults (124M); "gpt2-1b" ≈ 1.0B parameters
MODELS = {
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, dtype="float32"),
    "gpt2-1b": dict(n_layer=24, n_embd=1792, n_head=14, dtype="bfloat16"),
}
VOCAB, N_POSITIONS = 50257, 1024
HEADLINE_NS = [2, 4, 8]
HEADLINE_BT = (8, 512)
CPU_SECTIONS = ("headline", "e2e")  # what --cpu runs
CPU_HEADLINE_BT = (4, 128)  # one 124M backward of 4 x 144 tokens is seconds on a few cores


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
class _Bar:
    """The progress sink bench_ops' runners expect (``set_postfix_str``): one line per config."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def set_postfix_str(self, s: str) -> None:
        if self.enabled:
            print(f"  .. {s}", flush=True)


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def device_tag(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "gpu"


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


class Budget:
    """Wall-clock budget of the whole run (``--time-limit``): sections ask before each config."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over(self) -> bool:
        return self.seconds > 0 and self.elapsed() > self.seconds

    def reason(self) -> str:
        return f"--time-limit {self.seconds:.0f} s reached before this config"


def _timed(fn: Callable[[int], object], n_sets: int, plan: common.TimingPlan, device) -> Dict[str, object]:
    return bench_ops._timed_row(fn, n_sets, plan, device)


def _ok_rate(row: Dict[str, object], nbytes: int, copy_bw: float) -> None:
    if row.get("status") == "ok":
        row["bytes"] = nbytes
        row["gbps"] = nbytes / (row["median_ms"] * 1e-3) / 1e9
        row["frac_copy_bw"] = row["gbps"] / copy_bw
        row["roofline_ms"] = nbytes / (copy_bw * 1e9) * 1e3


def _fmt_ms(v) -> str:
    return bench_ops._ms(v)


def _fmt_x(v) -> str:
    return bench_ops._ratio(v)


def _pct(v) -> str:
    return "—" if v in (None, "") else f"{100 * float(v):.0f}%"


def _write_section(args, section: str, rows: List[Dict[str, object]], md_lines: List[str]) -> None:
    tag = args.tag
    csv_path = common.write_csv(rows, f"bench_gpu_{section}", tag, args.out)
    md_path = common.write_text(os.path.join(args.out, f"bench_gpu_{section}_{tag}.md"), "\n".join(md_lines) + "\n")
    print(f"wrote {csv_path}\nwrote {md_path}", flush=True)
    # the combined report: every section file present in the folder, in section order
    parts = [f"# bench_gpu on {args.desc}\n",
             f"- copy bandwidth (measured, read + write): {args.copy_bw:.0f} GB/s",
             f"- pama_ext {getattr(sys.modules.get('pama_ext'), '__version__', '?')}, native library "
             f"{'loaded' if NATIVE_AVAILABLE else 'NOT loaded'}; updated {time.strftime('%Y-%m-%d %H:%M:%S')}\n"]
    for s in SECTIONS:
        p = os.path.join(args.out, f"bench_gpu_{s}_{tag}.md")
        if os.path.exists(p):
            with open(p) as f:
                parts.append(f.read())
    common.write_text(os.path.join(args.out, f"bench_gpu_{tag}.md"), "\n".join(parts))


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError as e:
        print(f"plot skipped: {e}", file=sys.stderr)
        return None


def _header(args, section: str, what: str) -> List[str]:
    return [f"## {section}", "", what, "", f"- device: {args.desc}; copy bandwidth {args.copy_bw:.0f} GB/s",
            f"- command: `python benchmarks/bench_gpu.py {' '.join(args.argv)}`", ""]


# ------------------------------------------------------------------------------------------------
# bandwidth
# ------------------------------------------------------------------------------------------------
def section_bandwidth(args, device, budget) -> None:
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
    md = _header(args, "bandwidth", "`dst.copy_(src)` of a float32 tensor; GB/s = (bytes read + written) / median time.")
    md += ["| copy size | GB/s |", "|---|---|"] + [f"| {r['mbytes']} MB | {r['gbps']:.0f} |" for r in rows]
    if peak:
        md += ["", f"Theoretical DRAM bandwidth from the device properties: {peak:.0f} GB/s "
               f"(measured copy = {100 * args.copy_bw / peak:.0f}% of it)."]
        rows.append({"what": "theoretical", "mbytes": "", "gbps": peak})
    _write_section(args, "bandwidth", rows, md)


# ------------------------------------------------------------------------------------------------
# policy loss
# ------------------------------------------------------------------------------------------------
def _policy_sets(n, B, T, dtype, device, seed):
    probe_bytes = (2 + n) * B * T * torch.empty((), dtype=dtype).element_size() + B * T
    # do_bench flushes L2 before every call; beyond 2^27 bytes a set is far larger than any cache
    n_sets = common.num_input_sets(probe_bytes, lo=1 if probe_bytes >= 2 ** 27 else 3)
    sets = [common.make_policy_inputs(n, B, T, seed + s, device, dtype, torch.bool) for s in range(n_sets)]
    return n_sets, sets


_policy_runner = bench_ops.policy_runner


def _append_rows(rows, base, res, impls, nbytes, copy_bw):
    """One CSV row per implementation, with its speed-up over fused and achieved bandwidth."""
    fused_ms = res["fused"]["median_ms"]
    for impl in impls:
        r = dict(base, impl=impl, **res[impl])
        if r.get("status") == "ok":
            r["speedup_of_fused"] = r["median_ms"] / fused_ms
            _ok_rate(r, nbytes, copy_bw)
        rows.append(r)


def section_policy_loss(args, device, budget) -> None:
    sizes = args.pl_sizes or (QUICK_PL_SIZES if args.quick else PL_SIZES)
    ns = args.ns or (QUICK_PL_NS if args.quick else PL_NS)
    dtypes = args.dtypes or PL_DTYPES
    plan = args.plan
    bar = _Bar()
    fused = functools.partial(ops.pama_policy_loss, check_finite=False)
    # dynamic shapes: one compile serves every B, T, n of a dtype (dynamo specialises n = 1 apart);
    # --static-compile: dynamic=False and a fresh compile per shape, as bench_ops does on the CPU
    compiled_policy = torch.compile(bench_ops.reference_policy_loss_flat, dynamic=not args.static_compile)
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    rows: List[Dict[str, object]] = []
    impls = ["fused", "fused_checked", "eager", "compile"]
    for dname in dtypes:
        dtype = _dtype(dname)
        elt = torch.empty((), dtype=dtype).element_size()
        for (B, T) in sizes:
            for n in ns:
                base = {"op": "policy_loss", "n": n, "B": B, "T": T, "tokens": B * T, "dtype": dname}
                if budget.over():
                    rows += [dict(base, impl=i, **bench_ops._skipped(budget.reason())) for i in impls]
                    continue
                n_sets, sets = _policy_sets(n, B, T, dtype, device, args.seed)
                x = sets[0]
                res: Dict[str, Dict] = {}
                # correctness once per shape: fused vs eager reference (loss and gradient)
                outs = []
                for f in (fused, reference.pama_policy_loss):
                    x["logp"].grad = None
                    loss = f(x["logp"], x["old_logp"], x["advantages"], x["mask"])[0]
                    loss.backward()
                    outs.append((loss.detach().float(), x["logp"].grad.float().clone()))
                err = max(float((outs[0][0] - outs[1][0]).abs()), float((outs[0][1] - outs[1][1]).abs().max()))
                bar.set_postfix_str(f"policy_loss {dname} n={n} {B}x{T}")
                res["fused"] = _timed(_policy_runner(fused, sets), n_sets, plan, device)
                res["fused"]["max_abs_err_vs_eager"] = err
                res["fused_checked"] = _timed(_policy_runner(ops.pama_policy_loss, sets), n_sets, plan, device)
                res["eager"] = _timed(_policy_runner(reference.pama_policy_loss, sets), n_sets, plan, device)
                if args.no_compile:
                    res["compile"] = bench_ops._skipped("--no-compile")
                elif args.static_compile and B * T < COMPILE_MIN_TOKENS:
                    res["compile"] = bench_ops._skipped(f"tokens < {COMPILE_MIN_TOKENS} (static compile per shape "
                                                        "costs time; the compile target applies from 2^18)")
                else:
                    try:
                        if args.static_compile:
                            torch._dynamo.reset()
                        fn = _policy_runner(compiled_policy, sets)
                        t0 = time.perf_counter()
                        fn(0)  # compiles (or recompiles) forward and backward when needed
                        common.sync(device)
                        compile_s = time.perf_counter() - t0
                        res["compile"] = _timed(fn, n_sets, plan, device)
                        res["compile"]["compile_s"] = compile_s
                    except Exception as e:  # noqa: BLE001 - a failed compile is a result, not a crash
                        res["compile"] = {"status": "error", "reason": f"{type(e).__name__}: {str(e)[:200]}"}
                _append_rows(rows, base, res, impls, bench_ops.policy_loss_bytes(n, B, T, elt, 1), args.copy_bw)
                del sets, x, outs
                rows = bench_ops._order_columns(rows)
                common.write_csv(rows, "bench_gpu_policy_loss", args.tag, args.out)
    md = _header(args, "policy_loss", "`pama_policy_loss` forward + backward (pama / token, Noon, whitening, dual clip 3), "
                 "bool mask. GB/s = bench_ops.policy_loss_bytes (the kernels' traffic pass by pass: 3ne + 7e + 4m + 2a "
                 "bytes per token, see benchmarks/README.md) / median time. "
                 "`fused` passes check_finite=False (no host sync); `checked` is the default check_finite=True. "
                 f"`compile`: torch.compile(bench_ops.reference_policy_loss_flat, "
                 f"dynamic={not args.static_compile}){'' if args.static_compile else ', compiled once per dtype for all shapes'}.")
    md += [_policy_table(rows), ""]
    md += _targets_policy(rows)
    _write_section(args, "policy_loss", rows, md)
    _plot_rates(args, rows, "policy_loss", "pama_policy_loss fwd+bwd", ["eager", "compile"])


def _index(rows, keys=("dtype", "n", "B", "T")):
    out: Dict[Tuple, Dict[str, Dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), {})[r["impl"]] = r
    return out


def _med(impls, impl):
    r = impls.get(impl)
    return r.get("median_ms") if r and r.get("status") == "ok" else None


def _sp(impls, impl):
    r = impls.get(impl)
    return r.get("speedup_of_fused") if r and r.get("status") == "ok" else None


def _policy_table(rows) -> str:
    head = ("| dtype | n | B×T | fused ms | checked ms | eager ms | compile ms | eager/fused | compile/fused | "
            "fused GB/s | % copy BW | peak MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (dt, n, B, T), im in _index(rows).items():
        f = im.get("fused", {})
        lines.append(
            f"| {dt} | {n} | {B}×{T} | {_fmt_ms(_med(im, 'fused'))} | {_fmt_ms(_med(im, 'fused_checked'))} | "
            f"{_fmt_ms(_med(im, 'eager'))} | {_fmt_ms(_med(im, 'compile'))} | {_fmt_x(_sp(im, 'eager'))} | "
            f"{_fmt_x(_sp(im, 'compile'))} | {float(f.get('gbps') or 0):.3g} | {_pct(f.get('frac_copy_bw'))} | "
            f"{_fmt_ms(f.get('peak_mem_mb'))} |")
    return "\n".join(lines)


def _targets_policy(rows) -> List[str]:
    big = [im for (dt, n, B, T), im in _index(rows).items() if B * T >= 2 ** 20 and "fused" in im
           and im["fused"].get("status") == "ok"]
    mid = [im for (dt, n, B, T), im in _index(rows).items() if B * T >= 2 ** 18 and "fused" in im
           and im["fused"].get("status") == "ok"]
    out = ["Targets (issue 4):", ""]
    if big:
        worst = min(float(im["fused"]["frac_copy_bw"]) for im in big)
        out.append(f"- ≥ 80% of copy bandwidth at ≥ 2^20 tokens: worst {100 * worst:.0f}% "
                   f"({'met' if worst >= 0.8 else 'NOT met'})")
    for impl, goal in (("eager", 5.0), ("compile", 1.5)):
        sps = [float(_sp(im, impl)) for im in mid if _sp(im, impl) is not None]
        if sps:
            out.append(f"- ≥ {goal}× {impl} at ≥ 2^18 tokens: worst {min(sps):.2f}× "
                       f"({'met' if min(sps) >= goal else 'NOT met'}) over {len(sps)} configs")
    return out + [""]


def _plot_rates(args, rows, section, title, baselines) -> None:
    if args.no_plot:
        return
    plt = _plt()
    if plt is None:
        return
    ok = [r for r in rows if r.get("status") == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    keys = sorted({(r["dtype"], r["n"]) for r in ok if r["impl"] == "fused"})
    cmap = plt.cm.viridis
    for k, (dt, n) in enumerate(keys):
        c = cmap(k / max(1, len(keys) - 1) * 0.9)
        ls = "-" if dt == "float32" else "--"
        pts = sorted((r["tokens"], r["frac_copy_bw"] * 100) for r in ok
                     if r["impl"] == "fused" and r["dtype"] == dt and r["n"] == n)
        if pts:
            axes[0].plot(*zip(*pts), ls, marker="o", color=c, label=f"{dt} n={n}")
        for impl, marker in zip(baselines, "s^D"):
            pts = sorted((r["tokens"], r["speedup_of_fused"]) for r in ok
                         if r["impl"] == impl and r["dtype"] == dt and r["n"] == n)
            if pts:
                axes[1].plot(*zip(*pts), ls, marker=marker, color=c, label=f"{dt} n={n} vs {impl}")
    axes[0].axhline(100, color="grey", lw=0.8)
    axes[0].axhline(80 if section == "policy_loss" else 60, color="red", lw=0.8, ls=":", label="target")
    axes[0].set_ylabel("fused: % of measured copy bandwidth")
    axes[1].axhline(1, color="grey", lw=0.8)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("speedup of fused (baseline time / fused time)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("tokens (B×T)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"{title} — {args.desc}", fontsize=9)
    fig.tight_layout()
    png = os.path.join(args.out, f"bench_gpu_{section}_{args.tag}.png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    print(f"wrote {png}")


# ------------------------------------------------------------------------------------------------
# GAE
# ------------------------------------------------------------------------------------------------
def section_gae(args, device, budget) -> None:
    sizes = args.gae_sizes or (QUICK_GAE_SIZES if args.quick else GAE_SIZES)
    ns = args.ns or (QUICK_GAE_NS if args.quick else GAE_NS)
    plan = args.plan
    bar = _Bar()
    # the namespace bench_ops' GAE helpers read (inputs, and the time-boxed compile child)
    gargs = SimpleNamespace(dtype=torch.float32, mask_dtype=torch.bool, seed=args.seed, no_compile=args.no_compile,
                            quick=args.quick, gae_compile_max_t=args.gae_compile_max_t,
                            compile_timeout=args.compile_timeout, device="cuda", budget=plan.budget_s,
                            max_repeats=plan.max_repeats)
    compile_state: Dict = {}
    rows: List[Dict[str, object]] = []
    impls = ["fused", "eager", "compile", "loop"]
    for (B, T) in sizes:
        for n in ns:
            base = {"op": "gae", "n": n, "B": B, "T": T, "tokens": B * T, "dtype": "float32"}
            if budget.over():
                rows += [dict(base, impl=i, **bench_ops._skipped(budget.reason())) for i in impls]
                continue
            n_sets, sets = bench_ops._gae_sets(n, B, T, gargs, device)
            x = sets[0]
            a_f, r_f = ops.multi_gae(x["rewards"], x["values"], x["mask"], GAMMA, LAM)
            a_e, r_e = reference.multi_gae(x["rewards"], x["values"], x["mask"], GAMMA, LAM)
            err = max(float((a_f - a_e).abs().max()), float((r_f - r_e).abs().max()))
            res: Dict[str, Dict] = {}
            bar.set_postfix_str(f"gae n={n} {B}x{T}")
            with torch.no_grad():
                res["fused"] = _timed(bench_ops._gae_runner(ops.multi_gae, sets), n_sets, plan, device)
                res["fused"]["max_abs_err_vs_eager"] = err
                res["eager"] = _timed(bench_ops._gae_runner(reference.multi_gae, sets), n_sets, plan, device)
                if T <= GAE_LOOP_MAX_T:
                    res["loop"] = _timed(bench_ops._gae_runner(bench_ops.gae_python_loop, sets), n_sets,
                                         args.slow_plan, device)
                else:
                    res["loop"] = bench_ops._skipped(f"T={T} > {GAE_LOOP_MAX_T}: ~6·n·T launches per call")
            if n in args.gae_compile_ns:
                res["compile"] = bench_ops._gae_compile(n, B, T, gargs, compile_state)
            else:
                res["compile"] = bench_ops._skipped(f"n={n} not in --gae-compile-ns (compile time)")
            _append_rows(rows, base, res, impls, bench_ops.gae_bytes(n, B, T, 4, 1), args.copy_bw)
            del sets, x
            rows = bench_ops._order_columns(rows)
            common.write_csv(rows, "bench_gpu_gae", args.tag, args.out)
    head = "| n | B×T | fused ms | eager ms | compile ms | loop ms | eager/fused | compile/fused | loop/fused | GB/s | % copy BW |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (dt, n, B, T), im in _index(rows).items():
        f = im.get("fused", {})
        lines.append(f"| {n} | {B}×{T} | {_fmt_ms(_med(im, 'fused'))} | {_fmt_ms(_med(im, 'eager'))} | "
                     f"{_fmt_ms(_med(im, 'compile'))} | {_fmt_ms(_med(im, 'loop'))} | {_fmt_x(_sp(im, 'eager'))} | "
                     f"{_fmt_x(_sp(im, 'compile'))} | {_fmt_x(_sp(im, 'loop'))} | {float(f.get('gbps') or 0):.3g} | "
                     f"{_pct(f.get('frac_copy_bw'))} |")
    notes = sorted({f"- {r['impl']} n={r['n']} {r['B']}×{r['T']}: {r['reason']}" for r in rows
                    if r.get("status") != "ok" and r["impl"] == "compile" and r.get("reason")})
    md = _header(args, "gae", "`multi_gae` forward, float32, bool mask; `loop` = bench_ops.gae_python_loop (TRL/verl's "
                 "per-timestep loop); GB/s = bench_ops.gae_bytes (rewards, values, mask read; advantages, returns "
                 "written) / median time.")
    md += lines + [""]
    loops = [float(_sp(im, "loop")) for (dt, n, B, T), im in _index(rows).items() if T == 1024 and _sp(im, "loop")]
    if loops:
        md.append(f"- target ≥ 200× the per-timestep loop at T = 1024: worst {min(loops):.0f}× "
                  f"({'met' if min(loops) >= 200 else 'NOT met'})")
    if notes:
        md += ["", "compile notes:", ""] + notes[:12]
    _write_section(args, "gae", rows, md + [""])
    _plot_rates(args, rows, "gae", "multi_gae fwd", ["eager", "compile", "loop"])


# ------------------------------------------------------------------------------------------------
# statistics and weights: one launch each, kernel times apart from the pass over the data
# ------------------------------------------------------------------------------------------------
_KERNEL_RE = re.compile(r"(\w+_kernel)")


def _device_time_us(evt) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        v = getattr(evt, attr, None)
        if v is not None:
            return float(v)
    return 0.0


def kernel_times(fn: Callable[[], object], iters: int) -> Dict[str, Tuple[float, int]]:
    """{kernel short name: (mean device µs per call of fn, launches per call)} from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        _sync()
    out: Dict[str, List[float]] = {}
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        m = _KERNEL_RE.search(e.key) if "pama" in e.key else None
        name = m.group(1) if m else e.key[:60]
        t, c = out.get(name, [0.0, 0])
        out[name] = [t + _device_time_us(e), c + e.count]
    return {k: (t / iters, c // iters) for k, (t, c) in out.items()}


def section_stats(args, device, budget) -> None:
    B, T = STATS_BT
    ns = args.stats_ns or (QUICK_STATS_NS if args.quick else STATS_NS)
    dtypes = args.dtypes or (["float32"] if args.quick else PL_DTYPES)
    plan = args.plan
    rows: List[Dict[str, object]] = []
    for dname in dtypes:
        dtype = _dtype(dname)
        elt = torch.empty((), dtype=dtype).element_size()
        for n in ns:
            base = {"n": n, "B": B, "T": T, "tokens": B * T, "dtype": dname}
            if budget.over():
                rows.append(dict(base, what="objective_stats", **bench_ops._skipped(budget.reason())))
                continue
            print(f"  .. stats {dname} n={n} {B}x{T}", flush=True)
            n_sets, sets = _policy_sets(n, B, T, dtype, device, args.seed)

            def stats_fn(i, sets=sets):
                x = sets[i]
                return ops.objective_stats(x["advantages"], x["logp"], x["old_logp"], x["mask"])

            r = dict(base, what="objective_stats", **_timed(stats_fn, n_sets, plan, device))
            _ok_rate(r, 2 * n * B * T * elt + 2 * B * T * elt + 2 * B * T, args.copy_bw)
            rows.append(r)
            st = stats_fn(0)
            for method, gran in WEIGHT_METHODS:
                r = dict(base, what=f"pareto_weights[{method}/{gran}]",
                         **_timed(lambda i: ops.pareto_weights(st, method, gran), 1, plan, device))
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
                     f"{gb} | {_pct(r.get('frac_copy_bw'))} |")
    md = _header(args, "stats", f"`objective_stats` (moments + indicators launchers) and `pareto_weights` at "
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
    _write_section(args, "stats", rows, md + [""])


# ------------------------------------------------------------------------------------------------
# models (headline and e2e)
# ------------------------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, L, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=-1)
        q, k, v = (t.view(B, L, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, L, d)
        x = x + self.c_proj(a)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class TorchGPT2(nn.Module):
    """GPT-2 in plain PyTorch (same parameter shapes as transformers' GPT2LMHeadModel, tied head);
    used when transformers is not installed."""

    def __init__(self, n_layer: int, n_embd: int, n_head: int, vocab: int = VOCAB, n_positions: int = N_POSITIONS):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(n_positions, n_embd)
        self.h = nn.ModuleList(_Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def hidden(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(pos)[None]
        for blk in self.h:
            x = blk(x)
        return self.ln_f(x)

    def lm_head(self, h):
        return F.linear(h, self.wte.weight)


class LM:
    """A random GPT-2-shaped causal LM: ``hidden(ids) -> [B, L, d]`` and ``lm_head(h) -> logits``."""

    def __init__(self, name: str, device, seed: int, dtype_override: Optional[str] = None):
        spec = MODELS[name]
        self.name = name
        self.dtype = _dtype(dtype_override or spec["dtype"])
        torch.manual_seed(seed)
        try:
            from transformers import GPT2Config, GPT2LMHeadModel

            cfg = GPT2Config(n_layer=spec["n_layer"], n_embd=spec["n_embd"], n_head=spec["n_head"],
                             vocab_size=VOCAB, n_positions=N_POSITIONS)
            with torch.device(device):
                self.model = GPT2LMHeadModel(cfg)
            self.impl = "transformers.GPT2LMHeadModel"
            self._hidden = lambda ids: self.model.transformer(input_ids=ids, use_cache=False)[0]
            self._head = self.model.lm_head
        except ImportError:
            with torch.device(device):
                self.model = TorchGPT2(spec["n_layer"], spec["n_embd"], spec["n_head"])
            self.impl = "plain PyTorch GPT-2 (transformers not installed)"
            self._hidden, self._head = self.model.hidden, self.model.lm_head
        self.model.to(self.dtype).eval()  # dropout off, as PPO trainers run the policy
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.n_params = sum(p.numel() for p in self.params)
        self.d_model = spec["n_embd"]

    def token_logp(self, ids: torch.Tensor, T: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(log-probs [B, T] float32 of the last T tokens, hidden states at the positions that predict them)."""
        h = self._hidden(ids)
        L = ids.shape[1]
        h = h[:, L - T - 1:L - 1]
        logits = self._head(h).float()
        lp = logits.gather(-1, ids[:, L - T:].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        return lp, h


def _flat_gram_fp32(flat: torch.Tensor, chunk: int = 1 << 24) -> torch.Tensor:
    """G = flat @ flat.T accumulated in float32 over column chunks (flat: [n, d], any float dtype)."""
    n, d = flat.shape
    G = torch.zeros(n, n, dtype=torch.float32, device=flat.device)
    for s in range(0, d, chunk):
        c = flat[:, s:s + chunk].float()
        G.addmm_(c, c.t())
    return G


@contextlib.contextmanager
def _oom_guard(row: Dict[str, object]):
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        row.update(status="oom", reason=str(e).splitlines()[0][:200])
        torch.cuda.empty_cache()
    except RuntimeError as e:  # the CPU allocator's out-of-memory error (--cpu)
        if "alloc" not in str(e):
            raise
        row.update(status="oom", reason=str(e).splitlines()[0][:200])


def _event_time(fn: Callable[[], object], warmup: int, repeats: int) -> common.Timing:
    """CUDA-event time of each of ``repeats`` calls (wall clock on the CPU smoke run)."""
    for _ in range(warmup):
        fn()
    _sync()
    ts = []
    cuda = torch.cuda.is_available()
    for _ in range(repeats):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
    return common.Timing.from_samples(ts)


def section_headline(args, device, budget) -> None:
    models = args.models
    ns = args.headline_ns or ([2, 8] if args.quick else HEADLINE_NS)
    B, T = args.headline_bt
    P = 16  # prompt tokens before the T response tokens
    rows: List[Dict[str, object]] = []
    for mname in models:
        if budget.over():
            rows.append({"model": mname, "status": "skipped", "reason": budget.reason()})
            continue
        print(f"  .. headline: building {mname}", flush=True)
        torch.cuda.empty_cache()
        try:
            lm = LM(mname, device, args.seed)
        except torch.cuda.OutOfMemoryError as e:
            rows.append({"model": mname, "status": "oom", "reason": str(e)[:200]})
            continue
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, VOCAB, (B, P + T), generator=g).to(device)
        mask = common.make_mask(B, T, args.seed, device, torch.bool)
        logp, _ = lm.token_logp(ids, T)  # one forward; its graph is reused (retain_graph) by every backward
        old_logp = (logp.detach() + 0.05 * torch.randn(B, T, generator=g).to(device)).contiguous()
        info = {"model": mname, "impl": lm.impl, "params_M": lm.n_params / 1e6, "model_dtype": _dtype_name(lm.dtype),
                "B": B, "T": T}
        for n in ns:
            if budget.over():
                rows.append(dict(info, n=n, method="mgda_full", status="skipped", reason=budget.reason()))
                continue
            print(f"  .. headline {mname} n={n}", flush=True)
            adv = (torch.randn(n, B, T, generator=g) * (0.5 + torch.rand(n, 1, 1, generator=g))).to(device)
            losses = [ops.pama_policy_loss(logp, old_logp, adv[i:i + 1], mask, noon=False, method="linear",
                                           check_finite=False)[0] for i in range(n)]
            total = torch.stack(losses).sum()

            def pama_step():
                st = ops.objective_stats(adv, logp.detach(), old_logp, mask)
                return ops.pareto_weights(st, "pama", "token")

            flat_holder: Dict[str, torch.Tensor] = {}

            def mgda_step():
                flat = flat_holder["flat"]
                for i, li in enumerate(losses):
                    gs = torch.autograd.grad(li, lm.params, retain_graph=True)
                    torch.cat([gi.reshape(-1) for gi in gs], out=flat[i])
                return reference.mgda_weights(_flat_gram_fp32(flat).double())

            def one_backward():
                return torch.autograd.grad(total, lm.params, retain_graph=True)

            r = dict(info, n=n, method="pama", status="ok")
            t = _event_time(pama_step, 3, 20)
            r.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                     peak_mem_mb=common.peak_memory_mb(pama_step, device))
            rows.append(r)
            r = dict(info, n=n, method="mgda_full", status="ok")
            with _oom_guard(r):
                flat_holder["flat"] = torch.empty(n, lm.n_params, dtype=lm.dtype, device=device)
                t = _event_time(mgda_step, 1, args.headline_repeats)
                # peak memory includes the n x d gradient buffer (allocated inside for the measurement)
                del flat_holder["flat"]
                torch.cuda.empty_cache()

                def mgda_with_buffer():
                    flat_holder["flat"] = torch.empty(n, lm.n_params, dtype=lm.dtype, device=device)
                    out = mgda_step()
                    del flat_holder["flat"]
                    return out

                r.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                         peak_mem_mb=common.peak_memory_mb(mgda_with_buffer, device))
            rows.append(r)
            r = dict(info, n=n, method="one_backward", status="ok")
            with _oom_guard(r):
                t = _event_time(one_backward, 1, args.headline_repeats)
                r.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                         peak_mem_mb=common.peak_memory_mb(one_backward, device))
            rows.append(r)
            del losses, total, adv
            common.write_csv(rows, "bench_gpu_headline", args.tag, args.out)
        del lm, logp, old_logp, ids
        torch.cuda.empty_cache()
    common.write_csv(rows, "bench_gpu_headline", args.tag, args.out)
    by: Dict[Tuple, Dict[str, Dict]] = {}
    for r in rows:
        if "n" in r:
            by.setdefault((r["model"], r["n"]), {})[r["method"]] = r
    head = ("| model | params | n | PAMA ms | MGDA ms | MGDA / PAMA | PAMA peak MB | MGDA peak MB | "
            "one backward ms |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (m, n), d in by.items():
        p, q, o = d.get("pama", {}), d.get("mgda_full", {}), d.get("one_backward", {})
        ratio = (float(q["median_ms"]) / float(p["median_ms"])
                 if q.get("status") == "ok" and p.get("status") == "ok" else None)
        qms = _fmt_ms(q.get("median_ms")) if q.get("status") == "ok" else q.get("status", "—")
        lines.append(f"| {m} ({p.get('model_dtype', q.get('model_dtype', ''))}) | {float(p.get('params_M', 0)):.0f}M | "
                     f"{n} | {_fmt_ms(p.get('median_ms'))} | {qms} | {_fmt_x(ratio)} | "
                     f"{_fmt_ms(p.get('peak_mem_mb'))} | {_fmt_ms(q.get('peak_mem_mb'))} | {_fmt_ms(o.get('median_ms'))} |")
    impl = next((r["impl"] for r in rows if r.get("impl")), "?")
    md = _header(args, "headline", f"One weighting step on a B×T = {B}×{T} batch (16 prompt tokens before the T "
                 "response tokens). PAMA = objective_stats + pareto_weights (pama / token) on the advantages "
                 "[n, B, T]; MGDA = n backward passes of per-objective PPO losses (pama_policy_loss, linear, "
                 "n = 1 each) through the model with retain_graph, flattened into an n×d buffer (model dtype), "
                 "Gram in fp32, Frank-Wolfe (pama_ext.reference.mgda_weights). Peak MB = " + (
                     "peak allocated during the step above what was allocated before it (model, activations)"
                     if device.type == "cuda" else "peak resident set during the step above the resident set "
                     "before it (model, activations)") + f". Model: {impl}, random init; "
                 "`one backward` = the single backward PPO does anyway, for scale.")
    md += lines + [""]
    _write_section(args, "headline", rows, md)
    _plot_headline(args, by)


def _plot_headline(args, by) -> None:
    if args.no_plot or not by:
        return
    plt = _plt()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    models = sorted({m for m, _ in by})
    styles = {"pama": ("-", "o", "PAMA (stats + weights)"), "mgda_full": ("--", "s", "full-gradient MGDA"),
              "one_backward": (":", "^", "one backward pass")}
    for k, m in enumerate(models):
        c = plt.cm.tab10(k)
        for method, (ls, mk, label) in styles.items():
            pts = sorted((n, float(d[method]["median_ms"]), d[method].get("peak_mem_mb"))
                         for (mm, n), d in by.items() if mm == m and d.get(method, {}).get("status") == "ok")
            if not pts:
                continue
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], ls, marker=mk, color=c, label=f"{m}: {label}")
            mem = [(p[0], max(float(p[2]), 1e-3)) for p in pts if p[2] not in (None, "")]
            if mem and method != "one_backward":
                axes[1].plot(*zip(*mem), ls, marker=mk, color=c, label=f"{m}: {label}")
    axes[0].set_ylabel("time of one weighting step (ms)")
    axes[1].set_ylabel("peak extra memory (MB)")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("objectives n")
        ax.set_xticks(sorted({n for _, n in by}))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"PAMA vs full-gradient MGDA — {args.desc}", fontsize=9)
    fig.tight_layout()
    png = os.path.join(args.out, f"bench_gpu_headline_{args.tag}.png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    print(f"wrote {png}")


# ------------------------------------------------------------------------------------------------
# end to end: share of a PPO step in pama_ext ops
# ------------------------------------------------------------------------------------------------
def pama_share(prof, wall_ms: float) -> Dict[str, float]:
    """Host time inside top-level ``pama_ext::`` ops and device time of pama kernels, from a profile."""
    host_us = 0.0
    n_ops = 0
    for e in prof.events():
        if not e.name.startswith("pama_ext::"):
            continue
        p, nested = e.cpu_parent, False
        while p is not None:
            if p.name.startswith("pama_ext::"):
                nested = True
                break
            p = p.cpu_parent
        if not nested:
            host_us += e.cpu_time_total
            n_ops += 1
    dev_pama = dev_all = 0.0
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        t = _device_time_us(e)
        dev_all += t
        if "pama::" in e.key:
            dev_pama += t
    return {"pama_host_ms": host_us / 1e3, "pama_ops": n_ops, "pama_device_ms": dev_pama / 1e3,
            "device_busy_ms": dev_all / 1e3, "share_host": host_us / 1e3 / wall_ms,
            "share_device": dev_pama / 1e3 / wall_ms}


def _profile(fn: Callable[[], object]):
    from torch.profiler import ProfilerActivity, profile

    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        _sync()
        wall = (time.perf_counter() - t0) * 1e3
    return prof, wall


def _wall_ms(fn: Callable[[], object], repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[len(ts) // 2]


def e2e_update(args, device) -> Dict[str, object]:
    """A PPO step's scoring + update phase on a random GPT-2-small, written with pama_ext ops."""
    n, B, P, T = 2, args.e2e_batch, 64, args.e2e_response
    lm = LM("gpt2-small", device, args.seed, dtype_override="float32")
    ref = LM("gpt2-small", device, args.seed + 1, dtype_override="float32")  # frozen reference policy
    ref.model.requires_grad_(False)
    heads = nn.Linear(lm.d_model, n).to(device)
    opt = torch.optim.AdamW(lm.params + list(heads.parameters()), lr=1e-5)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, VOCAB, (B, P + T), generator=g).to(device)
    mask = common.make_mask(B, T, args.seed, device, torch.bool)
    scores = torch.randn(n, B, generator=g).to(device)

    def step():
        with torch.no_grad():  # rollout scoring: old log-probs + values, reference log-probs
            old_logp, h = lm.token_logp(ids, T)
            values = heads(h).float().permute(2, 0, 1).contiguous()
            ref_logp, _ = ref.token_logp(ids, T)
        r = ops.token_rewards(scores, old_logp, ref_logp, mask, beta_kl=0.02)
        adv, ret = ops.multi_gae(r, values, mask, GAMMA, LAM)
        for mb in range(0, B, args.e2e_minibatch):
            sl = slice(mb, mb + args.e2e_minibatch)
            logp, h = lm.token_logp(ids[sl], T)
            v = heads(h).float().permute(2, 0, 1)
            pl, _ = ops.pama_policy_loss(logp, old_logp[sl], adv[:, sl], mask[sl], method="pama",
                                         granularity="token", check_finite=False)
            vl, _ = ops.multi_value_loss(v, values[:, sl], ret[:, sl], mask[sl], clip=0.2, check_finite=False)
            opt.zero_grad(set_to_none=True)
            (pl + 0.1 * vl).backward()
            torch.nn.utils.clip_grad_norm_(lm.params, 1.0)
            opt.step()

    step()  # warm-up (allocator, cuBLAS, optimizer state)
    wall = _wall_ms(step, 3)
    prof, pwall = _profile(step)
    out = {"mode": "update", "model": lm.impl, "n": n, "B": B, "T": T, "step_ms": wall, "profiled_step_ms": pwall}
    out.update(pama_share(prof, pwall))
    del lm, ref, heads, opt
    torch.cuda.empty_cache()
    return out


def _word_tokenizer(vocab: int):
    """An offline word-level tokenizer with GPT-2's vocabulary size ("w<i>" words, eos = last id)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 1)}
    words["<|endoftext|>"] = vocab - 1
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="w0")


def _distinct_words(prompts, responses):
    return [len(set(r.split())) / max(1, len(r.split())) for r in responses]


def e2e_trainer(args, device) -> Dict[str, object]:
    """pama_ext.trainer's PPOTrainer.step on a random GPT-2-small (rollout with generate included)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pama_ext.trainer.config import TrainConfig
    from pama_ext.lm.policy import PolicyWithValueHeads, frozen_copy
    from pama_ext.trainer.ppo import PPOTrainer
    from pama_ext.lm.rewards import LengthReward, Objective

    torch.manual_seed(args.seed)
    spec = MODELS["gpt2-small"]
    with torch.device(device):
        lm = GPT2LMHeadModel(GPT2Config(n_layer=spec["n_layer"], n_embd=spec["n_embd"], n_head=spec["n_head"]))
    lm.eval()  # a fresh model is in training mode (dropout); the trainer runs it in eval mode
    tok = _word_tokenizer(lm.config.vocab_size)
    cfg = TrainConfig(model="random-gpt2-small", objectives=["length", "py:bench_gpu:_distinct_words"],
                      method="pama", granularity="token", batch_size=args.e2e_batch,
                      minibatch_size=args.e2e_minibatch, ppo_epochs=1, max_new_tokens=args.e2e_response,
                      max_prompt_tokens=64, device=device.type, progress=False, seed=args.seed)
    objectives = [Objective("length", LengthReward(cfg.length_l0, cfg.length_lo, cfg.length_hi)),
                  Objective("distinct", _distinct_words)]
    g = torch.Generator().manual_seed(args.seed)
    prompts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 50000, (32,), generator=g)) for _ in range(256)]
    policy = PolicyWithValueHeads(lm, 2)
    trainer = PPOTrainer(cfg, policy, frozen_copy(lm), tok, objectives, prompts, device)
    trainer.step()  # warm-up
    _sync()
    t0 = time.perf_counter()
    res = trainer.step()
    _sync()
    wall = (time.perf_counter() - t0) * 1e3
    prof, pwall = _profile(trainer.step)
    out = {"mode": "trainer", "model": "transformers.GPT2LMHeadModel", "n": 2, "B": args.e2e_batch,
           "T": args.e2e_response, "step_ms": wall, "profiled_step_ms": pwall,
           "update_ms": 1e3 * res["time"]["update"], "rollout_ms": 1e3 * res["time"]["rollout"]}
    out.update(pama_share(prof, pwall))
    out["share_host_of_update"] = out["pama_host_ms"] / max(out["update_ms"], 1e-9)
    del trainer, policy, lm
    torch.cuda.empty_cache()
    return out


def section_e2e(args, device, budget) -> None:
    rows: List[Dict[str, object]] = []
    for mode, fn in (("update", e2e_update), ("trainer", e2e_trainer)):
        if budget.over():
            rows.append({"mode": mode, "status": "skipped", "reason": budget.reason()})
            continue
        print(f"  .. e2e {mode}", flush=True)
        try:
            r = fn(args, device)
            r["status"] = "ok"
        except ImportError as e:
            r = {"mode": mode, "status": "skipped", "reason": f"{type(e).__name__}: {e}"}
        except Exception as e:  # noqa: BLE001 - report and go on to the next mode
            r = {"mode": mode, "status": "error", "reason": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append(r)
        common.write_csv(rows, "bench_gpu_e2e", args.tag, args.out)
    head = ("| mode | model | B×T | step ms | profiled step ms | pama host ms | pama device ms | "
            "share (host) | share (device) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['mode']} | {r.get('status')}: {r.get('reason', '')[:120]} |||||||")
            continue
        on_gpu = device.type == "cuda"  # on the CPU the ops' host time is their compute time
        lines.append(f"| {r['mode']} | {r['model']} | {r['B']}×{r['T']} | {r['step_ms']:.1f} | "
                     f"{r['profiled_step_ms']:.1f} | {r['pama_host_ms']:.2f} | "
                     f"{format(r['pama_device_ms'], '.3f') if on_gpu else 'n/a'} | {100 * r['share_host']:.2f}% | "
                     f"{format(100 * r['share_device'], '.3f') + '%' if on_gpu else 'n/a'} |")
    md = _header(args, "e2e", "Share of a PPO step spent in pama_ext ops, random GPT-2-small, n = 2 objectives. "
                 "`update`: scoring forward (policy + reference, no grad), token_rewards, multi_gae, then per "
                 "minibatch a policy forward, pama_policy_loss + multi_value_loss, backward, AdamW. `trainer`: "
                 "pama_ext.trainer PPOTrainer.step (generate included; offline word-level tokenizer with GPT-2's "
                 "vocabulary size). Host share = time inside top-level `pama_ext::` ops (torch.profiler, "
                 "autograd backward ops included) / profiled step wall time; device share = device time of pama "
                 "kernels / profiled step wall time. Target ≤ 2%.")
    md += lines + [""]
    _write_section(args, "e2e", rows, md)


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def _sizes(s: Optional[str]):
    return [tuple(int(v) for v in x.lower().split("x")) for x in s.split(",")] if s else None


def _ints(s: Optional[str]):
    return [int(v) for v in s.split(",")] if s else None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Sections: " + ", ".join(SECTIONS) + ". Needs a CUDA GPU and pama_ext "
                                       "built with its CUDA kernels (PAMA_EXT_CUDA=1).")
    p.add_argument("--quick", action="store_true", help="small sweep of every section (a few minutes)")
    p.add_argument("--only", default=None, help="comma list of sections (default: all; --cpu: headline,e2e)")
    p.add_argument("--out", default=common.RESULTS_DIR, help="output folder (default benchmarks/results)")
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
                        "the CPU op benchmark is bench_ops.py)")
    # developer check of the code paths on a machine without a GPU: tiny sizes and models on the CPU,
    # numbers meaningless; outputs tagged cpu_smoke
    p.add_argument("--smoke-cpu", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.cpu and args.smoke_cpu:
        p.error("--cpu and --smoke-cpu exclude each other")
    args.sections = [s.strip() for s in (args.only or ",".join(CPU_SECTIONS if args.cpu else SECTIONS)).split(",")
                     if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        p.error(f"--only: unknown section(s) {bad}; choose from {', '.join(SECTIONS)}")
    if args.cpu and any(s not in CPU_SECTIONS for s in args.sections):
        p.error(f"--cpu runs only {', '.join(CPU_SECTIONS)}; the op sections measure GPU bandwidth "
                "(on a CPU use benchmarks/bench_ops.py)")
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
    args.pl_sizes = _sizes(args.sizes)
    args.gae_sizes = _sizes(args.gae_sizes)
    args.ns = _ints(args.ns)
    args.stats_ns = _ints(args.stats_ns)
    args.headline_ns = _ints(args.headline_ns)
    args.gae_compile_ns = _ints(args.gae_compile_ns) or []
    args.headline_bt = _sizes(args.headline_bt)[0]
    args.dtypes = [d.strip() for d in args.dtypes.split(",")] if args.dtypes else None
    if args.quick:
        args.models = [m for m in args.models if m != "gpt2-1b"] or args.models
        args.e2e_batch, args.e2e_response = min(args.e2e_batch, 16), min(args.e2e_response, 128)
    return args


def _smoke_settings(args) -> None:
    global STATS_BT
    MODELS["gpt2-small"] = dict(n_layer=2, n_embd=64, n_head=2, dtype="float32")
    MODELS["gpt2-1b"] = dict(n_layer=2, n_embd=96, n_head=2, dtype="bfloat16")
    STATS_BT = (4, 300)
    args.pl_sizes = args.pl_sizes or [(4, 64), (8, 130)]
    args.gae_sizes = args.gae_sizes or [(4, 64), (2, 1024)]
    args.ns = args.ns or [1, 3]
    args.stats_ns = args.stats_ns or [2, 16]
    args.headline_bt = (2, 32)
    args.headline_ns = args.headline_ns or [2, 3]
    args.e2e_batch, args.e2e_minibatch, args.e2e_response = 4, 2, 8


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke_cpu:
        _smoke_settings(args)
    elif args.cpu:
        common.malloc_returns_large_blocks()  # before any large tensor: RSS peaks then measure each call
    elif not torch.cuda.is_available():
        print(f"bench_gpu.py: CUDA is not available (torch {torch.__version__}, CUDA runtime "
              f"{torch.version.cuda}); the GPU benchmarks need an NVIDIA GPU. On a CPU use bench_ops.py.",
              file=sys.stderr)
        return 2
    elif not (NATIVE_AVAILABLE and ops.has_cuda_kernels()):
        print("bench_gpu.py: pama_ext has no CUDA kernels loaded (native library "
              f"{'loaded' if NATIVE_AVAILABLE else 'not loaded'}); build it with "
              "`PAMA_EXT_CUDA=1 pip install --no-build-isolation -e .`", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke_cpu or args.cpu else "cuda")
    torch.set_float32_matmul_precision("high")  # TF32 for the fp32 model passes, as GPU training runs them
    args.tag = "cpu_smoke" if args.smoke_cpu else "cpu" if args.cpu else device_tag(device)
    args.desc = common.device_description(device)
    args.plan = (common.TimingPlan(warmup=2, min_repeats=5, max_repeats=50, budget_s=0.1) if args.quick else
                 common.TimingPlan(warmup=3, min_repeats=10, max_repeats=args.max_repeats, budget_s=args.budget))
    args.slow_plan = common.TimingPlan(warmup=1, min_repeats=3, max_repeats=10, budget_s=0.5)  # Python loops
    budget = Budget(args.time_limit)
    os.makedirs(args.out, exist_ok=True)
    args.copy_bw = common.copy_bandwidth_gbs(device, mbytes=256 if args.quick else 1024, repeats=20)
    print(f"device: {args.desc}\ncopy bandwidth: {args.copy_bw:.0f} GB/s (read + write)\nsections: "
          f"{', '.join(args.sections)}; out: {args.out}", flush=True)
    runners = {"bandwidth": section_bandwidth, "policy_loss": section_policy_loss, "gae": section_gae,
               "stats": section_stats, "headline": section_headline, "e2e": section_e2e}
    failed = []
    for s in SECTIONS:
        if s not in args.sections:
            continue
        t0 = time.perf_counter()
        print(f"== {s} (elapsed {budget.elapsed():.0f} s)", flush=True)
        try:
            runners[s](args, device, budget)
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


if __name__ == "__main__":
    sys.exit(main())
