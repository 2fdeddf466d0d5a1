"""Plot of bench_ops results: speedup of the fused op over each baseline vs tokens (B*T).

Two panels (policy loss fwd+bwd, GAE), log-x and log-y; colour = n, line style = baseline
(eager reference, torch.compile(reference), per-timestep Python loop for GAE).

    python -m pama_ext.benchmarks.plot_ops benchmarks/results/bench_ops_cpu.csv [out.png]
    pama-ext bench plot benchmarks/results/bench_ops_cpu.csv

The other op families of bench_ops (value_loss, token_rewards, dpo_loss) are in its CSV and table only.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

from . import common

PANELS = [("policy_loss", "pama_policy_loss fwd+bwd"), ("gae", "multi_gae fwd")]
STYLES = {"eager": ("-", "o", "vs eager reference"), "compile": ("--", "s", "vs torch.compile(reference)"),
          "loop": (":", "^", "vs Python loop over T")}


def plot(csv_path: str, png_path: str, title: str = "") -> str:
    """Draws the PNG (raises ImportError where matplotlib is missing)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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

    common.atomic_write(png_path, write)
    plt.close(fig)
    return png_path


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("csv", help="a bench_ops CSV, e.g. benchmarks/results/bench_ops_cpu.csv")
    p.add_argument("png", nargs="?", default=None, help="output PNG (default: the CSV's name with .png)")
    return p


def run(args) -> int:
    png = args.png or os.path.splitext(args.csv)[0] + ".png"
    title = ""
    md = os.path.splitext(args.csv)[0] + ".md"  # bench_ops writes the device line there
    if os.path.exists(md):
        with open(md) as f:
            title = next((ln[len("- device: "):].strip() for ln in f if ln.startswith("- device: ")), "")
    print(plot(args.csv, png, title=title))
    return 0


def main(argv=None) -> int:
    p = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
