"""Two identical tiny runs (same seed, LG-MGC's default LSC + GST objective) write identical results."""

from __future__ import annotations

import json

from ..test_recipes import load_recipe, tiny_flags
from . import assert_same_weights, load_weights, step_losses


TIMING = ("runtime", "per_second")


def stripped(rows: dict) -> dict:
    """retrieval.json without wall-clock fields (``runtime``, ``*_per_second``), which legitimately differ."""
    return {row: {k: v for k, v in m.items() if not k.endswith(TIMING)} for row, m in rows.items()}


def test_identical_runs_give_identical_results(tiny_demo_root, tmp_path):
    lgmgc = load_recipe("train_clip_lgmgc")
    for name in ("a", "b"):
        lgmgc.main(tiny_flags(tmp_path / name, "--seed", "0", "--logging_steps", "1", terms=True))
    a, b = tmp_path / "a", tmp_path / "b"
    rows_a, rows_b = (json.loads((x / "retrieval.json").read_text()) for x in (a, b))
    assert {k: set(v) for k, v in rows_a.items()} == {k: set(v) for k, v in rows_b.items()}
    assert stripped(rows_a) == stripped(rows_b)
    assert step_losses(a) == step_losses(b)
    assert_same_weights(load_weights(a), load_weights(b))
