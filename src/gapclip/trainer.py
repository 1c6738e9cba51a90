"""GapClipTrainer: the stock `Trainer` plus per-term loss logging and paper-style retrieval evaluation."""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from .checkpoints import STAGING_DIR, CrashSafeCheckpointMixin  # noqa: F401  (STAGING_DIR: re-exported)
from .data.pairs import CaptionPairs
from .evaluation.evaluators import EvaluationContext, Evaluator, RetrievalEvaluator, run_evaluators
from .gradient_cache import gradient_cached_forward
from .inference import embed_caption_dataset
from .nonfinite import NonFiniteGuard, NonFiniteGuardMixin

logger = logging.get_logger(__name__)

#: The training batch sampler's state (e.g. K-means epoch and cluster assignment) inside a checkpoint.
SAMPLER_STATE_NAME = "batch_sampler_state.json"


class EpochCallback(TrainerCallback):
    """Tells the training pairs (and a batch sampler) which epoch it is, so the caption drawn per image and the
    batch order are reproducible on resume."""

    def __init__(self, *targets: Any):
        self.targets = [target for target in targets if hasattr(target, "set_epoch")]

    def on_epoch_begin(self, args, state, control, **kwargs):
        for target in self.targets:
            target.set_epoch(int(math.floor(state.epoch or 0)))


def pinned_memory_helps(args: Any) -> bool:
    """Whether ``args.dataloader_pin_memory`` should be honoured: pinned host memory only speeds up copies to an
    accelerator, and without one torch warns on every DataLoader that asks for it. Also serves a plain
    ``TrainingArguments``, which (unlike ``GapClipTrainingArguments``) keeps the Trainer's default of pinning."""
    return bool(args.dataloader_pin_memory) and not args.use_cpu and torch.accelerator.is_available()


