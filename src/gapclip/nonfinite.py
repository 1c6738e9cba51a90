"""The non-finite guard: an optimizer step whose loss, a loss term or a gradient is NaN/inf is skipped.

:class:`NonFiniteGuard` holds the whole decision (which step a micro-batch belongs to, whether that step is already
spoilt, the count of consecutive skipped steps, the warning and the stop) and books each finished step: its loss
and loss terms into the averages when it was applied, one more skipped step when it was not
(:class:`StepTotals`). :class:`NonFiniteGuardMixin` wires it into a `Trainer` through ``training_step``, ``log``
and ``train``, public hooks meant to be overridden: a skipped step is logged as ``skipped_steps`` (and
``train_skipped_steps``), not as a loss of 0.0 averaged into ``loss``, ``loss_<term>`` and ``train_loss``.

Inside ``train()`` the guard reads nothing on the host per step (a host read waits for the accelerator's queue to
drain, every step): each micro-batch's loss and terms stay on the device (:meth:`NonFiniteGuard.record`), and when
the optimizer steps, one device flag says whether the step is finite: its micro-batches' values and the gradient norm
the `Trainer` computes anyway (for clipping and ``grad_norm``). An optimizer that honours PyTorch's ``found_inf``
protocol (the fused Adam/AdamW/SGD, i.e. the default ``adamw_torch_fused``) gets the flag as ``found_inf`` and skips
the update on the device, leaving every parameter and its moments untouched; any other optimizer costs one host read
per optimizer step, and a non-finite step has its gradients zeroed (``set_to_none``) first. The values move to the
host in one transfer at logging steps, before a checkpoint is written, at the end of ``train()`` and at least every
:attr:`NonFiniteGuard.resolve_every` optimizer steps (:meth:`NonFiniteGuard.resolve`), where they go through the
same decision as a direct :meth:`NonFiniteGuard.update`: the warning names the step and the terms, and the
``RuntimeError`` after ``max_nonfinite_steps`` consecutive skipped steps is raised there, before the next checkpoint.

Called outside ``train()`` (or with an optimizer that is no `torch.optim.Optimizer`), ``training_step`` checks each
micro-batch at once (one host read) and zeroes the gradients of a non-finite step before returning, since its caller
owns the optimizer step. Under fp16 loss scaling the GradScaler owns gradient overflow (it skips those steps
itself), so only the loss and its terms are checked there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import contextmanager
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
            sums them).
        steps: applied optimizer steps.
        skipped: skipped optimizer steps (none of their micro-batches is in ``loss`` or ``terms``).
        terms: each loss term summed over the micro-batches of the applied steps.
        micro_batches: micro-batches of the applied steps (the count ``terms`` are averaged over).
    """

    loss: float = 0.0
    steps: int = 0
    skipped: int = 0
    terms: dict[str, float] = field(default_factory=dict)
    micro_batches: int = 0

    def add_step(self, loss: float, terms: Mapping[str, float], micro_batches: int) -> None:
        self.loss += loss
        self.steps += 1
        for name, value in terms.items():
            self.terms[name] = self.terms.get(name, 0.0) + value
        self.micro_batches += micro_batches


@dataclass
class _RecordedStep:
    """One optimizer step's micro-batches as :meth:`NonFiniteGuard.record` kept them: device values, read later."""

    micro_batches: list[tuple[int, tuple[str, ...], torch.Tensor]] = field(default_factory=list)
    gradient_norm: torch.Tensor | None = None  # [1], when the gradients were checked


