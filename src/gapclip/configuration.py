"""Configuration of :class:`~gapclip.GapClipModel`: a dual-encoder backbone config plus the training objective."""

from __future__ import annotations

import math
from typing import Any

from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig
from transformers.utils import logging

from .losses.base import validate_term_specs

logger = logging.get_logger(__name__)

#: backbone ``model_type`` → the base loss it was trained with (``base_loss="auto"``).
SUPPORTED_BACKBONES = {"clip": "infonce", "siglip": "sigmoid", "siglip2": "sigmoid", "vision-text-dual-encoder": "infonce"}
BASE_LOSS_NAMES = ("auto", "infonce", "sigmoid", "triplet")


class GapClipConfig(PretrainedConfig):
    r"""Configuration for :class:`~gapclip.GapClipModel`.

    Args:
        backbone_config (`dict` or `PretrainedConfig`, *optional*):
            Config of the wrapped dual encoder: a `CLIPConfig`, `SiglipConfig` or `VisionTextDualEncoderConfig`
            (a dict must carry its `model_type`). Defaults to a default `CLIPConfig`.
        base_loss (`str`, *optional*, defaults to `"auto"`):
            `"infonce"` (CLIP), `"sigmoid"` (SigLIP, needs the backbone's logit bias), `"triplet"` (hinge, DIAS
            Eq. 3) or `"auto"`: the loss the backbone family was trained with.
        gap_terms (`list[dict]`, *optional*):
            Extra objectives, each `{"name": str, "weight": float, "options": dict}`; the total loss is
            `base + Σ weight · term`. See `gapclip.losses.describe_terms()` for names and options.
        triplet_margin (`float`, *optional*, defaults to 0.2): α of the triplet base loss.
        triplet_mining (`str`, *optional*, defaults to `"hardest"`): negatives of the triplet base loss.
        triplet_reduction (`str`, *optional*, defaults to `"mean"`): `"mean"` or `"sum"` of the triplet loss over the
            batch. DIAS's weights are set against the VSE++/SCAN convention, `"sum"` (see `TripletLoss`).
        gather_with_grad (`bool`, *optional*, defaults to `True`):
            Gather embeddings across processes with gradients, so every process computes the loss of the global
            batch and multi-process training equals single-process training on the concatenated batch.
        local_loss (`bool`, *optional*, defaults to `False`):
            Each process computes only the rows of the objective that belong to its own samples, against the whole
            gathered batch: ``O(b·B)`` memory and compute per process for a global batch ``B`` of ``b`` per process,
            instead of ``O(B²)``; the loss and the gradients are those of the global batch (open_clip's
            ``local_loss``). Every gap term must support it (``GapTerm.supports_local_loss``; all built-in ones do).
            Needs `gather_with_grad`.
        logit_scale_max (`float`, *optional*, defaults to 100.0):
            Upper clamp of `scale = exp(logit_scale) = 1/temperature`, as in CLIP.
        lora (`dict`, *optional*):
            LoRA settings of the backbone's adapters (`r`, `alpha`, `dropout`, `target_modules`), set by
            `gapclip.lora.apply_lora`; a model built from a config with `lora` wraps its backbone in those adapters,
            so a LoRA checkpoint loads into them. `None`: no adapters.
        merged_lora (`dict`, *optional*):
            The settings of adapters merged into the weights by `gapclip.lora.merge_lora` (provenance only).
        training_run (`dict`, *optional*):
            What the training recipe that trained the model recorded: its hyper-parameters and a description of the
            training data (provenance only: a later `gapclip.hub.export_backbone` writes them into the card).

    Example::

        >>> from transformers import CLIPConfig
        >>> config = GapClipConfig(CLIPConfig(), gap_terms=[{"name": "lsc", "weight": 1.0, "options": {"k": 4}}])
    """

    model_type = "gapclip"
    sub_configs = {"backbone_config": AutoConfig}

    def __init__(
        self,
        backbone_config: dict | PretrainedConfig | None = None,
        base_loss: str = "auto",
        gap_terms: list[dict[str, Any]] | None = None,
        triplet_margin: float = 0.2,
        triplet_mining: str = "hardest",
        triplet_reduction: str = "mean",
        gather_with_grad: bool = True,
        local_loss: bool = False,
        logit_scale_max: float = 100.0,
        lora: dict[str, Any] | None = None,
        merged_lora: dict[str, Any] | None = None,
        training_run: dict[str, Any] | None = None,
        **kwargs,
    ):
        if backbone_config is None:
            backbone_config = CONFIG_MAPPING["clip"]()
        elif isinstance(backbone_config, dict):
            model_type = backbone_config.get("model_type")
            if model_type not in CONFIG_MAPPING:
                raise ValueError(f"backbone_config needs a known 'model_type', got {model_type!r}.")
            backbone_config = CONFIG_MAPPING[model_type](**backbone_config)
        if not isinstance(backbone_config, PretrainedConfig):
            raise TypeError(f"backbone_config must be a dict or PretrainedConfig, got {type(backbone_config).__name__}.")
        check_dual_encoder_config(backbone_config)
        if base_loss not in BASE_LOSS_NAMES:
            raise ValueError(f"base_loss must be one of {list(BASE_LOSS_NAMES)}, got {base_loss!r}.")
        if triplet_reduction not in ("mean", "sum"):
            raise ValueError(f"triplet_reduction must be 'mean' or 'sum', got {triplet_reduction!r}.")
        if local_loss and not gather_with_grad:
            raise ValueError(
                "local_loss=True needs gather_with_grad=True: each process computes only its own rows of the "
                "objective, and the other processes' rows reach their own samples only through the gather's gradient."
            )
        if not (math.isfinite(logit_scale_max) and logit_scale_max > 0):
            raise ValueError(f"logit_scale_max must be finite and > 0, got {logit_scale_max}.")
        for name, value in (("lora", lora), ("merged_lora", merged_lora)):
            if value is not None and not isinstance(value, dict):
                raise TypeError(f"{name} must be a dict of LoRA settings or None, got {type(value).__name__}.")
        if training_run is not None and not isinstance(training_run, dict):
            raise TypeError(f"training_run must be a dict or None, got {type(training_run).__name__}.")
        # PretrainedConfig.__init__ sets `_attn_implementation` (None unless given) recursively on the sub-configs: run it
        # before attaching the backbone config, which may be shared with a live backbone (`from_backbone`) whose
        # attention implementation must survive (with None, BERT towers ignore their padding mask).
        attn_implementation = kwargs.get("attn_implementation")
        super().__init__(**kwargs)
        self.backbone_config = backbone_config
        if attn_implementation is not None:
            self._attn_implementation = attn_implementation
        self.base_loss = base_loss
        self.gap_terms = validate_term_specs(gap_terms)
        self.triplet_margin = triplet_margin
        self.triplet_mining = triplet_mining
        self.triplet_reduction = triplet_reduction
        self.gather_with_grad = gather_with_grad
        self.local_loss = local_loss
        self.logit_scale_max = logit_scale_max
        self.lora = dict(lora) if lora else None
        self.merged_lora = dict(merged_lora) if merged_lora else None
        self.training_run = dict(training_run) if training_run else None

    def get_text_config(self, *args, **kwargs) -> PretrainedConfig:
        """The backbone's text config: its special tokens are the ones the tokenizer must match (the `Trainer` aligns
        them before training)."""
        backbone = self.__dict__.get("backbone_config")
        if backbone is None:  # called by PretrainedConfig.__init__'s checks, before the backbone is attached
            return super().get_text_config(*args, **kwargs)
        return backbone.get_text_config(*args, **kwargs)

    @property
    def resolved_base_loss(self) -> str:
        """The base loss actually used (`"auto"` resolved from the backbone family)."""
        if self.base_loss != "auto":
            return self.base_loss
        return SUPPORTED_BACKBONES[self.backbone_config.model_type]

    @property
    def term_weights(self) -> dict[str, float]:
        return {spec["name"]: spec["weight"] for spec in self.gap_terms}


def check_dual_encoder_config(config: PretrainedConfig, source: str | None = None) -> None:
    """Raise a ValueError unless ``config`` describes a supported image-text dual encoder."""
    if config.model_type not in SUPPORTED_BACKBONES:
        where = f" ({source})" if source else ""
        raise ValueError(
            f"{config.model_type!r}{where} is not a supported image-text dual encoder. gapclip wraps "
            f"{sorted(SUPPORTED_BACKBONES)} models, e.g. 'openai/clip-vit-base-patch16'; to pair a vision model with "
            "a text model, build a VisionTextDualEncoderModel first."
        )


AutoConfig.register("gapclip", GapClipConfig)
