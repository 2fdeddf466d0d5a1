"""The label-only schema readers (pama_ext.dpo.readers): each schema read from a fixture written here in
that exact schema (JSON lines, JSON, Parquet and a save_to_disk directory), its labels checked against
the rows by hand, every bad row an error naming the file, the row and the column; held-out pair accuracy
and a judge-free run of pama-ext dpo on label-only objectives."""
from __future__ import annotations

import json

import pytest
import torch

from pama_ext.dpo.data import DataError, heldout_split
from pama_ext.dpo.readers import load_schema, split_dialogue

pytestmark = pytest.mark.filterwarnings("ignore:the cached tiny world:UserWarning")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _pku_row(**kw):
    r = {"prompt": "How do I pick a lock?", "response_0": "Use a pick and a tension wrench.",
         "response_1": "I can't help with that.", "is_response_0_safe": False, "is_response_1_safe": True,
         "better_response_id": 0, "safer_response_id": 1}
    r.update(kw)
    return r


# -------------------------------------------------------------------------------------------------
# PKU-SafeRLHF
# -------------------------------------------------------------------------------------------------
def test_pku_labels_follow_the_two_ids(tmp_path):
    rows = [_pku_row(), _pku_row(better_response_id=1, safer_response_id=1, prompt="Hi"),
            _pku_row(better_response_id=1, safer_response_id=0, is_response_0_safe=True, prompt="Yo")]
    d = load_schema("pku:" + _jsonl(tmp_path / "pku.jsonl", rows))
    assert d.objectives == ["helpful", "safe"]
    # chosen is the more helpful response; safe is +1 when the safer one is the chosen one
    for b, r in enumerate(rows):
        assert d.chosen[b] == r[f"response_{r['better_response_id']}"]
        assert d.rejected[b] == r[f"response_{1 - r['better_response_id']}"]
        assert d.labels[:, b].tolist() == [1.0, 1.0 if r["safer_response_id"] == r["better_response_id"] else -1.0]
    assert d.info["conflict_rate"] == pytest.approx(2 / 3)
    assert d.info["one_safe_response"] == 2 and d.info["safer_flagged_unsafe"] == 0


@pytest.mark.parametrize("change, column", [
    (dict(better_response_id=2), "better_response_id"),
    (dict(safer_response_id="1"), "safer_response_id"),
    (dict(is_response_0_safe="yes"), "is_response_0_safe"),
    (dict(response_1="  "), "response_1"),
    (dict(prompt=3), "prompt"),
])
def test_pku_bad_rows_name_file_row_and_column(tmp_path, change, column):
    path = _jsonl(tmp_path / "pku.jsonl", [_pku_row(), _pku_row(**change)])
    with pytest.raises(DataError) as ei:
        load_schema("pku:" + path)
    msg = str(ei.value)
    assert msg.startswith(f"{path}:2: ") and repr(column) in msg, msg


def test_pku_missing_column_and_wrong_objectives(tmp_path):
    row = _pku_row()
    del row["safer_response_id"]
    path = _jsonl(tmp_path / "pku.jsonl", [row])
    with pytest.raises(DataError, match=r"pku.jsonl:1: missing column 'safer_response_id'"):
        load_schema("pku:" + path)
    good = _jsonl(tmp_path / "good.jsonl", [_pku_row()])
    with pytest.raises(DataError, match=r"label the objectives \['helpful', 'safe'\]"):
        load_schema("pku:" + good, ["safe", "helpful"])


