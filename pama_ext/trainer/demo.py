"""``python -m pama_ext.trainer.demo``: PAMA vs MORLHF vs MGDA-UB on the embedded tiny world.

Builds (or loads from the cache) the tiny world, trains the same tiny GPT-2 with each method from
the same seed and with the same budget on two objectives -- ``sentiment`` (VADER compound) and
``length`` (clip(chars / L0, 0, 1)) -- evaluates the untrained and the trained policies on the
held-out prompts and prints the comparison table (the paper's Table 3 layout: rows = objectives plus
KL, length and hypervolume; columns = untrained and the methods). Writes under ``--output-dir``
(default ``runs/demo``): ``table.md``, ``table.json``, ``rewards.png`` (per-objective reward curves of
every method), ``pareto.png`` (final per-objective means) and one run directory per method.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from ..lm.config import split_list
from .config import TrainConfig

#: The demo's budget: three runs in about four minutes on a free 2-core CPU.
DEMO_DEFAULTS = dict(
    steps=40,
    batch_size=32,
    minibatch_size=16,
    ppo_epochs=2,
    max_new_tokens=32,
    length_l0=160.0,
    lr=3e-4,
    kl_coef=0.02,
    eval_every=10,
    eval_size=64,
)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pama_ext.trainer.demo", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--output-dir", default="runs/demo", help="where the table, plots and runs go")
    ap.add_argument("--methods", default="pama,morlhf,mgda-ub", help="comma-separated methods to compare")
    ap.add_argument("--seed", type=int, default=0, help="the seed of every run")
    for k, v in DEMO_DEFAULTS.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=v, help=f"TrainConfig.{k}")
    ap.add_argument("--cache-dir", default=None, help="tiny-world cache parent (default: $PAMA_EXT_CACHE or "
                                                      "~/.cache/pama_ext)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads; 1 is fastest for this 1M-parameter model and robust on a busy machine "
                         "(several threads on tiny matmuls oversubscribe a loaded 2-core CPU badly)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    from ..lm.files import atomic_write_text
    from ..tiny_world import build_tiny_world
    from .evaluate import comparison_table, default_hv_ref, format_table, hypervolume, means
    from .plots import plot_pareto, plot_reward_curves
    from .train import train

    world = build_tiny_world(cache_dir=a.cache_dir, progress=not a.no_progress)
    print(world.describe(), file=sys.stderr)
    out = Path(a.output_dir)
    methods = split_list(a.methods)
    base = TrainConfig(model="tiny", tiny_world_cache=a.cache_dir, seed=a.seed, threads=a.threads,
                       progress=not a.no_progress, plots=False, overwrite=True,
                       **{k: getattr(a, k) for k in DEMO_DEFAULTS})
    results = {}
    for m in methods:
        try:
            results[m] = train(base.replace(method=m, output_dir=str(out / m)))
        except KeyboardInterrupt:  # Ctrl-C (TrainingStopped): one line, no traceback; the demo restarts afresh
            print(f"pama_ext demo: stopped during {m}; run it again to start over", file=sys.stderr)
            return 130
        print(f"[{m}] done in {results[m]['wall_s']:.1f} s", file=sys.stderr)

    first = results[methods[0]]
    names = list(first["config"].objectives)
    untrained = first["init_eval"]
    columns = {"untrained": untrained, **{m: r["final_eval"] for m, r in results.items()}}
    hv_ref = default_hv_ref(means(untrained, names), base.hv_margin)
    hv = {c: hypervolume([means(s, names)], hv_ref) for c, s in columns.items()}
    table = comparison_table(columns, names, hv)
    table.update(hv_ref=hv_ref, seed=a.seed, settings={k: getattr(a, k) for k in DEMO_DEFAULTS},
                 decoding=untrained["decoding"], eval_prompts=untrained["n"],
                 wall_s={m: round(r["wall_s"], 1) for m, r in results.items()})
    md = format_table(table)
    atomic_write_text(out / "table.json", json.dumps(table, indent=1))
    atomic_write_text(out / "table.md", f"# pama_ext demo: tiny world, {a.steps} PPO steps x {a.batch_size} "
                                        f"responses, seed {a.seed}\n\n{md}\n\nEvaluation: {untrained['decoding']} "
                                        f"on {untrained['n']} held-out prompts; hypervolume reference point "
                                        f"{[round(x, 4) for x in hv_ref]} (untrained means - {base.hv_margin}).\n")
    plot_reward_curves({m: r["metrics"] for m, r in results.items()}, {m: r["evals"] for m, r in results.items()},
                       names, str(out / "rewards.png"))
    plot_pareto({c: means(s, names) for c, s in columns.items()}, names, str(out / "pareto.png"), ref=hv_ref,
                trajectories={m: [means(e, names) for e in r["evals"]] for m, r in results.items()})

    print(f"\npama_ext demo — {a.steps} PPO steps x {a.batch_size} responses per method, seed {a.seed}; "
          f"evaluation: {untrained['decoding']} on {untrained['n']} held-out prompts\n")
    print(md)
    print(f"\nwrote {out}/table.md, table.json, rewards.png, pareto.png and one run directory per method "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
