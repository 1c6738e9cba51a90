"""The non-finite guard: an optimizer step whose loss, a loss term or a gradient is NaN/inf is skipped.

:class:`NonFiniteGuard` holds the whole decision (which step a micro-batch belongs to, whether that step is already
spoilt, the count of consecutive skipped steps, the warning and the stop) and books each finished step: its loss
and loss terms into the averages when it was applied, one more skipped step when it was not
(:class:`StepTotals`). :class:`NonFiniteGuardMixin` wires it into a `Trainer` through ``training_step``, ``log``
and ``train``, public hooks meant to be overridden: a skipped step is logged as ``skipped_steps`` (and
``train_skipped_steps``), not as a loss of 0.0 averaged into ``loss``, ``loss_<term>`` and ``train_loss``.

Skipping a step: the gradients are zeroed (``set_to_none``), so AdamW leaves every parameter and its moments
untouched; with gradient accumulation the remaining micro-batches of the step are dropped too (their gradients are
zeroed again), so the whole optimizer step is a no-op. Under fp16 loss scaling the GradScaler owns gradient
overflow (it skips those steps itself), so only the loss and its terms are checked there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)


@dataclass
class StepTotals:
    """What the guard booked over a span of training (since the last log, or since ``train()`` started).

    Attributes:
        loss: summed loss of the applied optimizer steps (each step's micro-batch losses summed, as the `Trainer`
            sums them), a device tensor until read.
        steps: applied optimizer steps.
        skipped: skipped optimizer steps (none of their micro-batches is in ``loss`` or ``terms``).
        terms: each loss term summed over the micro-batches of the applied steps.
        micro_batches: micro-batches of the applied steps (the count ``terms`` are averaged over).
    """

    loss: torch.Tensor | float = 0.0
    steps: int = 0
    skipped: int = 0
    terms: dict[str, torch.Tensor | float] = field(default_factory=dict)
    micro_batches: int = 0

    def add_step(self, loss: torch.Tensor | float, terms: Mapping[str, torch.Tensor], micro_batches: int) -> None:
        self.loss = self.loss + loss
        self.steps += 1
        for name, value in terms.items():
            self.terms[name] = self.terms.get(name, 0.0) + value
        self.micro_batches += micro_batches


class NonFiniteGuard:
    """Decides, micro-batch by micro-batch, whether an optimizer step is applied or skipped, and books each
    finished step into :attr:`window` (since the last log) and :attr:`session` (since ``train()`` started).

    Args:
        max_consecutive (`int`): after this many consecutive skipped optimizer steps, :meth:`update` raises a
            ``RuntimeError`` naming the non-finite loss terms (or the loss/gradients).
    """

    def __init__(self, max_consecutive: int = 3):
        if max_consecutive < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {max_consecutive}.")
        self.max_consecutive = max_consecutive
        self.consecutive = 0  # optimizer steps skipped in a row
        self.window = StepTotals()
        self.session = StepTotals()
        self._step: int | None = None  # global step of the micro-batches seen last
        self._step_bad = False  # that step already had a non-finite micro-batch: it is skipped whole
        self._step_booked = True  # that step is in window/session already (or there is none)
        # The kept micro-batches of the current step, booked once the step is known to be applied.
        self._pending = StepTotals()

    @property
    def step(self) -> int | None:
        """The global step of the micro-batches seen last (``None`` before the first)."""
        return self._step

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
        with all its micro-batches finite resets the count. A kept micro-batch's loss and terms wait for the end of
        their step (:meth:`close_step`), so a step spoilt by a later micro-batch leaves none of them in the
        averages. One host sync per call.
        """
        if global_step != self._step:  # first micro-batch of a new optimizer step
            self.close_step()
            self._step, self._step_bad, self._step_booked = global_step, False, False
        checks = [torch.isfinite(loss).all(), *(torch.isfinite(value).all() for value in loss_terms.values())]
        if gradients_finite is not None:
            checks.append(gradients_finite)
        flags = torch.stack([check.to(loss.device) for check in checks]).tolist()  # the step's one host sync
        if all(flags):
            if self._step_bad:
                return False
            pending = self._pending
            pending.loss = pending.loss + loss.detach().float()  # summed on the device, read when logged
            for name, value in loss_terms.items():
                pending.terms[name] = pending.terms.get(name, 0.0) + value.detach().float()
            pending.micro_batches += 1
            return True
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

    def close_step(self) -> None:
        """Book the optimizer step whose micro-batches were seen last (once): its loss and terms into
        :attr:`window` and :attr:`session` when it was applied (which also resets the consecutive count), or one
        more skipped step when it was not. Called at the next step's first micro-batch, and by whoever reads the
        totals once that step is complete (a log after the optimizer step, the end of ``train()``)."""
        if self._step is None or self._step_booked:
            return
        self._step_booked = True
        pending, self._pending = self._pending, StepTotals()
        if self._step_bad:
            self.window.skipped += 1
            self.session.skipped += 1
            return
        self.consecutive = 0
        for totals in (self.window, self.session):
            totals.add_step(pending.loss, pending.terms, pending.micro_batches)

    def take_window(self) -> StepTotals:
        """The totals since the last call (since the start for the first), and start a new window."""
        window, self.window = self.window, StepTotals()
        return window

    def start_session(self) -> None:
        """A new ``train()`` call: its totals start from zero (a resumed run's ``train_loss`` is its own)."""
        self.session = StepTotals()


