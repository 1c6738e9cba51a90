"""The non-finite guard: an optimizer step whose loss, a loss term or a gradient is NaN/inf is skipped.

:class:`NonFiniteGuard` holds the whole decision (which step a micro-batch belongs to, whether that step is already
spoilt, the count of consecutive skipped steps, the warning and the stop); :class:`NonFiniteGuardMixin` wires it
into a `Trainer` through ``training_step``, a public hook meant to be overridden.

Skipping a step: the gradients are zeroed (``set_to_none``), so AdamW leaves every parameter and its moments
untouched; with gradient accumulation the remaining micro-batches of the step are dropped too (their gradients are
zeroed again), so the whole optimizer step is a no-op. Under fp16 loss scaling the GradScaler owns gradient
overflow (it skips those steps itself), so only the loss and its terms are checked there.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)


class NonFiniteGuard:
    """Decides, micro-batch by micro-batch, whether an optimizer step is applied or skipped.

    Args:
        max_consecutive (`int`): after this many consecutive skipped optimizer steps, :meth:`update` raises a
            ``RuntimeError`` naming the non-finite loss terms (or the loss/gradients).
    """

    def __init__(self, max_consecutive: int = 3):
        if max_consecutive < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {max_consecutive}.")
        self.max_consecutive = max_consecutive
        self.consecutive = 0  # optimizer steps skipped in a row
        self._step: int | None = None  # global step of the micro-batches seen last
        self._step_bad = False  # that step already had a non-finite micro-batch: it is skipped whole

    @staticmethod
    def gradients_finite(model: nn.Module) -> torch.Tensor:
        """A 0-d bool tensor: every gradient is finite (no host sync; fused per-tensor norms, as gradient clipping).

        A NaN/inf element makes the total norm NaN/inf; so would finite gradients whose norm overflows the dtype
        (beyond ~3e38 in fp32), which is a step worth skipping too.
        """
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return torch.ones((), dtype=torch.bool)
        return torch.isfinite(torch.nn.utils.get_total_norm(grads)).all()

    def update(
        self,
        global_step: int,
        loss: torch.Tensor,
        loss_terms: Mapping[str, torch.Tensor],
        gradients_finite: torch.Tensor | None = None,
    ) -> bool:
        """Record one micro-batch of optimizer step ``global_step``; return whether its contribution is kept.

        ``False`` means: zero the gradients (the step is skipped). The first non-finite micro-batch of a step counts
        it as skipped and warns (or raises once ``max_consecutive`` steps in a row were skipped); a step that ends
        with all its micro-batches finite resets the count. One host sync per call.
        """
        if global_step != self._step:  # first micro-batch of a new optimizer step
            if self._step is not None and not self._step_bad:
                self.consecutive = 0
            self._step, self._step_bad = global_step, False
        checks = [torch.isfinite(loss).all(), *(torch.isfinite(value).all() for value in loss_terms.values())]
        if gradients_finite is not None:
            checks.append(gradients_finite)
        flags = torch.stack([check.to(loss.device) for check in checks]).tolist()  # the step's one host sync
        if all(flags):
            return not self._step_bad
        if not self._step_bad:
            self._step_bad = True
            self.consecutive += 1
            bad_terms = [name for name, ok in zip(loss_terms, flags[1 : 1 + len(loss_terms)]) if not ok]
            what = f"loss term(s) {bad_terms}" if bad_terms else "the loss or its gradients (all terms finite)"
            if self.consecutive >= self.max_consecutive:
                raise RuntimeError(
                    f"{self.max_consecutive} consecutive optimizer steps had a non-finite {what}; stopping. "
                    "Lower the learning rate or that term's weight, check its inputs, or resume from the last "
                    "checkpoint."
                )
            logger.warning(
                f"Non-finite {what} at step {global_step + 1}: step skipped (gradients zeroed) "
                f"[{self.consecutive}/{self.max_consecutive} consecutive]."
            )
        return False


class NonFiniteGuardMixin:
    """`Trainer` mixin: ``training_step`` runs the stock step, then :class:`NonFiniteGuard` keeps or skips it.

    The class it is mixed into sets ``self.nonfinite_guard`` and fills ``self._last_loss_terms`` (name → detached
    value) in ``compute_loss``; a kept micro-batch's terms are passed to :meth:`on_finite_loss_terms`.
    """

    nonfinite_guard: NonFiniteGuard

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._last_loss_terms = {}
        loss = super().training_step(model, inputs, num_items_in_batch)
        terms = self._last_loss_terms
        scaled = getattr(self.accelerator, "scaler", None) is not None
        gradients = None if scaled else self.nonfinite_guard.gradients_finite(model)
        if self.nonfinite_guard.update(self.state.global_step, loss, terms, gradients):
            self.on_finite_loss_terms(terms)
            return loss
        model.zero_grad(set_to_none=True)
        return torch.zeros_like(loss)

    def on_finite_loss_terms(self, loss_terms: Mapping[str, torch.Tensor]) -> None:
        """Called with the loss terms of every micro-batch the guard kept (default: nothing)."""


__all__ = ["NonFiniteGuard", "NonFiniteGuardMixin"]
