"""pama_ext's benchmarks: each op family against its baselines (pama_ext.reference eager,
torch.compile(reference), the peers' formulations), shipped with the package.

Run a suite with ``pama-ext bench SUITE [options]`` or ``python -m pama_ext.benchmarks.<module>``;
``pama-ext bench SUITE --help`` lists its options. Results go to ``--out`` (default: a source
checkout's benchmarks/results/, else ./bench_results/). Layout: common.py (timing, inputs, rows,
files), baselines.py (the baselines, defined once), one module per op family (policy_loss, gae,
stats, value_loss, token_rewards, dpo_loss, gradient_gram, gram_solvers, fused_linear, trainer_scale, trl_step, headline, e2e; models.py
holds the GPT-2 of the last two) and the drivers below.
"""
from __future__ import annotations

# suite name (pama-ext bench SUITE): (module under pama_ext.benchmarks, one-line description)
SUITES = {
    "ops": ("bench_ops", "sweep of the fused ops vs reference eager / torch.compile / Python loop (CPU default): "
                         "policy_loss, gae, value_loss, token_rewards, dpo_loss"),
    "gpu": ("bench_gpu", "GPU suite: bandwidth, policy_loss, gae, stats + weights, headline (PAMA vs "
                         "full-gradient MGDA), e2e (share of a PPO step); --cpu for the model sections"),
    "gradient-gram": ("gradient_gram", "gradient_gram + combine_gradients vs the concatenate-and-matmul step"),
    "gram-solvers": ("gram_solvers", "the native Gram solvers (mgda, cagrad, pcgrad) vs the reference solvers"),
    "fused-linear": ("fused_linear", "fused output layer + policy loss vs unfused logits vs Liger's "
                                     "LigerFusedLinearGRPOLoss: time and peak memory (fresh process per case)"),
    "trainer-scale": ("trainer_scale", "one PPO step of a random GPT-2-small-shaped model (124M) under the "
                                       "trainer's memory / precision options: peak resident set and step time"),
    "trl-step": ("trl_step", "PamaGRPOTrainer's loss step on TRL's tiled LM head vs fused_linear=True: time, peak "
                             "memory, output-layer matmuls (fresh process per case)"),
    "distributed": ("distributed", "policy + value loss across ranks (gloo / nccl): collective overhead"),
    "plot": ("plot_ops", "re-draw the bench_ops plot from its CSV"),
}
