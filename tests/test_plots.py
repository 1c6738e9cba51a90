"""Pictures: patch-similarity maps and the modality-gap plot produce valid PNGs; helpers behave as documented."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gapclip import GapClipConfig, GapClipModel
from gapclip.plots import modality_gap_plot, patch_similarity, patch_similarity_map, project_2d, substitute_words
from gapclip.testing import tiny_clip_config

pytest.importorskip("matplotlib")


class TinyProcessor:
    """Word ids by a fixed table (bos 2, eos 3, pad 0) and 32x32 pixel values: enough for the tiny CLIP."""

    def __call__(self, *, text, images, return_tensors="pt", padding=True, truncation=False):
        vocab = {}
        rows = [
            [2] + [4 + vocab.setdefault(word, len(vocab)) % 56 for word in caption.lower().split()] + [3]
            for caption in text
        ]
        length = max(map(len, rows))
        input_ids = torch.tensor([row + [0] * (length - len(row)) for row in rows])
        pixels = torch.stack([
            torch.from_numpy(np.asarray(im.convert("RGB").resize((32, 32)), dtype=np.float32)).permute(2, 0, 1) / 255.0
            for im in images
        ])
        return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long(), "pixel_values": pixels}


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] > 0 and image.size[1] > 0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GapClipModel(GapClipConfig(tiny_clip_config(), gap_terms=[{"name": "lsc"}]))


def test_substitute_words():
    assert substitute_words("A dog runs after another dog.", {"dog": "cat"}) == "A cat runs after another cat."
    assert substitute_words("Dog and boy on grass", {"dog": "rabbit", "grass": "snow"}) == "Rabbit and boy on snow"
    with pytest.raises(ValueError, match=r"\['horse'\] not found"):
        substitute_words("a hotdog stand", {"horse": "cow"})
    with pytest.raises(ValueError, match="not found"):
        substitute_words("a hotdog stand", {"dog": "cat"})  # whole words only


def test_patch_similarity_values_and_grid(model):
    image = Image.new("RGB", (40, 32), (120, 30, 200))
    captions = ["a dog on grass", "a cat on grass"]
    maps = patch_similarity(model, TinyProcessor(), image, captions)
    assert maps.shape == (2, 4, 4)  # 32 px / patch 8
    inputs = TinyProcessor()(text=captions, images=[image])
    with torch.no_grad():
        out = model(**inputs, return_local=True)
    expected = F.normalize(out.text_embeds, dim=-1) @ F.normalize(out.patch_embeds[0], dim=-1).t()
    torch.testing.assert_close(maps, expected.reshape(2, 4, 4))
    assert model.training  # left as it was


def test_a_caption_longer_than_the_tokenizer_limit_is_cut_there_as_in_training(tiny_demo_processor):
    tokenizer = tiny_demo_processor.tokenizer
    torch.manual_seed(0)
    model = GapClipModel(GapClipConfig(tiny_clip_config(
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)))
    long_caption = " ".join(["a red circle left of a blue square"] * 8)
    assert len(tokenizer(long_caption)["input_ids"]) > tokenizer.model_max_length
    image = Image.new("RGB", (32, 32), (120, 30, 200))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not "`max_length` is ignored when `padding`=`True` ..." and an index error
        maps = patch_similarity(model, tiny_demo_processor, image, [long_caption, "a red circle"])
    assert maps.shape == (2, 4, 4) and torch.isfinite(maps).all()


def test_patch_similarity_map_png(model, tmp_path):
    caption = "a dog runs on the grass"
    captions = [caption] + [substitute_words(caption, {"dog": w}) for w in ("cat", "boy")]
    image = Image.new("RGB", (48, 36), (10, 200, 90))
    path = patch_similarity_map(model, TinyProcessor(), image, captions, output_path=tmp_path / "maps" / "fig1.png",
                                display_size=32, title="tiny")
    assert path == tmp_path / "maps" / "fig1.png"
    assert_png(path)
    path2 = patch_similarity_map(model, TinyProcessor(), image, captions[:1], output_path=tmp_path / "one.png",
                                 shared_scale=False, display_size=32)
    assert_png(path2)


def test_modality_gap_plot_png(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(30, 8, generator=g) + 2.0
    texts = torch.randn(30, 8, generator=g) - 2.0
    path = modality_gap_plot(images, texts, output_path=tmp_path / "gap.png", num_pairs=20, num_lines=5, label="CLIP")
    assert_png(path)
    with pytest.raises(ValueError, match="same shape"):
        modality_gap_plot(images, texts[:5], output_path=tmp_path / "bad.png")


def test_project_2d_is_pca():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 4, generator=g) * torch.tensor([5.0, 2.0, 0.1, 0.1])
    a, b = project_2d(x[:6], x[6:])
    assert a.shape == (6, 2) and b.shape == (4, 2)
    both = torch.cat([a, b])
    centred = x.double() - x.double().mean(dim=0)
    # the two axes keep the two largest variances, in order
    eigvals = torch.linalg.eigvalsh(centred.t() @ centred).flip(0)
    torch.testing.assert_close((both**2).sum(dim=0), eigvals[:2])


def test_missing_matplotlib_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install gapclip\[plots\]"):
        modality_gap_plot(torch.randn(3, 4), torch.randn(3, 4), output_path=tmp_path / "x.png")
