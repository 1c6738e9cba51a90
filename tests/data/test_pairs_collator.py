from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch
from datasets import Dataset
from PIL import Image as PILImage

from gapclip.data import (
    CAPTION_FEATURES,
    CaptionPairs,
    GapClipCollator,
    ImageCollator,
    IterableCaptionPairs,
    TextCollator,
    load_demo,
)
from gapclip.data.pairs import choose_caption_index
from gapclip.losses import TermInput
from gapclip.losses.lgmgc import GSTLoss

#: What a model with GST declares: the 'translation' column, tokenised.
TRANSLATION_INPUTS = GSTLoss.inputs


@pytest.fixture(scope="module")
def demo(demo_root):
    return load_demo(demo_root)


def _tiny_split(tmp_path, make_image, n=20, *, captions_per_image=2, modes=None, corrupt=()):
    """n images (row i has `captions_per_image` captions); rows in `corrupt` hold bytes that are no image."""
    paths = []
    for i in range(n):
        path = tmp_path / f"{i}.png"
        if i in corrupt:
            path.write_bytes(b"definitely not a png")
        else:
            make_image(path, mode=(modes or {}).get(i, "RGB"), size=16)
        paths.append(str(path))
    return Dataset.from_dict(
        {
            "image_id": [f"id{i}" for i in range(n)],
            "image": paths,
            "captions": [[f"cap {i} {k}" for k in range(captions_per_image)] for i in range(n)],
        },
        features=CAPTION_FEATURES,
    )


# ---------------------------------------------------------------------------------------------------------------------
# CaptionPairs
# ---------------------------------------------------------------------------------------------------------------------
def test_one_per_image_covers_each_image_once_per_epoch(demo):
    pairs = CaptionPairs(demo["validation"], seed=0)
    assert len(pairs) == 10
    chosen = []
    for epoch in range(5):
        pairs.set_epoch(epoch)
        items = [pairs[i] for i in range(len(pairs))]
        assert [it["image_index"] for it in items] == list(range(10))
        assert [it["image_id"] for it in items] == demo["validation"]["image_id"]
        for it, caps in zip(items, demo["validation"]["captions"]):
            assert it["caption"] in caps
            assert isinstance(it["image"], PILImage.Image) and it["image"].mode == "RGB"
            assert it["translation"] is not None
        chosen.append([it["caption"] for it in items])
    # Every epoch differs, and with 5 captions each image shows all of them over 5 epochs.
    assert all(chosen[e] != chosen[e + 1] for e in range(4))
    for row, caps in enumerate(demo["validation"]["captions"]):
        assert sorted(chosen[e][row] for e in range(5)) == sorted(caps)
    # Reproducible: a fresh instance (e.g. a resumed run) sees the same captions.
    again = CaptionPairs(demo["validation"], seed=0)
    again.set_epoch(3)
    assert [again[i]["caption"] for i in range(10)] == chosen[3]
    other_seed = CaptionPairs(demo["validation"], seed=1)
    assert [other_seed[i]["caption"] for i in range(10)] != chosen[0]


def test_choose_caption_index_rule():
    assert [choose_caption_index(1, seed=0, epoch=e, row=3) for e in range(3)] == [0, 0, 0]
    assert sorted(choose_caption_index(4, seed=7, epoch=e, row=2) for e in range(4, 8)) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="row 5"):
        choose_caption_index(0, seed=0, epoch=0, row=5)


def test_all_pairs_length_and_content(demo):
    split = demo["test"]
    pairs = CaptionPairs(split, mode="all_pairs")
    total = sum(len(c) for c in split["captions"])
    assert len(pairs) == total == pairs.num_captions
    seen = [(pairs[i]["image_id"], pairs[i]["caption"]) for i in range(len(pairs))]
    assert seen == [(i, c) for i, caps in zip(split["image_id"], split["captions"]) for c in caps]
    assert pairs[-1]["image_index"] == len(split) - 1


def test_bad_options(demo):
    with pytest.raises(ValueError, match=r"mode='pairs'.*one_per_image"):
        CaptionPairs(demo["test"], mode="pairs")
    with pytest.raises(ValueError, match=r"on_bad_image='ignore'.*skip"):
        CaptionPairs(demo["test"], on_bad_image="ignore")
    with pytest.raises(TypeError, match="IterableCaptionPairs"):
        CaptionPairs(demo["test"].to_iterable_dataset())
    with pytest.raises(ValueError, match=r"missing \['captions'\]"):
        CaptionPairs(demo["test"].remove_columns("captions"))


