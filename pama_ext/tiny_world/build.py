"""The tiny world on disk: :func:`build_tiny_world` builds corpus, tokenizer and pretrained model once
into ``<cache>/tiny_world-v1`` (a temporary directory renamed into place) and loads them from there
afterwards; :func:`main` is ``python -m pama_ext.tiny_world``."""
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
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..lm.hf import hf_quiet
from .corpus import LABELS, generate_labeled_reviews, generate_prompts, generate_reviews, prompt_from_review
from .pretrain import TinyWorldConfig, encode_corpus, generate_text, held_out_loss, make_model, pretrain_model
from .tokenizer import build_tokenizer

__all__ = ["VERSION", "WORLD_DIRNAME", "TinyWorld", "build_tiny_world", "build_into", "default_cache_dir",
           "world_path", "main"]

VERSION = 1
WORLD_DIRNAME = f"tiny_world-v{VERSION}"


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

        with hf_quiet():
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


def build_into(tmp: Path, cfg: TinyWorldConfig, seconds: float, steps: Optional[int],
               progress: bool) -> Dict[str, Any]:
    """Build a world into the directory ``tmp`` (corpus, tokenizer, pretrained model, prompts); returns
    ``world.json``'s facts (written last: a directory without it is not a world)."""
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
    seqs = encode_corpus(tokenizer, texts, cfg.n_positions)
    eval_seqs = encode_corpus(tokenizer, held_out, cfg.n_positions)
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
        stats = pretrain_model(model, seqs, tokenizer.pad_token_id, cfg, seconds, steps, progress,
                       threads=max(1, cfg.threads or n_cores), adaptive=cfg.threads is None)
        eval_loss = held_out_loss(model, eval_seqs, tokenizer.pad_token_id)
        model.eval()
        samples, greedy = [], [""]
        if cfg.n_build_samples > 0:
            samples = generate_text(model, tokenizer, eval_prompts[:cfg.n_build_samples],
                                    max_new_tokens=48, do_sample=True, seed=cfg.seed)
            greedy = generate_text(model, tokenizer, ["This movie"], max_new_tokens=48, do_sample=False)
    finally:
        torch.set_num_threads(prev_threads)

    with hf_quiet():
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
        build_into(tmp, cfg, train_seconds, train_steps, progress)
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
        prog="python -m pama_ext.tiny_world",
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
