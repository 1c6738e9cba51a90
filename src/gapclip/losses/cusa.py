"""CUSA: Cross-modal and Uni-modal Soft-label Alignment (Huang et al., AAAI 2024).

Two gap terms that distil the similarity structure of frozen *uni-modal* teachers (an image model and a
sentence embedding model, precomputed offline by :func:`gapclip.teachers.precompute_teachers`) into the dual
encoder:

- :class:`CSALoss` (``"csa"``, Eq. 6): the student's *cross-modal* rows (image→texts, text→images) should follow the
  teacher's *uni-modal* rows (image→images, text→texts).
- :class:`USALoss` (``"usa"``, Eq. 8): the student's *uni-modal* rows, computed on extra projector heads, should
  follow the same teacher rows.

The paper's objective (Eq. 9) is ``L = L_original + α·L_CSA + β·L_USA``; in gapclip that is the config
``gap_terms=[{"name": "csa", "weight": 0.1}, {"name": "usa", "weight": 0.5}]``.

Conventions shared by both terms (from the paper and the authors' code, github lerogo/aaai24_itr_cusa):

- Targets ``P = softmax(r / teacher_temperature)`` row-wise, with ``r`` the teacher cosine similarities inside the
  batch, ``teacher_temperature = 1.0``, the diagonal (self-similarity) *kept*, and no gradient.
- ``KL(P‖Q) = Σ_ij P_ij (log P_ij − log Q_ij) / B`` (``batchmean``): P is the target, Q the prediction.
- Temperatures are stored as raw values ``τ`` (``logits = cos / τ``, i.e. ``scale = 1/τ``), not as logs, because the
  authors learn τ itself and *project* it back into its range before every forward (an in-place clamp without
  gradient); we do the same, so the saved value is always the temperature in use and τ can move away from a
  bound again (a differentiable clamp would freeze it there).
- Both terms run on the *gathered* global batch (the authors compute them per GPU), so a 2-process run equals
  one process on the concatenated batch; teacher similarities are then taken over the global batch too. Both are
  sums of per-row KL divergences over ``B``, so under ``local_loss`` each process computes the ``[b, B]`` rows of its
  own samples (USA projects its own rows and gathers the projections).
- Several captions of one image in a batch share one teacher image embedding, so their rows of ``P_i2i`` are
  identical and put equal mass on each other: the same-image rows are treated as positives, never negatives.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import gather_features
from .base import GapBatch, GapTerm, TermInput, register_term

CUSA_CITATION = """@inproceedings{huang2024cusa,
  title={Cross-Modal and Uni-Modal Soft-Label Alignment for Image-Text Retrieval},
  author={Huang, Hailang and Nie, Zhijie and Wang, Ziqiao and Shang, Ziyu},
  booktitle={Proceedings of the AAAI Conference on Artificial Intelligence},
  year={2024}
}"""


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax/KL in at least float32 (bf16/fp16 students), keep float64 when the student runs in it."""
    return torch.promote_types(dtype, torch.float32)


def teacher_targets(teacher_embeds: torch.Tensor, temperature: float = 1.0, rows: slice | None = None) -> torch.Tensor:
    """``P = softmax(cos(t_i, t_j) / temperature)`` row-wise over the batch (Eq. 5), diagonal kept, no gradient.

    Args:
        teacher_embeds: ``[B, T]`` teacher embeddings (normalised here, so raw ones are fine).
        temperature: softening of the teacher rows (1.0 in the paper).
        rows: only these rows of P (the local form), default all.
    Returns:
        ``[B, B]`` (or ``[b, B]``) row-stochastic targets.
    """
    with torch.no_grad():
        normed = F.normalize(teacher_embeds.detach(), dim=-1)
        queries = normed if rows is None else normed[rows]
        return F.softmax(queries @ normed.t() / temperature, dim=-1)


def kl_batchmean(targets: torch.Tensor, logits: torch.Tensor, normaliser: int | None = None) -> torch.Tensor:
    """``KL(P‖Q) = (1/B) Σ_ij P_ij (log P_ij − log softmax(logits)_ij)``; entries with ``P_ij = 0`` contribute 0.

    ``normaliser`` replaces ``B`` = the rows given (the local form divides its rows' sum by the global batch size).
    """
    if normaliser is None:
        return F.kl_div(F.log_softmax(logits, dim=-1), targets, reduction="batchmean")
    return F.kl_div(F.log_softmax(logits, dim=-1), targets, reduction="sum") / normaliser


