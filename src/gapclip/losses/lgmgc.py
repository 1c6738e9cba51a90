"""LG-MGC gap terms: Local-driven Semantic Completion (LSC) and Generative-driven Semantic Translation (GST).

Only the paper's *supplementary material* is available to us (``/work/shared/papers/lgmgc_supplementary.txt``); it
names the equations of the main paper (Eq. 4/5 for LSC's fusion, Eq. 8 for GST's distances) without printing them.
Everything below that goes beyond what the supplement states is **our reading**, and each class says so where it
applies (see also ``design.md``, "Our reading of LG-MGC").
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from ..distributed import gather_features
from .base import DualEncoder, GapBatch, GapTerm, TermInput, register_term
from .contrastive import InfoNCELoss, infonce_share

LGMGC_CITATION = """@misc{lgmgc,
  title={Local and Generative-driven Modality Gap Correction for Image-Text Retrieval (LG-MGC)},
  note={Supplementary material, Sec. B (Tables 2-3) and Sec. C (Figs. 1-2); Eq. 4, 5 and 8 of the main paper are
        referenced there but not reproduced. Authors, venue and arXiv id are not given in the supplement available
        to us; complete this entry from the main paper.}
}"""

Fusion = Literal["concat", "max", "mean"]
Distance = Literal["infonce", "kl", "l2"]
OnMissing = Literal["error", "skip"]


# ---------------------------------------------------------------------------------------------------------------------
# LSC
# ---------------------------------------------------------------------------------------------------------------------
@register_term
class LSCLoss(GapTerm):
    """LG-MGC Local-driven Semantic Completion: contrast global embeddings fused with their top-k local tokens.

    The supplement (Sec. B, "Influence of Different Fusion Strategies", Table 3) says that LSC, Eq. (4) and (5)
    of the main paper, *concatenates the global visual and textual representations with selected local features*,
    and compares three fusions (max, mean, concat; concat is best, RSUM 564.5 vs. 554.5 for the CLIP ViT-B/16
    baseline on Flickr30K).

    **Our reading** (the main paper's equations are not available):

    1. *Selection* (per sample). For image ``i`` with normalised global embedding ``v_i`` and patch tokens
       ``p_i1..p_iP`` (projected by the backbone's own head), take the ``k`` valid patches with the largest cosine
       ``cos(p_ij, v_i)``; for caption ``i`` take the ``k`` word tokens (``token_mask``: padding and special tokens
       are never selected) with the largest ``cos(w_ij, t_i)``. A caption with fewer than ``k`` words uses all of
       its words; one with no word at all falls back to its global embedding alone. Selected locals are
       L2-normalised, so that global and local parts have the same scale.
    2. *Fusion* of ``g`` (global) with the selected ``l_1..l_m`` (``m ≤ k``):

       - ``concat`` (default): ``f = normalize([g ; mean_j l_j])`` (dimension ``2D``), so
         ``cos(f_v, f_t) = (cos_global + ⟨mean l_v, mean l_t⟩) / (‖f_v‖‖f_t‖)``; with no local, ``mean l = 0``;
       - ``max``: ``f = normalize(max_elementwise{g, l_1, ..., l_m})``;
       - ``mean``: ``f = normalize((g + Σ_j l_j) / (1 + m))``.
    3. *Loss*: symmetric in-batch InfoNCE on the fused embeddings with the model's scale
       ``s = exp(logit_scale) = 1/temperature``: ``L = ½[CE(s·F_v·F_tᵀ, P) + CE(s·F_t·F_vᵀ, Pᵀ)]`` where ``P`` is the
       row-normalised same-image mask (rows showing the same image are positives of each other). On a SigLIP
       backbone the term is still InfoNCE (with SigLIP's scale, no bias): it is an auxiliary objective next to the
       sigmoid base loss.

    Selection uses ``topk`` + ``gather`` on masked similarities (no loop over the batch); cost ``O(B·(P+L)·D)`` for
    selection and ``O(B²·D)`` for the loss. The term has no parameters.

    Local loss (``local_loss``): each process fuses its own rows (its local features are never gathered), gathers the
    fused ``[b, 2D]`` (or ``[b, D]``) embeddings with gradients and computes the InfoNCE rows of its samples,
    ``O(b·(P+L)·D + b·B·D)``.

    Args:
        embed_dim: the model's embedding dimension (given by the registry).
        k: local tokens selected per image and per caption (``>= 1``).
        fusion: how the global embedding and its selected locals are fused: concat, max or mean.

    Requirements: ``requires = {"local"}``: the model then passes projected ``patch_embeds``/``patch_mask`` and
    ``token_embeds``/``token_mask``.

    Inputs:
        +--------------------------------------------+------------------------------------------------+
        | GapBatch field                             | shape                                          |
        +============================================+================================================+
        | image_embeds / text_embeds (normalised)    | ``[B, D]``                                     |
        | patch_embeds / patch_mask                  | ``[B, P, D]`` / ``[B, P]`` bool                |
        | token_embeds / token_mask                  | ``[B, L, D]`` / ``[B, L]`` bool (words only)   |
        | logit_scale, image_index                   | scalar, ``[B]``                                |
        +--------------------------------------------+------------------------------------------------+

    Relations: :class:`GSTLoss` (the other LG-MGC term); :class:`~gapclip.losses.contrastive.InfoNCELoss` (the base
    loss, here applied to fused embeddings).

    Example::

        >>> from gapclip import GapClipConfig, GapClipModel
        >>> from gapclip.testing import tiny_clip_config
        >>> config = GapClipConfig(tiny_clip_config(),
        ...                        gap_terms=[{"name": "lsc", "weight": 1.0, "options": {"k": 4, "fusion": "concat"}}])
        >>> model = GapClipModel(config)  # outputs.loss_terms["lsc"] once called with return_loss=True
    """

    name: ClassVar[str] = "lsc"
    requires: ClassVar[frozenset[str]] = frozenset({"local"})
    citation: ClassVar[str] = LGMGC_CITATION
    supports_local_loss: ClassVar[bool] = True
    FUSIONS: ClassVar[tuple[str, ...]] = typing.get_args(Fusion)

    def __init__(self, embed_dim: int, *, k: int = 4, fusion: Fusion = "concat"):
        super().__init__(embed_dim)
        if k < 1:
            raise ValueError(f"Gap term 'lsc': option k must be an integer >= 1, got {k!r}.")
        self.k = k
        self.fusion = fusion

    def forward(self, batch: GapBatch) -> torch.Tensor:
        if batch.patch_embeds is None or batch.token_embeds is None:
            raise ValueError(
                "Gap term 'lsc' needs local features (patch_embeds and token_embeds) in the GapBatch; "
                "GapClipModel computes them when a term has requires={'local'} and return_loss=True."
            )
        if batch.is_local:
            rows = batch.rows
            fused_images = gather_features(self.fuse_embeddings(batch.image_embeds[rows], batch.patch_embeds,
                                                                batch.patch_mask))
            fused_texts = gather_features(self.fuse_embeddings(batch.text_embeds[rows], batch.token_embeds,
                                                               batch.token_mask))
            return infonce_share(
                fused_images[rows], fused_texts[rows], fused_images, fused_texts, batch.logit_scale,
                batch.local_positive_mask, batch.batch_size,
            )
        return self.compute_loss_from_embeddings(
            batch.image_embeds, batch.patch_embeds, batch.patch_mask,
            batch.text_embeds, batch.token_embeds, batch.token_mask,
            logit_scale=batch.logit_scale, positive_mask=batch.positive_mask,
        )

    def compute_loss_from_embeddings(
        self,
        image_embeds: torch.Tensor,
        patch_embeds: torch.Tensor,
        patch_mask: torch.Tensor | None,
        text_embeds: torch.Tensor,
        token_embeds: torch.Tensor,
        token_mask: torch.Tensor | None,
        *,
        logit_scale: torch.Tensor | float,
        positive_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """InfoNCE on fused embeddings; model-free (``positive_mask`` defaults to the identity)."""
        fused_images = self.fuse_embeddings(image_embeds, patch_embeds, patch_mask)
        fused_texts = self.fuse_embeddings(text_embeds, token_embeds, token_mask)
        if positive_mask is None:
            positive_mask = torch.eye(image_embeds.shape[0], dtype=torch.bool, device=image_embeds.device)
        logits_per_image = logit_scale * fused_images @ fused_texts.t()
        return InfoNCELoss.compute_loss_from_logits(logits_per_image, positive_mask)

    def fuse_embeddings(
        self, global_embeds: torch.Tensor, local_embeds: torch.Tensor, local_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Select the top-k locals of each row and fuse them with its global embedding; returns normalised rows."""
        selected, valid = select_top_k_locals(global_embeds, local_embeds, local_mask, self.k)
        return fuse_global_and_locals(global_embeds, selected, valid, self.fusion)


def select_top_k_locals(
    global_embeds: torch.Tensor, local_embeds: torch.Tensor, local_mask: torch.Tensor | None, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the ``k`` valid local tokens most cosine-similar to the row's own global embedding.

    Args:
        global_embeds: ``[B, D]`` (need not be normalised; cosine is scale-free).
        local_embeds: ``[B, N, D]`` projected local tokens.
        local_mask: ``[B, N]`` bool, tokens that may be selected (``None``: all).
        k: tokens per row; ``min(k, N)`` are returned.

    Returns:
        ``selected`` ``[B, k', D]`` L2-normalised tokens in decreasing similarity, and ``valid`` ``[B, k']`` bool:
        ``False`` where the row had fewer than ``k'`` selectable tokens (those slots hold an arbitrary token and
        must be ignored).
    """
    assert local_embeds.dim() == 3 and global_embeds.dim() == 2, (global_embeds.shape, local_embeds.shape)
    num_tokens, dim = local_embeds.shape[1], local_embeds.shape[2]
    if local_mask is None:
        local_mask = torch.ones(local_embeds.shape[:2], dtype=torch.bool, device=local_embeds.device)
    local_mask = local_mask.bool()
    locals_normed = F.normalize(local_embeds, dim=-1)
    global_normed = F.normalize(global_embeds, dim=-1)
    similarity = torch.einsum("bnd,bd->bn", locals_normed, global_normed)
    # Selection is not differentiated (topk indices); the gathered tokens carry the gradient.
    similarity = similarity.detach().masked_fill(~local_mask, float("-inf"))
    k_eff = min(k, num_tokens)
    indices = similarity.topk(k_eff, dim=1).indices  # [B, k']
    valid = local_mask.gather(1, indices)
    selected = locals_normed.gather(1, indices[..., None].expand(-1, -1, dim))
    return selected, valid


def fuse_global_and_locals(
    global_embeds: torch.Tensor, selected: torch.Tensor, valid: torch.Tensor, fusion: str
) -> torch.Tensor:
    """Fuse ``[B, D]`` globals with ``[B, k, D]`` normalised locals (``valid`` ``[B, k]``); returns normalised rows.

    ``concat``: ``normalize([g ; mean(valid l)])`` (``[B, 2D]``; mean of none = 0); ``max``: element-wise max over
    ``{g} ∪ valid l``; ``mean``: mean over ``{g} ∪ valid l``; the last two are then L2-normalised (``[B, D]``).
    """
    global_normed = F.normalize(global_embeds, dim=-1)
    weights = valid.to(selected.dtype)[..., None]  # [B, k, 1]
    count = weights.sum(dim=1)  # [B, 1]
    if fusion == "concat":
        local_mean = (selected * weights).sum(dim=1) / count.clamp(min=1.0)
        fused = torch.cat([global_normed, local_mean], dim=-1)
    elif fusion == "mean":
        fused = (global_normed + (selected * weights).sum(dim=1)) / (1.0 + count)
    elif fusion == "max":
        masked = selected.masked_fill(~valid[..., None], float("-inf"))
        fused = torch.cat([global_normed[:, None, :], masked], dim=1).max(dim=1).values
    else:
        raise ValueError(f"Unknown LSC fusion {fusion!r}; accepted values are {list(LSCLoss.FUSIONS)}.")
    return F.normalize(fused, dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# GST
# ---------------------------------------------------------------------------------------------------------------------
@register_term
class GSTLoss(GapTerm):
    """LG-MGC Generative-driven Semantic Translation: align each image with its generated caption ("translation").

    Each image has a *translation*: a caption generated for it once by an image-to-text model
    (``recipes/translate_images.py``), stored as the dataset's ``translation`` column and encoded by the model's
    own text tower (normalised ``t̂_i``). The supplement (Sec. B, Table 2) compares three distances for GST, "as
    detailed in Eq. (8)" of the main paper: KL (RSUM 562.6), L2 (562.8) and InfoNCE (564.5, the default).

    **Our reading** (Eq. 8 itself is not available), with ``v_i`` the normalised image embedding, ``t_j`` the
    normalised caption embeddings of the batch, ``s = exp(logit_scale) = 1/temperature`` and ``P`` the
    row-normalised same-image mask:

    - ``infonce`` (default): symmetric in-batch contrast of images against translations,
      ``L = ½[CE(s·V·T̂ᵀ, P) + CE(s·T̂·Vᵀ, Pᵀ)]`` (rows of the same image are positives, never negatives).
    - ``kl``: ``L = (1/B) Σ_i KL(p_i ‖ q_i)`` with the *translation → captions* distribution
      ``p_i = softmax_j(s·⟨t̂_i, t_j⟩)`` as the target and the *image → captions* distribution
      ``q_i = softmax_j(s·⟨v_i, t_j⟩)`` as the prediction. The target is **detached** (no gradient), as in
      distillation: the image should see the captions the way its translation does, and the translation (a fixed
      generated caption) is not pulled towards the image. Gradients reach the vision tower through ``v_i`` and the
      text tower through the captions ``t_j``. No T² factor.
    - ``l2``: ``L = (1/B) Σ_i ‖v_i − t̂_i‖²`` (squared Euclidean distance of normalised embeddings, ``= 2 − 2 cos``).

    Missing translations (``has_translation`` False): ``on_missing="error"`` (default) raises a ``ValueError`` that
    says how many rows lack one; ``on_missing="skip"`` drops those rows (as queries and, for ``infonce``, as
    candidates; for ``kl`` the candidate captions remain the whole batch), stores how many were dropped in
    :attr:`last_skipped`, and returns a zero that keeps the graph when every row is dropped. Dropping masks the rows
    instead of indexing them, so a training step never waits for the mask on the host; the collator adds
    ``present`` to a batch only when a row lacks a translation, so "error" reads the mask (on the host) only then.

    Args:
        embed_dim: the model's embedding dimension (given by the registry).
        distance: the GST distance between an image and its translation: infonce, kl or l2.
        on_missing: what a row without a translation does: error, or skip (left out of GST).

    Requirements: one input, the dataset's ``translation`` column (``inputs``), tokenised by the collator; the
    term's :meth:`encode_inputs` encodes it with the model's own text tower into ``extras["translation_embeds"]``
    (normalised) and ``extras["has_translation"]`` (rows that have one).

    Inputs:
        +----------------------------------------------+---------------------------+
        | GapBatch field                               | shape                     |
        +==============================================+===========================+
        | image_embeds / text_embeds (normalised)      | ``[B, D]``                |
        | extras["translation_embeds"] (normalised)    | ``[B, D]``                |
        | extras["has_translation"]                    | ``[B]`` bool              |
        | logit_scale, image_index                     | scalar, ``[B]``           |
        +----------------------------------------------+---------------------------+

    Relations: :class:`LSCLoss` (the other LG-MGC term); :class:`~gapclip.losses.contrastive.InfoNCELoss`.

    Example::

        >>> from gapclip import GapClipConfig, GapClipModel
        >>> from gapclip.testing import tiny_clip_config
        >>> gst = {"name": "gst", "options": {"distance": "infonce", "on_missing": "skip"}}
        >>> config = GapClipConfig(tiny_clip_config(), gap_terms=[gst])
        >>> model = GapClipModel(config)  # call with term_inputs={"translation": {...}} and return_loss=True
    """

    name: ClassVar[str] = "gst"
    citation: ClassVar[str] = LGMGC_CITATION
    supports_local_loss: ClassVar[bool] = True
    row_block_shares: ClassVar[bool] = True
    inputs: ClassVar[tuple[TermInput, ...]] = (
        TermInput(
            "translation", collate="text",
            help="Give the dataset a 'translation' column: recipes/translate_images.py generates one per image, and "
            "the recipes attach it with --translations FILE.jsonl.",
        ),
    )
    DISTANCES: ClassVar[tuple[str, ...]] = typing.get_args(Distance)
    ON_MISSING: ClassVar[tuple[str, ...]] = typing.get_args(OnMissing)

    def __init__(self, embed_dim: int, *, distance: Distance = "infonce", on_missing: OnMissing = "error"):
        super().__init__(embed_dim)
        self.distance = distance
        self.on_missing = on_missing
        # Rows without a translation dropped by the last call: with on_missing="skip" and a mask, a 0-d tensor on the
        # batch's device (int() reads it on the host), else 0.
        self.last_skipped: torch.Tensor | int = 0

    def encode_inputs(self, inputs: Mapping[str, Any], model: DualEncoder) -> dict[str, torch.Tensor]:
        """Encode the tokenised translations with the model's text tower (with gradients, like the captions)."""
        translation = inputs["translation"]
        embeds = model.get_text_features(translation["input_ids"], translation.get("attention_mask"))
        present = translation.get("present")  # GapClipCollator adds it only when a row has no translation
        if present is None:
            present = torch.ones(embeds.shape[0], dtype=torch.bool, device=embeds.device)
        elif self.on_missing == "error":  # each process checks its own rows, before they are gathered
            self._check_present(present.bool())
        return {"translation_embeds": F.normalize(embeds, dim=-1), "has_translation": present.bool()}

    def forward(self, batch: GapBatch) -> torch.Tensor:
        if "translation_embeds" not in batch.extras:
            raise ValueError(
                "Gap term 'gst' needs image translations: the batch has no extras['translation_embeds']. Give the "
                "dataset a 'translation' column (recipes/translate_images.py makes one) so the collator passes it "
                "in term_inputs."
            )
        # With on_missing="error" every process checked its rows in encode_inputs: the gathered mask is all True.
        has_translation = batch.extras.get("has_translation") if self.on_missing == "skip" else None
        return self.compute_loss_from_embeddings(
            batch.image_embeds, batch.extras["translation_embeds"], batch.text_embeds,
            logit_scale=batch.logit_scale,
            positive_mask=batch.local_positive_mask if batch.is_local else batch.positive_mask,
            has_translation=has_translation, rows=batch.local_rows,
        )

    def _check_present(self, has_translation: torch.Tensor) -> None:
        missing = int((~has_translation).sum())  # a host read: only for a mask given with on_missing="error"
        if missing:
            raise ValueError(
                f"Gap term 'gst': {missing} of {has_translation.shape[0]} rows in this batch have no translation "
                "(has_translation=False). Generate translations for every image with recipes/translate_images.py "
                "(it resumes where it stopped), or set the option on_missing='skip' to leave those rows out of GST."
            )

    def compute_loss_from_embeddings(
        self,
        image_embeds: torch.Tensor,
        translation_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        *,
        logit_scale: torch.Tensor | float,
        positive_mask: torch.Tensor | None = None,
        has_translation: torch.Tensor | None = None,
        rows: slice | None = None,
    ) -> torch.Tensor:
        """The GST distance on normalised ``[B, D]`` embeddings; model-free (``positive_mask`` defaults to ``I``).

        ``rows`` (the local form): only the share of those query rows, against all ``B`` columns and divided by the
        global count of rows GST averages over; ``positive_mask`` then holds their ``[b, B]`` rows. Rows without a
        translation (``on_missing="skip"``) are masked out, not indexed away, so nothing is read on the host.
        """
        batch_size = image_embeds.shape[0]
        rows = slice(0, batch_size) if rows is None else rows
        if positive_mask is None:
            positive_mask = torch.eye(batch_size, dtype=torch.bool, device=image_embeds.device)[rows]
        self.last_skipped = 0
        keep = None
        if has_translation is not None:
            has_translation = has_translation.bool()
            if self.on_missing == "error":
                self._check_present(has_translation)
            else:
                keep = has_translation
                self.last_skipped = (~keep).sum()
        # Averages are over every row of the whole batch that has a translation, whichever rows this call computes.
        count = batch_size if keep is None else keep.sum().clamp_min(1)
        images, translations = image_embeds[rows], translation_embeds[rows]
        if self.distance == "infonce":
            # The rows without a translation are neither queries nor candidates.
            pairs = None if keep is None else keep[rows][:, None] & keep[None, :]
            return infonce_share(
                images, translations, image_embeds, translation_embeds, logit_scale, positive_mask, count, pairs
            )
        if self.distance == "kl":
            target = F.log_softmax(logit_scale * translations.detach() @ text_embeds.detach().t(), dim=1)
            prediction = F.log_softmax(logit_scale * images @ text_embeds.t(), dim=1)
            per_row = F.kl_div(prediction, target, reduction="none", log_target=True).sum(dim=1)
        else:
            per_row = (images - translations).pow(2).sum(dim=-1)
        if keep is not None:
            per_row = torch.where(keep[rows], per_row, 0.0)
        return per_row.sum() / count


__all__ = ["GSTLoss", "LSCLoss", "fuse_global_and_locals", "select_top_k_locals"]
