"""A configuration error from a recipe is one line on stderr and exit status 2, not a traceback (``gapclip.console``);
``GAPCLIP_DEBUG=1`` brings the traceback back, and errors from outside gapclip keep theirs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from gapclip.console import run_recipe

from ..test_recipes import RECIPES

MESSAGE = "--lsc_fusion must be one of ['concat', 'max', 'mean'], got 'bogus'."


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("GAPCLIP_DEBUG", None)
    return env


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": error: " in line]


def _failed_recipe(tmp_path, recipe: str, *args: str) -> list[str]:
    """Run ``recipes/RECIPE ARGS`` from the shell; it must exit with status 2 and no traceback: its error lines."""
    completed = subprocess.run(
        [sys.executable, str(RECIPES / recipe), *args], capture_output=True, text=True, env=_env(), cwd=tmp_path,
        timeout=300,
    )
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr, completed.stderr[-2000:]
    return _error_lines(completed.stderr)


def _bad_config(tmp_path) -> str:
    """A config file with the bad value: argparse checks a flag's choices itself (its own one-line error), a
    config file's values are checked by the recipe's ``__post_init__``, whose error ``run_recipe`` prints."""
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"lsc_fusion": "bogus", "output_dir": str(tmp_path)}))
    return config.name


def test_a_bad_flag_is_one_line_and_exit_status_2(tmp_path):
    assert _failed_recipe(tmp_path, "train_clip_lgmgc.py", _bad_config(tmp_path)) == [
        f"train_clip_lgmgc.py: error: {MESSAGE} (set GAPCLIP_DEBUG=1 for the traceback)"
    ]
    (line,) = _failed_recipe(tmp_path, "train_clip_lgmgc.py", "--lsc_fusion", "bogus", "--output_dir", str(tmp_path))
    assert line.replace("'", "").startswith(
        "train_clip_lgmgc.py: error: argument --lsc_fusion/--lsc-fusion: invalid choice: bogus "
        "(choose from concat, max, mean)"
    )


@pytest.mark.parametrize("recipe, flags, message", [
    ("study_methods.py", ["--regime", "both_ways"], "--regime must be pretrained, scratch or both, got 'both_ways'."),
    ("pretrain_demo.py", ["--backbone", "siglip"], "--backbone must be clip, vtde or both, got 'siglip'."),
])
def test_the_study_and_pretraining_recipes_give_one_line_errors_too(tmp_path, recipe, flags, message):
    assert _failed_recipe(tmp_path, recipe, *flags) == [
        f"{recipe}: error: {message} (set GAPCLIP_DEBUG=1 for the traceback)"
    ]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate CLI is not on PATH")
def test_under_accelerate_launch_no_traceback_is_printed(tmp_path):
    """``accelerate launch`` adds its own CalledProcessError traceback for a failed child; ``-q`` drops it, and what
    is left is the recipe's one line (before: the recipe's traceback, then accelerate's)."""
    completed = subprocess.run(
        ["accelerate", "launch", "-q", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision",
         "no", "--dynamo_backend", "no", str(RECIPES / "train_clip_lgmgc.py"), _bad_config(tmp_path)],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600,
    )
    assert completed.returncode != 0
    assert "Traceback" not in completed.stderr, completed.stderr[-2000:]
    assert len(_error_lines(completed.stderr)) == 1 and MESSAGE in completed.stderr


def _fails_with(error: BaseException):
    def main():
        raise error
    return main


def test_run_recipe_turns_our_errors_into_one_line(capsys, monkeypatch):
    monkeypatch.delenv("GAPCLIP_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["my_recipe.py"])
    with pytest.raises(SystemExit) as info:
        run_recipe(_fails_with(FileNotFoundError("image file 'x.png' of image_id='1' does not exist.")))
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        "my_recipe.py: error: image file 'x.png' of image_id='1' does not exist. "
        "(set GAPCLIP_DEBUG=1 for the traceback)\n"
    )
    with pytest.raises(SystemExit):
        run_recipe(_fails_with(KeyError("3 image id(s) not in teachers.safetensors: ['a']")))
    assert "error: 3 image id(s) not in teachers.safetensors: ['a'] (set" in capsys.readouterr().err  # no quotes


def test_debug_env_and_foreign_errors_keep_the_traceback(monkeypatch):
    monkeypatch.setenv("GAPCLIP_DEBUG", "1")
    with pytest.raises(ValueError, match="bad --x"):
        run_recipe(_fails_with(ValueError("bad --x")))
    monkeypatch.delenv("GAPCLIP_DEBUG")
    with pytest.raises(json.JSONDecodeError):  # raised inside the json module, not by gapclip: a bug to see whole
        run_recipe(lambda: json.loads("{"))
    with pytest.raises(RuntimeError):  # not a configuration error
        run_recipe(_fails_with(RuntimeError("3 consecutive optimizer steps had a non-finite loss")))


def test_run_recipe_ends_the_process_group_of_a_finished_run(tmp_path, monkeypatch):
    """Left to the interpreter, a gloo group now and then aborts (pytorch#190489) or hangs a finished run."""
    import torch.distributed as dist

    monkeypatch.delenv("GAPCLIP_DEBUG", raising=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert run_recipe(dist.get_world_size) == 1  # the group was up while main ran
        assert not dist.is_initialized()
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store-2'}", rank=0, world_size=1)
        with pytest.raises(SystemExit):
            run_recipe(_fails_with(ValueError("bad --x")))
        assert dist.is_initialized()  # a failed process does not wait at a barrier for the others
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