class NonFiniteGuard:
    """Decides, micro-batch by micro-batch, whether an optimizer step is applied or skipped, and books each
    finished step into :attr:`window` (since the last log) and :attr:`session` (since ``train()`` started).

    Two ways in: :meth:`update` decides one micro-batch at once (one host read); :meth:`record`,
    :meth:`finish_recorded_step` and :meth:`resolve` decide on the device per step and read the values on the host
    later, in one transfer for many steps.

    Args:
        max_consecutive (`int`): after this many consecutive skipped optimizer steps, :meth:`update` raises a
            ``RuntimeError`` naming the non-finite loss terms (or the loss/gradients).
        resolve_every (`int`): recorded optimizer steps are read on the host at the latest after this many (bounds
            the device memory they hold and how long training runs on after ``max_consecutive`` skipped steps; each
            of those steps is skipped, never applied).
    """

    def __init__(self, max_consecutive: int = 3, resolve_every: int = 32):
        if max_consecutive < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {max_consecutive}.")
        if resolve_every < 1:
            raise ValueError(f"resolve_every must be >= 1, got {resolve_every}.")
        self.max_consecutive = max_consecutive
        self.resolve_every = resolve_every
        self.consecutive = 0  # optimizer steps skipped in a row
        self.window = StepTotals()
        self.session = StepTotals()
        self._step: int | None = None  # global step of the micro-batches seen last
        self._step_bad = False  # that step already had a non-finite micro-batch: it is skipped whole
        self._step_booked = True  # that step is in window/session already (or there is none)
        # The kept micro-batches of the current step, booked once the step is known to be applied.
        self._pending = StepTotals()
        self._recording = _RecordedStep()  # micro-batches recorded since the last optimizer step
        self._recorded: list[_RecordedStep] = []  # finished steps whose values are still on the device

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
        values = [loss, *loss_terms.values()] + ([gradients_finite] if gradients_finite is not None else [])
        host = torch.stack([value.detach().float().to(loss.device) for value in values]).tolist()  # the host sync
        gradients_ok = bool(host[-1]) if gradients_finite is not None else None
        return self._decide(global_step, host[0], dict(zip(loss_terms, host[1:])), gradients_ok)

    def _decide(
        self, global_step: int, loss: float, loss_terms: Mapping[str, float], gradients_ok: bool | None
    ) -> bool:
        """:meth:`update` on host values (``gradients_ok``: ``None`` when the gradients were not checked)."""
        if global_step != self._step:  # first micro-batch of a new optimizer step
            self.close_step()
            self._step, self._step_bad, self._step_booked = global_step, False, False
        bad_terms = [name for name, value in loss_terms.items() if not math.isfinite(value)]
        if math.isfinite(loss) and not bad_terms and gradients_ok is not False:
            if self._step_bad:
                return False
            pending = self._pending
            pending.loss += loss
            for name, value in loss_terms.items():
                pending.terms[name] = pending.terms.get(name, 0.0) + value
            pending.micro_batches += 1
            return True
        if not self._step_bad:
            self._step_bad = True
            self.consecutive += 1
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

    # ------------------------------------------------------------------ deferred: decided on the device, read later
    def record(self, global_step: int, loss: torch.Tensor, loss_terms: Mapping[str, torch.Tensor]) -> None:
        """Keep one micro-batch of optimizer step ``global_step`` on the device (no host sync); it is decided with
        its step in :meth:`finish_recorded_step` and booked by :meth:`resolve`."""
        values = torch.stack([loss.detach().float(), *(value.detach().float() for value in loss_terms.values())])
        self._recording.micro_batches.append((global_step, tuple(loss_terms), values))

    def finish_recorded_step(self, gradient_norm: torch.Tensor | None) -> torch.Tensor:
        """The optimizer is about to step: a 0-d bool device tensor, whether the recorded micro-batches of this step
        and ``gradient_norm`` (the total gradient norm; ``None``: gradients not checked) are all finite. No host
        sync; the step waits for :meth:`resolve`."""
        step, self._recording = self._recording, _RecordedStep()
        if gradient_norm is not None:
            step.gradient_norm = gradient_norm.detach().float().reshape(1)
        values = [values for _, _, values in step.micro_batches]
        if step.gradient_norm is not None:
            values.append(step.gradient_norm)
        if step.micro_batches or step.gradient_norm is not None:
            self._recorded.append(step)
        if not values:
            return torch.ones((), dtype=torch.bool)
        return torch.isfinite(torch.cat(values)).all()

    @property
    def unresolved_steps(self) -> int:
        """Finished optimizer steps whose values are still on the device."""
        return len(self._recorded)

    def resolve(self) -> None:
        """Read the finished recorded steps on the host (one transfer) and run each micro-batch through the decision
        of :meth:`update`, in order: the warnings, the consecutive count, the ``RuntimeError`` and the booking."""
        if not self._recorded:
            return
        steps, self._recorded = self._recorded, []
        pieces = []
        for step in steps:  # in order: the step's micro-batches, then its gradient norm
            pieces += [values for _, _, values in step.micro_batches]
            if step.gradient_norm is not None:
                pieces.append(step.gradient_norm)
        host = iter(torch.cat(pieces).tolist())  # the one host sync of all these steps
        for step in steps:
            micro_batches = [
                (global_step, names, [next(host) for _ in range(values.numel())])
                for global_step, names, values in step.micro_batches
            ]
            gradients_ok = math.isfinite(next(host)) if step.gradient_norm is not None else None
            for index, (global_step, names, (loss, *terms)) in enumerate(micro_batches):
                last = index == len(micro_batches) - 1
                self._decide(global_step, loss, dict(zip(names, terms)), gradients_ok if last else None)

    # ------------------------------------------------------------------ booking
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
        self._recording, self._recorded = _RecordedStep(), []


