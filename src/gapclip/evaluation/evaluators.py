"""Evaluators: each turns one evaluated caption split into named metrics (sentence-transformers' evaluator pattern).

:class:`~gapclip.trainer.GapClipTrainer` (``evaluators=[...]``) and the evaluation recipe embed the split once
(every image, every caption) and hand each evaluator an :class:`EvaluationContext`; the metrics of all evaluators
are merged (a key two evaluators return is an error) and prefixed (``eval_``, ``test_``) by the caller, so any of
them can select the best checkpoint (``--metric_for_best_model``).

- :class:`RetrievalEvaluator`: R@1/5/10 both ways, RSUM, ranks, modality gap, optionally COCO 1K (always run).
- :class:`ECCVEvaluator`: ECCV Caption mAP@R, R-Precision and R@1, with extra positive pairs.
- :class:`UniModalEvaluator`: image→image R@K given a class-label column of the split.
- :class:`STSEvaluator`: STS Spearman correlation of the text tower on sentence pairs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..data.collator import TextCollator
from ..data.evaluation_files import StsPairs, load_extra_positives, load_sts_pairs
from .eccv import build_positive_sets, eccv_metrics
from .retrieval import coco_1k_metrics, modality_gap, retrieval_metrics
from .unimodal import sts_spearman, unimodal_recall_at_k


@dataclass
class EmbeddedCaptions:
    """Every image and caption of a caption split, embedded (see :func:`gapclip.inference.embed_caption_dataset`)."""

    image_embeds: torch.Tensor  # [N, D] normalised
    text_embeds: torch.Tensor  # [M, D] normalised
    text_to_image: torch.Tensor  # [M] image row of each caption


@dataclass
class EvaluationContext:
    """What an evaluator gets: the model (unwrapped), its processor, the split and its embeddings.

    Attributes:
        model: a :class:`~gapclip.GapClipModel` (``get_text_features``/``get_image_features``), in eval mode.
        processor: the backbone's processor.
        dataset: the evaluated caption split (``image_id``, ``image``, ``captions`` and any further columns).
        embedded: its :class:`EmbeddedCaptions`.
        batch_size: embedding batch size for evaluators that encode more (STS).
        chunk_size: query chunk of similarity computations (bounds memory).
        max_length / padding: text encoding as in training.
    """

    model: Any
    processor: Any
    dataset: Any
    embedded: EmbeddedCaptions
    batch_size: int = 64
    chunk_size: int = 1024
    max_length: int | None = None
    padding: str = "longest"


class Evaluator:
    """Base class: ``evaluator(context) -> {metric name: value}`` (names without the ``eval_`` prefix)."""

    def __call__(self, context: EvaluationContext) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


def run_evaluators(evaluators: Iterable[Evaluator], context: EvaluationContext) -> dict[str, float]:
    """Every evaluator's metrics, merged; two evaluators returning the same key is a ValueError naming both."""
    metrics: dict[str, float] = {}
    source: dict[str, Evaluator] = {}
    for evaluator in evaluators:
        for key, value in evaluator(context).items():
            if key in metrics:
                raise ValueError(f"Evaluators {source[key]!r} and {evaluator!r} both return the metric {key!r}.")
            metrics[key], source[key] = value, evaluator
    return metrics


class RetrievalEvaluator(Evaluator):
    """Image↔text retrieval (Flickr30K/COCO protocol): ``i2t_r{1,5,10}``, ``t2i_r{1,5,10}``, ``rsum``, median/mean
    ranks, ``modality_gap`` over the first ``gap_pairs`` (image, first caption) pairs and, with ``coco_1k``, the
    COCO 1K fold means prefixed ``1k_``."""

    def __init__(self, *, gap_pairs: int = 1000, coco_1k: bool = False):
        self.gap_pairs = gap_pairs
        self.coco_1k = coco_1k

    def __call__(self, context: EvaluationContext) -> dict[str, float]:
        embedded = context.embedded
        metrics = retrieval_metrics(
            embedded.image_embeds, embedded.text_embeds, embedded.text_to_image, chunk_size=context.chunk_size
        )
        metrics["modality_gap"] = modality_gap(
            embedded.image_embeds, embedded.text_embeds, text_to_image=embedded.text_to_image,
            num_pairs=self.gap_pairs,
        )
        if self.coco_1k:
            folds = coco_1k_metrics(
                embedded.image_embeds, embedded.text_embeds, embedded.text_to_image, chunk_size=context.chunk_size
            )
            metrics.update({f"1k_{key}": value for key, value in folds.items()})
        return metrics


