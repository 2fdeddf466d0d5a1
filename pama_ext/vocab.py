"""The vocabularies and layouts of the ops, mirrored once from the C++ library (csrc/pama_math.h).

Every Python module takes these names from here: the op entry points and their argument checks, the
fake kernels, the reference implementation, the trainers and the adapters. The compiled library
exposes its own copies (``torch.ops.pama_ext.weighting_methods()``, ``stats_layout(n)``) and
python_tests/test_vocab.py checks that the two agree, so adding a method or a statistic means
changing pama_math.h and this file, nowhere else.
"""
from __future__ import annotations

from typing import Dict, Tuple

__all__ = [
    "MAX_OBJECTIVES",
    "METHODS",
    "GRAM_METHODS",
    "GRAM_BASED",
    "GRANULARITIES",
    "AGG_MODES",
    "METRIC_SCALARS",
    "STATS_FIELDS",
    "WHITEN_EPS",
    "LOG_RATIO_CLAMP",
    "CAGRAD_C",
    "stats_layout",
    "stats_size",
    "stats_num_objectives",
]

MAX_OBJECTIVES = 64
#: Weighting methods (pama::Method, in enum order). ``pama`` is Theorem 1 (closed form, needs the
#: per-token statistics); ``linear`` the user weights; ``mgda`` the min-norm point; ``cagrad`` and
#: ``raco`` (CAGrad with RACO's clip) CAGrad's coefficients; ``pcgrad`` PCGrad in Gram form. The last
#: four work on a Gram matrix: the statistics Gram in the policy loss, any Gram in ``gram_weights``.
METHODS: Tuple[str, ...] = ("pama", "linear", "mgda", "cagrad", "raco", "pcgrad")
#: The methods of the Gram op (every method but pama).
GRAM_METHODS: Tuple[str, ...] = METHODS[1:]
#: The methods whose weights come from the statistics Gram (the policy loss computes it for them).
GRAM_BASED: Tuple[str, ...] = METHODS[2:]
GRANULARITIES: Tuple[str, ...] = ("token", "sequence", "batch")
AGG_MODES: Tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
#: Scalar metrics of pama_policy_loss, in the order of the flat metrics vector.
METRIC_SCALARS: Tuple[str, ...] = ("pg_loss", "kl_loss", "clipfrac", "approx_kl", "active")
#: The statistics vector (pama::StatsLayout): (name, entries per objective power) in order;
#: 0 = one entry, 1 = n entries, 2 = n * n entries.
STATS_FIELDS: Tuple[Tuple[str, int], ...] = (
    ("count", 0), ("num_seqs", 0), ("mean", 1), ("var", 1), ("abar", 1), ("pos", 1), ("ctok", 1), ("cseq", 1),
    ("gram", 2),
)
WHITEN_EPS = 1e-8
LOG_RATIO_CLAMP = 20.0
#: Default c of the cagrad / raco methods.
CAGRAD_C = 0.4


def stats_layout(n: int) -> Dict[str, slice]:
    """Slices of the flat statistics vector for ``n`` objectives:
    ``[count, num_seqs, mean(n), var(n), abar(n), pos(n), ctok(n), cseq(n), gram(n*n)]``.
    ``ctok`` is the mean over masked tokens of the per-token Theorem-1 weights, ``cseq`` the mean
    over non-empty sequences of the per-sequence ones."""
    out, off = {}, 0
    for name, power in STATS_FIELDS:
        size = n ** power
        out[name] = slice(off, off + size)
        off += size
    return out


def stats_size(n: int) -> int:
    """Entries of the statistics vector, ``(n + 3)**2 - 7``."""
    return stats_layout(n)["gram"].stop


def stats_num_objectives(length: int) -> int:
    """The n whose statistics vector has ``length`` entries (ValueError when none in [1, 64] does)."""
    for n in range(1, MAX_OBJECTIVES + 1):
        if stats_size(n) == length:
            return n
    raise ValueError(f"stats: a statistics vector has (n+3)^2-7 entries for n objectives in [1, {MAX_OBJECTIVES}]; "
                     f"got length {length}")
