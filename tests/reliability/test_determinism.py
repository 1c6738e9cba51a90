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


def test_workers_and_the_pixel_cache_change_no_result(tiny_demo_root, tmp_path):
    """Two epochs (12 steps of 8 over 48 images) with 0 workers, with 2 persistent workers, and with 2 workers reading
    the pixel cache: the same step losses, weights and retrieval table, bit for bit."""
    lgmgc = load_recipe("train_clip_lgmgc")
    common = ("--seed", "0", "--logging_steps", "1", "--max_steps", "12")
    runs = {
        "zero": (),
        "workers": ("--dataloader_num_workers", "2", "--dataloader_persistent_workers", "true"),
        "cached": ("--dataloader_num_workers", "2", "--pixel_cache", "--pixel_cache_dir", str(tmp_path / "pixels")),
    }
    for name, flags in runs.items():
        lgmgc.main(tiny_flags(tmp_path / name, *common, *flags, terms=True))
    assert len(list((tmp_path / "pixels").iterdir())) == 1
    zero = tmp_path / "zero"
    for name in ("workers", "cached"):
        other = tmp_path / name
        assert step_losses(other) == step_losses(zero), name
        assert_same_weights(load_weights(other), load_weights(zero))
        rows = (json.loads((x / "retrieval.json").read_text()) for x in (zero, other))
        assert stripped(next(rows)) == stripped(next(rows)), name
