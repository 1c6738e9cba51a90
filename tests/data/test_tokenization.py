"""Word-level tokenizers for models trained from scratch: vocabulary from captions, ids, template, round trips."""

from __future__ import annotations

import pytest

from gapclip.data.demo import demo_vocabulary, make_demo_processor
from gapclip.data.tokenization import caption_vocabulary, word_level_processor, word_level_tokenizer


def test_caption_vocabulary_lowercases_splits_punctuation_and_counts():
    captions = ["A red circle, and a Blue star.", "a red square", "two shapes: red"]
    assert caption_vocabulary(captions) == sorted(
        [",", ".", ":", "a", "and", "blue", "circle", "red", "shapes", "square", "star", "two"]
    )
    assert caption_vocabulary(captions, min_count=2) == ["a", "red"]  # "a" ×3, "red" ×3
    with pytest.raises(ValueError, match="min_count must be >= 1"):
        caption_vocabulary(captions, min_count=0)


def test_word_level_tokenizer_ids_template_and_unknown_words():
    tokenizer = word_level_tokenizer(["red", "circle", "a"], max_length=6)
    vocab = tokenizer.get_vocab()
    assert [vocab[t] for t in ("[PAD]", "[UNK]", "[SOS]")] == [0, 1, 2]
    assert vocab["[EOS]"] == max(vocab.values()) == 6  # [EOS] last: CLIP's argmax-EOS pooling finds it
    assert [vocab[w] for w in ("a", "circle", "red")] == [3, 4, 5]  # sorted words
    ids = tokenizer("A red HEXAGON")["input_ids"]
    assert ids == [2, 3, 5, 1, 6]
    batch = tokenizer(["a", "a red circle red red red"], padding="longest", truncation=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 6) and batch["input_ids"][0, -1].item() == 0
    assert batch["input_ids"][1, -1].item() == 6  # truncated, [EOS] kept


def test_demo_processor_is_the_word_level_processor_over_the_demo_vocabulary(tiny_demo_root):
    demo = make_demo_processor(tiny_demo_root)
    rebuilt = word_level_processor(demo_vocabulary(), 32, max_length=32)
    assert demo.tokenizer.get_vocab() == rebuilt.tokenizer.get_vocab()
    assert demo.tokenizer.model_max_length == rebuilt.tokenizer.model_max_length == 32
    assert rebuilt.image_processor.crop_size == {"height": 32, "width": 32}
