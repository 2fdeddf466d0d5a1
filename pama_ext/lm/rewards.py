"""Objectives: a registry of reward functions ``fn(prompts, responses) -> tensor[B]``.

Built in (``--objectives``):

- ``sentiment``: the VADER lexicon model (``vaderSentiment``), compound score in [-1, 1] of the
  response text.
- ``length``: the PAMA paper's ``clip(len_chars(response) / L0, lo, hi)`` (``--length-l0``,
  ``--length-lo``, ``--length-hi``).
- ``conciseness``: ``1 - clip(len_chars(response) / L0, 0, 1)`` (the same ``--length-l0``): 1 for an empty
  response, 0 from L0 characters on. Against ``sentiment`` it is a real trade-off (sentiment needs words,
  conciseness wants none) whose optimum (an empty response) every policy can reach, so it cannot saturate at
  the ``--max-new-tokens`` cap the way ``length`` does.
- ``diversity``: distinct words (lower-cased runs of letters) of the response divided by
  :data:`DIVERSITY_WORDS` (16), clipped to [0, 1]: it wants longer, less repetitive responses, so it pulls
  against ``conciseness`` and against repeating one sentiment word (the third objective of the n = 3 setting).
- ``hf:<path>[#<label>[:logit|:prob]]``: an ``AutoModelForSequenceClassification`` checkpoint scoring
  ``prompt + " " + response``. The score is the raw **logit** of the label (default; as TRL's sentiment
  examples use it) or its softmax probability with ``:prob``. The label index defaults to 1 when the
  model has more than one label (the "positive" class of e.g. lvwerra/distilbert-imdb), else 0.
- ``py:<module>:<function>``: any importable callable ``fn(prompts, responses)`` returning B numbers
  (list, numpy array or tensor).

Every objective is wrapped by :class:`Objective`, which turns an exception, a wrong shape or a
non-finite value into a :class:`RewardError` naming the objective.
"""
from __future__ import annotations

import importlib
import re
from typing import Callable, List, Optional, Sequence

import torch

from .config import ConfigError, check_objective_spec

__all__ = ["RewardError", "Objective", "build_objectives", "score_all", "sentiment_reward", "LengthReward",
           "ConcisenessReward", "diversity_reward", "DIVERSITY_WORDS", "HFClassifierReward"]

RewardFn = Callable[[List[str], List[str]], object]


class RewardError(RuntimeError):
    """A reward function failed or returned something unusable; the message names the objective."""


