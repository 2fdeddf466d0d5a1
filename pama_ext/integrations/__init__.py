"""Adapters of the fused losses for existing RLHF frameworks.

- :mod:`pama_ext.integrations.verl`: policy loss ``"pama"`` and advantage estimator ``"pama_grpo"``
  for verl's registries (registered on import when verl is installed), and the driver-side hooks that
  let verl's stock trainer carry per-objective advantages;
- :mod:`pama_ext.integrations.verl_reward`: reward manager ``"pama_multi"`` for verl's reward loop
  (one score per objective; imports verl, registered by the verl module when verl's trainer imports);
- :mod:`pama_ext.integrations.openrlhf`: ``PolicyLoss``, a drop-in for OpenRLHF's PPO policy loss;
- :mod:`pama_ext.integrations.trl`: ``PamaGRPOTrainer``, a ``trl.GRPOTrainer`` subclass.

Each submodule imports its framework only when it is itself imported (``trl``, ``verl_reward``) or
lazily (``verl``; OpenRLHF is never imported), so ``import pama_ext.integrations`` needs none of them.
See docs/integrations.md.
"""

__all__ = ["verl", "openrlhf", "trl"]
