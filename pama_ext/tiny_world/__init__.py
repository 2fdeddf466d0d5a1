"""The embedded "tiny world": a self-contained, download-free default for the PAMA trainer.

It has three parts, all built from code in this package on first use and then cached:

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

Modules: :mod:`.corpus`, :mod:`.tokenizer`, :mod:`.pretrain`, :mod:`.build` (the cache and the command line).

Command line: ``python -m pama_ext.tiny_world [--force] [--cache-dir DIR] [--seconds S]``.
"""
from .build import VERSION, WORLD_DIRNAME, TinyWorld, build_tiny_world, default_cache_dir, main, world_path
from .corpus import LABELS, MAX_WORDS, MIN_WORDS, generate_labeled_reviews, generate_prompts, generate_reviews
from .pretrain import TinyWorldConfig, generate_text, make_model
from .tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, UNK, build_tokenizer

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
    "LABELS",
    "MIN_WORDS",
    "MAX_WORDS",
    "BOS",
    "EOS",
    "PAD",
    "UNK",
    "SPECIAL_TOKENS",
]
