"""GAE families: ``multi_gae`` forward (``gae``) and forward + backward (``gae_fb``, :data:`FWD_BWD`).

Implementations of ``gae``: ``fused`` (pama_ext.ops), ``eager`` (the reference), ``compile``
(torch.compile(reference), time-boxed in a child process: the reference loops over T in Python, so
dynamo unrolls T steps), ``loop`` (baselines.gae_python_loop, TRL / verl's per-timestep loop) and
``loop_folded`` (the same loop with the objectives folded into the batch, baselines.gae_python_loop_folded).

``gae_fb`` times the forward and ``torch.autograd.grad`` of (advantages, returns) with fixed upstream
gradients on (rewards, values): ``fused`` (the forward and the adjoint scan) and ``eager`` (autograd
through the reference's loop over T, up to T = GAE_LOOP_MAX_T); no compile or loop baselines (their backward through T
unrolled steps is not what a user would run).

* :func:`run_point`: one (n, B, T) of bench_ops.py's sweep (``gae``); :data:`FWD_BWD`: the ``gae_fb`` family.
* :func:`section`: bench_gpu.py's ``gae`` section.
* ``python -m pama_ext.benchmarks.gae --child-compile n,B,T ...``: the compile child (internal).
"""
from __future__ import annotations

import argparse
import json
import sys
from types import SimpleNamespace
from typing import Dict, List

import torch

from pama_ext import ops

from . import baselines, common

GAMMA, LAM = 1.0, 0.95
IMPLS = ["fused", "eager", "compile", "loop", "loop_folded"]

GAE_SIZES = [(64, 256), (16, 1024), (64, 1024), (256, 1024), (64, 8192), (256, 8192)]
GAE_NS = [1, 2, 4, 8]
QUICK_GAE_SIZES = [(64, 1024), (256, 8192)]
QUICK_GAE_NS = [4]
GAE_LOOP_MAX_T = 1024  # the Python loop costs ~n*T*6 launches per call: only up to T = 1024


def nbytes(n: int, B: int, T: int, elt: int, mask_elt: int) -> int:
    """rewards, values and mask read; advantages and returns written."""
    return 4 * n * B * T * elt + B * T * mask_elt


def input_sets(n, B, T, args, device):
    """``(n_sets, sets)`` of seeded GAE inputs (``args``: dtype, mask_dtype, seed)."""
    return common.input_sets(common.make_gae_inputs, n, B, T, args, device)


def runner(gae_fn, sets):
    def fn(i):
        x = sets[i]
        return gae_fn(x["rewards"], x["values"], x["mask"], GAMMA, LAM)
    return fn


def max_err(sets) -> float:
    x = sets[0]
    a_f, r_f = ops.multi_gae(x["rewards"], x["values"], x["mask"], GAMMA, LAM)
    a_e, r_e = baselines.EAGER["gae"](x["rewards"], x["values"], x["mask"], GAMMA, LAM)
    return max(float((a_f - a_e).abs().max()), float((r_f - r_e).abs().max()))


def run_point(n, B, T, args, device, plan, state: Dict, bar) -> Dict[str, Dict]:
    """bench_ops.py: fused / eager / compile / loop at one (n, B, T)."""
    n_sets, sets = input_sets(n, B, T, args, device)
    out: Dict[str, Dict] = {}
    err = max_err(sets)
    with torch.no_grad():
        bar.set_postfix_str(f"gae n={n} {B}x{T} fused")
        out["fused"] = common.timed_row(runner(ops.multi_gae, sets), n_sets, plan, device)
        out["fused"]["max_abs_err_vs_eager"] = err
        bar.set_postfix_str(f"gae n={n} {B}x{T} eager")
        out["eager"] = common.timed_row(runner(baselines.EAGER["gae"], sets), n_sets, plan, device)
        bar.set_postfix_str(f"gae n={n} {B}x{T} compile")
        out["compile"] = compile_row(n, B, T, args, state)
        bar.set_postfix_str(f"gae n={n} {B}x{T} loop")
        out["loop"] = common.timed_row(runner(baselines.gae_python_loop, sets), n_sets, plan, device)
        bar.set_postfix_str(f"gae n={n} {B}x{T} loop_folded")
        out["loop_folded"] = common.timed_row(runner(baselines.gae_python_loop_folded, sets), n_sets, plan, device)
    return out


def nbytes_fwd_bwd(n: int, B: int, T: int, elt: int, mask_elt: int) -> int:
    """The forward's bytes (:func:`nbytes`) and the adjoint scan's: dL/dA, dL/dreturns and mask
    read, dL/drewards and dL/dvalues written."""
    return 2 * nbytes(n, B, T, elt, mask_elt)


def runner_fwd_bwd(gae_fn, sets, upstream):
    def fn(i):
        x = sets[i]
        r, v = x["rewards"].detach().requires_grad_(True), x["values"].detach().requires_grad_(True)
        adv, ret = gae_fn(r, v, x["mask"], GAMMA, LAM)
        return torch.autograd.grad((adv, ret), (r, v), upstream)
    return fn


