"""GapClipTrainer on the tiny demo set with a tiny from-scratch CLIP: evaluation metrics, per-term logging,
best-checkpoint selection on RSUM, gradient accumulation and a short overfitting run."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

from gapclip import GapClipConfig, GapClipModel
from gapclip.cli import scratch_clip_config
from gapclip.data import CaptionPairs, GapClipCollator
from gapclip.trainer import GapClipTrainer

RETRIEVAL_KEYS = [f"eval_{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)] + ["eval_rsum", "eval_modality_gap"]


def tiny_model(processor, seed: int = 0) -> GapClipModel:
    torch.manual_seed(seed)
    return GapClipModel(GapClipConfig(scratch_clip_config(processor, 32, 32, 1)))


def training_args(output_dir: Path, **overrides) -> TrainingArguments:
    defaults = dict(
        output_dir=str(output_dir), per_device_train_batch_size=8, per_device_eval_batch_size=16, max_steps=2,
        learning_rate=1e-3, logging_steps=1, eval_strategy="no", save_strategy="no", report_to=[],
        remove_unused_columns=False, dataloader_drop_last=True, disable_tqdm=True, use_cpu=True, seed=0,
    )
    return TrainingArguments(**{**defaults, **overrides})


def make_trainer(processor, datasets, args, model=None, collator=None) -> GapClipTrainer:
    return GapClipTrainer(
        model=model if model is not None else tiny_model(processor), args=args,
        train_dataset=CaptionPairs(datasets["train"], seed=0), eval_dataset=datasets["validation"],
        data_collator=collator or GapClipCollator(processor), processing_class=processor,
    )


def test_evaluate_returns_retrieval_metrics_and_loss_terms(tiny_demo_processor, tiny_demo_datasets, tmp_path):
    trainer = make_trainer(tiny_demo_processor, tiny_demo_datasets, training_args(tmp_path))
    metrics = trainer.evaluate()
    for key in [*RETRIEVAL_KEYS, "eval_loss", "eval_loss_base", "eval_i2t_medr", "eval_runtime"]:
        assert key in metrics, key
    assert all(0.0 <= metrics[key] <= 100.0 for key in RETRIEVAL_KEYS[:6])
    assert metrics["eval_rsum"] == pytest.approx(sum(metrics[key] for key in RETRIEVAL_KEYS[:6]))
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_loss_base"])  # no gap terms
    test_metrics = trainer.evaluate(tiny_demo_datasets["test"], metric_key_prefix="test")
    assert "test_rsum" in test_metrics and "test_loss_base" in test_metrics


def test_train_logs_terms_and_loads_the_best_rsum_checkpoint(tiny_demo_processor, tiny_demo_datasets, tmp_path):
    args = training_args(
        tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
        metric_for_best_model="rsum", load_best_model_at_end=True, learning_rate=5e-3,
    )
    trainer = make_trainer(tiny_demo_processor, tiny_demo_datasets, args)
    assert trainer.model_accepts_loss_kwargs is False
    trainer.train()
    history = trainer.state.log_history
    train_logs = [entry for entry in history if "loss" in entry and "eval_rsum" not in entry]
    assert len(train_logs) == 4 and all("loss_base" in entry for entry in train_logs)
    assert all(entry["loss"] == pytest.approx(entry["loss_base"], rel=1e-4, abs=1e-4) for entry in train_logs)
    evals = {entry["step"]: entry["eval_rsum"] for entry in history if "eval_rsum" in entry}
    assert sorted(evals) == [2, 4]
    best_step = max(evals, key=lambda step: (evals[step], -step))  # ties keep the earlier checkpoint
    assert trainer.state.best_metric == pytest.approx(evals[best_step])
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{best_step}")
    saved = load_file(str(Path(trainer.state.best_model_checkpoint) / "model.safetensors"))
    loaded = trainer.model.state_dict()
    for name, tensor in saved.items():
        torch.testing.assert_close(loaded[name], tensor, msg=name)


class RecordingCollator(GapClipCollator):
    """Keeps every batch it builds, to replay the Trainer's first step by hand."""

    def __init__(self, processor):
        super().__init__(processor)
        self.batches: list[dict] = []

    def __call__(self, items):
        batch = super().__call__(items)
        self.batches.append(copy.deepcopy(batch))
        return batch


def test_gradient_accumulation_update_is_the_mean_of_the_micro_batch_gradients(
    tiny_demo_processor, tiny_demo_datasets, tmp_path
):
    """`model_accepts_loss_kwargs=False`: the Trainer divides the loss by the accumulation steps itself.

    (A contrastive loss over 2 micro-batches is not the loss of the double batch, since the negatives differ; the
    contract is that one optimizer step with SGD moves the weights by -lr · mean of the micro-batch gradients.)
    """
    model = tiny_model(tiny_demo_processor)
    reference = copy.deepcopy(model)
    collator = RecordingCollator(tiny_demo_processor)
    args = training_args(
        tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=1, optim="sgd",
        learning_rate=0.5, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, warmup_steps=0,
    )
    trainer = make_trainer(tiny_demo_processor, tiny_demo_datasets, args, model=model, collator=collator)
    trainer.train()
    assert len(collator.batches) >= 2

    reference.train()
    for batch in collator.batches[:2]:
        reference(**batch).loss.backward()
    trained = dict(trainer.model.named_parameters())
    moved = 0
    for name, param in reference.named_parameters():
        if param.grad is None:
            continue
        expected = param.detach() - 0.5 * param.grad / 2
        torch.testing.assert_close(trained[name].detach(), expected, atol=1e-6, rtol=1e-5, msg=name)
        moved += int(not torch.equal(trained[name].detach(), param.detach()))
    assert moved > 0


def test_short_training_overfits_a_tiny_set(tiny_demo_processor, tiny_demo_datasets, tmp_path):
    train = tiny_demo_datasets["train"].select(range(16))
    args = training_args(tmp_path, per_device_train_batch_size=16, max_steps=30, learning_rate=2e-3, warmup_steps=0,
                         lr_scheduler_type="constant")
    trainer = GapClipTrainer(
        model=tiny_model(tiny_demo_processor), args=args, train_dataset=CaptionPairs(train, seed=0),
        data_collator=GapClipCollator(tiny_demo_processor), processing_class=tiny_demo_processor,
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, losses


def test_evaluate_without_eval_dataset_is_a_clear_error(tiny_demo_processor, tiny_demo_datasets, tmp_path):
    trainer = GapClipTrainer(
        model=tiny_model(tiny_demo_processor), args=training_args(tmp_path),
        train_dataset=CaptionPairs(tiny_demo_datasets["train"]), data_collator=GapClipCollator(tiny_demo_processor),
        processing_class=tiny_demo_processor,
    )
    with pytest.raises(ValueError, match="needs an eval_dataset"):
        trainer.evaluate()
