"""Retrieval, modality-gap and uni-modal evaluation on precomputed embeddings.

Every function here is a pure function of embedding tensors (CPU or GPU) and index tensors; none needs a model.
Cross-modal scores are computed in query chunks of ``chunk_size`` rows against the whole gallery, so peak memory is
``chunk_size × N_gallery`` scores and the full ``N_text × N_image`` similarity matrix is never built.

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
    - Uni-modal image retrieval R@1 and STS Spearman as extra evaluations: CUSA (Li et al., AAAI 2024).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from transformers.utils import logging


logger = logging.get_logger(__name__)

__all__ = [
    "StsPairs",
    "build_positive_sets",
    "coco_1k_metrics",
    "eccv_metrics",
    "embed_in_chunks",
    "format_retrieval_table",
    "load_extra_positives",
    "load_sts_pairs",
    "modality_gap",
    "retrieval_metrics",
    "sts_spearman",
    "unimodal_recall_at_1",
    "unimodal_recall_at_k",
]

# --------------------------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------------------------


def _check_embeds(name: str, embeds: Any) -> torch.Tensor:
    if not isinstance(embeds, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(embeds).__name__}.")
    if embeds.dim() != 2:
        raise ValueError(f"`{name}` must be 2-D [num_items, dim], got shape {tuple(embeds.shape)}.")
    if embeds.shape[0] == 0 or embeds.shape[1] == 0:
        raise ValueError(f"`{name}` is empty (shape {tuple(embeds.shape)}); at least one item of dim >= 1 is needed.")
    if not embeds.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor, got dtype {embeds.dtype}.")
    return embeds


def _check_same_dim(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"Embedding dims differ: `{a_name}` has dim {a.shape[1]} but `{b_name}` has dim {b.shape[1]}."
        )


def _check_index(name: str, index: Any, length: int, upper: int, upper_name: str) -> torch.Tensor:
    """Validate a 1-D integer index tensor of ``length`` entries in ``[0, upper)``."""
    if not isinstance(index, torch.Tensor):
        index = torch.as_tensor(index)
    if index.dim() != 1:
        raise ValueError(f"`{name}` must be 1-D, got shape {tuple(index.shape)}.")
    if index.dtype in (torch.bool,) or index.is_floating_point() or index.is_complex():
        raise ValueError(f"`{name}` must be an integer tensor, got dtype {index.dtype}.")
    if index.shape[0] != length:
        raise ValueError(f"`{name}` has {index.shape[0]} entries but {length} are expected (one per row).")
    if length > 0:
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= upper:
            raise ValueError(
                f"`{name}` values must lie in [0, {upper}) ({upper_name}), got values in [{low}, {high}]."
            )
    return index.long()


def _check_chunk_size(chunk_size: Any) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive int, got {chunk_size!r}.")
    return chunk_size


def _check_ks(ks: Any) -> tuple[int, ...]:
    try:
        values = tuple(ks)
    except TypeError:
        raise ValueError(f"`ks` must be a sequence of positive ints, got {ks!r}.") from None
    if not values or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in values):
        raise ValueError(f"`ks` must be a non-empty sequence of positive ints, got {ks!r}.")
    return tuple(dict.fromkeys(values))  # de-duplicated, order kept


def _prepare(embeds: torch.Tensor, normalize: bool, device: torch.device | None = None) -> torch.Tensor:
    """Detach, move, promote half precision to float32 (scores in fp16/bf16 tie too often) and optionally normalise."""
    embeds = embeds.detach()
    if device is not None:
        embeds = embeds.to(device)
    if embeds.dtype in (torch.float16, torch.bfloat16):
        embeds = embeds.float()
    return F.normalize(embeds, dim=-1) if normalize else embeds


# --------------------------------------------------------------------------------------------------------------------
# Chunked ranking core
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _first_positive_ranks(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    positive_mask: Callable[[int, int], torch.Tensor],
    chunk_size: int,
    exclude_self: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based rank of each query's best positive, computed ``chunk_size`` queries at a time.

    ``positive_mask(start, end)`` returns the ``[end - start, G]`` bool positives of queries ``start:end``. The rank
    is the number of negatives scoring strictly higher than the best positive (optimistic ties). With
    ``exclude_self``, gallery item ``i`` is neither positive nor negative for query ``i`` (queries = gallery).

    Returns:
        ``(ranks, has_positive)``: long ``[Q]`` and bool ``[Q]``. Queries without positives get rank ``G``.
    """
    num_queries, num_gallery = queries.shape[0], gallery.shape[0]
    ranks = torch.empty(num_queries, dtype=torch.long, device=queries.device)
    has_positive = torch.empty(num_queries, dtype=torch.bool, device=queries.device)
    gallery_t = gallery.t()
    for start in range(0, num_queries, chunk_size):
        end = min(start + chunk_size, num_queries)
        scores = queries[start:end] @ gallery_t  # [c, G]
        positives = positive_mask(start, end)
        candidates = torch.ones_like(positives)
        if exclude_self:
            rows = torch.arange(end - start, device=scores.device)
            candidates[rows, rows + start] = False
            positives = positives & candidates
        best = scores.masked_fill(~positives, float("-inf")).amax(dim=1, keepdim=True)
        negatives = candidates & ~positives
        chunk_has = positives.any(dim=1)
        chunk_ranks = ((scores > best) & negatives).sum(dim=1)
        ranks[start:end] = torch.where(chunk_has, chunk_ranks, torch.full_like(chunk_ranks, num_gallery))
        has_positive[start:end] = chunk_has
    return ranks, has_positive


