#!/usr/bin/env python
"""Train a dual encoder (CLIP, SigLIP, VisionTextDualEncoder) with LG-MGC's modality-gap correction.

LG-MGC = Local-driven Semantic Completion (LSC) + Generative-driven Semantic Translation (GST). Only the paper's
supplement is available; the objective implemented is *our reading* of it (see README, "LG-MGC").

With no arguments it trains a small CLIP from scratch on the built-in offline demo data (CPU, minutes) and prints
a retrieval table before and after training:

    accelerate launch recipes/train_clip_lgmgc.py

On your data, from a pretrained checkpoint (flags or a single YAML/JSON file):

    accelerate launch recipes/train_clip_lgmgc.py --model_name_or_path openai/clip-vit-base-patch16 \\
        --dataset karpathy --karpathy_json dataset_flickr30k.json --image_root flickr30k-images \\
        --translations translations.jsonl --output_dir out
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gapclip.argument_checks import check_declared_choices, check_non_negative
from gapclip.cli import parse_args, run_training, term_option_field
from gapclip.console import run_recipe


@dataclass
class LGMGCArguments:
    """LG-MGC terms; defaults are the supplement's recommended full method (LSC concat + GST InfoNCE, weights 1).
    The option flags take their defaults and choices from the terms (`gapclip.losses.lgmgc`)."""

    lsc: bool = field(default=True, metadata={"help": "Use Local-driven Semantic Completion (--no_lsc to drop)."})
    lsc_weight: float = field(default=1.0, metadata={"help": "Weight of the LSC term."})
    lsc_k: int = term_option_field("lsc", "k")
    lsc_fusion: str = term_option_field("lsc", "fusion")
    gst: bool = field(default=True, metadata={"help": "Use Generative-driven Semantic Translation (--no_gst to drop)."})
    gst_weight: float = field(default=1.0, metadata={"help": "Weight of the GST term."})
    gst_distance: str = term_option_field("gst", "distance")
    gst_on_missing: str = term_option_field("gst", "on_missing")

    def __post_init__(self):
        check_declared_choices(self)  # the terms' own choices (term_option_field), for config files too
        if self.lsc_k < 1:
            raise ValueError(f"--lsc_k must be >= 1, got {self.lsc_k}.")
        check_non_negative("--lsc_weight", self.lsc_weight)
        check_non_negative("--gst_weight", self.gst_weight)

    def gap_terms(self) -> list[dict]:
        terms = []
        if self.lsc:
            terms.append({"name": "lsc", "weight": self.lsc_weight, "options": {"k": self.lsc_k, "fusion": self.lsc_fusion}})
        if self.gst:
            terms.append({
                "name": "gst", "weight": self.gst_weight,
                "options": {"distance": self.gst_distance, "on_missing": self.gst_on_missing},
            })
        return terms


def main(argv: list[str] | None = None):
    model_args, data_args, method_args, lora_args, training_args = parse_args(LGMGCArguments, argv)
    return run_training(model_args, data_args, training_args, method_args.gap_terms(), lora_args=lora_args)


if __name__ == "__main__":
    run_recipe(main)
