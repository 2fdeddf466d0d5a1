"""Token rewards family: ``token_rewards`` forward (sequence scores onto each row's last token, minus the
per-token KL penalty), in bench_ops.py's sweep: ``fused`` (pama_ext.ops), ``eager`` (the reference),
``compile`` (torch.compile of the reference)."""
from __future__ import annotations

from typing import Dict

import torch

from pama_ext import ops

from . import baselines, common

IMPLS = ["fused", "eager", "compile"]
BETA_KL = 0.05


def nbytes(n: int, B: int, T: int, elt: int, mask_elt: int) -> int:
    """scores [n, B], old_logp, ref_logp and mask read; the rewards [n, B, T] written."""
    return n * B * elt + 2 * B * T * elt + B * T * mask_elt + n * B * T * elt


def make_inputs(n, B, T, seed, device, dtype, mask_dtype) -> Dict[str, torch.Tensor]:
    x = common.make_policy_inputs(n, B, T, seed, device, dtype, mask_dtype)
    g = torch.Generator().manual_seed(seed + 1)
    return {"scores": torch.randn(n, B, generator=g).to(device=device, dtype=dtype),
            "old_logp": x["old_logp"], "ref_logp": x["logp"].detach(), "mask": x["mask"]}


def runner(fn_, sets):
    def fn(i):
        x = sets[i]
        return fn_(x["scores"], x["old_logp"], x["ref_logp"], x["mask"], BETA_KL)
    return fn


def run_point(n, B, T, args, device, plan, state: Dict, bar) -> Dict[str, Dict]:
    n_sets, sets = common.input_sets(make_inputs, n, B, T, args, device)
    err = float((runner(ops.token_rewards, sets)(0) - runner(baselines.EAGER["token_rewards"], sets)(0)).abs().max())
    with torch.no_grad():
        return common.fused_eager_compile(f"token_rewards n={n} {B}x{T}", lambda f: runner(f, sets),
                                          ops.token_rewards, baselines.EAGER["token_rewards"],
                                          lambda: baselines.compiled("token_rewards"), n_sets, args, B, T, device,
                                          plan, bar, err)