def run_point_fwd_bwd(n, B, T, args, device, plan, state: Dict, bar) -> Dict[str, Dict]:
    """bench_ops.py (``gae_fb``): fused / eager forward + backward at one (n, B, T)."""
    n_sets, sets = input_sets(n, B, T, args, device)
    g = torch.Generator().manual_seed(args.seed + 2)
    upstream = [torch.randn(n, B, T, generator=g).to(device=device, dtype=args.dtype) for _ in range(2)]
    fused, eager = runner_fwd_bwd(ops.multi_gae, sets, upstream), runner_fwd_bwd(baselines.EAGER["gae"], sets, upstream)
    with_eager = T <= GAE_LOOP_MAX_T
    err = max(float((a - b).abs().max()) for a, b in zip(fused(0), eager(0))) if with_eager else float("nan")
    out: Dict[str, Dict] = {}
    bar.set_postfix_str(f"gae_fb n={n} {B}x{T} fused")
    out["fused"] = common.timed_row(fused, n_sets, plan, device)
    out["fused"]["max_abs_err_vs_eager"] = err
    if with_eager:
        bar.set_postfix_str(f"gae_fb n={n} {B}x{T} eager")
        out["eager"] = common.timed_row(eager, n_sets, plan, device)
    else:
        out["eager"] = common.skipped(f"T={T} > {GAE_LOOP_MAX_T}: autograd through T unrolled steps")
    return out


#: the ``gae_fb`` family of bench_ops.py
FWD_BWD = SimpleNamespace(IMPLS=["fused", "eager"], nbytes=nbytes_fwd_bwd, run_point=run_point_fwd_bwd)


def compile_row(n, B, T, args, state: Dict) -> Dict[str, object]:
    """torch.compile(reference.multi_gae), time-boxed in a child process (a compile cannot be
    interrupted in-process). A time-out at some T skips every later shape with T' >= T.

    ``args``: no_compile, quick, gae_compile_max_t, compile_timeout, device, seed, budget, max_repeats,
    dtype, mask_dtype."""
    if args.no_compile:
        return common.skipped("--no-compile")
    if args.quick:
        return common.skipped("--quick: GAE compile not attempted (it unrolls the loop over T)")
    if T > args.gae_compile_max_t:
        return common.skipped(
            f"T={T} > --gae-compile-max-t={args.gae_compile_max_t}: dynamo unrolls the reference's "
            f"Python loop over T, compile time grows with T"
        )
    if state.get("timed_out_T") is not None and T >= state["timed_out_T"]:
        return common.skipped(
            f"compile timed out (> {args.compile_timeout:.0f} s) at T={state['timed_out_T']} "
            f"({state['timed_out_at']}); not attempted for T >= that (it unrolls the loop over T)"
        )
    argv = ["--child-compile", f"{n},{B},{T}", "--device", args.device, "--seed", str(args.seed),
            "--budget", str(args.budget), "--max-repeats", str(args.max_repeats),
            "--dtype", common.dtype_name(args.dtype), "--mask-dtype", common.dtype_name(args.mask_dtype),
            "--threads", str(torch.get_num_threads())]
    rc, stdout, stderr = common.run_child("pama_ext.benchmarks.gae", argv, args.compile_timeout)
    if rc is None:
        state["timed_out_T"] = T
        state["timed_out_at"] = f"n={n}, {B}x{T}"
        return common.skipped(
            f"torch.compile did not finish within {args.compile_timeout:.0f} s at n={n}, {B}x{T} "
            f"(dynamo unrolls the reference's loop over T={T})"
        )
    for line in stdout.splitlines():
        if line.startswith("CHILD_RESULT "):
            return json.loads(line[len("CHILD_RESULT "):])
    tail = (stderr or stdout).strip().splitlines()[-1:] or ["no output"]
    return {"status": "error", "reason": f"compile child failed (rc={rc}): {tail[0][:200]}"}


