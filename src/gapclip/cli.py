"""What the training recipes share: argument dataclasses, data/model set-up and the train → evaluate run.

Each recipe (``recipes/train_clip_lgmgc.py`` ...) only adds a dataclass of its method's options (fields made with
:func:`term_option_field`, so defaults and choices come from the terms themselves) and turns it into the
``gap_terms`` list; everything else is here, so the three recipes behave the same way.

Gap terms of your own train through every recipe: ``--term_module my_terms.py`` imports the file (or module) that
registers them (``@register_term``), ``--gap_terms '[{"name": "my_term", ...}]'`` adds them to the objective, and
``--extra_columns columns.jsonl`` attaches the per-image dataset columns they read (see ``examples/custom_term.py``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import transformers
from transformers import AutoConfig, AutoProcessor, CLIPConfig, HfArgumentParser, TrainingArguments, set_seed
from transformers.utils import logging

from .argument_checks import check_model_path, parse_json_flag
from .configuration import GapClipConfig, check_dual_encoder_config
from .console import training_summary
from .data import (
    CaptionPairs,
    GapClipCollator,
    IterableCaptionPairs,
    attach_columns,
    load_caption_dataset,
    make_demo_processor,
)
from .data.demo import cache_root, make_demo_dataset
from .data.input_pipeline import configure_training_images, dataloader_advice, epochs_of
from .data.verify import verify_splits
from .evaluation import ECCVEvaluator, Evaluator, STSEvaluator, UniModalEvaluator, format_retrieval_table
from .lora import load_gapclip_model
from .losses import TERM_REGISTRY, validate_term_specs
from .modeling import GapClipModel
from .run_state import (
    RUN_RECORD_NAME,
    plan_run,
    report_finished,
    restore_final_checkpoint,
    run_configuration,
    write_run_record,
)
from .trainer import GapClipTrainer, pinned_memory_helps

logger = logging.get_logger(__name__)

DATASET_SOURCES = ("demo", "karpathy", "hub", "csv", "jsonl")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A pretrained dual encoder (Hub id such as openai/clip-vit-base-patch16, or a folder), or a gapclip "
            "checkpoint. Default: a small CLIP trained from scratch, with a word-level tokenizer of the training "
            "captions (the demo's own tokenizer on --dataset demo)."
        },
    )
    processor_name_or_path: str | None = field(default=None, metadata={"help": "Processor, if not the model's."})
    base_loss: str = field(default="auto", metadata={"help": "auto | infonce | sigmoid | triplet"})
    triplet_margin: float = field(default=0.2, metadata={"help": "Margin α of the triplet base loss."})
    triplet_mining: str = field(
        default="hardest", metadata={"help": "hardest | sum | distance_weighted (negatives of the triplet loss)."}
    )
    triplet_reduction: str | None = field(
        default=None,
        metadata={
            "help": "mean | sum of the triplet loss over the batch; default: sum in the DIAS recipe (the VSE++/SCAN "
            "convention its weights are set against), mean elsewhere."
        },
    )
    scratch_width: int = field(default=128, metadata={"help": "Width of the towers of a CLIP trained from scratch."})
    scratch_layers: int = field(default=3, metadata={"help": "Layers per tower of a CLIP trained from scratch."})
    scratch_image_size: int | None = field(
        default=None,
        metadata={"help": "Image size of a CLIP trained from scratch (default: the demo image size; 64 on other data)."},
    )
    gap_terms: str | None = field(
        default=None,
        metadata={"help": "Extra terms as JSON, e.g. '[{\"name\": \"lsc\", \"weight\": 1.0}]' (added to the recipe's)."},
    )
    local_loss: bool = field(
        default=False,
        metadata={
            "help": "Each process computes only its own samples' rows of the objective against the gathered batch "
            "(O(b·B) memory per process instead of O(B²)), with the global loss and gradients."
        },
    )
    term_module: str | None = field(
        default=None,
        metadata={
            "help": "Python file (my_terms.py) or importable module that registers gap terms of your own with "
            "@register_term, imported before --gap_terms is read (comma-separated for several)."
        },
    )

    def __post_init__(self):
        if self.base_loss not in ("auto", "infonce", "sigmoid", "triplet"):
            raise ValueError(f"--base_loss must be auto, infonce, sigmoid or triplet, got {self.base_loss!r}.")
        if self.triplet_mining not in ("hardest", "sum", "distance_weighted"):
            raise ValueError(
                f"--triplet_mining must be hardest, sum or distance_weighted, got {self.triplet_mining!r}."
            )
        if self.triplet_reduction not in (None, "mean", "sum"):
            raise ValueError(f"--triplet_reduction must be mean or sum, got {self.triplet_reduction!r}.")
        check_model_path("--model_name_or_path", self.model_name_or_path)
        check_model_path("--processor_name_or_path", self.processor_name_or_path)
        parse_json_flag("--gap_terms", self.gap_terms, list)


@dataclass
class DataArguments:
    dataset: str = field(default="demo", metadata={"help": f"One of {', '.join(DATASET_SOURCES)}."})
    karpathy_json: str | None = field(default=None, metadata={"help": "dataset_flickr30k.json / dataset_coco.json."})
    image_root: str | None = field(default=None, metadata={"help": "Folder the image paths are relative to."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset name, save_to_disk folder or parquet file (--dataset hub)."}
    )
    data_file: str | None = field(default=None, metadata={"help": "CSV or JSONL file (--dataset csv|jsonl)."})
    image_column: str = field(default="image", metadata={"help": "Image column (hub/csv/jsonl)."})
    caption_column: str = field(default="caption", metadata={"help": "Caption column (hub/csv/jsonl)."})
    id_column: str | None = field(default=None, metadata={"help": "Image id column (default: row index)."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str = field(default="validation", metadata={"help": "Split evaluated during training."})
    test_split: str = field(default="test", metadata={"help": "Split of the before/after retrieval table."})
    translations: str | None = field(default=None, metadata={"help": "JSONL of {image_id, translation} (LG-MGC GST)."})
    extra_columns: str | None = field(
        default=None,
        metadata={
            "help": "JSONL of per-image columns, {\"image_id\": ..., \"<column>\": value, ...} per line, attached to "
            "every split (e.g. the input of a gap term of your own, or a --label_column)."
        },
    )
    pair_mode: str = field(default="one_per_image", metadata={"help": "one_per_image (per epoch) | all_pairs"})
    max_length: int | None = field(default=None, metadata={"help": "Token limit (default: the tokenizer's)."})
    streaming: bool = field(default=False, metadata={"help": "Stream the training split (data too big for disk)."})
    on_bad_image: str = field(default="error", metadata={"help": "error | skip (unreadable training images)."})
    max_bad_image_fraction: float = field(default=0.01, metadata={"help": "With skip: stop past this share."})
    verify_images: bool = field(
        default=False,
        metadata={"help": "Decode every image once at load (in parallel, with a progress bar) and report all "
                          "unreadable ones before training; with --on_bad_image skip, leave bad training images out."},
    )
    fast_image_processing: bool = field(
        default=True,
        metadata={"help": "Decode, resize and crop in the DataLoader workers with gapclip's image path "
                          "(gapclip.data.image_transform): the processor's own uint8 pixels, normalised once per batch "
                          "(pixel_values within 1e-6 of the processor's). false: call the processor itself."},
    )
    reduced_jpeg_decoding: bool = field(
        default=False,
        metadata={"help": "Decode JPEGs at the smallest DCT scale (1/2, 1/4, 1/8) that still covers the resize target: "
                          "about twice the images/s on COCO-size photos, but pixels differ slightly from the full "
                          "decode (README, 'Data loading'). Part of the run's configuration and the pixel cache key."},
    )
    pixel_cache: bool = field(
        default=False,
        metadata={"help": "Decode and resize every training image once, into a memory-mapped uint8 cache "
                          "(rows × height × width × 3 bytes: 17.8 GB for COCO's 118k images at 224 px), reused by "
                          "every later epoch and run on the same data and image settings."},
    )
    pixel_cache_dir: str | None = field(
        default=None, metadata={"help": "Folder of the pixel caches (default: $GAPCLIP_CACHE/pixels)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation images."})
    demo_train: int = field(default=2000, metadata={"help": "Demo data: training images."})
    demo_val: int = field(default=500, metadata={"help": "Demo data: validation images."})
    demo_test: int = field(default=1000, metadata={"help": "Demo data: test images."})
    demo_image_size: int = field(default=64, metadata={"help": "Demo data: image size in pixels."})
    coco_1k: bool = field(default=False, metadata={"help": "Also report the COCO 1K protocol (5 folds)."})
    skip_initial_eval: bool = field(default=False, metadata={"help": "Skip the 'before training' evaluation."})
    eccv: bool = field(default=False, metadata={"help": "Also ECCV-Caption mAP@R and R-Precision."})
    eccv_positives: str | None = field(default=None, metadata={"help": "JSON/JSONL of extra positive pairs."})
    label_column: str | None = field(default=None, metadata={"help": "Class-label column: image→image R@1."})
    sts_file: str | None = field(default=None, metadata={"help": "STS pairs (sentence1, sentence2, score)."})

    def __post_init__(self):
        if self.dataset not in DATASET_SOURCES:
            raise ValueError(f"--dataset must be one of {list(DATASET_SOURCES)}, got {self.dataset!r}.")
        if self.dataset == "karpathy" and not (self.karpathy_json and self.image_root):
            raise ValueError("--dataset karpathy needs --karpathy_json FILE and --image_root FOLDER.")
        if self.dataset == "hub" and not self.dataset_name:
            raise ValueError("--dataset hub needs --dataset_name (Hub name, save_to_disk folder or parquet file).")
        if self.dataset in ("csv", "jsonl") and not (self.data_file and self.image_root):
            raise ValueError(f"--dataset {self.dataset} needs --data_file FILE and --image_root FOLDER.")
        if self.pair_mode not in ("one_per_image", "all_pairs"):
            raise ValueError(f"--pair_mode must be one_per_image or all_pairs, got {self.pair_mode!r}.")
        if self.on_bad_image not in ("error", "skip"):
            raise ValueError(f"--on_bad_image must be error or skip, got {self.on_bad_image!r}.")
        if self.pixel_cache and self.streaming:
            raise ValueError("--pixel_cache caches a split on disk; it cannot be combined with --streaming.")
        if (self.pixel_cache or self.reduced_jpeg_decoding) and not self.fast_image_processing:
            raise ValueError(
                "--pixel_cache and --reduced_jpeg_decoding work through gapclip's image path: drop "
                "--fast_image_processing false."
            )


@dataclass
class GapClipTrainingArguments(TrainingArguments):
    """`TrainingArguments` with defaults that fit the offline demo and contrastive training."""

    output_dir: str = field(default="outputs/demo", metadata={"help": "Where checkpoints and results go."})
    num_train_epochs: float = field(default=8.0, metadata={"help": "Training epochs."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Batch size per process."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Evaluation batch size per process."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up steps (a float < 1 is a fraction)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to run retrieval evaluation."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to save checkpoints."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    metric_for_best_model: str | None = field(default="rsum", metadata={"help": "Checkpoint selection metric."})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "Reload the best checkpoint at the end."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False: the collator reads images."})
    dataloader_drop_last: bool = field(default=True, metadata={"help": "Drop the last incomplete batch."})
    seed: int = field(default=42, metadata={"help": "Random seed."})
    max_nonfinite_steps: int = field(
        default=3, metadata={"help": "Stop after this many consecutive steps skipped for a NaN/inf loss or gradient."}
    )
    gradient_cache_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Gradient caching (GradCache): embed each per-device batch this many rows at a time, so a large "
            "batch trains in the activation memory of a chunk with the same gradients (one extra forward pass of "
            "every chunk but the last)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over in a --output_dir that holds a run (its checkpoints and results are deleted) "
                          "instead of resuming or refusing it; needed when that run has another configuration."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"--max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}.")
        if self.gradient_cache_chunk_size is not None and self.gradient_cache_chunk_size < 1:
            raise ValueError(
                "--gradient_cache_chunk_size must be >= 1 (rows embedded at once), got "
                f"{self.gradient_cache_chunk_size}."
            )
        if self.remove_unused_columns:
            raise ValueError("--remove_unused_columns must be False: the collator needs the image and caption columns.")
        self.dataloader_pin_memory = pinned_memory_helps(self)


@dataclass
class LoraArguments:
    """LoRA fine-tuning of the backbone (``gapclip.lora``); off unless ``--lora_r`` > 0."""

    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains the full backbone (no LoRA)."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha (update scale alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated module-name suffixes (q_proj,v_proj) or one regular expression; default: "
            "every attention projection of both towers."
        },
    )
    merge_lora: bool = field(
        default=False, metadata={"help": "Merge the adapters into the backbone before the final save."}
    )

    def __post_init__(self):
        if self.lora_r < 0:
            raise ValueError(f"--lora_r must be >= 0 (0 = no LoRA), got {self.lora_r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")

    @property
    def target_modules(self) -> str | list[str] | None:
        value = self.lora_target_modules
        if not value or not value.strip():
            return None
        if "," in value or value.replace("_", "").isalnum():
            return [name.strip() for name in value.split(",") if name.strip()]
        return value


def parse_args(method_dataclass: type, argv: list[str] | None = None) -> tuple[Any, ...]:
    """CLI flags, or a single YAML/JSON config file, into (model, data, method, lora, training) arguments."""
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, method_dataclass, LoraArguments, GapClipTrainingArguments)
    )
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(os.path.abspath(argv[0]))
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def load_datasets(data_args: DataArguments, *, streaming: bool = False):
    """The caption DatasetDict for ``data_args`` (demo data generated offline and cached on first use), with the
    ``--extra_columns`` attached."""
    datasets = _load_caption_splits(data_args, streaming=streaming)
    return attach_columns(datasets, data_args.extra_columns) if data_args.extra_columns else datasets


def _load_caption_splits(data_args: DataArguments, *, streaming: bool):
    common: dict[str, Any] = {"streaming": streaming}
    if data_args.translations:
        common["translations"] = data_args.translations
    if data_args.dataset == "demo":
        return load_caption_dataset(
            "demo", num_train=data_args.demo_train, num_val=data_args.demo_val, num_test=data_args.demo_test,
            image_size=data_args.demo_image_size, streaming=streaming,
        )
    if data_args.dataset == "karpathy":
        return load_caption_dataset("karpathy", data_args.karpathy_json, data_args.image_root, **common)
    if data_args.dataset == "hub":
        return load_caption_dataset(
            "hub", data_args.dataset_name, image_column=data_args.image_column,
            caption_column=data_args.caption_column, id_column=data_args.id_column, image_root=data_args.image_root,
            **common,
        )
    return load_caption_dataset(
        data_args.dataset, data_args.data_file, data_args.image_root, image_column=data_args.image_column,
        caption_column=data_args.caption_column, id_column=data_args.id_column, **common,
    )


def build_evaluators(data_args: DataArguments) -> list[Evaluator]:
    """The extra evaluators ``data_args`` asks for (``--eccv``/``--eccv_positives``, ``--label_column``,
    ``--sts_file``), run by the trainer's evaluations and by the evaluation recipe."""
    evaluators: list[Evaluator] = []
    if data_args.eccv or data_args.eccv_positives:
        evaluators.append(ECCVEvaluator(data_args.eccv_positives))
    if data_args.label_column:
        evaluators.append(UniModalEvaluator(data_args.label_column))
    if data_args.sts_file:
        evaluators.append(STSEvaluator(data_args.sts_file))
    return evaluators


