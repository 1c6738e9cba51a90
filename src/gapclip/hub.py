"""Release export: the trained backbone in its native format, with its processor, training config and model card.

Every gap term is a training-time objective, so a release is just the backbone (a plain `CLIPModel`, `SiglipModel`
or `VisionTextDualEncoderModel`): ``AutoModel.from_pretrained(folder)`` loads it without gapclip installed and
gives the same embeddings as the :class:`~gapclip.GapClipModel` it came from. The exported folder holds::

    config.json, model.safetensors      the backbone (LoRA adapters merged in by default; with merge_lora=False a
                                        peft adapter instead, see :func:`export_backbone`)
    preprocessor_config.json, tokenizer files ...   its processor, when one is given or found in the checkpoint
    gapclip_training.json               the objective (base loss, gap terms with weights/options, LoRA) and the
                                        training hyper-parameters
    README.md                           a model card: `model-index` retrieval results (R@1/5/10 both ways, RSUM,
                                        modality gap) per evaluation dataset, model details (base model, embedding
                                        dimension, maximum sequence length, training data), framework versions,
                                        usage and the citations of the objectives it was trained with

:func:`push_exported` uploads such a folder (and nothing else) to a model repository; when that fails,
:func:`push_failed_error` says where the export is and how to push it later.
"""

from __future__ import annotations

import json
import os
import platform
import re
from collections.abc import Mapping
from enum import Enum
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
#: The method a gap term belongs to, by the module that defines it (a user's own term is named by itself).
_METHOD_OF_MODULE = {"gapclip.losses.lgmgc": "LG-MGC", "gapclip.losses.dias": "DIAS", "gapclip.losses.cusa": "CUSA"}
#: Backbone parameters outside the LoRA layers that train under LoRA; a kept adapter carries their trained values.
_ADAPTER_EXTRA_PARAMETERS = ("logit_scale", "logit_bias")
TERMS_WEIGHTS_NAME = "gapclip_terms.safetensors"
#: Packages whose versions the card lists, as (display name, distribution name).
_FRAMEWORKS = (("gapclip", "gapclip"), ("Transformers", "transformers"), ("PyTorch", "torch"),
               ("Datasets", "datasets"), ("Tokenizers", "tokenizers"), ("Accelerate", "accelerate"),
               ("PEFT", "peft"), ("huggingface_hub", "huggingface_hub"))


class PushToHubError(OSError):
    """The export is complete on disk, but uploading it to the Hub failed."""