class NonFiniteGuardMixin:
    """`Trainer` mixin: ``training_step`` runs the stock step, then :class:`NonFiniteGuard` keeps or skips it;
    ``log`` and ``train`` report what the guard booked.

    - A logging window with skipped steps gets ``skipped_steps`` (their count, over all processes) and a ``loss``
      averaged over its applied steps only (no ``loss`` when none was applied); the stock ``loss`` would average a
      skipped step in as 0.0.
    - Each loss term is logged as ``loss_<term>``, averaged over the micro-batches of the window's applied steps.
    - ``train()``'s metrics: with skipped steps, ``train_loss`` is the mean over the applied steps and
      ``train_skipped_steps`` their count.

    Inside ``train()`` nothing is read on the host per step (see the module docstring): the optimizer's step hooks
    decide each step on the device, reusing the gradient norm the `Trainer` computes (``_get_grad_norm``, a private
    method listed in :data:`gapclip.checkpoints.PRIVATE_TRAINER_API`), and ``log``, ``_save_checkpoint`` and the end
    of ``train()`` read the values. The stock ``logging_nan_inf_filter`` is off for the duration (the losses handed to
    the loop are finite, and skipped steps are reported here); it reads every micro-batch's loss on the host.

    The class it is mixed into sets ``self.nonfinite_guard`` and fills ``self._last_loss_terms`` (name → detached
    value) in ``compute_loss``.
    """

    nonfinite_guard: NonFiniteGuard
    _guard_in_train = False  # inside train(): decide on the device when the optimizer allows it
    _guard_hooks: tuple | None = None  # this train()'s optimizer step hooks (None: not installed yet)
    _guard_gradient_norm: torch.Tensor | float | None = None  # the Trainer's gradient norm of the coming step
    _guard_armed: torch.optim.Optimizer | None = None  # the optimizer given ``found_inf`` for its coming step
    _guard_nan_filter: bool | None = None  # the run's own logging_nan_inf_filter, while train() has it off

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._last_loss_terms = {}
        loss = super().training_step(model, inputs, num_items_in_batch)
        terms = self._last_loss_terms
        guard = self.nonfinite_guard
        if self._guard_deferred():
            guard.record(self.state.global_step, loss, terms)
            # The loop sums what it gets into its running loss; a skipped step's share is replaced in `log`.
            return torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)
        gradients = None if self._loss_scaled() else guard.gradients_finite(model)
        if guard.update(self.state.global_step, loss, terms, gradients):
            return loss
        model.zero_grad(set_to_none=True)
        return torch.zeros_like(loss)

    def _loss_scaled(self) -> bool:
        return getattr(self.accelerator, "scaler", None) is not None

    def _guard_deferred(self) -> bool:
        """Inside ``train()`` with a `torch.optim.Optimizer`: hook its steps (once) and decide on the device."""
        if not self._guard_in_train:
            return False
        if self._guard_hooks is None:
            optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # under accelerate's wrapper
            self._guard_hooks = ()
            if isinstance(optimizer, torch.optim.Optimizer):
                self._guard_hooks = (
                    optimizer.register_step_pre_hook(self._guard_before_optimizer_step),
                    optimizer.register_step_post_hook(self._guard_after_optimizer_step),
                )
        return bool(self._guard_hooks)

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._guard_gradient_norm = grad_norm  # the coming step's check reuses it: no second pass over the gradients
        return grad_norm

    def _guard_before_optimizer_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        guard, scaled = self.nonfinite_guard, self._loss_scaled()
        norm, self._guard_gradient_norm = self._guard_gradient_norm, None
        if scaled:
            norm = None
        elif norm is None:  # a loop that computed no norm for this step
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else None
        elif not isinstance(norm, torch.Tensor):  # DeepSpeed hands a float
            norm = torch.tensor(float(norm))
        finite = guard.finish_recorded_step(norm)
        if not scaled and getattr(optimizer, "_step_supports_amp_scaling", False):
            # PyTorch's AMP protocol: a fused step with found_inf=1 leaves parameters, moments and step count as
            # they were, decided on the device. (Under a GradScaler the scaler sets found_inf itself.)
            optimizer.found_inf = (~finite).float()
            self._guard_armed = optimizer
        elif not bool(finite):  # the one host read of a step whose optimizer cannot skip on the device
            optimizer.zero_grad(set_to_none=True)
        if guard.unresolved_steps >= guard.resolve_every:
            guard.resolve()

    def _guard_after_optimizer_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        self._disarm_optimizer()

    def _disarm_optimizer(self) -> None:
        if self._guard_armed is not None:
            if hasattr(self._guard_armed, "found_inf"):
                del self._guard_armed.found_inf
            self._guard_armed = None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        guard = self.nonfinite_guard
        if "loss" in logs:
            guard.resolve()
        if "loss" in logs and guard.step is not None:
            if self.state.global_step > guard.step:  # the last step is complete: book it before logging
                guard.close_step()
            window = guard.take_window()
            # Summed over processes, like the stock gather of the loss.
            local = torch.tensor([window.loss, window.steps, window.skipped], dtype=torch.float64)
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
                    logs[f"loss_{name}"] = round(total / window.micro_batches, 6)
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial) -> None:
        self.nonfinite_guard.resolve()  # a stop that is due comes before the checkpoint
        with self._stock_nan_filter():  # the checkpoint's training_args.bin holds the arguments as given
            super()._save_checkpoint(model, trial)

    @contextmanager
    def _stock_nan_filter(self):
        saved = self._guard_nan_filter
        if saved is None:
            yield
            return
        self.args.logging_nan_inf_filter = saved
        try:
            yield
        finally:
            self.args.logging_nan_inf_filter = False

    def train(self, *args, **kwargs):
        guard = self.nonfinite_guard
        guard.start_session()
        self._guard_nan_filter = self.args.logging_nan_inf_filter
        self.args.logging_nan_inf_filter = False
        self._guard_in_train, self._guard_hooks, self._guard_gradient_norm = True, None, None
        try:
            output = super().train(*args, **kwargs)
        finally:
            self.args.logging_nan_inf_filter = self._guard_nan_filter
            self._guard_nan_filter = None
            self._guard_in_train = False
            for hook in self._guard_hooks or ():
                hook.remove()
            self._guard_hooks = None
            self._disarm_optimizer()
        guard.resolve()
        guard.close_step()
        session = guard.session
        if session.skipped:  # the stock train_loss counts skipped steps as 0
            mean = session.loss / max(session.steps, 1)
            metrics = {**output.metrics, "train_loss": mean, "train_skipped_steps": session.skipped}
            output = output._replace(training_loss=mean, metrics=metrics)
        return output


__all__ = ["NonFiniteGuard", "NonFiniteGuardMixin", "StepTotals"]
