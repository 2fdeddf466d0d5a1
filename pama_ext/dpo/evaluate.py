"""Evaluation of a preference-trained policy against the reference policy, and the comparison table.

:func:`reference_samples` samples ``eval_samples`` responses per evaluation prompt from the frozen
reference with a fixed seed (``--eval-seed``) and scores them with the judges; it is computed once
and shared by every method of a sweep. :func:`evaluate_policy` samples the same number from the
trained policy with the same seed (common random numbers: the two sides see the same random
stream) and reports, per objective,

- the **win rate** against the reference: response k of prompt x from the policy against response k
  of x from the reference, 1 for a win, 0.5 for a tie, 0 for a loss under the objective's judge, with
  the tie rule of the labels (:func:`pama_ext.dpo.data.compare`, ``--tie-margin``), averaged;
- the judge's mean score (and the reference's),

plus the KL to the reference (per response the sum over its tokens of log π − log π_ref, averaged:
a Monte-Carlo estimate of KL(π ‖ π_ref)) and the mean response length.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

import torch

from .config import DPOConfig
from .data import compare

__all__ = ["reference_samples", "evaluate_policy", "pair_accuracy", "results_table", "format_results"]


def _settings(cfg: DPOConfig):
    from ..lm.rollout import GenSettings

    return GenSettings(max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=cfg.temperature)


def _flat_prompts(prompts: Sequence[str], k: int) -> List[str]:
    return [p for p in prompts for _ in range(k)]


@torch.no_grad()
def reference_samples(ref_lm, tokenizer, judges, prompts: Sequence[str], cfg: DPOConfig, device) -> Dict:
    """The reference's evaluation responses and their judge scores ``[n, N]``."""
    from ..lm.seeding import derive_seed
    from ..lm.rewards import score_all
    from .data import sample_responses

    resp: List[str] = []
    for i in range(0, len(prompts), max(1, cfg.eval_batch_size // cfg.eval_samples)):
        chunk = list(prompts[i:i + max(1, cfg.eval_batch_size // cfg.eval_samples)])
        out = sample_responses(ref_lm, tokenizer, chunk, cfg.eval_samples, _settings(cfg),
                               derive_seed(cfg.eval_seed, "eval", i), cfg.max_prompt_tokens)
        resp += [r for rs in out for r in rs]
    flat = _flat_prompts(prompts, cfg.eval_samples)
    return {"prompts": flat, "responses": resp, "scores": score_all(judges, flat, resp),
            "objectives": [j.name for j in judges]}


@torch.no_grad()
def evaluate_policy(policy, ref_lm, tokenizer, judges, prompts: Sequence[str], cfg: DPOConfig, ref: Mapping) -> Dict:
    """Win rates and judge means of ``policy`` (a PolicyWithValueHeads) against the reference samples ``ref``."""
    from ..lm.seeding import derive_seed
    from ..lm.rewards import score_all
    from ..lm.rollout import collect_rollout

    was = policy.training
    policy.eval()
    resp, kls, lens = [], [], []
    per_call = max(1, cfg.eval_batch_size // cfg.eval_samples)
    try:
        for i in range(0, len(prompts), per_call):
            flat = _flat_prompts(prompts[i:i + per_call], cfg.eval_samples)
            ro = collect_rollout(policy, ref_lm, tokenizer, flat, _settings(cfg), derive_seed(cfg.eval_seed, "eval", i),
                                 cfg.max_prompt_tokens, chunk_size=128, with_values=False)
            resp += ro.responses
            kls.append(((ro.old_logp - ro.ref_logp) * ro.mask).sum(-1).cpu())
            lens.append(ro.mask.sum(-1).float().cpu())
    finally:
        policy.train(was)
    flat = _flat_prompts(prompts, cfg.eval_samples)
    S = score_all(judges, flat, resp)
    R = ref["scores"]
    names = [j.name for j in judges]
    win = (compare(S, R, cfg.tie_margin) + 1) / 2  # [n, N]
    return {
        "n": len(flat),
        "objectives": names,
        "win_rate": {o: float(win[i].mean()) for i, o in enumerate(names)},
        "mean": {o: float(S[i].mean()) for i, o in enumerate(names)},
        "ref_mean": {o: float(R[i].mean()) for i, o in enumerate(names)},
        "kl": float(torch.cat(kls).mean()),
        "response_len": float(torch.cat(lens).mean()),
        "samples": [{"prompt": p, "response": r, "reference": rr,
                     "scores": {o: float(S[i, b]) for i, o in enumerate(names)},
                     "reference_scores": {o: float(R[i, b]) for i, o in enumerate(names)}}
                    for b, (p, r, rr) in enumerate(zip(flat, resp, ref["responses"]))],
    }


@torch.no_grad()
def pair_accuracy(policy, ref_lm, tokenizer, data, cfg: DPOConfig, device, ref_cache=None, chunk: int = 64) -> Dict:
    """Held-out pair accuracy per objective from the implicit reward margin (no judge needed).

    With h_b = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)] (each log-prob divided by its
    token count under ``--length-normalize``, as in the loss), the accuracy of objective i is the mean
    over the pairs labelled on i (s_ib ≠ 0) of 1 when s_ib·h_b > 0, 0.5 when h_b = 0 (so the reference
    itself scores 0.5) and 0 otherwise; ``implicit_margin`` is the mean of β·s_ib·h_b over those pairs.
    An objective with no labelled held-out pair gets None."""
    from .data import encode_responses
    from .methods import reference_sequence_logps, sequence_logps

    was = policy.training
    policy.eval()
    try:
        lp = []
        for texts in (data.chosen, data.rejected):
            out = []
            for i in range(0, len(data), chunk):
                ids, am, rm = encode_responses(tokenizer, data.prompts[i:i + chunk], texts[i:i + chunk],
                                               cfg.max_prompt_tokens, cfg.max_response_tokens, device)
                out.append(sequence_logps(policy, ids, am, rm))
            lp.append(torch.cat(out))
    finally:
        policy.train(was)
    rc, lc = reference_sequence_logps(ref_lm, tokenizer, data.prompts, data.chosen, cfg, device, cache=ref_cache)
    rr, lr = reference_sequence_logps(ref_lm, tokenizer, data.prompts, data.rejected, cfg, device, cache=ref_cache)
    dc, dr = lp[0] - rc, lp[1] - rr
    if cfg.length_normalize:
        dc, dr = dc / lc.clamp_min(1), dr / lr.clamp_min(1)
    h = (dc - dr).float().cpu()
    acc, margin, count = {}, {}, {}
    for i, o in enumerate(data.objectives):
        s = data.labels[i]
        m = s != 0
        count[o] = int(m.sum())
        sh = s[m] * h[m]
        acc[o] = float(((torch.sign(sh) + 1) / 2).mean()) if count[o] else None
        margin[o] = float((cfg.dpo_beta * sh).mean()) if count[o] else None
    return {"pair_accuracy": acc, "implicit_margin": margin, "heldout_labelled": count, "heldout_pairs": len(data)}


def results_table(rows: Sequence[Mapping], names: Sequence[str]) -> List[Dict]:
    """Plain rows for the comparison table: method, setting, win rates, means, KL, ESS (mopo)."""
    from ..lm.rewards import short_name

    out = []
    for r in rows:
        e = r["eval"]
        row = {"method": r["method"], "setting": r["setting"]}
        for n in names:
            if n in e["win_rate"]:
                row[f"win {short_name(n)}"] = e["win_rate"][n]
        for n in names:
            if n in e["mean"]:
                row[f"mean {short_name(n)}"] = e["mean"][n]
        for n in names:
            if n in e.get("pair_accuracy", {}):
                row[f"acc {short_name(n)}"] = e["pair_accuracy"][n]
        row["KL"] = e["kl"]
        row["ESS"] = r.get("ess")
        row["wall s"] = r.get("wall_s")
        out.append(row)
    return out


def format_results(rows: Sequence[Mapping]) -> str:
    """Markdown table of :func:`results_table` rows."""
    if not rows:
        return ""
    cols = list(rows[0])

    def cell(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)
