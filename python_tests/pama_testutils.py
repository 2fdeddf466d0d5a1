"""Shared helpers of the pama_ext test suite: seeded input factory and the tolerance rule.

Kept out of conftest.py so that test modules can import it by name (pytest puts this directory
on sys.path because python_tests/ is not a package).
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Sequence

import pytest
import torch

from pama_ext import ops, reference as ref_impl

REQUIRE_CUDA = os.environ.get("PAMA_EXT_REQUIRE_CUDA", "") == "1"
REQUIRE_NATIVE = os.environ.get("PAMA_EXT_REQUIRE_NATIVE", "") == "1"



def all_finite(x) -> bool:
    """True when every float in a nest of dicts, lists and tuples (e.g. metrics rows) is finite."""
    if isinstance(x, dict):
        return all(all_finite(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return all(all_finite(v) for v in x)
    if isinstance(x, float):
        return math.isfinite(x)
    return True


def run_ranks(argv: Sequence[Sequence[str]], env: Dict[str, str], cwd: Optional[str] = None,
              timeout: float = 600) -> List[str]:
    """Start one process per rank (``argv[r]``, run with this Python) together, wait for all, and return
    their outputs; a rank that fails or a timeout (every rank killed) fails the test with the output."""
    procs = [subprocess.Popen([sys.executable, *a], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for a in argv]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("distributed workers timed out")
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} failed:\n{out[-6000:]}"
    return outs


def native_available() -> bool:
    import pama_ext

    return bool(getattr(pama_ext, "NATIVE_AVAILABLE", False))


def require_native() -> None:
    """Skip a test that needs the compiled library when it is absent (fail under
    PAMA_EXT_REQUIRE_NATIVE=1)."""
    if not native_available():
        if REQUIRE_NATIVE:
            pytest.fail("PAMA_EXT_REQUIRE_NATIVE=1 but the compiled pama_ext library is not loaded")
        pytest.skip("compiled pama_ext library not built (pure-Python fallback in use)")


def cuda_kernels_present() -> bool:
    """CUDA usable by the ops: a GPU, and (when the library is compiled) CUDA kernels in it."""
    if not torch.cuda.is_available():
        return False
    import pama_ext

    has = getattr(getattr(pama_ext, "ops", None), "has_cuda_kernels", None)
    if native_available() and callable(has):
        return bool(has())
    return True


def resolve_device(name: str) -> str:
    """'cpu', or 'cuda' when usable; otherwise skip (fail under PAMA_EXT_REQUIRE_CUDA=1)."""
    if name == "cuda":
        reason = None
        if not torch.cuda.is_available():
            reason = "no CUDA device available"
        elif not cuda_kernels_present():
            reason = "pama_ext was built without CUDA kernels"
        if reason is not None:
            if REQUIRE_CUDA:
                pytest.fail(f"PAMA_EXT_REQUIRE_CUDA=1 but {reason}")
            pytest.skip(reason)
    return name


LOWP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: absolute floor of the tolerance rule, per kernel dtype (docs/algorithms.md: kernels accumulate in float32)
FLOORS = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}
#: float64 kernels against the float64 reference: both accumulate in double, only the order of
#: the additions differs (and Chan vs two-pass variance), so agreement is ~1e-14 relative.
F64_RTOL = 1e-7
F64_ATOL = 1e-9

# shapes of the grids: odd sizes, a single token, a long row
SHAPES = [(3, 47), (1, 1), (5, 130)]
NS = [1, 2, 3, 8]
#: (method, granularity) pairs of the policy-loss grids: pama at every granularity, and every other
#: method (which ignores the granularity) at each granularity for linear / mgda, at batch for the
#: Gram methods added later (cagrad, raco, pcgrad).
COMBOS = [(m, g) for m in ("pama", "linear", "mgda") for g in ("token", "sequence", "batch")] + \
    [(m, "batch") for m in ("cagrad", "raco", "pcgrad")]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of losses/metrics/statistics for inputs of ``dtype`` (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# input factory
# ----------------------------------------------------------------------------------------------
def make_mask(B: int, T: int, gen: torch.Generator, kind: str = "random") -> torch.Tensor:
    """bool [B, T] mask.

    random: prefix masks (response masks) with random lengths, row 0 full and row 1 empty when
            B >= 3, so every grid point with B >= 3 has an empty row;
    holes:  Bernoulli(0.7) masks with holes (masked positions inside a row) and an empty row;
    full / empty: all ones / all zeros.
    """
    if kind == "full":
        return torch.ones(B, T, dtype=torch.bool)
    if kind == "empty":
        return torch.zeros(B, T, dtype=torch.bool)
    if kind == "random":
        lengths = torch.randint(0, T + 1, (B,), generator=gen)
        if B >= 3:
            lengths[0] = T
            lengths[1] = 0
        elif B == 1:
            lengths[0] = max(int(lengths[0]), 1)
        return torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    if kind == "holes":
        m = torch.rand(B, T, generator=gen) < 0.7
        if B >= 2:
            m[B // 2] = False
        return m
    raise ValueError(kind)


@dataclass
class Inputs:
    scores: torch.Tensor  # [n, B]
    logp: torch.Tensor  # [B, T]
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    advantages: torch.Tensor  # [n, B, T]
    rewards: torch.Tensor
    values: torch.Tensor
    old_values: torch.Tensor
    returns: torch.Tensor
    mask: torch.Tensor  # bool [B, T]

    def to(self, dtype: Optional[torch.dtype] = None, device=None) -> "Inputs":
        out = {}
        for f in fields(self):
            x = getattr(self, f.name)
            if f.name == "mask":
                out[f.name] = x.to(device) if device is not None else x.clone()
            else:
                out[f.name] = x.to(dtype=dtype or x.dtype, device=device).clone()
        return Inputs(**out)

    def as64(self) -> "Inputs":
        """The same values (after rounding to the working dtype) in float64 on the CPU."""
        return self.to(torch.float64, "cpu")

    def dict(self) -> Dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def make_inputs(
    n: int,
    B: int,
    T: int,
    *,
    dtype: torch.dtype = torch.float64,
    device="cpu",
    seed: int = 0,
    mask: str = "random",
) -> Inputs:
    """Seeded random inputs, drawn in float64 on the CPU and then rounded to ``dtype``.

    logp ~ -|N(1, 0.5)|, old_logp = logp + N(0, 0.1), ref_logp = logp + N(0, 0.1),
    advantages/rewards/values ~ N(0, 1), old_values = values + N(0, 0.3) (so the value clip at 0.2
    is active on part of the tokens), returns = values + N(0, 1), scores ~ N(0, 1).
    """
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=f64)

    logp = -(1.0 + 0.5 * randn(B, T)).abs()
    old_logp = logp + 0.1 * randn(B, T)
    ref_logp = logp + 0.1 * randn(B, T)
    values = randn(n, B, T)
    inp = Inputs(
        scores=randn(n, B),
        logp=logp,
        old_logp=old_logp,
        ref_logp=ref_logp,
        advantages=randn(n, B, T),
        rewards=randn(n, B, T),
        values=values,
        old_values=values + 0.3 * randn(n, B, T),
        returns=values + randn(n, B, T),
        mask=make_mask(B, T, g, mask),
    )
    return inp.to(dtype, device)


# ----------------------------------------------------------------------------------------------
# comparison with the reference (DESIGN.md tolerance rule)
# ----------------------------------------------------------------------------------------------
def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to("cpu", torch.float64)


def assert_close_f64(name: str, out: torch.Tensor, ref: torch.Tensor,
                     rtol: float = F64_RTOL, atol: float = F64_ATOL) -> None:
    assert tuple(out.shape) == tuple(ref.shape), f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    torch.testing.assert_close(
        _f64(out), _f64(ref), rtol=rtol, atol=atol, equal_nan=False,
        msg=lambda m: f"{name}: kernel vs float64 reference\n{m}",
    )


def assert_tolerance_rule(
    name: str,
    out: torch.Tensor,
    ref64: torch.Tensor,
    ref_lowp: torch.Tensor,
    dtype: torch.dtype,
) -> None:
    """max|out - ref64| <= 2 * max|ref_lowp - ref64| + floor(dtype)   (flash-attention's rule).

    ``ref64`` is the reference run in float64 on the very same (rounded) inputs, ``ref_lowp`` the
    reference run in ``dtype``. If the reference itself breaks down in ``dtype`` (non-finite
    output), its error carries no information and a conservative bound of 8 ulp of the largest
    reference value is used instead.
    """
    assert tuple(out.shape) == tuple(ref64.shape), f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    o, r, rl = _f64(out), _f64(ref64), _f64(ref_lowp)
    assert torch.isfinite(r).all(), f"{name}: the float64 reference is not finite (test input bug)"
    assert torch.isfinite(o).all(), f"{name}: kernel output has non-finite entries: {o}"
    if o.numel() == 0:
        return
    err = (o - r).abs().max().item()
    ref_err = (rl - r).abs().max().item()
    if not (ref_err == ref_err and ref_err != float("inf")):
        ref_err = 8 * torch.finfo(dtype).eps * r.abs().max().item()
    bound = 2 * ref_err + FLOORS[dtype]
    assert err <= bound, (
        f"{name} [{dtype}]: max|kernel - ref64| = {err:.3e} > 2 * max|ref_{dtype} - ref64| "
        f"({ref_err:.3e}) + floor {FLOORS[dtype]:.0e} = {bound:.3e}"
    )


def compare(name, out, ref64, ref_lowp=None, dtype=torch.float64):
    if dtype == torch.float64:
        assert_close_f64(name, out, ref64)
    else:
        assert_tolerance_rule(name, out, ref64, ref_lowp, dtype)


METRIC_KEYS = ("pg_loss", "kl_loss", "clipfrac", "approx_kl", "active", "abar", "pos", "weights")


# ----------------------------------------------------------------------------------------------
# shared by the per-op test files (test_token_rewards.py, test_gae.py, test_stats.py,
# test_policy_loss.py, test_value_loss.py) and the cross-op checks
# ----------------------------------------------------------------------------------------------
F64 = torch.float64
# gradcheck (float64, CPU)
GC = dict(eps=1e-6, atol=1e-7, rtol=1e-5)
IMPLS = {"ops": ops, "reference": ref_impl}
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def compare_all(got: dict, want64: dict, want_lowp: dict = None, dtype=F64, skip=()):
    assert set(want64) <= set(got), f"missing outputs: {set(want64) - set(got)}"
    for k, w in want64.items():
        if k in skip:
            continue
        g = got[k]
        assert g is not None, f"{k}: no gradient from the kernel"
        compare(k, g, w, None if want_lowp is None else want_lowp[k], dtype)


def check_dtypes(got: dict, dtype, device, acc_keys=(), io_keys=()):
    for k in acc_keys:
        assert got[k].dtype == acc_dtype(dtype), f"{k}: dtype {got[k].dtype}, want {acc_dtype(dtype)}"
        assert got[k].device.type == torch.device(device).type, f"{k} on {got[k].device}"
    for k in io_keys:
        assert got[k].dtype == dtype, f"{k}: dtype {got[k].dtype}, want {dtype}"
        assert got[k].device.type == torch.device(device).type, f"{k} on {got[k].device}"


def make_prefs(n, dtype=F64):
    return torch.linspace(1.0, 2.0, n, dtype=dtype) / n  # not uniform, not summing to 1


def widen_ratio(x, scale=0.3, seed=1):
    """logp further from old_logp, so both PPO clips (and the dual clip) are exercised."""
    g = torch.Generator().manual_seed(seed)
    x.logp = (x.old_logp.double() + scale * torch.randn(x.logp.shape, generator=g, dtype=F64)).to(x.logp.dtype)
    return x


# ----------------------------------------------------------------------------------------------
# vanilla PPO, written from verl's compute_policy_loss / agg_loss
# ----------------------------------------------------------------------------------------------
def verl_agg(loss_mat, mask, agg):
    m = mask.to(loss_mat.dtype)
    if agg == "token-mean":
        return (loss_mat * m).sum() / m.sum()
    keep = m.sum(-1) > 0  # CHOICE of algorithms §4: empty rows are not sequences
    if agg == "seq-mean-token-mean":
        per_seq = (loss_mat * m).sum(-1)[keep] / m.sum(-1)[keep]
    else:
        per_seq = (loss_mat * m).sum(-1)[keep]
    return per_seq.mean()


def odd_mask(mask: torch.Tensor, mask_dtype: torch.dtype) -> torch.Tensor:
    """The bool ``mask`` as ``mask_dtype`` with the values a nonzero-is-in rule must get right: a
    floating mask has NaN, -2 and 0.5 on three masked-in places and -0.0 on a masked-out one (in, in,
    in, out, as ``to(bool)``), an integer mask 7 for in."""
    m = mask.to(mask_dtype)
    if mask_dtype.is_floating_point:
        on, off = mask.nonzero(), (~mask).nonzero()
        m[tuple(on[0])], m[tuple(on[1])], m[tuple(on[2])] = float("nan"), -2.0, 0.5
        m[tuple(off[0])] = -0.0
    else:
        m[mask] = 7
    return m


def nonempty_mask(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    return torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)


# ----------------------------------------------------------------------------------------------
# simplex grids
# ----------------------------------------------------------------------------------------------
def simplex_grid(n: int, steps: int) -> torch.Tensor:
    """All points of the simplex with coordinates in {0, 1/steps, ..., 1} ([P, n], float64)."""
    if n == 1:
        return torch.ones(1, 1, dtype=F64)
    if n == 2:
        a = torch.linspace(0, 1, steps + 1, dtype=F64)
        return torch.stack([a, 1 - a], 1)
    if n == 3:
        i, j = torch.meshgrid(torch.arange(steps + 1), torch.arange(steps + 1), indexing="ij")
        keep = (i + j) <= steps
        i, j = i[keep].to(F64), j[keep].to(F64)
        return torch.stack([i, j, steps - i - j], 1) / steps
    raise NotImplementedError


def assert_on_simplex(c: torch.Tensor, tol: float = 1e-12):
    assert (c >= -tol).all(), c
    assert abs(c.sum().item() - 1.0) <= tol * max(1, c.numel()), c


# ----------------------------------------------------------------------------------------------
# statistics, aggregation and the policy loss against loops written from algorithms §3/§4
# ----------------------------------------------------------------------------------------------
def spec_stats(adv, logp, old_logp, mask, eps_hi, whiten, noon):
    """Per-token loops of algorithms §3 (n, B, T small). Returns dict of float lists/tensors."""
    n, B, T = adv.shape
    toks = [(b, t) for b in range(B) for t in range(T) if mask[b, t]]
    cnt = len(toks)
    mean, var = [], []
    for i in range(n):
        xs = [adv[i, b, t].item() for b, t in toks]
        mu = sum(xs) / cnt if cnt else 0.0
        v = sum((x - mu) ** 2 for x in xs) / (cnt - 1) if cnt > 1 else 0.0
        mean.append(mu)
        var.append(v)

    def N(i, b, t):
        a = adv[i, b, t].item()
        if whiten:
            a = (a - mean[i]) / math.sqrt(var[i] + 1e-8)
        return max(a, 0.0) if noon else a

    def ind(b, t):
        u = math.exp(min(max(logp[b, t].item() - old_logp[b, t].item(), -20), 20))
        return 1.0 if u <= 1 + eps_hi else 0.0

    Nv = torch.zeros(n, B, T, dtype=F64)
    I = torch.zeros(n, B, T, dtype=F64)
    for b in range(B):
        for t in range(T):
            for i in range(n):
                Nv[i, b, t] = N(i, b, t)
                I[i, b, t] = Nv[i, b, t] * ind(b, t)
    den = max(cnt, 1)
    abar = [sum(I[i, b, t].item() for b, t in toks) / den for i in range(n)]
    pos = [sum(1.0 for b, t in toks if Nv[i, b, t] > 0) / den for i in range(n)]
    gram = [[sum(I[i, b, t].item() * I[j, b, t].item() for b, t in toks) / den for j in range(n)] for i in range(n)]
    return dict(count=cnt, mean=mean, var=var, N=Nv, I=I, abar=abar, pos=pos, gram=gram, toks=toks)


def thm1_loop(v):
    """Theorem 1 written from algorithms §4 with ties shared uniformly: (c list, s)."""
    n = len(v)
    mn, mx = min(v), max(v)
    jmin = [i for i in range(n) if v[i] == mn]
    jmax = [i for i in range(n) if v[i] == mx]
    c = [0.0] * n
    if mn > 0:
        w_min, s = 1.0, mn
    elif mx < 0:
        w_min, s = 0.0, mx
    else:
        w_min, s = (mx / (mx - mn) if mx > mn else 0.0), 0.0
    for i in jmin:
        c[i] += w_min / len(jmin)
    for i in jmax:
        c[i] += (1 - w_min) / len(jmax)
    return c, s


ERRORS = (RuntimeError, ValueError)


# ----------------------------------------------------------------------------------------------
# scalar options and the KL loss
# ----------------------------------------------------------------------------------------------
BAD_UNIT = [-0.1, 1.5, float("nan"), float("inf")]


BAD_NONNEG = [-0.1, float("nan"), float("inf")]


def names_arg(msg: str, arg: str) -> bool:
    """``arg`` appears as a word of its own ("logp" does not match inside "old_logp")."""
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(arg)}(?![A-Za-z0-9_])", msg) is not None


def expect_error(arg: str, fn, *args, **kwargs):
    with pytest.raises(ERRORS) as ei:
        fn(*args, **kwargs)
    msg = str(ei.value)
    assert names_arg(msg, arg), f"error message does not name {arg!r}: {msg!r}"
    return msg


def bad_input_batch(device, n=3, B=4, T=11, dtype=F64, mask="holes", seed=0):
    return make_inputs(n, B, T, seed=seed, mask=mask).to(dtype, device)


def dpo_config(world_cache: str, output_dir: str, **kw):
    """A validated DPOConfig of the pama_ext.dpo step tests: the tiny world, a few short sampled pairs, no plots,
    no saved model; ``kw`` overrides."""
    from pama_ext.dpo.config import DPOConfig

    d = dict(model="tiny", data="tiny", tiny_world_cache=world_cache, steps=2, batch_size=4, micro_batch_size=2,
             pool_prompts=6, responses_per_prompt=3, max_new_tokens=8, max_response_tokens=12, eval_size=3,
             eval_samples=1, output_dir=str(output_dir), progress=False, log_every=0, plots=False,
             save_model=False, lr=1e-2, tie_margin=0.0)
    d.update(kw)
    return DPOConfig(**d).validate()


def dpo_world(cfg):
    """(world, judges, tokenizer, frozen reference, pairs) of a preference-trainer config on the tiny world: what
    the pama_ext.dpo step tests share (imports the LM stack only when called)."""
    from pama_ext.dpo.train import load_data, prepare_world
    from pama_ext.lm.hf import load_lm, load_tokenizer
    from pama_ext.lm.policy import frozen_copy
    from pama_ext.lm.rewards import build_objectives

    world = prepare_world(cfg)
    judges = build_objectives(cfg)
    tok = load_tokenizer(world["model_path"])
    ref = frozen_copy(load_lm(world["model_path"], "cpu"))
    return world, judges, tok, ref, load_data(cfg, world, ref, tok, judges)


def dpo_policy(world):
    """A fresh trainable policy (one value head) from the world's model."""
    from pama_ext.lm.hf import load_lm
    from pama_ext.lm.policy import PolicyWithValueHeads

    return PolicyWithValueHeads(load_lm(world["model_path"], "cpu"), 1)
