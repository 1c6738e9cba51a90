"""DIAS gap terms: dimension information alignment (``dias_dim``) and the sparse inter-/intra-modality spatial
constraints (``dias_inter``, ``dias_intra``).

Paper: Ma, Li, Fang, Zhang, *Bridging the Modality Gap: Dimension Information Alignment and Sparse Spatial
Constraint for Image-Text Matching*, ACM MM 2024 (DOI 10.1145/3664647.3681424), Sec. 3.2-3.5, Eq. 4-17. The
authors' repository holds no code, so every choice the paper leaves open is marked "Our reading" below. All
correlations are cosine similarities (Sec. 4.1). The paper's objective (Eq. 17) is
``L = L_loc + ω_dim·L_dim + ω_inter·L_inter + ω_intra·L_intra`` with ``ω_dim = 10``, ``ω_inter = 0.05``,
``ω_intra = 0.1`` (Sec. 4.4, Fig. 7); in gapclip ``L_loc`` is ``base_loss="triplet"`` (Eq. 3, with
``triplet_mining="distance_weighted"`` as the paper uses) and the ω are the terms' ``weight`` in the config::

    GapClipConfig(backbone_config, base_loss="triplet", triplet_mining="distance_weighted", gap_terms=[
        {"name": "dias_dim", "weight": 10.0},
        {"name": "dias_inter", "weight": 0.05},
        {"name": "dias_intra", "weight": 0.1},
    ])

The batch the terms see is the *global* batch (gathered over processes, rows in rank order). Under ``local_loss``
every term computes only what its process' rows need: ``dias_dim`` sums its own pairs' contributions to the
``d × d`` correlation and adds the sums over processes (one all-reduce with gradients, no local feature gathered);
``dias_inter``/``dias_intra`` compute their ``[b, B]`` rows of the difference matrix, and the column statistics of
the sparse mask, which would need whole columns, are the row statistics of the other processes (``|d|`` and the
unmatched pairs are symmetric), gathered as ``B`` numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from torch import nn
from transformers.utils import logging

from ..distributed import all_reduce_with_grad, distributed_info, gather_features
from .base import GapBatch, GapTerm, register_term

logger = logging.get_logger(__name__)

DIAS_CITATION = """@inproceedings{ma2024dias,
  title={Bridging the Modality Gap: Dimension Information Alignment and Sparse Spatial Constraint for Image-Text Matching},
  author={Ma, Xiang and Li, Xuemei and Fang, Lexin and Zhang, Caiming},
  booktitle={Proceedings of the 32nd ACM International Conference on Multimedia (MM '24)},
  year={2024},
  doi={10.1145/3664647.3681424}
}"""

_EPS = 1e-8


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs (bf16/fp16 training) are computed in float32: ratios, sigmoids and std need it."""
    return tensor.float() if tensor.is_floating_point() and tensor.element_size() < 4 else tensor


Aggregation = Literal["region_word", "pair_mean"]
CorrelationTransform = Literal["shift", "none"]
SparseMask = Literal["straight_through", "soft", "hard"]
Selection = Literal["dependency", "difference"]


# ---------------------------------------------------------------------------------------------- L_dim (Eq. 4-6)
def dimension_correlation(
    patch_embeds: torch.Tensor,
    patch_mask: torch.Tensor,
    token_embeds: torch.Tensor,
    token_mask: torch.Tensor,
    aggregation: str = "region_word",
) -> torch.Tensor:
    """The ``d × d`` cosine correlation matrix ``C`` of Eq. 4 between image and text dimension vectors.

    ``m_i^V`` holds dimension ``i`` of every valid patch of the batch (``N_v`` entries), ``m_j^T`` dimension ``j``
    of every valid word (``N_t`` entries). A cosine needs a common index, and patches and words of a batch share
    none directly, so (our reading):

    - ``aggregation="region_word"`` (default): the common index is the set of region-word interactions the paper's
      Eq. 1 computes, i.e. every (patch p, word w) of the *same* image-text pair n. ``m_i^V`` is expanded to
      ``v[n, p, i]`` repeated over the pair's words and ``m_j^T`` to ``t[n, w, j]`` repeated over its patches, so

      ``c_ij = Σ_n (Σ_p v_npi)(Σ_w t_nwj) / sqrt(Σ_n W_n Σ_p v_npi²) / sqrt(Σ_n P_n Σ_w t_nwj²)``

      (``P_n``/``W_n`` valid patches/words of pair n). Every valid local embedding enters individually, the cost
      is ``O(B·(P+L)·d + B·d²)``, and with one patch and one word per pair it is exactly the plain cosine of
      ``N_v = N_t = N`` long vectors.
    - ``aggregation="pair_mean"``: the common index is the pair: each dimension vector is averaged over the pair's
      valid locals first (``N``-long vectors), then the cosine is taken.

    Invalid positions (``mask`` False: padding, special tokens) never enter; their values may be anything,
    including non-finite. Pairs without a valid patch or word contribute nothing.

    Args:
        patch_embeds: ``[B, P, d]``; patch_mask: ``[B, P]`` bool.
        token_embeds: ``[B, L, d]``; token_mask: ``[B, L]`` bool.
        aggregation: ``"region_word"`` or ``"pair_mean"``.

    Returns:
        ``[d, d]`` with ``C[i, j] = σ_c(m_i^V, m_j^T)``.
    """
    return correlation_from_sums(
        *dimension_correlation_sums(patch_embeds, patch_mask, token_embeds, token_mask, aggregation)
    )


def correlation_from_sums(
    inner: torch.Tensor, image_squares: torch.Tensor, text_squares: torch.Tensor
) -> torch.Tensor:
    """``C[i, j] = inner[i, j] / (‖m_i^V‖ ‖m_j^T‖)`` from :func:`dimension_correlation_sums` (norms kept >= 1e-8)."""
    norm_v = image_squares.clamp_min(_EPS**2).sqrt()
    norm_t = text_squares.clamp_min(_EPS**2).sqrt()
    return inner / (norm_v[:, None] * norm_t[None, :])


def dimension_correlation_sums(
    patch_embeds: torch.Tensor,
    patch_mask: torch.Tensor,
    token_embeds: torch.Tensor,
    token_mask: torch.Tensor,
    aggregation: str = "region_word",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sums over pairs that :func:`dimension_correlation` divides: ``(⟨m_i^V, m_j^T⟩ [d, d], ‖m_i^V‖² [d],
    ‖m_j^T‖² [d])``. Each is a sum over the batch's pairs, so the sums of disjoint parts of a batch (the processes of
    a data-parallel run) add up to the whole batch's."""
    patch_mask = patch_mask.bool()
    token_mask = token_mask.bool()
    v = torch.where(patch_mask[..., None], patch_embeds, patch_embeds.new_zeros(()))
    t = torch.where(token_mask[..., None], token_embeds, token_embeds.new_zeros(()))
    num_patches = patch_mask.sum(dim=1).to(v.dtype)  # P_n
    num_words = token_mask.sum(dim=1).to(t.dtype)  # W_n
    sum_v, sum_t = v.sum(dim=1), t.sum(dim=1)  # [B, d]
    if aggregation == "region_word":
        inner = sum_v.t() @ sum_t  # [d, d]
        squares_v = (num_words[:, None] * v.pow(2).sum(dim=1)).sum(dim=0)
        squares_t = (num_patches[:, None] * t.pow(2).sum(dim=1)).sum(dim=0)
        return inner, squares_v, squares_t
    if aggregation == "pair_mean":
        both = (num_patches > 0) & (num_words > 0)
        mean_v = (sum_v / num_patches.clamp_min(1)[:, None])[both]
        mean_t = (sum_t / num_words.clamp_min(1)[:, None])[both]
        return mean_v.t() @ mean_t, mean_v.pow(2).sum(dim=0), mean_t.pow(2).sum(dim=0)
    raise ValueError(f"aggregation must be 'region_word' or 'pair_mean', got {aggregation!r}.")


def dimension_alignment_loss(correlation: torch.Tensor, correlation_transform: str = "shift") -> torch.Tensor:
    """Eq. 6: ``L_dim = -Σ_i (c_ii / Σ_j c_ij + c_ii / Σ_j c_ji)``.

    Eq. 6 reads the correlations as proportions of a row/column sum, which needs non-negative ``c``; cosines lie in
    ``[-1, 1]`` and a row sum near 0 makes the ratio explode. Our reading: ``correlation_transform="shift"``
    (default) uses ``c' = (1 + c) / 2 ∈ [0, 1]`` (monotone, so raising ``c_ii`` and lowering ``c_ij`` is still what
    lowers the loss; ``L_dim ∈ [-2d, 0]``, about ``-2`` for unrelated dimensions); ``"none"`` is the literal
    formula on the raw cosines (denominators kept at least ``1e-8`` away from 0, sign preserved).
    """
    if correlation_transform == "shift":
        c = 0.5 * (1.0 + correlation)
    elif correlation_transform == "none":
        c = correlation
    else:
        raise ValueError(f"correlation_transform must be 'shift' or 'none', got {correlation_transform!r}.")

    def guard(denominator: torch.Tensor) -> torch.Tensor:
        sign = torch.where(denominator >= 0, 1.0, -1.0).to(denominator.dtype)
        return sign * denominator.abs().clamp_min(_EPS)

    diagonal = c.diagonal()
    return -(diagonal / guard(c.sum(dim=1)) + diagonal / guard(c.sum(dim=0))).sum()


@register_term
class DimensionAlignmentLoss(GapTerm):
    """DIAS dimension information alignment ``L_dim`` (Eq. 4-6): align dimension i of the image and text local
    embeddings, decorrelate dimension i from dimension j ≠ i.

    ``C = [σ_c(m_i^V, m_j^T)]_{i,j ≤ d}`` (Eq. 4, cosine) over the dimension vectors of all valid local embeddings of
    the global batch (patch tokens ``N_v``, word tokens ``N_t``; padding and special tokens never enter), and
    ``L_dim = -Σ_i (c_ii / Σ_j c_ij + c_ii / Σ_j c_ji)`` (Eq. 6).

    Our reading (the paper leaves it open): dimension vectors of different lengths ``N_v ≠ N_t`` are compared over
    the region-word interactions of matched pairs (every patch p and word w of the same pair n is one coordinate),
    see :func:`dimension_correlation`; correlations are shifted to ``[0, 1]`` before the ratios of Eq. 6, see
    :func:`dimension_alignment_loss`. Local features are the backbone's projected patch/word tokens (gapclip has no
    region detector); they are used unnormalised, as produced.

    Same-image rows: L_dim compares dimensions, not instances, so it has no positives or negatives; a repeated image
    simply contributes its patches once per row.

    Recommended weight: ω_dim = 10 (Sec. 4.4, Fig. 7).

    Args:
        aggregation: the common index of the dimension vectors: region_word (every patch-word pair of a matched
            pair) or pair_mean (average each pair's locals first).
        correlation_transform: shift (``(1+c)/2`` before Eq. 6's ratios) or none (literal Eq. 6 on raw cosines).

    Inputs:
        ``batch.patch_embeds [B, P, d]`` + ``patch_mask [B, P]``, ``batch.token_embeds [B, L, d]`` +
        ``token_mask [B, L]`` (``requires = {"local"}`` makes the model compute them). Returns a scalar.

    Relations: :class:`InterSpatialLoss`, :class:`IntraSpatialLoss` (the other DIAS terms); LG-MGC's ``lsc`` also
    reads local tokens.

    Example::

        >>> config = GapClipConfig(backbone_config, base_loss="triplet",
        ...                        gap_terms=[{"name": "dias_dim", "weight": 10.0}])
        >>> outputs = GapClipModel(config)(**batch, return_loss=True)
        >>> outputs.loss_terms["dias_dim"]
    """

    name: ClassVar[str] = "dias_dim"
    requires: ClassVar[frozenset[str]] = frozenset({"local"})
    citation: ClassVar[str] = DIAS_CITATION
    supports_local_loss: ClassVar[bool] = True

    def __init__(
        self,
        embed_dim: int,
        *,
        aggregation: Aggregation = "region_word",
        correlation_transform: CorrelationTransform = "shift",
    ):
        super().__init__(embed_dim)
        self.aggregation = aggregation
        self.correlation_transform = correlation_transform

    def forward(self, batch: GapBatch) -> torch.Tensor:
        if batch.patch_embeds is None or batch.token_embeds is None:
            raise ValueError(
                "Gap term 'dias_dim' needs local features (batch.patch_embeds/token_embeds); the model computes them "
                "when a term requires 'local'."
            )
        return self.compute_loss_from_locals(
            batch.patch_embeds, batch.patch_mask, batch.token_embeds, batch.token_mask,
            sum_over_processes=batch.is_local,
        )

    def compute_loss_from_locals(
        self, patch_embeds: torch.Tensor, patch_mask: torch.Tensor | None, token_embeds: torch.Tensor,
        token_mask: torch.Tensor | None, *, sum_over_processes: bool = False,
    ) -> torch.Tensor:
        """``L_dim`` of the given pairs; ``sum_over_processes`` (the local form): of the pairs of every process.

        ``C`` is a ratio of sums over the batch, not a sum of per-pair terms, so the local form adds up each process'
        sums (:func:`dimension_correlation_sums`, one differentiable all-reduce of ``d² + 2d`` numbers) and every
        process computes the same ``L_dim`` from them; its share is ``L_dim / W``.
        """
        if patch_mask is None:
            patch_mask = torch.ones(patch_embeds.shape[:2], dtype=torch.bool, device=patch_embeds.device)
        if token_mask is None:
            token_mask = torch.ones(token_embeds.shape[:2], dtype=torch.bool, device=token_embeds.device)
        patch_embeds, token_embeds = _upcast(patch_embeds), _upcast(token_embeds)
        sums = dimension_correlation_sums(patch_embeds, patch_mask, token_embeds, token_mask, self.aggregation)
        world_size = distributed_info()[1] if sum_over_processes else 1
        if world_size > 1:
            dim = sums[1].shape[0]
            flat = all_reduce_with_grad(torch.cat([sum_.reshape(-1) for sum_ in sums]))
            sums = flat[: dim * dim].view(dim, dim), flat[dim * dim : dim * dim + dim], flat[dim * dim + dim :]
        loss = dimension_alignment_loss(correlation_from_sums(*sums), self.correlation_transform)
        return loss / world_size


# ------------------------------------------------------------------------------ sparse correlation (Eq. 11-14)
def sparse_correlation_mask(
    difference: torch.Tensor,
    unmatched: torch.Tensor,
    beta_row: torch.Tensor,
    beta_col: torch.Tensor,
    mask: str = "straight_through",
    temperature: float = 0.5,
    selection: str = "dependency",
    column_statistics: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """The sparse selection ``B`` of Eq. 11-14 for a spatial difference matrix (``X - Xᵀ`` or ``Y - Z``).

    Dependencies ``p_ij = sigmoid(-|difference_ij|)`` (Eq. 11). For row i, ``μ_i``/``θ_i`` are the mean and the
    (population) standard deviation of ``p_i·`` over the row's *unmatched* entries; likewise per column for the
    text side. Soft thresholds ``κ_i^V = μ_i + β_i^V θ_i`` (Eq. 12) and ``κ_j^T = μ_j + β_j^T θ_j``.

    Which quantity is compared with κ (``selection``):

    - ``"dependency"`` (default, our reading): κ is built from the dependencies p, so the comparison is made on p,
      and the paper's selected "strong correlations" are those with a *high* dependency: ``b_ij = 1`` iff
      ``p_ij > max(κ_i^V, κ_j^T)`` (equivalently ``|d_ij| < -logit(max(κ_i^V, κ_j^T))``: nearly symmetric pairs are
      kept, strongly asymmetric ones, where the symmetry assumption fails, are dropped).
    - ``"difference"`` (the printed Eq. 14): ``b_ij = 1`` iff ``|d_ij| > max(κ_i^V, κ_j^T)``, the raw spatial
      difference against thresholds on the dependency scale (κ ∈ [0, 0.5]): strongly *asymmetric* pairs are kept.
      The two readings select nearly complementary sets; the study runs both.

    Matched pairs (diagonal and rows showing the same image) are never selected and never enter μ, θ.

    How β learns (a hard mask has no gradient w.r.t. β): with ``q`` the compared quantity (``p`` or ``|d|``) and
    ``z_ij = (q_ij - μ_i)/θ_i`` the hard test is ``z_ij > β_i``; its relaxation is
    ``s_ij = sigmoid((z_ij - β_i^V)/τ) · sigmoid((z'_ij - β_j^T)/τ)`` (the product relaxes the AND of the two
    thresholds, τ = ``temperature``). q, μ, θ enter the mask detached, so the embeddings receive exactly the paper's
    gradient through ``b_ij (d_ij)²`` and only β learns through the mask.

    - ``mask="straight_through"`` (default): forward uses the hard ``b`` (the paper's values), backward the
      gradient of ``s`` (straight-through estimator);
    - ``mask="soft"``: ``s`` in forward and backward;
    - ``mask="hard"``: the hard mask, β gets no gradient (a fixed sparsity hyper-parameter).

    Args:
        difference: ``[N, N]`` signed spatial differences.
        unmatched: ``[N, N]`` bool, pairs showing different images.
        beta_row / beta_col: ``[N]`` β^V (rows) / β^T (columns).
        selection: ``"dependency"`` (compare p with κ) or ``"difference"`` (compare ``|d|`` with κ, as printed).
        column_statistics: for a block of rows ``[b, N]`` of a matrix (the local form): ``(μ, θ)`` of the rows
            given → ``(μ, θ)`` of the ``N`` columns. Default: taken over the columns of ``difference`` itself.

    Returns:
        ``[N, N]`` (or ``[b, N]``) float mask (values in {0, 1} in forward unless ``mask="soft"``).
    """
    with torch.no_grad():
        p = torch.sigmoid(-difference.detach().abs())
        weights = unmatched.to(p.dtype)

        def stats(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
            count = weights.sum(dim=dim).clamp_min(1.0)
            mean = (p * weights).sum(dim=dim) / count
            centred = p - (mean[:, None] if dim == 1 else mean[None, :])
            std = ((centred.pow(2) * weights).sum(dim=dim) / count).sqrt()
            return mean, std

        mu_row, theta_row = stats(1)
        mu_col, theta_col = stats(0) if column_statistics is None else column_statistics(mu_row, theta_row)
    beta_row = beta_row.to(p.dtype)
    beta_col = beta_col.to(p.dtype)
    kappa_row = mu_row + beta_row.detach() * theta_row  # Eq. 12
    kappa_col = mu_col + beta_col.detach() * theta_col
    if selection == "dependency":
        compared = p
    elif selection == "difference":
        compared = difference.detach().abs().to(p.dtype)
    else:
        raise ValueError(f"selection must be 'dependency' or 'difference', got {selection!r}.")
    hard = ((compared > kappa_row[:, None]) & (compared > kappa_col[None, :]) & unmatched).to(p.dtype)  # Eq. 14
    if mask == "hard":
        return hard
    z_row = (compared - mu_row[:, None]) / theta_row.clamp_min(_EPS)[:, None]
    z_col = (compared - mu_col[None, :]) / theta_col.clamp_min(_EPS)[None, :]
    soft = (
        torch.sigmoid((z_row - beta_row[:, None]) / temperature)
        * torch.sigmoid((z_col - beta_col[None, :]) / temperature)
        * weights
    )
    if mask == "soft":
        return soft
    if mask == "straight_through":
        return hard + (soft - soft.detach())
    raise ValueError(f"mask must be 'straight_through', 'soft' or 'hard', got {mask!r}.")


class _SparseSpatialTerm(GapTerm):
    """Shared machinery of ``dias_inter``/``dias_intra``: ``Σ_ij b_ij (difference_ij)²`` with learnable β slots."""

    citation: ClassVar[str] = DIAS_CITATION
    supports_local_loss: ClassVar[bool] = True

    def __init__(
        self,
        embed_dim: int,
        *,
        sparse: bool = True,
        max_batch_size: int = 512,
        beta_init: float = 0.0,
        mask: SparseMask = "straight_through",
        temperature: float = 0.5,
        reduction: Literal["sum", "mean"] = "sum",
        selection: Selection = "dependency",
    ):
        super().__init__(embed_dim)
        if max_batch_size < 2:
            raise ValueError(f"{self.name} option 'max_batch_size' must be an int >= 2, got {max_batch_size!r}.")
        if not temperature > 0:
            raise ValueError(f"{self.name} option 'temperature' must be > 0, got {temperature!r}.")
        self.sparse, self.max_batch_size, self.beta_init = sparse, max_batch_size, beta_init
        self.mask, self.temperature, self.reduction, self.selection = mask, temperature, reduction, selection
        # One β per instance slot (= row index within the global batch), image side (rows) and text side (columns).
        # β is learnable only when it can get a gradient (sparse, mask != "hard"); otherwise it is a saved buffer, so
        # DDP never sees a parameter without gradient.
        learnable = sparse and mask != "hard"
        for side in ("beta_image", "beta_text"):
            init = torch.full((max_batch_size,), float(beta_init))
            if learnable:
                setattr(self, side, nn.Parameter(init))
            else:
                self.register_buffer(side, init)

    def spatial_difference(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, rows: slice | None = None
    ) -> torch.Tensor:
        """The ``[N, N]`` difference matrix, or its ``rows`` ``[b, N]``; ``|d|`` must be symmetric."""
        raise NotImplementedError  # pragma: no cover

    @property
    def row_block_shares(self) -> bool:
        """Dense: any block of rows is computed from the gathered batch alone. Sparse: the mask's column statistics
        are gathered from the processes' row blocks, so a process computes its rows in one block."""
        return not self.sparse

    def forward(self, batch: GapBatch) -> torch.Tensor:
        if batch.is_local:
            return self.compute_loss_from_embeddings(
                batch.image_embeds, batch.text_embeds, batch.local_positive_mask, rows=batch.rows
            )
        return self.compute_loss_from_embeddings(batch.image_embeds, batch.text_embeds, batch.positive_mask)

    def compute_loss_from_embeddings(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, positive_mask: torch.Tensor | None = None, *,
        rows: slice | None = None,
    ) -> torch.Tensor:
        """Model-free loss on L2-normalised global embeddings ``[N, D]`` (row i of each is pair i).

        ``rows`` (the local form, on every process of a data-parallel run): the share of those rows, ``[b, N]``
        memory; ``positive_mask`` then holds their rows. The sparse mask's column statistics are the gathered row
        statistics of all processes, which equal them because ``|d|`` and the matched pairs are symmetric.
        """
        image_embeds, text_embeds = _upcast(image_embeds), _upcast(text_embeds)
        n = image_embeds.shape[0]
        if positive_mask is None:
            positive_mask = torch.eye(n, dtype=torch.bool, device=image_embeds.device)[slice(None) if rows is None
                                                                                       else rows]
        difference = self.spatial_difference(image_embeds, text_embeds, rows)
        unmatched = ~positive_mask.bool()
        if self.sparse:
            max_batch_size = self.max_batch_size
            if n > max_batch_size:
                raise ValueError(
                    f"Gap term {self.name!r}: the global batch has {n} rows but option 'max_batch_size' is "
                    f"{max_batch_size} (one learnable β per row slot). Set options={{'max_batch_size': {n}}} or more "
                    "(or 'sparse': False)."
                )
            beta_rows = self.beta_image[:n] if rows is None else self.beta_image[rows]
            weights = sparse_correlation_mask(
                difference, unmatched, beta_rows, self.beta_text[:n],
                mask=self.mask, temperature=float(self.temperature), selection=self.selection,
                column_statistics=None if rows is None else _gathered_statistics,
            )
        else:
            weights = unmatched.to(difference.dtype)
        loss = (weights * difference.pow(2)).sum()
        if self.reduction == "mean":
            loss = loss / (n * n)
        return loss


def _gathered_statistics(mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every process' row statistics, in global row order: the column statistics of a symmetric matrix."""
    return gather_features(mean), gather_features(std)


_SPATIAL_DOC = """
    Sparse correlation (Eq. 11-14, option ``sparse=True``, default): only pairs with a strong dependency
    ``p_ij = sigmoid(-|d_ij|) > max(κ_i^V, κ_j^T)``, ``κ = μ + β·θ`` are kept (``selection="dependency"``, our
    reading), or, as Eq. 14 is printed, pairs with ``|d_ij| > max(κ_i^V, κ_j^T)`` (``selection="difference"``); see
    :func:`sparse_correlation_mask` for both readings and how β learns. β is an ``nn.Parameter`` of
    ``max_batch_size`` slots per side (``beta_image`` for rows, ``beta_text`` for columns) owned by the term, so it
    is saved and resumed with the model. Slot = row index within the *global* batch (rank order after the
    gather): β_i is tied to a position, not to an image, so with distinct β values the sparse loss is not invariant
    to permuting the batch (it is when all β are equal, e.g. at ``beta_init``, and always in dense mode). A global
    batch larger than ``max_batch_size`` raises ``ValueError``.

    Note: the loss is non-increasing in every β (raising a threshold only drops non-negative terms), so β learned
    by this loss alone drifts upward (sparser masks) at a rate set by the learning rate and ``temperature``;
    ``mask="hard"`` freezes it at ``beta_init`` (β is then a saved buffer, not a parameter, as with ``sparse=False``,
    so data-parallel wrappers never see a parameter without gradient).

    Same-image rows: the constraints are on *unmatched* pairs (Sec. 3.3). Pairs of rows that show the same image
    (``batch.positive_mask``, including the diagonal) are matched pairs: they are excluded from the loss and from
    the μ/θ statistics, so two captions of one image are never constrained like a negative pair.

    Args:
        sparse: apply the sparse selection; false is the dense Eq. {dense_eq}.
        max_batch_size: number of β slots; must be >= the global batch size.
        beta_init: initial β (0: κ = μ).
        mask: how β learns through the hard mask: straight_through, soft or hard (β fixed).
        temperature: τ of the sigmoid relaxation, in units of θ.
        reduction: sum over all N² pairs (as the paper) or mean (divided by N², batch-size independent; rescale
            the weight accordingly).
        selection: what is compared with κ: dependency (our reading of Eq. 14) or difference (Eq. 14 as printed).

    Inputs: ``batch.image_embeds``/``text_embeds`` ``[N, D]`` (normalised) and ``batch.positive_mask``; returns a
    scalar.
"""


@register_term
class InterSpatialLoss(_SparseSpatialTerm):
    """DIAS inter-modality spatial constraint ``L_inter`` (Eq. 7, 8, 15): cross-modal distances must be symmetric.

    ``x_ij = cos(V_i, T_j)`` (Eq. 7, the image-text similarity matrix X), ``d_ij = x_ij - x_ji`` and
    ``L_inter = Σ_ij b_ij (x_ij - x_ji)²`` (Eq. 15; Eq. 8 when ``b = 1``).
    {spatial}
    Recommended weight: ω_inter = 0.05 (Sec. 4.4, Fig. 7, with N = 128/256 and the summed reduction).

    Relations: :class:`IntraSpatialLoss` (within-modality analogue), :class:`DimensionAlignmentLoss`.

    Example::

        >>> config = GapClipConfig(backbone_config, gap_terms=[{{"name": "dias_inter", "weight": 0.05,
        ...                                                    "options": {{"max_batch_size": 256}}}}])
    """

    name: ClassVar[str] = "dias_inter"

    def spatial_difference(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, rows: slice | None = None
    ) -> torch.Tensor:
        if rows is None:
            x = image_embeds @ text_embeds.t()
            return x - x.t()
        # Row i of Xᵀ is column i of X: caption i against every image.
        return image_embeds[rows] @ text_embeds.t() - text_embeds[rows] @ image_embeds.t()


@register_term
class IntraSpatialLoss(_SparseSpatialTerm):
    """DIAS intra-modality spatial constraint ``L_intra`` (Eq. 9, 10, 16): image-image and text-text distances agree.

    ``y_ij = cos(V_i, V_j)``, ``z_ij = cos(T_i, T_j)`` (Eq. 9), ``d_ij = y_ij - z_ij`` and
    ``L_intra = Σ_ij b_ij (y_ij - z_ij)²`` (Eq. 16; Eq. 10 when ``b = 1``).
    {spatial}
    Recommended weight: ω_intra = 0.1 (Sec. 4.4, Fig. 7).

    Relations: :class:`InterSpatialLoss` (cross-modal analogue), :class:`DimensionAlignmentLoss`.

    Example::

        >>> config = GapClipConfig(backbone_config, gap_terms=[{{"name": "dias_intra", "weight": 0.1}}])
    """

    name: ClassVar[str] = "dias_intra"

    def spatial_difference(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, rows: slice | None = None
    ) -> torch.Tensor:
        rows = slice(None) if rows is None else rows
        return image_embeds[rows] @ image_embeds.t() - text_embeds[rows] @ text_embeds.t()


# Both docstrings share the sparse-constraint text; ``python -OO`` strips docstrings, leaving nothing to fill in.
if InterSpatialLoss.__doc__ is not None:
    InterSpatialLoss.__doc__ = InterSpatialLoss.__doc__.format(spatial=_SPATIAL_DOC.replace("{dense_eq}", "8"))
if IntraSpatialLoss.__doc__ is not None:
    IntraSpatialLoss.__doc__ = IntraSpatialLoss.__doc__.format(spatial=_SPATIAL_DOC.replace("{dense_eq}", "10"))

__all__ = [
    "DIAS_CITATION",
    "DimensionAlignmentLoss",
    "InterSpatialLoss",
    "IntraSpatialLoss",
    "correlation_from_sums",
    "dimension_alignment_loss",
    "dimension_correlation",
    "dimension_correlation_sums",
    "sparse_correlation_mask",
]
