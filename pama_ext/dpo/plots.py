"""The fronts of a preference-method sweep as a PNG: one panel with the per-objective win rates against
the reference, one with the judges' mean scores (the reference marked), one line per method through its
settings (the sweep over w, or MOPO's primary / thresholds). Uses the shared plotting helpers (:mod:`pama_ext.lm.plots`);
without matplotlib it warns and returns None."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

from ..lm.plots import pyplot, save_figure
from ..lm.rewards import short_name

__all__ = ["plot_fronts"]

COLORS = {"raco": "#d62728", "cagrad": "#ff7f0e", "dpo-lw": "#1f77b4", "modpo": "#2ca02c", "mopo": "#9467bd",
          "mopo-lb": "#8c564b"}


def plot_fronts(results: Sequence[Mapping], names: Sequence[str], path: str, title: str = "") -> Optional[str]:
    """``results``: rows with ``method``, ``setting`` and ``eval`` (win_rate, mean, ref_mean per objective)."""
    plt = pyplot()
    if plt is None or len(names) < 2:
        return None
    a, b = names[0], names[1]
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.4))
    methods = []
    for r in results:
        if r["method"] not in methods:
            methods.append(r["method"])
    for ax, key in zip(axes, ("win_rate", "mean")):
        for m in methods:
            rows = [r for r in results if r["method"] == m]
            pts = sorted((r["eval"][key][a], r["eval"][key][b]) for r in rows)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=COLORS.get(m), label=m, ms=6, lw=1.5,
                    markeredgecolor="black")
        if key == "win_rate":
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
            ax.axvline(0.5, color="grey", lw=0.8, ls="--")
            ax.set_title("win rate against the reference")
        elif results:
            ref = results[0]["eval"]["ref_mean"]
            ax.scatter([ref[a]], [ref[b]], marker="x", s=70, color="black", label="reference", zorder=4)
            ax.set_title("mean judge score")
        ax.set_xlabel(short_name(a))
        ax.set_ylabel(short_name(b))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out