class NonFiniteGuardMixin:
    """`Trainer` mixin: ``training_step`` runs the stock step, then :class:`NonFiniteGuard` keeps or skips it;
    ``log`` and ``train`` report what the guard booked.

    - A logging window with skipped steps gets ``skipped_steps`` (their count, over all processes) and a ``loss``
      averaged over its applied steps only (no ``loss`` when none was applied); the stock ``loss`` would average a
      skipped step in as 0.0.
    - Each loss term is logged as ``loss_<term>``, averaged over the micro-batches of the window's applied steps.
    - ``train()``'s metrics: with skipped steps, ``train_loss`` is the mean over the applied steps and
      ``train_skipped_steps`` their count.

    The class it is mixed into sets ``self.nonfinite_guard`` and fills ``self._last_loss_terms`` (name → detached
    value) in ``compute_loss``.
    """

    nonfinite_guard: NonFiniteGuard

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._last_loss_terms = {}
        loss = super().training_step(model, inputs, num_items_in_batch)
        terms = self._last_loss_terms
        scaled = getattr(self.accelerator, "scaler", None) is not None
        gradients = None if scaled else self.nonfinite_guard.gradients_finite(model)
        if self.nonfinite_guard.update(self.state.global_step, loss, terms, gradients):
            return loss
        model.zero_grad(set_to_none=True)
        return torch.zeros_like(loss)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        guard = self.nonfinite_guard
        if "loss" in logs and guard.step is not None:
            if self.state.global_step > guard.step:  # the last step is complete: book it before logging
                guard.close_step()
            window = guard.take_window()
            # Summed over processes, like the stock gather of the loss.
            local = torch.tensor([float(window.loss), window.steps, window.skipped], dtype=torch.float64)
            totals = self.accelerator.gather(local.to(self.args.device)).reshape(-1, 3).sum(0)
            loss_sum, steps, skipped = totals.tolist()
            if skipped > 0:
                logs["skipped_steps"] = int(skipped)
                if steps > 0:
                    logs["loss"] = loss_sum / steps
                else:
                    del logs["loss"]
            if window.micro_batches:
                for name, total in window.terms.items():
                    logs[f"loss_{name}"] = round(float(total) / window.micro_batches, 6)
        super().log(logs, start_time)

    def train(self, *args, **kwargs):
        self.nonfinite_guard.start_session()
        output = super().train(*args, **kwargs)
        self.nonfinite_guard.close_step()
        session = self.nonfinite_guard.session
        if session.skipped:  # the stock train_loss counts skipped steps as 0
            mean = float(session.loss) / max(session.steps, 1)
            metrics = {**output.metrics, "train_loss": mean, "train_skipped_steps": session.skipped}
            output = output._replace(training_loss=mean, metrics=metrics)
        return output


__all__ = ["NonFiniteGuard", "NonFiniteGuardMixin", "StepTotals"]