def push_failed_error(export_dir: str | os.PathLike, repo_id: str, error: BaseException) -> PushToHubError:
    """The error to raise when pushing ``export_dir`` failed: what went wrong, where the export is, how to retry."""
    failure = PushToHubError(
        f"Could not push to the Hub repository {repo_id!r} ({type(error).__name__}: {error}). The export is complete "
        f"on disk at {Path(export_dir).resolve()}; push it later with: python recipes/export.py "
        f"{Path(export_dir).resolve()} --push_to_hub --hub_model_id {repo_id}"
    )
    failure.__cause__ = error
    return failure


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
    adapter = None
    if is_lora_model(model) and not merge_lora:
        adapter = save_portable_adapter(model, output_dir)
        backbone = model.backbone.get_base_model()
        logger.warning(
            f"Exported LoRA adapters only (merge_lora=False) to {output_dir}: AutoModel.from_pretrained loads them "
            f"on top of {adapter['base_model']} (peft needed)."
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
        processor=processor, adapter=adapter,
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


def save_portable_adapter(model: GapClipModel, output_dir: str | os.PathLike) -> dict[str, Any]:
    """Write ``model``'s LoRA adapters in peft's format, loadable from any working directory and complete.

    - ``adapter_config.json`` names the base model by its Hub id or absolute path; a base that is neither (trained
      from scratch, or a relative path that no longer resolves) is written to ``output_dir/base_model`` (the frozen
      base weights, without adapters) and named by that folder's absolute path.
    - ``adapter_model.safetensors`` also holds the trained ``logit_scale`` (and SigLIP's ``logit_bias``), which train
      under LoRA but are not adapter weights: peft and ``AutoModel.from_pretrained`` load them with the adapters.
    - ``gapclip_terms.safetensors`` holds the gap terms' own parameters (e.g. CUSA's temperatures, DIAS's β), which
      only training uses.

    Returns ``{"base_model", "extra_parameters", "terms_file"}`` for the card.
    """
    import copy

    from safetensors.torch import load_file, save_file

    output_dir = Path(output_dir)
    peft_model = model.backbone
    peft_config = peft_model.peft_config[peft_model.active_adapter]
    recorded = peft_config.base_model_name_or_path
    base = _portable_reference(recorded)
    if base is None:
        base_dir = output_dir / "base_model"
        copy.deepcopy(peft_model).unload().save_pretrained(str(base_dir))
        base = str(base_dir.resolve())
        logger.warning(f"The LoRA base model ({recorded or 'trained from scratch'}) has no Hub id or folder to refer "
                       f"to: its weights are exported to {base_dir}.")
    peft_config.base_model_name_or_path = base
    try:
        peft_model.save_pretrained(str(output_dir))
    finally:
        peft_config.base_model_name_or_path = recorded
    weights_path = output_dir / "adapter_model.safetensors"
    weights = load_file(str(weights_path))
    base_model = peft_model.get_base_model()
    extra = [name for name in _ADAPTER_EXTRA_PARAMETERS if isinstance(getattr(base_model, name, None), nn.Parameter)]
    for name in extra:
        weights[f"base_model.model.{name}"] = getattr(base_model, name).detach().cpu().clone()
    save_file(weights, str(weights_path), metadata={"format": "pt"})
    term_state = {f"gap_terms.{key}": value.detach().cpu().contiguous() for key, value in
                  model.gap_terms.state_dict().items()}
    if term_state:
        save_file(term_state, str(output_dir / TERMS_WEIGHTS_NAME), metadata={"format": "pt"})
    return {"base_model": base, "extra_parameters": extra, "terms_file": TERMS_WEIGHTS_NAME if term_state else None,
            "term_parameters": sorted(term_state)}


def _portable_reference(name_or_path: str | None) -> str | None:
    """A base model reference that works from any working directory: an existing folder made absolute, or a Hub id."""
    if not name_or_path:
        return None
    if os.path.isdir(name_or_path):
        return os.path.abspath(name_or_path)
    return _hub_id(name_or_path)


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
    recorded = config.training_run or {}
    return {
        "gapclip_version": __version__,
        "backbone": {
            "model_type": backbone_config.model_type,
            "architectures": getattr(backbone_config, "architectures", None),
            "base_model": _hub_id(backbone_config.name_or_path),
            "base_model_name_or_path": backbone_config.name_or_path or None,
        },
        "base_loss": base_loss,
        "base_loss_options": base_loss_options,
        "gap_terms": terms,
        "logit_scale_max": config.logit_scale_max,
        "gather_with_grad": config.gather_with_grad,
        "local_loss": bool(getattr(config, "local_loss", False)),
        "lora": dict(lora) if lora else None,
        "lora_merged": lora_merged,
        # a standalone export (recipes/export.py) finds what the training run recorded in the checkpoint's config
        "training": hyperparameters(training_args) if training_args is not None else recorded.get("hyperparameters"),
        "training_data": recorded.get("training_data"),
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


def hyperparameters(training_args: Any) -> dict[str, Any] | None:
    """The recorded training hyper-parameters of a `TrainingArguments` (or a dict), JSON-able, enums as strings."""
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
    if isinstance(value, Enum):  # before str: SchedulerType is a str Enum that prints as "SchedulerType.COSINE"
        return _jsonable(value.value)
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
    processor: Any = None,
    adapter: Mapping[str, Any] | None = None,
) -> ModelCard:
    """The release card: metadata (``ModelCardData`` with ``model-index``) + the gapclip template.

    The title and model-index name are the repository name of ``repo_id``, else ``<base model>-<method>`` (e.g.
    ``clip-vit-base-patch16-lgmgc``; ``clip-scratch-lgmgc`` without a base model); ``folder_name`` is not used for
    them (an export folder is usually called ``export``) and is kept for the usage snippet only.

    ``citations`` (BibTeX entries) default to those of the base loss and the gap terms ``training`` names, as the
    registry knows them (:func:`objective_citations` gives them from the model itself). ``processor`` gives the
    maximum sequence length; ``adapter`` describes a kept LoRA adapter (:func:`save_portable_adapter`).
    """
    template_path = Path(template_path) if template_path is not None else DEFAULT_TEMPLATE_PATH
    if not template_path.is_file():
        raise FileNotFoundError(f"Model card template not found: {str(template_path)!r}.")
    family = backbone.config.model_type
    overrides = dict(card_data or {})
    base_reference = training["backbone"].get("base_model_name_or_path")
    method = method_name(training)
    model_name = overrides.pop("model_name", None) or _default_model_name(repo_id, base_reference, family, method)
    base_model = overrides.pop("base_model", training["backbone"]["base_model"])
    training_data = training.get("training_data")
    if "datasets" not in overrides and training_data and training_data.get("source") == "hub":
        hub_dataset = _hub_id(training_data.get("location"))
        if hub_dataset:
            overrides["datasets"] = [hub_dataset]
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
        base_text=_base_text(base_model, base_reference),
        method=method,
        backbone_family=_FAMILY_NAMES.get(family, family),
        architecture=type(backbone).__name__,
        embedding_dim=_embedding_dim(backbone.config),
        max_sequence_length=_max_sequence_length(backbone.config, processor),
        image_size=getattr(getattr(backbone.config, "vision_config", None), "image_size", None),
        training_data=_describe_training_data(training_data),
        framework_versions=framework_versions(with_peft=bool(training.get("lora"))),
        adapter=adapter,
        padding='"max_length"' if family in ("siglip", "siglip2") else "True",
        base_loss=training["base_loss"],
        gap_terms=training["gap_terms"],
        lora=training.get("lora") if training.get("lora_merged") else None,
        hyperparameters=training.get("training"),
        results=_results_table(eval_results),
        citations=citations,
        license=data.license,
    )


