"""The pixel cache: built once (progress bar, free-space check), keyed on image settings and data, equal to the
uncached path, unreadable images reported, and no half-built cache ever used."""

from __future__ import annotations

import os
import pickle
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPProcessor

from gapclip.data import CAPTION_FEATURES, CaptionPairs, GapClipCollator
from gapclip.data import pixel_cache as pixel_cache_module
from gapclip.data.image_transform import ImageTransform
from gapclip.data.input_pipeline import configure_training_images
from gapclip.data.pixel_cache import PixelCache, build_pixel_cache, pixel_cache_bytes, pixel_cache_key

SIZE = 32


def transform_of(size: int = SIZE, **kwargs) -> ImageTransform:
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return ImageTransform.from_image_processor(processor, **kwargs)


def make_split(folder: Path, count: int = 6, bad: tuple[int, ...] = ()) -> Dataset:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i}.jpg"
        if i in bad:
            path.write_bytes(b"not an image")
        else:
            Image.effect_noise((80 + 8 * i, 60), 40 + i).convert("RGB").save(path, quality=90)
        paths.append(str(path))
    return Dataset.from_dict(
        {"image_id": [f"id{i}" for i in range(count)], "image": paths,
         "captions": [[f"caption {i} a", f"caption {i} b"] for i in range(count)]},
        features=CAPTION_FEATURES,
    )


def test_build_then_reuse_and_equal_to_decoding(tmp_path, capsys):
    split = make_split(tmp_path / "images")
    transform = transform_of()
    cache = build_pixel_cache(split, transform, tmp_path / "cache", num_threads=2)
    assert "Pixel cache (train)" in capsys.readouterr().err  # the progress bar
    assert cache.shape == (6, SIZE, SIZE, 3) and cache.nbytes == pixel_cache_bytes(6, transform) == 6 * SIZE * SIZE * 3
    assert not cache.bad
    pairs = CaptionPairs(split, image_transform=transform)
    for row in range(len(split)):
        assert np.array_equal(cache[row], pairs[row]["pixels"])
    # A second build opens the finished cache without decoding anything.
    folders = sorted(p.name for p in (tmp_path / "cache").iterdir())
    again = build_pixel_cache(split, transform, tmp_path / "cache", num_threads=2)
    assert again.folder == cache.folder and sorted(p.name for p in (tmp_path / "cache").iterdir()) == folders
    # Workers unpickle a cache without its memory map and map the file themselves.
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._array is None and np.array_equal(clone[3], cache[3])


def test_the_key_follows_image_settings_and_data(tmp_path):
    split = make_split(tmp_path / "images")
    key = pixel_cache_key(split, transform_of())
    assert pixel_cache_key(split, transform_of()) == key
    assert pixel_cache_key(split, transform_of(48)) != key
    assert pixel_cache_key(split, transform_of(reduced_decoding=True)) != key
    assert pixel_cache_key(split.select(range(5)), transform_of()) != key
    bicubic_to_bilinear = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                                resample=2)
    assert pixel_cache_key(split, ImageTransform.from_image_processor(bicubic_to_bilinear)) != key
    # only the normalisation differs: same pixels, same cache
    other_mean = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                       image_mean=[0.5, 0.5, 0.5])
    assert pixel_cache_key(split, ImageTransform.from_image_processor(other_mean)) == key
    # an image file replaced (other content, size and time) is other data
    path = tmp_path / "images" / "2.jpg"
    Image.new("RGB", (70, 70), (1, 2, 3)).save(path)
    os.utime(path, ns=(1, 1))
    assert pixel_cache_key(split, transform_of()) != key


def test_collated_batches_equal_the_uncached_path(tmp_path, tiny_demo_processor):
    split = make_split(tmp_path / "images")
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": SIZE},
                                                                   crop_size={"height": SIZE, "width": SIZE}),
                              tokenizer=tiny_demo_processor.tokenizer)
    collator = GapClipCollator(processor)
    cached_pairs, plain_pairs = CaptionPairs(split), CaptionPairs(split)
    cache = configure_training_images(cached_pairs, collator, pixel_cache=True, pixel_cache_dir=tmp_path / "c",
                                      show_progress=False)
    assert isinstance(cache, PixelCache) and cached_pairs.pixel_cache is cache
    cached = collator([cached_pairs[i] for i in range(6)])
    plain = collator([plain_pairs[i] for i in range(6)])  # PIL images through the transform
    assert torch.equal(cached["pixel_values"], plain["pixel_values"])
    reference = GapClipCollator(processor, image_transform=None)([plain_pairs[i] for i in range(6)])
    assert (cached["pixel_values"] - reference["pixel_values"]).abs().max().item() <= 1e-6
    assert torch.equal(cached["input_ids"], reference["input_ids"])


