"""Plot of bench_ops results: speedup of the fused op over each baseline vs tokens (B*T).

Two panels (policy loss fwd+bwd, GAE), log-x and log-y; colour = n, line style = baseline
(eager reference, torch.compile(reference), per-timestep Python loop for GAE).

    python benchmarks/plot_ops.py benchmarks/results/bench_ops_cpu.csv [out.png]
"""
from __future__ import annotations

import os
import sys
from collections import defaultdict

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

PANELS = [("policy_loss", "pama_policy_loss fwd+bwd"), ("gae", "multi_gae fwd")]
STYLES = {"eager": ("-", "o", "vs eager reference"), "compile": ("--", "s", "vs torch.compile(reference)"),
          "loop": (":", "^", "vs Python loop over T")}


def plot(csv_path: str, png_path: str, title: str = "") -> str:
    rows = [r for r in common.read_csv(csv_path) if r.get("status") == "ok" and r["impl"] != "fused"]
    series = defaultdict(list)  # (op, impl, n) -> [(tokens, speedup)]
    for r in rows:
        series[(r["op"], r["impl"], int(r["n"]))].append((int(r["tokens"]), float(r["speedup_of_fused"])))
    ns = sorted({k[2] for k in series})
    colors = {n: plt.cm.viridis(i / max(1, len(ns) - 1) * 0.85) for i, n in enumerate(ns)}

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, (op, label) in zip(axes, PANELS):
        drawn = False
        for impl, (ls, marker, what) in STYLES.items():
            for n in ns:
                pts = sorted(series.get((op, impl, n), []))
                if not pts:
                    continue
                drawn = True
                x, y = zip(*pts)
                ax.plot(x, y, linestyle=ls, marker=marker, color=colors[n], label=f"n={n} {what}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        if drawn:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}×"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.legend(fontsize=7, ncol=1)
        ax.set_title(label)
        ax.set_xlabel("tokens (B×T)")
        ax.set_ylabel("speedup of fused (baseline time / fused time)")
        ax.grid(True, which="both", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=120)

    common._atomic_write(png_path, write)
    plt.close(fig)
    return png_path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    csv_path = argv[0]
    png = argv[1] if len(argv) > 1 else os.path.splitext(csv_path)[0] + ".png"
    title = ""
    md = os.path.splitext(csv_path)[0] + ".md"  # bench_ops.py writes the device line there
    if os.path.exists(md):
        with open(md) as f:
            title = next((ln[len("- device: "):].strip() for ln in f if ln.startswith("- device: ")), "")
    print(plot(csv_path, png, title=title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
