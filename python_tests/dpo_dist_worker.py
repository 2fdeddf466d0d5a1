"""One rank of the preference trainer's data-parallel test (test_dpo_distributed.py spawns 2 of these).

Every rank runs every method for a few steps with ``group=WORLD`` (gloo, CPU) on the same JSONL pairs;
each step's global batch (5 pairs: shards of 2 and 3 -- uneven) is split over the ranks and the
gradients are summed before the Gram. It saves the step metrics, the gradient handed to the optimizer
at each step and the final parameters; the test
compares them with one process holding the whole batch. The pairs, the settings and the runner are
defined here once and imported by the test.

usage: python dpo_dist_worker.py RANK WORLD_SIZE INIT_FILE OUT_DIR WORLD_CACHE DATA_FILE
"""
from __future__ import annotations

import json
import os
import sys
import warnings

import torch

from pama_ext.dpo.config import METHODS, MOPO_METHODS

#: the runs: every method, plus modpo with its first stage (margin reward models trained from the labels,
#: data parallel like the second stage)
CASES = {**{m: (m, {}) for m in METHODS}, "modpo-labels": ("modpo", {"modpo_margin": "labels",
                                                                      "modpo_margin_steps": 2})}
STEPS = 2


def write_pairs(path: str) -> str:
    """12 pairs over 6 prompts, with conflicting labels, in the JSONL format."""
    rows = []
    words = ["great", "dull", "long and slow", "fine", "bad", "lovely and warm"]
    for i in range(12):
        a, b = words[i % 6], words[(i + 2) % 6]
        rows.append({"prompt": f"This movie {i % 6}", "chosen": f"was {a}.", "rejected": f"was {b} {i}.",
                     "labels": {"sentiment": 1 if i % 3 else -1, "length": -1 if i % 2 else 1}})
    with open(path, "w") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(case: str, world_cache: str, data: str, out: str):
    from pama_ext.dpo.config import DPOConfig

    method, extra = CASES[case]
    # mopo: batch 3 prompts (with all their stored responses, sharded over the ranks)
    return DPOConfig(model="tiny", data=data, tiny_world_cache=world_cache, method=method, steps=STEPS,
                     batch_size=3 if method in MOPO_METHODS else 5, micro_batch_size=2, max_response_tokens=12,
                     output_dir=out, progress=False, log_every=0, plots=False, save_model=False, lr=1e-2,
                     mopo_t0=1, seed=5, **extra).validate()


def run_steps(cfg, group=None):
    """(per-step metrics, per-step gradients handed to the optimizer, final parameters) of ``cfg.steps`` steps."""
    from pama_ext.dpo.methods import make_trainer
    from pama_ext.dpo.train import load_data, prepare_world
    from pama_ext.lm.hf import load_lm, load_tokenizer
    from pama_ext.lm.policy import PolicyWithValueHeads, frozen_copy
    from pama_ext.lm.rewards import build_objectives
    from pama_ext.lm.seeding import seed_everything

    seed_everything(cfg.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        world = prepare_world(cfg)
    judges = build_objectives(cfg)
    tok = load_tokenizer(world["model_path"])
    ref = frozen_copy(load_lm(world["model_path"], "cpu"))
    policy = PolicyWithValueHeads(load_lm(world["model_path"], "cpu"), 1)
    data = load_data(cfg, world, ref, tok, judges)
    tr = make_trainer(cfg, policy, ref, tok, data, judges, torch.device("cpu"), group=group)
    grads = []
    step = tr.optimizer.step

    def recording_step(*a, **kw):  # the update direction of each step, after clipping, before AdamW
        grads.append([p.grad.detach().clone() for p in tr.params])
        return step(*a, **kw)

    tr.optimizer.step = recording_step
    for _ in range(cfg.steps):
        tr.step()
    return tr.flush_metrics(), grads, {k: v.detach().clone() for k, v in policy.lm.state_dict().items()}


def main() -> None:
    rank, world, init_file, out, world_cache, data = sys.argv[1:7]
    rank, world = int(rank), int(world)
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for m in CASES:
            metrics, grads, params = run_steps(config(m, world_cache, data, os.path.join(out, "unused")),
                                               dist.group.WORLD)
            torch.save({"metrics": metrics, "grads": grads, "params": params}, os.path.join(out, f"{m}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
