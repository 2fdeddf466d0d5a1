"""The output layer fused with the policy loss: per-token log-probs of ``hidden @ weightᵀ + bias``
without the ``[B, T, V]`` logits (algorithms §4, "Fused output layer").

A policy update only reads one log-prob per token, ``log_softmax(logits)[token_id]``, yet the
unfused path materialises every logit (and autograd keeps them, plus their softmax, for the
backward): ``B·T·V`` floats, the largest tensor of a PPO step for V = 50k-150k. Here the rows
(tokens) are walked in chunks of ``chunk_size``:

* forward (no autograd graph): per chunk, ``logits = hidden_c @ weightᵀ + bias`` (optionally
  scaled / soft-capped), then the epilogue: the row's logsumexp ``lse`` and ``logp = logits[id] - lse``.
  Only ``logp`` and ``lse`` (``[B·T]`` each) are kept.
* the loss: :func:`pama_ext.ops.pama_policy_loss` on the ``[B, T]`` log-probs, unchanged, so every
  method, granularity, aggregation, option and ``group=`` (data parallelism) is that op's; its
  statistics that need every token's ratio (sequence / batch granularity, the Gram methods) see all
  of them, because the log-probs of the whole batch exist before the loss is formed.
* backward: per chunk, the logits are computed again, the epilogue turns them in place into
  ``grad_logits = g · (onehot(id) - softmax)`` (``g = dL/dlogp`` of that token, the softmax from the
  saved ``lse``), and ``grad_hidden_c = grad_logits @ weight``, ``grad_weight += grad_logitsᵀ @
  hidden_c``, ``grad_bias += Σ_rows grad_logits``.

Cost: the extra work is one chunked forward matmul in the backward (the logits are recomputed
instead of stored): 4 ``B·T × H × V`` matmuls instead of the unfused 3 (+33% of the output layer's
FLOPs). Extra memory: one ``chunk_size × V`` logits buffer (float32; plus its low-precision matmul
output for bf16/fp16 inputs and a tanh buffer with ``softcap``), the float32 ``grad_weight``
accumulator ``V × H`` (low-precision weights only) and ``2·B·T`` floats, independent of the batch
beyond that. On CUDA tensors the epilogue is a Triton kernel (:mod:`pama_ext.triton_kernels`) when
triton is importable; elsewhere it is PyTorch. No value is read back to the host.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from . import _native, checks, losses, op_table, ops
from .functional import acc_dtype

__all__ = ["fused_linear_logp", "fused_linear_policy_loss", "single_pass_eligible", "default_chunk_size",
           "epilogue_forward", "epilogue_backward"]

#: logits elements of one chunk when ``chunk_size`` is None (2**24 float32 = 64 MiB)
AUTO_CHUNK_ELEMENTS = 1 << 24


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk when ``chunk_size=None``: the largest power of two (16 to 4096) whose
    ``rows × V`` float32 logits fit :data:`AUTO_CHUNK_ELEMENTS`."""
    rows = 4096
    while rows > 16 and rows * vocab_size > AUTO_CHUNK_ELEMENTS:
        rows //= 2
    return rows


# ------------------------------------------------------------------------------------------------
# the chunk epilogue (PyTorch; the Triton twins live in pama_ext.triton_kernels)
# ------------------------------------------------------------------------------------------------
def epilogue_forward(logits: Tensor, ids: Tensor) -> Tuple[Tensor, Tensor]:
    """``(lse, logp)`` of one chunk: ``lse[r] = logsumexp(logits[r])``, ``logp[r] = logits[r, ids[r]] - lse[r]``."""
    lse = torch.logsumexp(logits, dim=-1)
    return lse, logits.gather(1, ids.unsqueeze(1)).squeeze(1) - lse


