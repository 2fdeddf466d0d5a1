"""Evaluation on held-out prompts, hypervolume and the comparison table.

:func:`evaluate` generates one response per evaluation prompt -- by default **sampled** with the
training temperature / top-k / top-p from a fixed seed (``--eval-seed``), so every evaluation of every
method sees the same random stream (``--eval-greedy`` switches to greedy decoding) -- and reports
for every objective the mean and (population) standard deviation, the KL to the reference (per
response the sum over its tokens of ``logp_policy - logp_ref``, then the mean over responses: a
Monte-Carlo estimate of KL(policy || reference) on the sampled responses), and the mean response
length in tokens and characters.

:func:`hypervolume` is exact: a sweep in 2-D, slicing (recursively) in 3-D and above; objectives
are maximised and only points that strictly dominate the reference point count.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..lm.policy import PolicyWithValueHeads
from ..lm.rewards import Objective, score_all, short_name
from ..lm.rollout import GenSettings, collect_rollout
from ..lm.seeding import derive_seed
from .config import TrainConfig

__all__ = ["evaluate", "hypervolume", "default_hv_ref", "comparison_table", "format_table"]


@torch.no_grad()
def evaluate(policy: PolicyWithValueHeads, ref_lm, tokenizer, objectives: Sequence[Objective],
             prompts: Sequence[str], cfg: TrainConfig, step: int) -> Tuple[Dict, List[Dict]]:
    """(summary, samples) for ``prompts``; the global RNG state is left untouched."""
    was_training = policy.training
    policy.eval()
    s = GenSettings(cfg.max_new_tokens, not cfg.eval_greedy, cfg.temperature, cfg.top_k, cfg.top_p)
    names = [o.name for o in objectives]
    all_scores, kls, lens, samples = [], [], [], []
    try:
        for i in range(0, len(prompts), cfg.eval_batch_size):
            chunk = list(prompts[i:i + cfg.eval_batch_size])
            ro = collect_rollout(policy, ref_lm, tokenizer, chunk, s, derive_seed(cfg.eval_seed, "eval", i),
                                 cfg.max_prompt_tokens, cfg.eval_batch_size, with_values=False,
                                 gen_chunk=max(cfg.eval_batch_size, 64))
            sc = score_all(objectives, ro.prompts, ro.responses)
            kl = ((ro.old_logp - ro.ref_logp) * ro.mask).sum(-1).cpu()
            ln = ro.mask.sum(-1).cpu()
            all_scores.append(sc)
            kls.append(kl)
            lens.append(ln)
            for b in range(len(chunk)):
                samples.append({"step": step, "prompt": ro.prompts[b], "response": ro.responses[b],
                                "scores": {n: float(sc[j, b]) for j, n in enumerate(names)},
                                "kl": float(kl[b]), "tokens": int(ln[b])})
    finally:
        policy.train(was_training)
    S = torch.cat(all_scores, dim=1)
    kl = torch.cat(kls)
    ln = torch.cat(lens).float()
    summary = {
        "step": step,
        "n": int(S.shape[1]),
        "decoding": "greedy" if cfg.eval_greedy else
        f"sampled (temperature {cfg.temperature}, top_k {cfg.top_k}, top_p {cfg.top_p}, seed {cfg.eval_seed})",
        "objectives": {n: {"mean": float(S[j].mean()), "std": float(S[j].std(unbiased=False))}
                       for j, n in enumerate(names)},
        "kl": float(kl.mean()),
        "response_len": float(ln.mean()),
        "response_chars": sum(len(x["response"]) for x in samples) / max(1, len(samples)),
    }
    return summary, samples


def means(summary: Mapping, names: Sequence[str]) -> List[float]:
    return [float(summary["objectives"][n]["mean"]) for n in names]


# -------------------------------------------------------------------------------------------------
# hypervolume (maximisation)
# -------------------------------------------------------------------------------------------------
def _hv2d(pts: List[Tuple[float, ...]], ref: Sequence[float]) -> float:
    """Sweep: points by decreasing x; each point with a new best y adds a rectangle."""
    hv, best_y = 0.0, ref[1]
    for x, y in sorted(((p[0], p[1]) for p in pts), key=lambda q: (-q[0], -q[1])):
        if y > best_y:
            hv += (x - ref[0]) * (y - best_y)
            best_y = y
    return hv


def _hv(pts: List[Tuple[float, ...]], ref: Sequence[float]) -> float:
    d = len(ref)
    if not pts:
        return 0.0
    if d == 1:
        return max(p[0] for p in pts) - ref[0]
    if d == 2:
        return _hv2d(pts, ref)
    # slicing along the last coordinate: between consecutive levels the cross-section is the
    # (d-1)-dimensional hypervolume of the points at or above the upper level
    order = sorted(pts, key=lambda p: -p[-1])
    hv = 0.0
    for i, p in enumerate(order):
        lower = order[i + 1][-1] if i + 1 < len(order) else ref[-1]
        depth = p[-1] - lower
        if depth > 0:
            hv += _hv([q[:-1] for q in order[:i + 1]], ref[:-1]) * depth
    return hv


def hypervolume(points: Sequence[Sequence[float]], ref: Sequence[float]) -> float:
    """Exact hypervolume dominated by ``points`` above ``ref`` (all objectives maximised)."""
    ref = [float(r) for r in ref]
    pts = []
    for p in points:
        p = tuple(float(x) for x in p)
        if len(p) != len(ref):
            raise ValueError(f"hypervolume: point {p} has {len(p)} coordinates, reference has {len(ref)}")
        if all(math.isfinite(x) for x in p) and all(x > r for x, r in zip(p, ref)):
            pts.append(p)
    return float(_hv(pts, ref))


def default_hv_ref(init_means: Sequence[float], margin: float) -> List[float]:
    return [float(m) - margin for m in init_means]


# -------------------------------------------------------------------------------------------------
# tables
# -------------------------------------------------------------------------------------------------
def comparison_table(columns: Mapping[str, Mapping], names: Sequence[str],
                     hv: Optional[Mapping[str, Optional[float]]] = None) -> Dict:
    """JSON form of the comparison: rows (objectives, KL, length, hypervolume) x columns."""
    rows = []
    for n in names:
        rows.append({"row": short_name(n), "objective": n,
                     **{c: {"mean": s["objectives"][n]["mean"], "std": s["objectives"][n]["std"]}
                        for c, s in columns.items()}})
    rows.append({"row": "KL to reference", **{c: {"mean": s["kl"]} for c, s in columns.items()}})
    rows.append({"row": "response length (tokens)", **{c: {"mean": s["response_len"]} for c, s in columns.items()}})
    rows.append({"row": "response length (chars)", **{c: {"mean": s["response_chars"]} for c, s in columns.items()}})
    if hv is not None:
        rows.append({"row": "hypervolume", **{c: {"mean": hv.get(c)} for c in columns}})
    return {"columns": list(columns), "rows": rows}


def format_table(table: Mapping) -> str:
    """Markdown table of :func:`comparison_table` (mean ± std where a std exists)."""
    cols = table["columns"]

    def cell(v):
        if v is None or v.get("mean") is None:
            return "–"
        if "std" in v:
            return f"{v['mean']:.3f} ± {v['std']:.3f}"
        return f"{v['mean']:.3f}"

    lines = ["| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for r in table["rows"]:
        lines.append(f"| {r['row']} | " + " | ".join(cell(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)
