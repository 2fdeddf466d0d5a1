"""Data parallelism (algorithms §8): sharded ops equal one process holding the concatenated batch.

The module fixture spawns 2 and 3 gloo processes (dist_worker.py) once each; every rank runs all
cases on its shard (uneven shards; with 3 ranks one shard is fully masked). The tests compare the
ranks' loss, metrics and statistics (which must be global, the same on every rank) and the
concatenated shard gradients with the single-process ops on the whole batch.
"""
from __future__ import annotations

import os

import pytest
import torch

import pama_ext
from pama_ext import distributed as dp
from pama_ext import reference
from pama_ext.reference import stats_layout

import dist_worker as W
from pama_testutils import run_ranks

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)


def _tol(dtype: str):
    # float64: rounding of a different summation order only; float32: the same, at fp32 epsilon.
    return dict(rtol=1e-9, atol=1e-11) if dtype == "float64" else dict(rtol=2e-5, atol=2e-6)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda k: f"world{k}")
def ranks(request, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f"dist{world}")
    init_file = str(tmp / "init")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    run_ranks([[os.path.join(HERE, "dist_worker.py"), str(r), str(world), init_file, str(tmp)] for r in range(world)],
              env)
    return world, [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


def _single(kind: str, case: dict):
    batch = W.make_batch(getattr(torch, case["dtype"]))
    return {"policy": W.run_policy, "value": W.run_value, "stats": W.run_stats}[kind](case, batch)


def _check_loss_case(kind: str, idx: int, case: dict, ranks, grad_dim: int):
    world, results = ranks
    loss, metrics, grad = _single(kind, case)
    tol = _tol(case["dtype"])
    for r in range(world):
        r_loss, r_metrics, _ = results[r][kind][idx]
        torch.testing.assert_close(r_loss, loss, **tol, msg=lambda m: f"rank {r} loss: {m}")
        assert r_metrics.keys() == metrics.keys()
        for k in metrics:
            torch.testing.assert_close(r_metrics[k], metrics[k], **tol, msg=lambda m: f"rank {r} {k}: {m}")
    shards = torch.cat([results[r][kind][idx][2] for r in range(world)], dim=grad_dim)
    torch.testing.assert_close(shards, grad, **tol)
    assert torch.isfinite(shards).all()


@pytest.mark.parametrize("idx", range(len(W.POLICY_CASES)),
                         ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in W.POLICY_CASES])
def test_policy_loss_sharded_equals_whole_batch(ranks, idx):
    _check_loss_case("policy", idx, W.POLICY_CASES[idx], ranks, grad_dim=0)


@pytest.mark.parametrize("idx", range(len(W.VALUE_CASES)),
                         ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in W.VALUE_CASES])
def test_value_loss_sharded_equals_whole_batch(ranks, idx):
    _check_loss_case("value", idx, W.VALUE_CASES[idx], ranks, grad_dim=1)


@pytest.mark.parametrize("idx", range(len(W.STATS_CASES)),
                         ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in W.STATS_CASES])
def test_stats_sharded_equal_whole_batch(ranks, idx):
    world, results = ranks
    case = W.STATS_CASES[idx]
    stats = _single("stats", case)
    for r in range(world):
        torch.testing.assert_close(results[r]["stats"][idx], stats, **_tol(case["dtype"]))
    # every rank holds bitwise the same global statistics
    for r in range(1, world):
        assert torch.equal(results[r]["stats"][idx], results[0]["stats"][idx])


def test_modules_take_the_group(ranks):
    world, results = ranks
    assert W.POLICY_CASES[0]["method"] == "pama" and W.VALUE_CASES[0]["agg"] == "token-mean"
    for r in range(world):
        policy, value = results[r]["modules"]
        assert torch.equal(policy, results[r]["policy"][0][0])
        assert torch.equal(value, results[r]["value"][0][0])


def test_shards_include_a_fully_masked_rank():
    # the 3-rank layout really exercises a rank without a valid token (guards the fixture's intent)
    lo, hi = W.SHARDS[3][1]
    assert all(b in W.MASKED_ROWS for b in range(lo, hi))


@pytest.mark.parametrize("splits", [[5, 0, 6], [1, 10], [4, 4, 3], [11]])
def test_combine_moments_matches_whole_batch(splits):
    g = torch.Generator().manual_seed(len(splits))
    adv = torch.randn(4, 11, 9, generator=g, dtype=torch.float64) * 5 + 40  # a large mean
    mask = torch.rand(11, 9, generator=g) > 0.3
    rows, lo = [], 0
    for s in splits:
        rows.append(reference.objective_moments(adv[:, lo : lo + s], mask[lo : lo + s]))
        lo += s
    combined = dp.combine_moments(torch.stack(rows))
    torch.testing.assert_close(combined, reference.objective_moments(adv, mask), rtol=1e-12, atol=1e-12)