def _project_(parameter: nn.Parameter, low: float, high: float) -> torch.Tensor:
    """Clamp a temperature parameter in place (no gradient), then return a differentiable copy to compute with.

    The copy (``clone``) keeps the autograd graph free of the parameter's version, so a second forward before
    ``backward`` (which projects again) does not invalidate the first graph.
    """
    with torch.no_grad():
        parameter.clamp_(low, high)
    return parameter.clone()


_TEACHER_HELP = (
    "Precompute the teacher embeddings of this dataset with recipes/precompute_teachers.py (recipes/"
    "train_clip_cusa.py does it when they are missing) and give the collator the TeacherStore as an input provider."
)
#: CUSA's per-row inputs: each row's teacher image and caption embeddings, looked up in a `TeacherStore`.
TEACHER_INPUTS = (
    TermInput("teacher_image_embeds", help=_TEACHER_HELP),
    TermInput("teacher_text_embeds", help=_TEACHER_HELP),
)


class _SoftLabelTerm(GapTerm):
    """What CSA and USA share: the teacher inputs and the temperature options with their checks."""

    citation: ClassVar[str] = CUSA_CITATION
    inputs: ClassVar[tuple[TermInput, ...]] = TEACHER_INPUTS
    supports_local_loss: ClassVar[bool] = True

    def __init__(
        self, embed_dim: int, *, init_temperature: float = 0.45, min_temperature: float = 0.10,
        max_temperature: float = 1.00, teacher_temperature: float = 1.0,
    ):
        super().__init__(embed_dim)
        term = type(self).__name__
        low, high = min_temperature, max_temperature
        if not 0 < low <= high:
            raise ValueError(
                f"{term}: need 0 < min_temperature <= max_temperature, got min_temperature={low}, "
                f"max_temperature={high}."
            )
        if not low <= init_temperature <= high:
            raise ValueError(
                f"{term}: init_temperature={init_temperature} lies outside [min_temperature, max_temperature] = "
                f"[{low}, {high}]."
            )
        if not teacher_temperature > 0:
            raise ValueError(f"{term}: teacher_temperature must be > 0, got {teacher_temperature}.")
        self.init_temperature = init_temperature
        self.min_temperature = min_temperature
        self.max_temperature = max_temperature
        self.teacher_temperature = teacher_temperature


def _teacher_embeds(term: str, batch: GapBatch) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        image, text = batch.extras["teacher_image_embeds"], batch.extras["teacher_text_embeds"]
    except KeyError:
        raise ValueError(
            f"Gap term {term!r} needs `teacher_image_embeds` and `teacher_text_embeds` in GapBatch.extras. "
            + _TEACHER_HELP
        ) from None
    for name, tensor in (("teacher_image_embeds", image), ("teacher_text_embeds", text)):
        if tensor.dim() != 2 or tensor.shape[0] != batch.batch_size:
            raise ValueError(
                f"Gap term {term!r}: {name} must have shape [batch_size={batch.batch_size}, teacher_dim], "
                f"got {tuple(tensor.shape)}."
            )
    return image, text


