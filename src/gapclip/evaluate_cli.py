"""The evaluation recipe's logic: load any checkpoint, embed a split, print the paper-style table, write JSON.

Besides image↔text retrieval (R@1/5/10, RSUM, modality gap, optional COCO 1K), it offers the CUSA evaluation
additions: ECCV-Caption mAP@R / R-Precision (with an optional file of extra positives), uni-modal image retrieval
R@1 given a class-label column, and STS Spearman correlation of the text tower.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoProcessor, HfArgumentParser
from transformers.utils import logging

from .argument_checks import check_model_path, parse_json_flag, require_module
from .cli import DataArguments, build_evaluators, import_term_modules, load_datasets
from .configuration import GapClipConfig
from .console import format_summary
from .evaluation import EvaluationContext, RetrievalEvaluator, format_retrieval_table, run_evaluators
from .inference import embed_caption_dataset
from .modeling import GapClipModel

logger = logging.get_logger(__name__)


@dataclass
class EvaluationArguments:
    model_name_or_path: str = field(
        default=None, metadata={"help": "A gapclip checkpoint/export or any supported dual encoder (Hub id or folder)."}
    )
    processor_name_or_path: str | None = field(default=None, metadata={"help": "Processor, if not the model's."})
    split: str = field(default="test", metadata={"help": "Split to evaluate."})
    batch_size: int = field(default=128, metadata={"help": "Embedding batch size."})
    chunk_size: int = field(default=1024, metadata={"help": "Query chunk of the similarity computation."})
    modality_gap_pairs: int = field(default=1000, metadata={"help": "Pairs for the modality gap (1000, LG-MGC)."})
    output_json: str | None = field(default=None, metadata={"help": "Where to write the metrics (JSON)."})
    name: str | None = field(default=None, metadata={"help": "Row name in the table (default: the model path)."})
    term_module: str | None = field(
        default=None,
        metadata={"help": "Python file or module registering the gap terms of your own the checkpoint uses."},
    )
    plots: bool = field(default=False, metadata={"help": "Write similarity-map and modality-gap PNGs (matplotlib)."})
    plots_dir: str | None = field(default=None, metadata={"help": "Folder of the PNGs (default: next to the JSON)."})
    plot_substitutions: str | None = field(
        default=None,
        metadata={"help": "JSON word substitutions for extra similarity-map panels, e.g. '{\"red\": \"blue\"}'."},
    )

    def __post_init__(self):
        if not self.model_name_or_path:
            raise ValueError("--model_name_or_path is required (a gapclip checkpoint or a dual encoder).")
        check_model_path("--model_name_or_path", self.model_name_or_path)
        check_model_path("--processor_name_or_path", self.processor_name_or_path)
        if self.plots:  # checked now, not after minutes of embedding
            require_module("--plots", "matplotlib", "plots")
        parse_json_flag("--plot_substitutions", self.plot_substitutions, dict)


def load_for_evaluation(path: str, processor_path: str | None = None) -> tuple[GapClipModel, Any]:
    """A gapclip checkpoint as it is, or a native dual encoder wrapped without gap terms."""
    config = AutoConfig.from_pretrained(path)
    model = GapClipModel.from_pretrained(path) if config.model_type == GapClipConfig.model_type else (
        GapClipModel.from_backbone(path)
    )
    processor = AutoProcessor.from_pretrained(processor_path or path)
    return model.eval(), processor


def evaluate(eval_args: EvaluationArguments, data_args: DataArguments) -> dict[str, float]:
    import_term_modules(eval_args.term_module)
    model, processor = load_for_evaluation(eval_args.model_name_or_path, eval_args.processor_name_or_path)
    datasets = load_datasets(data_args)
    if eval_args.split not in datasets:
        raise ValueError(f"--split {eval_args.split!r} is not in the dataset; it has {sorted(datasets)}.")
    dataset = datasets[eval_args.split]
    if data_args.max_eval_samples:
        dataset = dataset.select(range(min(data_args.max_eval_samples, len(dataset))))
    padding = "max_length" if model.config.backbone_config.model_type in ("siglip", "siglip2") else "longest"
    embedded = embed_caption_dataset(
        model, dataset, processor, batch_size=eval_args.batch_size, padding=padding, max_length=data_args.max_length
    )
    context = EvaluationContext(
        model=model, processor=processor, dataset=dataset, embedded=embedded, batch_size=eval_args.batch_size,
        chunk_size=eval_args.chunk_size, max_length=data_args.max_length, padding=padding,
    )
    retrieval = RetrievalEvaluator(gap_pairs=eval_args.modality_gap_pairs, coco_1k=data_args.coco_1k)
    metrics = run_evaluators([retrieval, *build_evaluators(data_args)], context)
    plots = None
    if eval_args.plots:
        metrics_dir = Path(eval_args.plots_dir or Path(eval_args.output_json or "plots.json").parent)
        substitutions = parse_json_flag("--plot_substitutions", eval_args.plot_substitutions, dict) or {}
        plots = _plots(model, processor, dataset, embedded, metrics_dir, substitutions)
    row = eval_args.name or eval_args.model_name_or_path
    print(format_retrieval_table({row: metrics}, title=f"{data_args.dataset} / {eval_args.split}"), flush=True)
    print(json.dumps(metrics, indent=2), flush=True)
    if eval_args.output_json:
        Path(eval_args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(eval_args.output_json).write_text(json.dumps({row: metrics}, indent=2))
    written = Path(eval_args.output_json).resolve() if eval_args.output_json else "printed only (no --output_json)"
    title = f"Evaluation finished: {eval_args.model_name_or_path} on {data_args.dataset}/{eval_args.split}"
    print(format_summary(title, [
        ("metrics", written),
        ("plots", ", ".join(str(path.resolve()) for path in plots) if plots else None),
    ]), flush=True)
    return metrics


def _plots(model, processor, dataset, embedded, out_dir: Path, substitutions: dict[str, str]) -> list[Path]:
    from .plots import modality_gap_plot, patch_similarity_map, substitute_words  # matplotlib: checked at parsing
    out_dir.mkdir(parents=True, exist_ok=True)
    first = dataset[0]
    captions = [first["captions"][0]]
    for word, replacement in substitutions.items():  # the supplement's Fig. 1: one word changed per panel
        if word.lower() in captions[0].lower().split():
            captions.append(substitute_words(captions[0], {word: replacement}))
    patch_similarity_map(model, processor, first["image"], captions, output_path=out_dir / "similarity_map.png")
    modality_gap_plot(
        embedded.image_embeds, embedded.text_embeds[_first_caption_rows(embedded.text_to_image)],
        output_path=out_dir / "modality_gap.png",
    )
    return [out_dir / "similarity_map.png", out_dir / "modality_gap.png"]


def _first_caption_rows(text_to_image: torch.Tensor) -> torch.Tensor:
    rows = torch.full((int(text_to_image.max()) + 1,), -1, dtype=torch.long)
    for position in range(len(text_to_image) - 1, -1, -1):
        rows[text_to_image[position]] = position
    return rows[rows >= 0]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser((EvaluationArguments, DataArguments))
    argv = sys.argv[1:] if argv is None else argv  # from the shell too, as the training recipes
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        loader = parser.parse_yaml_file if argv[0].endswith((".yaml", ".yml")) else parser.parse_json_file
        eval_args, data_args = loader(os.path.abspath(argv[0]))
    else:
        eval_args, data_args = parser.parse_args_into_dataclasses(args=argv)
    return evaluate(eval_args, data_args)