def test_objective_moments_op_matches_reference(device):
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(3, 7, 47, generator=g, dtype=torch.float64).to(device)
    mask = (torch.rand(7, 47, generator=g) > 0.4).to(device)
    mask[2] = False
    got = pama_ext.objective_moments(adv, mask)
    torch.testing.assert_close(got, reference.objective_moments(adv, mask))
    full = pama_ext.objective_stats(adv, adv[0], adv[0], mask)
    torch.testing.assert_close(got, full[: got.numel()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("whiten,noon", [(True, True), (False, False)])
def test_supplied_moments_skip_the_moments_pass(device, dtype, whiten, noon):
    """objective_stats(moments=its own moments) runs no moments pass (the per-row counts come from
    the mask), so it must equal the plain op bitwise; with_gram=False leaves the Gram entries 0 and
    changes nothing else. Odd T, an empty row and a one-token row."""
    g = torch.Generator().manual_seed(3)
    n, B, T = 3, 6, 37
    adv = (torch.randn(n, B, T, generator=g, dtype=torch.float64) * 2 + 0.5).to(device, dtype)
    logp = (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.1).to(device, dtype)
    old = (logp.double() + 0.05 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(device, dtype)
    mask = (torch.rand(B, T, generator=g) > 0.3).to(device)
    mask[1] = False
    mask[4] = False
    mask[4, 5] = True
    plain = torch.ops.pama_ext.objective_stats(adv, logp, old, mask, 0.2, whiten, noon)
    moments = pama_ext.objective_moments(adv, mask)
    supplied = torch.ops.pama_ext.objective_stats(adv, logp, old, mask, 0.2, whiten, noon, moments)
    assert torch.equal(supplied, plain)
    no_gram = torch.ops.pama_ext.objective_stats(adv, logp, old, mask, 0.2, whiten, noon, moments, False)
    gram = stats_layout(n)["gram"]
    assert torch.equal(no_gram[: gram.start], plain[: gram.start])
    assert torch.equal(no_gram[gram], torch.zeros_like(plain[gram]))
    assert bool(plain[gram].abs().sum() > 0)
    # the loss with the whole statistics vector supplied (its moments pass skipped too)
    for method in ("pama", "mgda"):
        kw = dict(method=method, granularity="token", whiten=whiten, noon=noon, check_finite=False)
        want = pama_ext.pama_policy_loss(logp, old, adv, mask, **kw)
        got = torch.ops.pama_ext.pama_policy_loss(
            logp, old, adv, mask, None, None, 0.2, 0.2, 3.0, noon, whiten, method, "token", "token-mean", 0.0,
            False, plain)
        assert torch.equal(got[0], want[0])
        assert torch.equal(got[1][: len(pama_ext.ops.METRIC_SCALARS)],
                           torch.stack([want[1][k] for k in pama_ext.ops.METRIC_SCALARS]))


def test_no_group_never_touches_torch_distributed(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("torch.distributed called without a group")

    for name in ("all_reduce", "all_gather_into_tensor", "get_world_size"):
        monkeypatch.setattr(torch.distributed, name, boom)
    b = W.make_batch(torch.float64)
    W.run_policy(W.POLICY_CASES[0], b)
    W.run_value(W.VALUE_CASES[0], b)
    W.run_stats(W.STATS_CASES[0], b)


def test_supplied_statistics_are_checked():
    b = W.make_batch(torch.float32)
    with pytest.raises(ValueError, match="global_stats must be a statistics vector"):
        torch.ops.pama_ext.pama_policy_loss(
            b["logp"], b["old_logp"], b["advantages"], b["mask"], None, None, 0.2, 0.2, 3.0, True, True, "pama",
            "token", "token-mean", 0.0, True, torch.zeros(5),
        )
    with pytest.raises(TypeError, match="moments must be Float"):
        torch.ops.pama_ext.objective_stats(
            b["advantages"], b["logp"], b["old_logp"], b["mask"], 0.2, True, True,
            torch.zeros(2 + 2 * W.N_OBJ, dtype=torch.float64),
        )
    with pytest.raises(ValueError, match="denominators must be the global"):
        torch.ops.pama_ext.multi_value_loss(
            b["values"], b["old_values"], b["returns"], b["mask"], 0.2, "token-mean", True, torch.zeros(3),
        )
