"""``recipes/study_methods.py --smoke`` end to end: outputs' shape, resume without retraining, any Karpathy JSON.

Never asserts that a method beats its baseline: the smoke sizes are far too small for that to mean anything.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

import pytest

from gapclip.study.context import start_digest

from ..conftest import DEMO_SIZES

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
METRICS = {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "modality_gap"}


def _study_recipe():
    spec = importlib.util.spec_from_file_location("_gapclip_recipe_study_methods", RECIPES / "study_methods.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory, tiny_demo_root):
    """One smoke study (both regimes), shared by the tests of this module."""
    assert _study_recipe().SMOKE["data"] == {f"demo_{k[4:]}": v for k, v in DEMO_SIZES.items() if k != "image_size"}
    out = tmp_path_factory.mktemp("study")
    results = _study_recipe().main(["--smoke", "--output_dir", str(out), "--disable_tqdm", "true"])
    return out, results


@pytest.mark.slow
def test_smoke_study_writes_every_method_with_seeds_mean_std_and_comparison(smoke_study):
    out, results = smoke_study
    saved = json.loads((out / "study.json").read_text())
    assert set(saved["regimes"]) == {"pretrained", "scratch"}
    # which start, by content: the pretrained runs are cached under it
    pretrained = saved["regimes"]["pretrained"]
    assert pretrained["start_digest"] == start_digest(Path(pretrained["start"]))
    assert saved["regimes"]["scratch"]["start_digest"] is None
    assert f"weights digest `{pretrained['start_digest']}`" in (out / "study.md").read_text()
    for regime, section in saved["regimes"].items():
        assert section["trained_count"] == section["run_count"] > 0  # a fresh folder: every run trained here
        assert f"{section['run_count']} trained in this invocation" in (out / "study.md").read_text()
        methods = section["methods"]
        assert len(methods) == 20  # every row of default_variants(): the demo data has translations and teachers
        for name, entry in methods.items():
            assert set(entry) >= {"seeds", "mean", "std", "vs_baseline", "terms", "learning_rate"}
            assert len(entry["seeds"]) == (2 if entry["main_table"] else 1)
            for metrics in entry["seeds"].values():
                assert METRICS <= set(metrics) and 0 <= metrics["rsum"] <= 600 and 0 <= metrics["modality_gap"] <= 2
            assert METRICS <= set(entry["mean"]) and METRICS <= set(entry["std"])
            if name in ("InfoNCE baseline", "Triplet baseline"):
                assert entry["vs_baseline"] is None
                continue
            vs = entry["vs_baseline"]
            boot = vs["rsum"]["bootstrap"]
            assert boot["ci_low"] <= boot["diff"] <= boot["ci_high"]
            assert vs["baseline"] == ("Triplet baseline" if entry["family"] == "DIAS" else "InfoNCE baseline")
            assert vs["rsum"]["verdict"] in ("gain", "loss", "no measurable difference")
            assert "diff" in vs["modality_gap"]["seeds"]
            # Holm over the regime's 18 comparisons: never below the row's own bootstrap p
            assert vs["rsum"]["holm"]["family_size"] == 18 and boot["p"] <= vs["rsum"]["holm"]["p"] <= 1.0
            # the comparison's point estimate is the mean of the per-seed RSUM differences
            base = methods[vs["baseline"]]["seeds"]
            per_seed = [entry["seeds"][s]["rsum"] - base[s]["rsum"] for s in entry["seeds"]]
            assert boot["diff"] == pytest.approx(sum(per_seed) / len(per_seed), abs=1e-6)
        selection = section["selection"]
        assert set(selection["learning_rate"]) == {"infonce", "triplet"}
        for sel in selection["learning_rate"].values():
            grid = {k: v for k, v in sel["validation_rsum"].items() if v is not None}
            assert sel["selected"] == pytest.approx(float(max(grid, key=grid.get)))  # chosen on validation
        assert len(selection["weights"]) == 8
        for sel in selection["learning_rate"].values():  # 2 grid values, one always best at an end: one more step
            assert len(sel["validation_rsum"]) == 3
    # the command that made the study, so that its folder can be replayed (tests/study/test_committed_results.py)
    assert saved["command"] == f"python recipes/study_methods.py --smoke --output_dir {out} --disable_tqdm true"
    table = (out / "study.md").read_text()
    assert f"Command: `{saved['command']}`" in table
    assert "## Regime: pretrained" in table and "## Regime: scratch" in table
    assert "| InfoNCE baseline | 2 |" in table and "| ΔRSUM [95% CI] | p (Holm) | p (seeds) |" in table


@pytest.mark.slow
def test_a_rerun_trains_nothing_and_gives_the_same_study(smoke_study, monkeypatch, capsys):
    out, results = smoke_study
    import gapclip.study.pool as pool

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(pool, "train_and_save", no_training)
    monkeypatch.setattr(pool.RunExecutor, "_run_in_pool", no_training)
    again = _study_recipe().main(["--smoke", "--output_dir", str(out), "--disable_tqdm", "true"])
    for regime in ("pretrained", "scratch"):
        assert again["regimes"][regime]["methods"] == results["regimes"][regime]["methods"]
        assert again["regimes"][regime]["plan"]["to_do"] == 0
        assert again["regimes"][regime]["plan"]["runs"] == len(list((out / "runs" / regime).glob("*.json")))
        assert again["regimes"][regime]["trained_count"] == 0
    # a read-back's wall time is not the runs' own: the report says none was trained
    assert (out / "study.md").read_text().count("all read back from earlier invocations: none trained in this one") == 2
    printed = capsys.readouterr().out
    assert f"Study finished: {out.resolve()}" in printed and f"{out.resolve() / 'study.md'}" in printed

    # --stop_after: the selections so far, in their own report; the finished study's report is left as it was
    before = (out / "study.md").read_text()
    partial = _study_recipe().main(["--smoke", "--output_dir", str(out), "--disable_tqdm", "true",
                                    "--stop_after", "learning_rate"])
    assert (out / "study.md").read_text() == before
    saved = json.loads((out / "selection-learning-rate.json").read_text())
    for regime in ("pretrained", "scratch"):
        section = saved["regimes"][regime]
        assert section["methods"] == {} and section["stopped_after"] == "learning_rate"
        assert section["selection"]["learning_rate"] == results["regimes"][regime]["selection"]["learning_rate"]
        assert section["selection"]["epochs"] == results["regimes"][regime]["selection"]["epochs"]
        assert partial["regimes"][regime]["plan"]["to_do"] == 0
    assert "Stopped after the `learning_rate` selection" in (out / "selection-learning-rate.md").read_text()


@pytest.mark.slow
def test_a_pretrained_regime_is_read_back_by_its_saved_key_without_its_start(smoke_study, monkeypatch, tmp_path):
    """How tests/study/test_committed_results.py reads back a committed pretrained study: nothing is made or
    trained, and the tables come out the same."""
    import shutil

    import gapclip.study.context as context_module
    import gapclip.study.pool as pool

    from .test_committed_results import stand_in_for_the_pretrained_start

    out, results = smoke_study
    saved = json.loads((out / "study.json").read_text())

    def unavailable(*args, **kwargs):
        raise AssertionError("the start model was made, or a run trained")

    for target, name in ((context_module, "_pretrained_start"), (pool, "train_and_save"),
                         (pool.RunExecutor, "_run_in_pool")):
        monkeypatch.setattr(target, name, unavailable)
    stand_in_for_the_pretrained_start(saved, monkeypatch)
    shutil.copytree(out / "runs", tmp_path / "runs")
    again = _study_recipe().main(["--smoke", "--regime", "pretrained", "--output_dir", str(tmp_path),
                                  "--disable_tqdm", "true"])
    section = again["regimes"]["pretrained"]
    assert section["plan"]["to_do"] == 0 and section["cache_key"] == saved["regimes"]["pretrained"]["cache_key"]
    assert section["methods"] == results["regimes"]["pretrained"]["methods"]
    assert section["selection"] == results["regimes"]["pretrained"]["selection"]


@pytest.mark.slow
def test_runs_of_another_start_are_named_rather_than_trained_again_in_silence(smoke_study, tmp_path, caplog):
    out, _ = smoke_study
    saved = json.loads((out / "study.json").read_text())
    now = saved["regimes"]["pretrained"]

    def warnings_of_another_start(report: dict) -> list[str]:
        (tmp_path / "study.json").write_text(json.dumps(report))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gapclip.study.runner"):
            plan = _study_recipe().main(["--smoke", "--regime", "pretrained", "--output_dir", str(tmp_path),
                                         "--dry_run", "true", "--disable_tqdm", "true"])
        assert plan["pretrained"]["to_do"] == plan["pretrained"]["runs"] > 0  # the folder holds no run of this start
        return [r.getMessage() for r in caplog.records if "were made from another start" in r.getMessage()]

    # an interrupted study of this very start resumes without a word
    assert warnings_of_another_start(saved) == []
    # a folder whose runs came from a start remade elsewhere
    saved["regimes"]["pretrained"] = {**now, "cache_key": "0123456789abcdef", "start_digest": "fedcba987654"}
    (message,) = warnings_of_another_start(saved)
    assert str(tmp_path / "study.json") in message
    assert f"context key 0123456789abcdef there, {now['cache_key']} now" in message
    assert f"start weights digest fedcba987654 there, {now['start_digest']} now" in message
    assert "--model_name_or_path" in message


@pytest.mark.slow
def test_study_on_a_karpathy_json_without_translations_skips_gst(tiny_demo_root, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="gapclip.study.runner"):
        results = _study_recipe().main([
            "--smoke", "--regime", "scratch", "--families", "LG-MGC", "--output_dir", str(tmp_path), "--disable_tqdm",
            "true", "--dataset", "karpathy", "--karpathy_json", str(tiny_demo_root / "dataset_demo.json"),
            "--image_root", str(tiny_demo_root / "images"), "--fixed_weights", "gst=0.1",
        ])
    # a weight given for the skipped term is named, not silently dropped
    assert any("--fixed_weights: no variant this study runs on this data uses ['gst']" in record.getMessage()
               for record in caplog.records)
    methods = results["regimes"]["scratch"]["methods"]
    assert "+LSC (concat)" in methods and not any("GST" in name for name in methods)
    assert "translation" in results["skipped"]["+GST (InfoNCE)"]
    assert set(results["regimes"]["scratch"]["selection"]["weights"]) == {"lsc"}


@pytest.mark.slow
def test_own_weights_select_a_distance_its_own_weight_and_reuse_that_run_as_its_row(tmp_path):
    results = _study_recipe().main([
        "--smoke", "--regime", "scratch", "--variants", "+GST (KL)", "--own_weights", "--weight_centres", "gst_kl=0.1",
        "--output_dir", str(tmp_path), "--disable_tqdm", "true"])
    assert results["settings"]["own_weights"] is True
    section = results["regimes"]["scratch"]
    weights = section["selection"]["weights"]
    assert list(weights) == ["gst_kl"] and list(weights["gst_kl"]["validation_rsum"]) == ["0.1"]  # smoke: one factor
    (term,) = section["methods"]["+GST (KL)"]["terms"]
    assert term == {"name": "gst", "weight": weights["gst_kl"]["selected"], "options": {"distance": "kl"}}
    # the KL row on seed 0 is its sweep's run at the selected weight, not a second run of the same term
    records = [json.loads(path.read_text()) for path in (tmp_path / "runs" / "scratch").glob("*.json")]
    assert len(records) == section["run_count"]
    gst_runs = [r["spec"]["gap_terms"] for r in records if r["spec"]["gap_terms"]]
    assert gst_runs == [[["gst", 0.1, [["distance", "kl"]]]]]
    assert "gst_kl" in (tmp_path / "study.md").read_text()


def test_a_missing_local_start_model_is_named_at_parsing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^--model_name_or_path './no/such/model': no such folder"):
        _study_recipe().main(["--model_name_or_path", "./no/such/model", "--output_dir", str(tmp_path)])


def test_search_flags_reach_the_settings(tmp_path):
    from transformers import HfArgumentParser

    recipe = _study_recipe()
    parser = HfArgumentParser((recipe.StudyArguments, recipe.DataArguments))
    study_args, _ = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--coordinate_rounds", "1", "--max_grid_extensions", "0"])
    settings = study_args.settings()
    assert settings.coordinate_rounds == 1 and settings.max_grid_extensions == 0
    default, _ = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path)])
    assert default.settings().coordinate_rounds == 3 and default.settings().seeds_every_row is False
    every_row, _ = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--seeds_every_row", "--variants", "Triplet, K-means batches"])
    assert every_row.settings().seeds_every_row is True
    assert every_row.settings().variant_names == ("Triplet, K-means batches",)
    with pytest.raises(ValueError, match="coordinate_rounds"):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--coordinate_rounds", "0"])[0].settings()


def test_fixed_weights_are_parsed_into_the_settings(tmp_path):
    from transformers import HfArgumentParser

    parser = HfArgumentParser((_study_recipe().StudyArguments, _study_recipe().DataArguments))

    def settings(*argv):
        return parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), *argv])[0].settings()

    assert settings().fixed_weights == {}
    assert settings("--fixed_weights", "dias_dim=1, dias_inter=5e-4,").fixed_weights == {
        "dias_dim": 1.0, "dias_inter": 0.0005}
    for bad in ("dias_dim", "dias_dim=x", "dias_dim=-1", "dias_dim=0"):
        with pytest.raises(ValueError, match=r"^--fixed_weights takes 'term=weight' pairs"):
            settings("--fixed_weights", bad)
    with pytest.raises(ValueError, match="unknown terms"):
        settings("--fixed_weights", "dim=1")
    assert settings().weight_centres == {}
    assert settings("--weight_centres", "csa=10,usa=0.05").weight_centres == {"csa": 10.0, "usa": 0.05}
    with pytest.raises(ValueError, match=r"^--weight_centres takes 'term=weight' pairs"):
        settings("--weight_centres", "csa=")
    assert settings().own_weights is False
    assert settings("--own_weights", "--weight_centres", "gst_kl=0.01").weight_centres == {"gst_kl": 0.01}
    with pytest.raises(ValueError, match=r"only with own_weights \(--own_weights\)"):
        settings("--fixed_weights", "lsc_max=0.1")


def test_compare_pairs_are_parsed_into_the_settings(tmp_path):
    from transformers import HfArgumentParser

    parser = HfArgumentParser((_study_recipe().StudyArguments, _study_recipe().DataArguments))

    def settings(*argv):
        return parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), *argv])[0].settings()

    literal, ours = "DIAS, literal Eq. 14 mask", "DIAS (full: K-means batches, sparse)"
    assert settings().comparisons == ()
    assert settings("--variants", f"{literal};{ours}", "--compare", f" {literal} vs {ours} ;").comparisons == (
        (literal, ours),)  # commas and a colon inside row names, spaces and an empty part around them
    for bad in (literal, f"{literal} vs ", f"{literal} vs {ours} vs {literal}"):
        with pytest.raises(ValueError, match=r"^--compare: .* must be 'row vs other'"):
            settings("--variants", f"{literal};{ours}", "--compare", bad)
    with pytest.raises(ValueError, match=r"comparisons \(--compare\): \['DIAS, literal Eq. 14 mask'\] not among"):
        settings("--variants", ours, "--compare", f"{literal} vs {ours}")
