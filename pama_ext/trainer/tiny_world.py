"""The embedded "tiny world": a self-contained, download-free default for the PAMA trainer.

It has three parts, all built from code in this file on first use and then cached:

1. **Corpus** -- :func:`generate_reviews` writes short English movie-review-like texts (5-60 words) from
   templates and vocabularies defined below. Sentiment ranges from strongly positive to strongly
   negative, with neutral and mixed ("the acting was great, but the plot was dull") reviews; the words
   that carry the sentiment are ones the VADER lexicon scores, so the trainer's ``sentiment`` objective
   (VADER compound) sees them. Long reviews are more often mixed or neutral than short ones, so the
   ``sentiment`` and ``length`` objectives pull in somewhat different directions. Deterministic given a
   seed (it uses its own :class:`random.Random`).
2. **Tokenizer** -- a word-level ``tokenizers`` model (whitespace + punctuation pre-tokenizer, cased)
   wrapped as a ``transformers.PreTrainedTokenizerFast`` with ``<bos>``/``<eos>``/``<pad>``/``<unk>``.
   Encoding adds ``<bos>`` in front; every training review ends with ``<eos>``; padding is on the left
   (what batched generation with a decoder-only model needs). Decoding re-attaches punctuation, so
   ``decode(encode(review)) == review`` for every generated review.
3. **Model** -- a tiny ``GPT2LMHeadModel`` (1.1M parameters: 4 layers, width 144, 96 positions)
   pretrained on the corpus on CPU for a bounded wall time (default 120 s), so that it continues a
   prompt such as "This movie" with plausible review text. Half of the training sequences use shifted
   position ids, so the model is also robust to a left-padded forward pass that does not pass
   ``position_ids`` (``generate`` passes them; a trainer's own forward should too).

:func:`build_tiny_world` builds all of this into ``<cache>/tiny_world-v1`` (``<cache>`` is the
``cache_dir`` argument, else ``$PAMA_EXT_CACHE``, else ``$XDG_CACHE_HOME/pama_ext`` or
``~/.cache/pama_ext``) and returns a :class:`TinyWorld`; later calls load it from there in well under a
second (the model and tokenizer themselves load lazily). The directory is a standard Hugging Face model
directory (``AutoModelForCausalLM.from_pretrained(path)``, ``AutoTokenizer.from_pretrained(path)``) plus
``world.json`` (facts about the build) and ``prompts.json`` (train / eval prompts: review openings of 2-5
words, the eval ones disjoint from the train ones). The build happens in a temporary directory next to
the target that is renamed into place at the end, so an interrupted build never leaves a half-written
world, and of two concurrent builders the later one simply uses the earlier one's result.

Command line: ``python -m pama_ext.trainer.tiny_world [--force] [--cache-dir DIR] [--seconds S]``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "VERSION",
    "WORLD_DIRNAME",
    "TinyWorld",
    "TinyWorldConfig",
    "build_tiny_world",
    "default_cache_dir",
    "world_path",
    "generate_reviews",
    "generate_labeled_reviews",
    "generate_prompts",
    "build_tokenizer",
    "make_model",
    "generate_text",
    "main",
]

VERSION = 1
WORLD_DIRNAME = f"tiny_world-v{VERSION}"

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0..3, in this order

LABELS = ("strong_pos", "pos", "neutral", "mixed", "neg", "strong_neg")
MIN_WORDS, MAX_WORDS = 5, 60

# ----------------------------------------------------------------------------------------------------
# Vocabularies. Sentiment-bearing words are in the VADER lexicon (or are VADER boosters / negations).
# ----------------------------------------------------------------------------------------------------

# (singular, plural)
MEDIA: List[Tuple[str, str]] = [
    ("movie", "movies"), ("film", "films"), ("comedy", "comedies"), ("drama", "dramas"),
    ("thriller", "thrillers"), ("horror movie", "horror movies"), ("sequel", "sequels"),
    ("remake", "remakes"), ("documentary", "documentaries"), ("cartoon", "cartoons"),
    ("western", "westerns"), ("romance", "romances"), ("musical", "musicals"), ("mystery", "mysteries"),
    ("war movie", "war movies"), ("action movie", "action movies"), ("crime drama", "crime dramas"),
    ("animated film", "animated films"), ("family film", "family films"), ("picture", "pictures"),
]
MEDIA_WEIGHTS = [8, 6, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]

ASPECTS_SG = [
    "plot", "story", "acting", "script", "dialogue", "ending", "soundtrack", "music", "cinematography",
    "direction", "director", "cast", "lead actor", "lead actress", "villain", "pacing", "humor",
    "first half", "final scene", "camera work", "editing", "score", "premise", "screenplay",
    "main character", "twist", "opening scene", "hero", "setting", "atmosphere",
]
ASPECTS_PL = [
    "special effects", "characters", "jokes", "action scenes", "songs", "visuals", "performances",
    "fight scenes", "costumes", "actors", "dialogues", "supporting actors",
]

POS_STRONG = [
    "wonderful", "brilliant", "excellent", "amazing", "fantastic", "superb", "outstanding",
    "magnificent", "awesome", "marvelous", "perfect", "gorgeous", "remarkable", "flawless", "great",
]
POS_MILD = [
    "good", "nice", "fun", "enjoyable", "charming", "pleasant", "funny", "clever", "entertaining",
    "interesting", "sweet", "likeable", "engaging", "impressive", "beautiful", "lovely", "exciting",
    "smart", "fresh", "creative", "heartwarming", "cute", "cool", "inspiring", "powerful", "thrilling",
    "fascinating", "delightful",
]
NEG_STRONG = [
    "awful", "terrible", "horrible", "pathetic", "dreadful", "lousy", "stupid", "idiotic", "worthless",
    "bad", "disappointing", "insulting", "ugly", "painful",
]
NEG_MILD = [
    "boring", "dull", "weak", "poor", "annoying", "lame", "messy", "confusing", "ridiculous", "bizarre",
    "odd", "awkward", "flawed", "inferior", "empty", "dumb", "strange",
]
NEUTRAL_ADJ = [
    "long", "short", "simple", "quiet", "slow", "predictable", "average", "ordinary", "typical",
    "unusual", "different", "familiar", "serious", "dark", "loud", "colorful", "old fashioned",
    "realistic", "modern", "calm",
]
INTENS_STRONG = ["absolutely", "truly", "really", "incredibly", "extremely", "totally", "so", "remarkably",
                 "thoroughly", "completely"]
INTENS_MILD = ["quite", "pretty", "fairly", "rather", "very", "mostly", "a little", "somewhat", "kind of",
               "a bit"]
POS_NOUN_STRONG = ["masterpiece", "joy to watch", "real treat", "true gem", "work of art"]
NEG_NOUN_STRONG = ["mess", "disaster", "waste of time", "failure", "complete mess", "total disaster"]

CHARACTERS = [
    "a young woman", "a retired detective", "a small family", "a group of friends", "two brothers",
    "a lonely teacher", "a soldier", "a young boy", "an old man", "a famous singer", "a farmer",
    "a police officer", "two sisters", "a doctor", "a writer", "a taxi driver", "a student",
]
ACTIONS = [
    "moves to a small town", "tries to find the truth", "goes on a long trip", "returns home after many years",
    "starts a new job", "meets a stranger on a train", "travels across the country", "opens a restaurant",
    "buys an old house", "joins a band", "writes a book about the war", "works at a hotel",
    "looks for a missing sister", "spends a summer by the sea", "builds a boat",
]
PLACES = ["a small town", "a big city", "an old house", "the desert", "outer space", "a school",
          "a hospital", "a ship", "Paris", "New York", "the mountains", "a village"]
TIMES = ["last night", "yesterday", "last weekend", "on Friday", "on Sunday", "this morning", "last week",
         "a few days ago", "on TV", "at the cinema", "with my family", "on a plane", "on a rainy afternoon",
         "at home"]
COMPANIONS = ["My wife", "My husband", "My friend", "My sister", "My brother", "My dad", "My mom",
              "My girlfriend", "My boyfriend", "My kids", "My roommate", "My son", "My daughter"]
SOURCES = ["a novel", "a true story", "an old play", "a comic book", "a short story", "a famous book",
           "a video game", "real events"]
WHEN = ["last year", "in the nineties", "a few years ago", "this summer", "in the eighties", "last month",
        "in the seventies", "a long time ago"]
DURATIONS = ["two hours", "ninety minutes", "an hour and a half", "almost three hours", "two and a half hours"]
OPENERS = ["Honestly,", "Overall,", "To be honest,", "In my opinion,", "Well,", "So,", "For me,",
           "All in all,", "Frankly,", "Basically,"]
FEELINGS_POS = ["happy", "glad", "inspired", "cheerful"]
FEELINGS_NEG = ["bored", "tired", "sad", "angry", "annoyed", "disappointed"]

CLOSING_POS_STRONG = [
    "I would highly recommend it to anyone.", "Highly recommended!", "I can't wait to watch it again.",
    "Ten out of ten.", "Go and see it!", "Do not miss it!", "Five stars!", "I loved every minute of it.",
    "It is one of the best {pl} I have ever seen.", "Best {sg} of the year!",
]
CLOSING_POS = [
    "I would recommend it.", "Worth watching.", "Four stars.", "I would watch it again.",
    "It is worth a look.", "A good way to spend an evening.", "I enjoyed it.", "Recommended.",
    "Fans of {pl} will like it.",
]
CLOSING_NEG_STRONG = [
    "Do not waste your time.", "Avoid it at all costs.", "I want my money back.", "One star.",
    "What a waste of time!", "It is one of the worst {pl} I have ever seen.", "Worst {sg} of the year.",
    "Skip this one.", "Zero stars.",
]
CLOSING_NEG = [
    "I would not recommend it.", "Two stars.", "I would not watch it again.", "Not worth the money.",
    "You can skip it.", "I was disappointed.", "I expected more.",
]
CLOSING_NEUTRAL = [
    "Three stars.", "Make up your own mind.", "Watch it if you have time.", "It is what it is.",
    "Some people will like it and some will not.", "I have no strong feelings about it.",
    "Fans of {pl} might want to see it.", "That is all I can say.",
]
CLOSING_MIXED = [
    "It is not perfect, but it is worth watching.", "Good in parts, bad in others.",
    "It could have been better.", "Three stars out of five.", "A mixed bag.",
    "I have mixed feelings about it.", "It has its moments.",
]

# Words that end a prompt (a prompt is the sentiment-free opening of a review).
_OPINION_WORDS = set()
for _lst in (POS_STRONG, POS_MILD, NEG_STRONG, NEG_MILD, NEUTRAL_ADJ, INTENS_STRONG, INTENS_MILD,
             FEELINGS_POS, FEELINGS_NEG, POS_NOUN_STRONG, NEG_NOUN_STRONG):
    for _w in _lst:
        _OPINION_WORDS.update(_w.lower().split())
_OPINION_WORDS.update({
    "not", "never", "don't", "didn't", "wasn't", "isn't", "weren't", "aren't", "can't", "couldn't",
    "loved", "enjoyed", "liked", "hated", "disliked", "best", "worst", "okay", "fine", "decent", "just",
    "a", "an", "what", "no", "one", "expected", "wanted", "hoped",
})


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _a(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


class _Gen:
    """One review generator with its own RNG; all template logic lives here."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)

    # -- small pieces -------------------------------------------------------------------------------
    def c(self, seq):
        return self.r.choice(seq)

    def p(self, prob: float) -> bool:
        return self.r.random() < prob

    def media(self) -> Tuple[str, str]:
        return self.r.choices(MEDIA, weights=MEDIA_WEIGHTS)[0]

    def work_np(self, start: bool = False) -> Tuple[str, bool]:
        """A noun phrase for the whole film ("this movie", "it", ...); returns (text, plural)."""
        sg, _ = self.media()
        x = self.r.random()
        if x < 0.55:
            return f"this {sg}", False
        if x < 0.8:
            return f"the {sg}", False
        if x < 0.9 and not start:
            return "it", False
        return f"that {sg}", False

    def aspect_np(self, long_ok: bool = True) -> Tuple[str, bool]:
        if self.p(0.25):
            a, pl = self.c(ASPECTS_PL), True
        else:
            a, pl = self.c(ASPECTS_SG), False
        if long_ok and self.p(0.3) and len(a.split()) == 1:
            sg, _ = self.media()
            if len(sg.split()) == 1:
                return f"the {a} {self.c(['in', 'of'])} this {sg}", pl
        return f"the {a}", pl

    def subject(self, start: bool = False) -> Tuple[str, bool]:
        return self.work_np(start) if self.p(0.45) else self.aspect_np()

    def cop(self, plural: bool, tense_past: bool = True) -> str:
        x = self.r.random()
        if x < 0.12:
            return "felt"
        if x < 0.2:
            return "seemed"
        if plural:
            return "were" if tense_past or x < 0.6 else "are"
        return "was" if tense_past or x < 0.6 else "is"

    def cop_not(self, plural: bool) -> str:
        return self.c(["weren't", "were not"] if plural else ["wasn't", "was not", "isn't"])

    def adj(self, pol: int, strong: bool) -> str:
        if pol > 0:
            return self.c(POS_STRONG if strong else POS_MILD)
        if pol < 0:
            return self.c(NEG_STRONG if strong else NEG_MILD)
        return self.c(NEUTRAL_ADJ)

    def adv(self, strong: bool) -> str:
        if strong:
            return self.c(INTENS_STRONG) + " " if self.p(0.75) else ""
        return self.c(INTENS_MILD) + " " if self.p(0.45) else ""

    def two_adj(self, pol: int, strong: bool) -> str:
        a1 = self.adj(pol, strong)
        a2 = self.adj(pol, strong if self.p(0.5) else not strong)
        while a2 == a1:
            a2 = self.adj(pol, not strong)
        return f"{a1} and {a2}"

    # -- sentences ----------------------------------------------------------------------------------
    def opinion(self, pol: int, strong: bool) -> str:
        """One sentence with polarity pol (+1/-1)."""
        t = self.r.randrange(11)
        if t <= 2:
            s, pl = self.subject()
            return f"{_cap(s)} {self.cop(pl)} {self.adv(strong)}{self.adj(pol, strong)}."
        if t == 3:
            s, pl = self.subject()
            return f"{_cap(s)} {self.cop(pl)} {self.two_adj(pol, strong)}."
        if t == 4:
            sg, _ = self.media()
            body = f"{self.adv(strong)}{self.adj(pol, strong)} {sg}"
            if strong and self.p(0.5):
                return f"What {_a(self.adj(pol, True) + ' ' + sg)}!"
            return f"It was {_a(body)}."
        if t == 5:
            s, _ = self.aspect_np() if self.p(0.6) else self.work_np()
            if pol > 0:
                v = self.c(["loved", "really loved", "absolutely loved"] if strong else
                           ["liked", "enjoyed", "really enjoyed", "quite liked"])
            else:
                v = self.c(["hated", "really hated", "couldn't stand"] if strong else
                           ["disliked", "didn't like", "didn't enjoy", "didn't care for"])
            return f"I {v} {s}."
        if t == 6:
            s, pl = self.subject()
            if pol > 0:
                how = self.c(["made me laugh", "made me smile", "made me happy", "kept me smiling",
                              "made me laugh out loud"])
            else:
                how = self.c(["bored me", "made me angry", "made me sad", "bored me to death",
                              "made me tired", "annoyed me"])
            return f"{_cap(s)} {how}."
        if t == 7:  # negated
            s, pl = self.subject()
            if pol > 0:
                return f"{_cap(s)} {self.cop_not(pl)} {self.c(['bad', 'boring', 'dull', 'bad at all', 'weak'])}."
            return f"{_cap(s)} {self.cop_not(pl)} {self.c(['very ', 'that ', 'really ', ''])}" \
                   f"{self.c(['good', 'great', 'funny', 'interesting', 'exciting', 'fun'])}."
        if t == 8:
            sg, plm = self.media()
            if strong:
                best = "best" if pol > 0 else "worst"
                return f"This is one of the {best} {plm} I have ever seen."
            a, pl = self.aspect_np(long_ok=False)
            return f"{_cap(a)} {'were' if pl else 'was'} the {'best' if pol > 0 else 'worst'} part."
        if t == 9:
            s, pl = self.work_np()
            noun = self.c(POS_NOUN_STRONG if pol > 0 else NEG_NOUN_STRONG)
            if strong:
                return f"{_cap(s)} {self.cop(pl)} {_a(noun)}."
            adj = self.adj(pol, False)
            return f"{_cap(_a(adj))} {self.media()[0]} with {_a(self.adj(pol, self.p(0.5)))} {self.c(ASPECTS_SG)}."
        # t == 10
        f = self.c(FEELINGS_POS if pol > 0 else FEELINGS_NEG)
        return f"After watching it, I felt {self.adv(strong)}{f}."

    def mixed(self, last_pol: Optional[int] = None) -> str:
        """A sentence with both polarities; last_pol is the polarity of the (stressed) final clause."""
        p2 = last_pol if last_pol is not None else self.c([1, -1])
        p1 = -p2
        s1, pl1 = self.subject()
        s2, pl2 = self.aspect_np()
        while s2 == s1:
            s2, pl2 = self.aspect_np()
        a1 = self.adj(p1, self.p(0.5))
        a2 = self.adj(p2, self.p(0.5))
        t = self.r.randrange(6)
        if t <= 1:
            return f"{_cap(s1)} {self.cop(pl1)} {self.adv(False)}{a1}, but {s2} {self.cop(pl2)} {self.adv(False)}{a2}."
        if t == 2:
            return f"Although {s1} {self.cop(pl1)} {a1}, {s2} {self.cop(pl2)} {self.adv(True)}{a2}."
        if t == 3:
            return f"{_cap(s1)} {self.cop(pl1)} {a1} at first, but it got {self.adv(False)}{a2} later on."
        if t == 4:
            if p2 < 0:
                return f"I wanted to like it, but {s2} {self.cop(pl2)} just too {self.adj(-1, False)}."
            return f"I expected {_a(self.adj(-1, False) + ' ' + self.media()[0])}, but it was {self.adv(True)}{a2}."
        return f"{_cap(s1)} {self.cop(pl1)} {a1}. On the other hand, {s2} {self.cop(pl2)} {a2}."

    def neutral(self) -> str:
        t = self.r.randrange(11)
        if t == 0:
            return f"The story follows {self.c(CHARACTERS)} who {self.c(ACTIONS)}."
        if t == 1:
            return f"It {self.c(['runs', 'lasts', 'is'])} about {self.c(DURATIONS)}."
        if t == 2:
            return f"I watched it {self.c(TIMES)}."
        if t == 3:
            return f"It is based on {self.c(SOURCES)}."
        if t == 4:
            return f"Most of it takes place in {self.c(PLACES)}."
        if t == 5:
            return f"It came out {self.c(WHEN)}."
        if t == 6:
            s, pl = self.subject()
            return f"{_cap(s)} {self.cop(pl)} {self.adv(False)}{self.adj(0, False)}."
        if t == 7:
            return (f"There {self.c(['are', 'were'])} {self.c(['a lot of', 'many', 'a few', 'some'])} "
                    f"{self.c(['songs', 'jokes', 'action scenes', 'characters', 'long scenes', 'flashbacks'])} in it.")
        if t == 8:
            return f"It reminded me of {self.c(['an older film', 'a book I read', 'a movie from my childhood', 'another ' + self.media()[0]])}."
        if t == 9:
            return f"{self.c(COMPANIONS)} {self.c(['picked it', 'chose it', 'suggested it', 'wanted to see it'])}."
        return f"The {self.c(['director', 'writer', 'lead actor', 'lead actress'])} also made {self.c(['two other films', 'a few other movies', 'a TV show', 'a documentary'])}."

    def weak(self) -> str:
        """Lukewarm opinions for neutral reviews."""
        s, pl = self.work_np()
        return self.c([
            f"{_cap(s)} {self.cop(pl)} {self.c(['okay', 'fine', 'average', 'decent', 'alright'])}.",
            f"It was {self.c(['okay', 'fine', 'average', 'decent'])}, I guess.",
            f"{_cap(s)} {self.cop(pl)} {self.c(['neither', 'not'])} {self.c(['good nor bad', 'great but not terrible'])}."
            if self.p(0.5) else f"{_cap(s)} {self.cop(pl)} {_a(self.c(['average', 'typical', 'ordinary']) + ' ' + self.media()[0])}.",
        ])

    def closing(self, label: str) -> str:
        sg, pl = self.media()
        lst = {"strong_pos": CLOSING_POS_STRONG, "pos": CLOSING_POS, "neutral": CLOSING_NEUTRAL,
               "mixed": CLOSING_MIXED, "neg": CLOSING_NEG, "strong_neg": CLOSING_NEG_STRONG}[label]
        return self.c(lst).format(sg=sg, pl=pl)

    def first(self, label: str, pol: int, strong: bool) -> str:
        """The opening sentence (starts with a sentiment-free stem: the source of prompts)."""
        t = self.r.randrange(10)
        sg, _ = self.media()
        if label == "neutral" and self.p(0.5):
            pol = 0
        if label == "mixed" and self.p(0.6):
            return self.mixed()
        if pol == 0:
            opinion = self.neutral() if self.p(0.5) else self.weak()
            opinion_clause = opinion[0].lower() + opinion[1:-1]
        else:
            opinion_clause = None
        if t <= 2:
            s, pl = self.work_np(start=True) if self.p(0.6) else self.aspect_np()
            if pol == 0:
                return f"{_cap(s)} {self.cop(pl)} {self.adv(False)}{self.adj(0, False)}."
            if self.p(0.25):
                return f"{_cap(s)} {self.cop(pl)} {self.two_adj(pol, strong)}."
            return f"{_cap(s)} {self.cop(pl)} {self.adv(strong)}{self.adj(pol, strong)}."
        if t == 3:
            verb = self.c(["watched", "saw", "finally watched", "rented", "streamed", "went to see"])
            tail = f" {self.c(TIMES)}" if self.p(0.7) else ""
            if pol == 0:
                return f"I {verb} this {sg}{tail}."
            return f"I {verb} this {sg}{tail} and it was {self.adv(strong)}{self.adj(pol, strong)}."
        if t == 4:
            op = self.c(OPENERS)
            if pol == 0:
                return f"{op} {opinion_clause}."
            s, pl = self.subject(start=True)
            return f"{op} {s} {self.cop(pl)} {self.adv(strong)}{self.adj(pol, strong)}."
        if t == 5:
            return f"{self.c(COMPANIONS)} and I {self.c(['watched', 'saw'])} this {sg} {self.c(TIMES)}."
        if t == 6:
            if pol == 0:
                return f"After watching this {sg}, I {self.c(['had mixed feelings', 'was not sure what to think', 'had no opinion'])}."
            f = self.c(FEELINGS_POS if pol > 0 else FEELINGS_NEG)
            return f"After watching this {sg}, I felt {self.adv(strong)}{f}."
        if t == 7:
            if pol == 0:
                return f"This is {_a(self.c(['average', 'typical', 'ordinary']) + ' ' + sg)}."
            if strong:
                return f"This is one of the {'best' if pol > 0 else 'worst'} {self.media()[1]} I have ever seen."
            return f"This is {_a(self.adj(pol, strong) + ' ' + sg)}."
        if t == 8:
            if pol == 0:
                return f"I had no idea what to expect from this {sg}."
            if pol > 0:
                v = self.c(["loved", "really loved", "absolutely loved"] if strong else ["liked", "enjoyed", "really enjoyed"])
            else:
                v = self.c(["hated", "really hated"] if strong else ["disliked", "didn't like", "didn't enjoy"])
            return f"I {v} this {sg}."
        # t == 9: a bare exclamation (no prompt can come from it)
        if pol == 0:
            return f"{_cap(_a(self.c(['typical', 'ordinary', 'average', 'simple']) + ' ' + sg))}."
        if strong:
            return f"What {_a(self.adj(pol, True) + ' ' + sg)}!"
        return f"{_cap(_a(self.adj(pol, strong) + ' ' + sg))}."

    # -- whole reviews ------------------------------------------------------------------------------
    def review(self) -> Tuple[str, str]:
        r = self.r
        bucket = r.choices(("short", "medium", "long"), weights=(0.3, 0.4, 0.3))[0]
        lo, hi = {"short": (5, 14), "medium": (15, 32), "long": (33, MAX_WORDS)}[bucket]
        target = r.randint(lo, hi)
        # Long reviews are more often mixed or neutral: sentiment and length are in some tension.
        weights = {"short": (0.30, 0.18, 0.08, 0.04, 0.15, 0.25),
                   "medium": (0.18, 0.20, 0.12, 0.16, 0.16, 0.18),
                   "long": (0.05, 0.10, 0.18, 0.30, 0.17, 0.20)}[bucket]
        label = r.choices(LABELS, weights=weights)[0]
        pol = {"strong_pos": 1, "pos": 1, "neutral": 0, "mixed": r.choice([1, -1]), "neg": -1,
               "strong_neg": -1}[label]
        strong = label.startswith("strong")
        sents = [self.first(label, pol, strong)]
        n = len(sents[0].split())
        closing = self.closing(label) if self.p({"strong_pos": 0.5, "strong_neg": 0.5}.get(label, 0.3)) else None
        reserve = len(closing.split()) if closing else 0
        tries = 0
        last_pol = pol
        while n + reserve < target and tries < 12:
            s = self.body(label, last_pol)
            k = len(s.split())
            if n + k + reserve > MAX_WORDS:
                tries += 1
                continue
            sents.append(s)
            n += k
            last_pol = -last_pol if label == "mixed" else last_pol
        if closing and n + reserve <= MAX_WORDS:
            sents.append(closing)
            n += reserve
        while n < MIN_WORDS:  # very short first sentence ("What a great film!"): add one more
            s = self.body(label, pol)
            if n + len(s.split()) <= MAX_WORDS:
                sents.append(s)
                n += len(s.split())
        return " ".join(sents), label

    def body(self, label: str, pol: int) -> str:
        x = self.r.random()
        if label in ("strong_pos", "strong_neg"):
            if x < 0.65:
                return self.opinion(pol, True)
            if x < 0.85:
                return self.opinion(pol, False)
            return self.neutral()
        if label in ("pos", "neg"):
            if x < 0.5:
                return self.opinion(pol, False)
            if x < 0.62:
                return self.opinion(pol, True)
            if x < 0.88:
                return self.neutral()
            return self.mixed(last_pol=pol)
        if label == "neutral":
            if x < 0.6:
                return self.neutral()
            if x < 0.85:
                return self.weak()
            return self.mixed()
        # mixed (VADER scores the positive words a little higher: stress the negative side more often)
        if x < 0.4:
            return self.mixed(last_pol=-1 if self.p(0.6) else 1)
        if x < 0.75:
            return self.opinion(pol if pol else self.c([1, -1]), self.p(0.3))
        return self.neutral()


