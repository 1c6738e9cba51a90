"""Word-level tokenizers and processors for dual encoders trained from scratch.

A model trained from scratch has no tokenizer of its own. gapclip gives it a word-level vocabulary: the words of
the training captions (``caption_vocabulary``), lower-cased and split like BERT's basic pre-tokenizer (runs of
letters/digits, and each run of punctuation, are words). Words not in the vocabulary become ``[UNK]``. The same
builder makes the demo data's tokenizer (its vocabulary is every word its templates can write), so the demo and any
other dataset trained from scratch go through one code path.

Special tokens: ``[PAD]`` = 0, ``[UNK]`` = 1, ``[SOS]`` = 2 and ``[EOS]`` = the highest id, so CLIP's legacy
argmax-EOS pooling also finds the end of a caption; every text is wrapped as ``[SOS] words [EOS]``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

__all__ = ["caption_vocabulary", "word_level_processor", "word_level_tokenizer"]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[SOS]", "[EOS]")


def _pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Whitespace()


def caption_vocabulary(captions: Iterable[str], *, min_count: int = 1) -> list[str]:
    """Sorted words (lower-cased, split as the tokenizer splits) that occur at least ``min_count`` times."""
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}.")
    split = _pre_tokenizer().pre_tokenize_str
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(word for word, _ in split(caption.lower()))
    return sorted(word for word, count in counts.items() if count >= min_count and word not in SPECIAL_TOKENS)


def word_level_tokenizer(words: Iterable[str], *, max_length: int = 32) -> Any:
    """A `PreTrainedTokenizerFast` over ``words`` (see the module docstring for ids and the template)."""
    from tokenizers import Tokenizer, normalizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    if max_length < 3:
        raise ValueError(f"max_length must be >= 3 ([SOS] word [EOS]), got {max_length}.")
    vocab = {"[PAD]": 0, "[UNK]": 1, "[SOS]": 2}
    for word in sorted(set(words) - set(SPECIAL_TOKENS)):
        vocab[word] = len(vocab)
    vocab["[EOS]"] = len(vocab)
    tokenizer = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[SOS] $A [EOS]",
        pair="[SOS] $A [EOS] $B [EOS]",
        special_tokens=[("[SOS]", vocab["[SOS]"]), ("[EOS]", vocab["[EOS]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[SOS]",
        eos_token="[EOS]",
        model_max_length=max_length,
        model_input_names=["input_ids", "attention_mask"],
    )


def word_level_processor(words: Iterable[str], image_size: int, *, max_length: int = 32) -> Any:
    """A `CLIPProcessor`: :func:`word_level_tokenizer` + a `CLIPImageProcessor` resizing/cropping to ``image_size``."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=word_level_tokenizer(words, max_length=max_length))
