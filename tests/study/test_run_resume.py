"""A study run killed mid-run resumes from its last complete epoch and ends exactly as the uninterrupted run."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from gapclip.study import runs
from gapclip.study.context import build_context, load_study_data
from gapclip.study.runs import RunSpec, load_run, run_key, train_and_evaluate, train_and_save

from .test_study_recipe import _study_recipe


@pytest.fixture(scope="module")
def scratch_context(tmp_path_factory, tiny_demo_root):
    out = tmp_path_factory.mktemp("resume")
    study, _ = _study_recipe().build_study(["--smoke", "--regime", "scratch", "--output_dir", str(out)])
    return build_context(study, "scratch", load_study_data(study.data_args), teachers=None)


def test_a_run_killed_while_saving_resumes_and_ends_as_the_uninterrupted_run(scratch_context, tmp_path, monkeypatch):
    context = scratch_context
    spec = RunSpec.make("resume check", "infonce", [], learning_rate=3e-3, epochs=3, seed=0)
    whole = train_and_evaluate(spec, context, tmp_path / "whole")
    assert len(whole["record"]["validation_history"]) == 3
    steps_per_epoch = len(context.train) // context.batch_size
    # a checkpoint after every epoch but the last (after it, only the test pass is left), the latest one kept
    assert [path.name for path in (tmp_path / "whole").glob("checkpoint-*")] == [f"checkpoint-{2 * steps_per_epoch}"]

    key = run_key(spec, context.key)
    work_dir = context.work_dir / key
    save = runs.KeepBestOnValidation.save_checkpoint_state
    saves = []
    now = [1000.0]  # the study's clock: the killed process spends 7 s up to its checkpoint, the resumed one 3 s
    monkeypatch.setattr(runs, "time", SimpleNamespace(time=lambda: now[0]))

    def killed_at_the_second_save(self, folder):
        saves.append(folder)
        now[0] += 7.0
        if len(saves) == 2:  # killed while writing epoch 2's checkpoint: epoch 1's is the last complete one
            raise KeyboardInterrupt
        save(self, folder)

    monkeypatch.setattr(runs.KeepBestOnValidation, "save_checkpoint_state", killed_at_the_second_save)
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(spec, context, work_dir)
    monkeypatch.setattr(runs.KeepBestOnValidation, "save_checkpoint_state", save)
    assert [path.name for path in work_dir.glob("checkpoint-*")] == [f"checkpoint-{steps_per_epoch}"]

    evaluated = []
    evaluate = runs.evaluate_split

    def counted(*args, **kwargs):
        evaluated.append(1)
        now[0] += 1.0
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(runs, "evaluate_split", counted)
    folder = tmp_path / "runs"
    train_and_save(spec, key, context, folder)
    assert len(evaluated) == 3  # validation after epochs 2 and 3, then the test split: epoch 1 was not redone
    assert not work_dir.exists()  # the checkpoint is deleted once the run's record is saved

    resumed = load_run(folder, key)
    assert resumed["wall_seconds"] == 7.0 + 3.0  # the killed process's time up to its checkpoint counts too
    history = whole["record"]["validation_history"]
    assert len(resumed["validation_history"]) == len(history)
    for got, expected in zip(resumed["validation_history"], history):
        assert got == pytest.approx(expected)
    assert resumed["best_epoch"] == whole["record"]["best_epoch"]
    assert resumed["test"] == pytest.approx(whole["record"]["test"])
    for side in ("i2t", "t2i"):
        assert np.array_equal(resumed["ranks"][side], whole["ranks"][side])
