"""Fixtures of the reliability suite: a teacher store for the demo set (computed once per session) and a way to
call :func:`gapclip.cli.run_training` with the tiny flags of ``tests/test_recipes.py``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gapclip.cli import parse_args, run_training


@dataclass
class NoMethodArguments:
    """No recipe options: the tests pass the term list themselves."""


def run(flags: list[str], gap_terms: list[dict], **kwargs: Any) -> dict[str, Any]:
    """``run_training`` with CLI ``flags`` (see ``tests.test_recipes.tiny_flags``) and an explicit term list."""
    model_args, data_args, _, lora_args, training_args = parse_args(NoMethodArguments, flags)
    return run_training(model_args, data_args, training_args, gap_terms, lora_args=lora_args, **kwargs)


@pytest.fixture(scope="session")
def teacher_store(tiny_demo_datasets, tmp_path_factory):
    """CUSA teachers for the session's demo set: offline MiniLM text teacher, mean-caption image teacher."""
    from gapclip.teachers import TeacherStore, check_coverage, precompute_teachers

    file = precompute_teachers(
        tiny_demo_datasets, output_dir=tmp_path_factory.mktemp("teachers"), image_teacher="captions",
        batch_size=32, show_progress=False,
    )
    store = TeacherStore.load(Path(file))
    check_coverage(store, tiny_demo_datasets)
    return store
