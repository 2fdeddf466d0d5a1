"""The preference-data format (pama_ext.dpo.data): good rows load, every bad row kind is a clear error with
the row number, the labelling rule, the conflict rate and MOPO's response pools."""
from __future__ import annotations

import json

import pytest
import torch

from pama_ext.dpo.data import (DataError, compare, conflict_rate, load_hf_dataset, load_jsonl, pairs_from_scores,
                               response_pool)

OBJ = ["sentiment", "length"]


def _row(**kw):
    r = {"prompt": "This movie", "chosen": "was great.", "rejected": "was dull and long.",
         "labels": {"sentiment": 1, "length": -1}}
    r.update(kw)
    return r


def _write(tmp_path, lines):
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return str(p)


def test_good_rows_load(tmp_path):
    path = _write(tmp_path, [_row(), "", _row(labels={"length": 0, "sentiment": -1}, chosen="ok.")])
    d = load_jsonl(path, OBJ)
    assert len(d) == 2 and d.objectives == OBJ
    assert d.labels.tolist() == [[1.0, -1.0], [-1.0, 0.0]]
    assert d.chosen == ["was great.", "ok."]
    assert d.info["conflict_rate"] == 0.5
    # without objectives: the first row's label keys define them
    assert load_jsonl(path).objectives == OBJ
    # round trip through rows()
    assert load_jsonl(_write(tmp_path, d.rows()), OBJ).labels.tolist() == d.labels.tolist()


@pytest.mark.parametrize("bad, message", [
    ('{"prompt": "x", "chosen": ', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    (_row(labels={"sentiment": 1}), "missing label for objective 'length'"),
    (_row(labels={"sentiment": 1, "length": 1, "humor": 0}), "unknown objective 'humor'"),
    (_row(chosen="   "), "empty response in field 'chosen'"),
    (_row(rejected=""), "empty response in field 'rejected'"),
    ({k: v for k, v in _row().items() if k != "prompt"}, "missing field 'prompt'"),
    ({k: v for k, v in _row().items() if k != "labels"}, "missing field 'labels'"),
    (_row(labels={"sentiment": 2, "length": 0}), "label of objective 'sentiment' must be +1, -1 or 0; got 2"),
    (_row(labels={"sentiment": True, "length": 0}), "label of objective 'sentiment' must be +1, -1 or 0"),
    (_row(labels={"sentiment": "1", "length": 0}), "label of objective 'sentiment' must be +1, -1 or 0"),
    (_row(chosen=3), "field 'chosen' must be a string"),
    (_row(labels=[1, -1]), "field 'labels' must be a non-empty object"),
])
def test_bad_rows_name_the_row(tmp_path, bad, message):
    path = _write(tmp_path, [_row(), "", _row(), bad])  # the bad row is on line 4
    with pytest.raises(DataError) as ei:
        load_jsonl(path, OBJ)
    assert str(ei.value).startswith(f"{path}:4: "), str(ei.value)
    assert message in str(ei.value)


def test_unknown_objective_without_configured_objectives(tmp_path):
    path = _write(tmp_path, [_row(), _row(labels={"sentiment": 1, "humor": 1})])
    with pytest.raises(DataError, match=r":2: unknown objective 'humor'"):
        load_jsonl(path)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="no preference rows"):
        load_jsonl(_write(tmp_path, ["", "  "]), OBJ)
    with pytest.raises(DataError, match="cannot read"):
        load_jsonl(str(tmp_path / "nope.jsonl"), OBJ)


def test_compare_and_conflict_rate():
    a = torch.tensor([0.5, 0.5, 0.5, 0.0])
    b = torch.tensor([0.2, 0.49, 0.9, 0.0])
    assert compare(a, b, 0.02).tolist() == [1.0, 0.0, -1.0, 0.0]
    assert compare(b, a, 0.0).tolist() == [-1.0, -1.0, 1.0, 0.0]
    labels = torch.tensor([[1, 1, 0, -1], [-1, 1, -1, 0]], dtype=torch.float32)
    assert conflict_rate(labels) == 0.25


