"""Cross-modal retrieval: chunked best-positive ranks, R@K/RSUM/ranks, the COCO 1K folds and the modality gap.

Scores are computed in query chunks of ``chunk_size`` rows against the whole gallery, so peak memory is
``chunk_size × N_gallery`` scores and the full ``N_text × N_image`` similarity matrix is never built. Ties with
negatives are counted optimistically (a query's 0-based rank is the number of negatives scoring strictly higher than
its best positive).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from transformers.utils import logging

from .checks import check_chunk_size, check_embeds, check_index, check_ks, check_same_dim, prepare

logger = logging.get_logger(__name__)


@torch.no_grad()
def best_positive_ranks(
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


def recall_at(ranks: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> float:
    hits = ranks < k
    if valid is not None:
        hits = hits & valid
    return 100.0 * hits.double().mean().item()


def median_rank(ranks: torch.Tensor) -> float:
    # As in the VSE++/SCAN evaluation code: floor(median(0-based ranks)) + 1.
    return float(np.floor(np.median(ranks.cpu().numpy())) + 1)


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
    image_embeds = check_embeds("image_embeds", image_embeds)
    text_embeds = check_embeds("text_embeds", text_embeds)
    check_same_dim("image_embeds", image_embeds, "text_embeds", text_embeds)
    num_images, num_texts = image_embeds.shape[0], text_embeds.shape[0]
    text_to_image = check_index("text_to_image", text_to_image, num_texts, num_images, "number of images")
    chunk_size = check_chunk_size(chunk_size)

    device = image_embeds.device
    images = prepare(image_embeds, normalize)
    texts = prepare(text_embeds, normalize, device).to(images.dtype)
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

    i2t_ranks, _ = best_positive_ranks(images, texts, i2t_mask, chunk_size)
    t2i_ranks, _ = best_positive_ranks(texts, images, t2i_mask, chunk_size)
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
    ks = check_ks(ks)
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
            metrics[f"{direction}_r{k}"] = recall_at(ranks, k)
    metrics["rsum"] = sum(metrics[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks)
    metrics["i2t_medr"] = median_rank(i2t_ranks)
    metrics["t2i_medr"] = median_rank(t2i_ranks)
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
    image_embeds = check_embeds("image_embeds", image_embeds)
    text_embeds = check_embeds("text_embeds", text_embeds)
    num_images = image_embeds.shape[0]
    text_to_image = check_index(
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
    image_embeds = check_embeds("image_embeds", image_embeds)
    text_embeds = check_embeds("text_embeds", text_embeds)
    check_same_dim("image_embeds", image_embeds, "text_embeds", text_embeds)
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
        text_to_image = check_index("text_to_image", text_to_image, num_texts, num_images, "number of images")
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

    images = prepare(image_embeds[image_rows], normalize=True).double()
    texts = prepare(text_embeds.to(device)[text_rows], normalize=True).double()
    return torch.linalg.vector_norm(images.mean(dim=0) - texts.mean(dim=0)).item()