def generate_labeled_reviews(n: int, seed: int = 0) -> List[Tuple[str, str]]:
    """``n`` (review, label) pairs; label is one of :data:`LABELS` (the intended sentiment)."""
    g = _Gen(seed)
    return [g.review() for _ in range(n)]


def generate_reviews(n: int, seed: int = 0) -> List[str]:
    """``n`` movie-review-like texts (5-60 words), deterministic given ``seed``."""
    return [t for t, _ in generate_labeled_reviews(n, seed)]


def prompt_from_review(review: str, rng: random.Random, max_words: int = 5) -> Optional[str]:
    """A 2-``max_words`` word, sentiment-free opening of ``review`` (None if it has none)."""
    words = review.split()
    cut = 0
    for w in words[:max_words]:
        if w.lower().strip(",") in _OPINION_WORDS or w[-1:] in ".!?":
            break
        cut += 1
    if cut < 2:
        return None
    k = rng.randint(2, cut)
    return " ".join(words[:k]).rstrip(",")


def generate_prompts(n: int, seed: int = 0, exclude: Sequence[str] = ()) -> List[str]:
    """``n`` distinct review openings (2-5 words, e.g. "This movie was", "I watched this film"),
    none of them in ``exclude``; deterministic given ``seed``."""
    g = _Gen(seed)
    rng = random.Random(seed + 1_000_003)
    seen = set(exclude)
    out: List[str] = []
    for _ in range(200 * n + 1000):
        p = prompt_from_review(g.review()[0], rng)
        if p is not None and p not in seen:
            seen.add(p)
            out.append(p)
            if len(out) == n:
                return out
    raise RuntimeError(f"could only make {len(out)} distinct prompts out of {n} requested")


