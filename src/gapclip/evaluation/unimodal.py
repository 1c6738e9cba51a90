"""Uni-modal evaluation (as CUSA reports it): same-modality image retrieval R@K and STS Spearman of the text tower.

References: Huang et al., *Cross-Modal and Uni-Modal Soft-Label Alignment for Image-Text Retrieval*, AAAI 2024.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers.utils import logging

from .checks import check_chunk_size, check_embeds, check_ks, check_label_tensor, check_same_dim, prepare
from .retrieval import best_positive_ranks, recall_at

logger = logging.get_logger(__name__)


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
    embeds = check_embeds("embeds", embeds)
    labels = check_label_tensor("labels", labels, embeds.shape[0])
    ks = check_ks(ks)
    chunk_size = check_chunk_size(chunk_size)
    if (gallery_embeds is None) != (gallery_labels is None):
        raise ValueError("Pass both `gallery_embeds` and `gallery_labels`, or neither.")
    device = embeds.device
    queries = prepare(embeds, normalize)
    labels = labels.to(device)
    if gallery_embeds is None:
        gallery, gallery_label_t, exclude_self = queries, labels, True
    else:
        gallery_embeds = check_embeds("gallery_embeds", gallery_embeds)
        check_same_dim("embeds", embeds, "gallery_embeds", gallery_embeds)
        gallery_label_t = check_label_tensor("gallery_labels", gallery_labels, gallery_embeds.shape[0]).to(device)
        gallery = prepare(gallery_embeds, normalize, device).to(queries.dtype)
        exclude_self = False

    def mask(start: int, end: int) -> torch.Tensor:
        return labels[start:end, None] == gallery_label_t[None, :]

    ranks, has_positive = best_positive_ranks(queries, gallery, mask, chunk_size, exclude_self=exclude_self)
    missing = int((~has_positive).sum())
    if missing:
        logger.warning(
            f"unimodal_recall_at_k: {missing} of {len(ranks)} queries have no positive and count as misses."
        )
    return {f"r{k}": recall_at(ranks, k, has_positive) for k in ks}


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

    emb1 = check_embeds("emb1", emb1)
    emb2 = check_embeds("emb2", emb2)
    check_same_dim("emb1", emb1, "emb2", emb2)
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
