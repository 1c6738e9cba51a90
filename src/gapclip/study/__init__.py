"""The method study: does each gap term help, from a pretrained start and from scratch, against a tuned baseline?

``recipes/study_methods.py`` is the command line; :class:`MethodStudy` does the work (stages in
:mod:`gapclip.study.runner`, rows in :mod:`gapclip.study.variants`, statistics in :mod:`gapclip.study.stats`).
"""

from __future__ import annotations

from .runner import FAMILIES, REGIMES, STOP_AFTER, MethodStudy, StudySettings
from .variants import SWEEPS, Variant, default_variants

__all__ = [
    "FAMILIES", "REGIMES", "STOP_AFTER", "SWEEPS", "MethodStudy", "StudySettings", "Variant", "default_variants",
]
