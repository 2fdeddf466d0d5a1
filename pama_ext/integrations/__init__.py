"""Adapters of the fused losses for existing RLHF frameworks.

- :mod:`pama_ext.integrations.verl`: policy loss ``"pama"`` and advantage estimator ``"pama_grpo"``
  for verl's registries (registered on import when verl is installed);
- :mod:`pama_ext.integrations.openrlhf`: ``PolicyLoss``, a drop-in for OpenRLHF's PPO policy loss;
- :mod:`pama_ext.integrations.trl`: ``PamaGRPOTrainer``, a ``trl.GRPOTrainer`` subclass.

Each submodule imports its framework only when it is itself imported (``trl``) or lazily
(``verl``; OpenRLHF is never imported), so ``import pama_ext.integrations`` needs none of them.
See docs/integrations.md.
"""

__all__ = ["verl", "openrlhf", "trl"]
