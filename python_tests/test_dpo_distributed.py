"""The preference trainer data-parallel (gloo, CPU) against one process holding the global batch.

Two ranks (dpo_dist_worker.py) run every method on uneven shards of each step's batch; their per-objective
gradients are summed before the Gram, so the coefficients, the Gram, the losses and the update direction
equal the single process's to float32 rounding (a different summation order), and the ranks hold
bitwise the same parameters. One ``torchrun --nproc_per_node 2 -m pama_ext.cli dpo`` run checks the
command-line path (rank 0 alone writes the run directory)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("vaderSentiment")
pytest.importorskip("yaml")

import dpo_dist_worker as W  # noqa: E402
from pama_testutils import run_ranks  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOL = dict(rtol=2e-5, atol=2e-6)  # float32, a different summation order

pytestmark = [
    pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                       reason="torch.distributed with gloo is not available"),
    pytest.mark.filterwarnings("ignore:the cached tiny world:UserWarning"),
]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]))


@pytest.fixture(scope="module")
def ranks(world_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo_dist")
    data = W.write_pairs(str(tmp / "pairs.jsonl"))
    run_ranks([[os.path.join(HERE, "dpo_dist_worker.py"), str(r), "2", str(tmp / "init"), str(tmp), world_cache, data]
               for r in range(2)], _env(), cwd=ROOT)
    return data, tmp, {m: [torch.load(tmp / f"{m}_rank{r}.pt") for r in range(2)] for m in W.CASES}


def _close(a, b, path):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), **TOL, msg=path)
    else:
        torch.testing.assert_close(torch.tensor(float(a)), torch.tensor(float(b)), **TOL, msg=path)


@pytest.mark.parametrize("method", list(W.CASES))
def test_two_ranks_match_one_process(ranks, world_cache, tmp_path, method):
    data, _tmp, res = ranks
    r0, r1 = res[method]
    for k in r0["params"]:  # every rank applies the same reduced update
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    metrics, grads, params = W.run_steps(W.config(method, world_cache, data, str(tmp_path / "unused")))
    assert len(metrics) == len(r0["metrics"]) == W.STEPS
    for s, (a, b) in enumerate(zip(metrics, r0["metrics"])):
        _close(a, b, f"{method} step {s + 1}")
    # step 1 starts from the same parameters: the update direction (Σ a_i g_i of the global batch for raco /
    # cagrad, the summed gradient otherwise, clipped) is the single process's. The parameters themselves are
    # not compared elementwise: AdamW's g/√v turns rounding-level differences of entries whose gradient is
    # ~0 into steps of order lr, so after a step they agree only where the gradient is not ~0.
    assert len(grads[0]) == len(r0["grads"][0])
    for i, (g, h) in enumerate(zip(grads[0], r0["grads"][0])):
        torch.testing.assert_close(h, g, **TOL, msg=f"{method}: gradient of parameter {i}")
    assert any(float(g.abs().max()) > 0 for g in grads[0])
    # the steps did something: the parameters are not the initial ones
    from pama_ext.dpo.train import prepare_world
    from pama_ext.lm.hf import load_lm

    init = load_lm(prepare_world(W.config(method, world_cache, data, str(tmp_path / "u")))["model_path"],
                   "cpu").state_dict()
    assert any(not torch.equal(init[k], params[k]) for k in params if k in init)


def test_torchrun_cli_matches_one_process(ranks, world_cache, tmp_path):
    data, _tmp, _res = ranks
    flags = ["dpo", "--model", "tiny", "--tiny-world-cache", world_cache, "--data", data, "--method", "raco",
             "--steps", "2", "--batch-size", "5", "--micro-batch-size", "2", "--max-response-tokens", "12",
             "--eval-size", "2", "--eval-samples", "1", "--max-new-tokens", "6", "--no-progress", "--log-every", "0",
             "--no-plots", "--no-save-model", "--threads", "1", "--seed", "5"]
    single, multi = tmp_path / "single", tmp_path / "ddp"
    for cmd in ([sys.executable, "-m", "pama_ext.cli", *flags, "--output-dir", str(single)],
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "-m", "pama_ext.cli", *flags, "--output-dir", str(multi)]):
        env = _env()
        env.pop("WORLD_SIZE", None)
        r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=600)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-6000:]}"
    rows = {d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (single, multi)}
    assert len(rows[single]) == len(rows[multi]) == 2
    for a, b in zip(rows[single], rows[multi]):
        _close(a, b, "cli metrics")
    assert (multi / "checkpoint" / "checkpoint.json").is_file() and (multi / "eval.json").is_file()