def child_main(argv=None) -> int:
    """The compile child: compiles and times the reference at one shape, prints one CHILD_RESULT line."""
    p = argparse.ArgumentParser(description="internal: time torch.compile(reference.multi_gae) at one shape")
    p.add_argument("--child-compile", required=True, help="n,B,T")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--budget", type=float, default=1.0)
    p.add_argument("--max-repeats", type=int, default=50)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--mask-dtype", default="float32")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    a.dtype, a.mask_dtype = getattr(torch, a.dtype), getattr(torch, a.mask_dtype)
    n, B, T = (int(v) for v in a.child_compile.split(","))
    device = common.resolve_device(a.device)
    plan = common.TimingPlan(warmup=2, min_repeats=5, max_repeats=a.max_repeats, budget_s=a.budget)
    n_sets, sets = input_sets(n, B, T, a, device)
    with torch.no_grad():
        row = common.compiled_row(runner(baselines.compiled("gae"), sets), n_sets, plan, device)
    print("CHILD_RESULT " + json.dumps(row), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------
# the GPU suite's section
# ------------------------------------------------------------------------------------------------
def section(args, device, budget) -> None:
    f_ms, f_x, med, sp = common.fmt_ms, common.fmt_ratio, common.ok_median, common.ok_speedup
    sizes = args.gae_sizes or (QUICK_GAE_SIZES if args.quick else GAE_SIZES)
    ns = args.ns or (QUICK_GAE_NS if args.quick else GAE_NS)
    plan = args.plan
    bar = common.Progress()
    # what input_sets and compile_row read (inputs, and the time-boxed compile child)
    gargs = SimpleNamespace(dtype=torch.float32, mask_dtype=torch.bool, seed=args.seed, no_compile=args.no_compile,
                            quick=args.quick, gae_compile_max_t=args.gae_compile_max_t,
                            compile_timeout=args.compile_timeout, device="cuda", budget=plan.budget_s,
                            max_repeats=plan.max_repeats)
    compile_state: Dict = {}
    rows: List[Dict[str, object]] = []
    for (B, T) in sizes:
        for n in ns:
            base = {"op": "gae", "n": n, "B": B, "T": T, "tokens": B * T, "dtype": "float32"}
            if budget.over():
                rows += [dict(base, impl=i, **common.skipped(budget.reason())) for i in IMPLS]
                continue
            n_sets, sets = input_sets(n, B, T, gargs, device)
            err = max_err(sets)
            res: Dict[str, Dict] = {}
            bar.set_postfix_str(f"gae n={n} {B}x{T}")
            with torch.no_grad():
                res["fused"] = common.timed_row(runner(ops.multi_gae, sets), n_sets, plan, device)
                res["fused"]["max_abs_err_vs_eager"] = err
                res["eager"] = common.timed_row(runner(baselines.EAGER["gae"], sets), n_sets, plan, device)
                if T <= GAE_LOOP_MAX_T:
                    res["loop"] = common.timed_row(runner(baselines.gae_python_loop, sets), n_sets,
                                                   args.slow_plan, device)
                    res["loop_folded"] = common.timed_row(runner(baselines.gae_python_loop_folded, sets), n_sets,
                                                          args.slow_plan, device)
                else:
                    res["loop"] = common.skipped(f"T={T} > {GAE_LOOP_MAX_T}: ~6·n·T launches per call")
                    res["loop_folded"] = common.skipped(f"T={T} > {GAE_LOOP_MAX_T}: ~6·T launches per call")
            if n in args.gae_compile_ns:
                res["compile"] = compile_row(n, B, T, gargs, compile_state)
            else:
                res["compile"] = common.skipped(f"n={n} not in --gae-compile-ns (compile time)")
            common.append_rows(rows, base, res, IMPLS, nbytes(n, B, T, 4, 1), args.copy_bw)
            del sets
            rows = common.order_columns(rows)
            common.write_csv(rows, "bench_gpu_gae", args.tag, args.out)
    head = "| n | B×T | fused ms | eager ms | compile ms | loop ms | eager/fused | compile/fused | loop/fused | GB/s | % copy BW |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (dt, n, B, T), im in common.index_rows(rows).items():
        f = im.get("fused", {})
        lines.append(f"| {n} | {B}×{T} | {f_ms(med(im, 'fused'))} | {f_ms(med(im, 'eager'))} | "
                     f"{f_ms(med(im, 'compile'))} | {f_ms(med(im, 'loop'))} | {f_x(sp(im, 'eager'))} | "
                     f"{f_x(sp(im, 'compile'))} | {f_x(sp(im, 'loop'))} | {float(f.get('gbps') or 0):.3g} | "
                     f"{common.fmt_pct(f.get('frac_copy_bw'))} |")
    notes = sorted({f"- {r['impl']} n={r['n']} {r['B']}×{r['T']}: {r['reason']}" for r in rows
                    if r.get("status") != "ok" and r["impl"] == "compile" and r.get("reason")})
    md = common.section_header(
        args, "gae", "`multi_gae` forward, float32, bool mask; `loop` = baselines.gae_python_loop (TRL/verl's "
        "per-timestep loop); GB/s = gae.nbytes (rewards, values, mask read; advantages, returns "
        "written) / median time.")
    md += lines + [""]
    loops = [float(sp(im, "loop")) for (dt, n, B, T), im in common.index_rows(rows).items() if T == 1024 and sp(im, "loop")]
    if loops:
        md.append(f"- target ≥ 200× the per-timestep loop at T = 1024: worst {min(loops):.0f}× "
                  f"({'met' if min(loops) >= 200 else 'NOT met'})")
    if notes:
        md += ["", "compile notes:", ""] + notes[:12]
    common.write_section(args, "gae", rows, md + [""])
    common.plot_rates(args, rows, "gae", "multi_gae fwd", ["eager", "compile", "loop"])


if __name__ == "__main__":
    sys.exit(child_main())
