"""Statistics of a comparison: intervals over training seeds AND evaluation prompts (pure functions).

The data of one method and one objective is a matrix ``X[s, p]``: the score of the response to
evaluation prompt ``p`` of the policy trained with seed ``s``. Every method is evaluated on the same
prompts with the same sampling stream, and trained from the same seeds, so two methods' matrices are
**paired** cell by cell.

The model behind the intervals is the two-way crossed random-effects model
``X[s, p] = mu + a_s + b_p + e_sp`` (seed effect, prompt effect, residual). The variance of the grand mean
is ``var(a)/S + var(b)/P + var(e)/(S P)``; its unbiased estimate from the mean squares of the two-way
ANOVA is ``(MS_seed + MS_prompt - MS_resid) / (S P)``, and the 95 % interval is
``mean +- t(0.975, nu) * se`` with Satterthwaite's degrees of freedom ``nu``. This is what a
resampling of seeds *and* prompts estimates, but without the bias of the percentile bootstrap at a
handful of seeds: resampling 3 seeds with replacement sees the seed spread shrunk by (S-1)/S and a
normal quantile where a t with 2 degrees of freedom belongs, so its "95 %" interval covers far less
(docs/results.md gives the measured coverage). With few seeds the intervals are honestly wide.

- :func:`crossed_interval`: mean and interval of one ``[S, P]`` matrix;
- :func:`paired_difference`: the same for ``X_method - X_baseline`` (paired cells), with a verdict;
- :func:`hypervolume_interval`: hypervolume of a front of per-method mean vectors, its interval by the
  delta method (the hypervolume's gradient w.r.t. the means, applied cell by cell, then
  :func:`crossed_interval`);
- :func:`interpolate_at`: a method's reward at a given KL from its (KL, reward) curve (matched-KL);
- :func:`hypervolume` (exact; re-exported from the trainer's evaluation module, one implementation).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence

import numpy as np

from ..trainer.evaluate import hypervolume

__all__ = ["Interval", "crossed_interval", "paired_difference", "verdict", "hypervolume", "hypervolume_interval",
           "interpolate_at", "t_quantile", "LEVEL", "VERDICTS"]

#: confidence level of every interval
LEVEL = 0.95
#: the verdict column: the interval of (method - baseline) above 0, below 0, or containing 0
VERDICTS = ("better", "worse", "within noise")


@dataclass(frozen=True)
class Interval:
    """An estimate with its two-sided interval: ``mean`` in [``lo``, ``hi``]; ``se`` the standard error,
    ``df`` the degrees of freedom of the t quantile, ``n_seeds`` / ``n_prompts`` the data it rests on."""
    mean: float
    lo: float
    hi: float
    se: float
    df: float
    n_seeds: int
    n_prompts: int

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def contains(self, x: float) -> bool:
        return self.lo <= x <= self.hi

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)

    def fmt(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t with ``df`` (real, > 0) degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(q, df))


def _as_matrix(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name}: expected a [seeds, prompts] matrix; got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: non-finite values")
    return a


def crossed_interval(x, level: float = LEVEL) -> Interval:
    """Mean of ``x[s, p]`` with its ``level`` interval under the two-way crossed random-effects model
    (seeds and prompts both random; see the module docstring). Needs at least 2 seeds; with one prompt
    (``[S]`` or ``[S, 1]``, e.g. one number per seed) it is the usual t interval over seeds."""
    a = _as_matrix(x, "x")
    S, P = a.shape
    if S < 2:
        raise ValueError(f"x: an interval needs at least 2 seeds; got {S}")
    m = float(a.mean())
    row = a.mean(1)
    if P == 1:
        v_s = float(row.var(ddof=1)) / S
        comps, dfs = [v_s], [S - 1]
        var = v_s
    else:
        col = a.mean(0)
        ms_s = P * float(row.var(ddof=1))
        ms_p = S * float(col.var(ddof=1))
        resid = a - row[:, None] - col[None, :] + m
        ms_e = float((resid ** 2).sum()) / ((S - 1) * (P - 1))
        # (MS_s + MS_p - MS_e) / (SP), never below the residual part alone (a negative variance-component
        # estimate is truncated at zero, as usual)
        comps = [ms_s / (S * P), ms_p / (S * P), -ms_e / (S * P)]
        dfs = [S - 1, P - 1, (S - 1) * (P - 1)]
        var = max(sum(comps), ms_e / (S * P))
    se = math.sqrt(max(var, 0.0))
    if se == 0.0:
        return Interval(m, m, m, 0.0, float("inf"), S, P)
    denom = sum(c * c / d for c, d in zip(comps, dfs))
    df = max(var * var / denom, 1.0) if denom > 0 else float(S - 1)
    df = min(df, 1e6)
    h = t_quantile(0.5 + level / 2, df) * se
    return Interval(m, m - h, m + h, se, df, S, P)


def verdict(diff: Interval, higher_is_better: bool = True) -> str:
    """``better`` / ``worse`` when the interval of (method - baseline) excludes 0, else ``within noise``."""
    if diff.lo > 0:
        return VERDICTS[0] if higher_is_better else VERDICTS[1]
    if diff.hi < 0:
        return VERDICTS[1] if higher_is_better else VERDICTS[0]
    return VERDICTS[2]


def paired_difference(x, baseline, level: float = LEVEL) -> Interval:
    """Interval of mean(x - baseline) for paired ``[S, P]`` matrices (same seeds, same prompts)."""
    a, b = _as_matrix(x, "x"), _as_matrix(baseline, "baseline")
    if a.shape != b.shape:
        raise ValueError(f"baseline: shape {b.shape} does not pair with x's {a.shape}")
    return crossed_interval(a - b, level)


def _hv_gradient(means: np.ndarray, ref: Sequence[float], rel: float = 1e-6) -> np.ndarray:
    """d hypervolume / d means[k, j] by central differences (the hypervolume is piecewise polynomial)."""
    g = np.zeros_like(means)
    scale = max(1e-12, float(np.abs(means).max()) if means.size else 1.0)
    h = rel * scale
    for k in range(means.shape[0]):
        for j in range(means.shape[1]):
            up, dn = means.copy(), means.copy()
            up[k, j] += h
            dn[k, j] -= h
            g[k, j] = (hypervolume(up, ref) - hypervolume(dn, ref)) / (2 * h)
    return g


def hypervolume_interval(data, ref: Sequence[float], level: float = LEVEL) -> Interval:
    """Hypervolume of the front of ``K`` points (point k = the per-objective means of ``data[k]``, a
    ``[n_objectives, S, P]`` array; all points share seeds and prompts) above ``ref``, with its interval.

    Delta method: with g = d HV / d mean[k, j], the cell values ``z[s, p] = sum_kj g_kj X_kj[s, p]`` have the
    hypervolume's first-order fluctuation as their mean's; :func:`crossed_interval` of ``z`` gives the standard
    error, centred on the hypervolume itself. Points that do not dominate ``ref`` contribute nothing (and have
    zero gradient)."""
    arrs = [np.asarray(d, dtype=np.float64) for d in data]
    if not arrs:
        raise ValueError("data: expected at least one point")
    shape = arrs[0].shape
    if len(shape) != 3 or any(a.shape != shape for a in arrs):
        raise ValueError(f"data: expected K arrays of one shape [n_objectives, seeds, prompts]; got "
                         f"{[a.shape for a in arrs]}")
    if shape[0] != len(ref):
        raise ValueError(f"ref: expected {shape[0]} values (one per objective); got {len(ref)}")
    X = np.stack(arrs)  # [K, n, S, P]
    means = X.mean((2, 3))
    hv = hypervolume(means, ref)
    g = _hv_gradient(means, ref)
    z = np.einsum("kj,kjsp->sp", g, X)
    iv = crossed_interval(z, level)
    return Interval(hv, hv - (iv.mean - iv.lo), hv + (iv.hi - iv.mean), iv.se, iv.df, iv.n_seeds, iv.n_prompts)


def interpolate_at(kl: Sequence[float], reward: Sequence[float], target: float) -> Optional[float]:
    """The reward at KL = ``target`` by linear interpolation along the (KL, reward) curve of one run, in
    training order (the first crossing of ``target``); None when the curve never reaches ``target``."""
    k = [float(v) for v in kl]
    r = [float(v) for v in reward]
    if len(k) != len(r):
        raise ValueError(f"reward: expected {len(k)} values (one per KL); got {len(r)}")
    for i in range(len(k)):
        if k[i] == target:
            return r[i]
        if i + 1 < len(k) and (k[i] - target) * (k[i + 1] - target) < 0:
            t = (target - k[i]) / (k[i + 1] - k[i])
            return r[i] + t * (r[i + 1] - r[i])
    return None
