"""The trainer under ``torchrun --nproc_per_node 2`` (gloo, CPU, DDP) against one process.

Same global batch, same seeds: every step's metrics (rewards, KL, losses, weights, statistics,
gradient norm) must agree to float rounding, and so must the final evaluation.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("vaderSentiment")
pytest.importorskip("yaml")
pytest.importorskip("tqdm")

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)

# one minibatch per epoch: the global minibatch is then the same rows in both runs (see ppo.py)
FLAGS = ["--model", "tiny", "--steps", "2", "--batch-size", "8", "--minibatch-size", "8", "--ppo-epochs", "2",
         "--rollout-chunk", "2", "--max-new-tokens", "6", "--eval-size", "4", "--eval-batch-size", "4",
         "--no-progress", "--log-every", "0", "--no-plots", "--threads", "1", "--seed", "3"]
#: the step metrics compared between the runs (timings differ by nature)
KEYS = ["rewards", "rewards_std", "kl", "kl_coef", "response_len", "response_chars", "loss", "pg_loss", "vf_loss",
        "clipfrac", "approx_kl", "active", "vf_clipfrac", "grad_norm", "weights", "abar", "pos", "head_loss",
        "updates", "skipped"]


def _run(cmd, env):
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-6000:]}"


def _close(a, b, path="metrics"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=2e-4, abs=2e-5), f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


@pytest.mark.parametrize("method", ["pama", "morlhf"])
def test_torchrun_two_ranks_match_one_process(world_cache, tmp_path, method):
    env = dict(os.environ, OMP_NUM_THREADS="1", PAMA_EXT_CACHE=world_cache)
    env.pop("WORLD_SIZE", None)
    flags = FLAGS + ["--method", method, "--tiny-world-cache", world_cache]
    single, multi = tmp_path / "single", tmp_path / "ddp"
    _run([sys.executable, "-m", "pama_ext.cli", "train", *flags, "--output-dir", str(single)], env)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "pama_ext.cli", "train", *flags, "--output-dir", str(multi)], env)
    rows = {}
    for name, d in (("single", single), ("ddp", multi)):
        rows[name] = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert len(rows["single"]) == len(rows["ddp"]) == 2
    for a, b in zip(rows["single"], rows["ddp"]):
        _close({k: a[k] for k in KEYS}, {k: b[k] for k in KEYS})
    evals = {name: [json.loads(x) for x in (d / "eval.jsonl").read_text().splitlines()]
             for name, d in (("single", single), ("ddp", multi))}
    _close(evals["single"][-1]["objectives"], evals["ddp"][-1]["objectives"])
    # rank 0 alone writes the run directory
    assert not any(p.name.startswith("rank") for p in multi.iterdir())


def test_torchrun_config_errors(monkeypatch):
    from pama_ext.trainer.config import ConfigError, TrainConfig

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="--batch-size: must be divisible by the number of ranks"):
        TrainConfig(batch_size=7, minibatch_size=1).validate()
    with pytest.raises(ConfigError, match="--minibatch-size: must be divisible"):
        TrainConfig(batch_size=8, minibatch_size=3).validate()
    with pytest.raises(ConfigError, match="--rollout-chunk: must divide"):
        TrainConfig(batch_size=16, minibatch_size=8, rollout_chunk=3).validate()
    with pytest.raises(ConfigError, match="--method: mgda is not supported|computes its weights"):
        TrainConfig(batch_size=8, minibatch_size=4, method="mgda").validate()
