"""Ablation runner: train several objectives with the same seed, data and budget; print one table.

Each row is a :class:`Variant` (name + gap terms + model overrides); every variant starts from the same
initialisation (same seed) and trains for the same number of steps, then is evaluated on the same split. The
table is shaped like the papers' ablations (R@1/5/10 both ways, RSUM) with the modality gap per row, and is
written as Markdown and JSON.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.utils import logging

from .cli import DataArguments, GapClipTrainingArguments, ModelArguments, run_training
from .evaluation import format_retrieval_table

logger = logging.get_logger(__name__)


@dataclass
class Variant:
    name: str
    gap_terms: list[dict[str, Any]] = field(default_factory=list)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data_overrides: dict[str, Any] = field(default_factory=dict)
    run_kwargs: dict[str, Any] = field(default_factory=dict)


def run_ablation(
    variants: list[Variant],
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: GapClipTrainingArguments,
    *,
    title: str,
    output_dir: str | Path | None = None,
    lora_args: Any = None,
    runner=run_training,
) -> dict[str, dict[str, float]]:
    """Train and evaluate every variant; returns ``{variant name: test metrics}`` and writes ablation.{md,json}."""
    names = [variant.name for variant in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"Ablation variant names must be unique, got {names}.")
    output_dir = Path(output_dir or training_args.output_dir)
    rows: dict[str, dict[str, float]] = {}
    for variant in variants:
        logger.warning(f"Ablation: training variant {variant.name!r} with terms {variant.gap_terms}")
        run_model_args = dataclasses.replace(copy.deepcopy(model_args), **variant.model_overrides)
        run_data_args = dataclasses.replace(copy.deepcopy(data_args), skip_initial_eval=True, **variant.data_overrides)
        run_training_args = copy.deepcopy(training_args)
        run_training_args.output_dir = str(output_dir / _slug(variant.name))
        result = runner(
            run_model_args, run_data_args, run_training_args, variant.gap_terms, lora_args=lora_args,
            **variant.run_kwargs,
        )
        rows[variant.name] = result["rows"]["after training"]
        if result["trainer"] is not None:  # None: the variant's folder already held its finished run
            result["trainer"].accelerator.free_memory()
    table = format_retrieval_table(rows, title=title)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "ablation.md").write_text(table + "\n")
    (output_dir / "ablation.json").write_text(json.dumps(rows, indent=2))
    print(table, flush=True)  # the runner's result, for the person who ran it
    from .console import format_summary

    print(format_summary(f"Ablation finished: {output_dir.resolve()}", [
        ("tables", f"{output_dir.resolve() / 'ablation.md'}, {output_dir.resolve() / 'ablation.json'}"),
        ("runs", ", ".join(str(output_dir.resolve() / _slug(variant.name)) for variant in variants)),
    ]), flush=True)
    return rows


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_").lower() or "variant"
