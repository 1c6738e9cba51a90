"""ECCV Caption metrics (Chun et al., ECCV 2022, arXiv:2204.03359): mAP@R, R-Precision and R@1 with extra positives.

The extra positive pairs (ECCV Caption's machine-and-human-verified false negatives) are read from a file by
:func:`gapclip.data.load_extra_positives`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .checks import check_chunk_size, check_embeds, check_index, check_same_dim, prepare

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
    image_embeds = check_embeds("image_embeds", image_embeds)
    text_embeds = check_embeds("text_embeds", text_embeds)
    check_same_dim("image_embeds", image_embeds, "text_embeds", text_embeds)
    chunk_size = check_chunk_size(chunk_size)
    num_images, num_texts = image_embeds.shape[0], text_embeds.shape[0]
    i2t_pairs = _positive_pairs("i2t_positives", i2t_positives, num_images, num_texts)
    t2i_pairs = _positive_pairs("t2i_positives", t2i_positives, num_texts, num_images)

    images = prepare(image_embeds, normalize)
    texts = prepare(text_embeds, normalize, images.device).to(images.dtype)
    metrics: dict[str, float] = {}
    for direction, queries, gallery, pairs in (
        ("i2t", images, texts, i2t_pairs),
        ("t2i", texts, images, t2i_pairs),
    ):
        for key, value in _map_at_r(queries, gallery, *pairs, chunk_size).items():
            metrics[f"eccv_{direction}_{key}"] = value
    return metrics


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
    text_to_image = check_index("text_to_image", text_to_image, num_texts, num_images, "number of images")
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
