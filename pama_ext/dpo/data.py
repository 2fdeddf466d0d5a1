"""Preference data for ``pama-ext dpo``: the JSONL format, its loaders, the embedded tiny-world pairs,
and the response pools MOPO needs.

A preference row is one JSON object per line::

    {"prompt": "This movie", "chosen": "was great.", "rejected": "was long and dull.",
     "labels": {"sentiment": 1, "length": -1}}

``labels`` holds one entry per objective: ``+1`` when ``chosen`` is better for that objective, ``-1``
when ``rejected`` is better, ``0`` for a tie. Every row must label every configured objective (and
no other). :func:`load_jsonl` checks each row and raises :class:`DataError` naming the file and the
line number (bad JSON, a missing or empty field, a missing label, an unknown objective, a label
that is not +1/-1/0). :func:`load_hf_dataset` reads the same fields from a Hugging Face ``datasets``
dataset that is available locally (a saved dataset directory or a cached dataset name).

:func:`build_tiny_pairs` is the embedded default: it samples several responses per prompt from the
tiny-world model, scores them with the objectives' judges (:mod:`pama_ext.lm.rewards`) and
labels every pair of distinct responses per objective with :func:`compare` (a difference within
``tie_margin`` is a tie). The default objectives -- ``sentiment`` and ``length`` -- disagree on a
share of the pairs (longer tiny-world reviews are more often mixed or neutral); that share is the
*conflict rate* (:func:`conflict_rate`, pairs with at least one ``+1`` and one ``-1`` label).

:func:`response_pool` turns pairs into MOPO's view of the data: per prompt the distinct stored
responses and, per objective, each response's mean win-rate against the others it was compared
with (win 1, tie 0.5, loss 0) -- the estimate of ``p̄(x, y) = E_{y'~μ} p(y ≻ y' | x)`` of docs/dpo.md (MOPO).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["DataError", "PrefData", "ResponsePool", "check_row", "load_jsonl", "load_hf_dataset", "rows_to_data",
           "compare", "conflict_rate", "build_tiny_pairs", "response_pool", "write_jsonl", "encode_responses",
           "heldout_split"]

FIELDS = ("prompt", "chosen", "rejected")


class DataError(ValueError):
    """A bad preference row; the message names the source and the row (line) number."""


@dataclass
class PrefData:
    """Preference pairs: ``labels[i, b]`` in {+1, -1, 0} for objective ``objectives[i]`` and pair b."""
    objectives: List[str]
    prompts: List[str]
    chosen: List[str]
    rejected: List[str]
    labels: Tensor  # [n, N] float32
    info: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def rows(self) -> List[Dict[str, Any]]:
        return [{"prompt": p, "chosen": c, "rejected": r,
                 "labels": {o: int(self.labels[i, b]) for i, o in enumerate(self.objectives)}}
                for b, (p, c, r) in enumerate(zip(self.prompts, self.chosen, self.rejected))]

    def subset(self, idx: Sequence[int]) -> "PrefData":
        idx = list(idx)
        return PrefData(self.objectives, [self.prompts[i] for i in idx], [self.chosen[i] for i in idx],
                        [self.rejected[i] for i in idx], self.labels[:, idx].clone(), dict(self.info))


def check_row(obj: Any, where: str, objectives: Optional[Sequence[str]]) -> Tuple[str, str, str, Dict[str, int]]:
    """Validate one decoded row; ``where`` (e.g. ``data.jsonl:7``) starts every error message."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with prompt, chosen, rejected and labels; "
                        f"got {type(obj).__name__}")
    for k in FIELDS:
        if k not in obj:
            raise DataError(f"{where}: missing field {k!r}")
        if not isinstance(obj[k], str):
            raise DataError(f"{where}: field {k!r} must be a string; got {type(obj[k]).__name__}")
    for k in ("chosen", "rejected"):
        if not obj[k].strip():
            raise DataError(f"{where}: empty response in field {k!r}")
    if "labels" not in obj:
        raise DataError(f"{where}: missing field 'labels' (an object {{objective: +1|-1|0}})")
    labels = obj["labels"]
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{where}: field 'labels' must be a non-empty object {{objective: +1|-1|0}}; got {labels!r}")
    out: Dict[str, int] = {}
    for k, v in labels.items():
        if objectives is not None and k not in objectives:
            raise DataError(f"{where}: unknown objective {k!r} in labels (objectives: {', '.join(objectives)})")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v not in (1, -1, 0):
            raise DataError(f"{where}: label of objective {k!r} must be +1, -1 or 0; got {v!r}")
        out[k] = int(v)
    if objectives is not None:
        for k in objectives:
            if k not in out:
                raise DataError(f"{where}: missing label for objective {k!r}")
    return obj["prompt"], obj["chosen"], obj["rejected"], out


