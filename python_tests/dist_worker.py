"""One rank of the data-parallel tests (test_distributed.py spawns world_size of these).

Every rank builds the same global batch, takes its shard of rows, runs every case with
``group=WORLD`` (gloo, CPU) and saves loss, metrics and the gradient w.r.t. its shard. The test then
compares the concatenated shards with one process holding the whole batch. The cases, the batch and
the shards are defined here once and imported by the test.

usage: python dist_worker.py RANK WORLD_SIZE INIT_FILE OUT_DIR
"""
from __future__ import annotations

import itertools
import os
import sys
from typing import Dict, List, Tuple

import torch

N_OBJ = 3
B, T = 11, 13
# Uneven shards (row ranges). With 3 ranks the middle shard holds only fully masked rows.
SHARDS: Dict[int, List[Tuple[int, int]]] = {
    2: [(0, 4), (4, 11)],
    3: [(0, 3), (3, 5), (5, 11)],
}
MASKED_ROWS = (3, 4, 8)  # rows with no valid token in the global batch

POLICY_CASES = [
    dict(method=m, granularity=g, agg=a, noon=True, whiten=True, dtype="float64")
    for (m, g), a in itertools.product(
        [("pama", "token"), ("pama", "sequence"), ("pama", "batch"), ("linear", "token"), ("mgda", "token")],
        ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"],
    )
] + [
    dict(method="pama", granularity="batch", agg="token-mean", noon=False, whiten=True, dtype="float64"),
    dict(method="linear", granularity="token", agg="token-mean", noon=False, whiten=False, dtype="float64"),
    dict(method="pama", granularity="sequence", agg="token-mean", noon=True, whiten=False, dtype="float64"),
    dict(method="pama", granularity="token", agg="token-mean", noon=True, whiten=True, dtype="float64",
         beta_loss=0.1),
    dict(method="mgda", granularity="token", agg="seq-mean-token-mean", noon=True, whiten=True, dtype="float64",
         prefs=True),
    dict(method="pama", granularity="token", agg="token-mean", noon=True, whiten=True, dtype="float32"),
    dict(method="mgda", granularity="token", agg="seq-mean-token-mean", noon=True, whiten=True,
         dtype="float32"),
]
VALUE_CASES = [dict(agg=a, dtype="float64") for a in ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]]
VALUE_CASES += [dict(agg="token-mean", dtype="float32")]
STATS_CASES = [dict(whiten=w, noon=nn, dtype="float64") for w in (True, False) for nn in (True, False)]


def make_batch(dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """The global batch: every rank and the single-process reference build the same one."""
    g = torch.Generator().manual_seed(1234)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.int32)
    mask[list(MASKED_ROWS)] = 0
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    batch = dict(
        mask=mask,
        old_logp=old,
        logp=old + 0.3 * r(B, T),
        ref_logp=old + 0.2 * r(B, T),
        advantages=r(N_OBJ, B, T) * torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)[:, None, None] + 0.7,
        values=r(N_OBJ, B, T),
        old_values=r(N_OBJ, B, T),
        returns=r(N_OBJ, B, T),
        prefs=torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
    )
    return {k: (v if k == "mask" else v.to(dtype)) for k, v in batch.items()}


def shard(batch: Dict[str, torch.Tensor], lo: int, hi: int) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in batch.items():
        if k == "prefs":
            out[k] = v
        elif v.dim() == 3:
            out[k] = v[:, lo:hi].contiguous()
        else:
            out[k] = v[lo:hi].contiguous()
    return out


def run_policy(case: dict, b: Dict[str, torch.Tensor], group=None):
    import pama_ext

    logp = b["logp"].clone().requires_grad_(True)
    loss, metrics = pama_ext.pama_policy_loss(
        logp, b["old_logp"], b["advantages"], b["mask"], b["ref_logp"],
        method=case["method"], granularity=case["granularity"], agg=case["agg"], noon=case["noon"],
        whiten=case["whiten"], beta_loss=case.get("beta_loss", 0.0),
        prefs=b["prefs"] if case.get("prefs") else None, group=group,
    )
    loss.backward()
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, logp.grad


def run_value(case: dict, b: Dict[str, torch.Tensor], group=None):
    import pama_ext

    values = b["values"].clone().requires_grad_(True)
    loss, metrics = pama_ext.multi_value_loss(
        values, b["old_values"], b["returns"], b["mask"], clip=0.2, agg=case["agg"], group=group
    )
    loss.backward()
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, values.grad


def run_stats(case: dict, b: Dict[str, torch.Tensor], group=None):
    import pama_ext

    return pama_ext.objective_stats(
        b["advantages"], b["logp"], b["old_logp"], b["mask"], whiten=case["whiten"], noon=case["noon"], group=group
    )


def run_modules(b: Dict[str, torch.Tensor], group):
    """The nn.Module front ends with group= (compared with POLICY_CASES[0] and VALUE_CASES[0])."""
    import pama_ext

    pl, _ = pama_ext.PamaPolicyLoss(method="pama", granularity="token", group=group)(
        b["logp"], b["old_logp"], b["advantages"], b["mask"]
    )
    vl, _ = pama_ext.MultiValueLoss(clip=0.2, group=group)(b["values"], b["old_values"], b["returns"], b["mask"])
    return pl.detach(), vl.detach()


def main() -> None:
    rank, world, init_file, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    group = dist.group.WORLD
    lo, hi = SHARDS[world][rank]
    batches = {name: shard(make_batch(getattr(torch, name)), lo, hi) for name in ("float64", "float32")}
    results = {
        "policy": [run_policy(c, batches[c["dtype"]], group) for c in POLICY_CASES],
        "value": [run_value(c, batches[c["dtype"]], group) for c in VALUE_CASES],
        "stats": [run_stats(c, batches[c["dtype"]], group) for c in STATS_CASES],
        "modules": run_modules(batches["float64"], group),
    }
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
