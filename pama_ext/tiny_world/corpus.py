"""The tiny world's corpus: a seeded generator of short English movie-review-like texts (5-60 words)
from templates and vocabularies, with the intended sentiment of each (:data:`LABELS`), and the
sentiment-free review openings used as prompts.

Sentiment ranges from strongly positive to strongly negative, with neutral and mixed ("the acting was
great, but the plot was dull") reviews; the words that carry the sentiment are ones the VADER lexicon
scores, so the trainer's ``sentiment`` objective (VADER compound) sees them. Long reviews are more
often mixed or neutral than short ones, so the ``sentiment`` and ``length`` objectives pull in somewhat
different directions. Deterministic given a seed (every generator has its own :class:`random.Random`).
"""
from __future__ import annotations

import random
from typing import List, Optional, Sequence, Tuple

__all__ = ["LABELS", "MIN_WORDS", "MAX_WORDS", "OPINION_WORDS", "generate_reviews", "generate_labeled_reviews",
           "generate_prompts", "prompt_from_review"]

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
OPINION_WORDS = set()
for _lst in (POS_STRONG, POS_MILD, NEG_STRONG, NEG_MILD, NEUTRAL_ADJ, INTENS_STRONG, INTENS_MILD,
             FEELINGS_POS, FEELINGS_NEG, POS_NOUN_STRONG, NEG_NOUN_STRONG):
    for _w in _lst:
        OPINION_WORDS.update(_w.lower().split())
OPINION_WORDS.update({
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
        if w.lower().strip(",") in OPINION_WORDS or w[-1:] in ".!?":
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
