"""GapClipTrainer: the stock `Trainer` plus per-term loss logging and paper-style retrieval evaluation."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import defaultdict
from typing import Any

import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints
from transformers.utils import logging

from .data.pairs import CaptionPairs
from .inference import embed_caption_dataset, retrieval_report

logger = logging.get_logger(__name__)

#: The training batch sampler's state (e.g. K-means epoch and cluster assignment) inside a checkpoint.
SAMPLER_STATE_NAME = "batch_sampler_state.json"

#: Checkpoints are written into this sub-folder of the run folder and moved to ``checkpoint-N`` once complete, so
#: a run killed while saving never leaves a half-written ``checkpoint-N`` for ``get_last_checkpoint`` to resume from.
STAGING_DIR = ".checkpoint-staging"


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
      ``load_best_model_at_end`` work;
    - reliability: a non-finite loss/gradient skips its step (see ``max_nonfinite_steps``); skipped steps are
      logged as ``skipped_steps`` (a count per logging window, and ``train_skipped_steps`` in the final metrics) and
      left out of the averaged ``loss``/``loss_<term>`` and ``train_loss``; a checkpoint is written
      into a hidden staging folder and renamed to ``checkpoint-N`` only when complete, so a process killed while
      saving never leaves a half-written ``checkpoint-N`` for ``get_last_checkpoint``/resume to pick; the batch
      sampler's state (``state_dict``/``load_state_dict``) is saved with each checkpoint and restored on resume;
      resuming a checkpoint trained with other ``gap_terms``/``base_loss`` is a ``ValueError`` naming both.

    Args:
        processor: the backbone's processor, to embed the evaluation images and captions.
        eval_chunk_size: query chunk of the similarity computation (bounds evaluation memory).
        modality_gap_pairs: pairs used for the modality gap (1000 as in the LG-MGC supplement).
        coco_1k: also report the COCO 1K protocol (mean over 5 folds), prefixed ``1k_``.
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
        eval_loss_terms: bool = True,
        train_batch_sampler: Any = None,
        max_nonfinite_steps: int = 3,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {max_nonfinite_steps}.")
        self.max_nonfinite_steps = max_nonfinite_steps
        self._last_loss_terms: dict[str, torch.Tensor] = {}
        self._consecutive_nonfinite = 0
        self._guard_step: int | None = None  # global step of the micro-batches seen last
        self._guard_step_bad = False  # that step already had a non-finite micro-batch: it is skipped whole
        self.train_batch_sampler = train_batch_sampler
        self.processor = processor if processor is not None else self.processing_class
        self.eval_chunk_size = eval_chunk_size
        self.modality_gap_pairs = modality_gap_pairs
        self.coco_1k = coco_1k
        self.eval_loss_terms = eval_loss_terms
        # Our forward takes no `num_items_in_batch`: let the Trainer scale the loss for gradient accumulation.
        self.model_accepts_loss_kwargs = False
        self._term_sums: dict[str, torch.Tensor | float] = {}
        self._term_count = 0
        # The loss of the micro-batches of the current optimizer step, booked once the step is known to be finite.
        self._step_loss: torch.Tensor | float = 0.0
        self._step_terms: dict[str, torch.Tensor] = {}
        self._step_micro_batches = 0
        self._guard_step_booked = True
        # Finite steps' summed loss / count and skipped steps, since the last log and since train() started.
        self._window = {"loss": 0.0, "steps": 0, "skipped": 0}
        self._session = {"loss": 0.0, "steps": 0, "skipped": 0}
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

    # ------------------------------------------------------------------ checkpoints
    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_DIR) if getattr(self, "_staging", False) else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        """The stock checkpoint, written to ``run_dir/.checkpoint-staging/checkpoint-N`` and then renamed (one
        ``os.replace``) to ``run_dir/checkpoint-N``: a kill during the save leaves no incomplete ``checkpoint-N``."""
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging, final = os.path.join(run_dir, STAGING_DIR), os.path.join(run_dir, name)
        if self.args.should_save and os.path.isdir(os.path.join(staging, name)):
            shutil.rmtree(os.path.join(staging, name))  # left by a run killed while saving
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()  # every process wrote its part (RNG state per rank)
        if self.args.should_save:
            best = self.state.best_global_step
            if best:  # the stock code looked for the best checkpoint in the staging folder: point at the real one
                best_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best}")
                if best == self.state.global_step or os.path.exists(best_dir):
                    self.state.best_model_checkpoint = best_dir
                    self.state.save_to_json(os.path.join(staging, name, "trainer_state.json"))
            if hasattr(self.train_batch_sampler, "state_dict"):  # e.g. K-means epoch and clusters, for resume
                with open(os.path.join(staging, name, SAMPLER_STATE_NAME), "w", encoding="utf-8") as handle:
                    json.dump(self.train_batch_sampler.state_dict(), handle)
            if os.path.isdir(final):  # saving the same step again (e.g. rerun after a crash)
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            try:
                os.rmdir(staging)
            except OSError:
                pass
            rotate_checkpoints(
                output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ training
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        if outputs.loss is None:
            raise ValueError("The model returned no loss: the collator must pass `return_loss=True`.")
        if model.training:
            # Logged by `training_step` once the step is known to be finite.
            self._last_loss_terms = {name: value.detach() for name, value in (outputs.loss_terms or {}).items()}
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The stock step plus a non-finite guard: a NaN/inf loss or gradient skips the whole optimizer step.

        The gradients are zeroed (``set_to_none``: AdamW then leaves every parameter, and its moments, untouched);
        with gradient accumulation the remaining micro-batches of that step are dropped too, so the step is a
        no-op. Raises ``RuntimeError`` after ``max_nonfinite_steps`` consecutive skipped steps.
        """
        step = self.state.global_step
        if step != self._guard_step:  # first micro-batch of a new optimizer step
            self._book_guard_step()
            self._guard_step, self._guard_step_bad, self._guard_step_booked = step, False, False
        self._last_loss_terms = {}
        loss = super().training_step(model, inputs, num_items_in_batch)
        terms = self._last_loss_terms
        checks = [torch.isfinite(loss).all(), *(torch.isfinite(value).all() for value in terms.values())]
        if getattr(self.accelerator, "scaler", None) is None:
            # Under fp16 loss scaling, overflowing gradients are routine: the GradScaler skips those steps itself.
            checks.append(self._grads_finite(model))
        flags = torch.stack([check.to(loss.device) for check in checks]).tolist()  # the step's one host sync
        bad_terms = [name for name, ok in zip(terms, flags[1 : 1 + len(terms)]) if not ok]
        finite = all(flags)
        if finite and not self._guard_step_bad:
            self._step_loss = self._step_loss + loss.detach().float()  # summed on the device, read when logged
            for name, value in terms.items():
                self._step_terms[name] = self._step_terms.get(name, 0.0) + value.float()
            self._step_micro_batches += 1
            return loss
        model.zero_grad(set_to_none=True)
        if not finite and not self._guard_step_bad:
            self._guard_step_bad = True
            self._consecutive_nonfinite += 1
            what = f"loss term(s) {bad_terms}" if bad_terms else "the loss or its gradients (all terms finite)"
            message = (
                f"Non-finite {what} at step {step + 1}: step skipped (gradients zeroed) "
                f"[{self._consecutive_nonfinite}/{self.max_nonfinite_steps} consecutive]."
            )
            if self._consecutive_nonfinite >= self.max_nonfinite_steps:
                raise RuntimeError(
                    f"{self.max_nonfinite_steps} consecutive optimizer steps had a non-finite {what}; stopping. "
                    "Lower the learning rate or that term's weight, check its inputs, or resume from the last "
                    "checkpoint."
                )
            logger.warning(message)
        return torch.zeros_like(loss)

    @staticmethod
    def _grads_finite(model) -> torch.Tensor:
        """A 0-d bool tensor: every gradient is finite (no host sync; fused per-tensor norms, as gradient clipping).

        A NaN/inf element makes the total norm NaN/inf; so would finite gradients whose norm overflows the dtype
        (beyond ~3e38 in fp32), which is a step worth skipping too.
        """
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return torch.ones((), dtype=torch.bool)
        return torch.isfinite(torch.nn.utils.get_total_norm(grads)).all()

    def _book_guard_step(self) -> None:
        """Book the optimizer step whose micro-batches were seen last: its loss and terms into the averages, or, if it
        was skipped, one more skipped step (its finite micro-batches included nowhere)."""
        if self._guard_step is None or self._guard_step_booked:
            return
        self._guard_step_booked = True
        if self._guard_step_bad:
            self._window["skipped"] += 1
            self._session["skipped"] += 1
        else:
            self._consecutive_nonfinite = 0
            for totals in (self._window, self._session):
                totals["loss"] = totals["loss"] + self._step_loss
                totals["steps"] += 1
            for name, value in self._step_terms.items():
                self._term_sums[name] = self._term_sums.get(name, 0.0) + value
            self._term_count += self._step_micro_batches
        self._step_loss, self._step_terms, self._step_micro_batches = 0.0, {}, 0

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._guard_step is not None:
            if self.state.global_step > self._guard_step:  # the last step is complete: book it before logging
                self._book_guard_step()
            # The stock loss averages over every step of the window, a skipped one counting as 0: when steps were
            # skipped, average over the finite steps only (summed over processes, like the stock gather).
            counts = torch.tensor([self._window["steps"], self._window["skipped"]], dtype=torch.float64)
            loss_sum = torch.as_tensor(self._window["loss"], dtype=torch.float64).reshape(1).cpu()
            totals = self.accelerator.gather(torch.cat([loss_sum, counts]).to(self.args.device)).reshape(-1, 3).sum(0)
            if totals[2] > 0:
                logs["skipped_steps"] = int(totals[2])
                if totals[1] > 0:
                    logs["loss"] = float(totals[0] / totals[1])
                else:
                    del logs["loss"]
            self._window = {"loss": 0.0, "steps": 0, "skipped": 0}
            if self._term_count:
                for name, total in self._term_sums.items():
                    logs[f"loss_{name}"] = round(float(total) / self._term_count, 6)
                self._term_sums.clear()
                self._term_count = 0
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints and resume
    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if resume_from_checkpoint is True or (isinstance(resume_from_checkpoint, str) and resume_from_checkpoint):
            if resume_from_checkpoint is True:
                resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
                if resume_from_checkpoint is None:
                    raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
            self._check_resume_objective(resume_from_checkpoint)
            self._load_sampler_state(resume_from_checkpoint)
        self._session = {"loss": 0.0, "steps": 0, "skipped": 0}
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        self._book_guard_step()
        if self._session["skipped"]:  # the stock train_loss counts skipped steps as 0
            mean = float(self._session["loss"]) / max(self._session["steps"], 1)
            metrics = {**output.metrics, "train_loss": mean, "train_skipped_steps": self._session["skipped"]}
            output = output._replace(training_loss=mean, metrics=metrics)
        return output

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
