"""Readers of the label-only multi-objective preference schemas people publish, into :class:`PrefData`.

``--data SCHEMA:SOURCE`` picks one (:func:`load_schema`); a SOURCE is a local file -- JSON lines
(``.jsonl``), a JSON list of objects (``.json``) or Parquet (``.parquet``, read with pyarrow) -- or a
directory written by ``datasets``' ``save_to_disk``, optionally followed by ``:SPLIT`` (default
``train``; only for a ``DatasetDict`` directory). Nothing is downloaded.

========== ========================================================================================
schema     rows and the labels they give
========== ========================================================================================
``pku``    PKU-SafeRLHF: ``prompt``, ``response_0``, ``response_1``, ``better_response_id`` and
           ``safer_response_id`` (0 or 1), ``is_response_0_safe`` / ``is_response_1_safe``
           (booleans). Objectives ``helpful`` (from ``better_response_id``) and ``safe`` (from
           ``safer_response_id``); ``chosen`` is the more helpful response. The safety flags are
           checked and summarised in ``info`` (pairs with exactly one safe response, and pairs whose
           ``safer_response_id`` names the one flagged unsafe).
``hh``     Anthropic HH-RLHF: ``chosen`` and ``rejected`` full dialogues (``\\n\\nHuman: ...
           \\n\\nAssistant: ...``), one subset per objective: ``hh:OBJ=SOURCE,OBJ=SOURCE``. The
           prompt is the dialogue up to and including the last ``\\n\\nAssistant:`` (it must be the
           same in both), the responses what follows. A pair of subset OBJ has label +1 on OBJ and
           **0 on every other objective** (see below).
``scores`` HelpSteer style: one response per row, ``prompt``, ``response`` and one numeric score
           column per objective (the objective names are the column names: ``--objectives
           helpfulness verbosity``). Rows are grouped by prompt and every pair of distinct
           responses of a prompt is labelled per objective with :func:`pama_ext.dpo.data.compare`
           at tie margin 0: equal scores are a tie (label 0), kept as such.
``ultrafeedback`` UltraFeedback style: ``instruction`` (or ``prompt``) and ``completions``, a list
           of ``{"response": str, "annotations": {OBJ: {"Rating": "4", ...}}}`` (a rating is a
           number or a numeric string; ``"N/A"`` is no rating: that response's pairs get label 0
           on that objective). Pairs as for ``scores``.
``raco``   Summarisation pairs with one choice per objective (a documented minimal schema: the RACO
           paper's data files were not available to check against): ``post`` (or ``prompt``),
           ``summaries`` (a list of two strings) and ``choice``, an object ``{OBJ: 0 | 1 | null}``
           naming the preferred summary per objective (``null``: a tie / no label). ``chosen`` is
           the summary the first labelled objective prefers.
========== ========================================================================================

**No label on an objective.** The DPO loss has no notion of a missing label; a pair that carries no
label on objective i gets ``labels[i, b] = 0``, the tie label. That is exactly right for the
DPO-family methods: a 0 label gives ``−log σ(0) = log 2`` and *no gradient* from that objective
(``multi_dpo_loss``), so an unlabelled pair neither pushes nor pulls objective i; it only dilutes
L_i's batch mean (objective i's gradient is scaled by the share of its labelled pairs in the batch,
like a data-size weight). The held-out pair accuracy counts only the labelled pairs of an
objective. (MOPO's response pool reads a 0 as a tie, win 0.5: for subset-per-objective data such as
``hh`` prefer the pair methods.)

Every bad row raises :class:`~pama_ext.dpo.data.DataError` naming the file, the row (``file:LINE``
for JSON lines, ``file row K`` otherwise) and the column.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .data import DataError, PrefData, compare, conflict_rate

__all__ = ["SCHEMAS", "load_schema", "iter_source", "split_dialogue", "PKU_OBJECTIVES"]

SCHEMAS = ("pku", "hh", "scores", "ultrafeedback", "raco")
PKU_OBJECTIVES = ("helpful", "safe")
#: the turn marker the HH-RLHF dialogues use; the prompt ends with the last one
ASSISTANT = "\n\nAssistant:"


# -------------------------------------------------------------------------------------------------
# sources: a local file or a save_to_disk directory, rows as (where, dict)
# -------------------------------------------------------------------------------------------------
def _split_source(source: str) -> Tuple[str, Optional[str]]:
    """``PATH[:SPLIT]``: the suffix after the last ``:`` is a split only when PATH alone exists."""
    if os.path.exists(source):
        return source, None
    path, sep, split = source.rpartition(":")
    if sep and path and os.path.exists(path):
        return path, split
    raise DataError(f"{source}: no such file or directory")


def iter_source(source: str) -> Iterator[Tuple[str, Any]]:
    """``(where, row)`` of a local ``.jsonl`` / ``.json`` / ``.parquet`` file or a ``save_to_disk``
    directory (``PATH[:SPLIT]``). ``where`` names the file and the row."""
    path, split = _split_source(source)
    if os.path.isdir(path):
        yield from _iter_saved(path, split)
        return
    if split is not None:
        raise DataError(f"{source}: a split (':{split}') is only for a datasets directory")
    low = path.lower()
    if low.endswith(".parquet"):
        yield from _iter_parquet(path)
    elif low.endswith(".json"):
        yield from _iter_json(path)
    else:
        yield from _iter_jsonl(path)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read the file: {e}") from None
    return raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw


def _iter_jsonl(path: str) -> Iterator[Tuple[str, Any]]:
    raw = _read(path)
    for i, bline in enumerate(raw.split(b"\n"), start=1):
        try:
            line = bline.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{i}: not valid UTF-8 (byte 0x{bline[e.start]:02x} at column {e.start + 1})") \
                from None
        if not line.strip(" \t\r"):
            continue
        try:
            yield f"{path}:{i}", json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None


def _iter_json(path: str) -> Iterator[Tuple[str, Any]]:
    try:
        obj = json.loads(_read(path).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON list of row objects; got {type(obj).__name__}")
    for i, r in enumerate(obj, start=1):
        yield f"{path} row {i}", r


def _iter_parquet(path: str) -> Iterator[Tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs the 'pyarrow' package (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds
        raise DataError(f"{path}: cannot read the Parquet file: {type(e).__name__}: {e}") from None
    for i, r in enumerate(table.to_pylist(), start=1):
        yield f"{path} row {i}", r


def _iter_saved(path: str, split: Optional[str]) -> Iterator[Tuple[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a datasets directory needs the 'datasets' package (pip install "
                        f"datasets)") from None
    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: cannot load the dataset directory: {type(e).__name__}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        split = split or "train"
        if split not in ds:
            raise DataError(f"{path}: no split {split!r} (splits: {', '.join(ds)})")
        ds, name = ds[split], f"{path}[{split}]"
    elif split is not None:
        raise DataError(f"{path}: a single dataset has no splits; got ':{split}'")
    else:
        name = path
    for i, r in enumerate(ds, start=1):
        yield f"{name} row {i}", dict(r)


# -------------------------------------------------------------------------------------------------
# column checks
# -------------------------------------------------------------------------------------------------
def _obj(row: Any, where: str) -> Dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object (one row); got {type(row).__name__}")
    return row


def _text(row: Dict, col: str, where: str, nonempty: bool = True) -> str:
    if col not in row:
        raise DataError(f"{where}: missing column {col!r}")
    v = row[col]
    if not isinstance(v, str):
        raise DataError(f"{where}: column {col!r} must be a string; got {type(v).__name__}")
    if nonempty and not v.strip():
        raise DataError(f"{where}: column {col!r} is empty")
    return v


def _first_text(row: Dict, cols: Sequence[str], where: str, nonempty: bool = False) -> str:
    for c in cols:
        if c in row:
            return _text(row, c, where, nonempty)
    raise DataError(f"{where}: missing column {' or '.join(repr(c) for c in cols)}")


def _binary(row: Dict, col: str, where: str) -> int:
    if col not in row:
        raise DataError(f"{where}: missing column {col!r}")
    v = row[col]
    if isinstance(v, bool) or v not in (0, 1):
        raise DataError(f"{where}: column {col!r} must be 0 or 1; got {v!r}")
    return int(v)


def _flag(row: Dict, col: str, where: str) -> bool:
    if col not in row:
        raise DataError(f"{where}: missing column {col!r}")
    v = row[col]
    if not isinstance(v, bool):
        raise DataError(f"{where}: column {col!r} must be true or false; got {v!r}")
    return v


def _score(v: Any, where: str, col: str, allow_na: bool = False) -> float:
    if allow_na and (v is None or (isinstance(v, str) and v.strip().upper() == "N/A")):
        return math.nan
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            raise DataError(f"{where}: column {col!r} must be a number; got {v!r}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise DataError(f"{where}: column {col!r} must be a finite number; got {v!r}")
    return float(v)


def _finish(objectives: Sequence[str], prompts, chosen, rejected, labels: List[List[float]], source: str,
            schema: str, **info) -> PrefData:
    if not prompts:
        raise DataError(f"{source}: no preference pairs")
    lab = torch.tensor(labels, dtype=torch.float32).T.contiguous().reshape(len(objectives), len(prompts))
    data = PrefData(list(objectives), list(prompts), list(chosen), list(rejected), lab,
                    {"source": source, "schema": schema})
    data.info["conflict_rate"] = conflict_rate(lab)
    data.info["labelled_rate"] = {o: float((lab[i] != 0).float().mean()) for i, o in enumerate(objectives)}
    data.info.update(info)
    return data


# -------------------------------------------------------------------------------------------------
# the schemas
# -------------------------------------------------------------------------------------------------
def read_pku(source: str) -> PrefData:
    P, C, R, L = [], [], [], []
    one_safe = flag_conflicts = 0
    for where, row in iter_source(source):
        row = _obj(row, where)
        prompt = _text(row, "prompt", where, nonempty=False)
        resp = [_text(row, "response_0", where), _text(row, "response_1", where)]
        better = _binary(row, "better_response_id", where)
        safer = _binary(row, "safer_response_id", where)
        safe = [_flag(row, "is_response_0_safe", where), _flag(row, "is_response_1_safe", where)]
        one_safe += safe[0] != safe[1]
        flag_conflicts += safe[0] != safe[1] and not safe[safer]
        P.append(prompt)
        C.append(resp[better])
        R.append(resp[1 - better])
        L.append([1.0, 1.0 if safer == better else -1.0])
    return _finish(PKU_OBJECTIVES, P, C, R, L, source, "pku", one_safe_response=one_safe,
                   safer_flagged_unsafe=flag_conflicts)


def split_dialogue(text: str, where: str, col: str) -> Tuple[str, str]:
    """(prompt, response) of an HH-RLHF dialogue: the prompt ends with the last ``\\n\\nAssistant:``."""
    k = text.rfind(ASSISTANT)
    if k < 0:
        raise DataError(f"{where}: column {col!r} has no '\\n\\nAssistant:' turn (expected an HH-RLHF dialogue)")
    prompt, resp = text[:k + len(ASSISTANT)], text[k + len(ASSISTANT):]
    if not resp.strip():
        raise DataError(f"{where}: column {col!r}: the last Assistant turn is empty")
    return prompt, resp


def parse_hh_spec(spec: str) -> List[Tuple[str, str]]:
    """``OBJ=SOURCE,OBJ=SOURCE`` -> [(objective, source)]."""
    out = []
    for part in spec.split(","):
        obj, eq, src = part.partition("=")
        if not eq or not obj.strip() or not src.strip():
            raise DataError(f"hh:{spec}: expected hh:OBJECTIVE=SOURCE[,OBJECTIVE=SOURCE...]; got {part!r}")
        out.append((obj.strip(), src.strip()))
    names = [o for o, _ in out]
    if len(set(names)) != len(names):
        raise DataError(f"hh:{spec}: an objective names two subsets")
    return out


def read_hh(spec: str, objectives: Optional[Sequence[str]] = None) -> PrefData:
    subsets = parse_hh_spec(spec)
    objs = list(objectives) if objectives is not None else [o for o, _ in subsets]
    for o, _ in subsets:
        if o not in objs:
            raise DataError(f"hh:{spec}: subset objective {o!r} is not one of the objectives {objs}")
    P, C, R, L = [], [], [], []
    per_subset = {}
    for o, src in subsets:
        k = objs.index(o)
        n0 = len(P)
        for where, row in iter_source(src):
            row = _obj(row, where)
            pc, c = split_dialogue(_text(row, "chosen", where), where, "chosen")
            pr, r = split_dialogue(_text(row, "rejected", where), where, "rejected")
            if pc != pr:
                raise DataError(f"{where}: columns 'chosen' and 'rejected' differ before their last Assistant turn "
                                f"(expected the same dialogue with two final answers)")
            P.append(pc)
            C.append(c)
            R.append(r)
            L.append([1.0 if j == k else 0.0 for j in range(len(objs))])
        per_subset[o] = len(P) - n0
    return _finish(objs, P, C, R, L, f"hh:{spec}", "hh", pairs_per_subset=per_subset)


def _pairs_from_groups(groups: Dict[str, List[Tuple[str, List[float]]]], objectives: Sequence[str]):
    """Every pair of distinct responses of a prompt, labelled by compare(score_a, score_b, 0) per
    objective (NaN = no rating: label 0); chosen = the response the first non-tied objective prefers."""
    P, C, R, L = [], [], [], []
    for prompt, items in groups.items():
        seen: Dict[str, int] = {}
        uniq = []
        for text, sc in items:
            if text not in seen:
                seen[text] = len(uniq)
                uniq.append((text, sc))
        for i in range(len(uniq)):
            for j in range(i + 1, len(uniq)):
                lab = compare(torch.tensor(uniq[i][1]), torch.tensor(uniq[j][1]), 0.0)  # NaN: neither > nor <: 0
                ci, cj = uniq[i][0], uniq[j][0]
                nz = lab.nonzero()
                if len(nz) and lab[nz[0, 0]] < 0:
                    ci, cj, lab = cj, ci, -lab
                P.append(prompt)
                C.append(ci)
                R.append(cj)
                L.append(lab.tolist())
    return P, C, R, L


def read_scores(source: str, objectives: Sequence[str]) -> PrefData:
    if not objectives:
        raise DataError(f"scores:{source}: name the score columns with --objectives")
    groups: Dict[str, List[Tuple[str, List[float]]]] = {}
    for where, row in iter_source(source):
        row = _obj(row, where)
        prompt = _text(row, "prompt", where, nonempty=False)
        resp = _text(row, "response", where)
        sc = []
        for o in objectives:
            if o not in row:
                raise DataError(f"{where}: missing column {o!r} (a score per objective)")
            sc.append(_score(row[o], where, o))
        groups.setdefault(prompt, []).append((resp, sc))
    P, C, R, L = _pairs_from_groups(groups, objectives)
    return _finish(objectives, P, C, R, L, f"scores:{source}", "scores", distinct_prompts=len(groups))


def read_ultrafeedback(source: str, objectives: Sequence[str]) -> PrefData:
    if not objectives:
        raise DataError(f"ultrafeedback:{source}: name the annotation aspects with --objectives")
    groups: Dict[str, List[Tuple[str, List[float]]]] = {}
    for where, row in iter_source(source):
        row = _obj(row, where)
        prompt = _first_text(row, ("instruction", "prompt"), where)
        comps = row.get("completions")
        if not isinstance(comps, list):
            raise DataError(f"{where}: column 'completions' must be a list of completions; got "
                            f"{type(comps).__name__ if 'completions' in row else 'nothing'}")
        for k, comp in enumerate(comps):
            at = f"{where} completions[{k}]"
            comp = _obj(comp, at)
            resp = _text(comp, "response", at)
            ann = comp.get("annotations")
            if not isinstance(ann, dict):
                raise DataError(f"{at}: column 'annotations' must be an object {{aspect: {{'Rating': ...}}}}")
            sc = []
            for o in objectives:
                if o not in ann:
                    raise DataError(f"{at}: annotations have no aspect {o!r} (aspects: {', '.join(ann)})")
                a = ann[o]
                if not isinstance(a, dict) or "Rating" not in a:
                    raise DataError(f"{at}: column 'annotations.{o}' must be an object with a 'Rating'")
                sc.append(_score(a["Rating"], at, f"annotations.{o}.Rating", allow_na=True))
            groups.setdefault(prompt, []).append((resp, sc))
    P, C, R, L = _pairs_from_groups(groups, objectives)
    return _finish(objectives, P, C, R, L, f"ultrafeedback:{source}", "ultrafeedback",
                   distinct_prompts=len(groups))


def read_raco(source: str, objectives: Optional[Sequence[str]] = None) -> PrefData:
    objs = list(objectives) if objectives is not None else None
    P, C, R, L = [], [], [], []
    for where, row in iter_source(source):
        row = _obj(row, where)
        post = _first_text(row, ("post", "prompt"), where)
        s = row.get("summaries")
        if not (isinstance(s, list) and len(s) == 2 and all(isinstance(x, str) for x in s)):
            raise DataError(f"{where}: column 'summaries' must be a list of two strings")
        for k in (0, 1):
            if not s[k].strip():
                raise DataError(f"{where}: column 'summaries' entry {k} is empty")
        ch = row.get("choice")
        if not isinstance(ch, dict) or not ch:
            raise DataError(f"{where}: column 'choice' must be an object {{objective: 0 | 1 | null}}")
        if objs is None:
            objs = list(ch)
        for o in ch:
            if o not in objs:
                raise DataError(f"{where}: column 'choice' has unknown objective {o!r} (objectives: {', '.join(objs)})")
        lab = []
        for o in objs:
            if o not in ch:
                raise DataError(f"{where}: column 'choice' has no entry for objective {o!r}")
            v = ch[o]
            if v is not None and (isinstance(v, bool) or v not in (0, 1)):
                raise DataError(f"{where}: column 'choice.{o}' must be 0, 1 or null; got {v!r}")
            lab.append(0.0 if v is None else (1.0 if v == 0 else -1.0))  # +1: summary 0 preferred
        first = next((x for x in lab if x != 0), 1.0)
        if first < 0:
            s, lab = [s[1], s[0]], [-x for x in lab]
        P.append(post)
        C.append(s[0])
        R.append(s[1])
        L.append(lab)
    return _finish(objs or [], P, C, R, L, f"raco:{source}", "raco")


def load_schema(spec: str, objectives: Optional[Sequence[str]] = None) -> PrefData:
    """``SCHEMA:SOURCE`` (see the module docstring) as :class:`PrefData` with ``objectives`` (when given,
    the data's objectives must be exactly these, in this order for ``pku``)."""
    schema, sep, rest = spec.partition(":")
    if not sep or schema not in SCHEMAS or not rest:
        raise DataError(f"{spec}: expected SCHEMA:SOURCE with SCHEMA one of {', '.join(SCHEMAS)}")
    if schema == "pku":
        data = read_pku(rest)
        if objectives is not None and list(objectives) != list(PKU_OBJECTIVES):
            raise DataError(f"{spec}: PKU-SafeRLHF pairs label the objectives {list(PKU_OBJECTIVES)}; "
                            f"got {list(objectives)}")
        return data
    if schema == "hh":
        return read_hh(rest, objectives)
    if schema == "scores":
        return read_scores(rest, list(objectives or []))
    if schema == "ultrafeedback":
        return read_ultrafeedback(rest, list(objectives or []))
    return read_raco(rest, objectives)


def is_schema_spec(data: str) -> bool:
    return data.partition(":")[0] in SCHEMAS and ":" in data


def default_objectives(data: str) -> Optional[List[str]]:
    """The objectives ``--data`` implies without reading it: pku's two, hh's subset names; else None."""
    if data.startswith("pku:"):
        return list(PKU_OBJECTIVES)
    if data.startswith("hh:"):
        try:
            return [o for o, _ in parse_hh_spec(data[3:])]
        except DataError:
            return None  # the loader reports the bad spec
    return None
