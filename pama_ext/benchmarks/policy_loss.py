"""Policy loss family: ``pama_policy_loss`` forward + ``loss.backward()`` on ``logp``.

Implementations: ``fused`` (pama_ext.ops), ``eager`` and ``compile`` (baselines.py); the GPU suite adds
``fused_checked`` (the default check_finite=True; ``fused`` there passes check_finite=False). At n = 1,
bench_ops.py also times the options under which the op is the plain PPO loss
(baselines.PLAIN_PPO_OPTIONS): ``fused_ppo`` (the op with them), ``ppo_eager`` and ``ppo_compile``
(baselines.plain_ppo_loss eagerly and under torch.compile).

* :func:`run_point`: one (n, B, T) of bench_ops.py's sweep (float mask by default, a fresh static
  compile per shape).
* :func:`section`: bench_gpu.py's ``policy_loss`` section (float32 and bfloat16, bool mask, one
  dynamic compile per dtype, bandwidth targets, plot).
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional

import torch

from pama_ext import ops

from . import baselines, common

IMPLS = ["fused", "eager", "compile", "fused_ppo", "ppo_eager", "ppo_compile"]  # bench_ops.py
PPO_IMPLS = ("fused_ppo", "ppo_eager", "ppo_compile")  # n = 1 only
GPU_IMPLS = ["fused", "fused_checked", "eager", "compile"]  # bench_gpu.py

PL_SIZES = [(16, 512), (64, 1024), (64, 4096), (64, 8192), (128, 8192), (256, 8192)]
PL_NS = [1, 2, 4, 8]
PL_DTYPES = ["float32", "bfloat16"]
QUICK_PL_SIZES = [(16, 512), (64, 4096), (128, 8192)]
QUICK_PL_NS = [2, 8]
COMPILE_MIN_TOKENS = 2 ** 18  # the compile target applies from here; smaller sizes are not compiled


def nbytes(n: int, B: int, T: int, elt: int, mask_elt: int, single_pass: bool = True) -> int:
    """What the fused kernels read and write, pass by pass (docs/kernels.md §4, §10), default options
    (pama / token, whitening). CPU (``single_pass``): the moments pass reads mask + advantages; the
    loss pass mask, advantages, logp, old_logp (and computes the indicator statistics and the
    finite checks on the way) and writes the gradient coefficient dlogp (accumulation dtype: 8 bytes
    for fp64, else 4; not a_tilde, which the entry point does not ask for); the backward (the op's
    autograd) reads dlogp and writes grad.
    CUDA (``single_pass=False``): a separate indicator pass (mask, advantages, logp, old_logp) before
    the loss pass. Inputs are counted as if every token were masked in."""
    bt = B * T
    acc = 8 if elt == 8 else 4
    indicators = 0 if single_pass else bt * (mask_elt + n * elt + 2 * elt)
    fwd = bt * (mask_elt + n * elt) + indicators + bt * (mask_elt + n * elt + 2 * elt) + bt * acc
    bwd = bt * acc + bt * elt
    return fwd + bwd


# The passes of the fused CPU op (forward + backward, default options) and what forces them.
PASSES = (
    "fused (CPU): moments (mask, advantages) -> loss (mask, advantages, logp, old_logp; the indicator "
    "statistics, the token counts and the check_finite flags on the way; writes the gradient "
    "coefficient dlogp) -> backward (dlogp; writes grad). The whitening moments are needed before any "
    "token's loss, so the advantages are read twice; without whitening (e.g. the plain-PPO options) the "
    "forward is one pass. Method 'linear' and pama/token only: sequence / batch / Gram weights need the "
    "indicators in a pass of their own before the loss. a_tilde (Ã) is written only for callers that ask "
    "for it (return_a_tilde: pama_policy_loss_backward's, the fused output layer), not by the entry point."
)


def min_nbytes(n: int, B: int, T: int, elt: int, mask_elt: int) -> int:
    """What the op must minimally move (see PASSES), which the CPU kernels now move: forward
    2 x (mask + advantages) + logp + old_logp read, dlogp (accumulation dtype) written; backward
    dlogp read, grad written."""
    return nbytes(n, B, T, elt, mask_elt, single_pass=True)


def runner(loss_fn, sets):
    """fn(i): forward + backward of ``loss_fn`` on input set i (fresh logp.grad each call)."""
    def fn(i):
        x = sets[i]
        x["logp"].grad = None
        loss = loss_fn(x["logp"], x["old_logp"], x["advantages"], x["mask"])[0]
        loss.backward()
    return fn


def max_err(fused, sets) -> float:
    """Largest absolute difference of ``fused`` vs the eager reference (loss and gradient) on set 0."""
    x = sets[0]
    return common.max_abs_err_fwd_bwd(
        *[lambda f=f: f(x["logp"], x["old_logp"], x["advantages"], x["mask"])[0]
          for f in (fused, baselines.EAGER["policy_loss"])], leaves=[x["logp"]])


def run_point(n, B, T, args, device, plan, state: Dict, bar) -> Dict[str, Dict]:
    """bench_ops.py: fused / eager / compile at one (n, B, T)."""
    n_sets, sets = common.input_sets(common.make_policy_inputs, n, B, T, args, device)
    if args.no_compile:
        compile_skip: Optional[str] = "--no-compile"
    elif args.quick and (B, T) != args.sizes[0]:
        compile_skip = "--quick: compiled at the smallest size only"
    else:
        compile_skip = None
    out: Dict[str, Dict] = {}
    err = max_err(ops.pama_policy_loss, sets)
    bar.set_postfix_str(f"policy_loss n={n} {B}x{T} fused")
    out["fused"] = common.timed_row(runner(ops.pama_policy_loss, sets), n_sets, plan, device)
    out["fused"]["max_abs_err_vs_eager"] = err
    bar.set_postfix_str(f"policy_loss n={n} {B}x{T} eager")
    out["eager"] = common.timed_row(runner(baselines.EAGER["policy_loss"], sets), n_sets, plan, device)
    if compile_skip is not None:
        out["compile"] = common.skipped(compile_skip)
    else:
        bar.set_postfix_str(f"policy_loss n={n} {B}x{T} compile")
        torch._dynamo.reset()  # fresh compile per shape; also keeps clear of the recompile limit
        out["compile"] = common.compiled_row(runner(baselines.compiled("policy_loss"), sets), n_sets, plan, device)
    if n != 1:
        out.update({impl: common.skipped("the plain PPO loss has one objective (n = 1 only)") for impl in PPO_IMPLS})
        return out
    fused_ppo = functools.partial(ops.pama_policy_loss, **baselines.PLAIN_PPO_OPTIONS)
    x = sets[0]
    ppo_err = common.max_abs_err_fwd_bwd(
        *[lambda f=f: f(x["logp"], x["old_logp"], x["advantages"], x["mask"])[0]
          for f in (fused_ppo, baselines.plain_ppo_loss)], leaves=[x["logp"]])
    bar.set_postfix_str(f"policy_loss n={n} {B}x{T} plain PPO")
    out["fused_ppo"] = common.timed_row(runner(fused_ppo, sets), n_sets, plan, device)
    out["fused_ppo"]["max_abs_err_vs_eager"] = ppo_err
    out["ppo_eager"] = common.timed_row(runner(baselines.plain_ppo_loss, sets), n_sets, plan, device)
    if compile_skip is not None:
        out["ppo_compile"] = common.skipped(compile_skip)
    else:
        torch._dynamo.reset()
        out["ppo_compile"] = common.compiled_row(runner(torch.compile(baselines.plain_ppo_loss, dynamic=False), sets),
                                                 n_sets, plan, device)
    return out


# ------------------------------------------------------------------------------------------------
# the GPU suite's section
# ------------------------------------------------------------------------------------------------
def gpu_sets(n, B, T, dtype, device, seed):
    """Input sets with a bool mask; one set only where a set is far larger than any cache (do_bench
    flushes L2 before every call)."""
    probe_bytes = (2 + n) * B * T * torch.empty((), dtype=dtype).element_size() + B * T
    n_sets = common.num_input_sets(probe_bytes, lo=1 if probe_bytes >= 2 ** 27 else 3)
    sets = [common.make_policy_inputs(n, B, T, seed + s, device, dtype, torch.bool) for s in range(n_sets)]
    return n_sets, sets


def section(args, device, budget) -> None:
    sizes = args.pl_sizes or (QUICK_PL_SIZES if args.quick else PL_SIZES)
    ns = args.ns or (QUICK_PL_NS if args.quick else PL_NS)
    dtypes = args.dtypes or PL_DTYPES
    plan = args.plan
    bar = common.Progress()
    fused = functools.partial(ops.pama_policy_loss, check_finite=False)
    # dynamic shapes: one compile serves every B, T, n of a dtype (dynamo specialises n = 1 apart);
    # --static-compile: dynamic=False and a fresh compile per shape, as bench_ops does on the CPU
    compiled_policy = baselines.compiled("policy_loss", dynamic=not args.static_compile)
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    rows: List[Dict[str, object]] = []
    for dname in dtypes:
        dtype = getattr(torch, dname)
        elt = torch.empty((), dtype=dtype).element_size()
        for (B, T) in sizes:
            for n in ns:
                base = {"op": "policy_loss", "n": n, "B": B, "T": T, "tokens": B * T, "dtype": dname}
                if budget.over():
                    rows += [dict(base, impl=i, **common.skipped(budget.reason())) for i in GPU_IMPLS]
                    continue
                n_sets, sets = gpu_sets(n, B, T, dtype, device, args.seed)
                res: Dict[str, Dict] = {}
                err = max_err(fused, sets)  # correctness once per shape: fused vs eager (loss and gradient)
                bar.set_postfix_str(f"policy_loss {dname} n={n} {B}x{T}")
                res["fused"] = common.timed_row(runner(fused, sets), n_sets, plan, device)
                res["fused"]["max_abs_err_vs_eager"] = err
                res["fused_checked"] = common.timed_row(runner(ops.pama_policy_loss, sets), n_sets, plan, device)
                res["eager"] = common.timed_row(runner(baselines.EAGER["policy_loss"], sets), n_sets, plan, device)
                if args.no_compile:
                    res["compile"] = common.skipped("--no-compile")
                elif args.static_compile and B * T < COMPILE_MIN_TOKENS:
                    res["compile"] = common.skipped(f"tokens < {COMPILE_MIN_TOKENS} (static compile per shape "
                                                    "costs time; the compile target applies from 2^18)")
                else:
                    try:
                        if args.static_compile:
                            torch._dynamo.reset()
                        # compiles (or recompiles) forward and backward when needed
                        res["compile"] = common.compiled_row(runner(compiled_policy, sets), n_sets, plan, device)
                    except Exception as e:  # noqa: BLE001 - a failed compile is a result, not a crash
                        res["compile"] = {"status": "error", "reason": f"{type(e).__name__}: {str(e)[:200]}"}
                common.append_rows(rows, base, res, GPU_IMPLS, nbytes(n, B, T, elt, 1, single_pass=False),
                                   args.copy_bw)
                del sets
                rows = common.order_columns(rows)
                common.write_csv(rows, "bench_gpu_policy_loss", args.tag, args.out)
    md = common.section_header(
        args, "policy_loss", "`pama_policy_loss` forward + backward (pama / token, Noon, whitening, dual clip 3), "
        "bool mask. GB/s = policy_loss.nbytes (the kernels' traffic pass by pass: 3ne + 5e + 3m + 2a "
        "bytes per token, see benchmarks/README.md) / median time. "
        "`fused` passes check_finite=False (no host sync); `checked` is the default check_finite=True. "
        f"`compile`: torch.compile(baselines.reference_policy_loss_flat, "
        f"dynamic={not args.static_compile}){'' if args.static_compile else ', compiled once per dtype for all shapes'}.")
    md += [table(rows), ""]
    md += targets(rows)
    common.write_section(args, "policy_loss", rows, md)
    common.plot_rates(args, rows, "policy_loss", "pama_policy_loss fwd+bwd", ["eager", "compile"])


def table(rows) -> str:
    f_ms, f_x, med, sp = common.fmt_ms, common.fmt_ratio, common.ok_median, common.ok_speedup
    head = ("| dtype | n | B×T | fused ms | checked ms | eager ms | compile ms | eager/fused | compile/fused | "
            "fused GB/s | % copy BW | peak MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (dt, n, B, T), im in common.index_rows(rows).items():
        f = im.get("fused", {})
        lines.append(
            f"| {dt} | {n} | {B}×{T} | {f_ms(med(im, 'fused'))} | {f_ms(med(im, 'fused_checked'))} | "
            f"{f_ms(med(im, 'eager'))} | {f_ms(med(im, 'compile'))} | {f_x(sp(im, 'eager'))} | "
            f"{f_x(sp(im, 'compile'))} | {float(f.get('gbps') or 0):.3g} | {common.fmt_pct(f.get('frac_copy_bw'))} | "
            f"{f_ms(f.get('peak_mem_mb'))} |")
    return "\n".join(lines)


def targets(rows) -> List[str]:
    idx = common.index_rows(rows)
    big = [im for (dt, n, B, T), im in idx.items() if B * T >= 2 ** 20 and "fused" in im
           and im["fused"].get("status") == "ok"]
    mid = [im for (dt, n, B, T), im in idx.items() if B * T >= 2 ** 18 and "fused" in im
           and im["fused"].get("status") == "ok"]
    out = ["Targets (issue 4):", ""]
    if big:
        worst = min(float(im["fused"]["frac_copy_bw"]) for im in big)
        out.append(f"- ≥ 80% of copy bandwidth at ≥ 2^20 tokens: worst {100 * worst:.0f}% "
                   f"({'met' if worst >= 0.8 else 'NOT met'})")
    for impl, goal in (("eager", 5.0), ("compile", 1.5)):
        sps = [float(common.ok_speedup(im, impl)) for im in mid if common.ok_speedup(im, impl) is not None]
        if sps:
            out.append(f"- ≥ {goal}× {impl} at ≥ 2^18 tokens: worst {min(sps):.2f}× "
                       f"({'met' if min(sps) >= goal else 'NOT met'}) over {len(sps)} configs")
    return out + [""]