def rows_to_data(rows: Iterable[Tuple[str, Any]], objectives: Optional[Sequence[str]], source: str) -> PrefData:
    """Validated :class:`PrefData` from ``(where, decoded row)`` pairs. Without ``objectives`` the first
    row's label keys (in their order) define them."""
    objs = list(objectives) if objectives is not None else None
    prompts, chosen, rejected, labels = [], [], [], []
    for where, obj in rows:
        if objs is None and isinstance(obj, dict) and isinstance(obj.get("labels"), dict) and obj["labels"]:
            objs = list(obj["labels"])
        p, c, r, lab = check_row(obj, where, objs)
        prompts.append(p)
        chosen.append(c)
        rejected.append(r)
        labels.append([lab[o] for o in objs])
    if not prompts:
        raise DataError(f"{source}: no preference rows")
    lab_t = torch.tensor(labels, dtype=torch.float32).T.contiguous()
    data = PrefData(objs, prompts, chosen, rejected, lab_t, {"source": source})
    data.info["conflict_rate"] = conflict_rate(lab_t)
    return data


#: what JSON counts as whitespace; a line of only these is blank (U+2028, U+2029, U+0085 are not)
_JSON_SPACE = " \t\r"


def load_jsonl(path: str, objectives: Optional[Sequence[str]] = None) -> PrefData:
    """Read and validate a JSONL preference file (UTF-8, an optional BOM; lines end at ``\n`` only, so
    U+2028, U+2029 and U+0085 inside a string are text; blank lines are skipped; errors give line numbers)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read the file: {e}") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]

    def rows():
        for i, bline in enumerate(raw.split(b"\n"), start=1):
            try:
                line = bline.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{i}: not valid UTF-8 (byte 0x{bline[e.start]:02x} at column {e.start + 1}); "
                                f"save the file as UTF-8") from None
            if not line.strip(_JSON_SPACE):
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield f"{path}:{i}", obj

    return rows_to_data(rows(), objectives, path)


def load_hf_dataset(name: str, split: str = "train", objectives: Optional[Sequence[str]] = None) -> PrefData:
    """Rows of a local Hugging Face dataset with the JSONL fields: ``prompt``, ``chosen``, ``rejected`` and
    either a ``labels`` mapping or one column per objective. ``name`` is a directory written by
    ``Dataset.save_to_disk`` or a dataset name already in the local ``datasets`` cache (no downloads:
    ``HF_DATASETS_OFFLINE=1`` is the caller's business). Row numbers in errors start at 1."""
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"hf:{name}: the 'datasets' package is not installed (pip install datasets)") from e
    import os

    try:
        if os.path.isdir(name):
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"hf:{name}: no split {split!r} (splits: {', '.join(ds)})")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, split=split)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DataError(f"hf:{name}: cannot load the dataset: {type(e).__name__}: {e}") from e

    cols = set(ds.column_names)

    def rows():
        for i, r in enumerate(ds, start=1):
            r = dict(r)
            if "labels" not in cols and objectives is not None:
                r["labels"] = {o: r[o] for o in objectives if o in r}
            yield f"hf:{name}[{split}] row {i}", r

    return rows_to_data(rows(), objectives, f"hf:{name}")


def heldout_split(data: PrefData, share: float, seed: int) -> Tuple[PrefData, Optional[PrefData]]:
    """``(train, heldout)``: a seeded ``share`` of the distinct prompts (at least one, at most all but one)
    with all their pairs held out, so no held-out prompt is trained on; ``heldout`` is None for share 0."""
    if share <= 0:
        return data, None
    prompts = list(dict.fromkeys(data.prompts))
    if len(prompts) < 2:
        raise DataError(f"{data.info.get('source', 'data')}: holding out pairs for the evaluation needs at least 2 "
                        f"distinct prompts; got {len(prompts)} (pass --heldout-pairs 0)")
    k = min(len(prompts) - 1, max(1, round(share * len(prompts))))
    g = torch.Generator().manual_seed(seed)
    held = {prompts[i] for i in torch.randperm(len(prompts), generator=g)[:k].tolist()}
    tr = [b for b, p in enumerate(data.prompts) if p not in held]
    he = [b for b, p in enumerate(data.prompts) if p in held]
    return data.subset(tr), data.subset(he)


