"""The small multi-objective PPO trainer of pama_ext (``pama-ext train``).

- :mod:`.config`: ``TrainConfig`` and the method table; :mod:`.ppo`: ``PPOTrainer`` (one step, the five
  methods); :mod:`.train`: ``train(config)``, the run directory and the ``train`` subcommand;
- checkpoints: :mod:`pama_ext.lm.checkpoint` (shared with ``pama-ext dpo``); :mod:`.evaluate`: evaluations,
  hypervolume, tables;
- :mod:`.plots`: reward curves and the Pareto plot; :mod:`.demo`: the single-seed demo (``make demo`` runs ``pama-ext compare``).

The language-model pieces it shares with :mod:`pama_ext.dpo` (policy with value heads, rollout,
rewards, HF loading, config plumbing) are in :mod:`pama_ext.lm`; the embedded offline default model
is :mod:`pama_ext.tiny_world`.

Submodules are imported lazily: importing this package does not import transformers.
"""
