"""Shared fixtures: one tiny offline demo set per session (under ``$GAPCLIP_CACHE``), its processor, tiny models.

Everything here is CPU-sized: 32 px images, 1–2 layer towers, nothing downloaded. Mutating tests build their own
model from the factories instead of changing a shared one.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import torch

#: Parameters of the session's demo set; the recipe tests pass the same values as flags, so the recipe reuses it.
DEMO_SIZES = {"num_train": 48, "num_val": 16, "num_test": 16, "image_size": 32}


@pytest.fixture(scope="session", autouse=True)
def gapclip_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``$GAPCLIP_CACHE`` points into the session's temporary folder, so no test writes to ``~/.cache/gapclip``."""
    cache = tmp_path_factory.mktemp("gapclip_cache")
    previous = os.environ.get("GAPCLIP_CACHE")
    os.environ["GAPCLIP_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("GAPCLIP_CACHE", None)
    else:
        os.environ["GAPCLIP_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_demo_root(gapclip_cache: Path) -> Path:
    """The demo set (48 train / 16 val / 16 test images, 32 px) at its default root inside ``$GAPCLIP_CACHE``."""
    from gapclip.data import make_demo_dataset

    return make_demo_dataset(**DEMO_SIZES)


@pytest.fixture(scope="session")
def tiny_demo_processor(tiny_demo_root: Path) -> Any:
    from gapclip.data import make_demo_processor

    return make_demo_processor(tiny_demo_root)


@pytest.fixture(scope="session")
def tiny_demo_datasets(tiny_demo_root: Path) -> Any:
    """The demo set loaded as a caption ``DatasetDict`` (train/validation/test)."""
    from gapclip.data import load_caption_dataset

    return load_caption_dataset("demo", root=tiny_demo_root)


@pytest.fixture
def make_clip_model():
    """``make_clip_model(seed=0, **config_kwargs)``: a fresh tiny random CLIP GapClipModel in eval mode."""
    from gapclip import GapClipConfig, GapClipModel
    from gapclip.testing import tiny_clip_config

    def make(seed: int = 0, **config_kwargs) -> Any:
        torch.manual_seed(seed)
        return GapClipModel(GapClipConfig(tiny_clip_config(), **config_kwargs)).eval()

    return make


@pytest.fixture
def make_siglip_model():
    from gapclip import GapClipConfig, GapClipModel
    from gapclip.testing import tiny_siglip_config

    def make(seed: int = 0, **config_kwargs) -> Any:
        torch.manual_seed(seed)
        return GapClipModel(GapClipConfig(tiny_siglip_config(), **config_kwargs)).eval()

    return make


@pytest.fixture(scope="session")
def _vtde_backbone() -> Any:
    from gapclip.testing import tiny_vision_text_dual_encoder

    torch.manual_seed(0)
    return tiny_vision_text_dual_encoder(num_layers=1)


@pytest.fixture
def make_vtde_model(_vtde_backbone):
    """A GapClipModel around a tiny random ViT + the real MiniLM BERT (loaded once per session, copied per call)."""
    from gapclip import GapClipConfig, GapClipModel

    def make(**config_kwargs) -> Any:
        backbone = copy.deepcopy(_vtde_backbone)
        return GapClipModel(GapClipConfig(backbone.config, **config_kwargs), backbone=backbone).eval()

    return make


def clip_text_batch(batch_size: int = 4, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids for :func:`gapclip.testing.tiny_clip_config` (BOS 2, EOS 3, PAD 0) with ragged lengths."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([length - (i % 3) for i in range(batch_size)])
    input_ids = torch.randint(4, 60, (batch_size, length), generator=generator)
    attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    input_ids[:, 0] = 2
    input_ids[torch.arange(batch_size), lengths - 1] = 3
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def pixel_batch(batch_size: int = 4, image_size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, image_size, image_size, generator=generator)


@pytest.fixture
def clip_inputs() -> dict[str, torch.Tensor]:
    """A batch of 4 for the tiny CLIP/SigLIP configs: ragged token ids plus 32 px pixel values."""
    return {**clip_text_batch(), "pixel_values": pixel_batch()}
