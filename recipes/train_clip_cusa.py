#!/usr/bin/env python
"""Train a dual encoder with CUSA: Cross-modal (CSA, Eq. 6) and Uni-modal (USA, Eq. 8) Soft-label Alignment.

Teacher embeddings (a sentence-transformers text teacher and an image teacher) are precomputed once and stored
next to the data (``recipes/precompute_teachers.py``); this recipe precomputes them when they are missing, checks
that every training and evaluation id is covered, and trains base + α·CSA + β·USA.

    accelerate launch recipes/train_clip_cusa.py                      # offline demo, MiniLM text teacher
    accelerate launch recipes/train_clip_cusa.py --model_name_or_path openai/clip-vit-base-patch16 \\
        --dataset karpathy --karpathy_json dataset_flickr30k.json --image_root flickr30k-images \\
        --text_teacher sentence-transformers/all-mpnet-base-v2 --image_teacher PATH_OR_ID --output_dir out
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers.utils import logging

from gapclip.argument_checks import check_non_negative
from gapclip.cli import DataArguments, default_teacher_dir, load_datasets, parse_args, run_training, term_option_field
from gapclip.console import run_recipe
from gapclip.teachers import DEFAULT_TEXT_TEACHER_NAME, TeacherStore, check_coverage, precompute_teachers

logger = logging.get_logger(__name__)


@dataclass
class CUSAArguments:
    """CUSA terms. Defaults α = 0.1 (CSA) and β = 0.5 (USA) are the authors' released settings (paper range 0.1–1)."""

    csa: bool = field(default=True, metadata={"help": "Use Cross-modal Soft-label Alignment (--no_csa to drop)."})
    csa_weight: float = field(default=0.1, metadata={"help": "α, weight of CSA."})
    usa: bool = field(default=True, metadata={"help": "Use Uni-modal Soft-label Alignment (--no_usa to drop)."})
    usa_weight: float = field(default=0.5, metadata={"help": "β, weight of USA."})
    teacher_temperature: float = term_option_field(
        "csa", "teacher_temperature", help="temperature of the teacher softmax (Eq. 5), for CSA and USA"
    )
    teachers: str | None = field(
        default=None, metadata={"help": "teachers.safetensors (or its folder); default: 'teachers' next to the data."}
    )
    text_teacher: str | None = field(
        default=None, metadata={"help": "SentenceTransformer (paper: all-mpnet-base-v2); default offline MiniLM-L6."}
    )
    image_teacher: str = field(
        default="captions", metadata={"help": "Vision model (AutoModel) or 'captions' (mean caption embedding)."}
    )
    teacher_batch_size: int = field(default=64, metadata={"help": "Batch size of the teacher precompute."})

    def __post_init__(self):
        check_non_negative("--csa_weight", self.csa_weight)
        check_non_negative("--usa_weight", self.usa_weight)
        check_non_negative("--teacher_temperature", self.teacher_temperature, strictly=True)
        if self.teacher_batch_size < 1:
            raise ValueError(f"--teacher_batch_size must be >= 1, got {self.teacher_batch_size}.")

    def gap_terms(self) -> list[dict]:
        options = {"teacher_temperature": self.teacher_temperature}
        terms = []
        if self.csa:
            terms.append({"name": "csa", "weight": self.csa_weight, "options": dict(options)})
        if self.usa:
            terms.append({"name": "usa", "weight": self.usa_weight, "options": dict(options)})
        return terms


def prepare_teachers(method: CUSAArguments, data_args: DataArguments) -> TeacherStore:
    """Load the teacher embeddings, computing them first when missing; every used id must be covered."""
    datasets = load_datasets(data_args)
    target = Path(method.teachers) if method.teachers else default_teacher_dir(data_args)
    file = target if target.suffix == ".safetensors" else target / "teachers.safetensors"
    if not file.is_file():
        file = precompute_teachers(
            datasets, output_dir=file.parent, text_teacher=method.text_teacher, image_teacher=method.image_teacher,
            batch_size=method.teacher_batch_size,
        )
    store = TeacherStore.load(file)
    wanted = {"text_teacher": method.text_teacher or DEFAULT_TEXT_TEACHER_NAME, "image_teacher": method.image_teacher}
    recorded = {"text_teacher": store.text_teacher, "image_teacher": store.image_teacher}
    if wanted != recorded:  # a file precomputed with other teachers is used as it is; say so rather than recompute
        logger.warning(
            f"{file} was computed with teachers {recorded}, not the {wanted} named by the flags; using it as it is. "
            "Pass --teachers with another folder (or delete the file) to compute it with the flagged teachers."
        )
    check_coverage(store, datasets)
    logger.info(f"CUSA teachers: {store} from {file}")
    return store


def main(argv: list[str] | None = None):
    model_args, data_args, method, lora_args, training_args = parse_args(CUSAArguments, argv)
    store = prepare_teachers(method, data_args) if method.csa or method.usa else None
    return run_training(
        model_args, data_args, training_args, method.gap_terms(), teacher_store=store, lora_args=lora_args
    )


if __name__ == "__main__":
    run_recipe(main)
