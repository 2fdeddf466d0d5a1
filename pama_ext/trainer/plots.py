"""PNG plots: per-objective reward curves (one line per method) and the Pareto scatter of the final
per-objective means. matplotlib is optional: without it the functions warn and return None."""
from __future__ import annotations

from typing import List, Mapping, Optional, Sequence

from ..lm.plots import pyplot, save_figure
from ..lm.rewards import short_name

__all__ = ["plot_reward_curves", "plot_pareto"]

_COLORS = {"untrained": "#7f7f7f", "pama": "#d62728", "morlhf": "#1f77b4", "mgda-ub": "#2ca02c",
           "mgda": "#9467bd", "linear": "#ff7f0e"}


def _ema(xs: List[float], alpha: float = 0.2) -> List[float]:
    out, m = [], None
    for x in xs:
        m = x if m is None else (1 - alpha) * m + alpha * x
        out.append(m)
    return out


def plot_reward_curves(runs: Mapping[str, Sequence[Mapping]], evals: Mapping[str, Sequence[Mapping]],
                       names: Sequence[str], path: str) -> Optional[str]:
    """One panel per objective: training reward per step (faint: raw, solid: EMA) and evaluation means
    (markers) for every method; a last panel with the KL to the reference."""
    plt = pyplot()
    if plt is None:
        return None
    k = len(names) + 1
    fig, axes = plt.subplots(1, k, figsize=(4.2 * k, 3.4), squeeze=False)
    for j, name in enumerate(list(names) + ["__kl__"]):
        ax = axes[0][j]
        for method, rows in runs.items():
            color = _COLORS.get(method)
            steps = [r["step"] for r in rows if "rewards" in r]
            if name == "__kl__":
                ys = [r["kl"] for r in rows if "rewards" in r]
            else:
                ys = [r["rewards"][name] for r in rows if "rewards" in r]
            if steps:
                ax.plot(steps, ys, color=color, alpha=0.25, lw=1)
                ax.plot(steps, _ema(ys), color=color, lw=2, label=f"{method} (train)")
            ev = evals.get(method, [])
            if ev:
                xs = [e["step"] for e in ev]
                ys = [e["kl"] if name == "__kl__" else e["objectives"][name]["mean"] for e in ev]
                ax.plot(xs, ys, "o--", color=color, ms=4, lw=1, label=f"{method} (eval)")
        ax.set_title("KL to reference" if name == "__kl__" else short_name(name))
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
        if j == 0:
            ax.set_ylabel("mean reward")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def plot_pareto(points: Mapping[str, Sequence[float]], names: Sequence[str], path: str,
                ref: Optional[Sequence[float]] = None,
                trajectories: Optional[Mapping[str, Sequence[Sequence[float]]]] = None) -> Optional[str]:
    """Scatter of the final per-objective means of each method (one panel per pair of objectives),
    with the hypervolume reference point and optional evaluation trajectories."""
    plt = pyplot()
    if plt is None or len(names) < 2:
        return None
    pairs = [(a, b) for a in range(len(names)) for b in range(a + 1, len(names))]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.6 * len(pairs), 4.0), squeeze=False)
    for ax, (a, b) in zip(axes[0], pairs):
        for method, p in points.items():
            color = _COLORS.get(method)
            if trajectories and method in trajectories and len(trajectories[method]) > 1:
                tr = trajectories[method]
                ax.plot([q[a] for q in tr], [q[b] for q in tr], "-", color=color, alpha=0.35, lw=1)
            ax.scatter([p[a]], [p[b]], s=70, color=color, label=method, edgecolor="black", zorder=3)
        if ref is not None:
            ax.scatter([ref[a]], [ref[b]], marker="x", color="black", label="HV reference")
        ax.set_xlabel(short_name(names[a]))
        ax.set_ylabel(short_name(names[b]))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    axes[0][0].set_title("final per-objective means (eval)")
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out
