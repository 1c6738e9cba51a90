"""Reliability tests: non-finite guard, loss properties, exact resume, determinism, no pickle, crash safety.

Shared helpers live here (the recipe runs reuse ``tests/test_recipes.tiny_flags`` and the session's demo set).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"tensors differ: {different[:10]}"


def step_losses(folder: Path) -> dict[int, float]:
    """step -> logged training loss, from ``trainer_state.json``."""
    state = json.loads((Path(folder) / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def save_with_bad_training_images(datasets, folder: Path, bad_rows: set[int]) -> str:
    """The demo splits saved with ``save_to_disk`` (a ``--dataset hub`` folder), the first 16 training images kept
    and those at ``bad_rows`` replaced by bytes that are not an image; returns the folder."""
    from datasets import DatasetDict, Image

    train = datasets["train"].select(range(16)).cast_column("image", Image(decode=False))
    train = train.map(
        lambda row, i: {"image": {"bytes": b"not an image", "path": None}} if i in bad_rows else {},
        with_indices=True,
    ).cast_column("image", Image())
    DatasetDict({"train": train, "validation": datasets["validation"], "test": datasets["test"]}).save_to_disk(
        str(folder))
    return str(folder)
