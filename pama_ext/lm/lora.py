"""LoRA adapters on the policy (``--lora-r``, through ``peft``), the reference policy being the same
model with its adapters switched off: no second copy of the weights.

:func:`add_lora` injects the adapters into a causal LM in place and returns the ``peft`` model; the
LM it wraps (``peft_model.get_base_model()``) keeps its interface (``base_model``, the output layer),
so :class:`~pama_ext.lm.policy.PolicyWithValueHeads` uses it unchanged, and only the adapter weights
(and the value heads) require gradients. :class:`AdapterDisabled` is what the rollout scores the
reference log-probs with. :func:`merged_copy` is the plain LM (adapters merged) that a checkpoint stores.
"""
from __future__ import annotations

import copy
from typing import List, Optional

from torch import nn

__all__ = ["PEFT_VERSION", "add_lora", "AdapterDisabled", "merged_copy", "is_lora"]

#: the peft release the trainer's LoRA path is tested with (Makefile TRAIN_DEPS, pyproject's train extra)
PEFT_VERSION = "0.21.2"


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError(f"--lora-r: needs peft (pip install peft=={PEFT_VERSION}): {e}") from None
    return peft


def add_lora(lm: nn.Module, r: int, alpha: float, targets: Optional[List[str]] = None):
    """LoRA of rank ``r`` and scale ``alpha / r`` on ``targets`` (module names; None: peft's default
    for the architecture), no dropout, no bias; returns the peft model (``lm`` is changed in place)."""
    peft = _peft()
    cfg = peft.LoraConfig(r=int(r), lora_alpha=float(alpha), target_modules=list(targets) if targets else None,
                          lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    try:
        return peft.get_peft_model(lm, cfg)
    except ValueError as e:  # e.g. target modules not found in the model
        raise ValueError(f"--lora-targets: {e}") from None


def is_lora(lm: nn.Module) -> bool:
    """True when ``lm`` carries LoRA layers (from :func:`add_lora`)."""
    return any(type(m).__module__.startswith("peft.") for m in lm.modules())


class _Trunk:
    def __init__(self, peft_model):
        self.peft_model = peft_model

    def __call__(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model.get_base_model().base_model(*args, **kwargs)


class AdapterDisabled:
    """The reference policy of a LoRA run: the policy's own LM with the adapters switched off while it
    runs. Offers what the reference scoring uses: ``base_model(...)`` (the trunk) and
    ``get_output_embeddings()`` (the output layer, which LoRA does not touch unless targeted, in
    which case the trunk call alone would not switch it off: refused)."""

    def __init__(self, peft_model):
        self.peft_model = peft_model
        self.base_model = _Trunk(peft_model)
        head = peft_model.get_base_model().get_output_embeddings()
        if is_lora(head):
            raise ValueError("--lora-targets: the output layer cannot be a LoRA target (the reference policy "
                             "is the model with its adapters off, scored through the trunk and the output layer)")

    def get_output_embeddings(self) -> nn.Module:
        return self.peft_model.get_base_model().get_output_embeddings()

    @property
    def config(self):
        """The model's config (its logits transform: pama_ext.lm.policy.logits_transform)."""
        return self.peft_model.get_base_model().config


def merged_copy(peft_model) -> nn.Module:
    """A plain copy of the LM with the adapters merged into its weights (what a checkpoint saves);
    the training model is left as it is."""
    return copy.deepcopy(peft_model).merge_and_unload()
