"""Cost of data parallelism in the fused policy and value losses (gloo on CPU, nccl on GPU).

For each size, k ranks each hold B/k rows and time, in lockstep (a fixed number of calls, so every
rank makes the same collectives):

  shard        the op on the rank's shard without a group (the work of one rank, no collectives)
  group        the same shard with ``group=WORLD`` (global statistics: all-gather + 2 all-reduces
               for the policy loss, 2 all-reduces for the value loss)
  whole batch  (rank 0, the others wait) one process holding all B rows

Forward + backward, median and p20/p80 over the repeats, milliseconds. The collective overhead is
``group - shard``; the scaling against one process is ``whole / group``.

usage: python -m pama_ext.benchmarks.distributed [--world 2] [--repeats 20] [--device cpu]
       (or pama-ext bench distributed ...)
Writes <out>/bench_distributed_<device>.csv and .md (default out: benchmarks/results/).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch

from .common import (PACKAGE_PARENT, RESULTS_DIR, TimingPlan, device_description, make_policy_inputs, time_fn,
                     write_csv, write_text)

SIZES = [(16, 512, 2), (32, 1024, 4), (64, 1024, 4), (64, 2048, 8)]  # (B global, T, n)


def _bench_rank(rank: int, world: int, init: str, out: str, repeats: int, device_name: str, sizes) -> None:
    import torch.distributed as dist

    import pama_ext

    torch.set_num_threads(1)
    device = torch.device(device_name if device_name == "cpu" else f"cuda:{rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{init}", rank=rank,
                            world_size=world)
    group = dist.group.WORLD
    plan = TimingPlan(warmup=2, min_repeats=repeats, max_repeats=repeats, budget_s=0.0)
    rows = []
    for B, T, n in sizes:
        sets = [make_policy_inputs(n, B, T, seed=s, device=device) for s in range(2)]
        for s, x in enumerate(sets):  # value-loss inputs: heads' values and returns of the same shape
            g = torch.Generator().manual_seed(100 + s)
            x["values"] = torch.randn(x["advantages"].shape, generator=g).to(device)
            x["returns"] = x["values"] + 0.3 * torch.randn(x["advantages"].shape, generator=g).to(device)
        per = B // world
        shards = [{k: (v[:, rank * per:(rank + 1) * per] if v.dim() == 3 else v[rank * per:(rank + 1) * per])
                   for k, v in x.items()} for x in sets]

        def step(x, g):
            logp = x["logp"].detach().requires_grad_(True)
            values = x["values"].detach().requires_grad_(True)
            loss, _ = pama_ext.pama_policy_loss(logp, x["old_logp"], x["advantages"], x["mask"], group=g,
                                                check_finite=False)
            vloss, _ = pama_ext.multi_value_loss(values, x["values"], x["returns"], x["mask"], group=g,
                                                 check_finite=False)
            (loss + vloss).backward()

        t_shard = time_fn(lambda i: step(shards[i % 2], None), 2, plan, device)
        t_group = time_fn(lambda i: step(shards[i % 2], group), 2, plan, device)
        dist.barrier()
        t_whole = time_fn(lambda i: step(sets[i % 2], None), 2, plan, device) if rank == 0 else None
        dist.barrier()
        if rank == 0:
            for name, t in (("shard", t_shard), ("group", t_group), ("whole batch", t_whole)):
                rows.append(dict(world=world, B=B, T=T, n=n, impl=name, median_ms=t.median_ms, p20_ms=t.p20_ms,
                                 p80_ms=t.p80_ms, repeats=t.repeats))
    if rank == 0:
        torch.save({"rows": rows, "device": device_description(device)}, os.path.join(out, "rows.pt"))
    dist.destroy_process_group()


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--world", type=int, default=2, help="ranks (processes)")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per measurement")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=RESULTS_DIR, help=f"output folder (default {RESULTS_DIR})")
    ap.add_argument("--quick", action="store_true", help="smoke run: the smallest size only")
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--init", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rank-out", default=None, help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> int:
    return run(add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0])).parse_args(argv))


def run(a) -> int:
    sizes = SIZES[:1] if a.quick else SIZES
    if a.rank is not None:
        _bench_rank(a.rank, a.world, a.init, a.rank_out, a.repeats, a.device, sizes)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        # the ranks import the same pama_ext as this process
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p))
        cmd = [sys.executable, "-m", "pama_ext.benchmarks.distributed", "--world", str(a.world), "--repeats",
               str(a.repeats), "--device", a.device, "--init", os.path.join(tmp, "init"), "--rank-out", tmp]
        cmd += ["--quick"] if a.quick else []
        procs = [subprocess.Popen(cmd + ["--rank", str(r)], env=env) for r in range(a.world)]
        if any(p.wait() != 0 for p in procs):
            raise SystemExit("bench_distributed: a rank failed")
        res = torch.load(os.path.join(tmp, "rows.pt"))
    rows, device = res["rows"], res["device"]
    path = write_csv(rows, "bench_distributed", a.device, a.out)
    by = {(r["B"], r["T"], r["n"], r["impl"]): r for r in rows}
    lines = [f"Device: {device}; {a.world} ranks (gloo on CPU, nccl on GPU), 1 thread each; policy + value "
             f"loss forward+backward, median ms (p20-p80).", "",
             "| B×T (global), n | shard (no group) | group | collective overhead | whole batch, 1 process | "
             "whole / group |", "|---|---|---|---|---|---|"]
    for B, T, n in sizes:
        s, g, w = (by[(B, T, n, k)] for k in ("shard", "group", "whole batch"))
        fmt = lambda r: f"{r['median_ms']:.2f} ({r['p20_ms']:.2f}-{r['p80_ms']:.2f})"  # noqa: E731
        lines.append(f"| {B}×{T}, {n} | {fmt(s)} | {fmt(g)} | {g['median_ms'] - s['median_ms']:+.2f} | {fmt(w)} | "
                     f"{w['median_ms'] / g['median_ms']:.2f}× |")
    md = "\n".join(lines) + "\n"
    write_text(os.path.join(a.out, f"bench_distributed_{a.device}.md"), md)
    print(md)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
