"""Value loss family: ``multi_value_loss`` (n clipped value heads) forward + ``loss.backward()`` on the
values, in bench_ops.py's sweep: ``fused`` (pama_ext.ops), ``eager`` (the reference), ``compile``
(torch.compile of baselines.reference_value_loss_flat)."""
from __future__ import annotations

from typing import Dict

import torch

from pama_ext import ops

from . import baselines, common

IMPLS = ["fused", "eager", "compile"]


def nbytes(n: int, B: int, T: int, elt: int, mask_elt: int) -> int:
    """Forward: values, old_values, returns and mask read; backward: the same read again and the
    gradient of the values written. The minimal traffic of the two passes; the CPU kernels move
    exactly this with a bool or float32 mask (another mask dtype adds its conversion to bool)."""
    return 7 * n * B * T * elt + 2 * B * T * mask_elt


def make_inputs(n, B, T, seed, device, dtype, mask_dtype) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(n, B, T, generator=g)
    values = old + 0.3 * torch.randn(n, B, T, generator=g)  # some beyond the clip range
    returns = old + torch.randn(n, B, T, generator=g)
    return {"values": values.to(device=device, dtype=dtype).requires_grad_(True),
            "old_values": old.to(device=device, dtype=dtype), "returns": returns.to(device=device, dtype=dtype),
            "mask": common.make_mask(B, T, seed + 7919, device, mask_dtype)}


def runner(loss_fn, sets):
    def fn(i):
        x = sets[i]
        x["values"].grad = None
        loss_fn(x["values"], x["old_values"], x["returns"], x["mask"])[0].backward()
    return fn


def run_point(n, B, T, args, device, plan, state: Dict, bar) -> Dict[str, Dict]:
    n_sets, sets = common.input_sets(make_inputs, n, B, T, args, device)
    x = sets[0]
    err = common.max_abs_err_fwd_bwd(
        *[lambda f=f: f(x["values"], x["old_values"], x["returns"], x["mask"])[0]
          for f in (ops.multi_value_loss, baselines.EAGER["value_loss"])], leaves=[x["values"]])
    return common.fused_eager_compile(f"value_loss n={n} {B}x{T}", lambda f: runner(f, sets), ops.multi_value_loss,
                                      baselines.EAGER["value_loss"], lambda: baselines.compiled("value_loss"),
                                      n_sets, args, B, T, device, plan, bar, err)