# ----------------------------------------------------------------------------------------------------
# Tokenizer and model
# ----------------------------------------------------------------------------------------------------

def build_tokenizer(texts: Sequence[str], max_length: int = 96, min_frequency: int = 1):
    """A word-level ``PreTrainedTokenizerFast`` trained on ``texts`` (adds ``<bos>`` in front, pads
    on the left, decodes with punctuation re-attached)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    # Words (with contractions kept whole: "didn't", "it's") and single punctuation marks.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"\w+(?:'\w+)*|[^\w\s]"), behavior="isolated"),
    ])
    trainer = trainers.WordLevelTrainer(vocab_size=100_000, min_frequency=min_frequency,
                                        special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)])
    # Joins tokens with spaces, then removes the space before . , ! ? (the WordPiece decoder's cleanup).
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="left", truncation_side="left", model_max_length=max_length,
        clean_up_tokenization_spaces=False)


@dataclass
class TinyWorldConfig:
    """Everything that determines a tiny world (besides the wall-time budget)."""
    seed: int = 0
    n_reviews: int = 40_000
    n_eval_reviews: int = 500
    n_train_prompts: int = 400
    n_eval_prompts: int = 80
    n_positions: int = 96
    n_embd: int = 144
    n_layer: int = 4
    n_head: int = 4
    activation: str = "gelu"  # exact GELU: one kernel (GPT-2's tanh approximation costs several)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.01
    batch_size: int = 16
    grad_clip: float = 1.0
    shifted_position_frac: float = 0.5
    n_build_samples: int = 5  # sample generations stored in world.json
    threads: Optional[int] = None  # None: all available cores (timed builds may switch to 1 if faster)


def make_model(cfg: TinyWorldConfig, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(cfg.seed)
    conf = GPT2Config(
        vocab_size=len(tokenizer), n_positions=cfg.n_positions, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function=cfg.activation,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = GPT2LMHeadModel(conf)
    model.loss_type = "ForCausalLM"  # the class name does not say so; avoids a warning from transformers
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return model


def _encode_corpus(tokenizer, texts: Sequence[str], max_len: int) -> List[List[int]]:
    eos = tokenizer.eos_token_id
    seqs = [ids + [eos] for ids in tokenizer(list(texts), padding=False, truncation=False)["input_ids"]]
    too_long = sum(len(s) > max_len for s in seqs)
    if too_long:
        warnings.warn(f"tiny_world: {too_long} reviews longer than {max_len} tokens were dropped")
    return [s for s in seqs if len(s) <= max_len]


def _batches(seqs: List[List[int]], batch_size: int, g: torch.Generator) -> List[List[int]]:
    """Index batches of similar-length sequences (little padding), in random order."""
    perm = torch.randperm(len(seqs), generator=g).tolist()
    chunk = batch_size * 32
    out = []
    for i in range(0, len(perm), chunk):
        part = sorted(perm[i:i + chunk], key=lambda j: len(seqs[j]))
        out += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
    order = torch.randperm(len(out), generator=g).tolist()
    return [out[i] for i in order if len(out[i]) == batch_size or len(out) == 1]


def _collate(seqs, idx, pad_id: int, n_positions: int, shift_frac: float, g: Optional[torch.Generator]):
    L = max(len(seqs[i]) for i in idx)
    ids = torch.full((len(idx), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), L), dtype=torch.long)
    for r, i in enumerate(idx):
        s = seqs[i]
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    pos = torch.arange(L).expand(len(idx), L).clone()
    if g is not None and shift_frac > 0 and n_positions > L:
        # Robustness to left padding without position_ids: some rows start at a random offset.
        shift = torch.randint(0, n_positions - L + 1, (len(idx), 1), generator=g)
        use = torch.rand((len(idx), 1), generator=g) < shift_frac
        pos = pos + shift * use
    return ids, mask, labels, pos


def _lr_at(step: int, progress: float, warmup: int, cfg: TinyWorldConfig) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_lr_ratio`` x lr as
    ``progress`` (fraction of the steps, or of the time budget, used so far) goes 0 -> 1."""
    w = min(1.0, (step + 1) / max(1, warmup))
    t = min(1.0, max(0.0, progress))
    return cfg.lr * w * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def _eval_loss(model, seqs, pad_id: int, batch_size: int = 128) -> float:
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        idx = list(range(i, min(i + batch_size, len(seqs))))
        ids, mask, labels, pos = _collate(seqs, idx, pad_id, 0, 0.0, None)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, :-1]
        tgt = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100, reduction="sum")
        tot += loss.item()
        n += int((tgt != -100).sum())
    model.train()
    return tot / max(1, n)


