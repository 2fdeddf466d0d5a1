"""The embedded tiny world (pama_ext.tiny_world): generator, tokenizer, build, cache.

Fast by construction: one tiny build per module (a 1,500-review corpus and a few seconds of
pretraining) shared by the tests that need a built world.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import time

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from pama_ext import tiny_world as tw  # noqa: E402

# Small everything except the generator's own defaults.
SMALL = tw.TinyWorldConfig(n_eval_reviews=64, n_train_prompts=60, n_eval_prompts=20, n_build_samples=1)


# ---------------------------------------------------------------------------------------------------
# generator
# ---------------------------------------------------------------------------------------------------

def test_generator_is_deterministic_and_seeded():
    a = tw.generate_reviews(400, seed=0)
    assert a == tw.generate_reviews(400, seed=0)
    b = tw.generate_reviews(400, seed=1)
    assert a != b
    assert len(set(a) & set(b)) < 40  # different seeds: mostly different texts
    assert len(set(a)) > 380  # and few duplicates within one seed


def test_generator_lengths_and_labels_vary():
    pairs = tw.generate_labeled_reviews(2000, seed=5)
    words = [len(t.split()) for t, _ in pairs]
    assert min(words) >= tw.MIN_WORDS and max(words) <= tw.MAX_WORDS
    assert sum(w < 15 for w in words) > 200 and sum(w > 40 for w in words) > 200
    assert statistics.pstdev(words) > 10
    assert {lab for _, lab in pairs} == set(tw.LABELS)
    for t, _ in pairs[:200]:
        assert t[0].isupper() and t[-1] in ".!?" and "  " not in t


def test_generator_sentiment_per_vader():
    vader = pytest.importorskip("vaderSentiment.vaderSentiment")
    an = vader.SentimentIntensityAnalyzer()
    pairs = tw.generate_labeled_reviews(1500, seed=2)
    comp = [an.polarity_scores(t)["compound"] for t, _ in pairs]
    assert sum(c > 0.5 for c in comp) > 0.25 * len(comp)
    assert sum(c < -0.5 for c in comp) > 0.2 * len(comp)
    by = {lab: [c for c, (_, l) in zip(comp, pairs) if l == lab] for lab in tw.LABELS}
    assert statistics.mean(by["strong_pos"]) > 0.5
    assert statistics.mean(by["strong_neg"]) < -0.5
    assert abs(statistics.mean(by["neutral"])) < 0.4


def test_prompts_are_sentiment_free_openings():
    train = tw.generate_prompts(300, seed=11)
    assert train == tw.generate_prompts(300, seed=11)
    assert len(set(train)) == 300
    ev = tw.generate_prompts(60, seed=12, exclude=train)
    assert not set(ev) & set(train)
    for p in train + ev:
        words = p.split()
        assert 2 <= len(words) <= 5, p
        assert not {w.lower().strip(",") for w in words} & tw.corpus.OPINION_WORDS, p
    assert "This movie" in train or any(p.startswith("This movie") for p in train)


# ---------------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------------

def test_tokenizer_round_trips_and_pads_left():
    texts = tw.generate_reviews(1000, seed=3)
    tok = tw.build_tokenizer(texts)
    assert 200 < len(tok) < 2000
    for t in texts[:300]:
        ids = tok(t).input_ids
        assert ids[0] == tok.bos_token_id
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == t
    # one token per word and per punctuation mark; contractions stay whole
    assert tok.convert_ids_to_tokens(tok("I didn't like it.").input_ids) == \
        [tw.BOS, "I", "didn't", "like", "it", "."]
    assert tok.padding_side == "left"
    enc = tok(["This movie", "I watched this film"], padding=True, return_tensors="pt")
    assert enc.input_ids[0, 0].item() == tok.pad_token_id and enc.attention_mask[0, 0].item() == 0
    assert enc.input_ids[1, 0].item() == tok.bos_token_id
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4
    assert tok("zyzzyva").input_ids[1] == tok.unk_token_id


# ---------------------------------------------------------------------------------------------------
# build + cache
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    parent = tmp_path_factory.mktemp("cache")
    t0 = time.perf_counter()
    world = tw.build_tiny_world(cache_dir=parent, train_seconds=4.0, seed=0, progress=False,
                                n_reviews=1500, config=SMALL)
    return parent, world, time.perf_counter() - t0


def test_world_path_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PAMA_EXT_CACHE", str(tmp_path))
    assert tw.world_path() == tmp_path / tw.WORLD_DIRNAME
    assert tw.world_path(tmp_path / "x") == tmp_path / "x" / tw.WORLD_DIRNAME
    monkeypatch.delenv("PAMA_EXT_CACHE")
    assert tw.world_path().name == tw.WORLD_DIRNAME


def test_build_gives_loadable_hf_model_that_generates(small_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parent, world, _ = small_world
    assert world.path == parent / tw.WORLD_DIRNAME
    assert sorted(p.name for p in parent.iterdir()) == [tw.WORLD_DIRNAME]  # no temp dirs left
    info = json.loads((world.path / "world.json").read_text())
    for key in ("seed", "corpus_size", "vocab_size", "n_params", "train_loss", "eval_loss",
                "build_seconds", "version", "avg_review_chars"):
        assert key in info, key
    assert info["corpus_size"] == 1500 and info["version"] == tw.VERSION
    assert 20 < info["avg_review_chars"] < 400
    assert len(world.train_prompts) == 60 and len(world.eval_prompts) == 20
    assert not set(world.train_prompts) & set(world.eval_prompts)

    model = AutoModelForCausalLM.from_pretrained(world.path)
    tok = AutoTokenizer.from_pretrained(world.path)
    assert sum(p.numel() for p in model.parameters()) == world.n_params == info["n_params"]
    assert model.config.vocab_size == len(tok) == info["vocab_size"]
    assert tok.padding_side == "left"
    enc = tok(world.eval_prompts[:3], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=10, do_sample=True, top_k=0,
                         pad_token_id=tok.pad_token_id)
    assert out.shape[0] == 3 and enc.input_ids.shape[1] < out.shape[1] <= enc.input_ids.shape[1] + 10
    texts = tok.batch_decode(out, skip_special_tokens=True)
    assert all(t.startswith(p) for t, p in zip(texts, world.eval_prompts[:3]))
    assert "n_params" in repr(world) and "parameters" in world.describe()
    # the convenience loaders
    assert type(world.load_model()).__name__ == "GPT2LMHeadModel"
    assert world.load_tokenizer().pad_token_id == tok.pad_token_id


def test_second_call_loads_from_cache(small_world, monkeypatch):
    parent, world, _ = small_world

    def no_training(*a, **k):
        raise AssertionError("a cached world must not be rebuilt")

    monkeypatch.setattr(tw.build, "pretrain_model", no_training)
    t0 = time.perf_counter()
    again = tw.build_tiny_world(cache_dir=parent, train_seconds=4.0, seed=0, progress=False,
                                n_reviews=1500, config=SMALL)
    assert time.perf_counter() - t0 < 2.0
    assert again.path == world.path and again.info == world.info
    assert again.train_prompts == world.train_prompts and again.eval_prompts == world.eval_prompts
    with pytest.warns(UserWarning, match="force=True"):  # other settings: reused, with a warning
        tw.build_tiny_world(cache_dir=parent, seed=1, progress=False, n_reviews=1500)


def test_fixed_step_builds_are_reproducible(tmp_path):
    from safetensors.torch import load_file

    one_thread = tw.TinyWorldConfig(**{**SMALL.__dict__, "threads": 1})
    kw = dict(train_steps=3, n_reviews=300, config=one_thread, progress=False)
    a = tw.build_tiny_world(cache_dir=tmp_path / "a", **kw)
    b = tw.build_tiny_world(cache_dir=tmp_path / "b", **kw)
    assert a.info["steps"] == 3 and a.info["train_loss"] == b.info["train_loss"]
    wa, wb = load_file(str(a.path / "model.safetensors")), load_file(str(b.path / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # force=True rebuilds in place
    c = tw.build_tiny_world(cache_dir=tmp_path / "a", force=True, **{**kw, "train_steps": 1})
    assert c.path == a.path and c.info["steps"] == 1
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [tw.WORLD_DIRNAME]


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tw.build, "pretrain_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tw.build_tiny_world(cache_dir=tmp_path, train_seconds=1.0, progress=False, n_reviews=200,
                            config=SMALL)
    assert not (tmp_path / tw.WORLD_DIRNAME).exists()
    assert list(tmp_path.iterdir()) == []


def test_concurrent_builder_uses_the_winners_world(small_world, tmp_path, monkeypatch):
    """Another process finished first: our rename fails, we use its world and clean up ours."""
    _, world, _ = small_world
    target = tmp_path / tw.WORLD_DIRNAME

    def racing_build(tmp, cfg, seconds, steps, progress):
        (tmp / "world.json").write_text(json.dumps({"version": tw.VERSION, "loser": True}))
        shutil.copytree(world.path, target)  # the winner lands while we are still building
        return {}

    monkeypatch.setattr(tw.build, "build_into", racing_build)
    got = tw.build_tiny_world(cache_dir=tmp_path, progress=False, n_reviews=1500, config=SMALL)
    assert got.path == target and "loser" not in got.info and got.info["n_params"] == world.n_params
    assert sorted(p.name for p in tmp_path.iterdir()) == [tw.WORLD_DIRNAME]


def test_cli_prints_samples(small_world, capsys):
    parent, world, _ = small_world
    assert tw.main(["--cache-dir", str(parent), "--n-reviews", "1500", "--samples", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out
    assert sum(line.startswith("  - ") for line in out.splitlines()) == 4  # 2 sampled + 2 greedy


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="train_seconds"):
        tw.build_tiny_world(cache_dir=tmp_path, train_seconds=0.0, progress=False)
    with pytest.raises(ValueError, match="n_reviews"):
        tw.build_tiny_world(cache_dir=tmp_path, n_reviews=3, progress=False)


def test_generate_text_helper(small_world):
    _, world, _ = small_world
    model, tok = world.load_model(), world.load_tokenizer()
    a = tw.generate_text(model, tok, ["This movie"], max_new_tokens=8, do_sample=True, seed=4)
    b = tw.generate_text(model, tok, ["This movie"], max_new_tokens=8, do_sample=True, seed=4)
    assert a == b and a[0].startswith("This movie")
    assert torch.get_num_threads() >= 1
