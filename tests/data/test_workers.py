"""DataLoader workers change nothing: the batches of 0 and 2 workers are identical for the same seed, epoch after
epoch, with persistent workers too (the epoch that picks the captions lives in shared memory)."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPImageProcessorPil, CLIPProcessor

from gapclip.data import CaptionPairs, GapClipCollator
from gapclip.data.input_pipeline import configure_training_images, dataloader_advice, suggested_num_workers


class EpochSampler(torch.utils.data.Sampler):
    """A permutation per epoch from (seed, epoch), as accelerate's seedable sampler draws the Trainer's."""

    def __init__(self, size: int):
        self.size, self.epoch = size, 0

    def __iter__(self):
        yield from torch.randperm(self.size, generator=torch.Generator().manual_seed(100 + self.epoch)).tolist()

    def __len__(self) -> int:
        return self.size


def epochs_of_batches(pairs, collator, *, workers: int, persistent: bool, epochs: int = 2) -> list[list[dict]]:
    sampler = EpochSampler(len(pairs))
    loader = torch.utils.data.DataLoader(
        pairs, batch_size=8, sampler=sampler, collate_fn=collator, num_workers=workers, persistent_workers=persistent,
    )
    out = []
    for epoch in range(epochs):
        sampler.epoch = epoch
        pairs.set_epoch(epoch)  # as the trainer's EpochCallback does, before each epoch's iterator
        out.append(list(loader))
    return out


def assert_same(a: list[list[dict]], b: list[list[dict]]) -> None:
    assert len(a) == len(b)
    for epoch_a, epoch_b in zip(a, b):
        assert len(epoch_a) == len(epoch_b)
        for batch_a, batch_b in zip(epoch_a, epoch_b):
            assert sorted(batch_a) == sorted(batch_b)
            for key in ("input_ids", "attention_mask", "pixel_values", "image_index"):
                assert torch.equal(batch_a[key], batch_b[key]), key


@pytest.mark.parametrize("source", ["images", "pixels", "pixel cache"])
def test_zero_and_two_workers_give_identical_batches(source, tiny_demo_datasets, tiny_demo_processor, tmp_path):
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                                   crop_size={"height": 32, "width": 32}),
                              tokenizer=tiny_demo_processor.tokenizer)
    collator = GapClipCollator(processor, image_transform=None if source == "images" else "auto")

    def pairs() -> CaptionPairs:
        made = CaptionPairs(tiny_demo_datasets["train"], seed=3)
        if source != "images":
            configure_training_images(made, collator, pixel_cache=source == "pixel cache",
                                      pixel_cache_dir=tmp_path, show_progress=False)
        return made

    reference = epochs_of_batches(pairs(), collator, workers=0, persistent=False)
    # the captions of epoch 1 are not those of epoch 0, so a worker stuck at epoch 0 would show
    first, second = (torch.cat([b["input_ids"][:, :4] for b in e]) for e in reference)
    assert not torch.equal(first, second)
    assert_same(reference, epochs_of_batches(pairs(), collator, workers=2, persistent=False))
    assert_same(reference, epochs_of_batches(pairs(), collator, workers=2, persistent=True))


class Args:
    def __init__(self, **kwargs):
        defaults = {"dataloader_num_workers": 0, "dataloader_persistent_workers": False,
                    "dataloader_pin_memory": True, "world_size": 1}
        self.__dict__.update({**defaults, **kwargs})


def test_dataloader_advice():
    assert dataloader_advice(Args(), num_epochs=5, accelerator=None) == []  # CPU training: the workers would compete
    gpu = dataloader_advice(Args(), num_epochs=5, accelerator="cuda")
    assert len(gpu) == 1 and "--dataloader_num_workers 0 on cuda" in gpu[0]
    assert f"--dataloader_num_workers {suggested_num_workers(1)} --dataloader_persistent_workers true" in gpu[0]
    restarted = dataloader_advice(Args(dataloader_num_workers=4), num_epochs=5, accelerator="cuda")
    assert len(restarted) == 1 and "--dataloader_persistent_workers true keeps them" in restarted[0]
    assert dataloader_advice(Args(dataloader_num_workers=4), num_epochs=1, accelerator="cuda") == []
    assert dataloader_advice(Args(dataloader_num_workers=4, dataloader_persistent_workers=True), num_epochs=5,
                             accelerator="cuda") == []
    unpinned = dataloader_advice(Args(dataloader_num_workers=2, dataloader_persistent_workers=True,
                                      dataloader_pin_memory=False), num_epochs=5, accelerator="cuda")
    assert len(unpinned) == 1 and "pin_memory" in unpinned[0]
    assert suggested_num_workers(1, cpu_count=2) == 1
    assert suggested_num_workers(1, cpu_count=64) == 8
    assert suggested_num_workers(4, cpu_count=16) == 3


def test_pinned_memory_is_asked_for_only_where_an_accelerator_takes_the_batches(tmp_path, monkeypatch):
    """Trainer's default ``dataloader_pin_memory=True`` makes torch warn on every DataLoader of a CPU run."""
    import warnings

    from gapclip.cli import GapClipTrainingArguments

    def pin(**kwargs) -> bool:
        return GapClipTrainingArguments(output_dir=str(tmp_path), report_to="none", **kwargs).dataloader_pin_memory

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert pin() is False and pin(use_cpu=True) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning it avoids: "'pin_memory' ... no accelerator is found"
        list(torch.utils.data.DataLoader(range(4), batch_size=2, pin_memory=pin()))
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    assert pin() is True and pin(dataloader_pin_memory=False) is False
    assert pin(use_cpu=True) is False  # training on the CPU beside an accelerator: nothing is copied to it


def test_the_trainers_own_batch_sampler_loader_pins_only_for_an_accelerator(tiny_demo_processor, tiny_demo_datasets,
                                                                             tmp_path, monkeypatch):
    """The loader for a batch sampler (DIAS's K-means batches) follows the same rule, also for a plain
    ``TrainingArguments``, which keeps the Trainer's default of pinning."""
    from ..test_trainer import make_trainer, training_args

    args = training_args(tmp_path, use_cpu=False, dataloader_pin_memory=True)
    trainer = make_trainer(tiny_demo_processor, tiny_demo_datasets, args)
    trainer.train_batch_sampler = [list(range(8))]
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert trainer.get_train_dataloader().pin_memory is False
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    assert trainer.get_train_dataloader().pin_memory is True
    trainer.args.use_cpu = True
    assert trainer.get_train_dataloader().pin_memory is False
