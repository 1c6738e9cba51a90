#!/usr/bin/env python
"""CUSA ablation (shaped like the paper's Table 5): baseline, +CSA, +USA, +CUSA, same seed and budget.

    python recipes/ablate_cusa.py --output_dir outputs/ablation-cusa --num_train_epochs 4

Teacher embeddings are computed once (if missing) and shared by every row; the table is printed and written to
OUTPUT_DIR/ablation.{md,json}.
"""

from __future__ import annotations

from gapclip.ablation import Variant, run_ablation
from gapclip.cli import parse_args
from gapclip.console import run_recipe

from train_clip_cusa import CUSAArguments, prepare_teachers  # noqa: E402  (sibling recipe)


def variants(method: CUSAArguments, store) -> list[Variant]:
    options = {"teacher_temperature": method.teacher_temperature}
    csa = {"name": "csa", "weight": method.csa_weight, "options": options}
    usa = {"name": "usa", "weight": method.usa_weight, "options": options}
    with_teachers = {"teacher_store": store}
    return [
        Variant("Baseline"),
        Variant("+CSA", [csa], run_kwargs=with_teachers),
        Variant("+USA", [usa], run_kwargs=with_teachers),
        Variant("+CUSA", [csa, usa], run_kwargs=with_teachers),
    ]


def main(argv: list[str] | None = None):
    model_args, data_args, method, lora_args, training_args = parse_args(CUSAArguments, argv)
    store = prepare_teachers(method, data_args)
    return run_ablation(
        variants(method, store), model_args, data_args, training_args, lora_args=lora_args,
        title=f"CUSA ablation on {data_args.dataset}/{data_args.test_split}",
    )


if __name__ == "__main__":
    run_recipe(main)
