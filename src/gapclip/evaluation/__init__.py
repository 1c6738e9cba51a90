"""Retrieval, modality-gap and uni-modal evaluation, one module a concern (sentence-transformers' layout):

- :mod:`~gapclip.evaluation.retrieval`: chunked best-positive ranks, R@K/RSUM/ranks, COCO 1K folds, modality gap;
- :mod:`~gapclip.evaluation.eccv`: ECCV Caption mAP@R / R-Precision with extra positives;
- :mod:`~gapclip.evaluation.unimodal`: image→image R@K and STS Spearman;
- :mod:`~gapclip.evaluation.tables`: the papers' Markdown table;
- :mod:`~gapclip.evaluation.evaluators`: the same as evaluators the trainer and the evaluation recipe run.

The metric functions are pure functions of embedding tensors (CPU or GPU) and index tensors; none needs a model.
The files some of them take are read by :mod:`gapclip.data` (``load_extra_positives``, ``load_sts_pairs``).

Conventions (see ``design.md``, "Evaluation conventions"):

- Recall values, RSUM, mAP@R, R-Precision, uni-modal R@K and STS Spearman are returned in **percent** (0-100), as the
  papers print them; median/mean ranks are 1-based.
- **Ties are counted optimistically:** the 0-based rank of a query is the number of *negatives* whose score is strictly
  higher than the query's best positive, so a negative tied with the best positive does not push it down.
- i2t R@K: an image scores if *any* of its captions is in its top K. t2i R@K: a caption scores if its image is in its
  top K. RSUM is the sum of the i2t and t2i recalls.
- COCO 1K is the mean over five folds of 1K consecutive test images (with their captions).
- The modality gap (LG-MGC supplement, Fig. 2) is ``‖mean(norm. image emb) − mean(norm. text emb)‖₂`` over the first
  1000 (image, first caption) pairs.

References:
    - ECCV Caption mAP@R / R-Precision: Chun et al., "ECCV Caption: Correcting False Negatives by Collecting
      Machine-and-Human-verified Image-Caption Associations for MS-COCO", ECCV 2022 (arXiv:2204.03359).
    - Uni-modal image retrieval R@1 and STS Spearman as extra evaluations: CUSA (Huang et al., AAAI 2024).
"""

from __future__ import annotations

from .eccv import PositiveSets, build_positive_sets, eccv_metrics
from .evaluators import (
    ECCVEvaluator,
    EmbeddedCaptions,
    EvaluationContext,
    Evaluator,
    RetrievalEvaluator,
    STSEvaluator,
    UniModalEvaluator,
    run_evaluators,
)
from .retrieval import coco_1k_metrics, metrics_from_ranks, modality_gap, retrieval_metrics, retrieval_ranks
from .tables import format_retrieval_table
from .unimodal import sts_spearman, unimodal_recall_at_k

__all__ = [
    "ECCVEvaluator",
    "EmbeddedCaptions",
    "EvaluationContext",
    "Evaluator",
    "PositiveSets",
    "RetrievalEvaluator",
    "STSEvaluator",
    "UniModalEvaluator",
    "build_positive_sets",
    "coco_1k_metrics",
    "eccv_metrics",
    "format_retrieval_table",
    "metrics_from_ranks",
    "modality_gap",
    "retrieval_metrics",
    "retrieval_ranks",
    "run_evaluators",
    "sts_spearman",
    "unimodal_recall_at_k",
]
