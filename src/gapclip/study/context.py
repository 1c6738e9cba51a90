"""What the study's runs share in one regime: the data, the teachers, the starting model and its processor."""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from .runs import RunContext, RunSpec, evaluate_split

logger = logging.get_logger(__name__)

#: Bumped whenever a change to the study's procedure makes cached runs stale.
STUDY_VERSION = "study-v1"
#: The data flags that decide what a run trains and is scored on (the cache key's data part): flags added to
#: DataArguments for other purposes (evaluation extras, streaming, checks) leave cached runs valid.
DATA_KEY_FIELDS = (
    "dataset", "karpathy_json", "image_root", "dataset_name", "data_file", "image_column", "caption_column",
    "id_column", "train_split", "eval_split", "test_split", "translations", "extra_columns", "max_length",
    "max_train_samples", "max_eval_samples", "demo_train", "demo_val", "demo_test", "demo_image_size",
)


def load_study_data(data_args: Any) -> Any:
    """Train / validation / test splits of ``data_args`` (with ``--max_train_samples`` / ``--max_eval_samples``)."""
    from ..cli import load_datasets

    datasets = load_datasets(data_args)
    splits = {}
    for role, name, limit in (
        ("train", data_args.train_split, data_args.max_train_samples),
        ("validation", data_args.eval_split, data_args.max_eval_samples),
        ("test", data_args.test_split, data_args.max_eval_samples),
    ):
        if name not in datasets:
            raise ValueError(f"Split {name!r} (the study's {role} split) not in the dataset; it has {sorted(datasets)}.")
        split = datasets[name]
        splits[role] = split if limit is None or limit >= len(split) else split.select(range(limit))
    return splits


def study_inputs(study: Any, datasets: dict[str, Any]) -> tuple[set[str], Any, dict[str, str]]:
    """Which per-row inputs the data offers (``"translation"``, ``"teacher"``), the CUSA teachers, and the variants
    that cannot run here with the reason."""
    from ..cli import default_teacher_dir

    available: set[str] = set()
    reasons: dict[str, str] = {}
    train = datasets["train"]
    if "translation" in train.column_names and all(t is not None for t in train["translation"]):
        available.add("translation")
    else:
        reasons["translation"] = (
            "the training split has no complete 'translation' column (GST needs a generated caption per image: "
            "recipes/translate_images.py, then --translations FILE.jsonl)"
        )
    teachers = None
    if "CUSA" in study.settings.families:
        from ..teachers import TeacherStore, check_coverage, precompute_teachers

        # The training split alone (the only one CUSA reads), beside the recipes' teachers file; a finished file for
        # the same data and teachers is reused by precompute_teachers itself.
        folder = default_teacher_dir(study.data_args) / "study_train"
        teachers = TeacherStore.load(precompute_teachers(datasets["train"], output_dir=folder,
                                                         show_progress=study.show_progress))
        check_coverage(teachers, datasets["train"])
        available.add("teacher")
    skipped = {
        variant.name: "; ".join(reasons[need] for need in sorted(variant.needs - available))
        for variant in study.settings.variants()
        if not variant.needs <= available and variant.needs - available <= set(reasons)
    }
    for name, reason in skipped.items():
        logger.warning(f"Study: skipping {name!r}: {reason}.")
    return available, teachers, skipped


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def start_digest(path: Path) -> str:
    """A digest of a saved start's config and weights, by content: runs are cached under it, and a start remade on
    another machine (same settings, same file sizes, weights that differ by float rounding) must not reuse runs of
    the first. Hashing a ViT-B/16 checkpoint takes about a second, once per study."""
    digest = hashlib.sha1()
    files = [path / "config.json"] + sorted(f for f in path.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file())
    for file in files:
        if not file.is_file():
            continue
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def _pretrained_start(study: Any) -> tuple[str, Any, Any]:
    """(path, backbone, processor) of the regime's pretrained start."""
    from transformers import AutoConfig, AutoModel, AutoProcessor

    from ..configuration import GapClipConfig, check_dual_encoder_config
    from ..lora import load_gapclip_model

    settings = study.settings
    path = settings.model_name_or_path
    if path is None:
        from ..pretrain import PretrainSettings, pretrain_demo_backbone

        pretrain = PretrainSettings(
            backbone=settings.pretrained_backbone, image_size=settings.image_size, **settings.pretrain_overrides
        )
        logger.warning(
            f"Study: the pretrained start is the demo {pretrain.backbone} of recipes/pretrain_demo.py (made now if it "
            "is not cached yet)."
        )
        path = str(pretrain_demo_backbone(pretrain, show_progress=study.show_progress))
    config = AutoConfig.from_pretrained(path)
    if config.model_type == GapClipConfig.model_type:
        backbone = load_gapclip_model(path).backbone
    else:
        check_dual_encoder_config(config, source=f"--model_name_or_path {path}")
        backbone = AutoModel.from_pretrained(path)
    return path, backbone, AutoProcessor.from_pretrained(path)


