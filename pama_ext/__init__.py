"""pama_ext: fused ops for multi-objective alignment of language models (PAMA, Noon PPO).

Data flow of one PPO step::

    token_rewards -> multi_gae -> objective_stats -> pareto_weights -> pama_policy_loss
                                                                    -> multi_value_loss

``pama_policy_loss`` computes the statistics and weights itself; the separate ops exist for
inspection and for trainers that need them. The math: docs/algorithms.md. The vocabularies (weighting
methods, granularities, aggregations, the statistics layout): :mod:`pama_ext.vocab`.
"""
from . import distributed, functional, vocab
from ._native import NATIVE_AVAILABLE, NATIVE_ERROR
from . import ops, pareto, preference
from .losses import MultiValueLoss, PamaPolicyLoss
from .fused_linear import fused_linear_logp, fused_linear_policy_loss
from .ops import (
    has_cuda_kernels,
    multi_gae,
    multi_value_loss,
    objective_moments,
    objective_stats,
    pama_policy_loss,
    pareto_weights,
    stats_layout,
    token_rewards,
)
from .preference import combine_gradients, gradient_gram, multi_dpo_loss

try:
    from ._build_info import VERSION as __version__
except ImportError:  # source tree without a build
    __version__ = "0.1.0"

__all__ = [
    "distributed",
    "functional",
    "vocab",
    "pareto",
    "NATIVE_AVAILABLE",
    "NATIVE_ERROR",
    "PamaPolicyLoss",
    "MultiValueLoss",
    "fused_linear_logp",
    "fused_linear_policy_loss",
    *ops.__all__,
    *preference.__all__,
]
