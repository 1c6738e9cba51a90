"""Base losses: symmetric InfoNCE (CLIP), pairwise sigmoid (SigLIP) and the hinge triplet loss (VSE++/DIAS).

Exactly one base loss is active in a model (``GapClipConfig.base_loss``); the gap terms are added on top of it.
All three share the :class:`~gapclip.losses.base.GapBatch` input and treat rows that show the same image as
positives of each other.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import GapBatch

CLIP_CITATION = """@inproceedings{radford2021clip,
  title={Learning Transferable Visual Models From Natural Language Supervision},
  author={Radford, Alec and Kim, Jong Wook and Hallacy, Chris and others},
  booktitle={ICML}, year={2021}
}"""
SIGLIP_CITATION = """@inproceedings{zhai2023siglip,
  title={Sigmoid Loss for Language Image Pre-Training},
  author={Zhai, Xiaohua and Mustafa, Basil and Kolesnikov, Alexander and Beyer, Lucas},
  booktitle={ICCV}, year={2023}
}"""
VSEPP_CITATION = """@inproceedings{faghri2018vsepp,
  title={VSE++: Improving Visual-Semantic Embeddings with Hard Negatives},
  author={Faghri, Fartash and Fleet, David J and Kiros, Jamie Ryan and Fidler, Sanja},
  booktitle={BMVC}, year={2018}
}"""


def soft_positive_targets(positive_mask: torch.Tensor) -> torch.Tensor:
    """Row-normalised positive mask: a row with several positives spreads its target mass evenly over them."""
    positive_mask = positive_mask.float()
    return positive_mask / positive_mask.sum(dim=1, keepdim=True)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-Σ_j targets_ij · log softmax(logits)_ij`` (targets rows sum to 1)."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE over in-batch negatives (CLIP), with a learnable logit scale.

    ``L = ½ [CE(s·I·Tᵀ, P) + CE(s·T·Iᵀ, Pᵀ)]`` where ``s = exp(logit_scale) = 1/temperature`` (clamped at 100 by
    the model, as in CLIP) and ``P`` is the row-normalised same-image mask; with one caption per image in the
    batch ``P`` is the identity and this is exactly CLIP's loss.

    References: Radford et al., *Learning Transferable Visual Models From Natural Language Supervision*, ICML
    2021 (arXiv:2103.00020), Sec. 2.3.

    Inputs: a :class:`GapBatch` with normalised ``image_embeds``/``text_embeds`` ``[B, D]``, ``logit_scale``.

    Relations: :class:`SigmoidLoss` (SigLIP's pairwise alternative), :class:`TripletLoss` (hinge, DIAS Eq. 3).

    Example::

        >>> loss = InfoNCELoss()
        >>> batch = GapBatch(image_embeds=F.normalize(torch.randn(4, 8), dim=-1),
        ...                  text_embeds=F.normalize(torch.randn(4, 8), dim=-1), logit_scale=torch.tensor(10.0))
        >>> loss(batch).shape
        torch.Size([])
    """

    name: ClassVar[str] = "infonce"
    citation: ClassVar[str] = CLIP_CITATION

    def forward(self, batch: GapBatch) -> torch.Tensor:
        logits_per_image = batch.logit_scale * batch.image_embeds @ batch.text_embeds.t()
        return self.compute_loss_from_logits(logits_per_image, batch.positive_mask)

    @staticmethod
    def compute_loss_from_logits(logits_per_image: torch.Tensor, positive_mask: torch.Tensor) -> torch.Tensor:
        targets = soft_positive_targets(positive_mask)
        return 0.5 * (soft_cross_entropy(logits_per_image, targets) + soft_cross_entropy(logits_per_image.t(), targets))

    def get_config_dict(self) -> dict[str, Any]:
        return {}


class SigmoidLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss with a learnable scale and bias.

    ``L = -(1/B) Σ_ij log σ(z_ij · (s·I_i·T_j + b))`` with ``z_ij = +1`` when row i and column j show the same
    image and ``-1`` otherwise.

    References: Zhai et al., *Sigmoid Loss for Language Image Pre-Training*, ICCV 2023 (arXiv:2303.15343), Sec. 3.

    Inputs: a :class:`GapBatch` with ``logit_scale`` and ``logit_bias`` (required).

    Relations: :class:`InfoNCELoss`.
    """

    name: ClassVar[str] = "sigmoid"
    citation: ClassVar[str] = SIGLIP_CITATION

    def forward(self, batch: GapBatch) -> torch.Tensor:
        if batch.logit_bias is None:
            raise ValueError("base_loss='sigmoid' needs a logit bias; this backbone has none (use 'infonce').")
        logits = batch.logit_scale * batch.image_embeds @ batch.text_embeds.t() + batch.logit_bias
        return self.compute_loss_from_logits(logits, batch.positive_mask)

    @staticmethod
    def compute_loss_from_logits(logits: torch.Tensor, positive_mask: torch.Tensor) -> torch.Tensor:
        labels = 2.0 * positive_mask.float() - 1.0
        return -F.logsigmoid(labels * logits).sum() / logits.shape[0]

    def get_config_dict(self) -> dict[str, Any]:
        return {}


class TripletLoss(nn.Module):
    """Hinge triplet ranking loss over in-batch negatives (DIAS Eq. 3; VSE++).

    For a positive pair (V, T) with cosine correlation ``σ(V, T)``:
    ``L = [α − σ(V,T) + σ(V,T⁻)]₊ + [α − σ(V,T) + σ(V⁻,T)]₊``, with negatives taken from the batch (rows
    showing another image):

    - ``mining="hardest"``: the hardest negative per query (VSE++ max violation);
    - ``mining="sum"``: the sum over all negatives.

    Our reading: the per-pair losses are *averaged* over the batch (VSE++ sums them); the optimum is the same
    and the scale does not grow with the batch size when gap terms are added.

    References: Ma et al., *Beat the Modality Gap: Dimension Information Alignment and Sparse Spatial
    Constraint for Image-Text Matching* (DIAS), ACM MM 2024, Eq. 3; Faghri et al., VSE++, BMVC 2018.

    Args:
        margin: α, the hinge margin (default 0.2 as in VSE++).
        mining: ``"hardest"`` or ``"sum"``.
    """

    name: ClassVar[str] = "triplet"
    citation: ClassVar[str] = VSEPP_CITATION
    MINING: ClassVar[tuple[str, ...]] = ("hardest", "sum")

    def __init__(self, margin: float = 0.2, mining: str = "hardest"):
        super().__init__()
        if mining not in self.MINING:
            raise ValueError(f"triplet mining must be one of {list(self.MINING)}, got {mining!r}.")
        if margin < 0:
            raise ValueError(f"triplet margin must be >= 0, got {margin}.")
        self.margin = margin
        self.mining = mining

    def forward(self, batch: GapBatch) -> torch.Tensor:
        scores = batch.image_embeds @ batch.text_embeds.t()
        return self.compute_loss_from_scores(scores, batch.positive_mask)

    def compute_loss_from_scores(self, scores: torch.Tensor, positive_mask: torch.Tensor) -> torch.Tensor:
        """``scores[i, j] = σ(V_i, T_j)``; the diagonal holds the positive pairs."""
        positive = scores.diagonal()
        cost_text = (self.margin - positive[:, None] + scores).clamp(min=0)  # image i vs negative caption j
        cost_image = (self.margin - positive[None, :] + scores).clamp(min=0)  # caption j vs negative image i
        cost_text = cost_text.masked_fill(positive_mask, 0.0)
        cost_image = cost_image.masked_fill(positive_mask, 0.0)
        if self.mining == "hardest":
            return (cost_text.max(dim=1).values + cost_image.max(dim=0).values).mean()
        return (cost_text.sum(dim=1) + cost_image.sum(dim=0)).mean()

    def get_config_dict(self) -> dict[str, Any]:
        return {"margin": self.margin, "mining": self.mining}


BASE_LOSSES: dict[str, type[nn.Module]] = {"infonce": InfoNCELoss, "sigmoid": SigmoidLoss, "triplet": TripletLoss}
