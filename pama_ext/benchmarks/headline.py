"""Headline: one weighting step of PAMA (objective_stats + pareto_weights on the advantages) vs
full-gradient MGDA (n backward passes of per-objective PPO losses through a random GPT-2-shaped model,
flattened gradients, Gram in fp32, the reference Frank-Wolfe solver), n ∈ {2, 4, 8}: time, peak memory,
and one ordinary backward pass for scale. bench_gpu.py's ``headline`` section.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Tuple

import torch

from pama_ext import ops

from . import baselines, common
from .models import LM, VOCAB

HEADLINE_NS = [2, 4, 8]
HEADLINE_BT = (8, 512)
CPU_HEADLINE_BT = (4, 128)  # one 124M backward of 4 x 144 tokens is seconds on a few cores


def flat_gram_fp32(flat: torch.Tensor, chunk: int = 1 << 24) -> torch.Tensor:
    """G = flat @ flat.T accumulated in float32 over column chunks (flat: [n, d], any float dtype)."""
    n, d = flat.shape
    G = torch.zeros(n, n, dtype=torch.float32, device=flat.device)
    for s in range(0, d, chunk):
        c = flat[:, s:s + chunk].float()
        G.addmm_(c, c.t())
    return G


@contextlib.contextmanager
def oom_guard(row: Dict[str, object]):
    """Records an out-of-memory error in ``row`` (status oom) instead of raising it."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        row.update(status="oom", reason=str(e).splitlines()[0][:200])
        torch.cuda.empty_cache()
    except RuntimeError as e:  # the CPU allocator's out-of-memory error (--cpu)
        if "alloc" not in str(e):
            raise
        row.update(status="oom", reason=str(e).splitlines()[0][:200])


def section(args, device, budget) -> None:
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
            lm = LM(mname, args.model_specs[mname], device, args.seed)
        except torch.cuda.OutOfMemoryError as e:
            rows.append({"model": mname, "status": "oom", "reason": str(e)[:200]})
            continue
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, VOCAB, (B, P + T), generator=g).to(device)
        mask = common.make_mask(B, T, args.seed, device, torch.bool)
        logp, _ = lm.token_logp(ids, T)  # one forward; its graph is reused (retain_graph) by every backward
        old_logp = (logp.detach() + 0.05 * torch.randn(B, T, generator=g).to(device)).contiguous()
        info = {"model": mname, "impl": lm.impl, "params_M": lm.n_params / 1e6, "model_dtype": common.dtype_name(lm.dtype),
                "B": B, "T": T}
        for n in ns:
            if budget.over():
                rows.append(dict(info, n=n, method="mgda_full", status="skipped", reason=budget.reason()))
                continue
            print(f"  .. headline {mname} n={n}", flush=True)
            adv = (torch.randn(n, B, T, generator=g) * (0.5 + torch.rand(n, 1, 1, generator=g))).to(device)
            losses = baselines.plain_ppo_losses(logp, old_logp, adv, mask)
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
                return baselines.reference_mgda_weights(flat_gram_fp32(flat).double())

            def one_backward():
                return torch.autograd.grad(total, lm.params, retain_graph=True)

            r = dict(info, n=n, method="pama", status="ok")
            t = common.event_time(pama_step, 3, 20)
            r.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                     peak_mem_mb=common.peak_memory_mb(pama_step, device))
            rows.append(r)
            r = dict(info, n=n, method="mgda_full", status="ok")
            with oom_guard(r):
                flat_holder["flat"] = torch.empty(n, lm.n_params, dtype=lm.dtype, device=device)
                t = common.event_time(mgda_step, 1, args.headline_repeats)
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
            with oom_guard(r):
                t = common.event_time(one_backward, 1, args.headline_repeats)
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
        qms = common.fmt_ms(q.get("median_ms")) if q.get("status") == "ok" else q.get("status", "—")
        lines.append(f"| {m} ({p.get('model_dtype', q.get('model_dtype', ''))}) | {float(p.get('params_M', 0)):.0f}M | "
                     f"{n} | {common.fmt_ms(p.get('median_ms'))} | {qms} | {common.fmt_ratio(ratio)} | "
                     f"{common.fmt_ms(p.get('peak_mem_mb'))} | {common.fmt_ms(q.get('peak_mem_mb'))} | {common.fmt_ms(o.get('median_ms'))} |")
    impl = next((r["impl"] for r in rows if r.get("impl")), "?")
    md = common.section_header(args, "headline", f"One weighting step on a B×T = {B}×{T} batch (16 prompt tokens before the T "
                 "response tokens). PAMA = objective_stats + pareto_weights (pama / token) on the advantages "
                 "[n, B, T]; MGDA = n backward passes of per-objective PPO losses (pama_policy_loss, linear, "
                 "n = 1 each) through the model with retain_graph, flattened into an n×d buffer (model dtype), "
                 "Gram in fp32, Frank-Wolfe (pama_ext.reference.mgda_weights). Peak MB = " + (
                     "peak allocated during the step above what was allocated before it (model, activations)"
                     if device.type == "cuda" else "peak resident set during the step above the resident set "
                     "before it (model, activations)") + f". Model: {impl}, random init; "
                 "`one backward` = the single backward PPO does anyway, for scale.")
    md += lines + [""]
    common.write_section(args, "headline", rows, md)
    plot(args, by)


def plot(args, by) -> None:
    if args.no_plot or not by:
        return
    plt = common.pyplot()
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
    common.save_figure(plt, fig, args, "headline")


