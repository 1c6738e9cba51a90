"""One training run of the study: train on the training split, keep the epoch that scores best on validation,
then score that model on the test split (metrics and per-query ranks for the paired statistics).

The number of epochs is chosen on validation inside every run (the model of the best validation RSUM is kept, the
``load_best_model_at_end`` convention of transformers' examples) under a cosine schedule of ``epochs`` epochs; the
learning rate is chosen by the study's first stage. Baseline and methods get exactly the same procedure.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback, set_seed
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from ..evaluation import metrics_from_ranks, modality_gap, retrieval_ranks
from ..inference import embed_caption_dataset

logger = logging.get_logger(__name__)

__all__ = ["RunSpec", "RunStore", "evaluate_split", "load_run", "run_key", "train_and_evaluate", "train_and_save"]


@dataclass(frozen=True)
class RunSpec:
    """Everything that decides a run's result (hashed into its cache key, together with the study context)."""

    label: str  # what the run is for, e.g. "tune infonce lr=1e-4" (not part of the key)
    base: str
    gap_terms: tuple[tuple[str, float, tuple[tuple[str, Any], ...]], ...]
    learning_rate: float
    epochs: int
    seed: int
    sampler: str = "random"

    @classmethod
    def make(cls, label: str, base: str, gap_terms: list[dict[str, Any]], **kwargs: Any) -> RunSpec:
        terms = tuple(
            (t["name"], float(t["weight"]), tuple(sorted(t.get("options", {}).items()))) for t in gap_terms
        )
        return cls(label=label, base=base, gap_terms=terms, **kwargs)

    def term_specs(self) -> list[dict[str, Any]]:
        return [{"name": name, "weight": weight, "options": dict(options)} for name, weight, options in self.gap_terms]

    @property
    def needs_teachers(self) -> bool:
        from .variants import TERM_NEEDS

        return any("teacher" in TERM_NEEDS.get(name, ()) for name, _, _ in self.gap_terms)


#: Code changes that alter the runs of a base loss without changing their spec: a run cached before one is redone.
BASE_LOSS_REVISIONS = {"triplet": "distance-weighted negatives drawn by inverse CDF (issue 17)"}


def run_key(spec: RunSpec, context_key: str) -> str:
    payload = {key: value for key, value in asdict(spec).items() if key != "label"}
    if spec.base in BASE_LOSS_REVISIONS:
        payload["revision"] = BASE_LOSS_REVISIONS[spec.base]
    digest = hashlib.sha1(json.dumps([context_key, payload], sort_keys=True, default=str).encode()).hexdigest()
    return digest[:16]


def _as_float32_weights(spec: RunSpec) -> RunSpec:
    return replace(spec, gap_terms=tuple((name, float(np.float32(w)), opts) for name, w, opts in spec.gap_terms))


def _spec_of_finished_run(path: Path) -> RunSpec | None:
    """The spec the record at ``path`` was trained on; ``None`` for a record that is not a run's or whose ranks are
    missing (:func:`load_run` would not return it)."""
    try:
        record = json.loads(path.read_text())
        if _ranks_missing(record, path.with_suffix(".npz")):
            return None
        spec = record["spec"]
        terms = tuple((name, float(w), tuple(tuple(o) for o in opts)) for name, w, opts in spec["gap_terms"])
        return RunSpec(**{**spec, "gap_terms": terms})
    except (OSError, ValueError, KeyError, TypeError):
        return None


