"""Exact resume: train N steps in one go, or stop at a checkpoint and resume to N — per-step losses, final weights
(term-owned parameters included) and test metrics are identical (CPU, fixed seed, ``dataloader_num_workers=0``).

Parametrised over ``TERM_REGISTRY``, so a newly registered term is covered automatically; a term that reads
teacher embeddings gets the session's teacher store (an input provider), translations come with the demo data. The
DIAS run adds the K-means neighbour-batch sampler, resumed both mid-epoch (its clusters must survive) and at an epoch
boundary (it must re-cluster with the checkpoint's weights).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from gapclip.losses import TERM_REGISTRY
from gapclip.trainer import SAMPLER_STATE_NAME

from ..test_recipes import load_recipe, tiny_flags
from . import assert_same_weights, load_weights
from .conftest import run

N_STEPS = 6
IGNORED = ("runtime", "per_second", "flos")  # wall-clock figures


def flags(out, *extra):
    # 16 training images / batch 8 = 2 steps per epoch: 6 steps cross two epoch boundaries (caption redraw, K-means).
    return tiny_flags(
        out, "--max_steps", str(N_STEPS), "--save_strategy", "steps", "--save_steps", "3", "--save_total_limit", "10",
        "--logging_steps", "1", "--seed", "0", "--skip_initial_eval", "true", "--max_train_samples", "16",
        "--dataloader_num_workers", "0", *extra, terms=True,
    )


def history(trainer) -> dict[int, dict[str, float]]:
    """step -> every logged training figure (loss, loss_<term>, grad_norm, learning_rate)."""
    rows: dict[int, dict[str, float]] = {}
    for entry in trainer.state.log_history:
        if "loss" in entry:
            rows[entry["step"]] = {k: v for k, v in entry.items() if not any(word in k for word in IGNORED)}
    return rows


def metrics(result) -> dict[str, float]:
    return {k: v for k, v in result["rows"]["after training"].items() if not any(word in k for word in IGNORED)}


def assert_identical_runs(full, resumed, full_dir, resumed_dir, *, expect_term_state: bool = False):
    expected, got = history(full["trainer"]), history(resumed["trainer"])
    assert sorted(expected) == list(range(1, N_STEPS + 1)), expected
    assert got == expected
    assert all(math.isfinite(v) for row in expected.values() for v in row.values())
    weights = load_weights(full_dir)
    assert_same_weights(weights, load_weights(resumed_dir))
    if expect_term_state:  # the term's own parameters/buffers are part of what is compared
        assert any(name.startswith("gap_terms.") for name in weights), sorted(weights)[:5]
    assert metrics(resumed) == metrics(full)


def term_kwargs(name: str, request) -> dict:
    inputs = {term_input.name for term_input in TERM_REGISTRY[name].inputs}
    needs_teachers = bool(inputs & {"teacher_image_embeds", "teacher_text_embeds"})
    return {"teacher_store": request.getfixturevalue("teacher_store")} if needs_teachers else {}


@pytest.mark.parametrize("term", sorted(TERM_REGISTRY))
def test_exact_resume_per_term(term, tiny_demo_root, tmp_path, request):
    kwargs = term_kwargs(term, request)
    terms = [{"name": term, "weight": 1.0}]
    full = run(flags(tmp_path / "full"), terms, **kwargs)
    checkpoint = tmp_path / "full" / "checkpoint-3"
    resumed = run(flags(tmp_path / "resumed", "--resume_from_checkpoint", str(checkpoint)), terms, **kwargs)
    assert resumed["trainer"].state.global_step == N_STEPS
    owns_state = bool(list(full["trainer"].model.gap_terms[term].state_dict()))
    assert_identical_runs(full, resumed, tmp_path / "full", tmp_path / "resumed", expect_term_state=owns_state)


@pytest.fixture(scope="module")
def dias():
    return load_recipe("train_clip_dias")


def test_exact_resume_dias_with_kmeans_sampler(dias, tiny_demo_root, tmp_path):
    """Triplet (distance-weighted, random) base + all three DIAS terms (β is term state) + K-means batches."""
    def main(out, *extra):
        return dias.main(flags(out, "--save_steps", "1", "--images_per_cluster", "4", *extra))

    full = main(tmp_path / "full")
    sampler = full["trainer"].train_batch_sampler
    assert sampler is not None and sampler.clustered_epoch == 2  # re-clustered at the start of epochs 1 and 2
    states = {
        step: json.loads((tmp_path / "full" / f"checkpoint-{step}" / SAMPLER_STATE_NAME).read_text())
        for step in (2, 3)
    }
    assert states[3]["clustered_epoch"] == 1 and states[2]["clustered_epoch"] == 0
    # checkpoint-3: mid-epoch 1 (its clusters come from the checkpoint); checkpoint-2: end of epoch 0 (re-cluster).
    for step in (3, 2):
        out = tmp_path / f"resumed_from_{step}"
        resumed = main(out, "--resume_from_checkpoint", str(tmp_path / "full" / f"checkpoint-{step}"))
        assert resumed["trainer"].train_batch_sampler.labels.tolist() == sampler.labels.tolist()
        assert_identical_runs(full, resumed, tmp_path / "full", out, expect_term_state=True)


def test_sampler_state_round_trips_through_the_checkpoint(dias, tiny_demo_root, tmp_path):
    """The file the trainer writes is the sampler's ``state_dict`` (JSON: no pickle)."""
    result = dias.main(flags(tmp_path / "out", "--max_steps", "3"))
    state = json.loads((tmp_path / "out" / "checkpoint-3" / SAMPLER_STATE_NAME).read_text())
    assert state == json.loads(json.dumps(result["trainer"].train_batch_sampler.state_dict()))
    assert torch.tensor(state["labels"]).shape == (16,)