class BackboneFactory:
    """``() -> (backbone or None, backbone config)`` for a run's new model: a pretrained backbone (the run copies
    it) or a config to initialise from the run's seed. A class, not a closure, so worker processes can receive it."""

    def __init__(self, backbone: Any = None, config: Any = None):
        self.backbone, self.config = backbone, config

    def __call__(self) -> tuple[Any, Any]:
        if self.backbone is not None:
            return self.backbone, self.backbone.config
        return None, copy.deepcopy(self.config)


def build_context(study: Any, regime: str, datasets: dict[str, Any], teachers: Any) -> RunContext:
    """The :class:`RunContext` of ``regime``; its ``key`` hashes everything a cached run depends on."""
    from ..cli import ModelArguments, scratch_clip_config, scratch_processor

    settings = study.settings
    data_key = {name: getattr(study.data_args, name, None) for name in DATA_KEY_FIELDS}
    digest = None
    if regime == "pretrained":
        path, backbone, processor = _pretrained_start(study)
        digest = start_digest(Path(path)) if Path(path).is_dir() else None
        model_key = {"start": path, "digest": digest or path}
        start = path
        build_backbone = BackboneFactory(backbone=backbone)
    else:
        model_args = ModelArguments(
            scratch_width=settings.scratch_width, scratch_layers=settings.scratch_layers,
            scratch_image_size=settings.image_size,
        )
        processor = scratch_processor(model_args, study.data_args, datasets["train"])
        image_size = processor.image_processor.crop_size["height"]
        config = scratch_clip_config(processor, image_size, settings.scratch_width, settings.scratch_layers)
        model_key = {"scratch": config.to_dict(), "vocabulary": len(processor.tokenizer)}
        start = (f"a CLIP from scratch ({settings.scratch_layers} layers, width {settings.scratch_width}, "
                 f"{image_size} px, word-level tokenizer of {len(processor.tokenizer):,} tokens)")
        build_backbone = BackboneFactory(config=config)
    training_key = {
        "batch_size": settings.batch_size, "eval_batch_size": settings.eval_batch_size, "use_cpu": settings.use_cpu,
    }
    key = hashlib.sha1(
        json.dumps([STUDY_VERSION, regime, model_key, data_key, training_key], sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    return RunContext(
        regime=regime, train=datasets["train"], validation=datasets["validation"], test=datasets["test"],
        processor=processor, build_backbone=build_backbone, key=key, work_dir=study.output_dir / "work",
        batch_size=settings.batch_size, eval_batch_size=settings.eval_batch_size, teachers=teachers,
        use_cpu=settings.use_cpu,
        extra={"start": start, "start_digest": digest},
    )


def run_time_model(context: RunContext) -> tuple[float, float]:
    """A run's expected wall time as ``(seconds per epoch, seconds per run)``: an epoch is its training steps and a
    validation pass, a run adds the test pass; from one timed training step (collation included) and one timed
    evaluation."""
    if "run_time_model" in context.extra:
        return context.extra["run_time_model"]
    from ..data import CaptionPairs, GapClipCollator
    from .runs import _new_model

    spec = RunSpec.make("calibration", "infonce", [], learning_rate=1e-4, epochs=1, seed=0)
    model = _new_model(spec, context)
    if not context.use_cpu:
        model = model.cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pairs = CaptionPairs(context.train, mode="one_per_image", seed=0)
    collator = GapClipCollator(context.processor)
    items = [pairs[i] for i in range(min(context.batch_size, len(pairs)))]
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        batch = collator(items)
        batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        timings.append(time.perf_counter() - start)
    step = sorted(timings[1:])[0]
    sample = context.validation.select(range(min(64, len(context.validation))))
    start = time.perf_counter()
    evaluate_split(model, sample, context.processor, batch_size=context.eval_batch_size)
    per_image = (time.perf_counter() - start) / len(sample)
    steps = len(context.train) // context.batch_size
    timing = (steps * step + per_image * len(context.validation), per_image * len(context.test) + 2.0)
    context.extra["run_time_model"] = timing
    return timing