# ---------------------------------------------------------------------------------------------------------------------
# Gap terms of your own, and recipe flags made from the terms' options
# ---------------------------------------------------------------------------------------------------------------------
def import_term_modules(spec: str | None) -> list[ModuleType]:
    """Import each Python file or module of the comma-separated ``spec`` (``--term_module``), so that the gap terms
    it registers (``@register_term``) can be named in ``gap_terms``. Importing one twice is a no-op; the running
    script itself is not imported again."""
    return [_import_term_module(entry.strip()) for entry in (spec or "").split(",") if entry.strip()]


def _import_term_module(entry: str) -> ModuleType:
    if not entry.endswith(".py") and os.sep not in entry:
        try:
            return importlib.import_module(entry)
        except ModuleNotFoundError as error:
            if error.name != entry.split(".")[0]:
                raise
            raise ValueError(
                f"--term_module {entry!r}: no module of that name can be imported; give a path to a .py file or an "
                "importable module (on PYTHONPATH)."
            ) from None
    path = Path(entry).resolve()
    if not path.is_file():
        raise ValueError(f"--term_module {entry!r}: no such file ({path}).")
    main = sys.modules.get("__main__")
    if getattr(main, "__file__", None) and Path(main.__file__).resolve() == path:
        return main  # the recipe is that file: its terms are registered already
    name = f"_gapclip_term_module_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and typing resolve the module's annotations through sys.modules
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    logger.info(f"Imported {path} (--term_module); registered gap terms: {sorted(TERM_REGISTRY)}.")
    return module


