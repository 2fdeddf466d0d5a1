"""The one table of the compiled ops: what each op needs on the Python side, and the machinery that
is driven from it.

For every ``torch.ops.pama_ext.<op>`` the table (:data:`OPS`) holds, in one entry:

- ``devices``: the arguments whose tensors must share a device, in the order of the compiled check
  (the fake implementation checks them first, so a meta tensor mixed with real ones is an error,
  never uninitialised memory);
- ``outputs``: the shapes and dtypes of the outputs (the fake implementation used by torch.compile);
- ``check`` / ``reference`` / ``finite``: the fallback used when the compiled library is absent (the
  argument checks of :mod:`pama_ext.checks`, the ``check_finite`` inputs, then the twin in
  :mod:`pama_ext.reference`);
- ``negated_grads``: for an op with a ``<op>_backward`` op, gradients that are the negation of
  another (the DPO margin is antisymmetric).

Everything else comes from the op schemas in ``csrc/registration.cpp``, read by name:

- the Python entry points build their arguments by schema name (:func:`schema_args`), and the
  fallback hands each function the arguments it names, so the argument order is written only in
  the schema;
- the autograd formula of an op with a ``<op>_backward`` op (unless :func:`register` is given a
  Python formula for it, or the library registers the op's Autograd kernel itself, as it does for
  the policy and value losses in ``csrc/autograd.cpp``) is derived from the two schemas: an
  argument ``grad_<output>`` of the backward takes the gradient of that forward output (zeros when
  only another output is used), any other argument is the forward input or output of that name, and
  the backward returns ``grad_<input>`` for the inputs it differentiates. Forward outputs that no
  ``grad_`` argument names are non-differentiable, and the backward ops themselves are not
  differentiable (a second derivative raises).

Adding an op: its schema and kernels in C++, one entry here, one entry point in ops.py or
preference.py (docs/contributing.md, "How to add an op").
"""
from __future__ import annotations

import inspect
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import checks, reference
from .functional import acc_dtype, masked_moments
from .vocab import METRIC_SCALARS, stats_num_objectives, stats_size

Named = Dict[str, Any]

__all__ = ["OpSpec", "OPS", "schemas", "schema", "arg_names", "schema_args", "fallback", "call_native", "register"]


@dataclass(frozen=True)
class OpSpec:
    """The Python side of one compiled op (see the module docstring)."""

    devices: Union[Tuple[str, ...], Callable[[Named], Sequence[Tuple[str, Any]]]]
    outputs: Callable[[Named], Any]
    check: Optional[Callable[..., None]] = None
    reference: Optional[Callable[..., Any]] = None
    finite: Tuple[str, ...] = ()
    finite_extra: Optional[Callable[[Named], Named]] = None
    native_only: Tuple[str, ...] = ()
    negated_grads: Tuple[Tuple[str, str], ...] = ()


# ------------------------------------------------------------------------------------------------
# schemas
# ------------------------------------------------------------------------------------------------
SCHEMA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schemas.def")


class Arg(NamedTuple):
    """One schema argument as plain Python values (what the entry points read on every call, also
    inside torch.compile, which cannot trace into schema objects or file reads)."""

    name: str
    type: str
    default: Any
    has_default: bool


def _parse_schema_file() -> Dict[str, torch.FunctionSchema]:
    out: Dict[str, torch.FunctionSchema] = {}
    with open(SCHEMA_FILE) as f:
        for line in f:
            m = re.fullmatch(r'PAMA_EXT_OP\("(.*)"\)\s*', line)
            if m:
                s = torch._C.parse_schema(m.group(1))
                out[s.name] = s
    return out


# parsed once, at import
_SCHEMAS = _parse_schema_file()
_ARGS: Dict[str, Tuple[Arg, ...]] = {
    op: tuple(Arg(a.name, str(a.type), a.default_value if a.has_default_value() else None, a.has_default_value())
              for a in s.arguments)
    for op, s in _SCHEMAS.items()
}
_ARG_NAMES: Dict[str, Tuple[str, ...]] = {op: tuple(a.name for a in args) for op, args in _ARGS.items()}


def schemas() -> Dict[str, torch.FunctionSchema]:
    """Every op schema of ``torch.ops.pama_ext`` by op name, parsed from ``schemas.def`` (the file the
    compiled library registers them from), so they are known without the library."""
    return dict(_SCHEMAS)


def schema(op: str) -> torch.FunctionSchema:
    """The schema of ``torch.ops.pama_ext.<op>``."""
    return _SCHEMAS[op]


def arg_names(op: str) -> Tuple[str, ...]:
    """The argument names of ``torch.ops.pama_ext.<op>`` in schema order."""
    return _ARG_NAMES[op]


def _is_tensor_type(t) -> bool:
    return "Tensor" in str(t)