def _recall(ranks: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> float:
    hits = ranks < k
    if valid is not None:
        hits = hits & valid
    return 100.0 * hits.double().mean().item()


def _median_rank(ranks: torch.Tensor) -> float:
    # As in the VSE++/SCAN evaluation code: floor(median(0-based ranks)) + 1.
    return float(np.floor(np.median(ranks.cpu().numpy())) + 1)


# --------------------------------------------------------------------------------------------------------------------
# Cross-modal retrieval
# --------------------------------------------------------------------------------------------------------------------


def retrieval_ranks(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_to_image: torch.Tensor,
    *,
    chunk_size: int = 1024,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query 0-based rank of the best positive, both directions (what every R@K is computed from).

    ``i2t_ranks[i]`` is the number of captions of other images scoring strictly higher for image ``i`` than its
    best caption; ``t2i_ranks[m]`` the number of other images scoring strictly higher for caption ``m`` than its
    image. ``R@K = 100 · mean(ranks < K)``. Kept per query so that two models can be compared on the same queries
    (paired bootstrap, ``gapclip.study.stats``). Arguments and errors as in :func:`retrieval_metrics`.

    Returns:
        ``(i2t_ranks [N], t2i_ranks [M])``, long tensors on the embeddings' device.
    """
    image_embeds = _check_embeds("image_embeds", image_embeds)
    text_embeds = _check_embeds("text_embeds", text_embeds)
    _check_same_dim("image_embeds", image_embeds, "text_embeds", text_embeds)
    num_images, num_texts = image_embeds.shape[0], text_embeds.shape[0]
    text_to_image = _check_index("text_to_image", text_to_image, num_texts, num_images, "number of images")
    chunk_size = _check_chunk_size(chunk_size)

    device = image_embeds.device
    images = _prepare(image_embeds, normalize)
    texts = _prepare(text_embeds, normalize, device).to(images.dtype)
    text_to_image = text_to_image.to(device)

    captions_per_image = torch.bincount(text_to_image, minlength=num_images)
    if bool((captions_per_image == 0).any()):
        missing = torch.nonzero(captions_per_image == 0).flatten()
        raise ValueError(
            f"Every image needs at least one caption in `text_to_image`; {missing.numel()} of {num_images} images "
            f"have none (first: {missing[:5].tolist()})."
        )

    image_ids = torch.arange(num_images, device=device)

    def t2i_mask(start: int, end: int) -> torch.Tensor:
        return text_to_image[start:end, None] == image_ids[None, :]

    def i2t_mask(start: int, end: int) -> torch.Tensor:
        return image_ids[start:end, None] == text_to_image[None, :]

    i2t_ranks, _ = _first_positive_ranks(images, texts, i2t_mask, chunk_size)
    t2i_ranks, _ = _first_positive_ranks(texts, images, t2i_mask, chunk_size)
    return i2t_ranks, t2i_ranks


def retrieval_metrics(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_to_image: torch.Tensor,
    *,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    normalize: bool = True,
) -> dict[str, float]:
    """Image↔text retrieval recalls, RSUM and median/mean ranks (Flickr30K / COCO 5K protocol).

    Args:
        image_embeds: ``[N, D]`` image embeddings.
        text_embeds: ``[M, D]`` caption embeddings (several captions per image).
        text_to_image: ``[M]`` integer tensor, the image row of each caption. Every image needs at least one caption.
        ks: the K of the R@K values.
        chunk_size: queries scored at once against the whole gallery; peak memory is ``chunk_size × max(N, M)``.
        normalize: L2-normalise the embeddings first (cosine similarity); ``False`` scores raw dot products.

    Returns:
        ``{"i2t_r{k}", "t2i_r{k}" for k in ks, "rsum", "i2t_medr", "t2i_medr", "i2t_meanr", "t2i_meanr"}``. Recalls
        and ``rsum`` (the sum of all the recalls; the usual RSUM for the default ks) are percentages. Ranks are 1-based
        ranks of the best positive; the median is ``floor(median(0-based ranks)) + 1`` as in the VSE++/SCAN code.
        Ties with negatives are counted optimistically (rank = number of negatives scoring strictly higher).

    Raises:
        ValueError: non-2-D/empty embeddings, different dims, ``text_to_image`` of the wrong length or out of
            range, an image without captions, or a bad ``ks``/``chunk_size``.
    """
    ks = _check_ks(ks)
    i2t_ranks, t2i_ranks = retrieval_ranks(
        image_embeds, text_embeds, text_to_image, chunk_size=chunk_size, normalize=normalize
    )
    return metrics_from_ranks(i2t_ranks, t2i_ranks, ks=ks)


def metrics_from_ranks(
    i2t_ranks: torch.Tensor, t2i_ranks: torch.Tensor, *, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """R@K both ways, RSUM and median/mean ranks from :func:`retrieval_ranks`' per-query ranks."""
    metrics: dict[str, float] = {}
    for direction, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k in ks:
            metrics[f"{direction}_r{k}"] = _recall(ranks, k)
    metrics["rsum"] = sum(metrics[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks)
    metrics["i2t_medr"] = _median_rank(i2t_ranks)
    metrics["t2i_medr"] = _median_rank(t2i_ranks)
    metrics["i2t_meanr"] = i2t_ranks.double().mean().item() + 1.0
    metrics["t2i_meanr"] = t2i_ranks.double().mean().item() + 1.0
    return metrics


def coco_1k_metrics(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_to_image: torch.Tensor,
    *,
    num_folds: int = 5,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    normalize: bool = True,
) -> dict[str, float]:
    """COCO 1K protocol: :func:`retrieval_metrics` averaged over ``num_folds`` folds of consecutive images.

    The fold size is ``N // num_folds`` images (1000 for the 5K Karpathy test split); fold ``f`` holds images
    ``[f * fold_size, (f + 1) * fold_size)`` and exactly the captions of those images (selected through
    ``text_to_image``, so captions need not be stored in image order). Every returned value, ranks included, is the
    plain mean of the per-fold values, as in the VSE++/SCAN evaluation code.

    Args:
        image_embeds, text_embeds, text_to_image, ks, chunk_size, normalize: as in :func:`retrieval_metrics`.
        num_folds: number of folds (5 for COCO 1K).

    Raises:
        ValueError: ``N`` is not divisible by ``num_folds`` (or smaller than it), plus the errors of
            :func:`retrieval_metrics`. A fold size other than 1000 only logs a warning (useful for small tests).
    """
    image_embeds = _check_embeds("image_embeds", image_embeds)
    text_embeds = _check_embeds("text_embeds", text_embeds)
    num_images = image_embeds.shape[0]
    text_to_image = _check_index(
        "text_to_image", text_to_image, text_embeds.shape[0], num_images, "number of images"
    ).to(text_embeds.device)
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 1:
        raise ValueError(f"`num_folds` must be a positive int, got {num_folds!r}.")
    if num_images < num_folds or num_images % num_folds != 0:
        raise ValueError(
            f"COCO 1K needs the image count to be a positive multiple of `num_folds`; got {num_images} images and "
            f"num_folds={num_folds} (the Karpathy 5K test split has 5000 images, i.e. folds of 1000)."
        )
    fold_size = num_images // num_folds
    if fold_size != 1000:
        logger.warning_once(
            f"coco_1k_metrics: folds hold {fold_size} images, not the 1000 of the COCO 1K protocol "
            f"({num_images} images / {num_folds} folds)."
        )

    per_fold: list[dict[str, float]] = []
    for fold in range(num_folds):
        low, high = fold * fold_size, (fold + 1) * fold_size
        in_fold = (text_to_image >= low) & (text_to_image < high)
        if not bool(in_fold.any()):
            raise ValueError(f"Fold {fold} (images [{low}, {high})) has no captions in `text_to_image`.")
        per_fold.append(
            retrieval_metrics(
                image_embeds[low:high],
                text_embeds[in_fold],
                text_to_image[in_fold] - low,
                ks=ks,
                chunk_size=chunk_size,
                normalize=normalize,
            )
        )
    return {key: sum(fold[key] for fold in per_fold) / num_folds for key in per_fold[0]}


# --------------------------------------------------------------------------------------------------------------------
# Modality gap
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def modality_gap(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    *,
    text_to_image: torch.Tensor | None = None,
    num_pairs: int | None = 1000,
    seed: int | None = None,
) -> float:
    """Modality gap ``‖mean(normalised image emb) − mean(normalised text emb)‖₂`` (LG-MGC supplement, Fig. 2).

    Pairs are (image ``i``, its first caption). With ``text_to_image=None`` the texts must already be aligned one per
    image (``text_embeds[i]`` describes ``image_embeds[i]``). With ``text_to_image`` (``[M]``, image row of each
    caption), the first caption of image ``i`` is its lowest caption row; images without captions are skipped.

    Args:
        image_embeds: ``[N, D]`` image embeddings (normalised here).
        text_embeds: ``[N, D]`` aligned captions, or ``[M, D]`` captions together with ``text_to_image``.
        text_to_image: optional ``[M]`` integer tensor mapping captions to image rows.
        num_pairs: pairs used (1000 as in the paper); ``None`` uses all. If fewer pairs exist, all are used and a
            warning is logged.
        seed: ``None`` (default) takes the *first* ``num_pairs`` pairs; an int draws ``num_pairs`` random pairs
            with a ``torch.Generator`` seeded with it.

    Returns:
        The gap as a Python float (0 for identical distributions, at most 2).
    """
    image_embeds = _check_embeds("image_embeds", image_embeds)
    text_embeds = _check_embeds("text_embeds", text_embeds)
    _check_same_dim("image_embeds", image_embeds, "text_embeds", text_embeds)
    num_images = image_embeds.shape[0]
    device = image_embeds.device
    if text_to_image is None:
        if text_embeds.shape[0] != num_images:
            raise ValueError(
                f"Without `text_to_image`, `text_embeds` must hold one caption per image: got {text_embeds.shape[0]} "
                f"texts for {num_images} images. Pass `text_to_image` to pick each image's first caption."
            )
        image_rows = torch.arange(num_images, device=device)
        text_rows = image_rows
    else:
        num_texts = text_embeds.shape[0]
        text_to_image = _check_index("text_to_image", text_to_image, num_texts, num_images, "number of images")
        text_to_image = text_to_image.to(device)
        first = torch.full((num_images,), num_texts, dtype=torch.long, device=device)
        first.scatter_reduce_(0, text_to_image, torch.arange(num_texts, device=device), reduce="amin")
        image_rows = torch.nonzero(first < num_texts).flatten()
        text_rows = first[image_rows]

    available = image_rows.shape[0]
    if num_pairs is not None:
        if isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 1:
            raise ValueError(f"`num_pairs` must be a positive int or None, got {num_pairs!r}.")
        if num_pairs > available:
            logger.warning_once(f"modality_gap: asked for {num_pairs} pairs but only {available} exist; using all.")
        elif seed is not None:
            generator = torch.Generator().manual_seed(seed)
            pick = torch.randperm(available, generator=generator)[:num_pairs].to(device)
            image_rows, text_rows = image_rows[pick], text_rows[pick]
        else:
            image_rows, text_rows = image_rows[:num_pairs], text_rows[:num_pairs]

    images = _prepare(image_embeds[image_rows], normalize=True).double()
    texts = _prepare(text_embeds.to(device)[text_rows], normalize=True).double()
    return torch.linalg.vector_norm(images.mean(dim=0) - texts.mean(dim=0)).item()


# --------------------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------------------

_EXTRA_COLUMN_FORMATS: dict[str, tuple[str, int]] = {"modality_gap": ("Gap", 3)}


def format_retrieval_table(
    rows: Mapping[str, Mapping[str, float]],
    *,
    title: str | None = None,
    extra_columns: Sequence[str] = ("modality_gap",),
    ks: Sequence[int] = (1, 5, 10),
) -> str:
    """Render retrieval results as a Markdown table laid out like the papers' tables.

    Columns: ``Method | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | RSUM`` followed by each of ``extra_columns``
    present in at least one row (``modality_gap`` is shown as ``Gap`` with 3 decimals; other extras use their key and
    1 decimal). Recalls and RSUM use 1 decimal; a missing value prints as ``-``. RSUM is taken from ``"rsum"`` or,
    when absent, summed from the recalls if they are all present.

    Args:
        rows: method name → metrics dict (e.g. the output of :func:`retrieval_metrics`, plus ``"modality_gap"``).
        title: optional line printed above the table.
        extra_columns: metric keys appended as columns when any row has them.
        ks: the recall columns, per direction.

    Returns:
        The table as one string (no trailing newline).
    """
    if not isinstance(rows, Mapping):
        raise TypeError(f"`rows` must be a mapping of method name to metrics, got {type(rows).__name__}.")
    ks = _check_ks(ks)
    extras = [column for column in extra_columns if any(column in metrics for metrics in rows.values())]

    def number(value: Any, decimals: int) -> str:
        if value is None:
            return "-"
        value = float(value)
        return "-" if math.isnan(value) else f"{value:.{decimals}f}"

    header = ["Method"]
    for direction in ("i2t", "t2i"):
        header += [f"{direction} R@{k}" if i == 0 else f"R@{k}" for i, k in enumerate(ks)]
    header.append("RSUM")
    header += [_EXTRA_COLUMN_FORMATS.get(column, (column, 1))[0] for column in extras]

    body: list[list[str]] = []
    for method, metrics in rows.items():
        recall_keys = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in ks]
        cells = [str(method)] + [number(metrics.get(key), 1) for key in recall_keys]
        rsum = metrics.get("rsum")
        if rsum is None and all(metrics.get(key) is not None for key in recall_keys):
            rsum = sum(float(metrics[key]) for key in recall_keys)
        cells.append(number(rsum, 1))
        cells += [number(metrics.get(column), _EXTRA_COLUMN_FORMATS.get(column, (column, 1))[1]) for column in extras]
        body.append(cells)

    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def render(cells: list[str]) -> str:
        padded = [cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(cells)]
        return "| " + " | ".join(padded) + " |"

    separator = "|" + "|".join(
        ":" + "-" * (widths[i] + 1) if i == 0 else "-" * (widths[i] + 1) + ":" for i in range(len(header))
    ) + "|"
    lines = [render(header), separator, *(render(cells) for cells in body)]
    if title:
        lines = [title, "", *lines]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# ECCV Caption (mAP@R, R-Precision)
# --------------------------------------------------------------------------------------------------------------------

PositiveSets = Mapping[int, Iterable[int]] | Sequence[Iterable[int] | None]


def _positive_pairs(name: str, positives: Any, num_queries: int, num_gallery: int) -> tuple[list[int], list[int]]:
    """Flatten a positives spec to (query, gallery) pair lists, checking ranges and dropping duplicates."""
    if isinstance(positives, Mapping):
        items = positives.items()
    elif isinstance(positives, Sequence) and not isinstance(positives, (str, bytes)):
        if len(positives) != num_queries:
            raise ValueError(
                f"`{name}` given as a sequence must have one entry per query ({num_queries}), got {len(positives)}; "
                "use a mapping {query: positives} to evaluate a subset of queries."
            )
        items = enumerate(positives)
    else:
        raise TypeError(
            f"`{name}` must be a mapping or a sequence of positive index sets, got {type(positives).__name__}."
        )
    query_list: list[int] = []
    gallery_list: list[int] = []
    for query, gallery in items:
        query = int(query)
        if not 0 <= query < num_queries:
            raise ValueError(f"`{name}` has query index {query}, outside [0, {num_queries}).")
        for item in sorted({int(g) for g in (gallery if gallery is not None else ())}):
            if not 0 <= item < num_gallery:
                raise ValueError(f"`{name}[{query}]` has gallery index {item}, outside [0, {num_gallery}).")
            query_list.append(query)
            gallery_list.append(item)
    return query_list, gallery_list


@torch.no_grad()
def _map_at_r(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    query_pairs: list[int],
    gallery_pairs: list[int],
    chunk_size: int,
) -> dict[str, float]:
    """mAP@R, R-Precision and R@1 (percent) over the queries with at least one positive."""
    device = queries.device
    q_idx = torch.tensor(query_pairs, dtype=torch.long, device=device)
    g_idx = torch.tensor(gallery_pairs, dtype=torch.long, device=device)
    evaluated = torch.unique(q_idx)
    if evaluated.numel() == 0:
        return {"map_at_r": float("nan"), "r_precision": float("nan"), "r1": float("nan"), "num_queries": 0.0}
    sub_queries = queries[evaluated]
    # Re-index the queries to 0..Q'-1 and sort the pairs by query for per-chunk slicing.
    local = torch.searchsorted(evaluated, q_idx)
    order = torch.argsort(local, stable=True)
    local, g_idx = local[order], g_idx[order]
    num_gallery = gallery.shape[0]
    gallery_t = gallery.t()

    map_sum = rp_sum = r1_sum = 0.0
    for start in range(0, evaluated.numel(), chunk_size):
        end = min(start + chunk_size, evaluated.numel())
        lo, hi = torch.searchsorted(local, torch.tensor([start, end], device=device)).tolist()
        scores = sub_queries[start:end] @ gallery_t  # [c, G]
        positives = torch.zeros_like(scores, dtype=torch.bool)
        positives[local[lo:hi] - start, g_idx[lo:hi]] = True
        num_pos = positives.sum(dim=1)  # R per query, >= 1
        max_r = int(num_pos.max())
        # Positive scores in descending order (padding = -inf beyond each query's R).
        pos_scores = scores.masked_fill(~positives, float("-inf")).topk(max_r, dim=1, sorted=True).values
        # n_k = number of negatives scoring strictly above the k-th positive (optimistic ties).
        neg_sorted = scores.masked_fill(positives, float("-inf")).sort(dim=1).values
        n_above = num_gallery - torch.searchsorted(neg_sorted, pos_scores.contiguous(), right=True)
        k = torch.arange(1, max_r + 1, device=device)
        position = k[None, :] + n_above  # 1-based position of the k-th positive in the ranking
        valid = k[None, :] <= num_pos[:, None]
        within_r = valid & (position <= num_pos[:, None])
        r = num_pos.double()
        map_sum += ((k[None, :] / position).double() * within_r).sum(dim=1).div(r).sum().item()
        rp_sum += within_r.sum(dim=1).double().div(r).sum().item()
        r1_sum += (n_above[:, 0] == 0).double().sum().item()
    count = float(evaluated.numel())
    return {
        "map_at_r": 100.0 * map_sum / count,
        "r_precision": 100.0 * rp_sum / count,
        "r1": 100.0 * r1_sum / count,
        "num_queries": count,
    }


def eccv_metrics(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    i2t_positives: PositiveSets,
    t2i_positives: PositiveSets,
    *,
    chunk_size: int = 1024,
    normalize: bool = True,
) -> dict[str, float]:
    """ECCV Caption metrics (Chun et al., ECCV 2022): mAP@R, R-Precision and R@1 for both directions, in percent.

    For a query with ``R`` positives, ranked against the whole gallery: R-Precision = (positives in the top R) / R,
    and ``mAP@R = (1/R) Σ_{i≤R} P(i)·rel(i)`` with ``P(i)`` the precision at position ``i``. R@1 = top-1 is a
    positive. Ties with negatives are counted optimistically, as in :func:`retrieval_metrics`.

    Only queries with at least one positive are evaluated (ECCV Caption evaluates a subset of the COCO 5K queries),
    so pass a mapping ``{query_row: positive_rows}``; a sequence with one (possibly empty) entry per query also works.
    :func:`build_positive_sets` builds both directions from ``text_to_image`` plus extra pairs
    (:func:`load_extra_positives`).

    Args:
        image_embeds: ``[N, D]`` image embeddings.
        text_embeds: ``[M, D]`` caption embeddings.
        i2t_positives: image row → caption rows that match it.
        t2i_positives: caption row → image rows that match it.
        chunk_size, normalize: as in :func:`retrieval_metrics`.

    Returns:
        ``{"eccv_{d}_map_at_r", "eccv_{d}_r_precision", "eccv_{d}_r1", "eccv_{d}_num_queries"}`` for ``d`` in
        ``i2t``/``t2i`` (prefixed so they can be merged with :func:`retrieval_metrics`' keys). A direction without
        any evaluated query gives NaN metrics.
    """
    image_embeds = _check_embeds("image_embeds", image_embeds)
    text_embeds = _check_embeds("text_embeds", text_embeds)
    _check_same_dim("image_embeds", image_embeds, "text_embeds", text_embeds)
    chunk_size = _check_chunk_size(chunk_size)
    num_images, num_texts = image_embeds.shape[0], text_embeds.shape[0]
    i2t_pairs = _positive_pairs("i2t_positives", i2t_positives, num_images, num_texts)
    t2i_pairs = _positive_pairs("t2i_positives", t2i_positives, num_texts, num_images)

    images = _prepare(image_embeds, normalize)
    texts = _prepare(text_embeds, normalize, images.device).to(images.dtype)
    metrics: dict[str, float] = {}
    for direction, queries, gallery, pairs in (
        ("i2t", images, texts, i2t_pairs),
        ("t2i", texts, images, t2i_pairs),
    ):
        for key, value in _map_at_r(queries, gallery, *pairs, chunk_size).items():
            metrics[f"eccv_{direction}_{key}"] = value
    return metrics


def load_extra_positives(path: str | Path) -> list[tuple[Any, int]]:
    """Read extra positive (image, caption) pairs, e.g. ECCV Caption's verified false negatives.

    Format: ``.jsonl`` with one object per line, or ``.json`` holding a list of such objects (or an object with a
    ``"positives"`` list). Each object has ``"image_id"`` (an image id, mapped to a row by the ``image_ids`` of
    :func:`build_positive_sets`, or the image row itself) and ``"caption_index"`` (the caption's row in
    ``text_embeds``)::

        {"image_id": 391895, "caption_index": 17}

    Returns:
        ``[(image_id, caption_index), ...]`` in file order.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Extra positives file not found: {path}")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif suffix == ".json":
        data = json.loads(text)
        records = data.get("positives") if isinstance(data, dict) else data
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of objects (or {{'positives': [...]}}).")
    else:
        raise ValueError(f"Unsupported extra positives file extension {suffix!r} for {path}; accepted: .json, .jsonl.")
    pairs: list[tuple[Any, int]] = []
    for number, record in enumerate(records):
        if not isinstance(record, dict) or "image_id" not in record or "caption_index" not in record:
            available = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(
                f"{path}: record {number} needs keys 'image_id' and 'caption_index'; available: {available}."
            )
        pairs.append((record["image_id"], int(record["caption_index"])))
    return pairs


def build_positive_sets(
    text_to_image: torch.Tensor,
    num_images: int,
    *,
    extra_pairs: Iterable[tuple[Any, int]] = (),
    image_ids: Sequence[Any] | None = None,
) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """Merge the dataset's own positives (``text_to_image``) with extra (image, caption) pairs.

    Args:
        text_to_image: ``[M]`` image row of each caption.
        num_images: number of image rows ``N``.
        extra_pairs: ``(image_id, caption_index)`` pairs, e.g. from :func:`load_extra_positives`.
        image_ids: the id of each image row, used to map ``image_id`` to a row; ``None`` means ids are rows.

    Returns:
        ``(i2t_positives, t2i_positives)`` as sorted-list mappings, ready for :func:`eccv_metrics`.
    """
    num_texts = len(text_to_image)
    text_to_image = _check_index("text_to_image", text_to_image, num_texts, num_images, "number of images")
    row_of = {image_id: row for row, image_id in enumerate(image_ids)} if image_ids is not None else None
    i2t: dict[int, set[int]] = {}
    t2i: dict[int, set[int]] = {}

    def add(image_row: int, caption_row: int) -> None:
        i2t.setdefault(image_row, set()).add(caption_row)
        t2i.setdefault(caption_row, set()).add(image_row)

    for caption_row, image_row in enumerate(text_to_image.tolist()):
        add(image_row, caption_row)
    for image_id, caption_row in extra_pairs:
        if row_of is not None:
            if image_id not in row_of:
                raise ValueError(f"Extra positive image_id {image_id!r} is not in `image_ids`.")
            image_row = row_of[image_id]
        else:
            image_row = int(image_id)
            if not 0 <= image_row < num_images:
                raise ValueError(f"Extra positive image_id {image_id!r} is not an image row in [0, {num_images}).")
        if not 0 <= int(caption_row) < num_texts:
            raise ValueError(f"Extra positive caption_index {caption_row!r} is outside [0, {num_texts}).")
        add(image_row, int(caption_row))
    return (
        {row: sorted(items) for row, items in sorted(i2t.items())},
        {row: sorted(items) for row, items in sorted(t2i.items())},
    )


# --------------------------------------------------------------------------------------------------------------------
# Uni-modal evaluation (CUSA): image retrieval R@K and STS Spearman
# --------------------------------------------------------------------------------------------------------------------


def unimodal_recall_at_k(
    embeds: torch.Tensor,
    labels: torch.Tensor,
    *,
    ks: Sequence[int] = (1,),
    gallery_embeds: torch.Tensor | None = None,
    gallery_labels: torch.Tensor | None = None,
    chunk_size: int = 1024,
    normalize: bool = True,
) -> dict[str, float]:
    """Same-modality retrieval R@K in percent (CUB / SOP / iNaturalist style, or In-Shop with a separate gallery).

    Each query is ranked against all *other* items of the set (itself excluded); it scores at K if an item with its
    label is among the top K. With ``gallery_embeds``/``gallery_labels`` (In-Shop query/gallery split) the queries are
    ranked against the gallery and nothing is excluded. A query with no other item of its label always misses (logged).
    Ties are counted optimistically.

    Returns:
        ``{"r{k}": percent for k in ks}``.
    """
    embeds = _check_embeds("embeds", embeds)
    labels = _check_label_tensor("labels", labels, embeds.shape[0])
    ks = _check_ks(ks)
    chunk_size = _check_chunk_size(chunk_size)
    if (gallery_embeds is None) != (gallery_labels is None):
        raise ValueError("Pass both `gallery_embeds` and `gallery_labels`, or neither.")
    device = embeds.device
    queries = _prepare(embeds, normalize)
    labels = labels.to(device)
    if gallery_embeds is None:
        gallery, gallery_label_t, exclude_self = queries, labels, True
    else:
        gallery_embeds = _check_embeds("gallery_embeds", gallery_embeds)
        _check_same_dim("embeds", embeds, "gallery_embeds", gallery_embeds)
        gallery_label_t = _check_label_tensor("gallery_labels", gallery_labels, gallery_embeds.shape[0]).to(device)
        gallery = _prepare(gallery_embeds, normalize, device).to(queries.dtype)
        exclude_self = False

    def mask(start: int, end: int) -> torch.Tensor:
        return labels[start:end, None] == gallery_label_t[None, :]

    ranks, has_positive = _first_positive_ranks(queries, gallery, mask, chunk_size, exclude_self=exclude_self)
    missing = int((~has_positive).sum())
    if missing:
        logger.warning(
            f"unimodal_recall_at_k: {missing} of {len(ranks)} queries have no positive and count as misses."
        )
    return {f"r{k}": _recall(ranks, k, has_positive) for k in ks}


def unimodal_recall_at_1(
    embeds: torch.Tensor,
    labels: torch.Tensor,
    *,
    gallery_embeds: torch.Tensor | None = None,
    gallery_labels: torch.Tensor | None = None,
    chunk_size: int = 1024,
    normalize: bool = True,
) -> float:
    """Image→image R@1 in percent, self excluded (CUSA Table 3 metric). See :func:`unimodal_recall_at_k`."""
    return unimodal_recall_at_k(
        embeds,
        labels,
        ks=(1,),
        gallery_embeds=gallery_embeds,
        gallery_labels=gallery_labels,
        chunk_size=chunk_size,
        normalize=normalize,
    )["r1"]


def _check_label_tensor(name: str, labels: Any, length: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != length:
        raise ValueError(
            f"`{name}` must be 1-D with {length} entries (one per item), got shape {tuple(labels.shape)}."
        )
    return labels


def sts_spearman(emb1: torch.Tensor, emb2: torch.Tensor, scores: Sequence[float] | torch.Tensor) -> float:
    """Spearman correlation ×100 between the cosine similarities of sentence pairs and gold scores (SentEval style).

    Args:
        emb1: ``[P, D]`` embeddings of the first sentences.
        emb2: ``[P, D]`` embeddings of the second sentences.
        scores: ``[P]`` gold similarity scores.

    Returns:
        ``100 · spearmanr(cos(emb1, emb2), scores)``; NaN (with a scipy warning) when either side is constant.
    """
    from scipy.stats import spearmanr

    emb1 = _check_embeds("emb1", emb1)
    emb2 = _check_embeds("emb2", emb2)
    _check_same_dim("emb1", emb1, "emb2", emb2)
    gold = torch.as_tensor(scores, dtype=torch.float64).flatten().cpu().numpy()
    if not (emb1.shape[0] == emb2.shape[0] == gold.shape[0]):
        raise ValueError(
            f"`emb1`, `emb2` and `scores` must have the same length, got {emb1.shape[0]}, {emb2.shape[0]} and "
            f"{gold.shape[0]}."
        )
    if gold.shape[0] < 2:
        raise ValueError(f"Spearman correlation needs at least 2 pairs, got {gold.shape[0]}.")
    cosine = F.cosine_similarity(emb1.detach().double(), emb2.detach().to(emb1.device).double(), dim=-1)
    return float(100.0 * spearmanr(cosine.cpu().numpy(), gold).statistic)


class StsPairs(NamedTuple):
    """Sentence pairs with gold similarity scores, as returned by :func:`load_sts_pairs`."""

    sentence1: list[str]
    sentence2: list[str]
    scores: list[float]


def load_sts_pairs(
    path_or_name: str | Path,
    *,
    split: str | None = None,
    sentence1_column: str = "sentence1",
    sentence2_column: str = "sentence2",
    score_column: str = "score",
) -> StsPairs:
    """Load STS sentence pairs from a local CSV/TSV/JSON/JSONL file or a Hugging Face Hub dataset.

    A path to an existing file is read locally (``.csv``, ``.tsv`` with a header row; ``.jsonl`` one object per line;
    ``.json`` a list of objects); ``split`` is ignored for files. Anything else is passed to
    ``datasets.load_dataset(path_or_name, split=split or "test")`` (e.g. ``"sentence-transformers/stsb"``).

    Raises:
        ValueError: a required column is missing (the available columns are listed), a score is not a number, or the
            file extension is not supported.
    """
    columns = (sentence1_column, sentence2_column, score_column)
    path = Path(path_or_name)
    if path.is_file():
        if split is not None:
            logger.warning_once(f"load_sts_pairs: `split={split!r}` is ignored for the local file {path}.")
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
                available = list(reader.fieldnames or [])
                records = list(reader)
        elif suffix in (".jsonl", ".json"):
            text = path.read_text(encoding="utf-8")
            if suffix == ".jsonl":
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                records = json.loads(text)
            if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                raise ValueError(f"{path}: expected JSON objects (one per line for .jsonl, a list for .json).")
            available = sorted({key for record in records for key in record})
        else:
            raise ValueError(
                f"Unsupported STS file extension {suffix!r} for {path}; accepted: .csv, .tsv, .json, .jsonl."
            )
        source = str(path)
    else:
        from datasets import load_dataset

        dataset = load_dataset(str(path_or_name), split=split or "test")
        available = list(dataset.column_names)
        source = f"{path_or_name} (split {split or 'test'!r})"
        _require_columns(source, columns, available)
        records = dataset.select_columns(list(columns)).to_list()

    _require_columns(source, columns, available)
    sentence1, sentence2, scores = [], [], []
    for number, record in enumerate(records):
        if any(record.get(column) is None for column in columns):
            missing = [column for column in columns if record.get(column) is None]
            raise ValueError(f"{source}: row {number} has no value for {missing}.")
        try:
            scores.append(float(record[score_column]))
        except (TypeError, ValueError):
            raise ValueError(
                f"{source}: row {number} has a non-numeric {score_column!r}: {record[score_column]!r}."
            ) from None
        sentence1.append(str(record[sentence1_column]))
        sentence2.append(str(record[sentence2_column]))
    return StsPairs(sentence1, sentence2, scores)


def _require_columns(source: str, columns: Sequence[str], available: Sequence[str]) -> None:
    missing = [column for column in columns if column not in available]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; available columns: {list(available)}.")


# --------------------------------------------------------------------------------------------------------------------
# Embedding helper
# --------------------------------------------------------------------------------------------------------------------


def embed_in_chunks(
    encode_fn: Callable[[Sequence[Any]], torch.Tensor],
    items: Sequence[Any],
    batch_size: int,
    *,
    desc: str = "Embedding",
    output_device: str | torch.device | None = None,
    show_progress: bool = True,
) -> torch.Tensor:
    """Encode ``items`` in batches of ``batch_size`` under ``torch.no_grad`` and concatenate the outputs.

    Args:
        encode_fn: maps a slice ``items[i : i + batch_size]`` to a ``[b, D]`` tensor (or array).
        items: a sliceable sequence (list of strings, image paths, a ``datasets.Dataset``...).
        batch_size: items per call.
        desc: tqdm progress-bar label.
        output_device: move each batch output here (e.g. ``"cpu"`` to keep GPU memory flat); ``None`` keeps it.
        show_progress: show the ``tqdm.auto`` progress bar.

    Returns:
        ``[len(items), D]`` tensor.
    """
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    total = len(items)
    if total == 0:
        raise ValueError("`items` is empty; nothing to embed.")
    outputs: list[torch.Tensor] = []
    with torch.no_grad():
        for start in tqdm(range(0, total, batch_size), desc=desc, disable=not show_progress, unit="batch"):
            batch = items[start : start + batch_size]
            output = encode_fn(batch)
            output = torch.as_tensor(output).detach()
            expected = min(batch_size, total - start)
            if output.dim() == 0 or output.shape[0] != expected:
                raise ValueError(
                    f"`encode_fn` returned shape {tuple(output.shape)} for a batch of {expected} items; the first "
                    "dim must equal the batch size."
                )
            outputs.append(output.to(output_device) if output_device is not None else output)
    return torch.cat(outputs, dim=0)
