"""GapClipModel: a dual-encoder backbone (CLIP, SigLIP, VisionTextDualEncoder) trained with gap terms."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.utils import ModelOutput, logging

from .backbones import NoLocalFeaturesError, default_word_mask, encode_images, encode_texts, lora_backbone
from .configuration import GapClipConfig, check_dual_encoder_config
from .distributed import distributed_info, gather_features, global_values, local_row_range
from .losses.base import GapBatch, TermInput, build_terms
from .losses.contrastive import BASE_LOSSES, TripletLoss

logger = logging.get_logger(__name__)


@dataclass
class GapClipOutput(ModelOutput):
    """Output of :class:`GapClipModel`.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): base loss + Σ weight·term, when `return_loss=True`.
        loss_terms (`dict[str, torch.FloatTensor]`, *optional*): unweighted value of the base loss (key `"base"`)
            and of every gap term (by name).
        logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, text_batch_size)`): scaled cosine
            similarities (plus bias for SigLIP) of the local batch.
        logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`): the transpose.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, embed_dim)`): normalised image embeddings.
        text_embeds (`torch.FloatTensor` of shape `(batch_size, embed_dim)`): normalised text embeddings.
        patch_embeds (`torch.FloatTensor` of shape `(batch_size, num_patches, embed_dim)`, *optional*): projected
            patch tokens, when local features were computed.
        patch_mask (`torch.BoolTensor` of shape `(batch_size, num_patches)`, *optional*): valid patches.
        token_embeds (`torch.FloatTensor` of shape `(batch_size, seq_len, embed_dim)`, *optional*): projected word
            tokens.
        token_mask (`torch.BoolTensor` of shape `(batch_size, seq_len)`, *optional*): word tokens (no padding, no
            special tokens).
        term_extras (`dict[str, Any]`, *optional*): the gap terms' encoded per-row inputs (what their
            `encode_inputs` made of `term_inputs`), when `return_term_extras=True`.
    """

    loss: torch.FloatTensor | None = None
    loss_terms: dict[str, torch.Tensor] | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    patch_embeds: torch.FloatTensor | None = None
    patch_mask: torch.BoolTensor | None = None
    token_embeds: torch.FloatTensor | None = None
    token_mask: torch.BoolTensor | None = None
    term_extras: dict[str, Any] | None = None


class GapClipPreTrainedModel(PreTrainedModel):
    config_class = GapClipConfig
    base_model_prefix = "gapclip"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    input_modalities = ("image", "text")

    def _init_weights(self, module: nn.Module) -> None:
        # The backbone initialises itself (or is loaded); gap terms initialise their own parameters in __init__.
        # The one buffer to set here: the distance-weighted sampler's call count (missing from older checkpoints).
        if isinstance(module, TripletLoss) and isinstance(getattr(module, "call_count", None), torch.Tensor):
            with torch.no_grad():
                module.call_count.zero_()

    def save_pretrained(self, *args, save_original_format: bool = False, **kwargs):
        """Save with the parameter names the model has in memory (not the backbones' legacy checkpoint names).

        The `Trainer` resumes and reloads the best checkpoint by reading the safetensors file straight into the
        model; legacy names (e.g. older ViT attention keys) would be skipped there. The native export
        (`gapclip.hub.export_backbone`) keeps each backbone's original format for everyone else.
        """
        return super().save_pretrained(*args, save_original_format=save_original_format, **kwargs)


class GapClipModel(GapClipPreTrainedModel):
    """A dual encoder plus its training objective: the base loss and the configured gap terms.

    Example::

        >>> from gapclip import GapClipModel
        >>> model = GapClipModel.from_backbone("openai/clip-vit-base-patch16",
        ...                                    gap_terms=[{"name": "lsc", "weight": 1.0}])
        >>> outputs = model(input_ids=..., attention_mask=..., pixel_values=..., return_loss=True)
        >>> outputs.loss, outputs.loss_terms
    """

    def __init__(self, config: GapClipConfig, backbone: PreTrainedModel | None = None):
        super().__init__(config)
        self.backbone = backbone if backbone is not None else AutoModel.from_config(config.backbone_config)
        self.embed_dim = self._embedding_dim()
        self.base_loss = self._build_base_loss()
        self.gap_terms = build_terms(config.gap_terms, self.embed_dim)
        if config.local_loss:
            self.check_local_loss_support()
        if config.lora and backbone is None:
            # A LoRA-trained checkpoint: rebuild the adapters so its weights load into them.
            self.backbone = lora_backbone(self.backbone, config.lora)
        self.post_init()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_backbone(
        cls, pretrained_model_name_or_path: str, *, backbone_kwargs: dict[str, Any] | None = None, **config_kwargs
    ) -> GapClipModel:
        """Wrap a pretrained dual encoder (Hub id or local folder), e.g. ``openai/clip-vit-base-patch16``.

        ``config_kwargs`` are :class:`GapClipConfig` fields (``gap_terms``, ``base_loss``, ...).
        """
        backbone_config = AutoConfig.from_pretrained(pretrained_model_name_or_path)
        if backbone_config.model_type == GapClipConfig.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path!r} is already a gapclip checkpoint: load it with "
                "GapClipModel.from_pretrained (or AutoModel.from_pretrained after `import gapclip`)."
            )
        check_dual_encoder_config(backbone_config, source=str(pretrained_model_name_or_path))
        backbone = AutoModel.from_pretrained(pretrained_model_name_or_path, **(backbone_kwargs or {}))
        config = GapClipConfig(backbone_config=backbone.config, **config_kwargs)
        return cls(config, backbone=backbone)

    def _embedding_dim(self) -> int:
        config = self.backbone.config
        if config.model_type in ("siglip", "siglip2"):
            return config.vision_config.hidden_size
        return config.projection_dim

    def _build_base_loss(self) -> nn.Module:
        name = self.config.resolved_base_loss
        if name == "sigmoid" and getattr(self.backbone, "logit_bias", None) is None:
            raise ValueError(
                f"base_loss='sigmoid' needs a backbone with a logit bias (SigLIP); "
                f"{self.backbone.config.model_type!r} has none. Use base_loss='infonce' or 'triplet'."
            )
        if name == "triplet":
            return TripletLoss(
                margin=self.config.triplet_margin, mining=self.config.triplet_mining,
                reduction=self.config.triplet_reduction,
            )
        return BASE_LOSSES[name]()

    def check_local_loss_support(self) -> None:
        """Raise a ValueError naming the gap terms (and base loss) that cannot compute the local form."""
        unsupported = [
            name for name, term in self.gap_terms.items() if not getattr(term, "supports_local_loss", False)
        ]
        if not getattr(self.base_loss, "supports_local_loss", False):
            unsupported.insert(0, f"base_loss={self.config.resolved_base_loss}")
        if unsupported:
            raise ValueError(
                f"local_loss=True, but {unsupported} cannot compute their local form (only the rows of this process' "
                "samples): they need the whole batch's matrix. Train without --local_loss, or drop those terms. A gap "
                "term of your own supports it by setting `supports_local_loss = True` and returning, when "
                "`batch.is_local`, the share of `batch.rows` (see gapclip.losses.GapTerm)."
            )

    # ------------------------------------------------------------------ encoding
    @property
    def needs_local_features(self) -> bool:
        return any("local" in term.requires for term in self.gap_terms.values())

    @property
    def declared_term_inputs(self) -> tuple[TermInput, ...]:
        """The per-row inputs the configured gap terms read (one entry per name), for the collator."""
        inputs: dict[str, TermInput] = {}
        for name, term in self.gap_terms.items():
            for declared in term.inputs:
                if inputs.setdefault(declared.name, declared) != declared:
                    raise ValueError(
                        f"Gap term {name!r} declares input {declared.name!r} as {declared}, but another term declares "
                        f"it as {inputs[declared.name]}; terms that share an input must declare it the same way."
                    )
        return tuple(inputs.values())

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected (not normalised) image embeddings ``[B, D]``."""
        return encode_images(self.backbone, pixel_values, with_local=False).embeds

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected (not normalised) text embeddings ``[B, D]``."""
        return encode_texts(self.backbone, input_ids, attention_mask, with_local=False).embeds

    def logit_scale_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``scale = exp(logit_scale) = 1/temperature``, clamped at ``config.logit_scale_max`` as in CLIP."""
        log_scale = self.backbone.logit_scale.clamp(max=math.log(self.config.logit_scale_max))
        bias = getattr(self.backbone, "logit_bias", None)
        return log_scale.exp().reshape(()), None if bias is None else bias.reshape(())

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        word_mask: torch.Tensor | None = None,
        image_index: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        return_local: bool | None = None,
        term_inputs: Mapping[str, Any] | None = None,
        return_term_extras: bool | None = None,
    ) -> GapClipOutput:
        r"""
        Args:
            word_mask (`torch.BoolTensor` of shape `(batch_size, seq_len)`, *optional*): which tokens are words
                (the collator derives it from the tokenizer's special-tokens mask); defaults to the attention mask
                minus the config's special token ids.
            image_index (`torch.LongTensor` of shape `(batch_size,)`, *optional*): which image each row shows, so
                rows of the same image are positives of each other.
            return_loss (`bool`, *optional*): compute the base loss and the gap terms.
            return_local (`bool`, *optional*): return projected patch/word tokens even if no term needs them.
            term_inputs (`dict[str, Any]`, *optional*): the per-row inputs the gap terms declare (`GapTerm.inputs`,
                listed by `model.declared_term_inputs`), keyed by input name, as `GapClipCollator` builds them: a
                tensor `[batch_size, ...]` or a dict of such tensors per input. Read only with `return_loss=True` or
                `return_term_extras=True`.
            return_term_extras (`bool`, *optional*): return the terms' encodings of `term_inputs` in `term_extras`
                (with `return_local`, the output then holds everything :meth:`loss_from_encodings` reads: gradient
                caching embeds a batch in chunks this way).
        """
        if input_ids is None or pixel_values is None:
            raise ValueError("GapClipModel.forward needs both `input_ids` and `pixel_values`.")
        with_local = bool(return_local) or (bool(return_loss) and self.needs_local_features)
        try:
            images = encode_images(self.backbone, pixel_values, with_local=with_local)
        except NoLocalFeaturesError as err:
            local_terms = [name for name, term in self.gap_terms.items() if "local" in term.requires]
            raise ValueError(
                f"Gap term(s) {local_terms} need patch-level image features, but {err} Drop those terms or use a "
                "ViT-style vision tower (CLIP, SigLIP, ViT)."
            ) from None
        texts = encode_texts(self.backbone, input_ids, attention_mask, with_local=with_local)
        image_embeds = F.normalize(images.embeds, dim=-1)
        text_embeds = F.normalize(texts.embeds, dim=-1)
        logit_scale, logit_bias = self.logit_scale_and_bias()
        logits_per_text = logit_scale * text_embeds @ image_embeds.t()
        if logit_bias is not None:
            logits_per_text = logits_per_text + logit_bias

        patch_mask = token_mask = None
        if with_local:
            patch_mask = torch.ones(images.patch_embeds.shape[:2], dtype=torch.bool, device=pixel_values.device)
            token_mask = word_mask.bool() if word_mask is not None else default_word_mask(
                self.backbone.config, input_ids, attention_mask
            )

        loss = loss_terms = extras = None
        if return_loss or return_term_extras:
            extras = self.encode_term_inputs(term_inputs or {})
        if return_loss:
            loss, loss_terms = self.loss_from_encodings(
                image_embeds, text_embeds, patch_embeds=images.patch_embeds, patch_mask=patch_mask,
                token_embeds=texts.token_embeds, token_mask=token_mask, term_extras=extras, image_index=image_index,
                logit_scale=logit_scale, logit_bias=logit_bias,
            )

        return GapClipOutput(
            loss=loss,
            loss_terms=loss_terms,
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            patch_embeds=images.patch_embeds,
            patch_mask=patch_mask,
            token_embeds=texts.token_embeds,
            token_mask=token_mask,
            term_extras=extras if return_term_extras else None,
        )

    def loss_from_encodings(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective of this process' encoded batch: gather over processes, then base loss + Σ weight·term.

        Takes :meth:`global_batch`'s arguments; returns the loss and every unweighted term by name (as
        ``GapClipOutput.loss``/``loss_terms``).
        """
        return self.compute_loss(self.global_batch(*args, **kwargs))

    def global_batch(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        *,
        patch_embeds: torch.Tensor | None = None,
        patch_mask: torch.Tensor | None = None,
        token_embeds: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        term_extras: Mapping[str, Any] | None = None,
        image_index: torch.Tensor | None = None,
        logit_scale: torch.Tensor | None = None,
        logit_bias: torch.Tensor | None = None,
    ) -> GapBatch:
        """The :class:`GapBatch` the objective is computed on, gathered over processes.

        The inputs are what ``forward(..., return_local=True, return_term_extras=True)`` returns (normalised
        embeddings, projected local features and masks, the terms' encoded inputs), for this process' rows;
        ``logit_scale``/``logit_bias`` default to the model's current ones.
        """
        if logit_scale is None:
            logit_scale, logit_bias = self.logit_scale_and_bias()
        return self._global_batch(
            image_embeds, text_embeds, logit_scale, logit_bias, image_index, patch_embeds, patch_mask, token_embeds,
            token_mask, dict(term_extras or {}),
        )

    def encode_term_inputs(self, term_inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Each term's declared inputs through its ``encode_inputs`` hook (this process' rows, before any gather)."""
        missing: dict[str, list[str]] = {}
        for name, term in self.gap_terms.items():
            for declared in term.inputs:
                if declared.name not in term_inputs:
                    missing.setdefault(declared.name, []).append(name)
        if missing:
            helps = [declared.help for declared in self.declared_term_inputs if declared.name in missing]
            needs = "; ".join(f"gap term(s) {terms} need input {key!r}" for key, terms in missing.items())
            raise ValueError(
                f"The batch lacks per-row inputs of its gap terms: {needs}. term_inputs has {sorted(term_inputs)}. "
                + " ".join(dict.fromkeys(text for text in helps if text))
            )
        extras: dict[str, Any] = {}
        for term in self.gap_terms.values():
            if not term.inputs:
                continue
            own = {declared.name: term_inputs[declared.name] for declared in term.inputs}
            for key, value in term.encode_inputs(own, self).items():
                extras.setdefault(key, value)
        return extras

    @property
    def unshared_extras(self) -> set[str]:
        """Keys of ``term_extras`` that are not per row (declared ``gather=False``): never gathered or split."""
        return {declared.name for declared in self.declared_term_inputs if not declared.gather}

    def _global_batch(
        self, image_embeds, text_embeds, logit_scale, logit_bias, image_index, patch_embeds, patch_mask,
        token_embeds, token_mask, extras,
    ) -> GapBatch:
        """Gather everything the losses read from all processes (a no-op on one process); in the local form the
        local features stay this process' own (see :class:`GapBatch`)."""
        with_grad = self.config.gather_with_grad
        local = bool(self.config.local_loss)
        local_keys = self.unshared_extras
        if image_index is None:
            image_index = torch.arange(image_embeds.shape[0], device=image_embeds.device)
            # Without indices, rows are distinct images: offset by rank so they stay distinct once gathered.
            image_index = image_index + _rank_offset(image_index)

        def gather(value, pad_value=0.0):
            if isinstance(value, Mapping):
                return {key: gather(item, pad_value) for key, item in value.items()}
            if not isinstance(value, torch.Tensor):
                return value
            return gather_features(value, gather_with_grad=with_grad, pad_value=pad_value)

        if not local:
            patch_embeds, patch_mask = gather(patch_embeds), gather(patch_mask)
            token_embeds, token_mask = gather(token_embeds), gather(token_mask)
        batch = GapBatch(
            image_embeds=gather(image_embeds),
            text_embeds=gather(text_embeds),
            logit_scale=logit_scale,
            logit_bias=logit_bias,
            image_index=gather(image_index),
            patch_embeds=patch_embeds,
            patch_mask=patch_mask,
            token_embeds=token_embeds,
            token_mask=token_mask,
            extras={key: value if key in local_keys else gather(value) for key, value in extras.items()},
            local_rows=local_row_range(image_embeds.shape[0], image_embeds.device) if local else None,
        )
        if batch.batch_size < 2:
            raise ValueError(
                "The global batch holds a single image-caption pair; a contrastive objective needs at least 2 "
                "(in-batch negatives). Increase --per_device_train_batch_size (or the number of processes), or "
                "set --dataloader_drop_last when the last batch of an epoch has one sample."
            )
        return batch

    def compute_loss(self, batch: GapBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Base loss + Σ weight·term on a (gathered) :class:`GapBatch`; also returns each unweighted value.

        In the local form (``batch.is_local``) every loss returns its share of this process' rows; each value is then
        the global one (the shares summed over processes, one all-reduce of the detached values) with the gradient
        of ``world_size × share``, which DDP's averaging turns into the global gradient (see
        :mod:`gapclip.distributed`).
        """
        if batch.is_local:
            self.check_local_loss_support()
        loss_terms = self.loss_shares(batch)
        if batch.is_local:
            loss_terms = global_values(loss_terms)
        return self.weighted_total(loss_terms), loss_terms

    def loss_shares(self, batch: GapBatch) -> dict[str, torch.Tensor]:
        """Every loss's unweighted value on ``batch`` by name (``"base"`` and each term): in the local form the share
        of ``batch.rows``, not yet summed over processes (:meth:`compute_loss` does that)."""
        loss_terms = {"base": self.base_loss(batch)}
        for name, term in self.gap_terms.items():
            loss_terms[name] = term(batch)
        return loss_terms

    def weighted_total(self, loss_terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Base loss + Σ weight·term of unweighted values by name (as :meth:`loss_shares` returns them)."""
        weights = self.config.term_weights
        total = loss_terms["base"]
        for name in self.gap_terms:
            total = total + weights[name] * loss_terms[name]
        return total

    @property
    def computes_row_blocks(self) -> bool:
        """Whether the base loss and every gap term compute their share of any block of rows from the gathered batch
        alone (``row_block_shares``), so that the objective can be computed a block of rows at a time
        (:func:`gapclip.gradient_cache.gradient_cached_forward`)."""
        losses = [self.base_loss, *self.gap_terms.values()]
        return all(getattr(loss, "row_block_shares", False) for loss in losses)


def _rank_offset(index: torch.Tensor) -> torch.Tensor:
    rank, world_size = distributed_info()
    if world_size == 1:
        return torch.zeros((), dtype=index.dtype, device=index.device)
    # Large stride: each process' local indices stay disjoint from the others'.
    return torch.tensor(rank * 1_000_000_000, dtype=index.dtype, device=index.device)


AutoModel.register(GapClipConfig, GapClipModel)
