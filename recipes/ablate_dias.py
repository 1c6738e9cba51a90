#!/usr/bin/env python
"""DIAS ablation (shaped like the paper's Table 4), same seed and budget for every row:

triplet baseline, +L_dim, +L_inter, +L_intra, full DIAS with dense constraints, full DIAS with random batches,
and full DIAS (sparse constraints + K-means neighbour batches).

    python recipes/ablate_dias.py --output_dir outputs/ablation-dias --num_train_epochs 4
"""

from __future__ import annotations

import dataclasses

from gapclip.ablation import Variant, run_ablation
from gapclip.cli import parse_args
from gapclip.console import run_recipe

from train_clip_dias import DIASArguments, use_paper_base_loss  # noqa: E402  (sibling recipe)


def variants(method: DIASArguments, pair_mode: str) -> list[Variant]:
    def only(**flags) -> DIASArguments:
        return dataclasses.replace(method, **{"dias_dim": False, "dias_inter": False, "dias_intra": False, **flags})

    def row(name: str, args: DIASArguments) -> Variant:
        return Variant(name, args.gap_terms(), run_kwargs={"batch_sampler_factory": args.batch_sampler_factory(pair_mode)})

    random_batches = {"neighbour_batches": False}
    return [
        row("Triplet baseline", only(**random_batches)),
        row("+L_dim", only(dias_dim=True, **random_batches)),
        row("+L_inter", only(dias_inter=True, **random_batches)),
        row("+L_intra", only(dias_intra=True, **random_batches)),
        row("DIAS, dense constraints", dataclasses.replace(method, sparse=False)),
        row("DIAS, random batches", dataclasses.replace(method, **random_batches)),
        row("DIAS (full)", method),
    ]


def main(argv: list[str] | None = None):
    model_args, data_args, method, lora_args, training_args = parse_args(DIASArguments, argv)
    use_paper_base_loss(model_args)
    return run_ablation(
        variants(method, data_args.pair_mode), model_args, data_args, training_args, lora_args=lora_args,
        title=f"DIAS ablation on {data_args.dataset}/{data_args.test_split}",
    )


if __name__ == "__main__":
    run_recipe(main)
