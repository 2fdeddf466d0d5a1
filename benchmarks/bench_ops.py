"""Benchmark of the fused ops against the reference, torch.compile(reference) and a Python loop.

Ops and implementations compared in one run, per (n, B, T) of the sweep:

* ``policy_loss`` (``pama_policy_loss`` forward + ``loss.backward()`` on ``logp``):
  ``fused`` (pama_ext.ops), ``eager`` (pama_ext.reference), ``compile``
  (``torch.compile(reference, dynamic=False)``, compiled once per shape).
* ``gae`` (``multi_gae`` forward): ``fused``, ``eager``, ``compile`` (time-boxed, in a child
  process: the reference loops over T in Python, so dynamo unrolls T steps), and ``loop``, a
  per-timestep, per-objective Python loop the way TRL / verl write GAE.

Writes ``<out>/bench_ops_<device>.csv`` (one row per op, n, B, T, impl), ``bench_ops_<device>.md``
(the table printed at the end, with the device) and ``bench_ops_<device>.png`` (plot_ops.py).

    python benchmarks/bench_ops.py                 # full sweep on CPU
    python benchmarks/bench_ops.py --quick --out /tmp/bench   # CI smoke run (< 60 s)
    python benchmarks/bench_ops.py --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py)

from pama_ext import NATIVE_AVAILABLE, ops, reference  # noqa: E402
from pama_ext.reference import METRIC_SCALARS  # noqa: E402

SIZES: List[Tuple[int, int]] = [(8, 256), (16, 512), (32, 1024), (64, 1024), (64, 2048)]
NS = [2, 4, 8]
QUICK_SIZES = [(8, 256), (16, 512)]
QUICK_NS = [2]
GAMMA, LAM = 1.0, 0.95
IMPLS = {"policy_loss": ["fused", "eager", "compile"], "gae": ["fused", "eager", "compile", "loop"]}


# ------------------------------------------------------------------------------------------------
# implementations
# ------------------------------------------------------------------------------------------------
def gae_python_loop(rewards, values, mask, gamma: float, lam: float):
    """GAE as TRL's PPO trainer / verl write it: for each objective separately, a Python loop
    over t in reverse on ``[B]`` slices, then ``torch.stack``.

    NOTE: like TRL, this loop does not skip masked positions (the reference and the fused op
    carry ``nextvalues``/``lastgaelam`` over masked tokens); its outputs therefore differ from
    theirs on rows with masked tokens. It is a speed baseline only, and is not checked.
    """
    del mask
    n, B, T = values.shape
    per_objective = []
    for i in range(n):
        lastgaelam = 0.0
        advantages_reversed = []
        for t in reversed(range(T)):
            nextvalues = values[i, :, t + 1] if t < T - 1 else 0.0
            delta = rewards[i, :, t] + gamma * nextvalues - values[i, :, t]
            lastgaelam = delta + gamma * lam * lastgaelam
            advantages_reversed.append(lastgaelam)
        per_objective.append(torch.stack(advantages_reversed[::-1], dim=1))
    advantages = torch.stack(per_objective)
    return advantages, advantages + values


def reference_policy_loss_flat(logp, old_logp, advantages, mask):
    """reference.pama_policy_loss with the metrics packed into one new tensor (as the fused op
    returns them), for torch.compile.

    Why not return the metrics dict: with torch 2.13, when the compiled graph returns both
    ``loss`` and ``metrics["pg_loss"]`` (= ``pg_loss.detach()``, which aliases ``loss`` when
    ``beta_loss == 0``), the returned ``loss`` comes back without a grad_fn. Packing the metrics
    into a fresh tensor avoids the alias and computes the same values.
    """
    loss, m = reference.pama_policy_loss(logp, old_logp, advantages, mask)
    flat = torch.cat([torch.stack([m[k] for k in METRIC_SCALARS]), m["abar"], m["pos"], m["weights"]])
    return loss, flat


# ------------------------------------------------------------------------------------------------
# bytes moved (the traffic of the fused algorithm; the same count is used for every impl)
# ------------------------------------------------------------------------------------------------
def policy_runner(loss_fn, sets):
    """fn(i): forward + backward of ``loss_fn`` on input set i (fresh logp.grad each call)."""
    def fn(i):
        x = sets[i]
        x["logp"].grad = None
        loss = loss_fn(x["logp"], x["old_logp"], x["advantages"], x["mask"])[0]
        loss.backward()
    return fn


def policy_loss_bytes(n: int, B: int, T: int, elt: int, mask_elt: int) -> int:
    """What the fused kernels read and write, pass by pass (docs/kernels.md §4). Forward: the
    moments pass reads mask + advantages; the indicator pass mask, advantages, logp, old_logp; the
    loss pass the same and writes a_tilde (accumulation dtype: 8 bytes for fp64, else 4). Backward:
    logp, old_logp, mask, a_tilde read, grad written. Inputs are counted as if every token were
    masked in (the kernels skip the loads of masked-out tokens, so this is an upper bound)."""
    bt = B * T
    acc = 8 if elt == 8 else 4
    fwd = bt * (4 * elt + 3 * mask_elt) + 3 * n * bt * elt + bt * acc
    bwd = bt * (2 * elt + mask_elt + acc) + bt * elt
    return fwd + bwd


def gae_bytes(n: int, B: int, T: int, elt: int, mask_elt: int) -> int:
    """rewards, values and mask read; advantages and returns written."""
    return 4 * n * B * T * elt + B * T * mask_elt


# ------------------------------------------------------------------------------------------------
# per-op runners: each returns {impl: row fields}
# ------------------------------------------------------------------------------------------------
def _plan_for(args) -> common.TimingPlan:
    if args.quick:
        return common.TimingPlan(warmup=1, min_repeats=3, max_repeats=10, budget_s=0.15)
    return common.TimingPlan(warmup=2, min_repeats=5, max_repeats=args.max_repeats, budget_s=args.budget)


def _timed_row(fn, n_sets, plan, device) -> Dict[str, object]:
    t = common.time_fn(fn, n_sets, plan, device)
    row = {"status": "ok", "reason": "", "median_ms": t.median_ms, "p20_ms": t.p20_ms,
           "p80_ms": t.p80_ms, "repeats": t.repeats}
    # device memory only: a CPU resident-set peak of these small calls says nothing
    row["peak_mem_mb"] = common.peak_memory_mb(lambda: fn(0), device) if device.type == "cuda" else None
    return row


def _skipped(reason: str) -> Dict[str, object]:
    return {"status": "skipped", "reason": reason}


def run_policy_loss(n, B, T, args, device, plan, compile_ok: Optional[str], bar) -> Dict[str, Dict]:
    dtype, mdt = args.dtype, args.mask_dtype
    probe = common.make_policy_inputs(n, B, T, 0, device, dtype, mdt)
    n_sets = common.num_input_sets(common.tensor_bytes(*probe.values()))
    sets = [common.make_policy_inputs(n, B, T, args.seed + s, device, dtype, mdt) for s in range(n_sets)]

    def runner(loss_fn):
        return policy_runner(loss_fn, sets)

    out: Dict[str, Dict] = {}
    # correctness check once per shape: fused vs eager (loss and gradient)
    x = sets[0]
    grads = []
    losses = []
    for f in (ops.pama_policy_loss, reference.pama_policy_loss):
        x["logp"].grad = None
        loss = f(x["logp"], x["old_logp"], x["advantages"], x["mask"])[0]
        loss.backward()
        losses.append(loss.detach().clone())
        grads.append(x["logp"].grad.clone())
    err = max(float((losses[0] - losses[1]).abs()), float((grads[0] - grads[1]).abs().max()))

    bar.set_postfix_str(f"policy_loss n={n} {B}x{T} fused")
    out["fused"] = _timed_row(runner(ops.pama_policy_loss), n_sets, plan, device)
    out["fused"]["max_abs_err_vs_eager"] = err
    bar.set_postfix_str(f"policy_loss n={n} {B}x{T} eager")
    out["eager"] = _timed_row(runner(reference.pama_policy_loss), n_sets, plan, device)
    if compile_ok is not None:
        out["compile"] = _skipped(compile_ok)
    else:
        bar.set_postfix_str(f"policy_loss n={n} {B}x{T} compile")
        torch._dynamo.reset()  # fresh compile per shape; also keeps clear of the recompile limit
        compiled = torch.compile(reference_policy_loss_flat, dynamic=False)
        fn = runner(compiled)
        t0 = time.perf_counter()
        fn(0)  # compiles forward and backward
        common.sync(device)
        compile_s = time.perf_counter() - t0
        out["compile"] = _timed_row(fn, n_sets, plan, device)
        out["compile"]["compile_s"] = compile_s
    return out


def _gae_sets(n, B, T, args, device):
    probe = common.make_gae_inputs(n, B, T, 0, device, args.dtype, args.mask_dtype)
    n_sets = common.num_input_sets(common.tensor_bytes(*probe.values()))
    sets = [common.make_gae_inputs(n, B, T, args.seed + s, device, args.dtype, args.mask_dtype) for s in range(n_sets)]
    return n_sets, sets


def _gae_runner(gae_fn, sets):
    def fn(i):
        x = sets[i]
        return gae_fn(x["rewards"], x["values"], x["mask"], GAMMA, LAM)
    return fn


def run_gae(n, B, T, args, device, plan, compile_state: Dict, bar) -> Dict[str, Dict]:
    n_sets, sets = _gae_sets(n, B, T, args, device)
    out: Dict[str, Dict] = {}
    x = sets[0]
    a_f, r_f = ops.multi_gae(x["rewards"], x["values"], x["mask"], GAMMA, LAM)
    a_e, r_e = reference.multi_gae(x["rewards"], x["values"], x["mask"], GAMMA, LAM)
    err = max(float((a_f - a_e).abs().max()), float((r_f - r_e).abs().max()))

    with torch.no_grad():
        bar.set_postfix_str(f"gae n={n} {B}x{T} fused")
        out["fused"] = _timed_row(_gae_runner(ops.multi_gae, sets), n_sets, plan, device)
        out["fused"]["max_abs_err_vs_eager"] = err
        bar.set_postfix_str(f"gae n={n} {B}x{T} eager")
        out["eager"] = _timed_row(_gae_runner(reference.multi_gae, sets), n_sets, plan, device)
        bar.set_postfix_str(f"gae n={n} {B}x{T} compile")
        out["compile"] = _gae_compile(n, B, T, args, compile_state)
        bar.set_postfix_str(f"gae n={n} {B}x{T} loop")
        out["loop"] = _timed_row(_gae_runner(gae_python_loop, sets), n_sets, plan, device)
    return out


def _gae_compile(n, B, T, args, state: Dict) -> Dict[str, object]:
    """torch.compile(reference.multi_gae), time-boxed in a child process (a compile cannot be
    interrupted in-process). A time-out at some T skips every later shape with T' >= T."""
    if args.no_compile:
        return _skipped("--no-compile")
    if args.quick:
        return _skipped("--quick: GAE compile not attempted (it unrolls the loop over T)")
    if T > args.gae_compile_max_t:
        return _skipped(
            f"T={T} > --gae-compile-max-t={args.gae_compile_max_t}: dynamo unrolls the reference's "
            f"Python loop over T, compile time grows with T"
        )
    if state.get("timed_out_T") is not None and T >= state["timed_out_T"]:
        return _skipped(
            f"compile timed out (> {args.compile_timeout:.0f} s) at T={state['timed_out_T']} "
            f"({state['timed_out_at']}); not attempted for T >= that (it unrolls the loop over T)"
        )
    cmd = [sys.executable, os.path.abspath(__file__), "--child-gae-compile", f"{n},{B},{T}",
           "--device", args.device, "--seed", str(args.seed), "--budget", str(args.budget),
           "--max-repeats", str(args.max_repeats), "--dtype", _dtype_name(args.dtype),
           "--mask-dtype", _dtype_name(args.mask_dtype), "--threads", str(torch.get_num_threads())]
    # own session, so that on a time-out the child and the compile workers it started go together
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=args.compile_timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        state["timed_out_T"] = T
        state["timed_out_at"] = f"n={n}, {B}x{T}"
        return _skipped(
            f"torch.compile did not finish within {args.compile_timeout:.0f} s at n={n}, {B}x{T} "
            f"(dynamo unrolls the reference's loop over T={T})"
        )
    for line in stdout.splitlines():
        if line.startswith("CHILD_RESULT "):
            return json.loads(line[len("CHILD_RESULT "):])
    tail = (stderr or stdout).strip().splitlines()[-1:] or ["no output"]
    return {"status": "error", "reason": f"compile child failed (rc={proc.returncode}): {tail[0][:200]}"}


