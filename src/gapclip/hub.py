"""Release export: the trained backbone in its native format, with its processor, training config and model card.

Every gap term is a training-time objective, so a release is just the backbone (a plain `CLIPModel`, `SiglipModel`
or `VisionTextDualEncoderModel`): ``AutoModel.from_pretrained(folder)`` loads it without gapclip installed and
gives the same embeddings as the :class:`~gapclip.GapClipModel` it came from. The exported folder holds::

    config.json, model.safetensors      the backbone (LoRA adapters merged in by default)
    preprocessor_config.json, tokenizer files ...   its processor, when one is given or found in the checkpoint
    gapclip_training.json               the objective (base loss, gap terms with weights/options, LoRA) and the
                                        training hyper-parameters
    README.md                           a model card with `model-index` retrieval results (R@1/5/10 both ways,
                                        RSUM, modality gap) per evaluation dataset, usage and the citations of
                                        the objectives it was trained with

:func:`push_exported` uploads such a folder (and nothing else) to a model repository.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from torch import nn
from transformers.utils import logging

from .modeling import GapClipModel

logger = logging.get_logger(__name__)

TRAINING_CONFIG_NAME = "gapclip_training.json"
#: The model-card template (a Jinja template for ``ModelCard.from_template``).
DEFAULT_TEMPLATE_PATH = Path(__file__).resolve().parent / "model_cards" / "gapclip_model_card.md"

#: Retrieval metrics reported in the card's ``model-index``: key → display name.
CARD_METRICS: dict[str, str] = {
    "i2t_r1": "Image-to-text R@1",
    "i2t_r5": "Image-to-text R@5",
    "i2t_r10": "Image-to-text R@10",
    "t2i_r1": "Text-to-image R@1",
    "t2i_r5": "Text-to-image R@5",
    "t2i_r10": "Text-to-image R@10",
    "rsum": "RSUM",
    "modality_gap": "Modality gap",
}
RETRIEVAL_TASK = {"task_type": "image-text-retrieval", "task_name": "Image-Text Retrieval"}

#: TrainingArguments fields recorded in gapclip_training.json and the card.
_HYPERPARAMETERS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "weight_decay", "warmup_steps", "lr_scheduler_type", "optim", "seed", "bf16", "fp16",
)

_FAMILY_NAMES = {
    "clip": "CLIP", "siglip": "SigLIP", "siglip2": "SigLIP 2", "vision-text-dual-encoder": "VisionTextDualEncoder",
}


def export_backbone(
    model_or_checkpoint: GapClipModel | str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    processor: Any = None,
    merge_lora: bool = True,
    eval_results: Mapping[str, Mapping[str, float]] | None = None,
    eval_split: str | None = None,
    training_args: Any = None,
    card_data: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
    template_path: str | os.PathLike | None = None,
) -> Path:
    """Write the trained backbone in its native format, plus processor, training config and model card.

    Args:
        model_or_checkpoint: a :class:`GapClipModel` or the folder of a gapclip checkpoint (LoRA checkpoints
            included, see :func:`gapclip.lora.load_gapclip_model`).
        output_dir: the release folder (created; existing files with the same names are overwritten).
        processor: the backbone's processor; by default the one saved in the checkpoint folder, if any.
        merge_lora (`bool`, defaults to `True`): merge LoRA adapters into the exported weights (the given model is
            not modified). With `False` the adapters are written in peft's format instead (``adapter_config.json``
            + ``adapter_model.safetensors``), to load on top of the base model with peft.
        eval_results: ``{dataset name: {"i2t_r1": ..., "rsum": ..., "modality_gap": ...}}`` for the card's
            ``model-index`` (keys may carry an ``eval_``/``test_`` prefix; other keys are ignored).
        eval_split: the split the results were measured on (``dataset_split`` of each result), e.g. ``"test"``.
        training_args: a `TrainingArguments` or a dict of hyper-parameters, recorded in the training config/card.
        card_data: extra `ModelCardData` fields overriding the defaults (``license``, ``datasets``, ``base_model``,
            ``model_name``, ``tags`` ...).
        repo_id: the repository the export is meant for, used in the card's usage snippet.
        template_path: a Jinja card template (defaults to ``model_cards/gapclip_model_card.md``).

    Returns:
        The output folder.
    """
    from .lora import is_lora_model, load_gapclip_model, merged_backbone

    checkpoint = None
    if isinstance(model_or_checkpoint, (str, os.PathLike)):
        checkpoint = Path(model_or_checkpoint)
        model = load_gapclip_model(checkpoint)
    elif isinstance(model_or_checkpoint, GapClipModel):
        model = model_or_checkpoint
    else:
        raise TypeError(
            f"export_backbone needs a GapClipModel or a checkpoint folder, got {type(model_or_checkpoint).__name__}."
        )
    if processor is None and checkpoint is not None:
        processor = _load_processor(checkpoint)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    # 1. weights: the backbone in its own format
    lora = model.config.lora or model.config.merged_lora
    if is_lora_model(model) and not merge_lora:
        model.backbone.save_pretrained(str(output_dir))
        backbone = model.backbone.get_base_model()
        logger.warning(
            f"Exported LoRA adapters only (merge_lora=False) to {output_dir}: load them with peft on top of "
            f"{backbone.config.name_or_path or 'the base model'}."
        )
    else:
        backbone = merged_backbone(model)
        backbone.save_pretrained(str(output_dir))
    if processor is not None:
        processor.save_pretrained(str(output_dir))
    else:
        logger.warning(f"No processor given or found: {output_dir} holds the model only.")

    # 2. training config
    training = training_config(model, training_args, lora=lora, lora_merged=bool(lora) and merge_lora)
    (output_dir / TRAINING_CONFIG_NAME).write_text(json.dumps(training, indent=2, sort_keys=True) + "\n")

    # 3. model card
    card = render_model_card(
        backbone, training, eval_results=eval_results, eval_split=eval_split, card_data=card_data, repo_id=repo_id,
        folder_name=output_dir.name, template_path=template_path, citations=objective_citations(model),
    )
    card.save(str(output_dir / "README.md"))
    logger.info(f"Exported the {backbone.config.model_type} backbone to {output_dir}.")
    return output_dir


def _load_processor(folder: Path) -> Any:
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as error:
        logger.warning(f"No processor could be loaded from {folder} ({error}); pass `processor=`.")
        return None


def training_config(
    model: GapClipModel, training_args: Any = None, *, lora: Mapping[str, Any] | None = None, lora_merged: bool = False
) -> dict[str, Any]:
    """The JSON-able description of how ``model`` was trained (written as ``gapclip_training.json``)."""
    from . import __version__
    from .losses import TERM_REGISTRY

    config = model.config
    backbone_config = config.backbone_config
    base_loss = config.resolved_base_loss
    base_loss_options = (
        {"margin": config.triplet_margin, "mining": config.triplet_mining, "reduction": config.triplet_reduction}
        if base_loss == "triplet" else {}
    )
    terms = []
    for spec in config.gap_terms:
        term = model.gap_terms[spec["name"]] if spec["name"] in model.gap_terms else None
        options = term.get_config_dict() if term is not None else dict(spec.get("options", {}))
        terms.append({
            "name": spec["name"], "weight": spec["weight"], "options": options,
            "class": TERM_REGISTRY[spec["name"]].__name__ if spec["name"] in TERM_REGISTRY else None,
        })
    return {
        "gapclip_version": __version__,
        "backbone": {
            "model_type": backbone_config.model_type,
            "architectures": getattr(backbone_config, "architectures", None),
            "base_model": _hub_id(backbone_config.name_or_path),
        },
        "base_loss": base_loss,
        "base_loss_options": base_loss_options,
        "gap_terms": terms,
        "logit_scale_max": config.logit_scale_max,
        "gather_with_grad": config.gather_with_grad,
        "lora": dict(lora) if lora else None,
        "lora_merged": lora_merged,
        "training": _hyperparameters(training_args),
    }


def objective_citations(model: GapClipModel) -> list[str]:
    """The BibTeX of what ``model`` was trained with: its base loss and each of its gap terms (each one's own
    ``citation``), in that order, without repeats (the LG-MGC terms share one entry, so do CUSA's)."""
    sources = [model.base_loss, *model.gap_terms.values()]
    return list(dict.fromkeys(text for text in (getattr(source, "citation", "") for source in sources) if text))


def _registry_citations(training: Mapping[str, Any]) -> list[str]:
    """:func:`objective_citations` from a training config alone (terms looked up in the registry)."""
    from .losses import BASE_LOSSES, TERM_REGISTRY

    classes = [BASE_LOSSES.get(training.get("base_loss"))]
    classes += [TERM_REGISTRY.get(term["name"]) for term in training.get("gap_terms", [])]
    return list(dict.fromkeys(text for text in (getattr(cls, "citation", "") for cls in classes) if text))


def _hyperparameters(training_args: Any) -> dict[str, Any] | None:
    if training_args is None:
        return None
    if isinstance(training_args, Mapping):
        return {key: _jsonable(value) for key, value in training_args.items()}
    values = {key: _jsonable(getattr(training_args, key)) for key in _HYPERPARAMETERS if hasattr(training_args, key)}
    world_size = getattr(training_args, "world_size", 1)
    if "per_device_train_batch_size" in values:
        values["total_train_batch_size"] = (
            values["per_device_train_batch_size"] * values.get("gradient_accumulation_steps", 1) * world_size
        )
    return values


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    return getattr(value, "value", None) if hasattr(value, "value") else str(value)


def _hub_id(name_or_path: str | None) -> str | None:
    """``name_or_path`` if it reads as a repository id (``owner/name``) and is not a local folder."""
    if not name_or_path or os.path.exists(name_or_path):
        return None
    return name_or_path if re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path) else None


