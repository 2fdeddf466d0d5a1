"""Argument checks of the ops, in Python, for the two ways a call can miss the compiled checks
(csrc/checks.h and the op bodies in csrc/ops.cpp, csrc/preference_ops.cpp):

- the reference fallback, used when pama_ext._C cannot be loaded: :mod:`pama_ext.ops` and
  :mod:`pama_ext.preference` run the ``*_args`` check of the op and :func:`finite` before calling
  :mod:`pama_ext.reference`, so the fallback raises the errors of the compiled path (same
  exception types, the argument named) and keeps ``check_finite`` (algorithms §9);
- the fake (meta) kernels: a call mixing a ``meta`` tensor with real ones dispatches to them and
  never reaches the compiled checks, so every fake kernel starts with :func:`same_device`.

The compiled ops keep their own checks (they guard the kernels' memory accesses and direct
``torch.ops.pama_ext`` calls); python_tests/test_bad_input.py runs every case on both paths.
Like the C++ checks these read shapes, dtypes and devices only; :func:`finite` alone reads values
(it is the fallback's ``check_finite``).
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import reference, vocab

__all__ = [
    "FLOAT_DTYPES",
    "MAX_OBJECTIVES",
    "same_device",
    "flat_grads_named",
    "finite",
    "token_rewards_args",
    "per_objective_values",
    "multi_gae_args",
    "moments_args",
    "stats_args",
    "pareto_weights_args",
    "policy_loss_args",
    "value_loss_args",
    "dpo_loss_args",
    "grad_table_args",
    "combine_args",
]

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
MAX_OBJECTIVES = vocab.MAX_OBJECTIVES

Named = Tuple[str, Optional[Tensor]]


def _fail(op: str, msg: str, exc=RuntimeError):
    raise exc(f"{op}: {msg}")


# dtypes as the compiled checks print them (c10::ScalarType names), so both paths say the same
_SCALAR_TYPE_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
    torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
    torch.complex32: "ComplexHalf",
}


def _dt(dtype: torch.dtype) -> str:
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype))


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


# ---- building blocks (the counterparts of csrc/checks.h) -----------------------------------
def defined(op: str, name: str, t) -> None:
    if not isinstance(t, Tensor):
        _fail(op, f"{name} must be a tensor, got {'None' if t is None else type(t).__name__}")


def floating(op: str, name: str, t) -> None:
    defined(op, name, t)
    if t.dtype not in FLOAT_DTYPES:
        _fail(op, f"{name} must be float32, float64, float16 or bfloat16, got {_dt(t.dtype)}")


def like(op: str, name: str, t, like_name: str, ref: Tensor) -> None:
    floating(op, name, t)
    if t.dtype != ref.dtype:
        _fail(op, f"{name} must have the dtype of {like_name} ({_dt(ref.dtype)}), got {_dt(t.dtype)}; all floating "
                  "inputs of one call share a dtype")
    device(op, name, t, like_name, ref)


def device(op: str, name: str, t: Tensor, like_name: str, ref: Tensor) -> None:
    if t.device != ref.device:
        _fail(op, f"{name} is on {t.device} but {like_name} is on {ref.device}")


def rank(op: str, name: str, t: Tensor, r: int, meaning: str) -> None:
    if t.dim() != r:
        _fail(op, f"{name} must be {r}-D {meaning}, got shape {_shape(t)}")


def shape(op: str, name: str, t: Tensor, expect: Sequence[int], meaning: str) -> None:
    if tuple(t.shape) != tuple(expect):
        _fail(op, f"{name} must have shape {meaning} = {list(expect)}, got {_shape(t)}")


def num_objectives(op: str, name: str, n: int) -> None:
    if not 1 <= n <= MAX_OBJECTIVES:
        _fail(op, f"{name} has n = {n} objectives; n must be in [1, {MAX_OBJECTIVES}]")


def mask_arg(op: str, mask, B: int, T: int, ref: Tensor, ref_name: str) -> None:
    defined(op, "mask", mask)
    shape(op, "mask", mask, (B, T), "[B, T]")
    device(op, "mask", mask, ref_name, ref)
    if mask.is_complex():
        _fail(op, f"mask must be bool or real, got {_dt(mask.dtype)}")


def unit_interval(op: str, name: str, v: float) -> None:
    if not (math.isfinite(v) and 0 <= v <= 1):
        _fail(op, f"{name} must be a finite number in [0, 1], got {v:g}", ValueError)


def nonneg_finite(op: str, name: str, v: float) -> None:
    if not (math.isfinite(v) and v >= 0):
        _fail(op, f"{name} must be finite and >= 0, got {v:g}", ValueError)


def choice(op: str, name: str, v: str, options: Sequence[str]) -> None:
    if v not in options:
        listed = ", ".join(f"'{o}'" for o in options)
        _fail(op, f"{name} must be one of {listed}, got '{v}'", ValueError)


def _flatten_named(pairs: Iterable[Tuple[str, object]]) -> List[Tuple[str, Tensor]]:
    out = []
    for name, t in pairs:
        if isinstance(t, Tensor):
            out.append((name, t))
        elif isinstance(t, (list, tuple)):
            out.extend((f"{name}[{k}]", g) for k, g in enumerate(t) if isinstance(g, Tensor))
    return out


def same_device(op: str, *pairs: Tuple[str, object]) -> None:
    """Every tensor of ``pairs`` (``(name, tensor, None or a list of tensors)``) on the device of
    the first one, else an error naming the first that is not."""
    named = _flatten_named(pairs)
    if not named:
        return
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            _fail(op, f"{name} is on {t.device} but {first_name} is on {first.device}; all tensors of one "
                      "call must be on one device")


def flat_grads_named(grads: Sequence[Optional[Tensor]], n: int) -> List[Named]:
    """The flat i-major gradient list of the compiled Gram ops as ``("grads[i][k]", g)`` pairs."""
    K = len(grads) // max(n, 1)
    return [(f"grads[{idx // K}][{idx % K}]", g) for idx, g in enumerate(grads)] if K else []


def finite(op: str, mask: Tensor, checks: Sequence[Named], prefs: Optional[Tensor] = None,
           variance: Optional[Tensor] = None, prefs_positive: bool = False) -> None:
    """``check_finite`` of the fallback (csrc/ops.cpp check_finite_all): NaN/Inf on a masked-in
    position of a ``[..., B, T]`` tensor, in argument order; then ``prefs`` (finite, >= 0, not all
    0; every entry > 0 with ``prefs_positive``, method 'pama') and ``variance`` (the whitening variances: +inf means the accumulation dtype overflowed).
    Reads values back to the host (as the compiled check does, once)."""
    m = mask != 0
    for name, t in checks:
        if t is not None and bool((~torch.isfinite(t) & m).any()):
            _fail(op, f"{name} has NaN or Inf on a masked-in position (pass check_finite=False to skip this "
                      "check)", ValueError)
    if prefs is not None:
        if not bool(torch.isfinite(prefs).all()):
            _fail(op, "prefs has NaN or Inf on a masked-in position (pass check_finite=False to skip this check)",
                  ValueError)
        if prefs_positive and bool((prefs <= 0).any()):
            _fail(op, "prefs must be > 0 for method 'pama' (the preference weights of the weighted Theorem 1 "
                      "divide by them), got a zero or negative entry (pass check_finite=False to skip this check)",
                  ValueError)
        if bool((prefs < 0).any()) or not bool(prefs.sum() > 0):
            _fail(op, "prefs must be >= 0 and not all 0 (the weights of method 'linear', used as given), got a "
                      "negative entry or all zeros (pass check_finite=False to skip this check)", ValueError)
    if variance is not None and not bool(torch.isfinite(variance).all()):
        _fail(op, f"advantages has a variance that overflows {_dt(variance.dtype)} (|advantages| around 1e19 or more), "
                  "so whitening would divide every advantage to 0; rescale the advantages or pass float64 inputs "
                  "(check_finite=False skips this check)", ValueError)


# ---- per op, in the order of the compiled checks --------------------------------------------
def token_rewards_args(scores, old_logp, ref_logp, mask, beta_kl) -> None:
    op = "token_rewards"
    floating(op, "old_logp", old_logp)
    rank(op, "old_logp", old_logp, 2, "[B, T]")
    B, T = old_logp.shape
    like(op, "scores", scores, "old_logp", old_logp)
    rank(op, "scores", scores, 2, "[n, B]")
    num_objectives(op, "scores", scores.shape[0])
    shape(op, "scores", scores, (scores.shape[0], B), "[n, B] (B from old_logp)")
    like(op, "ref_logp", ref_logp, "old_logp", old_logp)
    shape(op, "ref_logp", ref_logp, (B, T), "[B, T] (the shape of old_logp)")
    mask_arg(op, mask, B, T, old_logp, "old_logp")


def per_objective_values(op: str, values, **same_shape) -> None:
    """``values`` a floating [n, B, T] tensor, and each of ``same_shape`` (name -> tensor) like it
    (the order of the compiled checks: values first, then the others in argument order)."""
    floating(op, "values", values)
    rank(op, "values", values, 3, "[n, B, T]")
    num_objectives(op, "values", values.shape[0])
    for name, t in same_shape.items():
        like(op, name, t, "values", values)
        shape(op, name, t, values.shape, "[n, B, T] (the shape of values)")


def multi_gae_args(rewards, values, mask, gamma, lam) -> None:
    op = "multi_gae"
    per_objective_values(op, values, rewards=rewards)
    unit_interval(op, "gamma", float(gamma))
    unit_interval(op, "lam", float(lam))
    mask_arg(op, mask, values.shape[1], values.shape[2], values, "values")


def moments_args(advantages, mask) -> None:
    op = "objective_moments"
    floating(op, "advantages", advantages)
    rank(op, "advantages", advantages, 3, "[n, B, T]")
    num_objectives(op, "advantages", advantages.shape[0])
    mask_arg(op, mask, advantages.shape[1], advantages.shape[2], advantages, "advantages")


def _policy_inputs(op, logp, old_logp, advantages, mask, ref_logp=None) -> int:
    floating(op, "logp", logp)
    rank(op, "logp", logp, 2, "[B, T]")
    B, T = logp.shape
    like(op, "old_logp", old_logp, "logp", logp)
    shape(op, "old_logp", old_logp, (B, T), "[B, T] (the shape of logp)")
    like(op, "advantages", advantages, "logp", logp)
    rank(op, "advantages", advantages, 3, "[n, B, T]")
    n = advantages.shape[0]
    num_objectives(op, "advantages", n)
    shape(op, "advantages", advantages, (n, B, T), "[n, B, T]")
    mask_arg(op, mask, B, T, logp, "logp")
    if ref_logp is not None:
        like(op, "ref_logp", ref_logp, "logp", logp)
        shape(op, "ref_logp", ref_logp, (B, T), "[B, T] (the shape of logp)")
    return n


def stats_args(advantages, logp, old_logp, mask, eps_hi) -> None:
    op = "objective_stats"
    _policy_inputs(op, logp, old_logp, advantages, mask)
    nonneg_finite(op, "eps_hi", float(eps_hi))


def _prefs(op: str, prefs, n: int, ref: Tensor, ref_name: str) -> None:
    if prefs is None:
        return
    floating(op, "prefs", prefs)
    shape(op, "prefs", prefs, (n,), "[n]")
    if prefs.device != ref.device:
        _fail(op, f"prefs is on {prefs.device} but {ref_name} is on {ref.device}")


def method_arg(op: str, method: str, from_gram: bool) -> None:
    """csrc/checks.h parse_method: one of vocab.METHODS (vocab.GRAM_METHODS for an op on a Gram)."""
    options = vocab.GRAM_METHODS if from_gram else vocab.METHODS
    if method not in options:
        listed = ", ".join(f"'{o}'" for o in options)
        hint = " (pama needs the per-token statistics: use pareto_weights)" if method == "pama" else ""
        _fail(op, f"method must be one of {listed}, got '{method}'{hint}", ValueError)


def pareto_weights_args(stats, prefs, method, granularity, cagrad_c) -> None:
    op = "pareto_weights"
    floating(op, "stats", stats)
    rank(op, "stats", stats, 1, "[(n+3)^2 - 7] statistics vector")
    try:
        n = vocab.stats_num_objectives(stats.shape[0])
    except ValueError:
        _fail(op, f"stats must have (n+3)^2 - 7 entries for n objectives in [1, {vocab.MAX_OBJECTIVES}], "
                  f"got {stats.shape[0]}")
    method_arg(op, method, from_gram=False)
    nonneg_finite(op, "cagrad_c", float(cagrad_c))
    choice(op, "granularity", granularity, vocab.GRANULARITIES)
    _prefs(op, prefs, n, stats, "stats")


def policy_loss_args(logp, old_logp, advantages, mask, ref_logp, prefs, eps_lo, eps_hi, dual_clip, method,
                     granularity, agg, beta_loss, cagrad_c) -> None:
    op = "pama_policy_loss"
    n = _policy_inputs(op, logp, old_logp, advantages, mask, ref_logp)
    method_arg(op, method, from_gram=False)
    choice(op, "granularity", granularity, vocab.GRANULARITIES)
    choice(op, "agg", agg, vocab.AGG_MODES)
    nonneg_finite(op, "cagrad_c", float(cagrad_c))
    if not 0 <= eps_lo < 1:
        _fail(op, f"eps_lo must be in [0, 1), got {float(eps_lo):g}", ValueError)
    nonneg_finite(op, "eps_hi", float(eps_hi))
    if not dual_clip > 1:
        _fail(op, f"dual_clip must be > 1 (inf disables it), got {float(dual_clip):g}", ValueError)
    nonneg_finite(op, "beta_loss", float(beta_loss))
    if method == "pama" and granularity == "sequence" and prefs is not None:
        _fail(op, "prefs with method 'pama' needs granularity 'token' or 'batch' (the weighted Theorem 1, "
                  "algorithms §4b), got granularity 'sequence'", ValueError)
    if beta_loss != 0 and ref_logp is None:
        _fail(op, f"beta_loss = {float(beta_loss):g} > 0 needs ref_logp (the reference log-probs of the KL "
                  "loss), got None", ValueError)
    _prefs(op, prefs, n, logp, "logp")


def value_loss_args(values, old_values, returns, mask, clip, agg) -> None:
    op = "multi_value_loss"
    per_objective_values(op, values, old_values=old_values, returns=returns)
    mask_arg(op, mask, values.shape[1], values.shape[2], values, "values")
    choice(op, "agg", agg, vocab.AGG_MODES)
    if not clip >= 0:
        _fail(op, f"clip must be >= 0 (inf disables it), got {float(clip):g}", ValueError)


def _real(op: str, name: str, t, what: str) -> None:
    defined(op, name, t)
    if t.dtype == torch.bool or t.is_complex():
        _fail(op, f"{name} must have an integer or floating dtype ({what}), got {_dt(t.dtype)}")


def dpo_loss_args(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, labels, beta,
                  chosen_lengths, rejected_lengths) -> None:
    op = "multi_dpo_loss"
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    floating(op, "policy_chosen_logps", pc)
    if pc.dim() != 1:
        _fail(op, f"policy_chosen_logps must be 1-D [B] (summed log-probs per pair), got shape {_shape(pc)}")
    B = pc.shape[0]
    for name, t in (("policy_rejected_logps", pr), ("ref_chosen_logps", rc), ("ref_rejected_logps", rr)):
        floating(op, name, t)
        if t.dtype != pc.dtype:
            _fail(op, f"{name} must have the dtype of policy_chosen_logps ({_dt(pc.dtype)}), got {_dt(t.dtype)}")
        shape(op, name, t, (B,), "[B] (the shape of policy_chosen_logps)")
        device(op, name, t, "policy_chosen_logps", pc)
    _real(op, "labels", labels, "+1 chosen wins, -1 rejected wins, 0 tie")
    if labels.dim() != 2:
        _fail(op, f"labels must be 2-D [n, B], got shape {_shape(labels)}")
    num_objectives(op, "labels", labels.shape[0])
    shape(op, "labels", labels, (labels.shape[0], B), "[n, B] (B from policy_chosen_logps)")
    device(op, "labels", labels, "policy_chosen_logps", pc)
    if not (math.isfinite(beta) and beta > 0):
        _fail(op, f"beta must be finite and > 0, got {float(beta):g}", ValueError)
    for name, t in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if t is None:
            continue
        _real(op, name, t, "response lengths")
        shape(op, name, t, (B,), "[B]")
        device(op, name, t, "policy_chosen_logps", pc)


def grad_table_args(op: str, grads) -> Tuple[int, int, Optional[Tensor]]:
    """(n, K, the first gradient or None) of a ``grads[i][k]`` table (csrc grad_table)."""
    n, K = reference.grad_table_shape(grads)
    num_objectives(op, "grads", n)
    first: Optional[Tensor] = None
    first_name = ""
    col_first: List[Optional[Tensor]] = [None] * K
    for i in range(n):
        for k in range(K):
            g = grads[i][k]
            if g is None:
                continue
            name = f"grads[{i}][{k}]"
            floating(op, name, g)
            if first is None:
                first, first_name = g, name
            if g.dtype != first.dtype:
                _fail(op, f"{name} has dtype {_dt(g.dtype)} but the other gradients are {_dt(first.dtype)}; all "
                          "gradients must share one dtype")
            device(op, name, g, first_name, first)
            cf = col_first[k]
            if cf is None:
                col_first[k] = g
            elif g.shape != cf.shape:
                _fail(op, f"{name} has shape {_shape(g)} but another objective's gradient of parameter {k} has "
                          f"shape {_shape(cf)}; every objective's gradient of a parameter has the parameter's shape")
    return n, K, first


def combine_args(grads, coeffs, params) -> None:
    op = "combine_gradients"
    n, K, first = grad_table_args(op, grads)
    if len(params) != K:
        _fail(op, f"params has {len(params)} entries but grads[0] has {K}", ValueError)
    if K == 0:
        return
    # the compiled op's `out` is the list of .grad tensors (a missing one gets the parameter's dtype)
    out = [p if p.grad is None else p.grad for p in params]
    for k, o in enumerate(out):
        name = f"out[{k}]"
        floating(op, name, o)
        if o.dtype != out[0].dtype:
            _fail(op, f"{name} has dtype {_dt(o.dtype)} but out[0] has {_dt(out[0].dtype)}")
        device(op, name, o, "out[0]", out[0])
        for i in range(n):
            g = grads[i][k]
            if g is not None and g.shape != o.shape:
                _fail(op, f"grads[{i}][{k}] has shape {_shape(g)} but params[{k}] has shape {_shape(o)}")
    if first is not None:
        device(op, "grads", first, "params (out)", out[0])
    floating(op, "coeffs", coeffs)
    shape(op, "coeffs", coeffs, (n,), "[n]")
    device(op, "coeffs", coeffs, "params (out)", out[0])
