"""Seeds and seeded orders shared by the trainers.

- :func:`derive_seed`: a seed that depends only on (run seed, purpose, step), so the sample stream of
  every step is known without replaying the steps before it (what makes ``--resume`` exact);
- :func:`seed_everything`: Python's, NumPy's and torch's global generators from the run seed;
- :class:`EpochSampler`: epochs over n items, each in a fresh random order drawn from a generator.
"""
from __future__ import annotations

from typing import Any, Dict, List

__all__ = ["derive_seed", "seed_everything", "EpochSampler"]


def derive_seed(seed: int, purpose: str, step: int) -> int:
    """A 63-bit seed that depends only on (run seed, purpose, step)."""
    h = 1469598103934665603
    for ch in f"{seed}/{purpose}/{step}":
        h = ((h ^ ord(ch)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch's."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class EpochSampler:
    """Epochs over ``n`` items in a seeded random order: :meth:`take` hands out the next ``k`` indices,
    starting a new epoch (``torch.randperm(n, generator=generator)``) whenever one is used up. The
    generator is the caller's (it may draw other numbers from it too); :meth:`state_dict` holds the
    current epoch's order and position."""

    def __init__(self, n: int, generator) -> None:
        self.n, self.generator = int(n), generator
        self.order: List[int] = []
        self.pos = 0

    def take(self, k: int) -> List[int]:
        import torch

        out: List[int] = []
        while len(out) < k:
            if self.pos >= len(self.order):
                self.order = torch.randperm(self.n, generator=self.generator).tolist()
                self.pos = 0
            step = min(k - len(out), len(self.order) - self.pos)
            out += self.order[self.pos:self.pos + step]
            self.pos += step
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {"order": list(self.order), "pos": self.pos}

    def load_state_dict(self, s: Dict[str, Any]) -> None:
        self.order = list(s["order"])
        self.pos = int(s["pos"])