class RunStore:
    """The finished runs in ``folder`` of the study context ``context_key``, found by their spec.

    A run is saved under :func:`run_key` of its spec. A weight that stage 2's grid makes as a product (0.1 × 0.1 =
    0.010000000000000002) and the same weight typed in (``--fixed_weights dias_intra=0.01``) hash to different keys,
    yet multiply the float32 losses as one float32 value: the runs are the same computation. So when a spec's own
    key is not on disk, the run of a spec that differs from it only in weights of the same float32 value is read
    back instead of training it again (keys stay as they were: every committed run is still found under its own)."""

    def __init__(self, folder: Path, context_key: str):
        self.folder, self.context_key = Path(folder), context_key
        self._by_float32_spec: dict[str, str] | None = None

    def key(self, spec: RunSpec) -> str:
        """The key ``spec``'s run is saved under, or is to be trained under when it has not run yet."""
        exact = run_key(spec, self.context_key)
        if (self.folder / f"{exact}.json").is_file():
            return exact
        # registered even when nothing matches, so an equivalent spec later in this study shares the run to come
        found = self._index().setdefault(run_key(_as_float32_weights(spec), self.context_key), exact)
        if found != exact:
            logger.info(f"Run {spec.label!r}: reading back {found}, the same run with its weights as other floats.")
        return found

    def _index(self) -> dict[str, str]:
        if self._by_float32_spec is None:
            self._by_float32_spec = {}
            for path in sorted(self.folder.glob("*.json")):
                spec = _spec_of_finished_run(path)
                # only a record of this context, saved under its own spec's key
                if spec is not None and run_key(spec, self.context_key) == path.stem:
                    self._by_float32_spec.setdefault(run_key(_as_float32_weights(spec), self.context_key), path.stem)
        return self._by_float32_spec


@dataclass
class RunContext:
    """What all runs of one regime share: data, processor, how to build the initial model, training settings."""

    regime: str
    train: Any
    validation: Any
    test: Any
    processor: Any
    build_backbone: Any  # () -> (backbone model or None, backbone config) ; see runner
    key: str
    work_dir: Path
    batch_size: int = 64
    eval_batch_size: int = 128
    weight_decay: float = 0.1
    warmup_ratio: float = 0.05
    images_per_cluster: int = 4
    teachers: Any = None
    use_cpu: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def evaluate_split(model: Any, dataset: Any, processor: Any, *, batch_size: int = 128) -> tuple[dict, np.ndarray, np.ndarray]:
    """Retrieval metrics, modality gap (1,000 pairs) and per-query ranks ``(i2t [N], t2i [M])`` on a caption split."""
    embedded = embed_caption_dataset(model, dataset, processor, batch_size=batch_size, show_progress=False)
    i2t, t2i = retrieval_ranks(embedded.image_embeds, embedded.text_embeds, embedded.text_to_image)
    metrics = metrics_from_ranks(i2t, t2i)
    metrics["modality_gap"] = modality_gap(  # on 1,000 pairs, as LG-MGC reports it (all, on smaller splits)
        embedded.image_embeds, embedded.text_embeds, text_to_image=embedded.text_to_image,
        num_pairs=min(1000, len(dataset)),
    )
    return metrics, i2t.cpu().numpy().astype(np.int32), t2i.cpu().numpy().astype(np.int32)


class KeepBestOnValidation(TrainerCallback):
    """After every epoch: score the validation split; keep a copy of the weights with the best RSUM so far.

    Its state (the validation history, the best epoch's weights and metrics, and the run's wall time so far) is saved
    with every checkpoint and restored on resume, so a run resumed after a kill keeps the best epoch it had already
    seen, and its record's ``wall_seconds`` counts the killed process's time up to that checkpoint too."""

    STATE_NAME = "study_keep_best.pt"

    def __init__(self, validation: Any, processor: Any, batch_size: int, *, started: float):
        self.validation, self.processor, self.batch_size = validation, processor, batch_size
        self.started = started  # ``time.time()`` when the run's process began it (model building included)
        self.earlier_seconds = 0.0  # spent by killed processes of this run, up to the checkpoint resumed from
        self.history: list[dict[str, float]] = []
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_epoch = 0
        self.best_rsum = -math.inf
        self.best_metrics: dict[str, float] | None = None

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        metrics, _, _ = evaluate_split(model, self.validation, self.processor, batch_size=self.batch_size)
        epoch = len(self.history) + 1
        self.history.append({"epoch": epoch, "rsum": metrics["rsum"], "modality_gap": metrics["modality_gap"]})
        if metrics["rsum"] > self.best_rsum:
            self.best_rsum, self.best_epoch = metrics["rsum"], epoch
            self.best_state = {name: value.detach().cpu().clone() for name, value in model.state_dict().items()}
            self.best_metrics = metrics
        if state.epoch is not None and state.epoch >= args.num_train_epochs - 1e-6:
            control.should_save = False  # what is left after the last epoch is the test pass: nothing to resume
        return control

    def save_checkpoint_state(self, folder: str) -> None:
        torch.save({"history": self.history, "best_state": self.best_state, "best_epoch": self.best_epoch,
                    "best_rsum": self.best_rsum, "best_metrics": self.best_metrics,
                    "elapsed_seconds": self.elapsed_seconds()},
                   Path(folder) / self.STATE_NAME)

    def load_checkpoint_state(self, folder: str) -> None:
        state = torch.load(Path(folder) / self.STATE_NAME, weights_only=True)
        self.history, self.best_state, self.best_epoch = state["history"], state["best_state"], state["best_epoch"]
        self.best_rsum, self.best_metrics = state["best_rsum"], state["best_metrics"]
        self.earlier_seconds = float(state.get("elapsed_seconds", 0.0))  # absent from checkpoints of older versions

    def elapsed_seconds(self) -> float:
        """The run's wall time so far, over every process that trained it (a killed one up to its last checkpoint)."""
        return self.earlier_seconds + time.time() - self.started


