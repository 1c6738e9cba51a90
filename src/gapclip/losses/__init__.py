"""Base losses and gap terms. Each family lives in its own module; all are re-exported here."""

from __future__ import annotations

from .base import TERM_REGISTRY, GapBatch, GapTerm, build_terms, describe_terms, register_term, validate_term_specs
from .contrastive import BASE_LOSSES, InfoNCELoss, SigmoidLoss, TripletLoss
from . import registered_terms  # noqa: F401,E402  (fills TERM_REGISTRY)

__all__ = [
    "BASE_LOSSES",
    "TERM_REGISTRY",
    "GapBatch",
    "GapTerm",
    "InfoNCELoss",
    "SigmoidLoss",
    "TripletLoss",
    "build_terms",
    "describe_terms",
    "register_term",
    "validate_term_specs",
]
