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
from .cli import DataArguments, load_datasets
from .configuration import GapClipConfig
from .console import format_summary
from .data import TextCollator
from .evaluation import (
    build_positive_sets,
    eccv_metrics,
    format_retrieval_table,
    load_extra_positives,
    load_sts_pairs,
    sts_spearman,
    unimodal_recall_at_k,
)
from .inference import embed_caption_dataset, retrieval_report
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
    eccv: bool = field(default=False, metadata={"help": "Also ECCV-Caption mAP@R and R-Precision."})
    eccv_positives: str | None = field(default=None, metadata={"help": "JSON/JSONL of extra positive pairs."})
    label_column: str | None = field(default=None, metadata={"help": "Class-label column: image→image R@1."})
    sts_file: str | None = field(default=None, metadata={"help": "STS pairs (sentence1, sentence2, score)."})
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
    metrics = retrieval_report(
        embedded, chunk_size=eval_args.chunk_size, gap_pairs=eval_args.modality_gap_pairs, coco_1k=data_args.coco_1k
    )
    if eval_args.eccv or eval_args.eccv_positives:
        extra = load_extra_positives(eval_args.eccv_positives) if eval_args.eccv_positives else ()
        i2t, t2i = build_positive_sets(
            embedded.text_to_image, len(dataset), extra_pairs=extra, image_ids=list(dataset["image_id"])
        )
        metrics.update(eccv_metrics(embedded.image_embeds, embedded.text_embeds, i2t, t2i, chunk_size=eval_args.chunk_size))
    if eval_args.label_column:
        if eval_args.label_column not in dataset.column_names:
            raise ValueError(
                f"--label_column {eval_args.label_column!r} is not a column of the {eval_args.split} split; "
                f"it has {dataset.column_names}."
            )
        labels = _label_ids(dataset[eval_args.label_column])
        unimodal = unimodal_recall_at_k(embedded.image_embeds, labels, ks=(1,), chunk_size=eval_args.chunk_size)
        metrics.update({f"image_{key}": value for key, value in unimodal.items()})
    if eval_args.sts_file:
        metrics["sts_spearman"] = _sts(model, processor, eval_args, data_args)
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


def _label_ids(values: list[Any]) -> torch.Tensor:
    lookup: dict[Any, int] = {}
    return torch.tensor([lookup.setdefault(value, len(lookup)) for value in values], dtype=torch.long)


def _sts(model: GapClipModel, processor: Any, eval_args: EvaluationArguments, data_args: DataArguments) -> float:
    pairs = load_sts_pairs(eval_args.sts_file)
    collate = TextCollator(processor, max_length=data_args.max_length)

    def embed(texts: list[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), eval_args.batch_size):
            batch = collate(texts[start : start + eval_args.batch_size])
            with torch.no_grad():
                out.append(model.get_text_features(batch["input_ids"], batch.get("attention_mask")))
        return torch.cat(out)

    return sts_spearman(embed(pairs.sentence1), embed(pairs.sentence2), pairs.scores)


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
