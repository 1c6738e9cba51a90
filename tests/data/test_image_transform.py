"""gapclip's image path against the processor it reproduces, on real photos and COCO-size JPEGs.

The real photos are the JPEGs that scikit-learn (a dependency) and matplotlib (a test dependency) ship: two 640×427
photos and a 512×600 portrait. The COCO-size ones are 640×480 / 480×640 files made by ``gapclip.testing``.
Tolerances: uint8 pixels identical; float32 ``pixel_values`` within 1e-6 (the processor computes
``(x · scale − mean) / std``, gapclip ``x · (scale / std) − mean / std``: float rounding only).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPProcessor, SiglipImageProcessorPil
from transformers.utils import logging as hf_logging

from gapclip.data import GapClipCollator, ImageCollator
from gapclip.data.image_transform import ImageTransform, UnsupportedImageProcessor, fast_image_transform, open_image
from gapclip.data.pairs import decode_image, decode_pixels
from gapclip.testing import coco_like_jpeg

#: float32 pixel_values: the largest difference to the processor's own.
TOLERANCE = 1e-6


def real_photos() -> list[Path]:
    import matplotlib
    import sklearn

    sklearn_images = Path(sklearn.__file__).parent / "datasets" / "images"
    photos = [sklearn_images / "china.jpg", sklearn_images / "flower.jpg",
              Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]
    return [photo for photo in photos if photo.is_file()]


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("coco_like")
    made = [folder / f"{i}.jpg" for i in range(3)]
    for i, path in enumerate(made):
        coco_like_jpeg(path, i, (640, 480) if i % 2 == 0 else (480, 640))
    photos = real_photos()
    assert len(photos) >= 2, "scikit-learn's sample JPEGs are missing"
    return [*photos, *made]


PROCESSORS = {
    "clip 224 (shortest edge, bicubic, crop)": lambda: CLIPImageProcessorPil(),
    "siglip 224 (exact, bicubic, 0.5/0.5)": lambda: SiglipImageProcessorPil(),
    "vit-like 96 (exact, bilinear)": lambda: SiglipImageProcessorPil(size={"height": 96, "width": 80}, resample=2),
    "crop larger than the resize (zero padding)": lambda: CLIPImageProcessorPil(
        size={"shortest_edge": 200}, crop_size={"height": 240, "width": 180}),
    "no normalisation": lambda: CLIPImageProcessorPil(do_normalize=False),
}


def rgb(paths: list[Path]) -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in paths]


@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_same_pixels_and_pixel_values_as_the_processor(name, jpegs):
    processor = PROCESSORS[name]()
    transform = ImageTransform.from_image_processor(processor)
    images = rgb(jpegs)
    reference = processor(images=images, return_tensors="pt")["pixel_values"]
    ours = transform(images)
    assert ours.dtype == torch.float32 and ours.shape == reference.shape and ours.is_contiguous()
    assert (ours - reference).abs().max().item() <= TOLERANCE
    # Before rescaling, the pixels are the processor's exactly.
    raw_reference = processor(images=images, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
    stacked = transform.stack([transform.pixels(image) for image in images])
    assert torch.equal(stacked.permute(0, 3, 1, 2).float(), raw_reference)


def clip_processor(tokenizer_of) -> CLIPProcessor:
    return CLIPProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=tokenizer_of.tokenizer)


def test_the_collators_use_the_path_and_match_the_processor(jpegs, tiny_demo_processor):
    processor = clip_processor(tiny_demo_processor)
    images = rgb(jpegs)
    items = [{"image": image, "caption": "a photo", "image_index": i} for i, image in enumerate(images)]
    fast, reference = GapClipCollator(processor), GapClipCollator(processor, image_transform=None)
    assert fast.image_transform is not None and reference.image_transform is None
    diff = (fast(items)["pixel_values"] - reference(items)["pixel_values"]).abs().max().item()
    assert diff <= TOLERANCE
    assert (ImageCollator(processor)(images)["pixel_values"] - reference(items)["pixel_values"]).abs().max() <= TOLERANCE


def test_items_with_pixels_are_stacked_and_normalised(jpegs, tiny_demo_processor):
    processor = clip_processor(tiny_demo_processor)
    collator = GapClipCollator(processor)
    transform = collator.image_transform
    pixels = [decode_pixels(str(path), transform, image_id=str(i), row=i) for i, path in enumerate(jpegs)]
    with_pixels = [{"pixels": p, "caption": "a photo", "image_index": i} for i, p in enumerate(pixels)]
    with_images = [{"image": image, "caption": "a photo", "image_index": i} for i, image in enumerate(rgb(jpegs))]
    assert torch.equal(collator(with_pixels)["pixel_values"], collator(with_images)["pixel_values"])
    # the reference collator normalises pixels the same way
    assert torch.equal(GapClipCollator(processor, image_transform=None)(with_pixels)["pixel_values"],
                       collator(with_pixels)["pixel_values"])
    with pytest.raises(ValueError, match="use one kind"):
        collator([with_pixels[0], with_images[1]])


def test_reduced_decoding_difference_is_bounded(jpegs):
    """JPEGs decoded at 1/2 scale (640×480 → 320×240 for 224 px) then resized from the full image's box: close to the
    full decode, not equal. A file too small to reduce (640×427: 427 < 2 × 224) decodes in full, identically."""
    processor = CLIPImageProcessorPil()
    full = ImageTransform.from_image_processor(processor)
    reduced = ImageTransform.from_image_processor(processor, reduced_decoding=True)
    assert reduced.draft_size == (224, 224) and full.draft_size is None
    for path in jpegs:
        image, _ = open_image(str(path))
        width, height = image.size
        a = full.normalize(full.stack([full.load(open_image(str(path))[0])]))
        b = reduced.normalize(reduced.stack([reduced.load(open_image(str(path))[0])]))
        assert a.shape == b.shape == (1, 3, 224, 224)
        if min(width, height) < 2 * 224:
            assert torch.equal(a, b), path.name
        else:
            difference = (a - b).abs()
            # Measured: mean 0.024 (grace_hopper) to 0.051 (noisy synthetic), max 0.71 at a sharp edge.
            assert 0 < difference.mean().item() < 0.08, path.name
            assert difference.max().item() < 1.0, path.name


def test_non_rgb_and_small_images_decode_like_the_processor(tmp_path):
    processor = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    transform = ImageTransform.from_image_processor(processor)
    grey, rgba, small = tmp_path / "grey.png", tmp_path / "rgba.png", tmp_path / "small.jpg"
    Image.linear_gradient("L").save(grey)
    Image.new("RGBA", (80, 100), (200, 10, 10, 90)).save(rgba)
    Image.new("RGB", (30, 20), (10, 200, 30)).save(small)
    for path in (grey, rgba, small):
        pixels = decode_pixels(str(path), transform, image_id="x", row=0)
        expected = transform.pixels(decode_image(str(path), image_id="x", row=0))
        assert pixels.shape == (64, 64, 3) and np.array_equal(pixels, expected)


def test_unreadable_file_names_the_image(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    transform = ImageTransform.from_image_processor(CLIPImageProcessorPil())
    with pytest.raises(ValueError, match=r"image_id='id7' \(row 7, path='.*bad.jpg'\)"):
        decode_pixels(str(bad), transform, image_id="id7", row=7)


def test_unsupported_processors_fall_back_to_the_processor_with_one_warning(caplog):
    class Patched(CLIPImageProcessorPil):
        def _preprocess(self, images, **kwargs):
            return super()._preprocess(images, **kwargs)

    cases = {
        "pads": CLIPImageProcessorPil(do_pad=True, pad_size={"height": 240, "width": 240}),
        "_preprocess": Patched(),
        "longest_edge": CLIPImageProcessorPil(size={"shortest_edge": 224, "longest_edge": 300}),
    }
    for expected, processor in cases.items():
        with pytest.raises(UnsupportedImageProcessor, match=expected):
            ImageTransform.from_image_processor(processor)
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            assert fast_image_transform(cases["pads"]) is None
    finally:
        hf_logging.disable_propagation()
    assert "fast image path does not apply" in caplog.text and "do_pad=True" in caplog.text


def test_the_torchvision_backend_is_reproduced_too(jpegs):
    """Runs where torchvision is installed (`pip install -e .[fast]`); CPU CI has no torchvision build that imports
    beside its torch, so it skips there."""
    pytest.importorskip("torchvision")
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor()
    assert processor.backend == "torchvision"
    transform = ImageTransform.from_image_processor(processor)
    images = rgb(jpegs)
    reference = processor(images=images, return_tensors="pt")["pixel_values"]
    assert (transform(images) - reference).abs().max().item() <= TOLERANCE
