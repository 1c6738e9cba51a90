#!/usr/bin/env python
"""Pretrain the demo-size encoders offline, so the gap terms can be studied from a pretrained start.

Trains, with the plain contrastive loss, on a synthetic *pretraining* corpus that is separate from the demo set
(its own random stream, continuous object positions and sizes, alt-text-style captions; see
``gapclip.data.pretraining``):

- ``clip``: the demo-size CLIP (3 layers, width 128, patch 8) with the all-MiniLM-L6-v2 WordPiece tokenizer;
- ``vtde``: a VisionTextDualEncoder of a small ViT and the real pretrained all-MiniLM-L6-v2 text tower.

Each run is deterministic and cached under ``$GAPCLIP_CACHE/pretrained`` (reused when finished, resumed when
interrupted). At the end it prints the zero-shot retrieval and modality gap on the fine-tuning test split and the
path to pass as ``--model_name_or_path`` to the training recipes and the method study:

    python recipes/pretrain_demo.py                     # the CLIP (about 12 minutes on 2 CPU cores)
    python recipes/pretrain_demo.py --backbone vtde     # the VisionTextDualEncoder (slower: a 22M-parameter text tower)
    accelerate launch recipes/train_clip_lgmgc.py --model_name_or_path PRINTED_PATH --demo_image_size 48
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields

from transformers import HfArgumentParser

from gapclip.cli import DataArguments, load_datasets
from gapclip.console import run_recipe
from gapclip.evaluation import format_retrieval_table
from gapclip.pretrain import PretrainSettings, pretrain_demo_backbone, pretrained_demo_path, zero_shot_metrics


@dataclass
class PretrainArguments:
    backbone: str = field(default="clip", metadata={"help": "clip | vtde | both"})
    num_train: int = field(default=12_000, metadata={"help": "Pretraining corpus: training images."})
    num_val: int = field(default=500, metadata={"help": "Pretraining corpus: held-out images."})
    image_size: int = field(default=48, metadata={"help": "Image size (also the demo data's, for the zero-shot test)."})
    corpus_seed: int = field(default=0, metadata={"help": "Seed of the pretraining corpus."})
    width: int = field(default=128, metadata={"help": "Tower width (the vtde text tower is MiniLM's own)."})
    layers: int = field(default=3, metadata={"help": "Layers per tower (the vision tower for vtde)."})
    epochs: float | None = field(default=None, metadata={"help": "Epochs (default: clip 10, vtde 3)."})
    learning_rate: float | None = field(default=None, metadata={"help": "Peak learning rate (clip 5e-4, vtde 1e-4)."})
    batch_size: int = field(default=64, metadata={"help": "Batch size."})
    seed: int = field(default=42, metadata={"help": "Seed of initialisation and data order."})
    output_root: str | None = field(default=None, metadata={"help": "Where runs go (default $GAPCLIP_CACHE/pretrained)."})

    def __post_init__(self):
        if self.backbone not in ("clip", "vtde", "both"):
            raise ValueError(f"--backbone must be clip, vtde or both, got {self.backbone!r}.")

    def settings(self) -> list[PretrainSettings]:
        names = {f.name for f in fields(PretrainSettings)} - {"backbone"}
        common = {name: getattr(self, name) for name in names if hasattr(self, name)}
        backbones = ("clip", "vtde") if self.backbone == "both" else (self.backbone,)
        return [PretrainSettings(backbone=backbone, **common) for backbone in backbones]


def main(argv: list[str] | None = None) -> dict[str, dict]:
    pretrain_args, data_args = HfArgumentParser((PretrainArguments, DataArguments)).parse_args_into_dataclasses(argv)
    if data_args.dataset == "demo":
        data_args.demo_image_size = pretrain_args.image_size  # the fine-tuning data at the pretrained image size
    test = load_datasets(data_args)[data_args.test_split]
    results = {}
    for settings in pretrain_args.settings():
        export = pretrain_demo_backbone(settings, root=pretrain_args.output_root)
        metrics = zero_shot_metrics(export, test)
        name = f"pretrained {settings.backbone}, zero-shot"
        results[name] = {"path": str(export), **metrics}
        report = pretrained_demo_path(settings, pretrain_args.output_root) / "zero_shot.json"
        report.write_text(json.dumps({"dataset": data_args.dataset, "split": data_args.test_split, **metrics}, indent=2))
        print(f"{settings.backbone}: fine-tune it with --model_name_or_path {export}", flush=True)
    table = format_retrieval_table(
        results, title=f"Zero-shot retrieval on the fine-tuning data ({data_args.dataset}/{data_args.test_split})"
    )
    print(table, flush=True)  # the recipe's result, for the person who ran it
    return results


if __name__ == "__main__":
    run_recipe(main)