class Objective:
    """A named reward function with output validation."""

    def __init__(self, name: str, fn: RewardFn):
        self.name = name
        self.fn = fn

    def __repr__(self) -> str:
        return f"Objective({self.name!r})"

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        B = len(responses)
        try:
            out = self.fn(list(prompts), list(responses))
        except Exception as e:  # noqa: BLE001 -- re-raised with the objective's name
            raise RewardError(f"objective {self.name!r}: the reward function raised "
                              f"{type(e).__name__}: {e}") from e
        try:
            if isinstance(out, torch.Tensor):
                t = out.detach().to(device="cpu", dtype=torch.float32)
            else:
                t = torch.as_tensor(out, dtype=torch.float32)
        except Exception as e:  # noqa: BLE001
            raise RewardError(f"objective {self.name!r}: expected {B} numbers (a list, array or tensor of "
                              f"shape [{B}]); got {type(out).__name__} ({e})") from e
        if tuple(t.shape) != (B,):
            raise RewardError(f"objective {self.name!r}: expected a reward of shape [{B}] (one per response); "
                              f"got shape {list(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            bad = [i for i, ok in enumerate(torch.isfinite(t).tolist()) if not ok]
            raise RewardError(f"objective {self.name!r}: non-finite reward for response(s) {bad[:8]}: "
                              f"{[t[i].item() for i in bad[:8]]}")
        return t


# -------------------------------------------------------------------------------------------------
# built-in rewards
# -------------------------------------------------------------------------------------------------
_VADER = None


def _vader():
    global _VADER
    if _VADER is None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as e:
            raise ConfigError("--objectives: 'sentiment' needs the vaderSentiment package "
                              "(pip install vaderSentiment)") from e
        _VADER = SentimentIntensityAnalyzer()
    return _VADER


def sentiment_reward(prompts: List[str], responses: List[str]) -> torch.Tensor:
    """VADER compound score of each response, in [-1, 1]."""
    a = _vader()
    return torch.tensor([a.polarity_scores(r)["compound"] for r in responses], dtype=torch.float32)


class LengthReward:
    """``clip(len(response) / L0, lo, hi)`` with the length in characters."""

    def __init__(self, l0: float, lo: float, hi: float):
        self.l0, self.lo, self.hi = float(l0), float(lo), float(hi)

    def __call__(self, prompts: List[str], responses: List[str]) -> torch.Tensor:
        x = torch.tensor([len(r) / self.l0 for r in responses], dtype=torch.float32)
        return x.clamp(self.lo, self.hi)


class ConcisenessReward:
    """``1 - clip(len(response) / L0, 0, 1)`` with the length in characters."""

    def __init__(self, l0: float):
        self.l0 = float(l0)

    def __call__(self, prompts: List[str], responses: List[str]) -> torch.Tensor:
        x = torch.tensor([len(r) / self.l0 for r in responses], dtype=torch.float32)
        return 1.0 - x.clamp(0.0, 1.0)


#: ``diversity``: this many distinct words score 1
DIVERSITY_WORDS = 16
_WORD = re.compile(r"[a-z]+")


def diversity_reward(prompts: List[str], responses: List[str]) -> torch.Tensor:
    """Distinct lower-cased words of each response / :data:`DIVERSITY_WORDS`, clipped to [0, 1]."""
    return torch.tensor([min(len(set(_WORD.findall(r.lower()))) / DIVERSITY_WORDS, 1.0) for r in responses],
                        dtype=torch.float32)


class HFClassifierReward:
    """Score ``prompt + " " + response`` with a sequence classifier: the label's logit or probability."""

    def __init__(self, path: str, label: Optional[int] = None, kind: str = "logit", device: str = "cpu",
                 batch_size: int = 64, max_length: int = 512):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        n_labels = int(self.model.config.num_labels)
        self.label = (1 if n_labels > 1 else 0) if label is None else int(label)
        if not -n_labels <= self.label < n_labels:
            raise ConfigError(f"--objectives: hf:{path}: label index {self.label} out of range for a model with "
                              f"{n_labels} labels")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.kind, self.device, self.batch_size, self.max_length = kind, device, batch_size, max_length

    @torch.no_grad()
    def __call__(self, prompts: List[str], responses: List[str]) -> torch.Tensor:
        texts = [f"{p} {r}".strip() for p, r in zip(prompts, responses)]
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length).to(self.device)
            logits = self.model(**enc).logits.float()
            if self.kind == "prob":
                logits = logits.softmax(-1)
            out.append(logits[:, self.label].cpu())
        return torch.cat(out) if out else torch.zeros(0)


def _resolve(spec: str, cfg, device: str) -> RewardFn:
    check_objective_spec(spec)
    if spec == "sentiment":
        _vader()  # fail early when the package is missing
        return sentiment_reward
    if spec == "length":
        return LengthReward(cfg.length_l0, cfg.length_lo, cfg.length_hi)
    if spec == "conciseness":
        return ConcisenessReward(cfg.length_l0)
    if spec == "diversity":
        return diversity_reward
    if spec.startswith("hf:"):
        path, _, label = spec[3:].partition("#")
        idx, _, kind = label.partition(":")
        try:
            return HFClassifierReward(path, int(idx) if idx else None, kind or "logit", device=device)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"--objectives: cannot load the reward model of {spec!r}: "
                              f"{type(e).__name__}: {e}") from e
    module, fname = spec[3:].split(":")
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"--objectives: {spec!r}: cannot import module {module!r}: {type(e).__name__}: {e}") from e
    fn = getattr(mod, fname, None)
    if fn is None or not callable(fn):
        raise ConfigError(f"--objectives: {spec!r}: module {module!r} has no callable {fname!r}")
    return fn


def build_objectives(cfg, device: str = "cpu") -> List[Objective]:
    """The objectives of a config (a TrainConfig or DPOConfig: ``objectives``, ``length_l0`` / ``_lo`` / ``_hi``),
    resolved and wrapped (raises ConfigError naming a bad one)."""
    return [Objective(spec, _resolve(spec, cfg, device)) for spec in cfg.objectives]


def score_all(objectives: Sequence[Objective], prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
    """``[n, B]`` float32 scores (on the CPU)."""
    return torch.stack([o(prompts, responses) for o in objectives])


def short_name(spec: str) -> str:
    """A compact label for tables and plots."""
    if spec.startswith("hf:"):
        path = spec[3:].split("#")[0].rstrip("/")
        return "hf:" + path.split("/")[-1]
    if spec.startswith("py:"):
        return spec.split(":")[-1]
    return spec

