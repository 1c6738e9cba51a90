"""The study folders under ``study_results/`` (behind the README's tables) are read back by today's code.

Each folder holds a study's ``study.json``/``study.md`` (``selection-<stage>.json``/``.md`` for a study stopped after a
selection stage with ``--stop_after``) and its ``runs/`` (one record and the per-query ranks of every run). Rerunning
the command recorded in that report into a copy of the folder must train nothing and give back the same tables: a
change to the cache keys, the data, the selection logic or the statistics that would silently detach the README's
figures from the code fails here.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
from pathlib import Path

import pytest

from gapclip.study.report import report_stem
from gapclip.study.runner import STOP_AFTER

from .test_study_recipe import _study_recipe

RESULTS = Path(__file__).resolve().parents[2] / "study_results"
#: the names a study's report can have: ``study.json``, or ``selection-<stage>.json`` for each ``--stop_after`` stage
REPORTS = tuple(f"{report_stem(stage)}.json" for stage in STOP_AFTER)
FOLDERS = sorted({path.parent for name in REPORTS for path in RESULTS.glob(f"*/{name}")})


def saved_report(folder: Path) -> dict:
    """The one report a committed folder holds (one of :data:`REPORTS`)."""
    reports = [folder / name for name in REPORTS if (folder / name).exists()]
    assert len(reports) == 1, f"{folder}: expected one report of {REPORTS}, found {[p.name for p in reports]}"
    return json.loads(reports[0].read_text())


def replay_argv(command: str, output_dir: Path) -> list[str]:
    """The arguments of a recorded ``python recipes/study_methods.py ...`` command, writing into ``output_dir``."""
    words = shlex.split(command)
    assert words[:2] == ["python", "recipes/study_methods.py"], command
    argv, skip = [], False
    for word in words[2:]:
        if skip:
            skip = False
        elif word in ("--output_dir", "--output-dir"):
            skip = True
        elif not word.startswith(("--output_dir=", "--output-dir=")):
            argv.append(word)
    return [*argv, "--output_dir", str(output_dir), "--disable_tqdm", "true"]


def stand_in_for_the_pretrained_start(saved: dict, monkeypatch) -> None:
    """Look the pretrained regime's runs up under the context key they were saved with.

    Making the demo pretrained start takes ~10 min of CPU, too long for a test, and its key depends on where the cache
    lives; everything else in a run's key (the run's spec) and all selection and statistics still come from today's
    code. The scratch regime builds its real context (the key of its word-level model and data)."""
    import gapclip.study.context as context_module
    from gapclip.study.runs import RunContext

    real = context_module.build_context

    def build_context(study, regime, datasets, teachers):
        if regime != "pretrained":
            return real(study, regime, datasets, teachers)
        section = saved["regimes"][regime]
        return RunContext(
            regime=regime, train=datasets["train"], validation=datasets["validation"], test=datasets["test"],
            processor=None, build_backbone=None, key=section["cache_key"], work_dir=study.output_dir / "work",
            teachers=teachers, extra={"start": section["start"], "start_digest": section.get("start_digest")},
        )

    monkeypatch.setattr(context_module, "build_context", build_context)


def assert_same_figures(replayed, saved, where: str = "") -> None:
    """``replayed == saved``, but floats only to 1e-9 relative.

    The statistics are recomputed from the committed ranks, so another numpy (or another CPU's summation order) can
    change a bootstrap mean in its last bit (52.546666666666674 against 52.54666666666667); anything larger is a real
    change to the figures behind the README and fails, with the path of the first figure that moved."""
    if isinstance(saved, float) or isinstance(replayed, float):
        numbers = isinstance(replayed, (int, float)) and isinstance(saved, (int, float))
        close = numbers and math.isclose(replayed, saved, rel_tol=1e-9, abs_tol=1e-12)
        assert close, f"{where}: {replayed!r} != {saved!r}"
    elif isinstance(saved, dict) and isinstance(replayed, dict):
        assert replayed.keys() == saved.keys(), f"{where}: keys {sorted(replayed)} != {sorted(saved)}"
        for key in saved:
            assert_same_figures(replayed[key], saved[key], f"{where}/{key}")
    elif isinstance(saved, list) and isinstance(replayed, list):
        assert len(replayed) == len(saved), f"{where}: {len(replayed)} items != {len(saved)}"
        for index, (left, right) in enumerate(zip(replayed, saved)):
            assert_same_figures(left, right, f"{where}/{index}")
    else:
        assert replayed == saved, f"{where}: {replayed!r} != {saved!r}"


def test_same_figures_allow_the_last_bit_and_name_what_moved():
    assert_same_figures({"a": [52.546666666666674, "gain", 3]}, {"a": [52.54666666666667, "gain", 3]})
    for moved, where in (({"a": [52.55, "gain", 3]}, "/a/0"), ({"a": [52.546666666666674, "loss", 3]}, "/a/1"),
                         ({"a": [52.546666666666674, "gain"]}, "/a"), ({"b": []}, "")):
        with pytest.raises(AssertionError, match=f"^{where}:"):
            assert_same_figures(moved, {"a": [52.54666666666667, "gain", 3]})


def test_replay_argv_swaps_the_output_folder_in_either_spelling(tmp_path):
    for flag in ("--output_dir /work/x", "--output-dir /work/x", "--output_dir=/work/x"):
        argv = replay_argv(f"python recipes/study_methods.py --regime scratch {flag} --variants '+CSA;+USA'", tmp_path)
        assert argv == ["--regime", "scratch", "--variants", "+CSA;+USA", "--output_dir", str(tmp_path),
                        "--disable_tqdm", "true"]


def test_study_results_are_committed_with_their_runs():
    assert FOLDERS, f"no study report ({REPORTS}) under {RESULTS}"
    for folder in FOLDERS:
        saved = saved_report(folder)
        assert saved["command"].startswith("python recipes/study_methods.py "), folder
        assert not (folder / "work").exists(), f"{folder}: a run's checkpoints were committed"
        for regime, section in saved["regimes"].items():
            records = list((folder / "runs" / regime).glob("*.json"))
            assert len(records) == section["run_count"], f"{folder}: runs/{regime} is incomplete"
            assert regime != "pretrained" or section.get("cache_key"), f"{folder}: no cache_key to read it back by"


@pytest.mark.slow
@pytest.mark.parametrize("folder", FOLDERS, ids=lambda path: path.name)
def test_a_committed_study_is_read_back_without_training(folder, tmp_path, monkeypatch):
    import gapclip.study.pool as pool

    def no_training(*args, **kwargs):
        raise AssertionError(f"{folder.name}: a committed run is not found under today's cache key")

    monkeypatch.setattr(pool, "train_and_save", no_training)
    monkeypatch.setattr(pool.RunExecutor, "_run_in_pool", no_training)
    saved = saved_report(folder)
    stand_in_for_the_pretrained_start(saved, monkeypatch)
    out = tmp_path / folder.name
    shutil.copytree(folder / "runs", out / "runs")
    again = _study_recipe().main(replay_argv(saved["command"], out))
    assert set(again["regimes"]) == set(saved["regimes"])
    for regime, section in saved["regimes"].items():
        replayed = json.loads(json.dumps(again["regimes"][regime], default=str))
        assert replayed["plan"]["to_do"] == 0
        assert_same_figures(replayed["selection"], section["selection"], f"{folder.name}/{regime}/selection")
        assert_same_figures(replayed["methods"], section["methods"], f"{folder.name}/{regime}/methods")
        assert_same_figures(replayed.get("comparisons"), section.get("comparisons"),
                            f"{folder.name}/{regime}/comparisons")