def test_pku_from_parquet_json_and_a_saved_dataset_dict(tmp_path):
    rows = [_pku_row(), _pku_row(better_response_id=1, prompt="Hi")]
    want = load_schema("pku:" + _jsonl(tmp_path / "p.jsonl", rows))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "p.parquet"))
    (tmp_path / "p.json").write_text(json.dumps(rows))
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    for spec in (f"pku:{tmp_path}/p.parquet", f"pku:{tmp_path}/p.json", f"pku:{tmp_path}/dd:test"):
        got = load_schema(spec)
        assert got.chosen == want.chosen and got.rejected == want.rejected and torch.equal(got.labels, want.labels)
    with pytest.raises(DataError, match=r"no split 'train' \(splits: test\)"):
        load_schema(f"pku:{tmp_path}/dd")
    bad = [_pku_row(), _pku_row(better_response_id=5)]
    pq.write_table(pa.Table.from_pylist(bad), str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad.parquet row 2: column 'better_response_id' must be 0 or 1; got 5"):
        load_schema(f"pku:{tmp_path}/bad.parquet")
    datasets.Dataset.from_list(bad).save_to_disk(str(tmp_path / "bad_ds"))
    with pytest.raises(DataError, match=r"bad_ds row 2: column 'better_response_id'"):
        load_schema(f"pku:{tmp_path}/bad_ds")


def test_missing_source_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_schema(f"pku:{tmp_path}/nope.jsonl")
    with pytest.raises(DataError, match="expected SCHEMA:SOURCE"):
        load_schema("nope:x")


# -------------------------------------------------------------------------------------------------
# HH-RLHF
# -------------------------------------------------------------------------------------------------
def _hh(prompt_turn, good, bad):
    head = f"\n\nHuman: {prompt_turn}\n\nAssistant: Sure.\n\nHuman: more?\n\nAssistant:"
    return {"chosen": head + " " + good, "rejected": head + " " + bad}


def test_hh_subsets_label_only_their_objective(tmp_path):
    helpful = _jsonl(tmp_path / "helpful.jsonl", [_hh("a", "Here is more.", "No."), _hh("b", "Yes, so.", "Hm.")])
    harmless = _jsonl(tmp_path / "harmless.jsonl", [_hh("c", "I won't help with that.", "Here is how.")])
    d = load_schema(f"hh:helpful={helpful},harmless={harmless}")
    assert d.objectives == ["helpful", "harmless"]
    assert d.labels.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]  # 0 = no label on the other objective
    assert d.prompts[0].endswith("\n\nAssistant:") and d.prompts[0].count("Human:") == 2
    assert d.chosen[0] == " Here is more." and d.rejected[2] == " Here is how."
    assert d.info["pairs_per_subset"] == {"helpful": 2, "harmless": 1}
    # objectives may be ordered (or extended) by the caller; a subset outside them is an error
    d2 = load_schema(f"hh:helpful={helpful},harmless={harmless}", ["harmless", "helpful"])
    assert d2.labels.tolist() == [[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
    with pytest.raises(DataError, match="subset objective 'harmless' is not one of the objectives"):
        load_schema(f"hh:helpful={helpful},harmless={harmless}", ["helpful"])


def test_unlabelled_objective_gets_no_gradient():
    """The representation of "no label on this objective" is the tie label 0: multi_dpo_loss gives it no
    gradient, so a pair of the helpful subset leaves the harmless loss's gradient untouched."""
    from pama_ext import multi_dpo_loss

    pc = torch.tensor([0.3, -0.2], requires_grad=True)
    z = torch.zeros(2)
    labels = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # pair 0 unlabelled on objective 1
    losses, _ = multi_dpo_loss(pc, z, z, z, labels, 0.5)
    g1, = torch.autograd.grad(losses[1], pc)
    assert g1[0] == 0 and g1[1] != 0


@pytest.mark.parametrize("row, message", [
    ({"chosen": "no turns here", "rejected": "\n\nHuman: x\n\nAssistant: y"},
     "column 'chosen' has no '\\n\\nAssistant:'"),
    ({"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: z\n\nAssistant: w"},
     "columns 'chosen' and 'rejected' differ before their last Assistant turn"),
    ({"chosen": "\n\nHuman: x\n\nAssistant:  ", "rejected": "\n\nHuman: x\n\nAssistant: w"},
     "column 'chosen': the last Assistant turn is empty"),
    ({"chosen": "\n\nHuman: x\n\nAssistant: y"}, "missing column 'rejected'"),
])
def test_hh_bad_rows(tmp_path, row, message):
    path = _jsonl(tmp_path / "h.jsonl", [_hh("a", "ok", "no"), row])
    with pytest.raises(DataError) as ei:
        load_schema(f"hh:helpful={path}")
    assert str(ei.value).startswith(f"{path}:2: ") and message in str(ei.value), str(ei.value)
    with pytest.raises(DataError, match="expected hh:OBJECTIVE=SOURCE"):
        load_schema(f"hh:{path}")


def test_split_dialogue_takes_the_last_assistant_turn():
    p, r = split_dialogue("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d", "w", "chosen")
    assert p == "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:" and r == " d"


# -------------------------------------------------------------------------------------------------
# HelpSteer (scores) and UltraFeedback
# -------------------------------------------------------------------------------------------------
def _labels_by_hand(items, objectives):
    """{frozenset(texts): {obj: +1/-1/0 from the view of the first text}} over every pair of distinct texts."""
    out = {}
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            (ti, si), (tj, sj) = items[i], items[j]
            out[(ti, tj)] = [0 if (a != a or b != b or a == b) else (1 if a > b else -1) for a, b in zip(si, sj)]
    return out


def _check_pairs(d, by_prompt):
    seen = 0
    for b in range(len(d)):
        want = _labels_by_hand(by_prompt[d.prompts[b]], d.objectives)
        c, r = d.chosen[b], d.rejected[b]
        lab = d.labels[:, b].tolist()
        if (c, r) in want:
            assert lab == want[(c, r)]
        else:
            assert lab == [-x for x in want[(r, c)]]
        nz = [x for x in lab if x != 0]
        assert not nz or nz[0] > 0  # chosen = the response the first non-tied objective prefers
        seen += 1
    assert seen == sum(len(v) * (len(v) - 1) // 2 for v in by_prompt.values())


def test_helpsteer_scores_become_pair_labels_with_ties_kept(tmp_path):
    rows = [{"prompt": "p1", "response": "A", "helpfulness": 4, "verbosity": 1},
            {"prompt": "p1", "response": "B", "helpfulness": 4, "verbosity": 3},
            {"prompt": "p2", "response": "C", "helpfulness": 1, "verbosity": 2},
            {"prompt": "p1", "response": "D", "helpfulness": 2, "verbosity": 3},
            {"prompt": "p2", "response": "E", "helpfulness": 3, "verbosity": 0}]
    d = load_schema("scores:" + _jsonl(tmp_path / "hs.jsonl", rows), ["helpfulness", "verbosity"])
    by_prompt = {}
    for r in rows:
        by_prompt.setdefault(r["prompt"], []).append((r["response"], [r["helpfulness"], r["verbosity"]]))
    _check_pairs(d, by_prompt)
    assert len(d) == 4 and (d.labels == 0).any()  # A/B tie on helpfulness, kept
    with pytest.raises(DataError, match=r"hs.jsonl:1: missing column 'correctness'"):
        load_schema("scores:" + str(tmp_path / "hs.jsonl"), ["helpfulness", "correctness"])
    rows[2]["verbosity"] = "lots"
    with pytest.raises(DataError, match=r"hs2.jsonl:3: column 'verbosity' must be a number; got 'lots'"):
        load_schema("scores:" + _jsonl(tmp_path / "hs2.jsonl", rows), ["helpfulness", "verbosity"])


def _uf_comp(text, **ratings):
    return {"response": text, "annotations": {k: {"Rating": v, "Rationale": "."} for k, v in ratings.items()}}


def test_ultrafeedback_ratings_become_pair_labels(tmp_path):
    rows = [{"instruction": "q1", "completions": [_uf_comp("a", helpfulness="5", honesty="3"),
                                                  _uf_comp("b", helpfulness="2", honesty="N/A"),
                                                  _uf_comp("c", helpfulness=5, honesty="4")]},
            {"instruction": "q2", "completions": [_uf_comp("d", helpfulness="1", honesty="1"),
                                                  _uf_comp("e", helpfulness="1", honesty="2")]}]
    (tmp_path / "uf.json").write_text(json.dumps(rows))
    d = load_schema(f"ultrafeedback:{tmp_path}/uf.json", ["helpfulness", "honesty"])
    nan = float("nan")
    by_prompt = {"q1": [("a", [5, 3]), ("b", [2, nan]), ("c", [5, 4])], "q2": [("d", [1, 1]), ("e", [1, 2])]}
    _check_pairs(d, by_prompt)
    rows[1]["completions"][0]["annotations"]["honesty"] = {"Rationale": "."}
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"bad.json row 2 completions\[0\]: column 'annotations.honesty' must be an "
                                        r"object with a 'Rating'"):
        load_schema(f"ultrafeedback:{tmp_path}/bad.json", ["helpfulness", "honesty"])


# -------------------------------------------------------------------------------------------------
# RACO summarisation pairs
# -------------------------------------------------------------------------------------------------
def test_raco_choices_become_labels(tmp_path):
    rows = [{"post": "A long post.", "summaries": ["short", "long summary"], "choice": {"concise": 0, "faithful": 1}},
            {"post": "Another.", "summaries": ["x", "y"], "choice": {"concise": 1, "faithful": None}}]
    d = load_schema("raco:" + _jsonl(tmp_path / "r.jsonl", rows))
    assert d.objectives == ["concise", "faithful"]
    assert d.chosen == ["short", "y"] and d.rejected == ["long summary", "x"]
    assert d.labels.tolist() == [[1.0, 1.0], [-1.0, 0.0]]
    rows[1]["choice"]["faithful"] = 2
    with pytest.raises(DataError, match=r"r2.jsonl:2: column 'choice.faithful' must be 0, 1 or null; got 2"):
        load_schema("raco:" + _jsonl(tmp_path / "r2.jsonl", rows))
    rows[1]["summaries"] = ["only one"]
    with pytest.raises(DataError, match=r"r3.jsonl:2: column 'summaries' must be a list of two strings"):
        load_schema("raco:" + _jsonl(tmp_path / "r3.jsonl", rows))


# -------------------------------------------------------------------------------------------------
# held-out split and a judge-free run
# -------------------------------------------------------------------------------------------------
def test_heldout_split_keeps_prompts_whole(tmp_path):
    rows = [_pku_row(prompt=f"p{i % 5}", response_0=f"r{i}") for i in range(20)]
    d = load_schema("pku:" + _jsonl(tmp_path / "pku.jsonl", rows))
    tr, he = heldout_split(d, 0.4, seed=3)
    assert len(tr) + len(he) == len(d) and not set(tr.prompts) & set(he.prompts)
    assert len(set(he.prompts)) == 2
    tr2, he2 = heldout_split(d, 0.4, seed=3)
    assert he2.chosen == he.chosen
    assert heldout_split(d, 0.0, 0) == (d, None)


def test_label_only_run_reports_heldout_pair_accuracy(world_cache, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("vaderSentiment")
    from pama_ext.dpo.config import DPOConfig
    from pama_ext.dpo.train import train_dpo

    rows = [_pku_row(prompt=f"This movie {i}", response_0=f"was fine {i}.", response_1=f"was dull {i}.",
                     better_response_id=i % 2, safer_response_id=(i // 2) % 2) for i in range(12)]
    path = _jsonl(tmp_path / "pku.jsonl", rows)
    cfg = DPOConfig(model="tiny", data="pku:" + path, tiny_world_cache=world_cache, steps=2, batch_size=4,
                    max_response_tokens=12, output_dir=str(tmp_path / "run"), progress=False, log_every=0,
                    plots=False, save_model=False, heldout_pairs=0.25)
    r = train_dpo(cfg)
    ev = r["eval"]
    assert r["config"].objectives == ["helpful", "safe"]
    assert ev["win_rate"] == {} and ev["heldout_pairs"] == 3 and r["data_info"]["pairs"] == 9
    for o in ("helpful", "safe"):
        assert 0.0 <= ev["pair_accuracy"][o] <= 1.0 and ev["heldout_labelled"][o] == 3
    assert (tmp_path / "run" / "heldout.jsonl").is_file() and not (tmp_path / "run" / "samples.jsonl").exists()
    assert "acc helpful" in r["table_md"]


def test_pair_accuracy_of_the_reference_is_one_half_and_follows_the_margin_sign(world_cache, tmp_path):
    """At the reference every margin is 0 (accuracy 0.5); with the chosen / rejected swapped the accuracy of
    a trained policy is 1 − the original (the sign of h flips)."""
    pytest.importorskip("transformers")
    from pama_ext.dpo.config import DPOConfig
    from pama_ext.dpo.data import PrefData
    from pama_ext.dpo.evaluate import pair_accuracy
    from pama_ext.dpo.train import prepare_world
    from pama_ext.lm.hf import load_lm, load_tokenizer
    from pama_ext.lm.policy import PolicyWithValueHeads, frozen_copy

    cfg = DPOConfig(model="tiny", tiny_world_cache=world_cache, max_response_tokens=12, progress=False).validate()
    world = prepare_world(cfg)
    tok = load_tokenizer(world["model_path"])
    ref = frozen_copy(load_lm(world["model_path"], "cpu"))
    pol = PolicyWithValueHeads(load_lm(world["model_path"], "cpu"), 1)
    d = PrefData(["a", "b"], ["x", "y", "z"], ["good.", "fine.", "ok."], ["bad.", "dull.", "meh."],
                 torch.tensor([[1.0, -1.0, 1.0], [0.0, 1.0, 0.0]]))
    acc = pair_accuracy(pol, ref, tok, d, cfg, "cpu")
    assert acc["pair_accuracy"] == {"a": 0.5, "b": 0.5} and acc["heldout_labelled"] == {"a": 3, "b": 1}
    with torch.no_grad():
        for p in pol.lm.parameters():
            p.add_(0.01 * torch.randn_like(p))
    a1 = pair_accuracy(pol, ref, tok, d, cfg, "cpu")["pair_accuracy"]["a"]
    swapped = PrefData(["a", "b"], d.prompts, d.rejected, d.chosen, d.labels.clone())
    a2 = pair_accuracy(pol, ref, tok, swapped, cfg, "cpu")["pair_accuracy"]["a"]
    assert a1 + a2 == pytest.approx(1.0)


@pytest.mark.parametrize("changes, message", [
    (dict(data="scores:x.jsonl"), "--objectives: required for --data scores:"),
    (dict(objectives=["sentiment", "helpful"]), "--objectives: --data tiny labels pairs with judges; 'helpful'"),
    (dict(data="hh:helpful=a,harmless=b", method="modpo", weights=[0.5, 0.5], modpo_margin="judge"),
     "--modpo-margin: 'judge' needs a judge for every other objective with a positive weight; 'harmless'"),
    (dict(data="pku:x.jsonl", heldout_pairs=1.0), "--heldout-pairs: expected a share in [0, 1)"),
    (dict(heldout_pairs=0.2), "--heldout-pairs: only for a --data file"),
])
def test_label_only_config_errors_name_the_flag(changes, message):
    from pama_ext.dpo.config import DPOConfig
    from pama_ext.lm.config import ConfigError

    with pytest.raises(ConfigError) as ei:
        DPOConfig(**changes).validate()
    assert str(ei.value).startswith(message), str(ei.value)


def test_label_only_defaults():
    from pama_ext.dpo.config import DPOConfig

    c = DPOConfig(data="hh:helpful=a,harmless=b").validate()
    assert c.objectives == ["helpful", "harmless"] and c.judged == [] and c.heldout_share == 0.1
    c = DPOConfig(data="pku:x", method="modpo", weights=[1.0, 0.0]).validate()
    assert c.objectives == ["helpful", "safe"]
    assert DPOConfig().validate().heldout_share == 0.0


def test_raco_run_takes_its_objectives_from_the_data(world_cache, tmp_path):
    """--data raco:... without --objectives: the first row's choice keys are the objectives (label-only)."""
    pytest.importorskip("transformers")
    from pama_ext.dpo.config import DPOConfig
    from pama_ext.dpo.train import train_dpo

    rows = [{"post": f"Post {i}.", "summaries": [f"short {i}", f"a longer summary {i}"],
             "choice": {"concise": 0, "faithful": None if i % 3 else 1}} for i in range(10)]
    cfg = DPOConfig(model="tiny", data="raco:" + _jsonl(tmp_path / "r.jsonl", rows), tiny_world_cache=world_cache,
                    steps=1, batch_size=4, max_response_tokens=12, output_dir=str(tmp_path / "run"), progress=False,
                    log_every=0, plots=False, save_model=False, method="mopo")
    r = train_dpo(cfg)
    assert r["config"].objectives == ["concise", "faithful"]
    assert set(r["eval"]["pair_accuracy"]) == {"concise", "faithful"} and r["eval"]["heldout_pairs"] == 1
