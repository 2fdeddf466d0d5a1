"""DPO loss family: ``multi_dpo_loss`` (n objectives' DPO losses on shared preference pairs) forward +
backward of the summed losses to the policy log-probs, in bench_ops.py's sweep: ``fused``
(pama_ext.multi_dpo_loss), ``eager`` (the reference), ``compile`` (torch.compile of the reference).
The op has no token axis: a sweep point B×T is B·T preference pairs."""
from __future__ import annotations

from typing import Dict

import torch

import pama_ext

from . import baselines, common

IMPLS = ["fused", "eager", "compile"]
BETA = 0.1


def nbytes(n: int, B: int, T: int, elt: int, mask_elt: int) -> int:
    """P = B·T pairs: four log-prob vectors and the labels [n, P] read, coef [n, P] written (fp32),
    read again by the backward, two gradients written (an estimate of the minimal traffic)."""
    P = B * T
    return 4 * P * elt + n * P * elt + 2 * n * P * 4 + 2 * P * elt


def make_inputs(n, B, T, seed, device, dtype, mask_dtype) -> Dict[str, torch.Tensor]:
    del mask_dtype
    P = B * T
    g = torch.Generator().manual_seed(seed)
    logps = [-(torch.rand(P, generator=g) * 50) for _ in range(4)]
    labels = torch.randint(-1, 2, (n, P), generator=g).to(dtype)
    t = {k: v.to(device=device, dtype=dtype) for k, v in zip(("pc", "pr", "rc", "rr"), logps)}
    t["pc"].requires_grad_(True)
    t["pr"].requires_grad_(True)
    t["labels"] = labels.to(device)
    return t


def runner(loss_fn, sets):
    def fn(i):
        x = sets[i]
        x["pc"].grad = x["pr"].grad = None
        loss_fn(x["pc"], x["pr"], x["rc"], x["rr"], x["labels"], BETA)[0].sum().backward()
    return fn


def run_point(n, B, T, args, device, plan, state: Dict, bar) -> Dict[str, Dict]:
    n_sets, sets = common.input_sets(make_inputs, n, B, T, args, device)
    x = sets[0]
    err = common.max_abs_err_fwd_bwd(
        *[lambda f=f: f(x["pc"], x["pr"], x["rc"], x["rr"], x["labels"], BETA)[0]
          for f in (pama_ext.multi_dpo_loss, baselines.EAGER["dpo_loss"])], leaves=[x["pc"], x["pr"]])
    return common.fused_eager_compile(f"dpo_loss n={n} {B}x{T}", lambda f: runner(f, sets), pama_ext.multi_dpo_loss,
                                      baselines.EAGER["dpo_loss"], lambda: baselines.compiled("dpo_loss"),
                                      n_sets, args, B, T, device, plan, bar, err)
