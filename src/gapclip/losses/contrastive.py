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
    """Row-normalised positive mask: a row with several positives spreads its target mass evenly over them (a row
    with none, e.g. one masked out of :func:`infonce_share`, has no target)."""
    positive_mask = positive_mask.float()
    return positive_mask / positive_mask.sum(dim=1, keepdim=True).clamp_min(1)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-Σ_j targets_ij · log softmax(logits)_ij`` (targets rows sum to 1)."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def infonce_share(
    image_rows: torch.Tensor,
    text_rows: torch.Tensor,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    scale: torch.Tensor | float,
    positive_rows: torch.Tensor,
    normaliser: int | torch.Tensor,
    pair_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Local form of symmetric InfoNCE: the share of some query rows, ``O(b·B)`` memory.

    ``½ [Σ_i CE(s·v_i·Tᵀ, P_i) + Σ_i CE(s·t_i·Vᵀ, P_i)] / normaliser`` over the ``b`` rows ``i`` given (``image_rows``,
    ``text_rows``, ``positive_rows`` = their ``[b, B]`` same-image mask) against all ``B`` columns (``image_embeds``,
    ``text_embeds``); with every row and ``normaliser = B`` it is :meth:`InfoNCELoss.compute_loss_from_logits`.
    Column ``j`` of the caption→image logits is row ``j`` of the image→caption ones, and the same-image relation is
    symmetric, so the caption queries reuse ``positive_rows``.

    ``pair_mask`` (``[b, B]``, symmetric like the positives): only these pairs take part. The others get the dtype's
    minimum logit (softmax weight 0) and are no positives, so a row without a pair adds 0; masking rather than
    indexing reads nothing on the host.
    """
    image_logits = scale * image_rows @ text_embeds.t()
    text_logits = scale * text_rows @ image_embeds.t()
    if pair_mask is not None:
        positive_rows = positive_rows & pair_mask
        fill = torch.finfo(image_logits.dtype).min
        image_logits = image_logits.masked_fill(~pair_mask, fill)
        text_logits = text_logits.masked_fill(~pair_mask, fill)
    targets = soft_positive_targets(positive_rows)
    total = -(targets * F.log_softmax(image_logits, dim=1)).sum() - (targets * F.log_softmax(text_logits, dim=1)).sum()
    return 0.5 * total / normaliser


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
    supports_local_loss: ClassVar[bool] = True
    row_block_shares: ClassVar[bool] = True

    def forward(self, batch: GapBatch) -> torch.Tensor:
        if batch.is_local:
            rows = batch.rows
            return infonce_share(
                batch.image_embeds[rows], batch.text_embeds[rows], batch.image_embeds, batch.text_embeds,
                batch.logit_scale, batch.local_positive_mask, batch.batch_size,
            )
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
    supports_local_loss: ClassVar[bool] = True
    row_block_shares: ClassVar[bool] = True

    def forward(self, batch: GapBatch) -> torch.Tensor:
        if batch.logit_bias is None:
            raise ValueError("base_loss='sigmoid' needs a logit bias; this backbone has none (use 'infonce').")
        # Local form: the rows of this process' images against every caption, still divided by the global B.
        images = batch.image_embeds[batch.rows] if batch.is_local else batch.image_embeds
        logits = batch.logit_scale * images @ batch.text_embeds.t() + batch.logit_bias
        positive = batch.local_positive_mask if batch.is_local else batch.positive_mask
        return self.compute_loss_from_logits(logits, positive, normaliser=batch.batch_size)

    @staticmethod
    def compute_loss_from_logits(
        logits: torch.Tensor, positive_mask: torch.Tensor, *, normaliser: int | None = None
    ) -> torch.Tensor:
        """``[Q, B]`` logits and same-image mask; divided by ``normaliser`` (default: ``Q``, the batch's rows)."""
        labels = 2.0 * positive_mask.float() - 1.0
        return -F.logsigmoid(labels * logits).sum() / (logits.shape[0] if normaliser is None else normaliser)

    def get_config_dict(self) -> dict[str, Any]:
        return {}


class TripletLoss(nn.Module):
    """Hinge triplet ranking loss over in-batch negatives (DIAS Eq. 3; VSE++).

    For a positive pair (V, T) with cosine correlation ``σ(V, T)``:
    ``L = [α − σ(V,T) + σ(V,T⁻)]₊ + [α − σ(V,T) + σ(V⁻,T)]₊``, with negatives taken from the batch (rows
    showing another image):

    - ``mining="hardest"``: the hardest negative per query (VSE++ max violation);
    - ``mining="sum"``: the sum over all negatives;
    - ``mining="distance_weighted"``: one negative per query *sampled* with distance-weighted sampling (Wu et al.
      2017, the sampler DIAS Eq. 3 uses). With ``D`` the embedding dimension and ``δ = ‖a - b‖ = sqrt(2 - 2σ)`` the
      distance of normalised embeddings, a negative is drawn with probability ``∝ min(λ, q(δ)⁻¹)`` where
      ``q(δ) ∝ δ^(D-2) (1 - δ²/4)^((D-3)/2)`` is the density of pairwise distances of points uniform on the unit
      sphere; as in Wu et al., ``δ`` is clipped below at ``distance_cutoff`` (0.5, this plays the role of λ) and
      negatives at ``δ >= nonzero_loss_cutoff`` (1.4) get weight 0 (a query with no such negative samples uniformly
      among its negatives). Weights are normalised in log space. Sampling uses a CPU ``torch.Generator`` seeded
      with ``seed + call_count`` (``call_count`` counts forward calls of this module), so a run is reproducible
      and every process of a data-parallel run draws the same negatives for the (identical) global batch; the count
      is a buffer saved with the model, so a run resumed from a checkpoint draws the negatives the uninterrupted
      run drew. Sampling is not
      differentiable; the gradient flows through the hinge of the sampled negative. Each query draws its negative by
      inverting the cumulative weights at its own uniform number (one ``[B]`` vector for the image queries, then one
      for the caption queries), so the local form (``local_loss``) draws for its rows exactly what the global
      form draws for them.

    Reduction: ``reduction="sum"`` sums the per-query hinge costs over the batch, as the VSE++ and SCAN code does
    (``ContrastiveLoss.forward`` returns ``cost_s.sum() + cost_im.sum()``); DIAS builds on that code, so its weights
    (ω_dim = 10, ω_inter = 0.05, ω_intra = 0.1, Sec. 4.4) are set against the *summed* loss. ``"mean"`` (default)
    divides by the batch size ``N``: the optimum is the same and the scale does not grow with the batch, but every
    gap term then weighs ``N`` times more relative to the base loss than the paper's weights intend (128× at the
    paper's Flickr30K batch). ``recipes/train_clip_dias.py`` uses ``"sum"``.

    References: Ma et al., *Beat the Modality Gap: Dimension Information Alignment and Sparse Spatial
    Constraint for Image-Text Matching* (DIAS), ACM MM 2024, Eq. 3; Faghri et al., VSE++, BMVC 2018.

    Args:
        margin: α, the hinge margin (default 0.2 as in VSE++).
        mining: ``"hardest"``, ``"sum"`` or ``"distance_weighted"``.
        seed: base seed of the distance-weighted sampler (default 0).
        distance_cutoff: lower clip of the distance in distance-weighted sampling (default 0.5, Wu et al.).
        nonzero_loss_cutoff: negatives at this distance or more are not sampled (default 1.4, Wu et al.).
        reduction: ``"mean"`` (default) or ``"sum"`` over the queries of the batch (VSE++/SCAN/DIAS convention).
    """

    name: ClassVar[str] = "triplet"
    citation: ClassVar[str] = VSEPP_CITATION
    supports_local_loss: ClassVar[bool] = True
    MINING: ClassVar[tuple[str, ...]] = ("hardest", "sum", "distance_weighted")
    REDUCTIONS: ClassVar[tuple[str, ...]] = ("mean", "sum")

    def __init__(
        self, margin: float = 0.2, mining: str = "hardest", *, seed: int = 0, distance_cutoff: float = 0.5,
        nonzero_loss_cutoff: float = 1.4, reduction: str = "mean",
    ):
        super().__init__()
        if mining not in self.MINING:
            raise ValueError(f"triplet mining must be one of {list(self.MINING)}, got {mining!r}.")
        if reduction not in self.REDUCTIONS:
            raise ValueError(f"triplet reduction must be one of {list(self.REDUCTIONS)}, got {reduction!r}.")
        if margin < 0:
            raise ValueError(f"triplet margin must be >= 0, got {margin}.")
        if not 0 <= distance_cutoff < nonzero_loss_cutoff:
            raise ValueError(
                f"triplet distance_cutoff must be >= 0 and < nonzero_loss_cutoff, got {distance_cutoff} and "
                f"{nonzero_loss_cutoff}."
            )
        self.margin = margin
        self.mining = mining
        self.seed = seed
        self.distance_cutoff = distance_cutoff
        self.nonzero_loss_cutoff = nonzero_loss_cutoff
        self.reduction = reduction
        if mining == "distance_weighted":  # checkpointed with the model: exact resume of the sampling stream
            self.register_buffer("call_count", torch.zeros((), dtype=torch.long))
        else:
            self.call_count = 0

    @property
    def row_block_shares(self) -> bool:
        """Any block of rows is computed from the gathered batch alone, except with distance-weighted sampling: its
        stream advances at every call, so blocks would draw other negatives than the whole batch."""
        return self.mining != "distance_weighted"

    def forward(self, batch: GapBatch) -> torch.Tensor:
        generator = None
        if self.mining == "distance_weighted":
            generator = torch.Generator().manual_seed(self.seed + int(self.call_count))
            self.call_count += 1
        if batch.is_local:
            return self._local_share(batch, generator)
        scores = batch.image_embeds @ batch.text_embeds.t()
        return self.compute_loss_from_scores(
            scores, batch.positive_mask, embed_dim=batch.image_embeds.shape[1], generator=generator
        )

    def _local_share(self, batch: GapBatch, generator: torch.Generator | None) -> torch.Tensor:
        """The local form: this process' image queries (rows of the score matrix) and caption queries (its columns),
        ``[b, B]`` each; the sum, or the sum divided by the global batch size."""
        rows, size = batch.rows, batch.batch_size
        image_scores = batch.image_embeds[rows] @ batch.text_embeds.t()  # image i vs every caption: row i
        text_scores = batch.text_embeds[rows] @ batch.image_embeds.t()  # caption j vs every image: column j
        own = torch.arange(rows.stop - rows.start, device=image_scores.device)
        matched = batch.local_positive_mask
        cost_text = (self.margin - image_scores[own, own + rows.start][:, None] + image_scores).clamp(min=0)
        cost_image = (self.margin - text_scores[own, own + rows.start][:, None] + text_scores).clamp(min=0)
        cost_text, cost_image = cost_text.masked_fill(matched, 0.0), cost_image.masked_fill(matched, 0.0)
        if self.mining == "hardest":
            per_query = cost_text.max(dim=1).values + cost_image.max(dim=1).values
        elif self.mining == "sum":
            per_query = cost_text.sum(dim=1) + cost_image.sum(dim=1)
        else:
            embed_dim = batch.image_embeds.shape[1]
            # The global form's draws: one uniform per query and direction, for the whole batch.
            text_uniforms, image_uniforms = (torch.rand(size, generator=generator, dtype=torch.float64) for _ in "ti")
            sample = self.sample_distance_weighted
            text_choice = sample(image_scores, ~matched, embed_dim, uniforms=text_uniforms[rows])
            image_choice = sample(text_scores, ~matched, embed_dim, uniforms=image_uniforms[rows])
            per_query = cost_text[own, text_choice] + cost_image[own, image_choice]
        return per_query.sum() if self.reduction == "sum" else per_query.sum() / size

    def compute_loss_from_scores(
        self, scores: torch.Tensor, positive_mask: torch.Tensor, *, embed_dim: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``scores[i, j] = σ(V_i, T_j)`` (cosine); the diagonal holds the positive pairs.

        ``embed_dim`` (the ``D`` of the sphere density) and ``generator`` are used by ``"distance_weighted"`` only
        (``embed_dim`` is required there; without a generator one seeded with ``seed`` is used).
        """
        positive = scores.diagonal()
        cost_text = (self.margin - positive[:, None] + scores).clamp(min=0)  # image i vs negative caption j
        cost_image = (self.margin - positive[None, :] + scores).clamp(min=0)  # caption j vs negative image i
        cost_text = cost_text.masked_fill(positive_mask, 0.0)
        cost_image = cost_image.masked_fill(positive_mask, 0.0)
        if self.mining == "hardest":
            return self._reduce(cost_text.max(dim=1).values + cost_image.max(dim=0).values)
        if self.mining == "distance_weighted":
            if embed_dim is None:
                raise ValueError("triplet mining='distance_weighted' needs embed_dim (the embedding dimension).")
            if generator is None:
                generator = torch.Generator().manual_seed(self.seed)
            negatives = ~positive_mask
            # Image i as query: sample caption j along row i; caption j as query: sample image i along column j.
            text_choice = self.sample_distance_weighted(scores, negatives, embed_dim, generator)
            image_choice = self.sample_distance_weighted(scores.t(), negatives.t(), embed_dim, generator)
            rows = torch.arange(scores.shape[0], device=scores.device)
            cols = torch.arange(scores.shape[1], device=scores.device)
            return self._reduce(cost_text[rows, text_choice] + cost_image[image_choice, cols])
        return self._reduce(cost_text.sum(dim=1) + cost_image.sum(dim=0))

    def _reduce(self, per_query: torch.Tensor) -> torch.Tensor:
        """``[N]`` per-pair costs (image query + caption query of pair i) → the batch loss."""
        return per_query.sum() if self.reduction == "sum" else per_query.mean()

    def distance_weights(self, scores: torch.Tensor, negatives: torch.Tensor, embed_dim: int) -> torch.Tensor:
        """Unnormalised sampling weights ``min(λ, q(δ)⁻¹)`` per query row (Wu et al. 2017, Sec. 4), ``[Q, K]``.

        Rows with no negative below ``nonzero_loss_cutoff`` fall back to uniform weights over their negatives;
        rows with no negative at all are all zero.
        """
        scores = scores.detach().double()
        distance = (2.0 - 2.0 * scores).clamp_min(0.0).sqrt().clamp_min(self.distance_cutoff)
        log_q = (embed_dim - 2.0) * distance.log() + 0.5 * (embed_dim - 3.0) * (1.0 - 0.25 * distance.pow(2)).clamp_min(
            1e-8
        ).log()
        usable = negatives & (distance < self.nonzero_loss_cutoff)
        log_weight = (-log_q).masked_fill(~usable, float("-inf"))
        row_max = log_weight.max(dim=1, keepdim=True).values
        weights = torch.where(usable, (log_weight - row_max.clamp_min(-1e30)).exp(), torch.zeros_like(log_weight))
        fallback = ~usable.any(dim=1, keepdim=True)
        return torch.where(fallback, negatives.double(), weights)

    def sample_distance_weighted(
        self, scores: torch.Tensor, negatives: torch.Tensor, embed_dim: int, generator: torch.Generator | None = None,
        *, uniforms: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One column index per row, drawn from :meth:`distance_weights` (column 0 when the row has no negative).

        Row ``q`` takes the first column whose cumulative weight exceeds ``u_q · Σ weights`` for its uniform number
        ``u_q`` in ``[0, 1)``: ``uniforms`` (``[Q]``), or ``Q`` numbers drawn from ``generator``. A row's draw depends
        only on its own weights and number, so any subset of rows draws what it draws within the whole batch.
        """
        weights = self.distance_weights(scores, negatives, embed_dim)
        if uniforms is None:
            uniforms = torch.rand(weights.shape[0], generator=generator, dtype=torch.float64)
        empty = weights.sum(dim=1) == 0
        weights[empty, 0] = 1.0  # placeholder draw; its cost is 0 since the row has no negative at all
        cumulative = weights.cumsum(dim=1)
        target = uniforms.to(cumulative)[:, None] * cumulative[:, -1:]
        choice = torch.searchsorted(cumulative, target, right=True).clamp_max(weights.shape[1] - 1)
        # u·Σw may round up to Σw: take the row's last column of positive weight then, never a weightless one.
        last = weights.shape[1] - 1 - (weights > 0).flip(dims=[1]).int().argmax(dim=1, keepdim=True)
        choice = torch.where(weights.gather(1, choice) > 0, choice, last)
        return choice.squeeze(1)

    def get_config_dict(self) -> dict[str, Any]:
        config = {"margin": self.margin, "mining": self.mining, "reduction": self.reduction}
        if self.mining == "distance_weighted":
            config.update(
                seed=self.seed, distance_cutoff=self.distance_cutoff, nonzero_loss_cutoff=self.nonzero_loss_cutoff
            )
        return config


BASE_LOSSES: dict[str, type[nn.Module]] = {"infonce": InfoNCELoss, "sigmoid": SigmoidLoss, "triplet": TripletLoss}
