"""The grid of a comparison: methods x settings x seeds, one training run each, resumable.

A **method** is a ``--method`` plus optional TrainConfig overrides, written ``name[:key=value[:key=value]]``
(``pama:update_norm=active``, ``morlhf:weights=0.8/0.2``, ``pama:lr=6e-4``); its label is that string.
A **setting** is a named bundle of overrides (:data:`SETTINGS`: the objectives of the world and their
budget). Every run trains from its seed with the setting's and the method's overrides on top of
:data:`BASE` and writes ``<out>/runs/<setting>/<label>/seed<k>/`` (the trainer's run directory) and, last,
``result.json`` there (atomically): the evaluations with their per-prompt scores and KL, the per-step
monitor metrics, the wall time. A run whose ``result.json`` exists with the same configuration is skipped
(resume = run the same command again; the output directory may have moved); a run directory without it (a crash, a kill) is started afresh.
The checkpoints are removed once the result is written (``keep_checkpoints`` keeps them).

Runs go to a process pool (``jobs`` workers, 2 by default: the machine's cores; each run uses 1 torch
thread), with a progress bar over the runs.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing as mp
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["BASE", "SETTINGS", "MethodSpec", "RunSpec", "parse_method", "build_grid", "run_grid", "run_one",
           "load_results", "RESULT"]

RESULT = "result.json"

#: what every run of a comparison shares (the demo's budget; a fixed KL coefficient, reported -- see
#: docs/results.md for why not the adaptive controller)
BASE: Dict[str, Any] = dict(
    model="tiny", steps=40, batch_size=32, minibatch_size=16, ppo_epochs=2, max_new_tokens=32, length_l0=160.0,
    lr=3e-4, kl_coef=0.02, adaptive_kl=False, eval_every=10, eval_size=None, threads=1, plots=False,
    progress=False, log_every=0,
)

#: the named settings (``--settings``): the world's objectives
SETTINGS: Dict[str, Dict[str, Any]] = {
    "n2": dict(objectives=["sentiment", "conciseness"]),
    "n3": dict(objectives=["sentiment", "conciseness", "diversity"]),
    "legacy": dict(objectives=["sentiment", "length"]),
}


@dataclass(frozen=True)
class MethodSpec:
    label: str
    method: str
    overrides: Tuple[Tuple[str, Any], ...] = ()

    @property
    def family(self) -> str:
        """The label without its preference weights: the points of one front share it."""
        rest = [f"{k}={_fmt(v)}" for k, v in self.overrides if k != "weights"]
        return ":".join([self.method, *rest])

    @property
    def weights(self) -> Optional[List[float]]:
        return dict(self.overrides).get("weights")


def _fmt(v: Any) -> str:
    return "/".join(f"{x:g}" for x in v) if isinstance(v, list) else str(v)


def parse_method(text: str) -> MethodSpec:
    """``name[:key=value...]``; list values (``weights``) are ``/``-separated; values are checked by
    TrainConfig when the grid is built."""
    from ..lm.config import ConfigError, coerce_value
    from ..trainer.config import TrainConfig
    import dataclasses

    parts = [p for p in text.strip().split(":") if p]
    if not parts:
        raise ConfigError("--methods: empty method")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    over = []
    for p in parts[1:]:
        key, eq, val = p.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in fields:
            raise ConfigError(f"--methods: {text!r}: expected name:key=value with a TrainConfig key; got {p!r}")
        raw = val.split("/") if "/" in val else val
        over.append((key, coerce_value(fields[key], raw)))
    return MethodSpec(text.strip(), parts[0], tuple(over))


@dataclass(frozen=True)
class RunSpec:
    setting: str
    method: MethodSpec
    seed: int
    config: Dict[str, Any] = field(hash=False, compare=False, default_factory=dict)

    def run_dir(self, out: Path) -> Path:
        safe = self.method.label.replace("/", "_").replace(":", "+").replace("=", "-")
        return Path(out) / "runs" / self.setting / safe / f"seed{self.seed}"


def build_grid(methods: Sequence[str], settings: Sequence[str], seeds: Sequence[int],
               overrides: Optional[Dict[str, Any]] = None, cache_dir: Optional[str] = None,
               extra_settings: Optional[Dict[str, Dict[str, Any]]] = None) -> List[RunSpec]:
    """Every (setting, method, seed), each with its validated TrainConfig (a ConfigError names the bad one)."""
    from ..lm.config import ConfigError
    from ..trainer.config import TrainConfig

    table = dict(SETTINGS, **(extra_settings or {}))
    specs = []
    for s in settings:
        if s not in table:
            raise ConfigError(f"--settings: unknown setting {s!r} (expected one of {', '.join(table)})")
        for m in methods:
            ms = parse_method(m)
            for seed in seeds:
                data = dict(BASE, **table[s], **(overrides or {}), method=ms.method, seed=int(seed),
                            tiny_world_cache=cache_dir)
                data.update(dict(ms.overrides))
                try:
                    cfg = TrainConfig.from_dict(data).validate()
                except ConfigError as e:
                    raise ConfigError(f"--methods: {m!r} in setting {s!r}: {e}") from None
                specs.append(RunSpec(s, ms, int(seed), cfg.to_dict()))
    return specs


def _result_matches(path: Path, spec: RunSpec, out: Path) -> bool:
    try:
        r = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    # the same configuration wherever the output directory is (a moved or copied --out still resumes)
    got = dict(r.get("config") or {}, output_dir=None)
    return got == dict(spec.config, output_dir=None)


def _read_evals(run_dir: Path, names: Sequence[str]) -> List[Dict[str, Any]]:
    from ..lm.files import read_jsonl

    evals = read_jsonl(run_dir / "eval.jsonl")
    out = []
    for e in evals:
        samples = read_jsonl(run_dir / "samples" / f"step_{e['step']:06d}.jsonl")
        out.append({
            "step": e["step"], "kl": e["kl"], "response_len": e["response_len"],
            "response_chars": e["response_chars"],
            "means": {n: e["objectives"][n]["mean"] for n in names},
            "per_prompt": {**{n: [s["scores"][n] for s in samples] for n in names},
                           "kl": [s["kl"] for s in samples], "chars": [len(s["response"]) for s in samples]},
        })
    return out


MONITOR = ("kl", "kl_coef", "active", "pos", "disagree", "grad_norm", "clipfrac", "approx_kl", "response_len",
           "weights")


def run_one(spec_config: Dict[str, Any], run_dir: str, label: str, setting: str, keep_checkpoints: bool = False
            ) -> Dict[str, Any]:
    """Train one run into ``run_dir`` and write its ``result.json`` (atomically); returns the result."""
    from ..lm.files import atomic_write_text
    from ..trainer.config import TrainConfig
    from ..trainer.train import train

    d = Path(run_dir)
    cfg = TrainConfig.from_dict(dict(spec_config, output_dir=str(d), overwrite=True, resume=False))
    t0 = time.perf_counter()
    res = train(cfg)
    names = list(cfg.objectives)
    result = {
        "label": label, "setting": setting, "method": cfg.method, "seed": cfg.seed, "objectives": names,
        "config": dict(spec_config, output_dir=str(d)),
        "evals": _read_evals(d, names),
        "monitor": [{k: m.get(k) for k in MONITOR if k in m} | {"step": m["step"], "rewards": m["rewards"]}
                    for m in res["metrics"]],
        "skipped_updates": res["skipped_updates"],
        "wall_s": time.perf_counter() - t0,
    }
    atomic_write_text(d / RESULT, json.dumps(result))
    if not keep_checkpoints:
        for sub in ("checkpoint", "checkpoint.prev"):
            shutil.rmtree(d / sub, ignore_errors=True)
    return result


def _worker(args) -> Tuple[str, Optional[str], float]:
    spec_config, run_dir, label, setting, keep = args
    t0 = time.perf_counter()
    try:
        run_one(spec_config, run_dir, label, setting, keep)
        return run_dir, None, time.perf_counter() - t0
    except BaseException as e:  # noqa: BLE001 - reported by the parent, the other runs go on
        return run_dir, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}", time.perf_counter() - t0


def run_grid(specs: Sequence[RunSpec], out: Path, jobs: int = 2, progress: bool = True,
             keep_checkpoints: bool = False, log=print) -> Dict[str, Any]:
    """Run every spec whose result is missing; returns {"ran", "skipped", "failed": {run_dir: error}}."""
    from tqdm.auto import tqdm

    out = Path(out)
    todo, skipped = [], 0
    for s in specs:
        d = s.run_dir(out)
        if _result_matches(d / RESULT, s, out):
            skipped += 1
        else:
            todo.append((s.config, str(d), s.method.label, s.setting, keep_checkpoints))
    log(f"pama-ext compare: {len(specs)} runs, {skipped} already done, {len(todo)} to run with {jobs} "
        f"worker{'s' if jobs > 1 else ''}")
    failed: Dict[str, str] = {}
    if not todo:
        return {"ran": 0, "skipped": skipped, "failed": failed}
    bar = tqdm(total=len(todo), desc="compare", unit="run", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    try:
        if jobs <= 1:
            for t in todo:
                d, err, wall = _worker(t)
                _done(d, err, wall, failed, bar, log)
        else:
            pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"))
            try:
                futs = [pool.submit(_worker, t) for t in todo]
                for f in cf.as_completed(futs):
                    d, err, wall = f.result()
                    _done(d, err, wall, failed, bar, log)
            except BaseException:  # Ctrl-C: the queued runs are cancelled, the running ones stop (their SIGINT)
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            pool.shutdown(wait=True)
    finally:
        bar.close()
    return {"ran": len(todo) - len(failed), "skipped": skipped, "failed": failed}


def _done(d, err, wall, failed, bar, log) -> None:
    bar.update(1)
    if err is not None:
        failed[d] = err
        bar.write(f"pama-ext compare: FAILED {d}: {err.splitlines()[0]}", file=sys.stderr)
    else:
        bar.set_postfix_str(f"last {Path(d).parent.name}/{Path(d).name} {wall:.0f}s")


def load_results(specs: Sequence[RunSpec], out: Path) -> List[Dict[str, Any]]:
    """The results of ``specs`` that exist (in grid order)."""
    res = []
    for s in specs:
        p = s.run_dir(out) / RESULT
        if p.is_file():
            r = json.loads(p.read_text())
            r["family"] = s.method.family
            r["weights_spec"] = s.method.weights
            res.append(r)
    return res
