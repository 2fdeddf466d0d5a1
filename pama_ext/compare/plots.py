"""The comparison's figures (matplotlib, optional: without it they are skipped with a warning).

- ``fronts_<setting>.png``: one panel per pair of objectives; every label's final mean with its 95 % interval
  as error bars, each point annotated with its label; labels of one family (differing only in their preference
  weights) joined by a line; the untrained model and the hypervolume reference point.
- ``kl_<setting>.png``: one panel per objective, reward against KL to the reference over training (every
  evaluation step, mean over seeds with 95 % intervals on both axes, each point annotated with its step); the
  matched KL as a dashed vertical line.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

from ..lm.plots import pyplot, save_figure
from ..lm.rewards import short_name

__all__ = ["plot_fronts", "plot_kl_curves"]


def _colors(labels: List[str]) -> Dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {lab: cmap(i % 10) for i, lab in enumerate(labels)}


#: label offsets (points) cycled over the methods, so that neighbouring labels do not print on top of each other
_OFFSETS = [(5, 4), (5, -10), (-5, 6), (-5, -12), (6, 12), (6, -18)]


def _err(iv: Mapping[str, float]):
    return [[iv["mean"] - iv["lo"]], [iv["hi"] - iv["mean"]]]


def plot_fronts(setting: str, rep: Mapping[str, Any], path: str) -> Optional[str]:
    plt = pyplot()
    names = rep.get("objectives", [])
    if plt is None or len(names) < 2 or "rows" not in rep:
        return None
    pairs = [(a, b) for a in range(len(names)) for b in range(a + 1, len(names))]
    fig, axes = plt.subplots(1, len(pairs), figsize=(6.4 * len(pairs), 5.4), squeeze=False)
    colors = _colors(list(rep["rows"]))
    for ax, (a, b) in zip(axes[0], pairs):
        na, nb = names[a], names[b]
        for fam, f in rep["fronts"].items():
            if len(f["labels"]) > 1:
                pts = sorted((rep["rows"][lab]["objectives"][na]["mean"], rep["rows"][lab]["objectives"][nb]["mean"])
                             for lab in f["labels"])
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color="0.6", lw=1, zorder=1,
                        label=f"{fam} front (weight sweep)" if (a, b) == pairs[0] else None)
        xs, ys = [], []
        for i, (lab, r) in enumerate(rep["rows"].items()):
            x, y = r["objectives"][na], r["objectives"][nb]
            ax.errorbar([x["mean"]], [y["mean"]], xerr=_err(x), yerr=_err(y), fmt="o", ms=6, capsize=3,
                        color=colors[lab], label=lab, zorder=3)
            ax.annotate(lab, (x["mean"], y["mean"]), textcoords="offset points", xytext=_OFFSETS[i % len(_OFFSETS)],
                        fontsize=6, color=colors[lab])
            xs += [x["lo"], x["hi"]]
            ys += [y["lo"], y["hi"]]
        # zoomed on the trained methods; the untrained model and the reference point are in the legend
        px, py = 0.08 * (max(xs) - min(xs) or 1), 0.08 * (max(ys) - min(ys) or 1)
        ax.set_xlim(min(xs) - px, max(xs) + px)
        ax.set_ylim(min(ys) - py, max(ys) + py)
        u, ref = rep["untrained"]["means"], rep["hv_ref"]
        ax.plot([], [], " ", label=f"untrained: ({u[a]:.3f}, {u[b]:.3f}); hypervolume reference: "
                                   f"({ref[a]:.3f}, {ref[b]:.3f})")
        ax.set_xlabel(f"{short_name(na)} (final eval mean)")
        ax.set_ylabel(f"{short_name(nb)} (final eval mean)")
        ax.grid(alpha=0.3)
    axes[0][0].set_title(f"{setting}: final means, 95 % CI (seeds x prompts)", fontsize=9)
    axes[0][0].legend(fontsize=6, loc="best")
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def plot_kl_curves(setting: str, rep: Mapping[str, Any], path: str) -> Optional[str]:
    plt = pyplot()
    names = rep.get("objectives", [])
    if plt is None or not names or "rows" not in rep:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(6.0 * len(names), 5.0), squeeze=False)
    colors = _colors(list(rep["rows"]))
    for ax, n in zip(axes[0], names):
        for lab, r in rep["rows"].items():
            cv = r["curve"]
            xs = [p["kl"]["mean"] for p in cv]
            ys = [p[n]["mean"] for p in cv]
            ax.plot(xs, ys, "-", color=colors[lab], lw=1.2, alpha=0.8)
            ax.errorbar(xs, ys, xerr=[[p["kl"]["mean"] - p["kl"]["lo"] for p in cv],
                                      [p["kl"]["hi"] - p["kl"]["mean"] for p in cv]],
                        yerr=[[p[n]["mean"] - p[n]["lo"] for p in cv], [p[n]["hi"] - p[n]["mean"] for p in cv]],
                        fmt="o", ms=4, capsize=2, color=colors[lab], label=lab)
            for p in cv:
                ax.annotate(str(p["step"]), (p["kl"]["mean"], p[n]["mean"]), textcoords="offset points",
                            xytext=(3, 3), fontsize=6, color=colors[lab])
        # x axis up to 1.3 x the 90th percentile of the points' KL: one diverged run does not squash the others
        allx = sorted(p["kl"]["mean"] for r in rep["rows"].values() for p in r["curve"])
        xmax = 1.3 * allx[int(0.9 * (len(allx) - 1))] if allx else None
        if xmax and allx[-1] > xmax:
            ax.set_xlim(-0.3, xmax)
            ax.text(0.99, 0.01, f"x axis cut at {xmax:.1f} (max point {allx[-1]:.1f})", transform=ax.transAxes,
                    ha="right", va="bottom", fontsize=6)
        if rep.get("kl_star", 0) > 0:
            ax.axvline(rep["kl_star"], ls="--", color="0.4", lw=1, label=f"matched KL {rep['kl_star']:.2f}")
        ax.set_xlabel("KL to reference (nats / response, eval)")
        ax.set_ylabel(f"{short_name(n)} (eval mean)")
        ax.set_title(f"{setting}: {short_name(n)} vs KL (labels: PPO step)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out
