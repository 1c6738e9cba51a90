#!/usr/bin/env python
"""LG-MGC ablation (shaped like the supplement's Tables 2–3): baseline, each LSC fusion, each GST distance, full.

Every row trains with the same seed and budget; the table (R@1/5/10 both ways, RSUM, modality gap) is printed
and written to OUTPUT_DIR/ablation.{md,json}:

    python recipes/ablate_lgmgc.py --output_dir outputs/ablation-lgmgc --num_train_epochs 4

All recipe flags of train_clip_lgmgc.py apply (model, data, budget); the LG-MGC options set each row's k/weights.
"""

from __future__ import annotations

from gapclip.ablation import Variant, run_ablation
from gapclip.cli import parse_args
from gapclip.console import run_recipe

from train_clip_lgmgc import LGMGCArguments  # noqa: E402  (sibling recipe)


def variants(method: LGMGCArguments) -> list[Variant]:
    def lsc(fusion):
        return {"name": "lsc", "weight": method.lsc_weight, "options": {"k": method.lsc_k, "fusion": fusion}}

    def gst(distance):
        return {"name": "gst", "weight": method.gst_weight,
                "options": {"distance": distance, "on_missing": method.gst_on_missing}}

    return [
        Variant("Baseline"),
        Variant("+LSC_max", [lsc("max")]),
        Variant("+LSC_mean", [lsc("mean")]),
        Variant("+LSC_concat", [lsc("concat")]),
        Variant("+GST_kl", [gst("kl")]),
        Variant("+GST_l2", [gst("l2")]),
        Variant("+GST_infonce", [gst("infonce")]),
        Variant("LG-MGC (LSC_concat + GST_infonce)", [lsc("concat"), gst("infonce")]),
    ]


def main(argv: list[str] | None = None):
    model_args, data_args, method, lora_args, training_args = parse_args(LGMGCArguments, argv)
    return run_ablation(
        variants(method), model_args, data_args, training_args, lora_args=lora_args,
        title=f"LG-MGC ablation on {data_args.dataset}/{data_args.test_split}",
    )


if __name__ == "__main__":
    run_recipe(main)
