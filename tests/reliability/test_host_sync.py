"""No host synchronisation on the per-step path of GapClipTrainer.

A host read of a device value (``.item()``, ``.tolist()``, ``bool(t)``, ``float(t)``, ``.cpu()``, ``.nonzero()``, a
boolean-mask index) makes the host wait until the accelerator has run everything queued before it; once per step,
that stalls the launch queue every step. On the CPU the same calls cost next to nothing, but they are the same Python
calls, so counting them during a few CPU steps finds every one an accelerator would pay. The count covers each
optimizer step from ``on_step_begin`` to ``on_step_end`` (forward and backward of every micro-batch, clipping, the
optimizer step); the reads of a logging step come after it, in ``log``.

Reads inside the backbone's own forward (transformers' causal-mask helper reads the attention mask to choose SDPA's
``is_causal``) belong to the model, which a plain ``CLIPModel`` + ``Trainer`` runs too, and are not counted, nor are
the step-count reads of torch's own non-fused optimizers (host tensors by design); every read from gapclip, the
`Trainer` loop or accelerate is.
"""

from __future__ import annotations

import collections
import functools
import logging
import traceback
from pathlib import Path

import pytest
import torch
import transformers
from transformers import TrainerCallback, TrainingArguments

from gapclip import GapClipConfig, GapClipModel
from gapclip.cli import scratch_clip_config
from gapclip.data import CaptionPairs, GapClipCollator
from gapclip.losses import TERM_REGISTRY, GapBatch, GapTerm, register_term
from gapclip.nonfinite import NonFiniteGuard
from gapclip.testing import tiny_clip_config
from gapclip.trainer import GapClipTrainer

TORCH_DIR = str(Path(torch.__file__).parent)
TRANSFORMERS_DIR = Path(transformers.__file__).parent
#: Where a read belongs to the backbone's forward rather than to the training framework.
BACKBONE_CODE = (str(TRANSFORMERS_DIR / "masking_utils.py"), str(TRANSFORMERS_DIR / "models"))
#: torch's non-fused optimizers read their step counts with ``.item()``; those live on the host by design (unless
#: ``capturable``), so on an accelerator the reads wait for nothing.
OPTIMIZER_CODE = str(Path(torch.__file__).parent / "optim")
SYNCING_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero")


class HostSyncCounter:
    """Counts host reads of tensors while :attr:`active`, by call site (the innermost frame outside torch)."""

    def __init__(self):
        self.sites: collections.Counter[str] = collections.Counter()
        self.active = False
        self._saved: dict[str, object] = {}

    def __enter__(self) -> HostSyncCounter:
        for name in (*SYNCING_METHODS, "__getitem__"):
            self._saved[name] = getattr(torch.Tensor, name)
        for name in SYNCING_METHODS:
            setattr(torch.Tensor, name, self._counting(name, self._saved[name]))
        torch.Tensor.__getitem__ = self._counting("boolean-mask index", self._saved["__getitem__"], _boolean_index)
        return self

    def __exit__(self, *exc) -> None:
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)

    def _counting(self, what: str, method, condition=None):
        @functools.wraps(method)
        def counted(tensor, *args, **kwargs):
            if self.active and (condition is None or condition(*args)):
                self._record(what)
            return method(tensor, *args, **kwargs)

        return counted

    def _record(self, what: str) -> None:
        stack = traceback.extract_stack()[:-2]  # without counted() and this method
        if stack[-1].filename.startswith(OPTIMIZER_CODE):
            return
        site = [frame for frame in stack if not frame.filename.startswith(TORCH_DIR)][-1]
        if not site.filename.startswith(BACKBONE_CODE):
            self.sites[f"{what} at {Path(site.filename).name}:{site.lineno} ({site.name})"] += 1


def _boolean_index(index, *args) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(part, torch.Tensor) and part.dtype == torch.bool for part in parts)


class StepWindow(TrainerCallback):
    """Turns the counter on from the start of each optimizer step to its end."""

    def __init__(self, counter: HostSyncCounter):
        self.counter, self.steps = counter, 0

    def on_step_begin(self, args, state, control, **kwargs):
        self.counter.active = True

    def on_step_end(self, args, state, control, **kwargs):
        self.counter.active = False
        self.steps += 1