@register_term
class CSALoss(_SoftLabelTerm):
    """Cross-modal Soft-label Alignment: student image→text rows follow teacher image→image rows (CUSA, Eq. 6).

    ``L_CSA = ½ [KL(P_i2i ‖ Q_i2t) + KL(P_t2t ‖ Q_t2i)]`` with

    - ``P_i2i = softmax(cos(v_i, v_j) / T)`` and ``P_t2t = softmax(cos(u_i, u_j) / T)`` (Eq. 5) from the teacher
      image embeddings ``v`` and caption embeddings ``u``, ``T = teacher_temperature``, diagonal kept, no gradient;
    - ``Q_i2t = softmax(Î_i·T̂_j / τ_c)`` and ``Q_t2i = softmax(T̂_i·Î_j / τ_c)`` (Eqs. 1–2) from the student's
      normalised global embeddings, with one learnable temperature ``τ_c`` shared by both directions, separate
      from the base loss' ``logit_scale``;
    - ``KL`` with ``batchmean`` reduction (sum over the B×B entries / B).

    Same-image rows: their teacher image embeddings are identical, so ``P_i2i`` spreads equal mass over the
    captions of the same image (positives, not negatives); ``P_t2t`` ranks them by caption similarity.

    References: Huang, Nie, Wang, Shang, *Cross-Modal and Uni-Modal Soft-Label Alignment for Image-Text
    Retrieval*, AAAI 2024, Eqs. 1, 2, 5, 6 and 9; code github lerogo/aaai24_itr_cusa.

    Args:
        embed_dim: the model's joint embedding size (unused; the term owns no projector).
        init_temperature: initial ``τ_c`` (the default is the authors' value).
        min_temperature / max_temperature: ``τ_c`` is projected into this range before every forward (defaults
            as the authors'). ``τ_c`` is stored raw (parameter ``temperature``), not as a log.
        teacher_temperature: ``T`` of the teacher rows (fixed; the default is the authors' value).

    Inputs:
        ============================================  ===============================================
        GapBatch field                                shape
        ============================================  ===============================================
        ``image_embeds`` / ``text_embeds``            ``[B, D]`` normalised student embeddings
        ``extras["teacher_image_embeds"]``            ``[B, T_img]`` teacher embedding of each row's image
        ``extras["teacher_text_embeds"]``             ``[B, T_txt]`` teacher embedding of each row's caption
        ============================================  ===============================================

    Recommendations: weight α = 0.1 (the authors' CLIP configs). The paper allows 0.1–1.0; CSA competes directly
    with the base loss on the same cross-modal logits (soft teacher rows vs. hard positives), so a small weight
    keeps the annotated pairs dominant and uses the teacher only to soften false negatives.

    Relations: :class:`USALoss` uses the same teacher targets on uni-modal logits; both together are CUSA (Eq. 9).
    Its ``inputs`` are ``teacher_image_embeds``/``teacher_text_embeds``, which a `TeacherStore` gives the collator.

    Example::

        >>> from gapclip import GapClipConfig, GapClipModel
        >>> from gapclip.testing import tiny_clip_config
        >>> model = GapClipModel(GapClipConfig(tiny_clip_config(), gap_terms=[
        ...     {"name": "csa", "weight": 0.1}, {"name": "usa", "weight": 0.5}]))
        >>> out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True,
        ...             term_inputs={"teacher_image_embeds": t_img, "teacher_text_embeds": t_txt})
        >>> out.loss_terms["csa"], out.loss_terms["usa"]
    """

    name: ClassVar[str] = "csa"

    def __init__(
        self, embed_dim: int, *, init_temperature: float = 0.45, min_temperature: float = 0.10,
        max_temperature: float = 0.99, teacher_temperature: float = 1.0,
    ):
        super().__init__(
            embed_dim, init_temperature=init_temperature, min_temperature=min_temperature,
            max_temperature=max_temperature, teacher_temperature=teacher_temperature,
        )
        self.temperature = nn.Parameter(torch.tensor(float(init_temperature)))

    def current_temperature(self) -> torch.Tensor:
        """``τ_c`` after projection into ``[min_temperature, max_temperature]`` (differentiable)."""
        return _project_(self.temperature, self.min_temperature, self.max_temperature)

    def forward(self, batch: GapBatch) -> torch.Tensor:
        teacher_image, teacher_text = _teacher_embeds(self.name, batch)
        return self.compute_loss_from_embeddings(
            batch.image_embeds, batch.text_embeds, teacher_image, teacher_text, self.current_temperature(),
            teacher_temperature=self.teacher_temperature, rows=batch.local_rows,
        )

    @staticmethod
    def compute_loss_from_embeddings(
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        teacher_image_embeds: torch.Tensor,
        teacher_text_embeds: torch.Tensor,
        temperature: torch.Tensor | float,
        *,
        teacher_temperature: float = 1.0,
        rows: slice | None = None,
    ) -> torch.Tensor:
        """Eq. 6 on normalised student embeddings ``[B, D]`` and teacher embeddings ``[B, T]`` (model-free).

        ``rows`` (the local form): the share of those rows (image and caption queries) against the whole batch.
        """
        dtype = _compute_dtype(image_embeds.dtype)
        image, text = image_embeds.to(dtype), text_embeds.to(dtype)
        p_i2i = teacher_targets(teacher_image_embeds.to(dtype), teacher_temperature, rows)
        p_t2t = teacher_targets(teacher_text_embeds.to(dtype), teacher_temperature, rows)
        if rows is None:
            logits_i2t = image @ text.t() / temperature
            return 0.5 * (kl_batchmean(p_i2i, logits_i2t) + kl_batchmean(p_t2t, logits_i2t.t()))
        size = image.shape[0]
        logits_i2t = image[rows] @ text.t() / temperature
        logits_t2i = text[rows] @ image.t() / temperature
        return 0.5 * (kl_batchmean(p_i2i, logits_i2t, size) + kl_batchmean(p_t2t, logits_t2i, size))