def _new_model(spec: RunSpec, context: RunContext) -> Any:
    from ..configuration import GapClipConfig
    from ..modeling import GapClipModel
    from .variants import BASELINES

    set_seed(spec.seed)  # the initialisation of a from-scratch model and of any term parameters
    backbone, backbone_config = context.build_backbone()
    config = GapClipConfig(backbone_config, gap_terms=spec.term_specs(), **BASELINES[spec.base])
    return GapClipModel(config, backbone=copy.deepcopy(backbone) if backbone is not None else None)


def _kmeans_sampler(model: Any, context: RunContext, seed: int):
    from ..data.kmeans_sampler import KMeansBatchSampler, KMeansRefreshCallback
    from ..inference import embed_images

    def embed(current_model):
        return embed_images(current_model, context.train, context.processor, batch_size=context.eval_batch_size,
                            show_progress=False)

    if context.batch_size % context.images_per_cluster:
        raise ValueError(
            f"The batch size ({context.batch_size}) must be a multiple of images_per_cluster "
            f"({context.images_per_cluster}) for K-means neighbour batches."
        )
    sampler = KMeansBatchSampler(
        embed(model), clusters_per_batch=context.batch_size // context.images_per_cluster,
        images_per_cluster=context.images_per_cluster, seed=seed, drop_last=True,
    )
    return sampler, [KMeansRefreshCallback(sampler, embed)]