def write_jsonl(data: PrefData, path: str) -> None:
    from ..lm.files import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in data.rows()))


# -------------------------------------------------------------------------------------------------
# judging
# -------------------------------------------------------------------------------------------------
def compare(a: Tensor, b: Tensor, tie_margin: float) -> Tensor:
    """Per-element preference of ``a`` over ``b``: +1 if ``a > b + tie_margin``, -1 if ``b > a + tie_margin``,
    else 0 (float32). The one rule for labelling pairs and for win rates."""
    d = a.float() - b.float()
    return (d > tie_margin).float() - (d < -tie_margin).float()


def conflict_rate(labels: Tensor) -> float:
    """Share of pairs with at least one objective preferring ``chosen`` and another preferring ``rejected``."""
    if labels.numel() == 0:
        return 0.0
    conflict = (labels > 0).any(0) & (labels < 0).any(0)
    return float(conflict.float().mean())


# -------------------------------------------------------------------------------------------------
# the embedded default: pairs sampled from the tiny-world model
# -------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_responses(lm, tokenizer, prompts: Sequence[str], k: int, gen, seed: int, max_prompt_tokens: int,
                     bar=None) -> List[List[str]]:
    """``k`` sampled responses per prompt (``gen``: :class:`pama_ext.lm.rollout.GenSettings`)."""
    from ..lm.rollout import decode, generate_responses, tokenize_prompts

    device = next(lm.parameters()).device
    flat = [p for p in prompts for _ in range(k)]
    ids, am = tokenize_prompts(tokenizer, flat, max_prompt_tokens, device)
    resp, mask = generate_responses(lm, tokenizer, ids, am, gen, seed, chunk_size=128, bar=bar)
    texts = decode(tokenizer, resp, mask)
    return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]


def pairs_from_scores(prompts: Sequence[str], responses: Sequence[Sequence[str]], scores: Tensor,
                      objectives: Sequence[str], tie_margin: float) -> PrefData:
    """Every pair of distinct, non-empty responses of a prompt, labelled per objective with :func:`compare`
    (``scores``: ``[n, P, K]``). ``chosen`` is the response the first non-tied objective prefers."""
    P, K = len(prompts), len(responses[0]) if responses else 0
    out_p, out_c, out_r, labs = [], [], [], []
    for p in range(P):
        for i in range(K):
            for j in range(i + 1, K):
                yi, yj = responses[p][i], responses[p][j]
                if not yi.strip() or not yj.strip() or yi == yj:
                    continue
                lab = compare(scores[:, p, i], scores[:, p, j], tie_margin)
                nz = lab.nonzero()
                if len(nz) and lab[nz[0, 0]] < 0:
                    yi, yj, lab = yj, yi, -lab
                out_p.append(prompts[p])
                out_c.append(yi)
                out_r.append(yj)
                labs.append(lab)
    if not out_p:
        raise DataError("tiny-world pairs: no pair of distinct responses was sampled")
    labels = torch.stack(labs, 1)
    data = PrefData(list(objectives), out_p, out_c, out_r, labels, {"source": "tiny world"})
    data.info["conflict_rate"] = conflict_rate(labels)
    return data


def build_tiny_pairs(lm, tokenizer, prompts: Sequence[str], judges: Sequence, k: int, gen, seed: int,
                     tie_margin: float, max_prompt_tokens: int = 64, bar=None) -> PrefData:
    """Sample ``k`` responses per prompt, score them with the judges and label all pairs (see the module
    docstring). ``info`` reports the conflict rate, the tie rate per objective and the judges' means."""
    from ..lm.rewards import score_all

    responses = sample_responses(lm, tokenizer, prompts, k, gen, seed, max_prompt_tokens, bar=bar)
    flat_p = [p for p in prompts for _ in range(k)]
    flat_r = [r for rs in responses for r in rs]
    scores = score_all(judges, flat_p, flat_r).view(len(judges), len(prompts), k)
    data = pairs_from_scores(prompts, responses, scores, [j.name for j in judges], tie_margin)
    data.info.update({
        "prompts": len(prompts), "responses_per_prompt": k, "tie_margin": tie_margin,
        "tie_rate": {o: float((data.labels[i] == 0).float().mean()) for i, o in enumerate(data.objectives)},
        "judge_means": {o: float(scores[i].mean()) for i, o in enumerate(data.objectives)},
    })
    return data