def test_corrupt_image_raises_on_fetch_with_id_and_path(tmp_path, make_image):
    split = _tiny_split(tmp_path, make_image, n=4, corrupt={2})
    pairs = CaptionPairs(split)  # construction never decodes
    assert pairs[1]["image_id"] == "id1"
    with pytest.raises(ValueError) as info:
        pairs[2]
    assert "id2" in str(info.value) and str(tmp_path / "2.png") in str(info.value)


def test_skip_mode_replaces_counts_and_raises_past_fraction(tmp_path, make_image, caplog):
    split = _tiny_split(tmp_path, make_image, n=20, corrupt={3, 7, 11})
    pairs = CaptionPairs(split, on_bad_image="skip", max_bad_image_fraction=0.1)
    with caplog.at_level(logging.WARNING, logger="gapclip.data.pairs"):
        assert pairs[3]["image_id"] == "id4"  # replaced by the next readable image
    assert pairs.num_skipped == 1 and list(pairs.bad_rows) == [3]
    assert "id3" in caplog.text and "1 bad so far" in caplog.text
    assert pairs[7]["image_id"] == "id8"  # 2 of 20 = 0.1: still allowed
    with pytest.raises(ValueError) as info:
        pairs[11]  # 3 of 20 > 0.1
    assert "3 of 20 images are unreadable" in str(info.value) and "id11" in str(info.value)


def test_skip_mode_all_pairs_skips_every_pair_of_a_bad_image(tmp_path, make_image):
    split = _tiny_split(tmp_path, make_image, n=10, captions_per_image=3, corrupt={0})
    pairs = CaptionPairs(split, mode="all_pairs", on_bad_image="skip", max_bad_image_fraction=0.5)
    ids = [pairs[i]["image_id"] for i in range(len(pairs))]
    assert "id0" not in ids and Counter(ids)["id1"] == 6  # the 3 pairs of id0 fall through to id1


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "1"])
def test_non_rgb_images_are_converted(tmp_path, make_image, mode):
    split = _tiny_split(tmp_path, make_image, n=2, modes={0: mode})
    assert PILImage.open(tmp_path / "0.png").mode == mode
    item = CaptionPairs(split)[0]
    assert item["image"].mode == "RGB" and item["image"].size == (16, 16)


@pytest.mark.parametrize("mode", ["one_per_image", "all_pairs"])
def test_streaming_yields_the_same_items(demo_root, mode):
    eager = load_demo(demo_root, splits=["validation"])["validation"]
    stream = load_demo(demo_root, splits=["validation"], streaming=True)["validation"]
    pairs = CaptionPairs(eager, mode=mode, seed=4)
    it_pairs = IterableCaptionPairs(stream, mode=mode, seed=4)
    for epoch in (0, 1):
        pairs.set_epoch(epoch)
        it_pairs.set_epoch(epoch)
        expected = [pairs[i] for i in range(len(pairs))]
        got = list(it_pairs)
        keys = ("caption", "image_index", "image_id", "translation")
        assert [{k: x[k] for k in keys} for x in got] == [{k: x[k] for k in keys} for x in expected]
        assert got[0]["image"].tobytes() == expected[0]["image"].tobytes()


def test_streaming_skip_and_raise(tmp_path, make_image):
    split = _tiny_split(tmp_path, make_image, n=20, corrupt={5})
    items = list(IterableCaptionPairs(split.to_iterable_dataset(), on_bad_image="skip", max_bad_image_fraction=0.1))
    assert [x["image_id"] for x in items] == [f"id{i}" for i in range(20) if i != 5]
    with pytest.raises(ValueError, match=r"id5.*5\.png"):
        list(IterableCaptionPairs(split.to_iterable_dataset()))
    bad = _tiny_split(tmp_path / "b", make_image, n=10, corrupt={1, 2, 3})
    with pytest.raises(ValueError, match=r"3 of 10 streamed images were unreadable"):
        list(IterableCaptionPairs(bad.to_iterable_dataset(), on_bad_image="skip", max_bad_image_fraction=0.1))


# ---------------------------------------------------------------------------------------------------------------------
# Collators
# ---------------------------------------------------------------------------------------------------------------------
def test_collator_shapes_and_translations(demo, demo_processor):
    pairs = CaptionPairs(demo["train"])
    items = [pairs[i] for i in range(4)]
    items[1] = {**items[1], "translation": None}
    batch = GapClipCollator(demo_processor, term_inputs=TRANSLATION_INPUTS)(items)
    assert batch["return_loss"] is True
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == 4
    assert batch["image_index"].dtype == torch.long and batch["image_index"].tolist() == [0, 1, 2, 3]
    translation = batch["term_inputs"]["translation"]
    assert translation["input_ids"].shape[0] == 4
    assert translation["attention_mask"].shape == translation["input_ids"].shape
    assert translation["present"].tolist() == [True, False, True, True]
    assert "word_mask" not in translation  # only the captions' word mask matters (local features)
    # a collator built without declared inputs passes none on
    assert "term_inputs" not in GapClipCollator(demo_processor)(items)
    decoded = demo_processor.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True)
    assert decoded == items[0]["caption"].replace(",", " ,").replace(":", " :").replace("  ", " ")


