"""LoRA fine-tuning of a :class:`~gapclip.GapClipModel`'s backbone with ``peft``.

:func:`apply_lora` wraps ``model.backbone`` in a ``peft.PeftModel`` (LoRA on the attention projections of both
towers) and freezes everything else in the backbone except its logit scale (and SigLIP's logit bias). Parameters
outside the backbone (the gap terms' own parameters, ``model.gap_terms``) keep their ``requires_grad``.

Checkpoints and reloading
    The LoRA settings are stored in the model config as ``config.lora`` (a plain dict: ``r``, ``alpha``,
    ``dropout``, ``target_modules``), so they are saved in ``config.json`` with every checkpoint. The checkpoint's
    weights hold the frozen base weights *and* the adapters under peft's names
    (``backbone.base_model.model.…q_proj.base_layer.weight``, ``….lora_A.default.weight``).

    - Resuming a run (``Trainer.train(resume_from_checkpoint=...)``) needs nothing special: the recipe applies the
      same LoRA settings before building the Trainer, and the Trainer loads the checkpoint into that model.
    - Loading a checkpoint: ``GapClipModel.__init__`` re-applies LoRA with the stored ``config.lora`` settings, so
      ``GapClipModel.from_pretrained`` / ``AutoModel.from_pretrained`` load the adapters; :func:`load_gapclip_model`
      additionally restores which parameters train.
    - :func:`merge_lora` folds the adapters into the base weights and unwraps the backbone back to its native class
      (and drops ``config.lora``); a merged checkpoint is a plain gapclip checkpoint again.

Example::

    >>> from gapclip.lora import apply_lora, merge_lora
    >>> model = apply_lora(model, r=8, alpha=16, dropout=0.05)   # logs e.g. "trainable params: 0.9% ..."
    >>> ...  # train
    >>> model = merge_lora(model)                                # model.backbone is a plain CLIPModel again
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn
from transformers.utils import logging

from .backbones import lora_backbone, mark_backbone_lora_trainable
from .modeling import GapClipModel

logger = logging.get_logger(__name__)

LORA_CONFIG_KEY = "lora"
#: After :func:`merge_lora` the settings move here (provenance for the export's card and training config).
MERGED_LORA_CONFIG_KEY = "merged_lora"

#: Default LoRA targets, as a peft regular expression (full match on module names): the query/key/value/output
#: projections of every self-attention layer of both towers. It covers CLIP/SigLIP (``…layers.N.self_attn.
#: {q,k,v,out}_proj``), ViT (``…layers.N.attention.{q,k,v,o}_proj``) and BERT-style text towers
#: (``…layer.N.attention.self.{query,key,value}`` and ``…layer.N.attention.output.dense``). The layer-index
#: anchor (``.N.``) keeps SigLIP's attention-pooling head (an ``nn.MultiheadAttention`` whose ``out_proj`` weight is
#: read directly, so a LoRA layer there would be ignored) and the projection heads out.
DEFAULT_TARGET_MODULES = (
    r".*\.\d+\.(?:self_attn|attention|attention\.self|attention\.attention)"
    r"\.(?:q_proj|k_proj|v_proj|out_proj|o_proj|query|key|value)"
    r"|.*\.\d+\.attention\.output\.dense"
)

def is_lora_model(model: GapClipModel) -> bool:
    """Whether ``model.backbone`` is wrapped in a peft model."""
    from peft import PeftModel

    return isinstance(model.backbone, PeftModel)


def apply_lora(
    model: GapClipModel,
    *,
    r: int,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: str | list[str] | None = None,
) -> GapClipModel:
    """Wrap ``model.backbone`` in LoRA adapters; only the adapters, the logit scale/bias and the gap terms' own
    parameters stay trainable.

    Args:
        model: the model to modify (in place; also returned).
        r (`int`): LoRA rank, > 0.
        alpha (`float`, defaults to 16): LoRA scaling numerator (the update is ``alpha / r · B A``).
        dropout (`float`, defaults to 0.0): dropout on the LoRA input.
        target_modules (`str` or `list[str]`, *optional*): peft targets: a list of module-name suffixes (e.g.
            ``["q_proj", "v_proj"]``) or a regular expression matched against full module names. Defaults to
            :data:`DEFAULT_TARGET_MODULES` (all attention projections of both towers).

    Returns:
        The same model, with ``config.lora`` recording the settings (see the module docstring on reloading).

    Raises:
        ValueError: ``r <= 0``, a negative dropout, or a backbone that already has LoRA adapters.
    """
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}.")
    if is_lora_model(model):
        raise ValueError("The backbone already has LoRA adapters; merge them (gapclip.lora.merge_lora) first.")
    if target_modules is None:
        target_modules = DEFAULT_TARGET_MODULES
    elif not isinstance(target_modules, str):
        target_modules = list(target_modules)
    settings = {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": target_modules}
    model.backbone = lora_backbone(model.backbone, settings)
    model.config.lora = settings
    trainable, total, pct = trainable_parameter_summary(model)
    logger.info(
        f"LoRA (r={r}, alpha={alpha}, dropout={dropout}) on {count_lora_layers(model)} layers: "
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}"
    )
    return model


def mark_lora_trainable(model: GapClipModel) -> None:
    """In the backbone, only the LoRA weights and the logit scale/bias train (parameters outside are untouched)."""
    mark_backbone_lora_trainable(model.backbone)


def count_lora_layers(model: nn.Module) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(module, LoraLayer) for module in model.modules())


def trainable_parameter_summary(model: nn.Module) -> tuple[int, int, float]:
    """``(trainable, total, trainable percentage)`` parameter counts of ``model``."""
    trainable = total = 0
    for parameter in model.parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return trainable, total, 100.0 * trainable / max(total, 1)


def merge_lora(model: GapClipModel) -> GapClipModel:
    """Fold the LoRA updates into the base weights and unwrap the backbone to its native class (in place).

    A model without adapters is returned unchanged. ``config.lora`` is removed, so the merged model saves and
    reloads as a plain gapclip checkpoint (the settings move to ``config.merged_lora``, for the record). All
    backbone parameters are trainable again afterwards (peft's unload keeps the base weights frozen).
    """
    if not is_lora_model(model):
        return model
    model.backbone = model.backbone.merge_and_unload()
    for parameter in model.backbone.parameters():
        parameter.requires_grad_(True)
    if model.config.lora is not None:
        model.config.merged_lora, model.config.lora = model.config.lora, None
    return model


def merged_backbone(model: GapClipModel) -> nn.Module:
    """The backbone with any LoRA adapters merged, leaving ``model`` untouched (copies the backbone if needed)."""
    if not is_lora_model(model):
        return model.backbone
    import copy

    return copy.deepcopy(model.backbone).merge_and_unload()


def load_gapclip_model(pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> GapClipModel:
    """Load a gapclip checkpoint, with or without LoRA adapters.

    ``GapClipModel.from_pretrained(path, **kwargs)`` (which rebuilds LoRA layers from ``config.lora``), then, for a
    LoRA checkpoint, only the adapters, the logit scale and the terms' parameters are left trainable.
    """
    model = GapClipModel.from_pretrained(pretrained_model_name_or_path, **kwargs)
    if model.config.lora:
        mark_lora_trainable(model)  # loading hands back fresh parameters that all require grad
    return model


__all__ = [
    "DEFAULT_TARGET_MODULES",
    "LORA_CONFIG_KEY",
    "MERGED_LORA_CONFIG_KEY",
    "apply_lora",
    "count_lora_layers",
    "is_lora_model",
    "load_gapclip_model",
    "mark_lora_trainable",
    "merge_lora",
    "merged_backbone",
    "trainable_parameter_summary",
]