def normalise_eval_results(eval_results: Mapping[str, Any] | None) -> dict[str, dict[str, float]]:
    """``{dataset: {metric: value}}`` restricted to :data:`CARD_METRICS`, with ``eval_``/``test_`` prefixes dropped.

    A flat metrics dict (``{"test_i2t_r1": ...}``) is read as one dataset named ``"evaluation"``.
    """
    if not eval_results:
        return {}
    if all(not isinstance(value, Mapping) for value in eval_results.values()):
        eval_results = {"evaluation": eval_results}
    normalised: dict[str, dict[str, float]] = {}
    for dataset, metrics in eval_results.items():
        kept = {}
        for key, value in metrics.items():
            bare = re.sub(r"^(?:eval|test|validation)_", "", key)
            if bare in CARD_METRICS and value is not None:
                kept[bare] = float(value)
        if kept:
            normalised[str(dataset)] = kept
    return normalised


def eval_results_for_card(eval_results: Mapping[str, Any] | None, eval_split: str | None = None) -> list[EvalResult]:
    """One `EvalResult` per (dataset, metric) for the card's ``model-index``."""
    results = []
    for dataset, metrics in normalise_eval_results(eval_results).items():
        dataset_type = re.sub(r"[^\w.-]+", "-", dataset.strip().lower()).strip("-") or "evaluation"
        for key, value in metrics.items():
            results.append(EvalResult(
                **RETRIEVAL_TASK, dataset_type=dataset_type, dataset_name=dataset, dataset_split=eval_split,
                metric_type=key,
                metric_name=CARD_METRICS[key], metric_value=round(value, 4),
            ))
    return results


