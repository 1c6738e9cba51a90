"""Base losses and gap terms. Each family lives in its own module; importing this package registers them all."""

from __future__ import annotations

from .base import (
    TERM_REGISTRY,
    DualEncoder,
    GapBatch,
    GapTerm,
    TermInput,
    TermOption,
    build_terms,
    describe_terms,
    register_term,
    validate_term_specs,
)
from .contrastive import BASE_LOSSES, InfoNCELoss, SigmoidLoss, TripletLoss
from . import cusa, dias, lgmgc  # noqa: E402,F401  (each family registers its terms on import)

__all__ = [
    "BASE_LOSSES",
    "TERM_REGISTRY",
    "DualEncoder",
    "GapBatch",
    "GapTerm",
    "InfoNCELoss",
    "SigmoidLoss",
    "TermInput",
    "TermOption",
    "TripletLoss",
    "build_terms",
    "describe_terms",
    "register_term",
    "validate_term_specs",
]
