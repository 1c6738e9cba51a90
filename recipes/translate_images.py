#!/usr/bin/env python
"""Generate image "translations" (one caption per image) for LG-MGC's GST term.

Runs a captioning model (any transformers image-to-text / image-text-to-text pipeline model, e.g.
``Salesforce/blip-image-captioning-base``) over the images of a caption dataset and writes
``{"image_id", "translation"}`` lines to a JSONL file, flushed after every batch. Re-running the same command resumes
where it stopped. Train with the file afterwards:

    python recipes/translate_images.py --model_name_or_path Salesforce/blip-image-captioning-base \\
        --dataset karpathy --karpathy_json dataset_flickr30k.json --image_root flickr30k-images \\
        --splits train --output_file translations.jsonl --batch_size 32
    accelerate launch recipes/train_clip_lgmgc.py ... --translations translations.jsonl

The dataset flags are those of the training recipes (``--dataset demo|karpathy|hub|csv|jsonl`` ...).
"""

from __future__ import annotations

import logging as std_logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import transformers
from transformers import HfArgumentParser, set_seed
from transformers.utils import logging

from gapclip.cli import DataArguments, load_datasets
from gapclip.console import format_summary, run_recipe
from gapclip.translate import load_captioner, translate_images

logger = logging.get_logger(__name__)


@dataclass
class TranslateArguments:
    model_name_or_path: str = field(
        default="Salesforce/blip-image-captioning-base",
        metadata={"help": "Captioning model (Hub id or local folder) run as a transformers pipeline."},
    )
    output_file: str = field(default="translations.jsonl", metadata={"help": "JSONL file of {image_id, translation}."})
    batch_size: int = field(default=16, metadata={"help": "Images per captioning call (and per flush of the file)."})
    splits: list[str] = field(
        default_factory=lambda: ["train", "validation", "test"],
        metadata={"help": "Splits to translate (GST needs the training split; the others are optional)."},
    )
    max_new_tokens: int = field(default=30, metadata={"help": "Generation limit per caption."})
    prompt: str | None = field(
        default=None,
        metadata={
            "help": "Text prompt (default 'a picture of' for captioners, a one-sentence request for chat models)."
        },
    )
    device: str | None = field(default=None, metadata={"help": "Pipeline device, e.g. cuda:0 (default: CPU/auto)."})
    dtype: str | None = field(default=None, metadata={"help": "Model dtype, e.g. float16 or bfloat16."})
    no_resume: bool = field(default=False, metadata={"help": "Start a new file instead of resuming the existing one."})
    seed: int = field(default=42, metadata={"help": "Random seed (sampling captioners)."})

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}.")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if not self.splits:
            raise ValueError("--splits needs at least one split name (train, validation, test).")


def parse_args(argv: list[str] | None = None) -> tuple[DataArguments, TranslateArguments]:
    parser = HfArgumentParser((DataArguments, TranslateArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0])
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None, *, captioner: Any = None) -> str:
    """Run the recipe; ``captioner`` (a callable ``list[PIL] -> list[str]``) replaces the model, e.g. in tests."""
    # 1. Arguments
    data_args, args = parse_args(argv)

    # 2. Logging and seed
    std_logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=std_logging.INFO)
    transformers.utils.logging.set_verbosity_info()
    set_seed(args.seed)

    # 3. Data
    dataset = load_datasets(data_args)
    splits = [split for split in args.splits if split in dataset]
    missing = sorted(set(args.splits) - set(splits))
    if missing:
        logger.warning(f"Split(s) {missing} not in the dataset (it has {sorted(dataset)}); skipping them.")
    if not splits:
        raise ValueError(f"None of --splits {args.splits} is in the dataset; it has {sorted(dataset)}.")

    # 4. Captioner
    if captioner is None:
        captioner = load_captioner(
            args.model_name_or_path, max_new_tokens=args.max_new_tokens, prompt=args.prompt, device=args.device,
            dtype=args.dtype,
        )

    # 5. Translate every split into one file (image ids are unique across splits)
    for position, split in enumerate(splits):
        logger.info(f"Translating split {split!r} ({len(dataset[split])} rows) into {args.output_file}.")
        translate_images(
            dataset[split], captioner, batch_size=args.batch_size, output_jsonl=args.output_file,
            resume=not args.no_resume or position > 0, max_new_tokens=args.max_new_tokens, prompt=args.prompt,
        )

    # 6. Done
    logger.info(f"Translations written to {args.output_file}; train with --translations {args.output_file}.")
    print(format_summary(f"Translations written: {Path(args.output_file).resolve()}", [
        ("splits", ", ".join(splits)),
        ("next", f"train with --translations {Path(args.output_file).resolve()}"),
    ]), flush=True)
    return args.output_file


if __name__ == "__main__":
    run_recipe(main)
