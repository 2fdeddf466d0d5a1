"""The op table (pama_ext/op_table.py) and the schema file it shares with the compiled library: every op
is in both, the library registers exactly the file's schemas, and the Python side (fallback, entry
points, autograd) uses the schema names. The behaviour of each op on both paths is tested in its own
file; this file tests the wiring."""
from __future__ import annotations

import ast
import inspect
import pathlib
import textwrap

import pytest
import torch

from pama_ext import op_table, ops, pareto, preference
from pama_testutils import require_native

# the ops of the library that are not in the table: they describe the build, not tensors
VOCABULARY_OPS = {"has_cuda_kernels", "weighting_methods", "stats_layout"}
FALLBACK_OPS = [op for op, spec in op_table.OPS.items() if spec.reference is not None]
BACKWARD_OPS = [op for op in op_table.OPS if op + "_backward" in op_table.OPS]
ENTRY_POINTS = [ops.token_rewards, ops.multi_gae, ops.objective_moments, ops.objective_stats, ops.pareto_weights,
                ops.pama_policy_loss, ops.multi_value_loss, preference.multi_dpo_loss]


def test_table_and_schema_file_list_the_same_ops():
    assert set(op_table.OPS) == set(op_table.schemas())


def test_library_registers_the_schema_file():
    """The compiled library's schemas are the file's, character for character (a stale build fails)."""
    require_native()
    registered = {s.name.split("::", 1)[1]: s for s in torch._C._jit_get_all_schemas()
                  if s.name.startswith("pama_ext::")}
    assert set(registered) - VOCABULARY_OPS == set(op_table.schemas())
    for name, s in op_table.schemas().items():
        assert str(registered[name]) == "pama_ext::" + str(s), name


@pytest.mark.parametrize("op", FALLBACK_OPS)
def test_fallback_functions_take_schema_names(op):
    """The checks and the reference twin are called by argument name: each names only schema arguments,
    and the reference takes every schema argument but the ones only the kernels use."""
    spec = op_table.OPS[op]
    names = set(op_table.arg_names(op))
    check = set(inspect.signature(spec.check).parameters)
    ref = set(inspect.signature(spec.reference).parameters)
    assert check <= names, check - names
    assert ref <= names, ref - names
    assert names - ref <= set(spec.native_only), names - ref
    assert set(spec.native_only) <= names
    assert set(spec.finite) <= names


@pytest.mark.parametrize("fn", ENTRY_POINTS, ids=lambda f: f.__name__)
def test_entry_points_take_schema_names(fn):
    """A Python entry point's parameters are its op's schema arguments (by the same names), plus the
    data-parallel ``group``; so schema_args finds every one of them."""
    params = set(inspect.signature(fn).parameters) - {"group"}
    names = set(op_table.arg_names(fn.__name__))
    assert params <= names, params - names