def child_gae_compile(args) -> None:
    n, B, T = (int(v) for v in args.child_gae_compile.split(","))
    device = common.resolve_device(args.device)
    plan = _plan_for(args)
    n_sets, sets = _gae_sets(n, B, T, args, device)
    compiled = torch.compile(reference.multi_gae, dynamic=False)
    fn = _gae_runner(compiled, sets)
    with torch.no_grad():
        t0 = time.perf_counter()
        fn(0)
        common.sync(device)
        compile_s = time.perf_counter() - t0
        row = _timed_row(fn, n_sets, plan, device)
    row["compile_s"] = compile_s
    print("CHILD_RESULT " + json.dumps(row), flush=True)


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def _ms(v) -> str:
    if v is None or v == "":
        return "—"
    v = float(v)
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _ratio(v) -> str:
    if v is None or v == "":
        return "—"
    v = float(v)
    return f"{v:.1f}×" if v < 100 else f"{v:.0f}×"


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
        loop_ms = _ms(med("loop")) if op == "gae" else "n/a"
        loop_sp = _ratio(sp("loop")) if op == "gae" else "n/a"
        gbs = f"{float(f['gbps']):.2f}" if f.get("gbps") not in (None, "") else "—"
        frac = f"{100 * float(f['frac_copy_bw']):.0f}%" if f.get("frac_copy_bw") not in (None, "") else "—"
        lines.append(
            f"| {op} | {n} | {B}×{T} | {_ms(med('fused'))} | {_ms(med('eager'))} | {_ms(med('compile'))} | "
            f"{loop_ms} | {_ratio(sp('eager'))} | {_ratio(sp('compile'))} | {loop_sp} | {gbs} | {frac} |"
        )
    return "\n".join(lines)


