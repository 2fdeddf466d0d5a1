"""From the results of a grid to the tables of a comparison (per setting):

- **final** (matched budget): per objective and for the KL, each method's mean with its 95 % interval over
  seeds and evaluation prompts; the paired difference to the baseline with its interval and the verdict;
  the hypervolume of the method's point (its box above the reference point) with its interval;
- **matched KL**: each run's reward interpolated at the common KL ``kl*`` (the largest KL every run reaches on
  its evaluation curve), then the interval over seeds and the paired difference to the baseline;
- **fronts**: the hypervolume (with interval) of every family of labels that differ only in their preference
  weights (``morlhf:weights=...``), next to the single-point methods;
- **world**: the conflict rate between every pair of objectives (the fraction of discordant response pairs on
  the untrained model's evaluation: one objective ranks the pair one way, the other the other way) and their
  correlation; the noise budget (spread of the per-seed means vs the evaluation noise of one seed's mean);
- **monitor**: per method, the mean over steps and seeds of the active fraction (combined and per objective),
  the sign-disagreement fraction, the gradient norm; the conflict rate among the trained policy's own final
  responses (first pair of objectives).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from . import stats as st
from ..lm.rewards import short_name

__all__ = ["analyse", "format_report", "by_setting"]


def by_setting(results: Sequence[Mapping]) -> "OrderedDict[str, OrderedDict[str, Dict[int, Mapping]]]":
    out: "OrderedDict[str, OrderedDict[str, Dict[int, Mapping]]]" = OrderedDict()
    for r in results:
        out.setdefault(r["setting"], OrderedDict()).setdefault(r["label"], {})[int(r["seed"])] = r
    return out


def _matrix(runs: Mapping[int, Mapping], seeds: Sequence[int], key: str, step: int = -1) -> np.ndarray:
    return np.array([runs[s]["evals"][step]["per_prompt"][key] for s in seeds], dtype=np.float64)


def _kl_curve(run: Mapping, name: str):
    return [e["kl"] for e in run["evals"]], [e["means"][name] for e in run["evals"]]


def discordance(x: Sequence[float], y: Sequence[float]) -> float:
    """Fraction of the pairs of responses (ties on either objective left out) that the two objectives order
    differently: 0 = always agree, 0.5 = unrelated, 1 = always opposed."""
    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    dx = np.sign(a[:, None] - a[None, :])
    dy = np.sign(b[:, None] - b[None, :])
    both = (dx != 0) & (dy != 0)
    iu = np.triu(np.ones_like(both, dtype=bool), 1) & both
    n = int(iu.sum())
    return float(((dx * dy) < 0)[iu].sum() / n) if n else float("nan")


#: --hv-ref: the hypervolume reference point is the untrained model's means, or the worst final mean of any
#: method (the nadir), minus the margin
HV_REFS = ("untrained", "nadir")


def analyse(results: Sequence[Mapping], baseline: str, hv_margin: float = 0.1, hv_ref: str = "untrained"
            ) -> Dict[str, Any]:
    """Every table of every setting (plain dicts; :func:`format_report` renders them)."""
    if hv_ref not in HV_REFS:
        raise ValueError(f"hv_ref: expected one of {', '.join(HV_REFS)}; got {hv_ref!r}")
    report: Dict[str, Any] = {"baseline": baseline, "level": st.LEVEL, "settings": {}}
    for setting, labels in by_setting(results).items():
        first = next(iter(next(iter(labels.values())).values()))
        names = list(first["objectives"])
        seeds = sorted(set.intersection(*[set(v) for v in labels.values()]))
        rep: Dict[str, Any] = {"objectives": names, "seeds": seeds, "labels": list(labels)}
        report["settings"][setting] = rep
        if len(seeds) < 2:
            rep["error"] = f"fewer than 2 seeds common to every method ({seeds}); no intervals"
            continue
        init = first["evals"][0]
        init_means = [init["means"][n] for n in names]
        if hv_ref == "untrained":
            ref = [m - hv_margin for m in init_means]
        else:
            ref = [min(float(np.mean(_matrix(runs, seeds, n))) for runs in labels.values()) - hv_margin for n in names]
        rep.update(untrained={"means": init_means, "kl": init["kl"], "chars": init["response_chars"]}, hv_ref=ref,
                   hv_ref_kind=hv_ref, hv_margin=hv_margin,
                   n_prompts=len(init["per_prompt"][names[0]]),
                   steps=first["config"]["steps"], batch_size=first["config"]["batch_size"],
                   kl_coef=first["config"]["kl_coef"], adaptive_kl=first["config"]["adaptive_kl"])
        # world: conflict between objectives on the untrained model
        rep["conflict"] = [{"pair": [names[i], names[j]],
                            "discordant": discordance(init["per_prompt"][names[i]], init["per_prompt"][names[j]]),
                            "corr": float(np.corrcoef(init["per_prompt"][names[i]],
                                                      init["per_prompt"][names[j]])[0, 1])}
                           for i in range(len(names)) for j in range(i + 1, len(names))]
        has_base = baseline in labels
        rows = OrderedDict()
        kl_star = min(max(e["kl"] for e in labels[lab][s]["evals"]) for lab in labels for s in seeds)
        rep["kl_star"] = kl_star
        for lab, runs in labels.items():
            row: Dict[str, Any] = {"objectives": {}, "diff": {}, "matched": {}, "matched_diff": {}}
            for n in names:
                X = _matrix(runs, seeds, n)
                row["objectives"][n] = st.crossed_interval(X).to_dict()
                per_seed = X.mean(1)
                within = float(np.mean(X.std(1, ddof=1) / math.sqrt(X.shape[1])))
                row.setdefault("noise", {})[n] = {"seed_sd": float(per_seed.std(ddof=1)), "eval_se": within}
                if has_base and lab != baseline:
                    d = st.paired_difference(X, _matrix(labels[baseline], seeds, n))
                    row["diff"][n] = dict(d.to_dict(), verdict=st.verdict(d))
                if kl_star > 0:
                    mv = [st.interpolate_at(*_kl_curve(runs[s], n), kl_star) for s in seeds]
                    row["matched"][n] = st.crossed_interval(mv).to_dict()
                    if has_base and lab != baseline:
                        bv = [st.interpolate_at(*_kl_curve(labels[baseline][s], n), kl_star) for s in seeds]
                        d = st.crossed_interval(np.array(mv) - np.array(bv))
                        row["matched_diff"][n] = dict(d.to_dict(), verdict=st.verdict(d))
            K = _matrix(runs, seeds, "kl")
            row["kl"] = st.crossed_interval(K).to_dict()
            if has_base and lab != baseline:
                d = st.paired_difference(K, _matrix(labels[baseline], seeds, "kl"))
                row["kl_diff"] = dict(d.to_dict(), verdict=st.verdict(d, higher_is_better=False))
            row["chars"] = float(np.mean(_matrix(runs, seeds, "chars")))
            # conflict among the trained policy's own responses (mean over seeds), first pair of objectives
            row["final_conflict"] = float(np.mean([discordance(runs[s]["evals"][-1]["per_prompt"][names[0]],
                                                               runs[s]["evals"][-1]["per_prompt"][names[1]])
                                                   for s in seeds])) if len(names) > 1 else None
            data = np.stack([_matrix(runs, seeds, n) for n in names])
            row["hv"] = st.hypervolume_interval([data], ref).to_dict()
            mon = [m for s in seeds for m in runs[s]["monitor"]]
            row["monitor"] = {
                k: (np.mean([m[k] for m in mon if m.get(k) is not None], axis=0).tolist()
                    if any(m.get(k) is not None for m in mon) else None)
                for k in ("active", "pos", "disagree", "kl_coef", "grad_norm", "weights")}
            row["curve"] = _curve(runs, seeds, names)
            row["wall_s"] = float(np.mean([runs[s]["wall_s"] for s in seeds]))
            rows[lab] = row
        rep["rows"] = rows
        # fronts: labels that differ only in their weights
        fams: "OrderedDict[str, List[str]]" = OrderedDict()
        for lab, runs in labels.items():
            fams.setdefault(next(iter(runs.values()))["family"], []).append(lab)
        fronts = OrderedDict()
        for fam, labs in fams.items():
            data = [np.stack([_matrix(labels[lab], seeds, n) for n in names]) for lab in labs]
            fronts[fam] = {"labels": labs, "hv": st.hypervolume_interval(data, ref).to_dict()}
        rep["fronts"] = fronts
    return report


def _curve(runs: Mapping[int, Mapping], seeds: Sequence[int], names: Sequence[str]) -> List[Dict[str, Any]]:
    """Per evaluation step: KL and every objective with their intervals (seeds x prompts)."""
    steps = [e["step"] for e in runs[seeds[0]]["evals"]]
    out = []
    for i, step in enumerate(steps):
        if any(len(runs[s]["evals"]) <= i or runs[s]["evals"][i]["step"] != step for s in seeds):
            break
        pt = {"step": step, "kl": st.crossed_interval(_matrix(runs, seeds, "kl", i)).to_dict()}
        for n in names:
            pt[n] = st.crossed_interval(_matrix(runs, seeds, n, i)).to_dict()
        out.append(pt)
    return out


def _ci(d: Optional[Mapping], digits: int = 3) -> str:
    if not d:
        return "–"
    return f"{d['mean']:.{digits}f} [{d['lo']:.{digits}f}, {d['hi']:.{digits}f}]"


def _diff(d: Optional[Mapping], digits: int = 3) -> str:
    if not d:
        return "(baseline)"
    return f"{d['mean']:+.{digits}f} [{d['lo']:+.{digits}f}, {d['hi']:+.{digits}f}] **{d['verdict']}**"


def format_report(report: Mapping[str, Any]) -> str:
    """Markdown: per setting the world, the matched-budget table, the matched-KL table, fronts, monitor."""
    base = report["baseline"]
    lines: List[str] = []
    for setting, rep in report["settings"].items():
        names = rep["objectives"]
        short = [short_name(n) for n in names]
        lines.append(f"## setting `{setting}`: {', '.join(short)}")
        if "error" in rep:
            lines += ["", rep["error"], ""]
            continue
        lines.append("")
        lines.append(f"{rep['steps']} PPO steps x {rep['batch_size']} responses, KL coefficient {rep['kl_coef']} "
                     f"({'adaptive' if rep['adaptive_kl'] else 'fixed'}); seeds {rep['seeds']}; "
                     f"{rep['n_prompts']} evaluation prompts; intervals: {int(report['level'] * 100)} % over "
                     f"seeds and prompts (two-way random effects, t with Satterthwaite df).")
        lines.append("")
        lines.append("Conflict on the untrained model (discordant response pairs; 0.5 = unrelated, > 0.5 = "
                     "opposed): " + "; ".join(f"{short_name(c['pair'][0])} vs {short_name(c['pair'][1])} "
                                               f"{c['discordant']:.2f} (r = {c['corr']:+.2f})"
                                               for c in rep["conflict"]))
        lines.append("")
        rows = rep["rows"]
        hdr = ["method", *short, "KL", "chars", "hypervolume"]
        lines.append("**Matched budget** (final evaluation): mean [95 % CI]")
        lines.append("")
        lines.append("| " + " | ".join(hdr) + " |")
        lines.append("|" + "---|" * len(hdr))
        u = rep["untrained"]
        lines.append("| untrained | " + " | ".join(f"{m:.3f}" for m in u["means"]) +
                     f" | {u['kl']:.2f} | {u['chars']:.0f} | – |")
        for lab, r in rows.items():
            lines.append(f"| {lab} | " + " | ".join(_ci(r["objectives"][n]) for n in names) +
                         f" | {_ci(r['kl'], 2)} | {r['chars']:.0f} | {_ci(r['hv'])} |")
        if base in rows:
            lines.append("")
            lines.append(f"**Paired differences vs `{base}`** (same seeds, same prompts): difference [95 % CI] "
                         f"verdict (KL: lower is better)")
            lines.append("")
            hdr2 = ["method", *short, "KL"]
            lines.append("| " + " | ".join(hdr2) + " |")
            lines.append("|" + "---|" * len(hdr2))
            for lab, r in rows.items():
                if lab == base:
                    continue
                lines.append(f"| {lab} | " + " | ".join(_diff(r["diff"].get(n)) for n in names) +
                             f" | {_diff(r.get('kl_diff'), 2)} |")
        if rep["kl_star"] > 0:
            lines.append("")
            lines.append(f"**Matched KL**: reward at KL = {rep['kl_star']:.2f} nats (the largest KL every run "
                         f"reaches), interpolated along each run's evaluation curve; interval over seeds"
                         + (f"; difference vs `{base}` paired by seed" if base in rows else ""))
            lines.append("")
            hdr3 = ["method", *short] + ([f"Δ {s}" for s in short] if base in rows else [])
            lines.append("| " + " | ".join(hdr3) + " |")
            lines.append("|" + "---|" * len(hdr3))
            for lab, r in rows.items():
                cells = [_ci(r["matched"].get(n)) for n in names]
                if base in rows:
                    cells += [_diff(r["matched_diff"].get(n)) for n in names]
                lines.append(f"| {lab} | " + " | ".join(cells) + " |")
        lines.append("")
        what = ("untrained means" if rep["hv_ref_kind"] == "untrained" else
                "the worst final mean of any method, per objective,")
        lines.append(f"**Hypervolume** (reference point {[round(x, 3) for x in rep['hv_ref']]} = {what} "
                     f"- {rep['hv_margin']}) of each family's front (labels differing only in their weights) [95 % CI]:")
        lines.append("")
        for fam, f in rep["fronts"].items():
            pts = f"{len(f['labels'])} points" if len(f["labels"]) > 1 else "1 point"
            lines.append(f"- `{fam}` ({pts}): {_ci(f['hv'])}")
        lines.append("")
        lines.append("**Monitor** (mean over steps and seeds): active = fraction of tokens with a positive "
                     "combined advantage; per objective = positive advantage per objective; disagree = tokens "
                     "whose objectives' advantages differ in sign")
        lines.append("")
        pair = f"{short[0]} vs {short[1]}" if len(short) > 1 else "–"
        lines.append(f"| method | active | active per objective | disagree | final conflict ({pair}) | grad norm | "
                     f"s / run | eval noise (seed sd / eval se) |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for lab, r in rows.items():
            m = r["monitor"]
            pos = "/".join(f"{x:.2f}" for x in m["pos"]) if m.get("pos") else "–"
            noise = "; ".join(f"{short_name(n)} {r['noise'][n]['seed_sd']:.3f} / {r['noise'][n]['eval_se']:.3f}"
                              for n in names)
            fc = "–" if r.get("final_conflict") is None else f"{r['final_conflict']:.2f}"
            lines.append(f"| {lab} | {m['active']:.2f} | {pos} | {m['disagree']:.2f} | {fc} | {m['grad_norm']:.2f} | "
                         f"{r['wall_s']:.0f} | {noise} |")
        lines.append("")
    return "\n".join(lines)