def schema_args(op: str, values: Mapping[str, Any], *, detach: Sequence[str] = ()) -> Named:
    """The arguments of ``op`` by schema name, taken from ``values`` (the entry point's parameters as
    an explicit ``dict(name=name, ...)``; not ``locals()``, which Dynamo before torch 2.13 cannot
    trace, and test_op_table.py checks each dict against its signature): names the schema does not have are left out, arguments ``values`` does not have get
    the schema default, and scalars are normalised: a ``float`` argument given as None is +inf (the
    documented "disabled" of ``dual_clip`` and ``clip``), floats and bools are converted to Python
    ``float`` / ``bool``. The tensors named in ``detach`` are detached (inputs that get no gradient)."""
    out: Named = {}
    for name, typ, default, has_default in _ARGS[op]:
        if name in values:
            v = values[name]
        elif has_default:
            v = default
        else:
            raise TypeError(f"pama_ext.{op}: missing argument {name!r}")
        if typ == "float":
            v = math.inf if v is None else float(v)
        elif typ == "bool":
            v = bool(v)
        if name in detach and isinstance(v, Tensor):
            v = v.detach()
        out[name] = v
    return out


def call_native(op: str, args: Named) -> Any:
    """``torch.ops.pama_ext.<op>`` called with ``args`` (schema names) in schema order."""
    return getattr(torch.ops.pama_ext, op)(*(args[n] for n in arg_names(op)))


def _bind(fn: Callable, args: Named) -> Named:
    """The entries of ``args`` that ``fn`` names as parameters."""
    return {k: args[k] for k in inspect.signature(fn).parameters if k in args}


def fallback(op: str, args: Named) -> Any:
    """The reference path of ``op`` for an entry point whose library is absent: the argument checks,
    ``check_finite`` (when the op has it and it is on), then the reference twin, each given the
    arguments it names (:data:`OPS`)."""
    spec = OPS[op]
    spec.check(**_bind(spec.check, args))
    if args.get("check_finite", False) and spec.finite:
        extra = spec.finite_extra(args) if spec.finite_extra is not None else {}
        checks.finite(op, args["mask"], [(n, args[n]) for n in spec.finite], **extra)
    return spec.reference(**_bind(spec.reference, args))


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------
def _acc_like(t: Tensor, shape) -> Tensor:
    return t.new_empty(tuple(shape), dtype=acc_dtype(t.dtype))


def _policy_loss_outputs(a: Named):
    logp, n = a["logp"], a["advantages"].shape[0]
    a_tilde = logp.shape if a["return_a_tilde"] else (0,)
    return (_acc_like(logp, ()), _acc_like(logp, (len(METRIC_SCALARS) + 3 * n,)), _acc_like(logp, a_tilde),
            _acc_like(logp, (logp.shape[0],)), _acc_like(logp, logp.shape))


def _policy_finite_extra(a: Named) -> Named:
    variance = masked_moments(a["advantages"].detach(), a["mask"])[2] if a["whiten"] else None
    return {"prefs": a["prefs"], "variance": variance, "prefs_positive": a["method"] == "pama"}


def _grad_table_devices(a: Named):
    pairs = checks.flat_grads_named(a["grads"], a["num_objectives"])
    if "out" in a:
        pairs = [("out", list(a["out"])), *pairs, ("coeffs", a["coeffs"])]
    return pairs


def _gram_outputs(a: Named):
    like = next((g for g in a["grads"] if g is not None), None)
    n = a["num_objectives"]
    if like is None:
        return torch.empty((n, n), dtype=torch.float32)
    return _acc_like(like, (n, n))


def _empty_like(name: str, count: int = 1):
    def outputs(a: Named):
        like = a[name]
        return torch.empty_like(like) if count == 1 else tuple(torch.empty_like(like) for _ in range(count))

    return outputs


_POLICY = ("logp", "old_logp", "advantages", "mask")