def term_option_field(term: str, option: str, *, help: str | None = None) -> Any:
    """A recipe-argument ``dataclasses.field`` for option ``option`` of the registered gap term ``term``: default,
    ``Literal`` choices and help text all come from the term's ``__init__`` (and its docstring), so a recipe never
    restates them. Declare the field with the option's type, e.g. ``lsc_k: int = term_option_field("lsc", "k")``."""
    try:
        spec = TERM_REGISTRY[term].option_specs()[option]
    except KeyError:
        raise ValueError(f"term_option_field: gap term {term!r} has no option {option!r}.") from None
    text = re.sub(r"``(.*?)``", r"\1", help or spec.help or f"option {option!r} of the {term!r} term").rstrip(".")
    metadata: dict[str, Any] = {"help": f"{text[0].upper()}{text[1:]} (gap term {term!r}, option {option!r})."}
    if spec.choices:
        metadata["choices"] = list(spec.choices)
    return field(default=spec.default, metadata=metadata)


def demo_root(data_args: DataArguments) -> Path:
    return make_demo_dataset(
        num_train=data_args.demo_train, num_val=data_args.demo_val, num_test=data_args.demo_test,
        image_size=data_args.demo_image_size,
    )


def default_teacher_dir(data_args: DataArguments) -> Path:
    """Where CUSA's ``teachers.safetensors`` lives by default: a ``teachers`` folder next to the data.

    Demo data: inside the demo folder. Karpathy/CSV/JSONL: next to the captions file. A local Hub-format dataset
    (``save_to_disk`` folder or parquet file): inside / next to it. A Hub dataset by name has no local folder of
    its own, so its teachers go to ``$GAPCLIP_CACHE`` (or ``~/.cache/gapclip``) ``/teachers/<org>__<name>``.
    """
    if data_args.dataset == "demo":
        return demo_root(data_args) / "teachers"
    anchor = Path(data_args.karpathy_json or data_args.data_file or data_args.dataset_name)
    if data_args.dataset == "hub" and not anchor.exists():
        return cache_root() / "teachers" / str(data_args.dataset_name).replace("/", "__")
    return (anchor if anchor.is_dir() else anchor.parent) / "teachers"


