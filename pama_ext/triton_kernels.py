"""Triton kernels of the fused output layer's chunk epilogue (:mod:`pama_ext.fused_linear`).

One program per row of a ``[rows, V]`` float32 logits chunk, the vocabulary walked in blocks of
``BLOCK_V``:

* :func:`lse_gather_kernel` (forward): an online logsumexp (running max and rescaled sum) and the
  gathered target logit: ``lse[r]``, ``logp[r] = logits[r, ids[r]] - lse[r]``;
* :func:`grad_logits_kernel` (backward): overwrites the row with ``g[r] · (onehot(ids[r]) - exp(logits - lse[r]))``.

They replace PyTorch's logsumexp / gather / exp / scatter sequence (several passes over the chunk)
by one read pass (forward) and one read-write pass (backward). The matmuls stay cuBLAS.

``AVAILABLE`` is False where triton cannot be imported; :mod:`pama_ext.fused_linear` then uses its
PyTorch epilogue. The kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (set before triton is
imported), which is how the test suite checks them without a GPU, and
:func:`compile_for` compiles them ahead of time for a GPU target (no GPU needed).
"""
from __future__ import annotations

from typing import Dict

from torch import Tensor

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
    IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - exercised where triton is absent
    triton = tl = None
    AVAILABLE = False
    IMPORT_ERROR = e

#: the triton release the tests and the pinned install use (Makefile, pyproject's ``triton`` extra)
TRITON_VERSION = "3.9.0"
BLOCK_V = 1024
NUM_WARPS = 4


if AVAILABLE:

    @triton.jit
    def lse_gather_kernel(logits_ptr, ids_ptr, lse_ptr, logp_ptr, V, stride_row, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        cols = tl.arange(0, BLOCK_V)
        m = tl.full([BLOCK_V], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            # lanes still at -inf (all their values masked) keep s = 0 without an inf - inf
            alpha = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
            p = tl.where(m_new == float("-inf"), 0.0, tl.exp(x - m_new))
            s = s * alpha + p
            m = m_new
        row_max = tl.max(m, axis=0)
        total = tl.sum(s * tl.where(m == float("-inf"), 0.0, tl.exp(m - row_max)), axis=0)
        lse = row_max + tl.log(total)
        target = tl.load(ids_ptr + row)
        x_t = tl.load(base + target).to(tl.float32)
        tl.store(lse_ptr + row, lse)
        tl.store(logp_ptr + row, x_t - lse)

    @triton.jit
    def grad_logits_kernel(logits_ptr, ids_ptr, lse_ptr, g_ptr, V, stride_row, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        cols = tl.arange(0, BLOCK_V)
        lse = tl.load(lse_ptr + row)
        g = tl.load(g_ptr + row)
        target = tl.load(ids_ptr + row)
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            valid = idx < V
            x = tl.load(base + idx, mask=valid, other=float("-inf")).to(tl.float32)
            onehot = tl.where(idx == target, 1.0, 0.0)
            tl.store(base + idx, g * (onehot - tl.exp(x - lse)), mask=valid)


def _need() -> None:
    if not AVAILABLE:
        raise RuntimeError(f"pama_ext.triton_kernels: triton is not importable ({IMPORT_ERROR}); "
                           f"pip install triton=={TRITON_VERSION}")


def _check(logits: Tensor, *rows: Tensor) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise RuntimeError("pama_ext.triton_kernels: logits must be a 2-D tensor with contiguous rows")
    for r in rows:
        if r.shape != (logits.shape[0],) or not r.is_contiguous():
            raise RuntimeError("pama_ext.triton_kernels: per-row tensors must be contiguous [rows]")


def epilogue_forward(logits: Tensor, ids: Tensor, lse_out: Tensor, logp_out: Tensor) -> None:
    """Writes ``lse_out[r] = logsumexp(logits[r])`` and ``logp_out[r] = logits[r, ids[r]] - lse_out[r]``
    (float32 tensors; ``ids`` int64)."""
    _need()
    _check(logits, ids, lse_out, logp_out)
    rows, V = logits.shape
    if rows:
        lse_gather_kernel[(rows,)](logits, ids, lse_out, logp_out, V, logits.stride(0), BLOCK_V=BLOCK_V,
                                   num_warps=NUM_WARPS)


def epilogue_backward(logits: Tensor, ids: Tensor, lse: Tensor, g: Tensor) -> Tensor:
    """Turns the float32 ``logits`` in place into ``g[r] · (onehot(ids[r]) - softmax(logits[r]))``."""
    _need()
    _check(logits, ids, lse, g)
    rows, V = logits.shape
    if rows:
        grad_logits_kernel[(rows,)](logits, ids, lse, g, V, logits.stride(0), BLOCK_V=BLOCK_V,
                                    num_warps=NUM_WARPS)
    return logits


#: triton signatures of the kernels (pointer dtypes, scalar types) for ahead-of-time compiles
SIGNATURES: Dict[str, Dict[str, str]] = {
    "lse_gather_kernel": {"logits_ptr": "*fp32", "ids_ptr": "*i64", "lse_ptr": "*fp32", "logp_ptr": "*fp32",
                          "V": "i32", "stride_row": "i64", "BLOCK_V": "constexpr"},
    "grad_logits_kernel": {"logits_ptr": "*fp32", "ids_ptr": "*i64", "lse_ptr": "*fp32", "g_ptr": "*fp32",
                           "V": "i32", "stride_row": "i64", "BLOCK_V": "constexpr"},
}


def compile_for(name: str, capability: int, block_v: int = BLOCK_V, num_warps: int = NUM_WARPS):
    """Compile kernel ``name`` ahead of time for ``sm_<capability>`` (no GPU needed); returns the
    compiled kernel (``.asm['cubin']``, ``.n_regs``, ``.n_spills``)."""
    _need()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = globals()[name]
    src = ASTSource(fn=fn, signature=SIGNATURES[name], constexprs={"BLOCK_V": block_v})
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps})


def resource_usage(compiled) -> Dict[str, int]:
    """``{"REG": registers per thread, "STACK": bytes, "LOCAL": local-memory bytes (register
    spills), "SHARED": bytes}`` of a kernel from :func:`compile_for`, read from its cubin by the
    ``cuobjdump`` that ships with triton (or the one on PATH)."""
    import os
    import re
    import shutil
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        tool = shutil.which("cuobjdump")
    if tool is None:
        raise RuntimeError("pama_ext.triton_kernels.resource_usage: no cuobjdump (triton's or on PATH)")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        text = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    if "REG" not in found:
        raise RuntimeError(f"pama_ext.triton_kernels.resource_usage: unexpected cuobjdump output:\n{text}")
    return {k: int(v) for k, v in found.items()}