def train_and_evaluate(spec: RunSpec, context: RunContext, work_dir: Path | None = None) -> dict[str, Any]:
    """Train ``spec`` in ``context``; returns the run record (see :func:`load_run`) and the test ranks.

    With a ``work_dir`` of its own, the run saves a checkpoint there after every epoch but the last (only the latest
    kept; after the last epoch only the test pass is left) and, when one is there already, resumes from it: a study
    killed mid-run loses at most the epoch in progress. Without one nothing is saved (and ``context.work_dir`` is
    only the Trainer's output folder)."""
    from ..cli import GapClipTrainingArguments
    from ..data import CaptionPairs, GapClipCollator
    from ..trainer import GapClipTrainer

    start = time.time()
    model = _new_model(spec, context)
    pairs = CaptionPairs(context.train, mode="one_per_image", seed=spec.seed)
    collator = GapClipCollator(
        context.processor, term_inputs=model.declared_term_inputs,
        input_providers=[context.teachers] if spec.needs_teachers else [],
    )
    keep_best = KeepBestOnValidation(context.validation, context.processor, context.eval_batch_size, started=start)
    callbacks: list[Any] = [keep_best]
    sampler = None
    if spec.sampler == "kmeans":
        sampler, sampler_callbacks = _kmeans_sampler(model, context, spec.seed)
        callbacks.extend(sampler_callbacks)
    steps_per_epoch = len(pairs) // context.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"The training split has {len(pairs)} images, fewer than one batch of {context.batch_size}; "
            "lower --per_device_train_batch_size."
        )
    args = GapClipTrainingArguments(
        output_dir=str(work_dir or context.work_dir), num_train_epochs=spec.epochs, learning_rate=spec.learning_rate,
        per_device_train_batch_size=context.batch_size, weight_decay=context.weight_decay,
        warmup_steps=context.warmup_ratio, seed=spec.seed, eval_strategy="no",
        save_strategy="epoch" if work_dir else "no", save_total_limit=1,
        load_best_model_at_end=False, logging_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_pin_memory=False, use_cpu=context.use_cpu, metric_for_best_model=None,
    )
    trainer = GapClipTrainer(
        model=model, args=args, train_dataset=pairs, data_collator=collator, processing_class=context.processor,
        processor=context.processor, callbacks=callbacks, train_batch_sampler=sampler,
    )
    trainer.remove_callback(PrinterCallback)  # a study prints its tables, not every run's training summary
    diverged = None
    checkpoint = get_last_checkpoint(str(work_dir)) if work_dir is not None and Path(work_dir).is_dir() else None
    if checkpoint is not None:
        logger.warning(f"Run {spec.label!r}: resuming from {checkpoint}.")
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except RuntimeError as error:  # the non-finite guard stopped the run: a result, not a crash of the study
        if "non-finite" not in str(error):
            raise
        diverged = str(error).splitlines()[0]
        logger.warning(f"Run {spec.label!r} stopped: {diverged}")
    record: dict[str, Any] = {
        "label": spec.label, "spec": asdict(spec), "regime": context.regime, "validation_history": keep_best.history,
        "diverged": diverged, "best_epoch": keep_best.best_epoch or None,
    }
    ranks = None
    if keep_best.best_state is not None:
        trainer.model.load_state_dict(keep_best.best_state)
        record["validation"] = keep_best.best_metrics
        test_metrics, i2t, t2i = evaluate_split(
            trainer.model, context.test, context.processor, batch_size=context.eval_batch_size
        )
        record["test"] = test_metrics
        ranks = {"i2t": i2t, "t2i": t2i}
    else:
        record["validation"] = record["test"] = None
    record["wall_seconds"] = round(keep_best.elapsed_seconds(), 2)
    record["torch_threads"] = torch.get_num_threads()
    trainer.accelerator.free_memory()
    return {"record": record, "ranks": ranks}


def train_and_save(spec: RunSpec, key: str, context: RunContext, folder: Path) -> None:
    """Train ``spec`` (resuming its checkpoint under ``context.work_dir / key`` if a killed study left one), save
    its record and ranks in ``folder``, then delete the checkpoint."""
    work_dir = Path(context.work_dir) / key
    save_run(folder, key, train_and_evaluate(spec, context, work_dir))
    shutil.rmtree(work_dir, ignore_errors=True)


def save_run(folder: Path, key: str, result: dict[str, Any]) -> None:
    """Write a run's ranks, then its record (last, so a record on disk means a complete run)."""
    folder.mkdir(parents=True, exist_ok=True)
    if result["ranks"] is not None:
        tmp = folder / f".{key}.npz.tmp"
        with tmp.open("wb") as handle:
            np.savez_compressed(handle, **result["ranks"])
        tmp.replace(folder / f"{key}.npz")
    tmp = folder / f".{key}.json.tmp"
    tmp.write_text(json.dumps(result["record"], indent=1))
    tmp.replace(folder / f"{key}.json")


def _ranks_missing(record: dict[str, Any], ranks_path: Path) -> bool:
    """A record with test results but no ranks file is not a finished run (:func:`save_run` writes the ranks first)."""
    return record.get("test") is not None and not ranks_path.is_file()


def load_run(folder: Path, key: str) -> dict[str, Any] | None:
    """The saved record of a finished run (``None`` if it never finished), with its ranks under ``"ranks"``."""
    path = folder / f"{key}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    ranks_path = folder / f"{key}.npz"
    if _ranks_missing(record, ranks_path):
        return None
    if record.get("test") is not None:
        with np.load(ranks_path) as data:
            record["ranks"] = {"i2t": data["i2t"], "t2i": data["t2i"]}
    return record