# -------------------------------------------------------------------------------------------------
# MOPO's view: response pools with mean pairwise win-rates
# -------------------------------------------------------------------------------------------------
@dataclass
class ResponsePool:
    """Distinct stored responses grouped by prompt. ``group[r]`` is the prompt index of response r,
    ``winrate[k, r]`` its mean win-rate under objective k against the responses it was compared with."""
    objectives: List[str]
    prompts: List[str]  # [P]
    responses: List[str]  # [R]
    group: Tensor  # [R] long, sorted
    winrate: Tensor  # [n, R] float32 in [0, 1]
    comparisons: Tensor  # [R] number of comparisons behind each estimate

    @property
    def n_prompts(self) -> int:
        return len(self.prompts)

    def __len__(self) -> int:
        return len(self.responses)


def response_pool(data: PrefData) -> ResponsePool:
    """Group the pairs by prompt; each distinct response's win-rate per objective is the mean over its
    comparisons of 1 (preferred), 0.5 (tie) and 0 (not preferred)."""
    prompt_idx: Dict[str, int] = {}
    resp_idx: Dict[Tuple[int, str], int] = {}
    prompts, responses, group = [], [], []
    n = len(data.objectives)
    wins: List[List[float]] = []
    counts: List[int] = []

    def rid(p: int, text: str) -> int:
        key = (p, text)
        if key not in resp_idx:
            resp_idx[key] = len(responses)
            responses.append(text)
            group.append(p)
            wins.append([0.0] * n)
            counts.append(0)
        return resp_idx[key]

    lab = data.labels.tolist()
    for b, (x, c, r) in enumerate(zip(data.prompts, data.chosen, data.rejected)):
        if x not in prompt_idx:
            prompt_idx[x] = len(prompts)
            prompts.append(x)
        p = prompt_idx[x]
        ic, ir = rid(p, c), rid(p, r)
        if ic == ir:
            continue
        counts[ic] += 1
        counts[ir] += 1
        for k in range(n):
            s = lab[k][b]
            wins[ic][k] += (s + 1) / 2
            wins[ir][k] += (1 - s) / 2
    order = sorted(range(len(responses)), key=lambda i: (group[i], i))
    cnt = torch.tensor([counts[i] for i in order], dtype=torch.float32)
    win = torch.tensor([wins[i] for i in order], dtype=torch.float32).T.reshape(n, -1)
    keep = cnt > 0
    winrate = torch.where(keep, win / cnt.clamp_min(1), torch.full_like(win, 0.5))
    return ResponsePool(list(data.objectives), prompts, [responses[i] for i in order],
                        torch.tensor([group[i] for i in order], dtype=torch.long), winrate, cnt)


# -------------------------------------------------------------------------------------------------
# tokenisation of (prompt, response) pairs for scoring
# -------------------------------------------------------------------------------------------------
def encode_responses(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_prompt_tokens: int,
                     max_response_tokens: int, device) -> Tuple[Tensor, Tensor, Tensor]:
    """``(input_ids [B, P+T], attention_mask [B, P+T], response_mask [B, T] bool)``: the prompt left-padded
    (as :func:`pama_ext.lm.rollout.tokenize_prompts`), then the response's tokens (encoded without
    special tokens) followed by EOS, right-padded, cut to ``max_response_tokens``."""
    from ..lm.rollout import pad_id, tokenize_prompts

    p_ids, p_mask = tokenize_prompts(tokenizer, prompts, max_prompt_tokens, device)
    enc = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    seqs = [(list(e) + ([eos] if eos is not None else []))[:max_response_tokens] for e in enc]
    T = max(1, max(len(s) for s in seqs))
    pid = pad_id(tokenizer)
    r_ids = torch.full((len(seqs), T), pid, dtype=p_ids.dtype)
    r_mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for b, s in enumerate(seqs):
        r_ids[b, :len(s)] = torch.tensor(s, dtype=p_ids.dtype)
        r_mask[b, :len(s)] = True
    r_ids, r_mask = r_ids.to(device), r_mask.to(device)
    return torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask.to(p_mask.dtype)], 1), r_mask
