"""Uniform access to the global and local embeddings of the supported dual-encoder backbones.

Local features go through the backbone's *own* projection heads (no new parameters):

- CLIP / VisionTextDualEncoder: patch tokens → vision post-layernorm (when the tower has one) →
  ``visual_projection``; word tokens → ``text_projection`` (CLIP's last hidden state is already
  final-layer-normed; the pooled output is the same projection applied to one token).
- SigLIP: the image embedding is an attention-pooling head over the post-layernormed patch tokens, which live in
  the embedding space already, so they are used as they are; word tokens → the text ``head`` (the linear map
  SigLIP applies to its pooled last token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class EncodedImages:
    embeds: torch.Tensor  # [B, D] projected, not normalised
    patch_embeds: torch.Tensor | None = None  # [B, P, D]


@dataclass
class EncodedTexts:
    embeds: torch.Tensor  # [B, D]
    token_embeds: torch.Tensor | None = None  # [B, L, D]


def _num_prefix_tokens(vision_config, sequence_length: int) -> int:
    """Tokens before the patches (CLS, distillation...): sequence length minus the patch grid size."""
    image_size, patch_size = getattr(vision_config, "image_size", None), getattr(vision_config, "patch_size", None)
    if isinstance(image_size, (list, tuple)):
        image_size = image_size[0]
    if isinstance(patch_size, (list, tuple)):
        patch_size = patch_size[0]
    if not image_size or not patch_size:
        return 1
    return max(sequence_length - (image_size // patch_size) ** 2, 0)


def _vision_post_norm(vision_model: nn.Module) -> nn.Module | None:
    for owner in (vision_model, getattr(vision_model, "vision_model", None)):
        if owner is not None and isinstance(getattr(owner, "post_layernorm", None), nn.Module):
            return owner.post_layernorm
    return None


class NoLocalFeaturesError(ValueError):
    """The vision tower gives no patch-token sequence, so terms that need local features cannot run."""


def _token_sequence(outputs: Any, vision_model: nn.Module) -> torch.Tensor:
    hidden = getattr(outputs, "last_hidden_state", None)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        got = f"a tensor of shape {tuple(hidden.shape)}" if isinstance(hidden, torch.Tensor) else "none"
        raise NoLocalFeaturesError(
            f"local (patch) features need a vision tower whose last_hidden_state is a token sequence "
            f"[batch, tokens, hidden]; {type(vision_model).__name__} returns {got} (e.g. a CNN feature map)."
        )
    return hidden


def encode_images(backbone: nn.Module, pixel_values: torch.Tensor, *, with_local: bool) -> EncodedImages:
    family = backbone.config.model_type
    outputs = backbone.vision_model(pixel_values=pixel_values, return_dict=True)
    if family in ("siglip", "siglip2"):
        patches = _token_sequence(outputs, backbone.vision_model) if with_local else None
        return EncodedImages(outputs.pooler_output, patches)
    embeds = backbone.visual_projection(outputs.pooler_output)
    patches = None
    if with_local:
        hidden = _token_sequence(outputs, backbone.vision_model)
        vision_config = getattr(backbone.config, "vision_config", None)
        hidden = hidden[:, _num_prefix_tokens(vision_config, hidden.shape[1]) :]
        # CLIP's pooled output is post-layernormed but its last hidden state is not: normalise patches the same way.
        norm = _vision_post_norm(backbone.vision_model)
        if norm is not None:
            hidden = norm(hidden)
        patches = backbone.visual_projection(hidden)
    return EncodedImages(embeds, patches)


def encode_texts(
    backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *, with_local: bool
) -> EncodedTexts:
    family = backbone.config.model_type
    outputs = backbone.text_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
    if family in ("siglip", "siglip2"):
        tokens = backbone.text_model.head(outputs.last_hidden_state) if with_local else None
        return EncodedTexts(outputs.pooler_output, tokens)
    embeds = backbone.text_projection(outputs.pooler_output)
    tokens = backbone.text_projection(outputs.last_hidden_state) if with_local else None
    return EncodedTexts(embeds, tokens)


def special_token_ids(backbone_config) -> set[int]:
    text_config = getattr(backbone_config, "text_config", backbone_config)
    ids = set()
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id"):
        value = getattr(text_config, name, None)
        if isinstance(value, int):
            ids.add(value)
    return ids


def default_word_mask(
    backbone_config, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Word-token mask when the collator gave none: attention mask minus the config's special token ids.

    The collator's ``word_mask`` (from the tokenizer's ``special_tokens_mask``) is preferred: BERT-style configs
    do not name their ``[CLS]``/``[SEP]`` ids, so for them the first and last attended positions are dropped too.
    """
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    for token_id in special_token_ids(backbone_config):
        mask &= input_ids != token_id
    text_config = getattr(backbone_config, "text_config", backbone_config)
    if getattr(text_config, "model_type", "") in ("bert", "roberta", "xlm-roberta", "mpnet", "distilbert"):
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        lengths = valid.sum(dim=1)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        mask &= (positions != 0) & (positions != (lengths - 1)[:, None])
    return mask


#: Backbone parameters that stay trainable under LoRA (the temperature and SigLIP's bias).
LORA_ALWAYS_TRAINABLE = ("logit_scale", "logit_bias")


def mark_backbone_lora_trainable(backbone: nn.Module) -> None:
    """In a LoRA-wrapped backbone, only the LoRA weights and the logit scale/bias train."""
    for name, parameter in backbone.named_parameters():
        parameter.requires_grad_(".lora_" in name or name.rsplit(".", 1)[-1] in LORA_ALWAYS_TRAINABLE)


def lora_backbone(backbone: nn.Module, settings: dict[str, Any]) -> nn.Module:
    """``backbone`` wrapped in peft LoRA adapters as ``settings`` (``r``, ``alpha``, ``dropout``, ``target_modules``,
    the ``GapClipConfig.lora`` record) describe, with only the adapters and the logit scale/bias trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
        target_modules=settings["target_modules"], bias="none",
    )
    wrapped = get_peft_model(backbone, config)
    mark_backbone_lora_trainable(wrapped)
    return wrapped
