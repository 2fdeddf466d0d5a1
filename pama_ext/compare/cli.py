"""``pama-ext compare``: methods x settings x seeds on the tiny world, in one resumable command.

Runs the grid (:mod:`.runner`), then writes under ``--out``: ``compare.md`` (every table, printed too),
``compare.json`` (the same numbers), ``fronts_<setting>.png`` and ``kl_<setting>.png`` (:mod:`.plots`).
Running the same command again skips the runs already done; ``--report-only`` only rebuilds the report
from the results there.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["add_compare_subcommand", "cmd_compare", "main", "DEFAULT_METHODS", "with_sweep"]

DEFAULT_METHODS = "pama,morlhf,mgda-ub"


def _parse_sets(items: Sequence[str]) -> Dict[str, Any]:
    from ..lm.config import ConfigError

    out = {}
    for it in items or ():
        k, eq, v = it.partition("=")
        if not eq:
            raise ConfigError(f"--set: expected key=value; got {it!r}")
        out[k.strip().replace("-", "_")] = v.split("/") if "/" in v else v
    return out


def with_sweep(methods: Sequence[str], sweep: Sequence[str]) -> List[str]:
    """``methods`` plus, after each one whose ``--method`` takes preference weights and that has none of its
    own, ``<label>:weights=<w>`` for every w of ``sweep`` (labels already listed are not repeated)."""
    from ..trainer.config import METHOD_TABLE
    from .runner import parse_method

    out: List[str] = []
    for m in methods:
        out.append(m)
        ms = parse_method(m)
        spec = METHOD_TABLE.get(ms.method)
        if spec is None or ms.weights is not None or not (spec.prefs or spec.steerable or spec.scalarised):
            continue
        out.extend(f"{m}:weights={w}" for w in sweep)
    return list(dict.fromkeys(out))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated methods, each name[:key=value...] with TrainConfig keys (list values "
                        "/-separated), e.g. pama:update_norm=active,morlhf:weights=0.8/0.2 (default: %(default)s)")
    p.add_argument("--sweep", default=None, metavar="W[,W...]",
                   help="preference weights (each /-separated, e.g. 0.8/0.2,0.2/0.8): every method given that takes "
                        "preferences (pama, morlhf, linear) gets one more run label per weight, name:weights=W, so "
                        "each traces a front over the same sweep (its hypervolume is reported with an interval)")
    p.add_argument("--settings", default="n2", help="comma-separated settings: n2 (sentiment, conciseness), n3 (+ "
                                                    "diversity), legacy (sentiment, length) (default: %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default: %(default)s)")
    p.add_argument("--baseline", default="morlhf", help="the label the paired differences are against "
                                                         "(default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a TrainConfig override for every run (repeatable), e.g. --set steps=80")
    p.add_argument("--out", default="runs/compare", help="output directory (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes, one run each at a time; 1 torch thread "
                                                        "per run (default: %(default)s)")
    p.add_argument("--cache-dir", default=None, help="tiny-world cache parent (default: $PAMA_EXT_CACHE or "
                                                     "~/.cache/pama_ext)")
    p.add_argument("--hv-ref", default="untrained", choices=("untrained", "nadir"),
                   help="hypervolume reference point: the untrained model's means, or the worst final mean of any "
                        "method (when training lowers an objective below the untrained model for every method, the "
                        "untrained reference gives every method 0), minus --hv-margin (default: %(default)s)")
    p.add_argument("--hv-margin", type=float, default=0.1, help="margin below the reference (default: %(default)s)")
    p.add_argument("--report-only", action="store_true", help="no training: the report of the results in --out")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep every run's checkpoint/")
    p.add_argument("--no-plots", action="store_true", help="no PNG figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_compare(a: argparse.Namespace) -> int:
    from ..lm.config import ConfigError, split_list
    from ..lm.files import atomic_write_text
    from .report import analyse, format_report
    from .runner import build_grid, load_results, run_grid

    t0 = time.perf_counter()
    try:
        seeds = [int(s) for s in split_list(a.seeds)]
        if len(set(seeds)) != len(seeds) or not seeds:
            raise ConfigError(f"--seeds: expected distinct integers; got {a.seeds!r}")
        if a.jobs < 1:
            raise ConfigError(f"--jobs: expected a positive integer; got {a.jobs}")
        methods = with_sweep(split_list(a.methods), split_list(a.sweep) if a.sweep else [])
        specs = build_grid(methods, split_list(a.settings), seeds, _parse_sets(a.set), a.cache_dir)
    except (ConfigError, ValueError) as e:
        print(f"pama-ext compare: error: {e}", file=sys.stderr)
        return 2
    labels = [s.method.label for s in specs]
    if a.baseline not in labels:
        print(f"pama-ext compare: note: baseline {a.baseline!r} is not among the methods; no paired differences",
              file=sys.stderr)
    out = Path(a.out)
    failed: Dict[str, str] = {}
    if not a.report_only:
        from ..tiny_world import build_tiny_world

        world = build_tiny_world(cache_dir=a.cache_dir, progress=not a.no_progress)  # once, before the workers
        print(world.describe(), file=sys.stderr)
        try:
            failed = run_grid(specs, out, jobs=a.jobs, progress=not a.no_progress,
                              keep_checkpoints=a.keep_checkpoints,
                              log=lambda s: print(s, file=sys.stderr))["failed"]
        except KeyboardInterrupt:
            print("pama-ext compare: stopped; the finished runs are kept: run the same command again to go on",
                  file=sys.stderr)
            return 130
    results = load_results(specs, out)
    if not results:
        print(f"pama-ext compare: no results in {out}", file=sys.stderr)
        return 1
    report = analyse(results, a.baseline, hv_margin=a.hv_margin, hv_ref=a.hv_ref)
    report["command"] = "pama-ext compare " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "pama-ext compare"
    md = format_report(report)
    atomic_write_text(out / "compare.json", json.dumps(report, indent=1))
    atomic_write_text(out / "compare.md", f"# pama-ext compare\n\n{md}\n")
    written = ["compare.md", "compare.json"]
    if not a.no_plots:
        from .plots import plot_fronts, plot_kl_curves

        for setting, rep in report["settings"].items():
            for fn, stem in ((plot_fronts, "fronts"), (plot_kl_curves, "kl")):
                p = fn(setting, rep, str(out / f"{stem}_{setting}.png"))
                if p:
                    written.append(Path(p).name)
    print(md)
    print(f"wrote {out}/: {', '.join(written)} ({len(results)} runs, {time.perf_counter() - t0:.0f} s)")
    if failed:
        print(f"pama-ext compare: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def add_compare_subcommand(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("compare", help="methods x settings x seeds on the tiny world: tables with 95 % intervals, "
                                       "verdicts, matched KL, fronts (resumable)",
                       description=__doc__.split("\n\n")[0].replace("``", ""))
    add_arguments(p)
    p.set_defaults(func=cmd_compare)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pama_ext.compare")
    add_arguments(ap)
    return cmd_compare(ap.parse_args(argv))