def test_pairs_from_scores_and_response_pool():
    prompts = ["p0", "p1"]
    responses = [["a", "b", "c"], ["d", "e", "d"]]  # p1 has a duplicate response: that pair is skipped
    # objective 0 ranks a > b > c, objective 1 ranks c > b > a (full conflict); p1: d vs e tie on objective 1
    scores = torch.tensor([[[0.9, 0.5, 0.1], [0.2, 0.8, 0.2]],
                           [[0.1, 0.5, 0.9], [0.3, 0.3, 0.3]]])
    d = pairs_from_scores(prompts, responses, scores, ["s", "l"], tie_margin=0.01)
    assert len(d) == 3 + 2
    assert (d.labels[0] >= 0).all()  # chosen is what the first non-tied objective prefers
    assert d.info["conflict_rate"] == pytest.approx(3 / 5)
    pool = response_pool(d)
    assert pool.prompts == prompts and pool.n_prompts == 2
    assert sorted(pool.responses[:3]) == ["a", "b", "c"] and sorted(pool.responses[3:]) == ["d", "e"]
    wr = {(pool.group[i].item(), r): pool.winrate[:, i].tolist() for i, r in enumerate(pool.responses)}
    assert wr[(0, "a")] == [1.0, 0.0] and wr[(0, "b")] == [0.5, 0.5] and wr[(0, "c")] == [0.0, 1.0]
    # d appears twice in p1's sample, is compared with e twice: loses both on objective 0, ties on objective 1
    assert wr[(1, "d")] == [0.0, 0.5] and wr[(1, "e")] == [1.0, 0.5]
    assert pool.comparisons.tolist() == [2, 2, 2, 2, 2]


def test_hf_dataset_loader(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [_row(), _row(chosen="fine.")]
    ds = datasets.Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
                                      "sentiment": r["labels"]["sentiment"], "length": r["labels"]["length"]}
                                     for r in rows])
    ds.save_to_disk(str(tmp_path / "ds"))
    d = load_hf_dataset(str(tmp_path / "ds"), objectives=OBJ)
    assert len(d) == 2 and d.labels.tolist() == [[1.0, 1.0], [-1.0, -1.0]]
    bad = datasets.Dataset.from_list([{"prompt": "x", "chosen": "", "rejected": "y", "sentiment": 1, "length": 0}])
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"row 1: empty response in field 'chosen'"):
        load_hf_dataset(str(tmp_path / "bad"), objectives=OBJ)


def test_hf_loader_without_datasets_is_a_clear_error(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **kw):
        if name == "datasets":
            raise ImportError("no datasets")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(DataError, match="the 'datasets' package is not installed"):
        load_hf_dataset("whatever", objectives=OBJ)


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85"])
def test_line_separators_inside_strings_are_text(tmp_path, sep):
    # valid JSON (JSON escapes none of these when ensure_ascii is off); str.splitlines would cut the row
    rows = [_row(chosen=f"was{sep}great."), _row(prompt=f"This{sep}movie", rejected=f"dull{sep}")]
    p = tmp_path / "sep.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    d = load_jsonl(str(p), OBJ)
    assert d.chosen == [f"was{sep}great.", "was great."] and d.prompts == ["This movie", f"This{sep}movie"]
    assert d.rejected[1] == f"dull{sep}"


def test_crlf_and_bom_load(tmp_path):
    p = tmp_path / "win.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps(r).encode() + b"\r\n" for r in [_row(), _row()]) + b"\r\n")
    assert len(load_jsonl(str(p), OBJ)) == 2


def test_non_utf8_file_names_the_line(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(json.dumps(_row()).encode() + b"\n" + json.dumps(_row(chosen="caf\u00e9")).encode("ascii")
                  .replace(b"\\u00e9", b"\xe9") + b"\n")
    with pytest.raises(DataError) as ei:
        load_jsonl(str(p), OBJ)
    assert str(ei.value).startswith(f"{p}:2: not valid UTF-8 (byte 0xe9 at column "), str(ei.value)
