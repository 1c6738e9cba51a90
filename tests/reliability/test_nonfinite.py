"""The non-finite guard of GapClipTrainer: a NaN loss term skips its optimizer step, warns with the term's name,
and stops training after ``max_nonfinite_steps`` (3) consecutive bad steps; earlier checkpoints stay loadable."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from transformers.trainer_utils import get_last_checkpoint

from gapclip import GapClipModel
from gapclip.losses import TERM_REGISTRY, GapBatch, GapTerm, register_term

from ..test_recipes import load_recipe, tiny_flags
from . import assert_same_weights, load_weights

TERM = "reliability_nan_probe"


class NaNProbe(GapTerm):
    """Differentiable dummy term; NaN on the training calls (1-based) listed in ``nan_calls``."""

    name = TERM
    nan_calls: set[int] = set()
    nan_from: int | None = None
    calls = 0

    def forward(self, batch: GapBatch) -> torch.Tensor:
        value = (batch.image_embeds * batch.text_embeds).sum(-1).mean()
        if not self.training:
            return value
        cls = type(self)
        cls.calls += 1
        if cls.calls in cls.nan_calls or (cls.nan_from is not None and cls.calls >= cls.nan_from):
            return value * float("nan")
        return value


@pytest.fixture
def probe():
    register_term(NaNProbe)
    NaNProbe.calls, NaNProbe.nan_calls, NaNProbe.nan_from = 0, set(), None
    yield NaNProbe
    TERM_REGISTRY.pop(TERM, None)


@pytest.fixture(scope="module")
def lgmgc():
    return load_recipe("train_clip_lgmgc")


def flags(out, max_steps, *extra):
    return tiny_flags(
        out, "--max_steps", str(max_steps), "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "20", "--logging_steps", "1",
        "--seed", "0", "--skip_initial_eval", "true", "--gap_terms", json.dumps([{"name": TERM, "weight": 0.5}]),
        *extra,
    )


def test_nan_step_is_skipped_and_named(lgmgc, probe, tiny_demo_root, tmp_path, caplog):
    probe.nan_calls = {2}
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="gapclip.trainer"):
        result = lgmgc.main(flags(out, 3))
    assert result["trainer"].state.global_step == 3
    warnings = [r.getMessage() for r in caplog.records if "Non-finite" in r.getMessage()]
    assert len(warnings) == 1 and TERM in warnings[0] and "step 2" in warnings[0], warnings
    w1, w2, w3 = (load_weights(out / f"checkpoint-{i}") for i in (1, 2, 3))
    assert_same_weights(w1, w2)  # the NaN step changed nothing
    assert any(not torch.equal(w2[k], w3[k]) for k in w2)  # the next step trained again
    assert all(torch.isfinite(t).all() for t in w3.values())
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [e for e in state["log_history"] if "loss" in e]
    assert all(math.isfinite(e["loss"]) for e in losses)
    assert all(math.isfinite(e.get(f"loss_{TERM}", 0.0)) for e in losses)


def test_nan_micro_batch_skips_the_whole_accumulated_step(lgmgc, probe, tiny_demo_root, tmp_path):
    probe.nan_calls = {4}  # second micro-batch of optimizer step 2
    out = tmp_path / "out"
    lgmgc.main(flags(out, 3, "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "4"))
    w1, w2, w3 = (load_weights(out / f"checkpoint-{i}") for i in (1, 2, 3))
    assert_same_weights(w1, w2)
    assert any(not torch.equal(w2[k], w3[k]) for k in w2)


def test_three_consecutive_nan_steps_stop_training(lgmgc, probe, tiny_demo_root, tmp_path, caplog):
    probe.nan_from = 3  # steps 3, 4, 5 are NaN
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="gapclip.trainer"):
        with pytest.raises(RuntimeError, match=rf"3 consecutive optimizer steps had a non-finite loss term\(s\) \['{TERM}'\]"):
            lgmgc.main(flags(out, 10))
    warned = [r.getMessage() for r in caplog.records if "Non-finite" in r.getMessage()]
    assert len(warned) == 2 and all(TERM in m for m in warned)
    last = get_last_checkpoint(str(out))
    assert last is not None and last.endswith("checkpoint-4")
    model = GapClipModel.from_pretrained(last)  # loadable, finite, and the skipped steps left it as step 2 did
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert_same_weights(load_weights(out / "checkpoint-2"), load_weights(last))


def test_a_clean_step_resets_the_count(lgmgc, probe, tiny_demo_root, tmp_path):
    probe.nan_calls = {2, 3, 5, 6}  # never 3 in a row
    result = lgmgc.main(flags(tmp_path / "out", 7, "--save_strategy", "no"))
    assert result["trainer"].state.global_step == 7


def test_max_nonfinite_steps_flag_sets_the_limit(lgmgc, probe, tiny_demo_root, tmp_path):
    probe.nan_from = 2
    with pytest.raises(RuntimeError, match="2 consecutive optimizer steps"):
        lgmgc.main(flags(tmp_path / "out", 10, "--save_strategy", "no", "--max_nonfinite_steps", "2"))
    with pytest.raises(ValueError, match="--max_nonfinite_steps must be >= 1, got 0"):
        lgmgc.main(flags(tmp_path / "out2", 1, "--max_nonfinite_steps", "0"))


@pytest.mark.parametrize("loss_scaling", [False, True], ids=["fp32", "fp16_grad_scaler"])
def test_inf_gradient_with_a_finite_loss(tiny_demo_processor, tiny_demo_datasets, tmp_path, loss_scaling):
    """An inf gradient skips the step; under fp16 loss scaling the GradScaler owns overflow, so the guard stays out."""
    from ..test_trainer import make_trainer, training_args

    trainer = make_trainer(tiny_demo_processor, tiny_demo_datasets, training_args(tmp_path))
    if loss_scaling:
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu")  # as accelerate sets up for --fp16
    model = trainer.model
    scale = model.backbone.logit_scale
    scale.register_hook(lambda grad: grad * float("inf"))
    inputs = next(iter(trainer.get_train_dataloader()))
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by train()'s loop, which this test bypasses
    loss = trainer.training_step(model, inputs)
    assert torch.isfinite(loss)
    if loss_scaling:
        assert trainer.nonfinite_guard.consecutive == 0 and torch.isinf(scale.grad).all()
    else:
        assert trainer.nonfinite_guard.consecutive == 1 and loss.item() == 0.0
        assert all(p.grad is None for p in model.parameters())  # zeroed: AdamW leaves every parameter untouched


def test_skipped_steps_are_counted_and_left_out_of_the_logged_loss(lgmgc, probe, tiny_demo_root, tmp_path):
    """A skipped step is logged as ``skipped_steps``, not as a loss of 0.0 averaged into the window."""
    def logged(out, *extra):
        probe.calls = 0
        result = lgmgc.main(flags(out, 3, "--save_strategy", "no", *extra))
        return result, [e for e in result["trainer"].state.log_history if "learning_rate" in e]  # training logs

    probe.nan_calls = {2}  # optimizer step 2 of 3 is skipped
    every_step, history = logged(tmp_path / "every")
    by_step = {e["step"]: e for e in history}
    assert "loss" in by_step[1] and "skipped_steps" not in by_step[1]
    assert by_step[2]["skipped_steps"] == 1 and "loss" not in by_step[2]  # nothing finite to average
    first, third = by_step[1]["loss"], by_step[3]["loss"]

    windowed, history = logged(tmp_path / "windowed", "--logging_steps", "2")
    (window,) = [e for e in history if e["step"] == 2]
    assert window["skipped_steps"] == 1
    assert window["loss"] == pytest.approx(first, rel=1e-6)  # the finite step alone, not (first + 0) / 2
    assert window[f"loss_{TERM}"] == pytest.approx(by_step[1][f"loss_{TERM}"], rel=1e-6)
    metrics = windowed["train"]
    assert metrics["train_skipped_steps"] == 1
    assert metrics["train_loss"] == pytest.approx((first + third) / 2, rel=1e-6)  # over the 2 finite steps


# ---------------------------------------------------------------------------------------------------------------------
# NonFiniteGuard on its own: the whole decision, micro-batch by micro-batch
# ---------------------------------------------------------------------------------------------------------------------
FINITE, NAN = torch.tensor(1.0), torch.tensor(float("nan"))


def test_guard_keeps_finite_steps_and_skips_a_spoilt_step_whole(caplog):
    from gapclip.nonfinite import NonFiniteGuard

    guard = NonFiniteGuard(3)
    with caplog.at_level(logging.WARNING, logger="gapclip.nonfinite"):
        assert guard.update(0, FINITE, {"base": FINITE, "lsc": FINITE}) is True
        # step 1, micro-batch 1 is fine, micro-batch 2 has a NaN term: the whole step goes
        assert guard.update(1, FINITE, {"base": FINITE, "lsc": FINITE}) is True
        assert guard.update(1, NAN, {"base": FINITE, "lsc": NAN}) is False
        assert guard.update(1, FINITE, {"base": FINITE, "lsc": FINITE}) is False  # the rest of the step too
        assert guard.consecutive == 1
        assert guard.update(2, FINITE, {"base": FINITE}, torch.tensor(False)) is False  # inf gradient, finite terms
        assert guard.consecutive == 2
        assert guard.update(3, FINITE, {"base": FINITE}) is True
        assert guard.update(4, FINITE, {"base": FINITE}) is True  # step 3 ended clean: the count is reset
        assert guard.consecutive == 0
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    expected = "Non-finite loss term(s) ['lsc'] at step 2: step skipped (gradients zeroed) [1/3 consecutive]."
    assert messages[0] == expected
    assert "the loss or its gradients (all terms finite) at step 3" in messages[1] and "[2/3" in messages[1]


def test_guard_stops_after_max_consecutive_skipped_steps():
    from gapclip.nonfinite import NonFiniteGuard

    guard = NonFiniteGuard(2)
    assert guard.update(0, NAN, {"base": NAN}) is False
    with pytest.raises(RuntimeError, match=r"2 consecutive optimizer steps had a non-finite loss term\(s\) \['base'"):
        guard.update(1, NAN, {"base": NAN, "gst": FINITE})
    with pytest.raises(ValueError, match="max_nonfinite_steps must be >= 1, got 0"):
        NonFiniteGuard(0)


def test_guard_gradient_check():
    from gapclip.nonfinite import NonFiniteGuard

    layer = torch.nn.Linear(2, 2)
    assert NonFiniteGuard.gradients_finite(layer).item() is True  # no gradients yet
    layer(torch.ones(1, 2)).sum().backward()
    assert NonFiniteGuard.gradients_finite(layer).item() is True
    layer.weight.grad[0, 0] = float("inf")
    assert NonFiniteGuard.gradients_finite(layer).item() is False


def test_guard_books_applied_steps_and_counts_skipped_ones():
    """A step's kept micro-batches wait for its end: a step spoilt by a later micro-batch is in no average."""
    from gapclip.nonfinite import NonFiniteGuard

    guard = NonFiniteGuard(3)
    guard.update(0, torch.tensor(2.0), {"lsc": torch.tensor(0.5)})
    guard.update(0, torch.tensor(4.0), {"lsc": torch.tensor(1.5)})  # step 0: two finite micro-batches
    guard.update(1, torch.tensor(8.0), {"lsc": torch.tensor(9.0)})  # kept for now ...
    guard.update(1, NAN, {"lsc": NAN})  # ... until the step's second micro-batch spoils it
    guard.update(2, torch.tensor(1.0), {"lsc": torch.tensor(2.0)})
    guard.close_step()
    guard.close_step()  # booking is once per step
    window = guard.take_window()
    assert (float(window.loss), window.steps, window.skipped, window.micro_batches) == (7.0, 2, 1, 3)
    assert float(window.terms["lsc"]) == 4.0  # 0.5 + 1.5 + 2.0: the spoilt step's 9.0 is nowhere
    assert guard.take_window().steps == 0 and guard.session.steps == 2 and guard.session.skipped == 1
    guard.start_session()
    assert (guard.session.steps, guard.session.skipped) == (0, 0)
