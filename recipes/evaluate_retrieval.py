#!/usr/bin/env python
"""Evaluate any checkpoint on image↔text retrieval, printed as in the papers (R@1/5/10 both ways, RSUM, gap).

    python recipes/evaluate_retrieval.py --model_name_or_path out --dataset karpathy \\
        --karpathy_json dataset_flickr30k.json --image_root flickr30k-images --output_json out/test.json

`--model_name_or_path` may be a gapclip training checkpoint, an exported model, or any CLIP / SigLIP /
VisionTextDualEncoder (Hub id or folder). Add `--coco_1k` for COCO's 1K protocol, `--eccv [--eccv_positives F]`
for ECCV-Caption mAP@R / R-Precision, `--label_column C` for image→image R@1, `--sts_file F` for STS Spearman,
and `--plots` for the similarity-map and modality-gap pictures.
"""

from __future__ import annotations

from gapclip.console import run_recipe
from gapclip.evaluate_cli import main

if __name__ == "__main__":
    run_recipe(main)