OPS: Dict[str, OpSpec] = {
    "token_rewards": OpSpec(
        devices=("old_logp", "scores", "ref_logp", "mask"),
        outputs=lambda a: a["old_logp"].new_empty((a["scores"].shape[0], *a["old_logp"].shape)),
        check=checks.token_rewards_args, reference=reference.token_rewards),
    "multi_gae": OpSpec(
        devices=("values", "rewards", "mask"), outputs=_empty_like("values", 2),
        check=checks.multi_gae_args, reference=reference.multi_gae),
    "multi_gae_backward": OpSpec(devices=(), outputs=_empty_like("grad_advantages", 2)),
    "objective_moments": OpSpec(
        devices=("advantages", "mask"),
        outputs=lambda a: _acc_like(a["advantages"], (2 + 2 * a["advantages"].shape[0],)),
        check=checks.moments_args, reference=reference.objective_moments),
    "objective_stats": OpSpec(
        devices=("logp", "old_logp", "advantages", "mask", "moments"),
        outputs=lambda a: _acc_like(a["logp"], (stats_size(a["advantages"].shape[0]),)),
        check=checks.stats_args, reference=reference.objective_stats, native_only=("moments", "with_gram")),
    "pareto_weights": OpSpec(
        devices=("stats", "prefs"),
        outputs=lambda a: _acc_like(a["stats"], (stats_num_objectives(int(a["stats"].shape[0])),)),
        check=checks.pareto_weights_args, reference=reference.pareto_weights),
    "pama_policy_loss": OpSpec(
        devices=("logp", "old_logp", "advantages", "mask", "ref_logp", "prefs", "global_stats"),
        outputs=_policy_loss_outputs, check=checks.policy_loss_args, reference=reference.pama_policy_loss,
        finite=("logp", "old_logp", "advantages", "ref_logp"), finite_extra=_policy_finite_extra,
        native_only=("check_finite", "global_stats", "return_a_tilde")),
    "pama_policy_loss_backward": OpSpec(devices=(), outputs=_empty_like("logp")),
    "multi_value_loss": OpSpec(
        devices=("values", "old_values", "returns", "mask", "denominators"),
        outputs=lambda a: (_acc_like(a["values"], ()), _acc_like(a["values"], (1 + a["values"].shape[0],)),
                           _acc_like(a["values"], (a["values"].shape[1],))),
        check=checks.value_loss_args, reference=reference.multi_value_loss,
        finite=("values", "old_values", "returns"), native_only=("check_finite", "denominators")),
    "multi_value_loss_backward": OpSpec(devices=(), outputs=_empty_like("values")),
    "multi_dpo_loss": OpSpec(
        devices=("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "labels",
                 "chosen_lengths", "rejected_lengths"),
        outputs=lambda a: (_acc_like(a["policy_chosen_logps"], (a["labels"].shape[0],)),
                           _acc_like(a["policy_chosen_logps"], a["labels"].shape)),
        check=checks.dpo_loss_args, reference=reference.multi_dpo_loss,
        # h = (pc - rc) - (pr - rr): the reference log-probs get the negated policy gradients
        negated_grads=(("ref_chosen_logps", "policy_chosen_logps"), ("policy_rejected_logps", "ref_rejected_logps"))),
    "multi_dpo_loss_backward": OpSpec(devices=(), outputs=_empty_like("policy_chosen_logps", 2)),
    # the Gram ops take a Python table of gradients in their entry points (pama_ext.preference), which
    # flatten it for the schema; their fallback is written there
    "gradient_gram": OpSpec(devices=_grad_table_devices, outputs=_gram_outputs),
    "combine_gradients": OpSpec(devices=_grad_table_devices, outputs=lambda a: None),
    "gram_weights": OpSpec(
        devices=("G", "w"), outputs=lambda a: _acc_like(a["G"], (a["G"].shape[0],))),
}


# ------------------------------------------------------------------------------------------------
# fakes and autograd, registered from the table when the library is loaded
# ------------------------------------------------------------------------------------------------
def _named_call(op: str, args, kwargs) -> Named:
    """The arguments of a dispatcher call by schema name (omitted trailing ones at their default)."""
    named = dict(zip(arg_names(op), args))
    named.update(kwargs)
    for name, _, default, has_default in _ARGS[op]:
        if name not in named and has_default:
            named[name] = default
    return named


def _fake(op: str, spec: OpSpec):
    def fake(*args, **kwargs):
        a = _named_call(op, args, kwargs)
        pairs = spec.devices(a) if callable(spec.devices) else [(n, a[n]) for n in spec.devices]
        if pairs:
            checks.same_device(op, *pairs)
        return spec.outputs(a)

    return fake