class ECCVEvaluator(Evaluator):
    """ECCV Caption metrics (``eccv_{i2t,t2i}_{map_at_r,r_precision,r1,num_queries}``): the split's own positives
    plus ``extra_positives``, a file (:func:`gapclip.data.load_extra_positives`) or ``(image_id, caption_index)``
    pairs, where ``caption_index`` is the caption's row among all captions of the split in order."""

    def __init__(self, extra_positives: str | os.PathLike | Iterable[tuple[Any, int]] | None = None):
        if isinstance(extra_positives, (str, os.PathLike)):
            extra_positives = load_extra_positives(extra_positives)
        # gapclip's image ids are strings; JSON files often hold COCO's integer ids
        self.extra_positives = [(str(image_id), int(caption)) for image_id, caption in extra_positives or ()]

    def __call__(self, context: EvaluationContext) -> dict[str, float]:
        embedded = context.embedded
        i2t, t2i = build_positive_sets(
            embedded.text_to_image, embedded.image_embeds.shape[0], extra_pairs=self.extra_positives,
            image_ids=[str(image_id) for image_id in context.dataset["image_id"]],
        )
        return eccv_metrics(embedded.image_embeds, embedded.text_embeds, i2t, t2i, chunk_size=context.chunk_size)


class UniModalEvaluator(Evaluator):
    """Image→image retrieval R@K in percent (``image_r{k}``), an image scoring when an image of the same class
    (``label_column`` of the split) is among its K nearest other images (CUSA's uni-modal evaluation)."""

    def __init__(self, label_column: str, *, ks: Sequence[int] = (1,)):
        self.label_column = label_column
        self.ks = tuple(ks)

    def __call__(self, context: EvaluationContext) -> dict[str, float]:
        columns = context.dataset.column_names
        if self.label_column not in columns:
            raise ValueError(
                f"UniModalEvaluator: label column {self.label_column!r} is not a column of the evaluated split; it "
                f"has {columns} (attach one with --extra_columns FILE.jsonl)."
            )
        labels = _label_ids(context.dataset[self.label_column])
        recalls = unimodal_recall_at_k(
            context.embedded.image_embeds, labels, ks=self.ks, chunk_size=context.chunk_size
        )
        return {f"image_{key}": value for key, value in recalls.items()}


def _label_ids(values: list[Any]) -> torch.Tensor:
    lookup: dict[Any, int] = {}
    return torch.tensor([lookup.setdefault(value, len(lookup)) for value in values], dtype=torch.long)


class STSEvaluator(Evaluator):
    """Spearman correlation ×100 (``sts_spearman``) between the text tower's cosine similarities of sentence pairs and
    their gold scores; ``pairs`` is an :class:`~gapclip.data.StsPairs` or a file/dataset for
    :func:`gapclip.data.load_sts_pairs`."""

    def __init__(self, pairs: StsPairs | str | os.PathLike):
        self.pairs = pairs if isinstance(pairs, StsPairs) else load_sts_pairs(pairs)

    def __repr__(self) -> str:
        return f"STSEvaluator({len(self.pairs.scores)} pairs)"

    def __call__(self, context: EvaluationContext) -> dict[str, float]:
        collate = TextCollator(context.processor, max_length=context.max_length, padding=context.padding)
        model = context.model
        device = next(model.parameters()).device

        def embed(texts: list[str]) -> torch.Tensor:
            chunks = []
            for start in range(0, len(texts), context.batch_size):
                batch = collate(texts[start : start + context.batch_size])
                mask = batch.get("attention_mask")
                with torch.no_grad():
                    chunks.append(
                        model.get_text_features(
                            batch["input_ids"].to(device), None if mask is None else mask.to(device)
                        ).float().cpu()
                    )
            return torch.cat(chunks)

        pairs = self.pairs
        return {"sts_spearman": sts_spearman(embed(pairs.sentence1), embed(pairs.sentence2), pairs.scores)}


__all__ = [
    "ECCVEvaluator",
    "EmbeddedCaptions",
    "EvaluationContext",
    "Evaluator",
    "RetrievalEvaluator",
    "STSEvaluator",
    "UniModalEvaluator",
    "run_evaluators",
]
