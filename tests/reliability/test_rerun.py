"""Running a training recipe again into the same ``--output_dir`` (``gapclip.run_state``): a finished run is left
alone, a stopped run resumes with a WARNING, a kill after the last checkpoint trains nothing more, and a folder of
another configuration needs ``--overwrite_output_dir``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from gapclip.run_state import RUN_RECORD_NAME
from gapclip.trainer import GapClipTrainer

from ..test_recipes import load_recipe, tiny_flags


@pytest.fixture(scope="module")
def lgmgc():
    return load_recipe("train_clip_lgmgc")


def flags(out, *extra):
    return tiny_flags(out, "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "10", "--seed", "0",
                      *extra)


def checkpoints(out) -> list[str]:
    return sorted(p.name for p in out.glob("checkpoint-*"))


def test_a_finished_run_is_not_trained_again_nor_overwritten(lgmgc, tiny_demo_root, tmp_path, capsys):
    out = tmp_path / "out"
    first = lgmgc.main(flags(out))
    assert first["trainer"].state.global_step == 4
    record = json.loads((out / RUN_RECORD_NAME).read_text())
    assert record["status"] == "finished" and record["global_step"] == 4
    results = {name: (out / name).read_bytes() for name in ("retrieval.json", "retrieval.md", "model.safetensors")}
    capsys.readouterr()

    again = lgmgc.main(flags(out))  # the same command again
    assert again["already_finished"] and again["trainer"] is None
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"]  # no checkpoint-5: nothing was trained
    assert {name: (out / name).read_bytes() for name in results} == results
    assert again["rows"] == json.loads(results["retrieval.json"])
    assert again["train"] == first["train"] and again["train"]["train_loss"] > 0  # as the run saved them
    assert list(again["rows"]) == ["before training", "after training"]
    printed = capsys.readouterr().out
    assert "already holds a finished run of this configuration (4 steps" in printed
    assert "Nothing was trained and no result was overwritten" in printed and "--overwrite_output_dir" in printed

    shorter = lgmgc.main(flags(out, "--max_steps", "2"))  # a smaller budget is covered by the finished run too
    assert shorter["already_finished"] and checkpoints(out) == ["checkpoint-2", "checkpoint-4"]


def test_a_raised_budget_resumes_with_a_warning_and_keeps_the_before_row(lgmgc, tiny_demo_root, tmp_path, caplog):
    out = tmp_path / "out"
    first = lgmgc.main(flags(out, "--max_steps", "2"))
    before = first["rows"]["before training"]
    with caplog.at_level(logging.WARNING, logger="gapclip.run_state"):
        second = lgmgc.main(flags(out, "--max_steps", "4"))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "Resuming from" in r.getMessage()]
    assert len(warnings) == 1 and str(out / "checkpoint-2") in warnings[0].getMessage()
    assert second["trainer"].state.global_step == 4
    rows = json.loads((out / "retrieval.json").read_text())
    assert list(rows) == ["before training", "after training"] and rows["before training"] == before


BEST_MODEL = ("--eval_strategy", "steps", "--eval_steps", "2", "--load_best_model_at_end", "true")


@pytest.mark.parametrize("best", [False, True], ids=["last_model", "load_best_model_at_end"])
def test_a_kill_after_the_last_checkpoint_trains_nothing_more(lgmgc, tiny_demo_root, tmp_path, monkeypatch, best):
    """Killed after checkpoint-4 was saved (here: while saving the final model): the rerun loads checkpoint-4 (and,
    with --load_best_model_at_end, the best checkpoint), evaluates and exports; the stock Trainer would have trained
    a fifth step. The result is the uninterrupted run's."""
    extra = BEST_MODEL if best else ()
    out = tmp_path / "out"
    original = GapClipTrainer.save_model

    def killed(self, output_dir=None, _internal_call=False):
        if _internal_call:  # a checkpoint's own save
            return original(self, output_dir, _internal_call=True)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(GapClipTrainer, "save_model", killed)
    with pytest.raises(KeyboardInterrupt):
        lgmgc.main(flags(out, *extra))
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"] and not (out / "retrieval.json").exists()
    assert json.loads((out / RUN_RECORD_NAME).read_text())["status"] == "running"

    monkeypatch.setattr(GapClipTrainer, "save_model", original)
    trained = []
    original_train = GapClipTrainer.train
    monkeypatch.setattr(GapClipTrainer, "train",
                        lambda self, *a, **k: trained.append(1) or original_train(self, *a, **k))
    result = lgmgc.main(flags(out, *extra))
    assert not trained and result["trainer"].state.global_step == 4
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    rows = json.loads((out / "retrieval.json").read_text())
    assert list(rows) == ["before training", "after training"]  # the first part's "before" row is kept
    assert json.loads((out / RUN_RECORD_NAME).read_text())["status"] == "finished"

    clean = lgmgc.main(flags(tmp_path / "clean", *extra))  # the same as an uninterrupted run
    if best:
        chosen = [Path(r["trainer"].state.best_model_checkpoint).name for r in (result, clean)]
        assert chosen[0] == chosen[1] and chosen[0].startswith("checkpoint-")
    assert {k: v for k, v in rows["after training"].items() if "runtime" not in k and "per_second" not in k} == {
        k: v for k, v in clean["rows"]["after training"].items() if "runtime" not in k and "per_second" not in k}


def test_another_configuration_needs_overwrite_output_dir(lgmgc, tiny_demo_root, tmp_path):
    out = tmp_path / "out"
    lgmgc.main(flags(out, "--max_steps", "2"))
    with pytest.raises(ValueError) as info:  # other data: fewer training images
        lgmgc.main(flags(out, "--max_train_samples", "16"))
    message = str(info.value)
    assert "holds a run of another configuration" in message and "checkpoint-2" in message
    assert "max_train_samples: None there, 16 here" in message and "--overwrite_output_dir" in message

    result = lgmgc.main(flags(out, "--max_train_samples", "16", "--max_steps", "2", "--overwrite_output_dir"))
    assert result["trainer"].state.global_step == 2
    record = json.loads((out / RUN_RECORD_NAME).read_text())
    assert record["configuration"]["max_train_samples"] == 16 and record["status"] == "finished"
    again = lgmgc.main(flags(out, "--max_train_samples", "16", "--max_steps", "2"))
    assert again["already_finished"]


def test_a_folder_with_output_but_no_run_record_is_not_overwritten(lgmgc, tiny_demo_root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "retrieval.md").write_text("someone's results")
    with pytest.raises(ValueError, match="is not empty and holds no gapclip run record .* --overwrite_output_dir"):
        lgmgc.main(flags(out, "--max_steps", "2"))
    assert (out / "retrieval.md").read_text() == "someone's results"

    unrelated = tmp_path / "with_config"
    unrelated.mkdir()
    (unrelated / "run.yaml").write_text("max_steps: 2\n")  # nothing a run writes: fine
    result = lgmgc.main(flags(unrelated, "--max_steps", "2"))
    assert result["trainer"].state.global_step == 2 and (unrelated / "run.yaml").is_file()


def test_overwrite_output_dir_is_a_training_argument(lgmgc, tmp_path):
    from transformers import TrainingArguments

    from gapclip.cli import GapClipTrainingArguments

    assert "overwrite_output_dir" not in TrainingArguments.__dataclass_fields__  # transformers 5 dropped it
    assert GapClipTrainingArguments(output_dir=str(tmp_path), overwrite_output_dir=True).overwrite_output_dir
