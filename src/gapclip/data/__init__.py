"""Data loading for gapclip: canonical caption datasets, the synthetic demo set, training pairs and collators."""

from __future__ import annotations

from .collator import GapClipCollator, ImageCollator, TextCollator
from .demo import make_demo_dataset, make_demo_processor
from .evaluation_files import StsPairs, load_extra_positives, load_sts_pairs
from .loaders import (
    CANONICAL_SPLITS,
    CAPTION_FEATURES,
    attach_columns,
    attach_translations,
    load_caption_dataset,
    load_captions_file,
    load_demo,
    load_hub_captions,
    load_karpathy,
)
from .pairs import CaptionPairs, IterableCaptionPairs

__all__ = [
    "CANONICAL_SPLITS",
    "CAPTION_FEATURES",
    "CaptionPairs",
    "GapClipCollator",
    "ImageCollator",
    "IterableCaptionPairs",
    "StsPairs",
    "TextCollator",
    "attach_columns",
    "attach_translations",
    "load_caption_dataset",
    "load_captions_file",
    "load_demo",
    "load_extra_positives",
    "load_hub_captions",
    "load_karpathy",
    "load_sts_pairs",
    "make_demo_dataset",
    "make_demo_processor",
]
