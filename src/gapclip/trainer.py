"""GapClipTrainer: the stock `Trainer` plus per-term loss logging and paper-style retrieval evaluation."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Any

import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback
from transformers.utils import logging

from .data.pairs import CaptionPairs
from .inference import embed_caption_dataset, retrieval_report

logger = logging.get_logger(__name__)


class EpochCallback(TrainerCallback):
    """Tells the training pairs (and a batch sampler) which epoch it is, so the caption drawn per image and the
    batch order are reproducible on resume."""

    def __init__(self, *targets: Any):
        self.targets = [target for target in targets if hasattr(target, "set_epoch")]

    def on_epoch_begin(self, args, state, control, **kwargs):
        for target in self.targets:
            target.set_epoch(int(math.floor(state.epoch or 0)))


class GapClipTrainer(Trainer):
    """`Trainer` for :class:`~gapclip.GapClipModel`.

    The loss is the model's own (base + Σ weight·term, with ``return_loss=True`` coming from the collator);
    this class only adds:

    - each unweighted term logged by name next to ``loss`` (``loss_base``, ``loss_lsc`` ...), in training and in
      evaluation (``eval_loss_*``);
    - :meth:`evaluate` runs image↔text retrieval on a caption dataset (every image, all its captions) and returns
      ``eval_i2t_r1 … eval_rsum, eval_modality_gap``, so ``metric_for_best_model="rsum"`` and
      ``load_best_model_at_end`` work.

    Args:
        processor: the backbone's processor, to embed the evaluation images and captions.
        eval_chunk_size: query chunk of the similarity computation (bounds evaluation memory).
        modality_gap_pairs: pairs used for the modality gap (1000 as in the LG-MGC supplement).
        coco_1k: also report the COCO 1K protocol (mean over 5 folds), prefixed ``1k_``.
        eval_loss_terms: also compute the loss terms on (image, first caption) pairs of the evaluation set.
        train_batch_sampler: a batch sampler that yields this process' share of each global batch (e.g. DIAS's
            :class:`~gapclip.data.kmeans_sampler.KMeansBatchSampler`); used as it is, not re-sharded.
    """

    def __init__(
        self,
        *args,
        processor: Any = None,
        eval_chunk_size: int = 1024,
        modality_gap_pairs: int = 1000,
        coco_1k: bool = False,
        eval_loss_terms: bool = True,
        train_batch_sampler: Any = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.train_batch_sampler = train_batch_sampler
        self.processor = processor if processor is not None else self.processing_class
        self.eval_chunk_size = eval_chunk_size
        self.modality_gap_pairs = modality_gap_pairs
        self.coco_1k = coco_1k
        self.eval_loss_terms = eval_loss_terms
        # Our forward takes no `num_items_in_batch`: let the Trainer scale the loss for gradient accumulation.
        self.model_accepts_loss_kwargs = False
        self._term_sums: dict[str, float] = defaultdict(float)
        self._term_count = 0
        self.add_callback(EpochCallback(self.train_dataset, self.train_batch_sampler))

    def get_train_dataloader(self):
        if self.train_batch_sampler is None:
            return super().get_train_dataloader()
        # The sampler already hands each process its slice of the global batch: no accelerate re-sharding. The
        # Trainer still moves every batch to the device (`_prepare_inputs`).
        return torch.utils.data.DataLoader(
            self.train_dataset, batch_sampler=self.train_batch_sampler, collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available(),
        )

    # ------------------------------------------------------------------ training
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        if outputs.loss is None:
            raise ValueError("The model returned no loss: the collator must pass `return_loss=True`.")
        if model.training and outputs.loss_terms:
            for name, value in outputs.loss_terms.items():
                self._term_sums[name] += value.detach().float().item()
            self._term_count += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._term_count:
            for name, total in self._term_sums.items():
                logs[f"loss_{name}"] = round(total / self._term_count, 6)
            self._term_sums.clear()
            self._term_count = 0
        super().log(logs, start_time)

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
        metrics = retrieval_report(
            embedded, chunk_size=self.eval_chunk_size, gap_pairs=self.modality_gap_pairs, coco_1k=self.coco_1k
        )
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