class _UniModalProjector(nn.Sequential):
    """``LayerNorm(D) → Linear(D, D)``, no activation; Linear weights ~ N(0, 0.02²), bias 0."""

    def __init__(self, dim: int):
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, dim))
        nn.init.normal_(self[1].weight, std=0.02)
        nn.init.zeros_(self[1].bias)


@register_term
class USALoss(_SoftLabelTerm):
    """Uni-modal Soft-label Alignment: student image→image / text→text rows follow the teacher's (CUSA, Eq. 8).

    ``L_USA = ½ [KL(P_i2i ‖ Q_i2i) + KL(P_t2t ‖ Q_t2t)]`` with the teacher targets of Eq. 5 (as in
    :class:`CSALoss`) and

    - ``Q_i2i = softmax(cos(g_I(Î_i), g_I(Î_j)) / τ_i)``, ``Q_t2t = softmax(cos(g_T(T̂_i), g_T(T̂_j)) / τ_t)``
      (Eq. 7), where ``g_I``/``g_T`` are per-modality projectors ``LayerNorm(D) → Linear(D, D)`` owned by the term
      (saved and resumed with the model, not used for retrieval), and ``τ_i``/``τ_t`` learnable temperatures.

    Choices (following the authors' code):

    - Projector input: the normalised global embedding of the :class:`GapBatch`. The authors feed the unnormalised
      backbone feature; since ``LayerNorm`` is invariant to rescaling its input (up to its ``eps``), this is the
      same function.
    - The projected vectors are L2-normalised before the cosine (the authors' ``get_similarity``).
    - Diagonal kept on both sides: the self-similarity (``cos = 1``, logit ``1/τ``) is part of every row of Q,
      and ``cos = 1`` is part of every row of P (Eq. 5/7 sum over all j).
    - Same-image rows have identical teacher image embeddings and (for a deterministic image tower) identical
      student image embeddings, so they are each other's exact duplicates in ``P_i2i`` and ``Q_i2i``.

    References: Huang, Nie, Wang, Shang, *Cross-Modal and Uni-Modal Soft-Label Alignment for Image-Text
    Retrieval*, AAAI 2024, Eqs. 5, 7, 8 and 9; code github lerogo/aaai24_itr_cusa.

    Args:
        embed_dim: ``D``, the model's joint embedding size (projector width).
        init_temperature: initial ``τ_i`` and ``τ_t`` (the default is the authors' value).
        min_temperature / max_temperature: both are projected into this range before every forward (defaults
            as the authors'). Stored raw (parameters ``image_temperature``/``text_temperature``).
        teacher_temperature: ``T`` of the teacher rows (fixed; the default is the authors' value).

    Inputs: as :class:`CSALoss` (``image_embeds``, ``text_embeds`` ``[B, D]``; ``extras["teacher_image_embeds"]``
    ``[B, T_img]``, ``extras["teacher_text_embeds"]`` ``[B, T_txt]``).

    Parameters added to the model: ``2·(D·D + 3·D) + 2`` (two projectors: LayerNorm ``2D`` + Linear ``D² + D``; two
    temperatures).

    Recommendations: weight β = 0.5 (the authors' CLIP configs). USA acts on separate projector heads and does not
    fight the base loss on the retrieval logits, so it tolerates a larger weight than CSA (α = 0.1); the paper
    explores 0.1–1.0.

    Relations: :class:`CSALoss` (same targets and inputs, cross-modal logits).

    Example::

        >>> model = GapClipModel(GapClipConfig(tiny_clip_config(), gap_terms=[{"name": "usa", "weight": 0.5}]))
        >>> out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True,
        ...             term_inputs={"teacher_image_embeds": t_img, "teacher_text_embeds": t_txt})
        >>> out.loss_terms["usa"]
    """

    name: ClassVar[str] = "usa"

    def __init__(
        self, embed_dim: int, *, init_temperature: float = 0.45, min_temperature: float = 0.10,
        max_temperature: float = 1.00, teacher_temperature: float = 1.0,
    ):
        super().__init__(
            embed_dim, init_temperature=init_temperature, min_temperature=min_temperature,
            max_temperature=max_temperature, teacher_temperature=teacher_temperature,
        )
        self.image_projector = _UniModalProjector(embed_dim)
        self.text_projector = _UniModalProjector(embed_dim)
        self.image_temperature = nn.Parameter(torch.tensor(float(init_temperature)))
        self.text_temperature = nn.Parameter(torch.tensor(float(init_temperature)))

    def current_temperatures(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(τ_i, τ_t)`` after projection into ``[min_temperature, max_temperature]`` (differentiable)."""
        low, high = self.min_temperature, self.max_temperature
        return _project_(self.image_temperature, low, high), _project_(self.text_temperature, low, high)

    def forward(self, batch: GapBatch) -> torch.Tensor:
        teacher_image, teacher_text = _teacher_embeds(self.name, batch)
        image_temperature, text_temperature = self.current_temperatures()
        # Local form: project this process' rows only and gather the projections (the projector is per row).
        image, text = (batch.image_embeds[batch.rows], batch.text_embeds[batch.rows]) if batch.is_local else (
            batch.image_embeds, batch.text_embeds)
        projected_image = self.image_projector(image.to(self.image_projector[1].weight.dtype))
        projected_text = self.text_projector(text.to(self.text_projector[1].weight.dtype))
        if batch.is_local:
            projected_image, projected_text = gather_features(projected_image), gather_features(projected_text)
        return self.compute_loss_from_embeddings(
            projected_image, projected_text, teacher_image, teacher_text, image_temperature, text_temperature,
            teacher_temperature=self.teacher_temperature, rows=batch.local_rows,
        )

    @staticmethod
    def compute_loss_from_embeddings(
        projected_image_embeds: torch.Tensor,
        projected_text_embeds: torch.Tensor,
        teacher_image_embeds: torch.Tensor,
        teacher_text_embeds: torch.Tensor,
        image_temperature: torch.Tensor | float,
        text_temperature: torch.Tensor | float,
        *,
        teacher_temperature: float = 1.0,
        rows: slice | None = None,
    ) -> torch.Tensor:
        """Eq. 8 on projected (not yet normalised) student embeddings ``[B, D]`` and teacher embeddings ``[B, T]``.

        ``rows`` (the local form): the share of those rows against the whole batch.
        """
        dtype = _compute_dtype(projected_image_embeds.dtype)
        image = F.normalize(projected_image_embeds.to(dtype), dim=-1)
        text = F.normalize(projected_text_embeds.to(dtype), dim=-1)
        p_i2i = teacher_targets(teacher_image_embeds.to(dtype), teacher_temperature, rows)
        p_t2t = teacher_targets(teacher_text_embeds.to(dtype), teacher_temperature, rows)
        queries = slice(None) if rows is None else rows
        q_i2i = image[queries] @ image.t() / image_temperature
        q_t2t = text[queries] @ text.t() / text_temperature
        normaliser = None if rows is None else image.shape[0]
        return 0.5 * (kl_batchmean(p_i2i, q_i2i, normaliser) + kl_batchmean(p_t2t, q_t2t, normaliser))


__all__ = ["CUSA_CITATION", "TEACHER_INPUTS", "CSALoss", "USALoss", "kl_batchmean", "teacher_targets"]