def _load(la) -> str:
    return "/".join(f"{v:.2f}" for v in la)


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="CI smoke run: 2 sizes, n=2, few repeats")
    p.add_argument("--out", default=common.RESULTS_DIR, help="output folder (default benchmarks/results)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    p.add_argument("--ops", default="policy_loss,gae", help="comma list of ops (policy_loss, gae)")
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
    p.add_argument("--child-gae-compile", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    args.mask_dtype = getattr(torch, args.mask_dtype)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.child_gae_compile:
        child_gae_compile(args)
        return 0
    from tqdm import tqdm

    if not NATIVE_AVAILABLE:
        print("WARNING: pama_ext native library not loaded: 'fused' runs the reference fallback",
              file=sys.stderr)
    device = common.resolve_device(args.device)
    plan = _plan_for(args)
    sizes, ns = (QUICK_SIZES, QUICK_NS) if args.quick else (SIZES, NS)
    if args.sizes:
        sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    if args.ns:
        ns = [int(v) for v in args.ns.split(",")]
    op_list = [o.strip() for o in args.ops.split(",") if o.strip()]
    desc = common.device_description(device)
    load_start = os.getloadavg()
    copy_bw = common.copy_bandwidth_gbs(device, mbytes=64 if args.quick else 256)
    print(f"device: {desc}\ncopy bandwidth: {copy_bw:.1f} GB/s (read + write); load average {_load(load_start)}",
          flush=True)

    elt = torch.empty((), dtype=args.dtype).element_size()
    mask_elt = torch.empty((), dtype=args.mask_dtype).element_size()
    tasks = [(op, n, B, T) for op in op_list for (B, T) in sizes for n in ns]
    rows: List[Dict[str, object]] = []
    gae_compile_state: Dict = {}
    t_start = time.perf_counter()
    bar = tqdm(tasks, desc="bench_ops", unit="cfg", dynamic_ncols=True)
    for op, n, B, T in bar:
        if op == "policy_loss":
            if args.no_compile:
                skip = "--no-compile"
            elif args.quick and (B, T) != sizes[0]:
                skip = "--quick: compiled at the smallest size only"
            else:
                skip = None
            res = run_policy_loss(n, B, T, args, device, plan, skip, bar)
            nbytes = policy_loss_bytes(n, B, T, elt, mask_elt)
        elif op == "gae":
            res = run_gae(n, B, T, args, device, plan, gae_compile_state, bar)
            nbytes = gae_bytes(n, B, T, elt, mask_elt)
        else:
            raise SystemExit(f"--ops: unknown op {op!r}")
        fused_ms = res["fused"].get("median_ms")
        for impl in IMPLS[op]:
            r = res.get(impl, _skipped("not run"))
            row = {"op": op, "n": n, "B": B, "T": T, "tokens": B * T, "impl": impl,
                   "dtype": _dtype_name(args.dtype), **r}
            if r.get("status") == "ok":
                row["speedup_of_fused"] = r["median_ms"] / fused_ms
                row["bytes"] = nbytes
                row["gbps"] = nbytes / (r["median_ms"] * 1e-3) / 1e9
                row["frac_copy_bw"] = row["gbps"] / copy_bw
            rows.append(row)
        rows = _order_columns(rows)
        csv_path = common.write_csv(rows, "bench_ops", device.type, args.out)  # after every config
    bar.close()
    elapsed = time.perf_counter() - t_start

    table = markdown_table(rows)
    print()
    print(table)
    notes = sorted({f"- {r['op']} {r['impl']}: {r['reason']}" for r in rows if r.get("status") != "ok"})
    cmd = "python benchmarks/bench_ops.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = [
        f"# bench_ops ({device.type})",
        "",
        f"- device: {desc}",
        f"- copy bandwidth (measured, read + write of a {64 if args.quick else 256} MB copy): {copy_bw:.1f} GB/s",
        f"- load average (1/5/15 min) at start {_load(load_start)}, at end {_load(os.getloadavg())}"
        " (other processes on the machine disturb CPU timings, OpenMP regions most)",
        f"- dtype {_dtype_name(args.dtype)}, mask {_dtype_name(args.mask_dtype)}; gamma={GAMMA}, lam={LAM}",
        f"- command: `{cmd.strip()}` ({elapsed:.0f} s; {time.strftime('%Y-%m-%d %H:%M:%S')})",
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
            import plot_ops

            png = plot_ops.plot(csv_path, os.path.join(args.out, f"bench_ops_{device.type}.png"), title=desc)
            print(f"wrote {png}")
        except ImportError as e:
            print(f"plot skipped: {e}", file=sys.stderr)
    return 0


_COLUMNS = ["op", "n", "B", "T", "tokens", "impl", "dtype", "status", "median_ms", "p20_ms", "p80_ms",
            "repeats", "speedup_of_fused", "bytes", "gbps", "frac_copy_bw", "peak_mem_mb", "compile_s",
            "max_abs_err_vs_eager", "reason"]


def _order_columns(rows):
    out = []
    for r in rows:
        o = {k: r.get(k) for k in _COLUMNS}
        o.update({k: v for k, v in r.items() if k not in o})
        out.append(o)
    return out


if __name__ == "__main__":
    sys.exit(main())
