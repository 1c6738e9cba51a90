#!/usr/bin/env python
"""Export a gapclip training checkpoint as a plain dual encoder (CLIP, SigLIP, VisionTextDualEncoder) for release.

The output folder holds the backbone in its native `transformers` format (LoRA adapters merged), its processor,
``gapclip_training.json`` and a model card, so ``AutoModel.from_pretrained(OUT)`` works without gapclip:

    python recipes/export.py outputs/demo outputs/demo-release --eval_results outputs/demo/retrieval.json

and optionally pushes that folder to a model repository:

    python recipes/export.py outputs/demo outputs/demo-release --push_to_hub --hub_model_id me/clip-lgmgc

An existing export (e.g. ``OUTPUT_DIR/export`` of a training run whose push failed) is pushed as it is:

    python recipes/export.py outputs/demo/export --push_to_hub --hub_model_id me/clip-lgmgc

The card's hyper-parameters (learning rate, schedule, batch size, ...) and training-data description are those the
training run recorded in the checkpoint's config, so this export's card is the one written at the end of the run.

``--eval_results`` takes ``retrieval.json`` (its "after training" row) or ``test_results.json`` written by a
training recipe, or ``{dataset: {"i2t_r1": ..., "rsum": ..., "modality_gap": ...}}`` for several datasets.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser
from transformers.utils import logging

from gapclip.cli import import_term_modules
from gapclip.console import format_summary, run_recipe
from gapclip.hub import TRAINING_CONFIG_NAME, export_backbone, push_exported, push_failed_error

logger = logging.get_logger(__name__)


@dataclass
class ExportArguments:
    checkpoint: str = field(
        metadata={"help": "A gapclip checkpoint folder (a training output_dir or checkpoint-N), or an existing "
                          "export to push as it is."}
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Folder the release is written to (not for an existing export)."}
    )
    keep_lora: bool = field(
        default=False, metadata={"help": "Write LoRA adapters in peft format instead of merging them."}
    )
    processor_name_or_path: str | None = field(
        default=None, metadata={"help": "Processor to ship, if the checkpoint folder has none."}
    )
    eval_results: str | None = field(default=None, metadata={"help": "JSON file of retrieval metrics for the card."})
    eval_dataset_name: str = field(
        default="evaluation", metadata={"help": "Dataset name for flat metrics in --eval_results."}
    )
    eval_split: str | None = field(default="test", metadata={"help": "Split the --eval_results were measured on."})
    license: str = field(default="apache-2.0", metadata={"help": "License of the release (match the base model's)."})
    datasets: str | None = field(default=None, metadata={"help": "Comma-separated training dataset ids for the card."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the export to --hub_model_id."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Repository id (owner/name) to push to."})
    hub_token: str | None = field(default=None, metadata={"help": "Token (default: the logged-in one)."})
    hub_private_repo: bool | None = field(default=None, metadata={"help": "Create the repository as private."})
    term_module: str | None = field(
        default=None,
        metadata={"help": "Python file or module registering the gap terms of your own the checkpoint uses."},
    )

    def __post_init__(self):
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (owner/name).")
        if is_export(self.checkpoint):
            if not self.push_to_hub:
                raise ValueError(
                    f"{self.checkpoint!r} already is an export: add --push_to_hub --hub_model_id OWNER/NAME to upload "
                    "it as it is, or give the training checkpoint it came from to export it again."
                )
            if self.output_dir and Path(self.output_dir).resolve() != Path(self.checkpoint).resolve():
                raise ValueError(f"{self.checkpoint!r} is an export: it is pushed as is, without --output_dir.")
            return
        if not Path(self.checkpoint, "config.json").is_file():
            raise ValueError(f"--checkpoint {self.checkpoint!r} is not a checkpoint folder (no config.json).")
        if not self.output_dir:
            raise ValueError("--output_dir (the second positional argument) is required: where the release goes.")


def is_export(folder: str) -> bool:
    """Whether ``folder`` is what ``export_backbone`` writes (a native model or adapter with its training record)."""
    folder = Path(folder)
    if not (folder / TRAINING_CONFIG_NAME).is_file():
        return False
    if (folder / "adapter_config.json").is_file():
        return True
    config = folder / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") != "gapclip"


def read_eval_results(path: str, dataset_name: str) -> dict[str, Any]:
    """``{dataset: metrics}`` from a retrieval.json / test_results.json / per-dataset JSON file."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"--eval_results {path!r} must hold a JSON object, got {type(data).__name__}.")
    if isinstance(data.get("after training"), dict):  # retrieval.json of a training recipe
        return {dataset_name: data["after training"]}
    if all(not isinstance(value, dict) for value in data.values()):  # flat metrics (test_results.json)
        return {dataset_name: data}
    return data


def positional_to_flags(argv: list[str]) -> list[str]:
    """``CHECKPOINT OUT [flags]`` → ``--checkpoint CHECKPOINT --output_dir OUT [flags]``."""
    names = ["--checkpoint", "--output_dir"]
    converted: list[str] = []
    rest = list(argv)
    while names and rest and not rest[0].startswith("-"):
        converted += [names.pop(0), rest.pop(0)]
    return converted + rest


def main(argv: list[str] | None = None) -> Path:
    # 1. parse
    parser = HfArgumentParser(ExportArguments)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        (args,) = parser.parse_json_file(argv[0])
    else:
        (args,) = parser.parse_args_into_dataclasses(args=positional_to_flags(argv))
    logging.set_verbosity_info()

    if is_export(args.checkpoint):  # already exported (e.g. a training run whose push failed): push it as it is
        return _push(Path(args.checkpoint), args, exported=False)

    # 2. processor and results
    processor = None
    if args.processor_name_or_path:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(args.processor_name_or_path)
    eval_results = read_eval_results(args.eval_results, args.eval_dataset_name) if args.eval_results else None
    card_data: dict[str, Any] = {"license": args.license}
    if args.datasets:
        card_data["datasets"] = [name.strip() for name in args.datasets.split(",") if name.strip()]

    # 3. export
    import_term_modules(args.term_module)
    output_dir = export_backbone(
        args.checkpoint, args.output_dir, processor=processor, merge_lora=not args.keep_lora,
        eval_results=eval_results, eval_split=args.eval_split, card_data=card_data, repo_id=args.hub_model_id,
    )

    # 4. push, and where everything went
    return _push(output_dir, args, exported=True)


def _push(output_dir: Path, args: ExportArguments, *, exported: bool) -> Path:
    if args.push_to_hub:
        try:
            push_exported(output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo)
        except Exception as err:  # noqa: BLE001 - whatever the Hub client raised, the export is safe on disk
            raise push_failed_error(output_dir, args.hub_model_id, err) from err
    print(format_summary(f"Export {'written' if exported else 'unchanged'}: {output_dir.resolve()}", [
        ("card", output_dir.resolve() / "README.md"),
        ("Hub", f"pushed to {args.hub_model_id}" if args.push_to_hub else None),
    ]), flush=True)
    return output_dir


if __name__ == "__main__":
    run_recipe(main)