def scratch_clip_config(processor: Any, image_size: int, width: int, layers: int) -> CLIPConfig:
    """A small CLIP for training from scratch (patch 8, text positions = the tokenizer's ``model_max_length``).

    The text tower pools at the tokenizer's end token: its ``eos_token``, or ``[SEP]`` for BERT-style (WordPiece)
    tokenizers, which have no ``eos_token``.
    """
    tokenizer = processor.tokenizer
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    tower = {"hidden_size": width, "num_hidden_layers": layers, "num_attention_heads": max(width // 32, 1),
             "intermediate_size": 4 * width}
    text = {**tower, "vocab_size": len(tokenizer), "max_position_embeddings": tokenizer.model_max_length,
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": bos, "eos_token_id": eos}
    vision = {**tower, "image_size": image_size, "patch_size": 8}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=width)


def scratch_processor(model_args: ModelArguments, data_args: DataArguments, train: Any = None) -> Any:
    """The processor of a model trained from scratch: the demo's own, or a word-level one from ``train``'s captions.

    The vocabulary is every word of the training captions (``gapclip.data.tokenization``), so the same data gives
    the same tokenizer (a resumed run rebuilds it identically); captions of other splits may hold ``[UNK]`` words.
    """
    if data_args.dataset == "demo":
        processor = make_demo_processor(demo_root(data_args))
        if model_args.scratch_image_size not in (None, data_args.demo_image_size):
            raise ValueError(
                f"--scratch_image_size {model_args.scratch_image_size} differs from --demo_image_size "
                f"{data_args.demo_image_size}: on the demo data the model's image size is the data's."
            )
        return processor
    if train is None:
        raise ValueError(f"Training from scratch on --dataset {data_args.dataset} needs the training split's captions.")
    from .data.tokenization import caption_vocabulary, word_level_processor

    words = caption_vocabulary(caption for captions in train["captions"] for caption in captions)
    image_size = model_args.scratch_image_size or 64
    logger.warning(
        f"No --model_name_or_path: training a CLIP from scratch ({model_args.scratch_layers} layers, width "
        f"{model_args.scratch_width}, {image_size} px) with a word-level tokenizer of the {len(words):,} words of the "
        "training captions."
    )
    return word_level_processor(words, image_size, max_length=data_args.max_length or 64)


def build_model_and_processor(
    model_args: ModelArguments, data_args: DataArguments, gap_terms: list[dict[str, Any]], train: Any = None
) -> tuple[GapClipModel, Any]:
    """The model to train and its processor: a pretrained dual encoder, a gapclip checkpoint, or (no
    ``--model_name_or_path``) a small CLIP from scratch with a word-level tokenizer (see :func:`scratch_processor`)."""
    config_kwargs = {
        "gap_terms": gap_terms, "base_loss": model_args.base_loss, "triplet_margin": model_args.triplet_margin,
        "triplet_mining": model_args.triplet_mining, "triplet_reduction": model_args.triplet_reduction or "mean",
        "local_loss": model_args.local_loss,
    }
    path = model_args.model_name_or_path
    if path is None:
        processor = scratch_processor(model_args, data_args, train)
        image_size = processor.image_processor.crop_size["height"]
        backbone_config = scratch_clip_config(processor, image_size, model_args.scratch_width, model_args.scratch_layers)
        return GapClipModel(GapClipConfig(backbone_config, **config_kwargs)), processor
    config = AutoConfig.from_pretrained(path)
    if config.model_type != GapClipConfig.model_type:
        check_dual_encoder_config(config, source=f"--model_name_or_path {path}")
    processor = AutoProcessor.from_pretrained(model_args.processor_name_or_path or path)
    if config.model_type == GapClipConfig.model_type:
        # Continue from a gapclip checkpoint, with this run's objective.
        model = load_gapclip_model(path)
        if validate_term_specs(gap_terms) != model.config.gap_terms or model_args.base_loss != model.config.base_loss:
            new_config = GapClipConfig(model.config.backbone_config, lora=model.config.lora, **config_kwargs)
            model = GapClipModel(new_config, backbone=model.backbone)
        elif model.config.local_loss != model_args.local_loss:  # how the loss is computed, not what: this run's
            model.config.local_loss = model_args.local_loss
            if model_args.local_loss:
                model.check_local_loss_support()
        return model, processor
    # A local base model is recorded by its absolute path, so a LoRA adapter exported later finds it from anywhere.
    base = os.path.abspath(path) if os.path.isdir(path) else path
    return GapClipModel.from_backbone(base, **config_kwargs), processor


def merge_gap_terms(recipe_terms: list[dict[str, Any]], extra_json: str | None) -> list[dict[str, Any]]:
    return [*recipe_terms, *(parse_json_flag("--gap_terms", extra_json, list) or [])]


def _limit(dataset, n: int | None):
    return dataset if n is None or n >= len(dataset) else dataset.select(range(n))


def run_training(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: GapClipTrainingArguments,
    gap_terms: list[dict[str, Any]],
    *,
    callbacks: list | None = None,
    lora_args: LoraArguments | None = None,
    teacher_store: Any = None,
    batch_sampler_factory: Any = None,
    input_providers: list | None = None,
    evaluators: list[Evaluator] | None = None,
) -> dict[str, Any]:
    """Train with the recipe's objective and print the before/after retrieval table; returns all metrics.

    With ``lora_args.lora_r > 0`` only LoRA adapters (+ logit scale and the terms' own parameters) are trained. At
    the end the backbone is exported in its native format to ``output_dir/export`` (see
    :func:`gapclip.hub.export_backbone`) and, with ``--push_to_hub``, that export (not the training wrapper) is
    pushed to ``--hub_model_id``.

    ``input_providers`` give the collator per-row term inputs that are not dataset columns
    (:class:`~gapclip.data.GapClipCollator`); ``teacher_store`` (CUSA's teacher embeddings) is one, added to them.
    ``evaluators`` run in every evaluation besides retrieval and the ones the data flags ask for
    (:func:`build_evaluators`).
    """
    # 1. logging and seed
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    set_seed(training_args.seed)

    # 2. the output folder: a fresh run, a resume, a finished run or another configuration's (gapclip.run_state)
    import_term_modules(model_args.term_module)  # before the terms are read: --gap_terms may name their terms
    gap_terms = merge_gap_terms(gap_terms, model_args.gap_terms)
    configuration = run_configuration(model_args, data_args, lora_args, gap_terms)
    plan = plan_run(training_args, configuration)
    if plan.action == "finished":
        repo_id = _push_repo_id(training_args, True) if training_args.push_to_hub else None
        return report_finished(plan, training_args, push_repo_id=repo_id)
    resume = plan.checkpoint

    # 3. data
    datasets = load_datasets(data_args)
    for name in (data_args.train_split, data_args.eval_split, data_args.test_split):
        if name not in datasets:
            raise ValueError(f"Split {name!r} not in the dataset; it has {sorted(datasets)}.")
    train = _limit(datasets[data_args.train_split], data_args.max_train_samples)
    evaluation = _limit(datasets[data_args.eval_split], data_args.max_eval_samples)
    test = _limit(datasets[data_args.test_split], data_args.max_eval_samples)
    if data_args.verify_images:  # decode every image now, not when its row comes up (gapclip.data.verify)
        train = verify_splits(
            {data_args.train_split: train, data_args.eval_split: evaluation, data_args.test_split: test},
            train_split=data_args.train_split, on_bad_image=data_args.on_bad_image,
            max_bad_image_fraction=data_args.max_bad_image_fraction, rank=training_args.process_index,
            world_size=training_args.world_size,
            show_progress=not training_args.disable_tqdm and training_args.process_index == 0,
        )
    pair_options = {
        "mode": data_args.pair_mode, "seed": training_args.seed, "on_bad_image": data_args.on_bad_image,
        "max_bad_image_fraction": data_args.max_bad_image_fraction,
    }
    if data_args.streaming:
        if training_args.max_steps <= 0:
            raise ValueError("--streaming needs --max_steps: a stream has no length to count epochs with.")
        pairs = IterableCaptionPairs(load_datasets(data_args, streaming=True)[data_args.train_split], **pair_options)
    else:
        pairs = CaptionPairs(train, **pair_options)
        _check_train_split_size(pairs, data_args, training_args)

    # 4. model and collator (the terms declare the per-row inputs the collator passes on)
    model, processor = build_model_and_processor(model_args, data_args, gap_terms, train=train)
    _record_training_run(model, training_args, data_args, pairs)
    padding = "max_length" if model.config.backbone_config.model_type in ("siglip", "siglip2") else "longest"
    providers = [*(input_providers or []), *([teacher_store] if teacher_store is not None else [])]
    collator = GapClipCollator(
        processor, max_length=data_args.max_length, padding=padding, term_inputs=model.declared_term_inputs,
        input_providers=providers, image_transform="auto" if data_args.fast_image_processing else None,
    )
    with training_args.main_process_first(desc="pixel cache"):  # one build per machine; the others open it
        configure_training_images(
            pairs, collator, reduced_decoding=data_args.reduced_jpeg_decoding, pixel_cache=data_args.pixel_cache,
            pixel_cache_dir=data_args.pixel_cache_dir, on_bad_image=data_args.on_bad_image,
            max_bad_image_fraction=data_args.max_bad_image_fraction, split=data_args.train_split,
            show_progress=not training_args.disable_tqdm and training_args.local_process_index == 0,
        )
    if training_args.process_index == 0:
        device = training_args.device.type
        epochs = epochs_of(training_args, None if data_args.streaming else len(pairs))
        for hint in dataloader_advice(training_args, num_epochs=epochs, accelerator=None if device == "cpu" else device):
            logger.warning(hint)
    logger.info(f"Objective: base={model.config.resolved_base_loss}, terms={model.config.gap_terms}")
    model = _maybe_apply_lora(model, lora_args)

    # 5. trainer (a recipe may bring its own batch sampler, e.g. DIAS's K-means neighbour batches)
    callbacks = list(callbacks or [])
    batch_sampler = None
    if batch_sampler_factory is not None:
        batch_sampler, sampler_callbacks = batch_sampler_factory(train, model, processor, training_args)
        callbacks.extend(sampler_callbacks)
    push_to_hub = _take_over_push(training_args)
    trainer = GapClipTrainer(
        model=model, args=training_args, train_dataset=pairs, eval_dataset=evaluation, data_collator=collator,
        processing_class=processor, processor=processor, coco_1k=data_args.coco_1k, callbacks=callbacks,
        evaluators=[*build_evaluators(data_args), *(evaluators or [])], train_batch_sampler=batch_sampler,
        max_nonfinite_steps=training_args.max_nonfinite_steps,
    )
    if training_args.per_device_train_batch_size * training_args.world_size < 2:
        raise ValueError(
            "A contrastive objective needs at least 2 pairs per global batch; got per_device_train_batch_size="
            f"{training_args.per_device_train_batch_size} × {training_args.world_size} process(es)."
        )

    # 6. before / train / after (a resumed run keeps the "before training" row its first part measured)
    rows: dict[str, dict[str, float]] = {}
    if not data_args.skip_initial_eval and resume is None:
        rows["before training"] = _strip(trainer.evaluate(test, metric_key_prefix="test"), "test")
    elif plan.before_training:
        rows["before training"] = plan.before_training
    if trainer.is_world_process_zero():
        write_run_record(training_args, configuration, status="running", before_training=rows.get("before training"))
    if plan.action == "complete":  # the checkpoint is the budget's last step: train nothing more
        restore_final_checkpoint(trainer, resume)
        train_metrics = {}
    else:
        train_metrics = trainer.train(resume_from_checkpoint=resume).metrics
    if lora_args is not None and lora_args.merge_lora:
        _merge_lora(model)
    trainer.save_model()
    if train_metrics:
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
    trainer.save_state()
    after = trainer.evaluate(test, metric_key_prefix="test")
    trainer.log_metrics("test", after)
    trainer.save_metrics("test", after)
    rows["after training"] = _strip(after, "test")

    # 7. report
    table = format_retrieval_table(rows, title=f"Retrieval on the {data_args.dataset} {data_args.test_split} split")
    if trainer.is_world_process_zero():
        Path(training_args.output_dir, "retrieval.md").write_text(table + "\n")
        Path(training_args.output_dir, "retrieval.json").write_text(json.dumps(rows, indent=2))
        print(table, flush=True)  # the recipe's result, for the person who ran it

    # 8. release export (the native backbone + card), push, and where everything went
    export_dir = push_error = None
    if trainer.is_world_process_zero():
        export_dir = _export(model, processor, data_args, training_args, rows, push_to_hub)
        write_run_record(
            training_args, configuration, status="finished", before_training=rows.get("before training"),
            state=trainer.state, extra={"export_dir": str(export_dir)},
        )
        push_error = _push(export_dir, training_args) if push_to_hub else None
        hub = None if not push_to_hub else (
            "push FAILED (see the error below)" if push_error else f"pushed to {_push_repo_id(training_args, True)}")
        summary = training_summary(
            training_args.output_dir, model, export_dir, hub=hub,
            run_record=Path(training_args.output_dir, RUN_RECORD_NAME),
        )
        print(summary, flush=True)
    if push_error is not None:
        raise push_error
    return {"rows": rows, "train": train_metrics, "trainer": trainer, "export_dir": export_dir}


def _strip(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {key[len(prefix) + 1 :]: value for key, value in metrics.items() if key.startswith(prefix + "_")}


# ---------------------------------------------------------------------------------------------------------------------
# Checks at load time and what a run tells its user (gapclip.run_state, gapclip.data.verify, gapclip.console)
# ---------------------------------------------------------------------------------------------------------------------
def _check_train_split_size(pairs: CaptionPairs, data_args: DataArguments, training_args: TrainingArguments) -> None:
    """A split smaller than one optimizer step's batch trains nothing (with epochs, transformers then fails with an
    unrelated ``max_steps`` error): stop at load, naming both sizes."""
    args = training_args
    per_step = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    needed = per_step if args.dataloader_drop_last else 2
    if len(pairs) >= needed:
        return
    limit = f", --max_train_samples {data_args.max_train_samples}" if data_args.max_train_samples else ""
    if args.dataloader_drop_last:
        why = (f"one optimizer step needs {needed} (per_device_train_batch_size {args.per_device_train_batch_size} × "
               f"{args.world_size} process(es) × gradient_accumulation_steps {args.gradient_accumulation_steps}; "
               "--dataloader_drop_last drops incomplete batches)")
        fixes = ("a smaller --per_device_train_batch_size or --gradient_accumulation_steps, or "
                 "--dataloader_drop_last false")
    else:
        why, fixes = "a contrastive batch needs 2", "more images"
    raise ValueError(
        f"The training split {data_args.train_split!r} has {len(pairs)} training pair(s) ({pairs.num_images} images, "
        f"--pair_mode {data_args.pair_mode}{limit}), but {why}: nothing would be trained. Use more training data, or "
        f"{fixes}."
    )


def _record_training_run(model: GapClipModel, training_args: TrainingArguments, data_args: DataArguments,
                         pairs: Any) -> None:
    """Keep the hyper-parameters and a description of the training data in the model config, so every checkpoint
    carries them and a later ``recipes/export.py`` writes the same card as the end of the run."""
    from .hub import hyperparameters

    streaming = not isinstance(pairs, CaptionPairs)
    model.config.training_run = {
        "hyperparameters": hyperparameters(training_args),
        "training_data": {
            "name": _eval_dataset_name(data_args),
            "source": data_args.dataset,
            "location": next((os.path.abspath(v) if os.path.exists(v) else v for v in (
                data_args.karpathy_json, data_args.dataset_name, data_args.data_file) if v), None),
            "split": data_args.train_split,
            "images": None if streaming else pairs.num_images,
            "captions": None if streaming else pairs.num_captions,
            "pair_mode": data_args.pair_mode,
            "translations": bool(data_args.translations) or data_args.dataset == "demo",
        },
    }


# ---------------------------------------------------------------------------------------------------------------------
# LoRA and release export (gapclip.lora, gapclip.hub)
# ---------------------------------------------------------------------------------------------------------------------
def _maybe_apply_lora(model: GapClipModel, lora_args: LoraArguments | None) -> GapClipModel:
    if lora_args is None or lora_args.lora_r == 0:
        return model
    from .lora import apply_lora, is_lora_model, trainable_parameter_summary

    if not is_lora_model(model):
        apply_lora(
            model, r=lora_args.lora_r, alpha=lora_args.lora_alpha, dropout=lora_args.lora_dropout,
            target_modules=lora_args.target_modules,
        )
    trainable, total, pct = trainable_parameter_summary(model)
    logger.info(f"LoRA: training {trainable:,} of {total:,} parameters ({pct:.2f}%).")
    return model


def _merge_lora(model: GapClipModel) -> None:
    from .lora import merge_lora

    merge_lora(model)


def _take_over_push(training_args: GapClipTrainingArguments) -> bool:
    """Keep the Trainer from pushing the training wrapper: gapclip pushes the exported backbone at the end."""
    push_to_hub = bool(training_args.push_to_hub)
    training_args.push_to_hub = False
    return push_to_hub


def _push_repo_id(training_args: GapClipTrainingArguments, push_to_hub: bool) -> str | None:
    return training_args.hub_model_id or (Path(training_args.output_dir).name if push_to_hub else None)


def _export(
    model: GapClipModel, processor: Any, data_args: DataArguments, training_args: GapClipTrainingArguments,
    rows: dict[str, dict[str, float]], push_to_hub: bool,
) -> Path:
    from .hub import export_backbone

    return export_backbone(
        model, Path(training_args.output_dir, "export"), processor=processor,
        eval_results={_eval_dataset_name(data_args): rows["after training"]}, eval_split=data_args.test_split,
        training_args=training_args, repo_id=_push_repo_id(training_args, push_to_hub),
    )


def _push(export_dir: Path, training_args: GapClipTrainingArguments) -> Exception | None:
    """Push the export; a failure (no network, no token, no rights) comes back as an error saying how to retry."""
    from .hub import push_exported, push_failed_error

    repo_id = _push_repo_id(training_args, True)
    try:
        push_exported(
            export_dir, repo_id, token=training_args.hub_token, private=training_args.hub_private_repo,
            commit_message="End of training",
        )
    except Exception as err:  # noqa: BLE001 - whatever the Hub client raised, the export is safe on disk
        return push_failed_error(export_dir, repo_id, err)
    training_args.push_to_hub = True
    return None


def _eval_dataset_name(data_args: DataArguments) -> str:
    if data_args.dataset == "karpathy":
        return Path(data_args.karpathy_json).stem.removeprefix("dataset_")
    if data_args.dataset == "hub":
        return data_args.dataset_name
    if data_args.dataset in ("csv", "jsonl"):
        return Path(data_args.data_file).stem
    return "gapclip-demo"