def _schema_args_dict(fn):
    """The op name and the ``dict(name=name, ...)`` keywords that ``fn`` hands to ``schema_args``
    (directly, or through one local variable assigned that dict)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(fn))))
    assigned = {node.targets[0].id: node.value for node in ast.walk(tree)
                if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and getattr(node.func, "id", getattr(node.func, "attr", None)) == "schema_args"]
    assert calls, f"{fn.__name__} does not call schema_args"
    found = set()
    for call in calls:
        op, values = call.args[0].value, call.args[1]
        if isinstance(values, ast.Name):
            values = assigned[values.id]
        assert isinstance(values, ast.Call) and values.func.id == "dict" and not values.args, ast.unparse(values)
        for kw in values.keywords:
            assert isinstance(kw.value, ast.Name) and kw.value.id == kw.arg, f"{fn.__name__}: {ast.unparse(kw)}"
        found.add((op, frozenset(kw.arg for kw in values.keywords)))
    assert len(found) == 1, found
    return found.pop()


@pytest.mark.parametrize("fn", ENTRY_POINTS + [pareto.gram_weights], ids=lambda f: f.__name__)
def test_entry_points_pass_every_parameter_by_name(fn):
    """Each entry point hands schema_args an explicit ``dict(name=name, ...)`` of all its parameters
    (``locals()`` would be shorter, but Dynamo before torch 2.13 cannot trace it, so
    ``torch.compile(fullgraph=True)`` of the ops failed there). schema_args fills a name it is not
    given with the schema default, so a parameter left out of the dict would be silently ignored:
    this checks the dict against the signature."""
    op, keys = _schema_args_dict(fn)
    assert op == fn.__name__
    assert keys == set(inspect.signature(fn).parameters) - {"group"}


def test_no_locals_in_the_package():
    """``locals()`` cannot be traced by Dynamo before torch 2.13 (see above): none in the package."""
    root = pathlib.Path(op_table.__file__).parent
    hits = [f"{p.relative_to(root)}:{node.lineno}" for p in sorted(root.rglob("*.py"))
            for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, ast.Call)
            and getattr(node.func, "id", None) in ("locals", "vars") and not node.args]
    assert not hits, hits


def test_schema_args_normalises_and_fills_defaults():
    t = torch.zeros(2, 3, requires_grad=True)
    args = op_table.schema_args(
        "pama_policy_loss",
        dict(logp=t, old_logp=t, advantages=t * 2, mask=t, ref_logp=None, prefs=None, eps_lo=0, eps_hi=1,
             dual_clip=None, noon=1, whiten=0, method="pama", granularity="token", agg="token-mean", beta_loss=0,
             check_finite=True, group="not a schema argument"),
        detach=("advantages",))
    assert list(args) == list(op_table.arg_names("pama_policy_loss"))
    assert args["dual_clip"] == float("inf") and isinstance(args["eps_lo"], float)
    assert args["noon"] is True and args["whiten"] is False
    assert args["global_stats"] is None and args["cagrad_c"] == pytest.approx(0.4)
    assert not args["advantages"].requires_grad and args["logp"].requires_grad
    with pytest.raises(TypeError, match="missing argument 'mask'"):
        op_table.schema_args("objective_moments", dict(advantages=t))


@pytest.mark.parametrize("op", BACKWARD_OPS)
def test_backward_schemas_follow_the_naming_rule(op):
    backward, setup = op_table.schema_autograd(op, op_table.OPS[op])
    assert callable(backward) and callable(setup)


def test_naming_rule_violation_is_an_error(monkeypatch):
    parsed = dict(op_table.schemas())
    bad = str(parsed["multi_value_loss_backward"]).replace("grad_loss", "upstream").replace("pama_ext::", "")
    parsed["multi_value_loss_backward"] = torch._C.parse_schema(bad)
    monkeypatch.setattr(op_table, "schema", parsed.__getitem__)
    with pytest.raises(RuntimeError, match="'upstream' is neither grad_<output>"):
        op_table.schema_autograd("multi_value_loss", op_table.OPS["multi_value_loss"])
    bad = str(op_table.schemas()["multi_value_loss_backward"]).replace("grad_values", "dvalues")
    parsed["multi_value_loss_backward"] = torch._C.parse_schema(bad.replace("pama_ext::", ""))
    with pytest.raises(RuntimeError, match="name each output grad_<input"):
        op_table.schema_autograd("multi_value_loss", op_table.OPS["multi_value_loss"])


def test_policy_loss_autograd_is_the_librarys_own():
    """pama_policy_loss's and multi_value_loss's Autograd kernels are the C++ ones (csrc/autograd.cpp):
    register() left them in place (no Python formula on top), the losses' graph nodes are those
    kernels', and a Python formula for one is refused rather than silently stacked on the same
    dispatch key."""
    require_native()
    assert op_table.has_native_autograd("pama_policy_loss") and op_table.has_native_autograd("multi_value_loss")
    values = torch.randn(2, 3, 5, requires_grad=True)
    vloss = torch.ops.pama_ext.multi_value_loss(values, values.detach(), torch.randn(2, 3, 5),
                                                torch.ones(3, 5, dtype=torch.bool), 0.2, "token-mean", True)[0]
    assert "ValueLossFunction" in vloss.grad_fn.name()
    logp = torch.randn(2, 5, requires_grad=True)
    loss = torch.ops.pama_ext.pama_policy_loss(
        logp, logp.detach(), torch.randn(1, 2, 5), torch.ones(2, 5, dtype=torch.bool), None, None, 0.2, 0.2, 3.0,
        False, False, "linear", "token", "token-mean", 0.0, True)[0]
    assert "PolicyLossFunction" in loss.grad_fn.name()
    with pytest.raises(RuntimeError, match="have an Autograd kernel in the library"):
        op_table.register({"pama_policy_loss": (lambda ctx, *g: None, lambda ctx, inputs, output: None)})
