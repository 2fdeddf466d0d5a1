"""``python -m pama_ext.dpo.demo`` (``make demo-dpo``): raco vs cagrad vs dpo-lw vs modpo vs mopo on the tiny world.

Samples ``--responses-per-prompt`` responses for ``--pool-prompts`` training prompts from the tiny-world
model, labels every pair with the judges (``sentiment``: VADER compound; ``length``: clip(chars / L0,
0, 1)) -- the two disagree on a good share of the pairs, the conflict rate printed below -- and trains
the same model from the same seed with every method: raco, dpo-lw and modpo over a sweep of the
weight of the first objective (``--sweep``), cagrad at the middle weight (the unclipped ablation of
raco), and mopo once with each objective as the primary. Each trained policy is evaluated against the
reference on the held-out prompts (win rate per objective under its judge, mean judge scores, KL).
Writes under ``--output-dir`` (default runs/demo-dpo): ``table.md``, ``table.json``, ``fronts.png``,
``pairs.jsonl`` and one run directory per (method, setting).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from ..lm.config import split_list
from .config import METHODS, MOPO_METHODS

#: the demo's budget: all runs in about five minutes on a free 2-core CPU (one thread)
DEMO_DEFAULTS = dict(
    steps=20,
    batch_size=24,
    micro_batch_size=24,
    lr=4e-4,
    pool_prompts=80,
    responses_per_prompt=4,
    max_new_tokens=40,
    eval_size=64,
    eval_samples=2,
    beta=0.2,  # one DPO temperature for raco, cagrad, dpo-lw and modpo, so their fronts compare methods, not β
)
MOPO_DEFAULTS = dict(batch_size=8, micro_batch_size=32, mopo_t0=8)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pama_ext.dpo.demo", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--output-dir", default="runs/demo-dpo", help="where the table, the plot and the runs go")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    ap.add_argument("--sweep", default="0.8,0.5,0.2",
                    help="weights of the first objective for raco, dpo-lw and modpo (the second gets 1 - w)")
    ap.add_argument("--seed", type=int, default=0, help="the seed of every run")
    for k, v in DEMO_DEFAULTS.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=v, help=f"DPOConfig.{k}")
    ap.add_argument("--mopo-batch-size", type=int, default=MOPO_DEFAULTS["batch_size"],
                    help="mopo: prompts per step (each with all its stored responses)")
    ap.add_argument("--mopo-t0", type=int, default=MOPO_DEFAULTS["mopo_t0"], help="mopo: reference/threshold period")
    ap.add_argument("--cache-dir", default=None, help="tiny-world cache parent (default: $PAMA_EXT_CACHE or "
                                                      "~/.cache/pama_ext)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for this tiny model)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def runs_of(methods, sweep, objectives):
    """(method, overrides) for every run of the demo."""
    out = []
    for m in methods:
        if m in ("raco", "dpo-lw", "modpo"):
            out += [(m, {"weights": [w, 1.0 - w]}) for w in sweep]
            if m == "modpo":  # MODPO from labels alone: its first stage trains the margin reward model
                out.append((m, {"weights": [0.5, 0.5], "modpo_margin": "labels"}))
        elif m == "cagrad":
            out.append((m, {"weights": [0.5, 0.5]}))
        elif m in MOPO_METHODS:
            out += [(m, {"mopo_primary": o}) for o in objectives]
        else:
            raise SystemExit(f"--methods: unknown method {m!r}")
    return out


def dual_summary(results) -> list:
    """One line per mopo / mopo-lb run: on how many steps λ > 0 (the constraint binds), max and final λ, the final
    threshold b and the lower bound LB of the last step."""
    lines = []
    for r in results:
        ms = r["metrics"]
        if r["method"] not in MOPO_METHODS or not ms:
            continue
        lam = [max(m["lam"]) for m in ms]
        last = ms[-1]
        lines.append(f"- {r['method']} {r['setting']}: λ > 0 on {sum(x > 0 for x in lam)} of {len(ms)} steps, max λ "
                     f"{max(lam):.3f}, final λ {'/'.join(f'{x:.3f}' for x in last['lam'])}, b "
                     f"{'/'.join(f'{x:.3f}' for x in last['b'])}, LB {'/'.join(f'{x:.3f}' for x in last['lower_bound'])}")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    from ..lm.files import atomic_write_text
    from .config import DPOConfig
    from .data import write_jsonl
    from .evaluate import format_results, results_table
    from .plots import plot_fronts
    from .train import train_dpo

    out = Path(a.output_dir)
    methods = split_list(a.methods)
    sweep = [float(x) for x in split_list(a.sweep)]
    if any(not (0 < w < 1) for w in sweep):
        raise SystemExit(f"--sweep: weights must lie strictly between 0 and 1; got {sweep}")
    base = DPOConfig(model="tiny", data="tiny", tiny_world_cache=a.cache_dir, seed=a.seed, threads=a.threads,
                     progress=not a.no_progress, plots=False, overwrite=True, save_model=False, log_every=0,
                     **{k: getattr(a, k) for k in DEMO_DEFAULTS}).validate()
    plan = runs_of(methods, sweep, base.objectives)
    shared: dict = {}
    results = []
    bar = tqdm(plan, desc="demo-dpo", unit="run", disable=a.no_progress or not sys.stderr.isatty(), dynamic_ncols=True)
    for i, (m, over) in enumerate(bar):
        extra = dict(over)
        if m in MOPO_METHODS:
            extra.update(batch_size=a.mopo_batch_size, micro_batch_size=MOPO_DEFAULTS["micro_batch_size"],
                         mopo_t0=a.mopo_t0)
        cfg = base.replace(method=m, output_dir=str(out / f"{i:02d}-{m}"), **extra)
        r = train_dpo(cfg, shared=shared)
        results.append(r)
        tqdm.write(f"[{m}] {r['setting']}: " + " ".join(f"win {k} {v:.3f}" for k, v in r["eval"]["win_rate"].items())
                   + f" ({r['wall_s']:.1f} s)", file=sys.stderr)
    bar.close()

    names = list(base.objectives)
    data = shared["data"]
    write_jsonl(data, str(out / "pairs.jsonl"))
    rows = results_table(results, names)
    md = format_results(rows)
    wall = time.perf_counter() - t0
    ref = results[0]["eval"]["ref_mean"]
    head = (f"pama_ext demo-dpo — tiny world, {len(data)} pairs from {a.pool_prompts} prompts x "
            f"{a.responses_per_prompt} sampled responses, conflict rate {data.info['conflict_rate']:.3f} "
            f"(pairs where the objectives disagree); {a.steps} steps per run, seed {a.seed}")
    foot = (f"Win rate: policy vs reference under each judge (tie 0.5, tie margin {base.tie_margin}) on "
            f"{results[0]['eval']['n']} sampled responses ({a.eval_size} held-out prompts x {a.eval_samples}); "
            f"reference means: " + ", ".join(f"{k} {v:.3f}" for k, v in ref.items()) +
            ". ESS: mopo's mean effective sample size (Σw)²/Σw² per step. "
            f"Total wall time {wall:.0f} s.")
    duals = dual_summary(results)
    if duals:
        foot += "\n\nMOPO's duals (λ per step; the constraint binds where λ > 0):\n" + "\n".join(duals)
    atomic_write_text(out / "table.md", f"# {head}\n\n{md}\n\n{foot}\n")
    atomic_write_text(out / "table.json", json.dumps({"rows": rows, "data": data.info, "wall_s": wall,
                                                      "settings": {k: getattr(a, k) for k in DEMO_DEFAULTS},
                                                      "reference_means": ref}, indent=1))
    plot_fronts(results, names, str(out / "fronts.png"),
                title=f"tiny world: {len(data)} pairs, conflict rate {data.info['conflict_rate']:.2f}, {a.steps} steps per run")
    print(f"\n{head}\n")
    print(md)
    print(f"\n{foot}\nwrote {out}/table.md, table.json, fronts.png, pairs.jsonl and one directory per run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