def test_collator_without_translations_and_batch_of_one(tmp_path, make_image, demo_processor):
    pairs = CaptionPairs(_tiny_split(tmp_path, make_image, n=2))
    batch = GapClipCollator(demo_processor, term_inputs=TRANSLATION_INPUTS)([pairs[0]])
    assert batch["input_ids"].shape[0] == 1 and batch["pixel_values"].shape == (1, 3, 32, 32)
    assert "term_inputs" not in batch  # no item has a translation: left out (the model names who needs it)


def test_collator_truncates_and_warns_once(demo, demo_processor, caplog):
    pairs = CaptionPairs(demo["train"])
    items = [{**pairs[i], "caption": "a small red circle in the top left and a large blue square"} for i in range(3)]
    collate = GapClipCollator(demo_processor, max_length=7)
    with caplog.at_level(logging.WARNING, logger="gapclip.data.collator"):
        first = collate(items)
        collate(items)
    assert first["input_ids"].shape == (3, 7)
    assert first["input_ids"][0, -1].item() == demo_processor.tokenizer.eos_token_id
    warnings = [r for r in caplog.records if "max_length=7" in r.getMessage()]
    assert len(warnings) == 1


def test_collator_max_length_padding(demo, demo_processor):
    pairs = CaptionPairs(demo["train"])
    batch = GapClipCollator(demo_processor, padding="max_length", term_inputs=TRANSLATION_INPUTS)([pairs[0], pairs[1]])
    assert batch["input_ids"].shape == (2, 32)  # model_max_length of the demo tokenizer
    assert batch["term_inputs"]["translation"]["input_ids"].shape == (2, 32)


def test_collator_bad_inputs(demo_processor):
    with pytest.raises(ValueError, match=r"padding='widest'"):
        GapClipCollator(demo_processor, padding="widest")
    with pytest.raises(TypeError, match="image_processor"):
        GapClipCollator(demo_processor.tokenizer)
    with pytest.raises(ValueError, match=r"\[1\].*'caption'"):
        GapClipCollator(demo_processor)(
            [
                {"image": PILImage.new("RGB", (8, 8)), "caption": "a", "image_index": 0},
                {"image": None, "image_index": 1},
            ]
        )


def test_image_and_text_collators(demo_processor):
    images = [PILImage.new("L", (40, 50)), PILImage.new("RGBA", (32, 32))]
    assert ImageCollator(demo_processor)(images)["pixel_values"].shape == (2, 3, 32, 32)
    text = TextCollator(demo_processor)(["a red circle", "two shapes on a grey background: a blue star"])
    assert set(text) == {"input_ids", "attention_mask", "word_mask"} and text["input_ids"].shape[0] == 2
    assert text["attention_mask"][0].sum().item() == 5
    with pytest.raises(TypeError, match=r"texts \[1\]"):
        TextCollator(demo_processor)(["a", 3])