def epilogue_backward(logits: Tensor, ids: Tensor, lse: Tensor, g: Tensor) -> Tensor:
    """Turns ``logits`` in place into ``g[r] · (onehot(ids[r]) - softmax(logits[r]))`` and returns it."""
    logits.sub_(lse.unsqueeze(1)).exp_().mul_(-g.unsqueeze(1))
    logits.scatter_add_(1, ids.unsqueeze(1), g.unsqueeze(1))
    return logits


def _use_triton(t: Tensor) -> bool:
    """The Triton epilogue for CUDA tensors with a float32 epilogue (float64 stays PyTorch)."""
    if t.device.type != "cuda" or acc_dtype(t.dtype) != torch.float32:
        return False
    from . import triton_kernels

    return triton_kernels.AVAILABLE


# ------------------------------------------------------------------------------------------------
# the autograd function
# ------------------------------------------------------------------------------------------------
def _chunk_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], acc: torch.dtype, logit_scale: float,
                  softcap: Optional[float]) -> Tuple[Tensor, Optional[Tensor]]:
    """The chunk's logits in the accumulation dtype, and ``tanh(z / softcap)`` when soft-capping."""
    z = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
    z = z.to(acc)  # no copy for float32 / float64 inputs
    if logit_scale != 1.0:
        z.mul_(logit_scale)
    if softcap is None:
        return z, None
    t = torch.tanh(z.div_(softcap))
    return torch.mul(t, softcap, out=z), t


class _FusedLinearLogp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, out_dtype, chunk, logit_scale, softcap):
        # the inputs' dtype is the compute dtype: an enclosing autocast does not re-cast the chunks
        with torch.autocast(hidden.device.type, enabled=False):
            return _FusedLinearLogp._forward(ctx, hidden, weight, bias, ids, out_dtype, chunk, logit_scale, softcap)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, ids, out_dtype, chunk, logit_scale, softcap):
        N = hidden.shape[0]
        acc = acc_dtype(hidden.dtype)
        lse = hidden.new_empty((N,), dtype=acc)
        logp = hidden.new_empty((N,), dtype=acc)
        triton = _use_triton(hidden)
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            z, _ = _chunk_logits(hidden[s:e], weight, bias, acc, logit_scale, softcap)
            _epilogue_forward(z, ids[s:e], lse[s:e], logp[s:e], triton)
        ctx.save_for_backward(hidden, weight, bias, ids, lse)
        ctx.consts = (chunk, logit_scale, softcap)
        ctx.mark_non_differentiable(lse)
        return logp.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_logp):
        with torch.autocast(grad_logp.device.type, enabled=False):
            return _FusedLinearLogp._backward(ctx, grad_logp)

    @staticmethod
    def _backward(ctx, grad_logp):
        hidden, weight, bias, ids, lse = ctx.saved_tensors
        chunk, logit_scale, softcap = ctx.consts
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        N = hidden.shape[0]
        acc = acc_dtype(hidden.dtype)
        g = grad_logp.to(acc).contiguous()  # e.g. the expanded gradient of logp.sum()
        grads = _GradBuffers(hidden, weight, need_h, need_w, need_b)
        triton = _use_triton(hidden)
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            z, t = _chunk_logits(hidden[s:e], weight, bias, acc, logit_scale, softcap)
            _chunk_backward(z, t, ids[s:e], lse[s:e], g[s:e], hidden, weight, s, e, grads, logit_scale, softcap,
                            triton)
        grad_w, grad_b = grads.finish(weight, bias)
        return grads.hidden, grad_w, grad_b, None, None, None, None, None