def has_native_autograd(op: str) -> bool:
    """Whether the compiled library registers ``op``'s Autograd kernel itself (csrc/autograd.cpp),
    checked before any Python registration (which would land on the same dispatch key)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("pama_ext::" + op, "Autograd")


def not_twice_differentiable(op: str):
    """(backward, setup_context) to register for a backward op: the first derivative of ``op`` works as
    usual; a second one raises instead of silently returning a gradient with no second-order term."""

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(
            f"pama_ext.{op}: double backward is not supported (its backward is a fused kernel that is not "
            "itself differentiable); compute higher-order derivatives with the pama_ext.reference "
            "implementation instead"
        )

    return backward, setup_context


def schema_autograd(op: str, spec: OpSpec):
    """(backward, setup_context) of ``op`` derived from its schema and ``<op>_backward``'s (module
    docstring); raises when the two schemas do not follow the naming rule."""
    fwd, bwd = schema(op), schema(op + "_backward")
    input_names = [a.name for a in fwd.arguments]
    outputs = [r.name for r in fwd.returns]
    if any(not o for o in outputs):
        raise RuntimeError(f"pama_ext.{op}: name every output in the schema (autograd reads them by name)")
    plan = []  # per backward argument: ("grad", output index) | ("tensor", name) | ("const", name)
    for a in bwd.arguments:
        if a.name.startswith("grad_") and a.name[5:] in outputs:
            plan.append(("grad", outputs.index(a.name[5:])))
        elif a.name in outputs or a.name in input_names:
            plan.append(("tensor" if _is_tensor_type(a.type) else "const", a.name))
        else:
            raise RuntimeError(f"pama_ext.{op}_backward: argument {a.name!r} is neither grad_<output> nor a "
                               f"forward input or output of {op}")
    results = [r.name[5:] if r.name.startswith("grad_") else "" for r in bwd.returns]
    if not all(r in input_names for r in results):
        raise RuntimeError(f"pama_ext.{op}_backward: name each output grad_<input of {op}>")
    negated = dict(spec.negated_grads)
    grad_outputs = sorted({i for kind, i in plan if kind == "grad"})
    saved_names = [name for kind, name in plan if kind == "tensor"]

    def setup_context(ctx, inputs, output):
        out = tuple(output) if isinstance(output, (tuple, list)) else (output,)
        a = dict(zip(input_names, inputs))
        a.update(zip(outputs, out))
        ctx.mark_non_differentiable(*(o for i, o in enumerate(out) if i not in grad_outputs))
        # no zero gradients for the outputs with no grad_ argument (a [B, T] residual would cost a
        # fill per backward); backward below makes the zeros of a grad_ argument it does take
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*(a[n] for n in saved_names))
        ctx.consts = {name: a[name] for kind, name in plan if kind == "const"}
        ctx.grad_meta = {i: (out[i].shape, out[i].dtype, out[i].device) for i in grad_outputs}

    def backward(ctx, *grads):
        if all(grads[i] is None for i in grad_outputs):
            return (None,) * len(input_names)
        saved = dict(zip(saved_names, ctx.saved_tensors))
        args = []
        for kind, key in plan:
            if kind == "grad":
                g = grads[key]
                if g is None:
                    shape, dtype, device = ctx.grad_meta[key]
                    g = torch.zeros(shape, dtype=dtype, device=device)
                args.append(g)
            else:
                args.append(saved[key] if kind == "tensor" else ctx.consts[key])
        res = getattr(torch.ops.pama_ext, op + "_backward")(*args)
        res = tuple(res) if isinstance(res, (tuple, list)) else (res,)
        by_name = dict(zip(results, res))
        # needs_input_grad covers the arguments the call passed (trailing defaults may be left out)
        need = ctx.needs_input_grad
        wanted = {n for k, n in enumerate(input_names) if k < len(need) and need[k]}
        for name, twin in negated.items():
            if name in wanted:  # a negation is a pass over the gradient: only where one is asked for
                by_name[name] = -by_name[twin]
        return tuple(by_name.get(n) if n in wanted else None for n in input_names)

    return backward, setup_context


def register(python_autograd: Optional[Mapping[str, Tuple[Callable, Callable]]] = None) -> None:
    """Register the fake of every op in :data:`OPS` that the library has, the schema-derived autograd
    of every op with a ``<op>_backward`` op, and ``python_autograd`` (op -> (backward, setup_context))
    for ops whose backward is a Python formula (which takes the place of a schema-derived one: the
    ``<op>_backward`` op stays callable for other users). An op whose Autograd kernel the library
    registers itself (:func:`has_native_autograd`: the policy and value losses, csrc/autograd.cpp) keeps it. Called
    once, when the library is loaded."""
    lib = "pama_ext::"
    python_autograd = dict(python_autograd or {})
    present = [op for op in OPS if hasattr(torch.ops.pama_ext, op)]
    native = {op for op in present if has_native_autograd(op)}  # before any Python registration
    clash = sorted(native & set(python_autograd))
    if clash:
        raise RuntimeError(f"pama_ext: {clash} have an Autograd kernel in the library; a Python formula cannot "
                           "take its place")
    for op in present:
        torch.library.register_fake(lib + op)(_fake(op, OPS[op]))
        if op in native:
            continue
        if op.endswith("_backward"):
            backward, setup = not_twice_differentiable(op[: -len("_backward")])
            torch.library.register_autograd(lib + op, backward, setup_context=setup)
        elif hasattr(torch.ops.pama_ext, op + "_backward") and op not in python_autograd:
            backward, setup = schema_autograd(op, OPS[op])
            torch.library.register_autograd(lib + op, backward, setup_context=setup)
    for op, (backward, setup) in python_autograd.items():
        torch.library.register_autograd(lib + op, backward, setup_context=setup)