def _train(model, seqs: List[List[int]], pad_id: int, cfg: TinyWorldConfig, seconds: float,
           steps: Optional[int], progress: bool, threads: int = 1,
           adaptive: bool = True) -> Dict[str, Any]:
    """Pretrain ``model`` on ``seqs``: ``steps`` optimizer steps with ``threads`` threads (reproducible),
    or, when ``steps`` is None, for ``seconds`` of wall time with the LR schedule driven by the fraction
    of the budget used, so that it always completes. In the timed mode the thread count is chosen by
    measurement when ``adaptive``: every 100 steps a few steps run with the other setting (``threads``
    or 1; on a busy machine one thread can be several times faster than two) and the faster one is
    kept."""
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    g = torch.Generator().manual_seed(cfg.seed + 1)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    try:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused CPU AdamW in this torch
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    model.train()
    timed = steps is None
    warmup = cfg.warmup_steps if timed else max(1, min(cfg.warmup_steps, steps // 5))
    current = threads
    per_token: Dict[int, List[float]] = {threads: [], 1: []}  # recent seconds per token
    probe_left = 0
    bar = tqdm(total=steps if not timed else None, disable=not progress, desc="tiny world: pretraining",
               unit="step", dynamic_ncols=True, leave=True)
    t0 = time.perf_counter()
    recent: List[float] = []
    ema, step, tokens, epoch, lv = None, 0, 0, 0, float("nan")
    batches: List[List[int]] = []
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "pass an attention_mask": not needed here (see below)
    try:
        while True:
            elapsed = time.perf_counter() - t0
            frac = elapsed / seconds if timed else step / steps
            if (timed and elapsed >= seconds and step > 0) or (not timed and step >= steps):
                break
            use = current
            if timed and adaptive and threads > 1:
                if step > 0 and step % 100 == 1:  # probe the other setting for 4 steps
                    probe_left = 4
                if probe_left > 0:
                    use = 1 if current == threads else threads
                    probe_left -= 1
            torch.set_num_threads(use)
            ts = time.perf_counter()
            if not batches:
                batches = _batches(seqs, cfg.batch_size, g)
                epoch += 1
            idx = batches.pop()
            ids, mask, labels, pos = _collate(seqs, idx, pad_id, cfg.n_positions,
                                              cfg.shifted_position_frac, g)
            lr = _lr_at(step, frac, warmup, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            # Right padding + causal attention: real tokens never see the pads, so no mask is needed
            # (and the attention takes its fast causal path); the pads' labels are -100.
            loss = model(input_ids=ids, position_ids=pos, labels=labels).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"tiny world pretraining: non-finite loss at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            lv = loss.item()
            n_tok = int(mask.sum())
            if step > 0:  # step 0 pays one-off costs
                per_token[use] = (per_token[use] + [(time.perf_counter() - ts) / n_tok])[-8:]
            if timed and adaptive and threads > 1 and probe_left == 0 and per_token[1] and per_token[threads]:
                med = {k: sorted(v)[len(v) // 2] for k, v in per_token.items()}
                current = min(med, key=med.get)
            step += 1
            tokens += n_tok
            ema = lv if ema is None else 0.95 * ema + 0.05 * lv
            recent = (recent + [lv])[-20:]
            if timed and step % 10 == 0:
                el = time.perf_counter() - t0
                bar.total = max(step, int(step * seconds / max(el, 1e-6)))
            bar.update(1)
            if step % 5 == 0:
                bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.1e}", threads=current)
        if timed:
            bar.total = step
            bar.refresh()
    finally:
        hf_logging.set_verbosity(verbosity)
        bar.close()
    return {"steps": step, "train_loss": sum(recent) / max(1, len(recent)), "train_loss_ema": ema,
            "tokens_seen": tokens, "epochs": round(tokens / max(1, sum(map(len, seqs))), 3),
            "threads": current,
            "seconds_per_1k_tokens": {str(k): round(1000 * sorted(v)[len(v) // 2], 4)
                                      for k, v in per_token.items() if v},
            "train_seconds_actual": round(time.perf_counter() - t0, 2)}


def generate_text(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 48,
                  do_sample: bool = True, temperature: float = 1.0, top_k: int = 0,
                  seed: Optional[int] = 0) -> List[str]:
    """Continue each prompt; returns prompt + continuation as text."""
    if seed is not None:
        torch.manual_seed(seed)
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    kw = dict(do_sample=do_sample)
    if do_sample:
        kw.update(temperature=temperature, top_k=top_k)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **kw)
    return tokenizer.batch_decode(out, skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------------
# The world on disk
# ----------------------------------------------------------------------------------------------------

@dataclass
class TinyWorld:
    """A built tiny world. ``path`` is a Hugging Face model directory (model + tokenizer)."""
    path: Path
    train_prompts: List[str]
    eval_prompts: List[str]
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        return int(self.info.get("n_params", 0))

    @property
    def vocab_size(self) -> int:
        return int(self.info.get("vocab_size", 0))

    @property
    def avg_review_chars(self) -> float:
        return float(self.info.get("avg_review_chars", 0.0))

    def load_model(self, device: Optional[str] = None, dtype: Optional[torch.dtype] = None):
        from transformers import AutoModelForCausalLM

        with _QuietHF():
            model = AutoModelForCausalLM.from_pretrained(str(self.path))
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
        return model.eval()

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(self.path))
        tok.padding_side = "left"
        return tok

    def describe(self) -> str:
        i = self.info
        lines = [
            f"tiny world v{i.get('version')} at {self.path}",
            f"  model: GPT-2, {i.get('n_params', 0) / 1e6:.2f}M parameters "
            f"(n_layer={i.get('n_layer')}, n_embd={i.get('n_embd')}, n_head={i.get('n_head')}, "
            f"n_positions={i.get('n_positions')}), vocab {i.get('vocab_size')} words",
            f"  corpus: {i.get('corpus_size')} reviews (seed {i.get('seed')}), "
            f"{i.get('avg_review_words', 0):.1f} words / {i.get('avg_review_chars', 0):.1f} characters "
            f"on average",
            f"  pretraining: {i.get('steps')} steps, {i.get('tokens_seen')} tokens "
            f"({i.get('epochs')} epochs) in {i.get('train_seconds_actual')} s; train loss "
            f"{i.get('train_loss', float('nan')):.3f}, held-out loss {i.get('eval_loss', float('nan')):.3f} "
            f"(perplexity {i.get('eval_perplexity', float('nan')):.2f})",
            f"  prompts: {len(self.train_prompts)} train, {len(self.eval_prompts)} eval; "
            f"built in {i.get('build_seconds')} s",
        ]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"TinyWorld(path={str(self.path)!r}, n_params={self.n_params}, vocab_size={self.vocab_size}, "
                f"train_prompts={len(self.train_prompts)}, eval_prompts={len(self.eval_prompts)})")


def default_cache_dir() -> Path:
    """``$PAMA_EXT_CACHE``, else ``$XDG_CACHE_HOME/pama_ext``, else ``~/.cache/pama_ext``."""
    env = os.environ.get("PAMA_EXT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "pama_ext"


def world_path(cache_dir: Optional[os.PathLike] = None) -> Path:
    """Where the tiny world lives: ``<cache_dir or default_cache_dir()>/tiny_world-v1``."""
    parent = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return parent / WORLD_DIRNAME


class _QuietHF:
    """Silence transformers' progress bars ("Loading weights", "Writing model shards") for a while."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._log = hf_logging
        self._was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        if self._was:
            self._log.enable_progress_bar()


def _load(path: Path) -> TinyWorld:
    info = json.loads((path / "world.json").read_text())
    if info.get("version") != VERSION:
        raise ValueError(f"{path} holds a tiny world of version {info.get('version')}, expected {VERSION}")
    prompts = json.loads((path / "prompts.json").read_text())
    return TinyWorld(path=path, train_prompts=list(prompts["train"]), eval_prompts=list(prompts["eval"]),
                     info=info)


def _is_complete(path: Path) -> bool:
    return (path / "world.json").is_file() and (path / "prompts.json").is_file()


def _clean_stale_tmp(parent: Path, max_age_s: float = 6 * 3600) -> None:
    now = time.time()
    for p in parent.glob(f".{WORLD_DIRNAME}.*"):
        try:
            if now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _vader_mean(texts: Sequence[str]) -> Optional[float]:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        return None
    a = SentimentIntensityAnalyzer()
    return sum(a.polarity_scores(t)["compound"] for t in texts) / max(1, len(texts))


def _build_into(tmp: Path, cfg: TinyWorldConfig, seconds: float, steps: Optional[int],
                progress: bool) -> Dict[str, Any]:
    import transformers

    t0 = time.perf_counter()
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    say(f"tiny world: generating {cfg.n_reviews} reviews (seed {cfg.seed})")
    labeled = generate_labeled_reviews(cfg.n_reviews, seed=cfg.seed)
    texts = [t for t, _ in labeled]
    held_out = generate_reviews(cfg.n_eval_reviews, seed=cfg.seed + 7919)
    train_prompts = generate_prompts(cfg.n_train_prompts, seed=cfg.seed + 101)
    eval_prompts = generate_prompts(cfg.n_eval_prompts, seed=cfg.seed + 202, exclude=train_prompts)

    tokenizer = build_tokenizer(texts, max_length=cfg.n_positions)
    seqs = _encode_corpus(tokenizer, texts, cfg.n_positions)
    eval_seqs = _encode_corpus(tokenizer, held_out, cfg.n_positions)
    model = make_model(cfg, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"tiny world: vocab {len(tokenizer)} words, {len(seqs)} sequences, "
        f"{sum(map(len, seqs))} tokens; GPT-2 with {n_params / 1e6:.2f}M parameters")

    prev_threads = torch.get_num_threads()
    try:
        n_cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n_cores = os.cpu_count() or 1
    try:
        stats = _train(model, seqs, tokenizer.pad_token_id, cfg, seconds, steps, progress,
                       threads=max(1, cfg.threads or n_cores), adaptive=cfg.threads is None)
        eval_loss = _eval_loss(model, eval_seqs, tokenizer.pad_token_id)
        model.eval()
        samples, greedy = [], [""]
        if cfg.n_build_samples > 0:
            samples = generate_text(model, tokenizer, eval_prompts[:cfg.n_build_samples],
                                    max_new_tokens=48, do_sample=True, seed=cfg.seed)
            greedy = generate_text(model, tokenizer, ["This movie"], max_new_tokens=48, do_sample=False)
    finally:
        torch.set_num_threads(prev_threads)

    with _QuietHF():
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    (tmp / "prompts.json").write_text(json.dumps({"train": train_prompts, "eval": eval_prompts}, indent=1))
    chars = [len(t) for t in texts]
    words = [len(t.split()) for t in texts]
    # What a response is on average in the RL task: the review minus its opening.
    prng = random.Random(cfg.seed + 5)
    comp = []
    for t in texts[:5000]:
        p = prompt_from_review(t, prng)
        if p is not None:
            comp.append(len(t) - len(p) - 1)
    srt = sorted(chars)
    info: Dict[str, Any] = {
        "version": VERSION,
        "seed": cfg.seed,
        "config": cfg.__dict__.copy(),
        "corpus_size": len(texts),
        "corpus_tokens": sum(map(len, seqs)),
        "vocab_size": len(tokenizer),
        "n_params": n_params,
        "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head, "n_positions": cfg.n_positions,
        "max_review_tokens": max(map(len, seqs)),
        "avg_review_chars": sum(chars) / len(chars),
        "median_review_chars": srt[len(srt) // 2],
        "p10_review_chars": srt[len(srt) // 10],
        "p90_review_chars": srt[(9 * len(srt)) // 10],
        "avg_review_words": sum(words) / len(words),
        "avg_completion_chars": sum(comp) / max(1, len(comp)),
        "label_counts": {lab: sum(1 for _, l in labeled if l == lab) for lab in LABELS},
        "vader_mean_compound": _vader_mean(texts[:3000]),
        "train_seconds_budget": seconds if steps is None else None,
        **stats,
        "eval_loss": eval_loss,
        "eval_perplexity": math.exp(eval_loss),
        "samples": samples,
        "greedy_sample": greedy[0],
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "build_seconds": round(time.perf_counter() - t0, 2),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (tmp / "world.json").write_text(json.dumps(info, indent=1))  # written last
    return info


def build_tiny_world(cache_dir: Optional[os.PathLike] = None, force: bool = False,
                     train_seconds: float = 120.0, seed: int = 0, progress: bool = True,
                     n_reviews: Optional[int] = None, train_steps: Optional[int] = None,
                     config: Optional[TinyWorldConfig] = None) -> TinyWorld:
    """Build the tiny world once (about ``train_seconds`` of pretraining) or load it from the cache.

    The world lives in ``world_path(cache_dir)`` (``<cache_dir>/tiny_world-v1``; ``cache_dir``
    defaults to ``$PAMA_EXT_CACHE`` or ``~/.cache/pama_ext``). ``force=True`` rebuilds it.
    ``n_reviews`` shrinks or grows the corpus (default 40,000); ``train_steps`` fixes the number of
    optimizer steps instead of the wall-time budget (fully reproducible); ``config`` overrides any
    other setting (its ``seed``/``n_reviews`` are replaced by the arguments when those are given).

    A cached world built with another seed or corpus size is reused with a warning (pass
    ``force=True`` to rebuild); the time budget is not part of the cache identity.
    """
    cfg = TinyWorldConfig(**(config.__dict__ if config is not None else {}))
    if config is None or seed != 0:
        cfg.seed = seed
    if n_reviews is not None:
        cfg.n_reviews = int(n_reviews)
    if cfg.n_reviews < 10:
        raise ValueError(f"n_reviews must be at least 10, got {cfg.n_reviews}")
    if train_steps is None and not train_seconds > 0:
        raise ValueError(f"train_seconds must be positive, got {train_seconds}")
    target = world_path(cache_dir)
    if not force and _is_complete(target):
        world = _load(target)
        if (world.info.get("seed"), world.info.get("corpus_size")) != (cfg.seed, cfg.n_reviews):
            warnings.warn(
                f"the cached tiny world at {target} was built with seed={world.info.get('seed')}, "
                f"n_reviews={world.info.get('corpus_size')}; using it (pass force=True to rebuild with "
                f"seed={cfg.seed}, n_reviews={cfg.n_reviews})")
        return world

    if not force and target.exists():
        warnings.warn(f"{target} exists but holds no complete tiny world; rebuilding it")
        force = True
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{WORLD_DIRNAME}.tmp-", dir=str(parent)))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the world is an ordinary directory
        _build_into(tmp, cfg, train_seconds, train_steps, progress)
        if force and target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{WORLD_DIRNAME}.old-", dir=str(parent)))
            try:
                os.replace(target, old / "w")
            except OSError:
                pass
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):  # not another builder's finished world: a real error
                raise
            # another builder finished first: use its result (ours is removed below)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _load(target)


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pama_ext.trainer.tiny_world",
        description="Build (once; then load from the cache) the embedded tiny world -- corpus, word-level "
                    "tokenizer and tiny GPT-2 -- and print sample generations for eval prompts.")
    ap.add_argument("--force", action="store_true", help="rebuild even if a cached world exists")
    ap.add_argument("--cache-dir", default=None,
                    help=f"parent directory of {WORLD_DIRNAME} (default: $PAMA_EXT_CACHE or ~/.cache/pama_ext)")
    ap.add_argument("--seconds", type=float, default=120.0, help="pretraining wall-time budget (default 120)")
    ap.add_argument("--steps", type=int, default=None, help="fixed number of pretraining steps (overrides --seconds)")
    ap.add_argument("--seed", type=int, default=0, help="seed of corpus, prompts and model (default 0)")
    ap.add_argument("--n-reviews", type=int, default=None, help="corpus size (default 40000)")
    ap.add_argument("--samples", type=int, default=5, help="number of sample generations to print")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    world = build_tiny_world(cache_dir=a.cache_dir, force=a.force, train_seconds=a.seconds, seed=a.seed,
                             progress=not a.quiet, n_reviews=a.n_reviews, train_steps=a.steps)
    print(world.describe())
    print(f"(ready in {time.perf_counter() - t0:.1f} s)")
    model, tok = world.load_model(), world.load_tokenizer()
    prompts = world.eval_prompts[:a.samples]
    print(f"\nsampled continuations of {len(prompts)} eval prompts (temperature 1.0):")
    for text in generate_text(model, tok, prompts, max_new_tokens=60, do_sample=True, seed=a.seed):
        print(f"  - {text}")
    print("\ngreedy continuations:")
    for text in generate_text(model, tok, prompts, max_new_tokens=60, do_sample=False):
        print(f"  - {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
