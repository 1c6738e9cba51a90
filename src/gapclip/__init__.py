"""gapclip: modality-gap correction objectives for dual-encoder image-text retrieval on the Hugging Face stack."""

from __future__ import annotations

from .configuration import GapClipConfig
from .losses import TERM_REGISTRY, GapBatch, GapTerm, TermInput, describe_terms, register_term
from .modeling import GapClipModel, GapClipOutput, GapClipPreTrainedModel

__version__ = "0.1.0"

__all__ = [
    "TERM_REGISTRY",
    "GapBatch",
    "GapClipConfig",
    "GapClipModel",
    "GapClipOutput",
    "GapClipPreTrainedModel",
    "GapTerm",
    "TermInput",
    "describe_terms",
    "register_term",
]