def render_model_card(
    backbone: nn.Module,
    training: Mapping[str, Any],
    *,
    eval_results: Mapping[str, Any] | None = None,
    eval_split: str | None = None,
    card_data: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
    folder_name: str = "model",
    template_path: str | os.PathLike | None = None,
    citations: list[str] | None = None,
) -> ModelCard:
    """The release card: metadata (``ModelCardData`` with ``model-index``) + the gapclip template.

    ``citations`` (BibTeX entries) default to those of the base loss and the gap terms ``training`` names, as the
    registry knows them (:func:`objective_citations` gives them from the model itself).
    """
    template_path = Path(template_path) if template_path is not None else DEFAULT_TEMPLATE_PATH
    if not template_path.is_file():
        raise FileNotFoundError(f"Model card template not found: {str(template_path)!r}.")
    family = backbone.config.model_type
    overrides = dict(card_data or {})
    model_name = overrides.pop("model_name", None) or (repo_id.split("/")[-1] if repo_id else folder_name)
    base_model = overrides.pop("base_model", training["backbone"]["base_model"])
    results = eval_results_for_card(eval_results, eval_split)
    data = ModelCardData(
        model_name=model_name,
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        license=overrides.pop("license", "apache-2.0"),
        tags=overrides.pop("tags", ["gapclip", family, "image-text-retrieval", "modality-gap"]),
        eval_results=results or None,
        **overrides,
    )
    if citations is None:
        citations = _registry_citations(training)
    return ModelCard.from_template(
        data,
        template_path=str(template_path),
        model_name=model_name,
        repo_id=repo_id or f"path/to/{folder_name}",
        base_model=base_model,
        backbone_family=_FAMILY_NAMES.get(family, family),
        architecture=type(backbone).__name__,
        padding='"max_length"' if family in ("siglip", "siglip2") else "True",
        base_loss=training["base_loss"],
        gap_terms=training["gap_terms"],
        lora=training.get("lora") if training.get("lora_merged") else None,
        hyperparameters=training.get("training"),
        results=_results_table(eval_results),
        citations=citations,
        license=data.license,
    )


def _results_table(eval_results: Mapping[str, Any] | None) -> dict[str, dict[str, str]]:
    table = {}
    for dataset, metrics in normalise_eval_results(eval_results).items():
        row = {}
        for key in CARD_METRICS:
            value = metrics.get(key)
            row[key] = "-" if value is None else (f"{value:.4f}" if key == "modality_gap" else f"{value:.2f}")
        table[dataset] = row
    return table


def push_exported(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload gapclip-trained dual encoder",
) -> Any:
    """Create the model repository ``repo_id`` (if needed) and upload the exported ``folder`` as it is.

    Returns the `CommitInfo` of the upload.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        raise ValueError(
            f"{str(folder)!r} is not an exported model folder (no config.json); run export_backbone first."
        )
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    target = getattr(repo, "repo_id", repo_id)
    logger.info(f"Uploading {folder} to model repository {target}.")
    return api.upload_folder(folder_path=str(folder), repo_id=target, repo_type="model", commit_message=commit_message)


__all__ = [
    "CARD_METRICS",
    "TRAINING_CONFIG_NAME",
    "eval_results_for_card",
    "export_backbone",
    "normalise_eval_results",
    "push_exported",
    "render_model_card",
    "training_config",
]