class _GradBuffers:
    """The gradients of hidden ``[N, H]``, weight and bias being accumulated chunk by chunk (None where
    not needed); weight and bias in the accumulation dtype until :meth:`finish`."""

    def __init__(self, hidden: Tensor, weight: Tensor, need_h: bool, need_w: bool, need_b: bool):
        acc = acc_dtype(hidden.dtype)
        self.hidden = torch.empty_like(hidden) if need_h else None
        # low-precision weights: a float32 accumulator, cast once at the end
        self.weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        self.bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None

    def finish(self, weight: Tensor, bias: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """(grad_weight, grad_bias) in the parameters' dtypes."""
        gw = None if self.weight is None else self.weight.to(weight.dtype)
        gb = None if self.bias is None else self.bias.to(bias.dtype)
        return gw, gb


def _epilogue_forward(z: Tensor, ids: Tensor, lse: Tensor, logp: Tensor, triton: bool) -> None:
    """Writes the chunk's ``lse`` and ``logp`` (Triton kernel or PyTorch)."""
    if triton:
        from . import triton_kernels

        triton_kernels.epilogue_forward(z, ids, lse, logp)
    else:
        lse[:], logp[:] = epilogue_forward(z, ids)


def _chunk_backward(z: Tensor, t: Optional[Tensor], ids: Tensor, lse: Tensor, g: Tensor, hidden: Tensor,
                    weight: Tensor, s: int, e: int, grads: _GradBuffers, logit_scale: float,
                    softcap: Optional[float], triton: bool) -> None:
    """Rows ``s:e`` of the backward: ``z`` (the chunk's logits, overwritten) becomes ``dL/dz`` for
    ``dL/dlogp = g``, then ``grad_hidden[s:e] = dL/dz @ weight``, ``grad_weight += dL/dzᵀ @ hidden[s:e]``,
    ``grad_bias += Σ_rows dL/dz``."""
    if triton:
        from . import triton_kernels

        gz = triton_kernels.epilogue_backward(z, ids, lse, g)
    else:
        gz = epilogue_backward(z, ids, lse, g)
    if softcap is not None:  # d(c·tanh(z/c))/dz = 1 - tanh²
        gz.mul_(t.mul_(t).neg_().add_(1.0))
    if logit_scale != 1.0:
        gz.mul_(logit_scale)
    if grads.bias is not None:
        grads.bias.add_(gz.sum(0))
    gzc = gz.to(hidden.dtype)
    if grads.hidden is not None:
        torch.mm(gzc, weight, out=grads.hidden[s:e])
    if grads.weight is not None:
        h = hidden[s:e]
        if gzc.dtype == grads.weight.dtype:
            grads.weight.addmm_(gzc.t(), h)
        else:
            grads.weight.add_(gzc.t() @ h)


# ------------------------------------------------------------------------------------------------
# public functions
# ------------------------------------------------------------------------------------------------
_OP = "fused_linear_logp"


def _check(op, hidden, weight, bias, token_ids, chunk_size, logit_scale, softcap) -> None:
    checks.floating(op, "hidden", hidden)
    checks.rank(op, "hidden", hidden, 3, "[B, T, H]")
    checks.floating(op, "weight", weight)
    checks.rank(op, "weight", weight, 2, "[V, H]")
    B, T, H = hidden.shape
    checks.like(op, "weight", weight, "hidden", hidden)
    if weight.shape[1] != H:
        raise RuntimeError(f"{op}: weight must be [V, H] with H = hidden.shape[-1] = {H}, got "
                           f"[{', '.join(map(str, weight.shape))}]")
    if weight.shape[0] == 0:
        raise RuntimeError(f"{op}: weight must have at least one row (V >= 1)")
    if bias is not None:
        checks.floating(op, "bias", bias)
        checks.like(op, "bias", bias, "hidden", hidden)
        checks.shape(op, "bias", bias, (weight.shape[0],), "[V]")
    checks.defined(op, "token_ids", token_ids)
    if token_ids.dtype not in (torch.int64, torch.int32):
        raise RuntimeError(f"{op}: token_ids must be int64 or int32, got {token_ids.dtype}")
    checks.device(op, "token_ids", token_ids, "hidden", hidden)
    checks.shape(op, "token_ids", token_ids, (B, T), "[B, T]")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"{op}: chunk_size must be a positive int or None, got {chunk_size!r}")
    if not (isinstance(logit_scale, (int, float)) and logit_scale == logit_scale
            and abs(logit_scale) != float("inf") and logit_scale != 0):
        raise ValueError(f"{op}: logit_scale must be a finite nonzero number, got {logit_scale!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and 0 < softcap < float("inf")):
        raise ValueError(f"{op}: softcap must be None or a finite number > 0, got {softcap!r}")


def fused_linear_logp(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    token_ids: Tensor,
    mask: Optional[Tensor] = None,
    *,
    out_dtype: Optional[torch.dtype] = None,
    chunk_size: Optional[int] = None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
) -> Tensor:
    """``log_softmax(L)[b, t, token_ids[b, t]]`` as ``[B, T]``, ``L = hidden @ weightᵀ + bias`` (then
    ``L *= logit_scale``, then ``L = softcap · tanh(L / softcap)`` when ``softcap`` is set), without
    the ``[B, T, V]`` logits (see the module docstring for the passes and their cost).

    ``hidden`` ``[B, T, H]``, ``weight`` ``[V, H]`` and ``bias`` ``[V]`` (or None) share one floating
    dtype and device; the logsumexp is taken in float32 (float64 for float64 inputs) and the result
    is returned in ``out_dtype`` (default: that accumulation dtype). Differentiable w.r.t. hidden,
    weight and bias (not twice). ``token_ids`` must lie in ``[0, V)`` where ``mask`` is nonzero;
    masked-out positions (padding, e.g. -100) are read as id 0 and their log-prob is meaningless.
    ``chunk_size``: rows (tokens) per chunk, default :func:`default_chunk_size`.
    """
    ids, chunk, consts = _prepare(hidden, weight, bias, token_ids, mask, chunk_size, logit_scale, softcap)
    B, T, H = hidden.shape
    out_dtype = out_dtype or acc_dtype(hidden.dtype)
    logp = _FusedLinearLogp.apply(hidden.reshape(B * T, H), weight, bias, ids, out_dtype, chunk, *consts)
    return logp.view(B, T)


def _prepare(hidden, weight, bias, token_ids, mask, chunk_size, logit_scale, softcap):
    """Checks the arguments; returns the flat token ids ``[B·T]`` (0 where ``mask`` is 0), the rows
    per chunk and ``(logit_scale, softcap)`` as floats."""
    _check(_OP, hidden, weight, bias, token_ids, chunk_size, logit_scale, softcap)
    B, T, _ = hidden.shape
    ids = token_ids.long()
    if mask is not None:
        checks.mask_arg(_OP, mask, B, T, hidden, "hidden")
        ids = torch.where(mask != 0, ids, torch.zeros((), dtype=ids.dtype, device=ids.device))
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    return ids.reshape(B * T), chunk, (float(logit_scale), None if softcap is None else float(softcap))


def single_pass_eligible(method: str = "pama", granularity: str = "token", num_objectives: int = 2) -> bool:
    """Whether :func:`fused_linear_policy_loss` can take its single-pass path for these options: True
    when the combined advantage ``Ã`` (and so ``dL/dlogp`` of each token) depends on the advantages
    only, not on any token's ratio: ``method="linear"`` (the ``prefs`` weights; granularity plays no
    part), ``method="pama"`` at token granularity (Theorem 1 on each token's own whitened
    advantages), and ``method="pama"`` with one objective at any granularity (its Theorem-1 weight is
    1). Sequence / batch granularity with n > 1 (the weights read the clipped ratios of the row / the
    batch) and the Gram methods (``mgda``, ``cagrad``, ``raco``, ``pcgrad``: the Gram reads every
    ratio) need every log-prob first: the two-pass path. Whitening uses the advantages' moments
    only, so it does not matter. Decided from the options, never from tensor values."""
    return method == "linear" or (method == "pama" and (granularity == "token" or num_objectives == 1))


class _AttachGrads(torch.autograd.Function):
    """``loss`` (computed without a graph) with the gradients of hidden, weight and bias that the
    single pass already computed for ``dL/dloss = 1``; the backward scales them by the incoming
    gradient (a scalar, so no recomputation)."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, grads):
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None  # released after use (no retain_graph: a second backward fails)
        if grads is None:
            raise RuntimeError("fused_linear_policy_loss: the single-pass loss was already backpropagated; its "
                               "gradients are freed after one backward (retain_graph is not supported)")
        return (None, *(None if x is None else x.mul_(grad_loss.to(x.dtype)) for x in grads), None)


def _single_pass(hidden, weight, bias, ids, mask, old_logp, advantages, ref_logp, prefs, group, chunk, consts,
                 options) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The single-pass path of :func:`fused_linear_policy_loss` (its docstring; options already checked)."""
    B, T, H = hidden.shape
    N = B * T
    logit_scale, softcap = consts
    # 1. Ã and the row scales: pama_policy_loss on the rollout log-probs (they do not depend on the
    #    log-probs for the eligible options, see single_pass_eligible); also runs every argument check
    pre = op_table.schema_args("pama_policy_loss", dict(losses.policy_loss_options(), **options, logp=old_logp.detach(), old_logp=old_logp,
                                                        advantages=advantages, mask=mask, ref_logp=ref_logp,
                                                        prefs=prefs), detach=("old_logp", "advantages", "ref_logp"))
    _, _, a_tilde, row_scale = ops.policy_loss_native(pre, group)
    acc = acc_dtype(hidden.dtype)
    one = torch.ones((), dtype=acc_dtype(old_logp.dtype), device=hidden.device)
    bw = op_table.schema_args("pama_policy_loss_backward",
                              dict(pre, grad_loss=one, a_tilde=a_tilde, row_scale=row_scale))
    flat = {k: None if bw[k] is None else bw[k].reshape(N, 1) for k in ("old_logp", "ref_logp", "mask", "a_tilde")}
    rows = row_scale.repeat_interleave(T)  # each token is a row of the backward op: its row's scale
    h2 = hidden.detach().reshape(N, H)
    w, b = weight.detach(), None if bias is None else bias.detach()
    need_b = bias is not None and bias.requires_grad
    grads = _GradBuffers(h2, w, hidden.requires_grad, weight.requires_grad, need_b)
    logp = h2.new_empty((N,), dtype=acc)
    lse = h2.new_empty((min(chunk, N),), dtype=acc)
    logp_io = logp if old_logp.dtype == acc else h2.new_empty((N,), dtype=old_logp.dtype)
    triton = _use_triton(h2)
    # 2. per chunk: logits, log-probs, dL/dlogp from the op's own backward, the three gradients
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            z, t = _chunk_logits(h2[s:e], w, b, acc, logit_scale, softcap)
            _epilogue_forward(z, ids[s:e], lse[: e - s], logp[s:e], triton)
            if logp_io is not logp:
                logp_io[s:e] = logp[s:e]
            chunk_args = dict(bw, logp=logp_io[s:e].view(e - s, 1), row_scale=rows[s:e],
                              **{k: (None if v is None else v[s:e]) for k, v in flat.items()})
            g = op_table.call_native("pama_policy_loss_backward", chunk_args).view(e - s).to(acc)
            _chunk_backward(z, t, ids[s:e], lse[: e - s], g, h2, w, s, e, grads, logit_scale, softcap, triton)
        # 3. loss and metrics: the op on the log-probs of the whole batch
        loss, metrics = ops.pama_policy_loss(logp_io.view(B, T), old_logp, advantages, mask, ref_logp, prefs=prefs,
                                             group=group, **options)
    grad_w, grad_b = grads.finish(w, b)
    grad_h = None if grads.hidden is None else grads.hidden.view(hidden.shape)
    return _AttachGrads.apply(loss, hidden, weight, bias, (grad_h, grad_w, grad_b)), metrics


def fused_linear_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    token_ids: Tensor,
    mask: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    ref_logp: Optional[Tensor] = None,
    *,
    chunk_size: Optional[int] = None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    single_pass: Optional[bool] = None,
    prefs: Optional[Tensor] = None,
    group: Optional[Any] = None,
    **options: Any,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """:func:`pama_ext.ops.pama_policy_loss` of the log-probs of an output layer, the ``[B, T, V]``
    logits never materialised. Returns ``(loss, metrics)``, the same as::

        logits = (hidden @ weight.T + bias) * logit_scale       # [B, T, V]
        logp = log_softmax(logits, -1).gather(-1, token_ids[..., None])[..., 0]
        pama_policy_loss(logp, old_logp, advantages, mask, ref_logp, prefs=prefs, group=group, **options)

    with gradients for ``hidden``, ``weight`` and ``bias``. ``options`` are those of
    :func:`pama_ext.losses.policy_loss_options` (method, granularity, agg, eps_lo, ...; an unknown
    one is an error naming it). The log-probs are computed in float32 and handed to the loss in
    ``old_logp``'s dtype (the loss takes one dtype). Models whose logits are
    ``softcap · tanh(L / softcap)`` (Gemma 2) pass ``softcap``.

    Two paths, chosen from the options (``single_pass=None``):

    * **single pass** (3 output-layer matmuls, as Liger's chunked losses) when
      :func:`single_pass_eligible` holds, a gradient is wanted (grad mode on and hidden, weight or
      bias requiring it) and the compiled library is loaded: ``Ã`` and the row scales come first from
      ``pama_policy_loss`` on ``old_logp`` (they do not depend on the log-probs for these options);
      each chunk's ``dL/dlogp`` is then computed in the forward by ``pama_policy_loss_backward`` on
      that chunk, and the chunk's gradients for hidden / weight / bias with it; the backward only
      scales the saved gradients by the incoming one. The loss and metrics are ``pama_policy_loss``
      on the whole batch's log-probs. Extra memory: the two-pass path's plus a ``[B·T, H]`` hidden
      gradient held from the forward to the backward. The loss can be backpropagated once.
    * **two passes** otherwise (4 matmuls): the log-probs of every token, the loss on them, and a
      chunked backward that recomputes the logits (module docstring).

    ``single_pass=False`` forces the two-pass path; ``single_pass=True`` requires the single pass
    (ValueError when the options are not eligible, RuntimeError without the compiled library).
    """
    losses.check_policy_loss_options("fused_linear_policy_loss", options)
    checks.floating("fused_linear_policy_loss", "old_logp", old_logp)
    if single_pass not in (None, True, False):
        raise ValueError(f"fused_linear_policy_loss: single_pass must be None, True or False, got {single_pass!r}")
    method = options.get("method", "pama")
    granularity = options.get("granularity", "token")
    n = advantages.shape[0] if advantages.dim() == 3 else 0
    eligible = single_pass_eligible(method, granularity, n)
    if single_pass and not eligible:
        raise ValueError(f"fused_linear_policy_loss: single_pass=True needs options whose combined advantage does "
                         f"not depend on the log-probs (method 'linear', or 'pama' at token granularity or with one "
                         f"objective); got method={method!r}, granularity={granularity!r}, n={n}")
    if single_pass and not _native.available():
        raise RuntimeError("fused_linear_policy_loss: single_pass=True needs the compiled library pama_ext._C (it "
                           "calls pama_policy_loss_backward per chunk)")
    wants_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (hidden, weight, bias))
    if single_pass is not False and eligible and wants_grad and _native.available():
        ids, chunk, consts = _prepare(hidden, weight, bias, token_ids, mask, chunk_size, logit_scale, softcap)
        return _single_pass(hidden, weight, bias, ids, mask, old_logp, advantages, ref_logp, prefs, group, chunk,
                            consts, options)
    logp = fused_linear_logp(hidden, weight, bias, token_ids, mask, out_dtype=old_logp.dtype,
                             chunk_size=chunk_size, logit_scale=logit_scale, softcap=softcap)
    return ops.pama_policy_loss(logp, old_logp, advantages, mask, ref_logp, prefs=prefs, group=group, **options)
