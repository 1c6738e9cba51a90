"""Importing this module registers every gap-term family with :data:`~gapclip.losses.base.TERM_REGISTRY`."""

from __future__ import annotations

from . import cusa, dias, lgmgc  # noqa: F401