def test_unreadable_images_are_listed_then_skipped_or_refused(tmp_path, tiny_demo_processor):
    split = make_split(tmp_path / "images", count=8, bad=(2, 5))
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": SIZE},
                                                                   crop_size={"height": SIZE, "width": SIZE}),
                              tokenizer=tiny_demo_processor.tokenizer)
    collator = GapClipCollator(processor)
    options = {"pixel_cache": True, "pixel_cache_dir": tmp_path / "c", "show_progress": False}
    with pytest.raises(ValueError, match=r"--pixel_cache found 2 unreadable image\(s\):(.|\n)*2.jpg(.|\n)*5.jpg"):
        configure_training_images(CaptionPairs(split), collator, **options)
    with pytest.raises(ValueError, match="more than --max_bad_image_fraction=0.1"):
        configure_training_images(CaptionPairs(split, on_bad_image="skip"), collator, on_bad_image="skip",
                                  max_bad_image_fraction=0.1, **options)
    pairs = CaptionPairs(split, on_bad_image="skip", max_bad_image_fraction=0.5)
    configure_training_images(pairs, collator, on_bad_image="skip", max_bad_image_fraction=0.5, **options)
    served = [pairs[i]["image_id"] for i in range(len(pairs))]
    assert "id2" not in served and "id5" not in served and served[2] == "id3"


def test_too_little_disk_is_refused_with_the_sizes(tmp_path, monkeypatch):
    split = make_split(tmp_path / "images")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(pixel_cache_module.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 5 * 10**8))
    with pytest.raises(ValueError, match=r"needs 0.0 GB in .* \(6 images × 32×32×3 bytes\).* only 0.5 GB are free"):
        build_pixel_cache(split, transform_of(), tmp_path / "cache", show_progress=False)
    assert not list((tmp_path / "cache").iterdir())


def test_a_build_killed_midway_leaves_nothing_to_reuse(tmp_path, monkeypatch):
    split = make_split(tmp_path / "images")
    calls = {"n": 0}
    real = pixel_cache_module.decode_pixels

    def dying(value, transform, *, image_id, row):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(value, transform, image_id=image_id, row=row)

    monkeypatch.setattr(pixel_cache_module, "decode_pixels", dying)
    with pytest.raises(KeyboardInterrupt):
        build_pixel_cache(split, transform_of(), tmp_path / "cache", num_threads=1, show_progress=False)
    assert not list((tmp_path / "cache").iterdir())
    # an abandoned temporary folder of a dead process is cleaned up by the next build
    key = pixel_cache_key(split, transform_of())
    abandoned = tmp_path / "cache" / f"{key}.partial-999999999-abc"
    abandoned.mkdir()
    monkeypatch.setattr(pixel_cache_module, "decode_pixels", real)
    cache = build_pixel_cache(split, transform_of(), tmp_path / "cache", show_progress=False)
    assert not abandoned.exists() and cache.folder.name == key
    shutil.rmtree(cache.folder)


def test_a_cache_of_another_split_is_refused(tmp_path):
    split = make_split(tmp_path / "images")
    cache = build_pixel_cache(split.select(range(4)), transform_of(), tmp_path / "cache", show_progress=False)
    with pytest.raises(ValueError, match="holds 4 images but the split has 6 rows"):
        CaptionPairs(split, pixel_cache=cache)


def test_a_processor_without_a_fixed_size_cannot_be_cached(tmp_path):
    processor = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, do_center_crop=False)
    with pytest.raises(ValueError, match="stores one image size"):
        build_pixel_cache(make_split(tmp_path / "images"), ImageTransform.from_image_processor(processor),
                          tmp_path / "cache")