def training_args(tmp_path: Path, **overrides) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=4, learning_rate=1e-3, logging_steps=2,
        eval_strategy="no", save_strategy="no", report_to=[], remove_unused_columns=False, dataloader_drop_last=True,
        disable_tqdm=True, use_cpu=True, seed=0, dataloader_pin_memory=False,
    )
    return TrainingArguments(**{**defaults, **overrides})


def counted_training(trainer: GapClipTrainer) -> tuple[collections.Counter[str], int]:
    """Train; return the host reads made during the optimizer steps, by call site, and the number of steps."""
    with HostSyncCounter() as counter:
        window = StepWindow(counter)
        trainer.add_callback(window)
        trainer.train()
    return counter.sites, window.steps


def demo_trainer(processor, datasets, args, gap_terms) -> GapClipTrainer:
    torch.manual_seed(0)
    model = GapClipModel(GapClipConfig(scratch_clip_config(processor, 32, 32, 1), gap_terms=gap_terms))
    return GapClipTrainer(
        model=model, args=args, train_dataset=CaptionPairs(datasets["train"], seed=0),
        data_collator=GapClipCollator(processor, term_inputs=model.declared_term_inputs), processing_class=processor,
    )


# ---------------------------------------------------------------------------------------------------------------------
# The per-step path reads nothing on the host
# ---------------------------------------------------------------------------------------------------------------------
def test_no_host_sync_in_training_steps_with_gradient_accumulation(tiny_demo_processor, tiny_demo_datasets, tmp_path):
    """LG-MGC's terms on the demo set (GST reads its translations through the collator), 2 micro-batches per step:
    the guard, the per-term logging and GST read nothing on the host until a logging step."""
    args = training_args(tmp_path, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    trainer = demo_trainer(tiny_demo_processor, tiny_demo_datasets, args, ["lsc", "gst"])
    sites, steps = counted_training(trainer)
    assert steps == 4
    assert sites == {}, f"host reads on the per-step path: {dict(sites)}"
    logs = [entry for entry in trainer.state.log_history if "learning_rate" in entry]
    assert [entry["step"] for entry in logs] == [2, 4]
    assert all({"loss", "loss_base", "loss_lsc", "loss_gst"} <= set(entry) for entry in logs)
    assert trainer.args.logging_nan_inf_filter is True  # off during train() only: the guard does its job


class TermInputs(torch.utils.data.Dataset):
    """Random rows with every input the built-in terms read (GST's translation, CUSA's teacher embeddings)."""

    def __init__(self, rows: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(4, 60, (rows, 8), generator=g)
        self.translation_ids = torch.randint(4, 60, (rows, 6), generator=g)
        self.pixel_values = torch.randn(rows, 3, 32, 32, generator=g)
        self.teachers = torch.nn.functional.normalize(torch.randn(2, rows, 384, generator=g), dim=-1)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "pixel_values": self.pixel_values[i],
                "translation": self.translation_ids[i],
                "teacher_image_embeds": self.teachers[0, i], "teacher_text_embeds": self.teachers[1, i]}


def collate_term_inputs(rows: list[dict]) -> dict:
    stack = lambda key: torch.stack([row[key] for row in rows])  # noqa: E731
    translation = stack("translation")
    return {
        "input_ids": stack("input_ids"), "attention_mask": torch.ones_like(stack("input_ids")),
        "pixel_values": stack("pixel_values"), "image_index": torch.arange(len(rows)), "return_loss": True,
        "term_inputs": {
            "translation": {"input_ids": translation, "attention_mask": torch.ones_like(translation)},
            "teacher_image_embeds": stack("teacher_image_embeds"), "teacher_text_embeds": stack("teacher_text_embeds"),
        },
    }


def test_no_host_sync_in_training_steps_with_every_registered_term(tmp_path):
    names = sorted(TERM_REGISTRY)
    assert {"lsc", "gst", "csa", "usa", "dias_dim", "dias_inter", "dias_intra"} <= set(names)
    specs = [{"name": name, **({"options": {"max_batch_size": 8}} if name in ("dias_inter", "dias_intra") else {})}
             for name in names]
    torch.manual_seed(0)
    model = GapClipModel(GapClipConfig(tiny_clip_config(), gap_terms=specs))
    trainer = GapClipTrainer(model=model, args=training_args(tmp_path, max_steps=3), train_dataset=TermInputs(24),
                             data_collator=collate_term_inputs)
    sites, steps = counted_training(trainer)
    assert steps == 3
    assert sites == {}, f"host reads on the per-step path: {dict(sites)}"
    assert {f"loss_{name}" for name in names} <= set(trainer.state.log_history[0])


SYNCING_TERM = "host_sync_probe"


class SyncingProbe(GapTerm):
    """A term that reads its value on the host every call: what the counter must catch."""

    name = SYNCING_TERM

    def forward(self, batch: GapBatch) -> torch.Tensor:
        value = (batch.image_embeds * batch.text_embeds).sum(-1).mean()
        self.last = value.item()
        return value


@pytest.fixture
def syncing_term():
    register_term(SyncingProbe)
    yield SYNCING_TERM
    TERM_REGISTRY.pop(SYNCING_TERM, None)


def test_the_counter_names_a_host_read_on_the_step_path(
    tiny_demo_processor, tiny_demo_datasets, tmp_path, syncing_term
):
    args = training_args(tmp_path, max_steps=2)
    trainer = demo_trainer(tiny_demo_processor, tiny_demo_datasets, args, [syncing_term])
    sites, steps = counted_training(trainer)
    assert steps == 2
    assert list(sites.values()) == [2], dict(sites)  # once per step, named
    assert next(iter(sites)).startswith(f"item at {Path(__file__).name}:") and next(iter(sites)).endswith("(forward)")


# ---------------------------------------------------------------------------------------------------------------------
# An optimizer that cannot skip on the device: one read per optimizer step, the step still skipped
# ---------------------------------------------------------------------------------------------------------------------
NAN_TERM = "host_sync_nan_probe"


class NaNAtSecondCall(GapTerm):
    name = NAN_TERM
    calls = 0

    def forward(self, batch: GapBatch) -> torch.Tensor:
        value = (batch.image_embeds * batch.text_embeds).sum(-1).mean()
        if self.training:
            type(self).calls += 1
            if type(self).calls == 2:
                return value * float("nan")
        return value


@pytest.fixture
def nan_term():
    register_term(NaNAtSecondCall)
    NaNAtSecondCall.calls = 0
    yield NAN_TERM
    TERM_REGISTRY.pop(NAN_TERM, None)


class ParameterSnapshots(TrainerCallback):
    def __init__(self):
        self.after_step: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after_step.append({name: p.detach().clone() for name, p in model.named_parameters()})


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
def test_a_nan_step_is_skipped_with_either_kind_of_optimizer(
    tiny_demo_processor, tiny_demo_datasets, tmp_path, nan_term, caplog, optim
):
    """The fused AdamW skips on the device (``found_inf``, no read); the foreach AdamW has no such input, so the
    guard reads the step's flag once per optimizer step and zeroes the gradients of a non-finite step."""
    args = training_args(tmp_path, max_steps=3, logging_steps=3, optim=optim)
    trainer = demo_trainer(tiny_demo_processor, tiny_demo_datasets, args, [nan_term])
    snapshots = ParameterSnapshots()
    trainer.add_callback(snapshots)
    with caplog.at_level(logging.WARNING, logger="gapclip.nonfinite"):
        sites, steps = counted_training(trainer)
    first, second, third = snapshots.after_step
    assert all(torch.equal(first[name], second[name]) for name in first)  # step 2 changed nothing
    assert any(not torch.equal(second[name], third[name]) for name in first)  # step 3 trained again
    optimizer = trainer.optimizer.optimizer
    assert not hasattr(optimizer, "found_inf") and not optimizer._optimizer_step_pre_hooks  # nothing left behind
    warnings = [record.getMessage() for record in caplog.records if "Non-finite" in record.getMessage()]
    assert len(warnings) == 1 and NAN_TERM in warnings[0] and "at step 2" in warnings[0]  # read at the log of step 3
    (log,) = [entry for entry in trainer.state.log_history if "learning_rate" in entry]
    assert log["skipped_steps"] == 1
    if optim == "adamw_torch_fused":
        assert sites == {}
    else:
        assert list(sites.values()) == [steps] and "nonfinite.py" in next(iter(sites)), dict(sites)


# ---------------------------------------------------------------------------------------------------------------------
# NonFiniteGuard: deciding later, on the host, is the same decision
# ---------------------------------------------------------------------------------------------------------------------
NAN = float("nan")
# (optimizer step, loss, terms) per micro-batch, and each step's gradient norm
MICRO_BATCHES = [
    (0, 2.0, {"base": 1.0, "lsc": 0.5}), (0, 4.0, {"base": 3.0, "lsc": 1.5}),
    (1, 8.0, {"base": 7.0, "lsc": 9.0}), (1, NAN, {"base": 1.0, "lsc": NAN}),
    (2, 1.0, {"base": 0.5, "lsc": 2.0}),
    (3, 1.0, {"base": 0.5, "lsc": 0.25}),
    (4, 5.0, {"base": 4.0, "lsc": 1.0}),
]
GRADIENT_NORMS = {0: 1.0, 1: 2.0, 2: float("inf"), 3: 1.0, 4: 3.0}


def test_recorded_steps_are_decided_and_booked_as_update_does(caplog):
    eager, deferred = NonFiniteGuard(5), NonFiniteGuard(5)
    device_flags = {}
    with caplog.at_level(logging.WARNING, logger="gapclip.nonfinite"):
        for index, (step, loss, terms) in enumerate(MICRO_BATCHES):
            last = index + 1 == len(MICRO_BATCHES) or MICRO_BATCHES[index + 1][0] != step
            gradients = torch.tensor(GRADIENT_NORMS[step]).isfinite() if last else None
            eager.update(step, torch.tensor(loss), {k: torch.tensor(v) for k, v in terms.items()}, gradients)
        eager.close_step()
        eager_messages = [record.getMessage() for record in caplog.records]
        caplog.clear()
        for index, (step, loss, terms) in enumerate(MICRO_BATCHES):
            deferred.record(step, torch.tensor(loss), {k: torch.tensor(v) for k, v in terms.items()})
            if index + 1 == len(MICRO_BATCHES) or MICRO_BATCHES[index + 1][0] != step:
                device_flags[step] = deferred.finish_recorded_step(torch.tensor(GRADIENT_NORMS[step])).item()
        assert caplog.records == [] and deferred.unresolved_steps == 5  # nothing decided on the host yet
        deferred.resolve()
        deferred.close_step()
        deferred_messages = [record.getMessage() for record in caplog.records]
    assert device_flags == {0: True, 1: False, 2: False, 3: True, 4: True}
    assert deferred_messages == eager_messages and len(eager_messages) == 2
    assert "loss term(s) ['lsc'] at step 2" in deferred_messages[0]
    assert "the loss or its gradients (all terms finite) at step 3" in deferred_messages[1]
    assert (deferred.consecutive, deferred.unresolved_steps) == (0, 0)
    for guard in (eager, deferred):
        window = guard.take_window()
        # applied: steps 0 (2 micro-batches), 3 and 4; step 1 has a NaN term, step 2 an inf gradient norm
        assert (window.loss, window.steps, window.skipped, window.micro_batches) == (2 + 4 + 1 + 5, 3, 2, 4)
        assert window.terms == {"base": 1 + 3 + 0.5 + 4, "lsc": 0.5 + 1.5 + 0.25 + 1}


def test_resolve_raises_the_stop_in_order():
    guard = NonFiniteGuard(2)
    for step in range(4):
        guard.record(step, torch.tensor(NAN if step >= 1 else 1.0), {"usa": torch.tensor(NAN if step >= 1 else 0.5)})
        guard.finish_recorded_step(torch.tensor(1.0))
    with pytest.raises(RuntimeError, match=r"2 consecutive optimizer steps had a non-finite loss term\(s\) \['usa'\]"):
        guard.resolve()
    assert guard.step == 2  # stopped at the second bad step, as update() would have


def test_resolve_every_must_be_positive():
    with pytest.raises(ValueError, match="resolve_every must be >= 1, got 0"):
        NonFiniteGuard(3, resolve_every=0)
