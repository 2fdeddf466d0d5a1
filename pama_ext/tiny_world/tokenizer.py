"""The tiny world's tokenizer: a word-level ``tokenizers`` model (whitespace + punctuation
pre-tokenizer, cased) wrapped as a ``transformers.PreTrainedTokenizerFast`` with
``<bos>``/``<eos>``/``<pad>``/``<unk>``. Encoding adds ``<bos>`` in front; padding is on the left (what
batched generation with a decoder-only model needs). Decoding re-attaches punctuation, so
``decode(encode(review)) == review`` for every generated review."""
from __future__ import annotations

from typing import Sequence

__all__ = ["BOS", "EOS", "PAD", "UNK", "SPECIAL_TOKENS", "build_tokenizer"]

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0..3, in this order


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