def method_name(training: Mapping[str, Any]) -> str:
    """The training method of a training config: the papers its gap terms come from (``LG-MGC``, ``DIAS+CUSA``,
    a user term's own name), or the base loss alone (``infonce``)."""
    from .losses import TERM_REGISTRY

    methods: list[str] = []
    for term in training.get("gap_terms", []):
        cls = TERM_REGISTRY.get(term["name"])
        method = _METHOD_OF_MODULE.get(cls.__module__, term["name"]) if cls is not None else term["name"]
        if method not in methods:
            methods.append(method)
    return "+".join(methods) if methods else str(training.get("base_loss"))


def _default_model_name(repo_id: str | None, base: str | None, family: str, method: str) -> str:
    if repo_id:
        return repo_id.split("/")[-1]
    stem = Path(base.rstrip("/")).name if base else f"{family}-scratch"
    return f"{stem}-{re.sub(r'[^a-z0-9+]+', '', method.lower())}"


def _base_text(hub_id: str | None, name_or_path: str | None) -> str | None:
    """How the card names the base model: its Hub id, or a local folder by its name only (a public card should not
    show the trainer's file system; ``gapclip_training.json`` keeps the full path)."""
    if hub_id:
        return f"`{hub_id}`"
    return f"the local model `{Path(name_or_path.rstrip('/')).name}`" if name_or_path else None


def _embedding_dim(config: Any) -> int | None:
    """Width of the retrieval embeddings: the projection of CLIP / VisionTextDualEncoder, SigLIP's text head."""
    if getattr(config, "projection_dim", None):
        return int(config.projection_dim)
    text = getattr(config, "text_config", None)
    value = getattr(text, "projection_size", None) or getattr(text, "hidden_size", None)
    return int(value) if value else None


def _max_sequence_length(config: Any, processor: Any) -> int | None:
    """Longest caption in tokens: the tokenizer's limit when it sets one, else the text tower's positions."""
    tokenizer = getattr(processor, "tokenizer", processor)
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    value = getattr(getattr(config, "text_config", None), "max_position_embeddings", None)
    return int(value) if value else None


def _describe_training_data(data: Mapping[str, Any] | None) -> str | None:
    """One sentence on what the model was trained on (as sentence-transformers' cards give the training dataset)."""
    if not data:
        return None
    if data.get("source") == "demo":
        what = "the offline synthetic gapclip demo set (coloured shapes with generated captions)"
    else:
        location = data.get("location")
        if location and not _hub_id(location):  # a local file: its name, not the trainer's file system
            location = Path(location).name
        where = f", `{location}`" if location else ""
        what = f"the `{data.get('split')}` split of `{data.get('name')}` ({data.get('source')}{where})"
    sizes = ""
    if data.get("images") is not None:
        sizes = f": {data['images']:,} images, {data['captions']:,} captions"
    pairs = ("one caption per image per epoch" if data.get("pair_mode") == "one_per_image"
             else "every (image, caption) pair each epoch")
    translations = ", with generated image translations (LG-MGC GST)" if data.get("translations") else ""
    return f"{what}{sizes}; {pairs}{translations}"


def framework_versions(*, with_peft: bool = False) -> dict[str, str]:
    """Python and library versions, as the card lists them."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"Python": platform.python_version()}
    for display, distribution in _FRAMEWORKS:
        if distribution == "peft" and not with_peft:
            continue
        try:
            versions[display] = version(distribution)
        except PackageNotFoundError:
            continue
    return versions


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
    "TERMS_WEIGHTS_NAME",
    "TRAINING_CONFIG_NAME",
    "PushToHubError",
    "eval_results_for_card",
    "export_backbone",
    "framework_versions",
    "hyperparameters",
    "method_name",
    "normalise_eval_results",
    "push_exported",
    "push_failed_error",
    "render_model_card",
    "save_portable_adapter",
    "training_config",
]
