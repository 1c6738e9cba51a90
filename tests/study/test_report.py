"""``study.json`` / ``study.md`` from finished runs: the comparison with a row's control, beside its baseline's."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from gapclip.study.report import render_markdown, summarise_regime
from gapclip.study.runner import MethodStudy, StudySettings
from gapclip.study.stats import cluster_bootstrap_rsum, holm, rsum_from_ranks

FULL, CONTROL, BASELINE = "DIAS (full: K-means batches, sparse)", "Triplet, K-means batches", "Triplet baseline"
IMAGES, CAPTIONS = 40, 2


def _run(seed: int, skill: float) -> dict:
    """A finished run whose ranks (and so its RSUM) get better with ``skill``: a rank is 0 with that probability."""
    rng = np.random.default_rng(seed * 1000 + int(skill * 100))
    ranks = {"i2t": np.where(rng.random(IMAGES) < skill, 0, rng.integers(1, 30, IMAGES)),
             "t2i": np.where(rng.random(IMAGES * CAPTIONS) < skill, 0, rng.integers(1, 30, IMAGES * CAPTIONS))}
    test = {m: 0.0 for m in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")}
    test.update(rsum=rsum_from_ranks(ranks["i2t"], ranks["t2i"]), modality_gap=1.0 - skill)
    return {"test": test, "ranks": ranks, "best_epoch": 3}


def _section(tmp_path, names: tuple[str, ...], comparisons=(), diverged: str | None = None):
    settings = StudySettings(regimes=("scratch",), seeds=2, seeds_every_row=True, variant_names=names,
                             fixed_weights={"dias_dim": 0.1, "dias_inter": 0.0005, "dias_intra": 0.01},
                             bootstrap_resamples=500, comparisons=comparisons)
    study = MethodStudy(settings, data_args=None, output_dir=tmp_path)
    skills = {BASELINE: 0.2, CONTROL: 0.35, FULL: 0.5}
    outcome = {
        "runs": {name: {seed: _run(seed, skill) for seed in (0, 1)} for name, skill in skills.items()
                 if name in names or name == BASELINE},
        "weights": dict(settings.fixed_weights), "learning_rate": {"triplet": 3e-4}, "epochs": {"triplet": 160},
        "selection": {"epochs": {}, "learning_rate": {}, "weights": {}},
    }
    if diverged:  # a row whose every seed diverged: a run without test results
        outcome["runs"][diverged] = {seed: {"test": None} for seed in (0, 1)}
    context = SimpleNamespace(test={"captions": [["a"] * CAPTIONS] * IMAGES}, extra={}, key="k")
    section = summarise_regime(study, "scratch", outcome, context, wall_seconds=0.0, run_seconds=0.0, run_count=6,
                               trained_count=0)
    return section, outcome


def _markdown(section) -> str:
    return render_markdown({"settings": {"seeds": 2, "batch_size": 64}, "data": {}, "wall_seconds": 0.0,
                            "machine": {"cpus": 2, "torch": "x", "load_average_at_write": None},
                            "regimes": {"scratch": section}})


def test_a_row_is_compared_with_its_control_when_the_study_ran_it(tmp_path):
    section, outcome = _section(tmp_path, (FULL, CONTROL))
    methods = section["methods"]
    full, control = methods[FULL], methods[CONTROL]
    assert full["vs_baseline"]["baseline"] == BASELINE and full["vs_control"]["control"] == CONTROL
    assert control["vs_baseline"]["baseline"] == BASELINE and "vs_control" not in control  # it has no control
    runs = outcome["runs"]
    # the control comparison is the same paired statistics as the baseline's, against the control's runs
    per_seed = [runs[FULL][s]["test"]["rsum"] - runs[CONTROL][s]["test"]["rsum"] for s in (0, 1)]
    boot = full["vs_control"]["rsum"]["bootstrap"]
    assert boot["diff"] == pytest.approx(np.mean(per_seed), abs=1e-9)
    assert full["vs_control"]["rsum"]["seeds"]["diff"] == pytest.approx(np.mean(per_seed))
    assert boot == cluster_bootstrap_rsum(
        [(runs[FULL][s]["ranks"]["i2t"], runs[FULL][s]["ranks"]["t2i"]) for s in (0, 1)],
        [(runs[CONTROL][s]["ranks"]["i2t"], runs[CONTROL][s]["ranks"]["t2i"]) for s in (0, 1)],
        np.repeat(np.arange(IMAGES), CAPTIONS), num_resamples=500)
    # differences add up: (full - control) + (control - baseline) = full - baseline, seed by seed
    assert (full["vs_control"]["rsum"]["seeds"]["diff"] + control["vs_baseline"]["rsum"]["seeds"]["diff"]
            == pytest.approx(full["vs_baseline"]["rsum"]["seeds"]["diff"]))
    assert full["vs_control"]["modality_gap"]["seeds"]["diff"] == pytest.approx(0.35 - 0.5)
    # one Holm family: the two baseline comparisons and the control one
    raw = {(FULL, "vs_baseline"): full["vs_baseline"]["rsum"]["bootstrap"]["p"],
           (FULL, "vs_control"): boot["p"], (CONTROL, "vs_baseline"): control["vs_baseline"]["rsum"]["bootstrap"]["p"]}
    for (name, kind), p in holm(raw).items():
        assert methods[name][kind]["rsum"]["holm"] == {"p": p, "family_size": 3}
    text = _markdown(section)
    assert "### Against the same batches without the terms (the terms' own effect)" in text
    row = next(line for line in text.splitlines() if line.startswith(f"| {FULL} | {CONTROL} |"))
    assert row.startswith(f"| {FULL} | {CONTROL} | 2 | {boot['diff']:+.1f} [{boot['ci_low']:+.1f}, ")
    # --seeds_every_row: the single-seed table's rows have seeds, and its heading says so
    assert "### Other variants: test split, mean ± std over seeds" in text and "test split, one seed" not in text


def test_without_its_control_a_row_is_compared_with_its_baseline_only(tmp_path):
    section, _ = _section(tmp_path, (FULL,))
    full = section["methods"][FULL]
    assert "vs_control" not in full and full["vs_baseline"]["rsum"]["holm"]["family_size"] == 1
    assert "Against the same batches" not in _markdown(section)


def test_a_declared_comparison_between_two_rows_stays_out_of_the_holm_family(tmp_path):
    """``--compare``: one row minus another with the baseline comparison's statistics, in a table of its own, its p
    unadjusted, and the Holm family of the baseline and control comparisons as it was without it."""
    names = (FULL, CONTROL)
    plain, _ = _section(tmp_path, names)
    section, outcome = _section(tmp_path, names, comparisons=((FULL, CONTROL), (CONTROL, BASELINE)))
    for name in names:  # same statistics, same family size as without the declared comparisons
        assert section["methods"][name] == plain["methods"][name]
    first, second = section["comparisons"]
    assert (first["row"], first["other"], second["row"], second["other"]) == (FULL, CONTROL, CONTROL, BASELINE)
    # row minus other: the control comparison's figures, and the baseline comparison's for the second pair
    assert {k: first[k] for k in ("seeds", "rsum", "modality_gap")} == {
        k: v for k, v in section["methods"][FULL]["vs_control"].items() if k != "control"} | {
        "rsum": {k: v for k, v in section["methods"][FULL]["vs_control"]["rsum"].items() if k != "holm"}}
    assert "holm" not in first["rsum"] and "holm" not in second["rsum"]
    assert second["rsum"]["bootstrap"] == section["methods"][CONTROL]["vs_baseline"]["rsum"]["bootstrap"]
    text = _markdown(section)
    assert "### Further comparisons between rows (`--compare`)" in text
    declared = text.split("### Further comparisons between rows (`--compare`)")[1]
    row = next(line for line in declared.splitlines() if line.startswith(f"| {FULL} | {CONTROL} | 2 | "))
    boot = first["rsum"]["bootstrap"]
    p = f"<{2.0 / boot['num_resamples']:.3f}" if boot["p"] == 0.0 else f"{boot['p']:.3f}"
    assert f" | {boot['diff']:+.1f} [{boot['ci_low']:+.1f}, {boot['ci_high']:+.1f}] | {p} | " in row
    assert "Further comparisons" not in _markdown(plain) and "comparisons" not in plain


def test_a_declared_comparison_with_a_row_that_finished_no_seed_says_so(tmp_path):
    section, _ = _section(tmp_path, (FULL, CONTROL), comparisons=((FULL, CONTROL),), diverged=CONTROL)
    assert section["comparisons"] == [{"row": FULL, "other": CONTROL, "seeds": []}]
    assert f"| {FULL} | {CONTROL} | 0 | not compared: no seed finished in both |" in _markdown(section)