class GapClipTrainer(NonFiniteGuardMixin, CrashSafeCheckpointMixin, Trainer):
    """`Trainer` for :class:`~gapclip.GapClipModel`.

    The loss is the model's own (base + Σ weight·term, with ``return_loss=True`` coming from the collator);
    this class only adds:

    - each unweighted term logged by name next to ``loss`` (``loss_base``, ``loss_lsc`` ...), in training (averaged
      over the applied steps by :class:`~gapclip.nonfinite.NonFiniteGuardMixin`) and in evaluation (``eval_loss_*``);
    - :meth:`evaluate` runs image↔text retrieval on a caption dataset (every image, all its captions) and returns
      ``eval_i2t_r1 … eval_rsum, eval_modality_gap``, plus the metrics of the given ``evaluators`` (ECCV, uni-modal,
      STS: :mod:`gapclip.evaluation.evaluators`), so ``metric_for_best_model="rsum"`` (or any of those) and
      ``load_best_model_at_end`` work;
    - reliability: a non-finite loss/gradient skips its step (:mod:`gapclip.nonfinite`, ``max_nonfinite_steps``);
      skipped steps are logged as ``skipped_steps`` (a count per logging window, and ``train_skipped_steps`` in the
      final metrics) and left out of the averaged ``loss``/``loss_<term>`` and ``train_loss``; a checkpoint
      appears as ``checkpoint-N`` only when complete (:mod:`gapclip.checkpoints`); the batch
      sampler's state (``state_dict``/``load_state_dict``) is saved with each checkpoint and restored on resume, and
      so is the state of any callback with ``save_checkpoint_state(folder)``/``load_checkpoint_state(folder)``;
      resuming a checkpoint trained with other ``gap_terms``/``base_loss`` is a ``ValueError`` naming both;
    - gradient caching: with ``args.gradient_cache_chunk_size`` (:class:`~gapclip.cli.GapClipTrainingArguments`)
      each training batch is embedded that many rows at a time (:mod:`gapclip.gradient_cache`): the gradient of the
      whole batch in the activation memory of a chunk, also under gradient accumulation and data parallelism (DDP);
      not with FSDP or DeepSpeed, which shard the parameters the chunks re-run.

    Args:
        processor: the backbone's processor, to embed the evaluation images and captions.
        eval_chunk_size: query chunk of the similarity computation (bounds evaluation memory).
        modality_gap_pairs: pairs used for the modality gap (1000 as in the LG-MGC supplement).
        coco_1k: also report the COCO 1K protocol (mean over 5 folds), prefixed ``1k_``.
        evaluators: further :class:`~gapclip.evaluation.Evaluator` s run on the evaluated split (e.g.
            ``ECCVEvaluator``, ``UniModalEvaluator``, ``STSEvaluator``); their metrics join the retrieval ones.
        eval_loss_terms: also compute the loss terms on (image, first caption) pairs of the evaluation set.
        train_batch_sampler: a batch sampler that yields this process' share of each global batch (e.g. DIAS's
            :class:`~gapclip.data.kmeans_sampler.KMeansBatchSampler`); used as it is, not re-sharded.
        max_nonfinite_steps: an optimizer step whose loss or gradients are NaN/inf is skipped (gradients zeroed,
            a warning names the non-finite loss terms); after this many *consecutive* skipped steps training stops
            with a ``RuntimeError`` naming them.
    """

    def __init__(
        self,
        *args,
        processor: Any = None,
        eval_chunk_size: int = 1024,
        modality_gap_pairs: int = 1000,
        coco_1k: bool = False,
        evaluators: Sequence[Evaluator] = (),
        eval_loss_terms: bool = True,
        train_batch_sampler: Any = None,
        max_nonfinite_steps: int = 3,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.nonfinite_guard = NonFiniteGuard(max_nonfinite_steps)
        self._last_loss_terms: dict[str, torch.Tensor] = {}
        self.train_batch_sampler = train_batch_sampler
        self.processor = processor if processor is not None else self.processing_class
        self.eval_chunk_size = eval_chunk_size
        self.modality_gap_pairs = modality_gap_pairs
        self.coco_1k = coco_1k
        self.evaluators = list(evaluators)
        self.eval_loss_terms = eval_loss_terms
        # Our forward takes no `num_items_in_batch`: let the Trainer scale the loss for gradient accumulation.
        self.model_accepts_loss_kwargs = False
        self.gradient_cache_chunk_size = getattr(self.args, "gradient_cache_chunk_size", None)
        if self.gradient_cache_chunk_size and (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            raise ValueError(
                "--gradient_cache_chunk_size re-runs the model's chunks outside the distributed wrapper, which FSDP "
                "and DeepSpeed need for their sharded parameters: train without gradient caching there (or with DDP)."
            )
        self.add_callback(EpochCallback(self.train_dataset, self.train_batch_sampler))

    def get_train_dataloader(self):
        if self.train_batch_sampler is None:
            return super().get_train_dataloader()
        # The sampler already hands each process its slice of the global batch: no accelerate re-sharding. The
        # Trainer still moves every batch to the device (`_prepare_inputs`).
        return torch.utils.data.DataLoader(
            self.train_dataset, batch_sampler=self.train_batch_sampler, collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=pinned_memory_helps(self.args),
        )

    def save_checkpoint_extras(self, folder: str) -> None:
        if hasattr(self.train_batch_sampler, "state_dict"):  # e.g. K-means epoch and clusters, for resume
            with open(os.path.join(folder, SAMPLER_STATE_NAME), "w", encoding="utf-8") as handle:
                json.dump(self.train_batch_sampler.state_dict(), handle)
        for callback in self.callback_handler.callbacks:  # e.g. a callback that keeps the best epoch's weights
            if hasattr(callback, "save_checkpoint_state"):
                callback.save_checkpoint_state(folder)

    # ------------------------------------------------------------------ training
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.gradient_cache_chunk_size and model.training and torch.is_grad_enabled():
            # The returned loss' backward (the Trainer's) re-runs the chunks and averages the gradients over
            # processes at the end of each optimizer step's last micro-batch, as DDP would.
            outputs = gradient_cached_forward(
                self.accelerator.unwrap_model(model), inputs, self.gradient_cache_chunk_size,
                sync_gradients=lambda: self.accelerator.num_processes > 1 and self.accelerator.sync_gradients,
            )
        else:
            outputs = model(**inputs)
        if outputs.loss is None:
            raise ValueError("The model returned no loss: the collator must pass `return_loss=True`.")
        if model.training:
            # Booked by the non-finite guard (`training_step`) and logged once the step is known to be applied.
            self._last_loss_terms = {name: value.detach() for name, value in (outputs.loss_terms or {}).items()}
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    # ------------------------------------------------------------------ checkpoints and resume
    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if resume_from_checkpoint is True or (isinstance(resume_from_checkpoint, str) and resume_from_checkpoint):
            if resume_from_checkpoint is True:
                resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
                if resume_from_checkpoint is None:
                    raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
            self._check_resume_objective(resume_from_checkpoint)
            self._load_sampler_state(resume_from_checkpoint)
            for callback in self.callback_handler.callbacks:
                if hasattr(callback, "load_checkpoint_state"):
                    callback.load_checkpoint_state(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _check_resume_objective(self, checkpoint: str) -> None:
        """A checkpoint trained with another objective (terms, weights, options, base loss) is not this run's."""
        path = os.path.join(checkpoint, "config.json")
        model_config = getattr(self.accelerator.unwrap_model(self.model), "config", None)
        if not os.path.isfile(path) or not hasattr(model_config, "gap_terms"):
            return
        from .losses import validate_term_specs

        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
        if "gap_terms" not in saved:
            return
        theirs = (validate_term_specs(saved.get("gap_terms")), saved.get("base_loss", "auto"))
        ours = (validate_term_specs(model_config.gap_terms), model_config.base_loss)
        if theirs != ours:
            raise ValueError(
                f"Cannot resume from {checkpoint}: it was trained with gap_terms={theirs[0]}, base_loss={theirs[1]!r} "
                f"but this run has gap_terms={ours[0]}, base_loss={ours[1]!r}. Resume with the checkpoint's "
                "objective, or start the new objective in a fresh --output_dir (--model_name_or_path CHECKPOINT "
                "starts it from those weights)."
            )

    def _load_sampler_state(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, SAMPLER_STATE_NAME)
        if hasattr(self.train_batch_sampler, "load_state_dict") and os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                self.train_batch_sampler.load_state_dict(json.load(handle))
            logger.info(f"Restored the batch sampler state from {path}.")

    # ------------------------------------------------------------------ evaluation
    def evaluate(
        self, eval_dataset: Dataset | dict[str, Dataset] | None = None, ignore_keys=None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("GapClipTrainer.evaluate needs an eval_dataset (a caption dataset: image, captions).")
        if isinstance(dataset, dict):
            metrics: dict[str, float] = {}
            for name, split in dataset.items():
                metrics.update(self.evaluate(split, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        if isinstance(dataset, CaptionPairs):
            dataset = dataset.dataset
        start = time.time()
        model = self.accelerator.unwrap_model(self.model)
        embedded = embed_caption_dataset(
            model, dataset, self.processor, batch_size=self.args.per_device_eval_batch_size,
            accelerator=self.accelerator, num_workers=self.args.dataloader_num_workers,
            padding=getattr(self.data_collator, "padding", "longest"),
            max_length=getattr(self.data_collator, "max_length", None),
            show_progress=not self.args.disable_tqdm,
        )
        context = EvaluationContext(
            model=model, processor=self.processor, dataset=dataset, embedded=embedded,
            batch_size=self.args.per_device_eval_batch_size, chunk_size=self.eval_chunk_size,
            max_length=getattr(self.data_collator, "max_length", None),
            padding=getattr(self.data_collator, "padding", "longest"),
        )
        retrieval = RetrievalEvaluator(gap_pairs=self.modality_gap_pairs, coco_1k=self.coco_1k)
        was_training = model.training
        model.eval()
        try:
            metrics = run_evaluators([retrieval, *self.evaluators], context)
        finally:
            model.train(was_training)
        if self.eval_loss_terms:
            metrics.update(self._eval_loss_terms(dataset))
        metrics["runtime"] = round(time.time() - start, 4)
        metrics = {f"{metric_key_prefix}_{key}": value for key, value in metrics.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _eval_loss_terms(self, dataset: Dataset) -> dict[str, float]:
        """Unweighted loss terms on (image, first-drawn caption) pairs of the evaluation split."""
        pairs = CaptionPairs(dataset, mode="one_per_image", seed=self.args.seed)
        loader = self.accelerator.prepare(
            torch.utils.data.DataLoader(
                pairs, batch_size=self.args.per_device_eval_batch_size, collate_fn=self.data_collator,
                num_workers=self.args.dataloader_num_workers,
            )
        )
        model = self.model
        was_training = model.training
        model.eval()
        sums: dict[str, float] = defaultdict(float)
        weight_total = 0
        try:
            with torch.no_grad():
                for batch in loader:
                    rows = batch["input_ids"].shape[0]
                    if rows * self.accelerator.num_processes < 2:
                        continue
                    outputs = model(**batch)
                    sums["loss"] += outputs.loss.item() * rows
                    for name, value in outputs.loss_terms.items():
                        sums[f"loss_{name}"] += value.item() * rows
                    weight_total += rows
        finally:
            model.train(was_training)
        return {key: value / weight_total for key, value in sums.items()} if weight_total else {}