def test_dataloader_end_to_end(demo, demo_processor):
    pairs = CaptionPairs(demo["train"], mode="all_pairs")
    collate = GapClipCollator(demo_processor, term_inputs=TRANSLATION_INPUTS)
    loader = torch.utils.data.DataLoader(pairs, batch_size=8, shuffle=True, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (8, 3, 32, 32)
    # every row has a translation: no `present` mask, so a term need not read one on the host each step
    assert set(batch["term_inputs"]["translation"]) == {"input_ids", "attention_mask"}


# ---------------------------------------------------------------------------------------------------------------------
# Term inputs: further columns pass through the pairs, the collator collates what the terms declare
# ---------------------------------------------------------------------------------------------------------------------
def _with_columns(tmp_path, make_image, **columns):
    split = _tiny_split(tmp_path, make_image, n=4, captions_per_image=2)
    for name, values in columns.items():
        split = split.add_column(name, values)
    return split


def test_further_columns_reach_the_items(tmp_path, make_image):
    split = _with_columns(tmp_path, make_image, label=[3, 1, 4, 1], score=[[0.5, 0.25]] * 4)
    items = [CaptionPairs(split, mode="all_pairs")[i] for i in range(8)]
    assert [item["label"] for item in items] == [3, 3, 1, 1, 4, 4, 1, 1]
    assert items[0]["score"] == [0.5, 0.25] and "translation" not in items[0]
    streamed = list(IterableCaptionPairs(split.to_iterable_dataset(), mode="all_pairs"))
    assert [item["label"] for item in streamed] == [item["label"] for item in items]
    clash = _with_columns(tmp_path / "clash", make_image, caption_index=[0, 0, 0, 0])
    with pytest.raises(ValueError, match="column 'caption_index' clashes with the item key"):
        CaptionPairs(clash)[0]


def test_collator_stacks_declared_tensor_inputs(tmp_path, make_image, demo_processor):
    split = _with_columns(
        tmp_path, make_image, label=[3, 1, 4, 1], weights=[[0.1, 0.9], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6]],
        quality=[[1.0, 0.5], [0.0, 0.25], [0.75, 1.0], [0.5, 0.5]],
    )
    pairs = CaptionPairs(split, mode="all_pairs")
    items = [pairs[i] for i in (0, 1, 2, 5)]
    declared = (
        TermInput("label", dtype=torch.long),
        TermInput("weights"),
        TermInput("quality", per_caption=True),  # one value per caption: each row takes its own caption's
        TermInput("absent"),  # no item has it: left out
    )
    inputs = GapClipCollator(demo_processor, term_inputs=declared)(items)["term_inputs"]
    assert set(inputs) == {"label", "weights", "quality"}
    assert inputs["label"].dtype == torch.long and inputs["label"].tolist() == [3, 3, 1, 4]
    assert inputs["weights"].dtype == torch.float32 and inputs["weights"].shape == (4, 2)
    # rows: (image 0, caption 0), (image 0, caption 1), (image 1, caption 0), (image 2, caption 1)
    assert inputs["quality"].tolist() == [1.0, 0.5, 0.0, 1.0]


def test_collator_term_input_errors_name_the_input_and_rows(tmp_path, make_image, demo_processor):
    split = _with_columns(tmp_path, make_image, label=[3, None, 4, 1])
    pairs = CaptionPairs(split)
    items = [pairs[i] for i in range(4)]
    with pytest.raises(ValueError, match=r"input 'label' .* has no value in batch rows \[1\] \(image ids \['id1'\]\)"):
        GapClipCollator(demo_processor, term_inputs=(TermInput("label", dtype=torch.long),))(items)
    ragged = [{**item, "vector": [1.0] * (1 + row)} for row, item in enumerate(items)]
    with pytest.raises(ValueError, match="input 'vector' could not be stacked"):
        GapClipCollator(demo_processor, term_inputs=(TermInput("vector"),))(ragged)
    with pytest.raises(TypeError, match=r"text input 'note' of batch rows \[2\] is not a string"):
        GapClipCollator(demo_processor, term_inputs=(TermInput("note", collate="text"),))(
            [{**item, "note": 3 if row == 2 else "x"} for row, item in enumerate(items)]
        )
    per_caption = [{**item, "quality": [0.5]} for item in items]  # one value but caption_index may be 1
    per_caption[0]["caption_index"] = 1
    with pytest.raises(ValueError, match=r"'quality' holds one value per caption, but batch row 0 .*caption_index=1"):
        GapClipCollator(demo_processor, term_inputs=(TermInput("quality", per_caption=True),))(per_caption)


def test_collator_input_providers_and_callable_collate(tmp_path, make_image, demo_processor):
    pairs = CaptionPairs(_tiny_split(tmp_path, make_image, n=3))
    items = [pairs[i] for i in range(3)]
    calls = []

    def provider(batch_items):  # e.g. a TeacherStore: looks the rows up by image id and caption index
        calls.append([(item["image_id"], item["caption_index"]) for item in batch_items])
        return {"row_ids": torch.arange(len(batch_items))}

    def lengths(values, collator):  # a custom rule: caption lengths in tokens, through the collator's tokenizer
        return collator.encode_texts(values)["attention_mask"].sum(dim=1)

    declared = (TermInput("row_ids"), TermInput("caption", collate=lengths))
    inputs = GapClipCollator(demo_processor, term_inputs=declared, input_providers=[provider])(items)["term_inputs"]
    assert calls == [[(item["image_id"], item["caption_index"]) for item in items]]
    assert inputs["row_ids"].tolist() == [0, 1, 2]  # the provider's value is used as it is
    tokenizer = demo_processor.tokenizer
    assert inputs["caption"].tolist() == [len(tokenizer(item["caption"])["input_ids"]) for item in items]
