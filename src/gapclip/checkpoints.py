"""Crash-safe checkpoints: a checkpoint is written into a hidden staging folder and renamed once complete.

A process killed while saving then never leaves a half-written ``checkpoint-N`` for ``get_last_checkpoint``/resume to
pick: the run folder holds complete checkpoints only, and a rerun resumes from the last one.

`Trainer` offers no public hook to choose where a checkpoint is written, so :class:`CrashSafeCheckpointMixin`
overrides two private methods (and the non-finite guard, :mod:`gapclip.nonfinite`, reuses the gradient norm of
``_get_grad_norm``). They are listed in :data:`PRIVATE_TRAINER_API`, the only private `Trainer` API gapclip uses;
``pyproject.toml`` bounds transformers to the versions checked against it, and ``tests/test_private_trainer_api.py``
fails loudly when a new version changes any of it.
"""

from __future__ import annotations

import os
import shutil

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import logging

logger = logging.get_logger(__name__)

#: Checkpoints are written into this sub-folder of the run folder and moved to ``checkpoint-N`` once complete.
STAGING_DIR = ".checkpoint-staging"

#: Every private `Trainer` member gapclip relies on: name → (its parameters, what gapclip relies on).
PRIVATE_TRAINER_API: dict[str, tuple[tuple[str, ...], str]] = {
    "_save_checkpoint": (
        ("self", "model", "trial"),
        "writes one complete checkpoint (model, optimizer, scheduler, RNG states, trainer state) into "
        "os.path.join(self._get_output_dir(trial=trial), f'checkpoint-{global_step}') and rotates the checkpoints of "
        "that folder",
    ),
    "_get_output_dir": (("self", "trial"), "returns the run folder _save_checkpoint writes into"),
    "_get_grad_norm": (
        ("self", "model", "grad_norm"),
        "is called once per optimizer step, right before self.optimizer.step(), and returns the step's total gradient "
        "norm before clipping (a tensor; a float under DeepSpeed)",
    ),
}


class CrashSafeCheckpointMixin:
    """`Trainer` mixin: ``checkpoint-N`` appears in the run folder only when complete (one ``os.replace``).

    The stock checkpoint is written to ``run_dir/.checkpoint-staging/checkpoint-N``; :meth:`save_checkpoint_extras`
    may add files to it; then it is renamed to ``run_dir/checkpoint-N`` and the run folder's checkpoints are rotated.
    """

    def save_checkpoint_extras(self, folder: str) -> None:
        """Write further files into a checkpoint before it is published (main process only; default: nothing)."""

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_DIR) if getattr(self, "_staging", False) else run_dir

    def _save_checkpoint(self, model, trial) -> None:
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
            self.save_checkpoint_extras(os.path.join(staging, name))
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


__all__ = ["PRIVATE_TRAINER_API", "STAGING_DIR", "CrashSafeCheckpointMixin"]
