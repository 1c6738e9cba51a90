"""The study's rows and sweeps: valid term specs, every family's baseline, the paper weights of the recipes."""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from gapclip import GapClipConfig
from gapclip.study import SWEEPS, default_variants
from gapclip.study.report import render_markdown
from gapclip.study.runner import MethodStudy, StudySettings
from gapclip.study.variants import BASELINES, OWN_WEIGHT_SWEEPS
from gapclip.testing import tiny_clip_config

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_every_variant_builds_a_valid_config_at_any_selected_weight():
    weights = {name: sweep.paper_weight * 3 for name, sweep in SWEEPS.items()}
    names = [v.name for v in default_variants()]
    assert len(names) == len(set(names))
    for variant in default_variants():
        config = GapClipConfig(tiny_clip_config(), gap_terms=variant.gap_terms(weights), **BASELINES[variant.base])
        assert [t["weight"] for t in config.gap_terms] == [weights[u.sweep] for u in variant.terms]


def test_main_table_holds_baselines_each_term_alone_and_each_full_method():
    main = {v.name: v for v in default_variants() if v.main}
    baselines = [v for v in main.values() if v.is_baseline]
    assert sorted(v.base for v in baselines) == ["infonce", "triplet"]
    alone = {v.terms[0].sweep for v in main.values() if len(v.terms) == 1}
    assert alone == {"lsc", "gst", "dias_dim", "dias_inter", "dias_intra", "csa", "usa"}
    full = [v.name for v in main.values() if len(v.terms) > 1]
    assert len(full) == 3 and {v.family for v in main.values() if len(v.terms) > 1} == {"LG-MGC", "DIAS", "CUSA"}
    # DIAS rows sit on the summed, distance-weighted triplet loss; the others on InfoNCE
    assert all((v.base == "triplet") == (v.family == "DIAS" or v.name == "Triplet baseline") for v in main.values())
    assert BASELINES["triplet"]["triplet_reduction"] == "sum"


def test_dias_ablations_differ_from_the_full_method_in_one_thing_each():
    rows = {v.name: v for v in default_variants() if v.family == "DIAS"}
    full = rows["DIAS (full: K-means batches, sparse)"]
    assert full.sampler == "kmeans" and rows["DIAS, random batches"].sampler == "random"
    assert rows["DIAS, random batches"].terms == full.terms
    dense = rows["DIAS, dense constraints"].gap_terms({n: 1.0 for n in SWEEPS})
    assert [t["options"].get("sparse", True) for t in dense] == [True, False, False]
    literal = rows["DIAS, literal Eq. 14 mask"].gap_terms({n: 1.0 for n in SWEEPS})
    assert [t["options"].get("selection") for t in literal] == [None, "difference", "difference"]
    literal_dim = rows["+L_dim (literal Eq. 6)"].gap_terms({n: 1.0 for n in SWEEPS})
    assert literal_dim[0]["options"] == {"correlation_transform": "none"}


def test_the_k_means_control_is_optional_and_is_the_full_dias_without_its_terms(tmp_path):
    """"Triplet, K-means batches" answers whether the full DIAS's gain is its terms' or its batches': the triplet
    baseline on DIAS's batches. It was added after full studies were committed, so only a study that names it runs it
    (the default plan, and so every committed folder's, is unchanged)."""
    rows = {v.name: v for v in default_variants()}
    control = rows["Triplet, K-means batches"]
    assert control.optional and not control.main and not control.terms and not control.is_baseline
    for name in ("DIAS (full: K-means batches, sparse)", "DIAS, dense constraints", "DIAS, literal Eq. 14 mask"):
        row = rows[name]
        assert row.control == control.name and (row.base, row.sampler) == (control.base, control.sampler)
    assert [v.name for v in default_variants() if v.optional] == [control.name]
    assert all(v.control is None for v in default_variants() if v.sampler == "random")
    everything = {"translation", "teacher"}
    default = MethodStudy(StudySettings(), data_args=None, output_dir=tmp_path)
    assert control.name not in [v.name for v in default.available_variants(everything)]
    dias_only = MethodStudy(StudySettings(families=("DIAS",)), data_args=None, output_dir=tmp_path)
    assert control.name not in [v.name for v in dias_only.available_variants(everything)]
    named = MethodStudy(StudySettings(seeds=3, variant_names=(control.name, "DIAS, random batches")), data_args=None,
                        output_dir=tmp_path)
    assert [v.name for v in named.available_variants(everything)] == [
        "Triplet baseline", "DIAS, random batches", control.name]
    assert [named.seeds_of(v) for v in named.available_variants(everything)] == [[0, 1, 2], [0], [0]]
    # --seeds_every_row: the named single-seed rows get every seed too
    every = MethodStudy(replace(named.settings, seeds_every_row=True), data_args=None, output_dir=tmp_path)
    assert [every.seeds_of(v) for v in every.available_variants(everything)] == [[0, 1, 2]] * 3
    assert not every.is_stage_run(control, 0)  # K-means batches: no selection stage trains it


def _recipe(name):
    spec = importlib.util.spec_from_file_location(f"_study_recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_paper_weights_are_the_recipes_defaults():
    dias, cusa, lgmgc = _recipe("train_clip_dias").DIASArguments(), _recipe("train_clip_cusa").CUSAArguments(), \
        _recipe("train_clip_lgmgc").LGMGCArguments()
    assert SWEEPS["dias_dim"].paper_weight == dias.dim_weight == 10.0
    assert SWEEPS["dias_inter"].paper_weight == dias.inter_weight == 0.05
    assert SWEEPS["dias_intra"].paper_weight == dias.intra_weight == 0.1
    assert SWEEPS["csa"].paper_weight == cusa.csa_weight == 0.1
    assert SWEEPS["usa"].paper_weight == cusa.usa_weight == 0.5
    assert SWEEPS["lsc"].paper_weight == lgmgc.lsc_weight and SWEEPS["gst"].paper_weight == lgmgc.gst_weight


def test_run_counts_and_which_runs_are_shared_with_the_selection_stages(tmp_path):
    study = MethodStudy(StudySettings(seeds=3, max_grid_extensions=0), data_args=None, output_dir=tmp_path)
    everything = {"translation", "teacher"}
    variants = study.available_variants(everything)
    shared = [v.name for v in variants if study.is_stage_run(v, 0)]
    assert shared == ["InfoNCE baseline", "Triplet baseline", "+LSC (concat)", "+GST (InfoNCE)",
                      "+L_dim (shifted, ours)", "+L_dim (literal Eq. 6)", "+L_inter (sparse)", "+L_intra (sparse)",
                      "+CSA", "+USA"]
    assert not any(study.is_stage_run(v, 1) for v in variants)
    # Planned on an empty cache: 2 bases × 3 schedule lengths + 2 bases × 3 learning rates (the middle one at the
    # provisional length is stage 0's run) + 8 sweeps × 3 weights + (12 main rows × 3 seeds + 8 single rows) - 10 runs
    # shared with stages 1-2
    context = SimpleNamespace(key="k", regime="pretrained")
    one_pass = MethodStudy(StudySettings(seeds=3, max_grid_extensions=0, coordinate_rounds=1), data_args=None,
                           output_dir=tmp_path)
    total, missing = one_pass.count_runs("pretrained", everything, context, tmp_path)
    assert total == len(missing) == 6 + 4 + 24 + 36 + 8 - 10
    # The default search goes on: missing runs score alike, so stage 1 provisionally picks the first (lowest) rate,
    # which is not the one the length was chosen at; round 2 tries the length again there, at 1 epoch (stage 1's run,
    # read back) and 2 (1 ÷ 2 rounds up to 1), for both base losses, and the length does not move: no further round.
    assert study.count_runs("pretrained", everything, context, tmp_path)[0] == 6 + 4 + 24 + 36 + 8 - 10 + 2
    fixed = MethodStudy(StudySettings(seeds=3, max_grid_extensions=0, epochs={"pretrained": 2, "scratch": 5}),
                        data_args=None, output_dir=tmp_path)
    assert fixed.settings.epochs == {"pretrained": (2,), "scratch": (5,)}
    assert fixed.count_runs("pretrained", everything, context, tmp_path)[0] == 6 + 24 + 36 + 8 - 10  # no stage 0
    without_gst = study.available_variants({"teacher"})
    assert not any(v.needs & {"translation"} for v in without_gst)
    only_dias = MethodStudy(StudySettings(families=("DIAS",)), data_args=None, output_dir="unused")
    assert only_dias.needed_bases(everything) == ["triplet"]  # only the baseline DIAS is compared with
    assert only_dias.needed_sweeps(everything) == ["dias_dim", "dias_dim_literal", "dias_inter", "dias_intra"]


def test_named_variants_run_alone_with_the_baselines_of_their_base_losses(tmp_path):
    """--variants: only the named rows, their baselines, and the sweeps of their terms; with one-value grids (a
    fixed length and learning rate, one weight) it is a rerun of those rows alone."""
    settings = StudySettings(regimes=("pretrained",), seeds=3, variant_names=("+CSA", "+L_intra (sparse)"),
                             learning_rates={"pretrained": (1e-4,), "scratch": (1e-3,)},
                             epochs={"pretrained": 16, "scratch": 5}, weight_factors=(1.0, 10.0),
                             max_grid_extensions=0)
    study = MethodStudy(settings, data_args=None, output_dir=tmp_path)
    everything = {"translation", "teacher"}
    assert [v.name for v in study.available_variants(everything)] == [
        "InfoNCE baseline", "Triplet baseline", "+L_intra (sparse)", "+CSA"]
    assert study.needed_sweeps(everything) == ["dias_intra", "csa"]
    fetch, asked = _scored_fetch(lambda spec: 100.0 + sum(weight for _, weight, _ in spec.gap_terms))
    outcome = study._stages("pretrained", everything, fetch)
    # stages 0 and 1 ask for the same run per base (one length, one rate: trained once, read back once); stage 2:
    # 2 weights × 2 terms; stage 3: 4 rows × 3 seeds
    assert [len(batch) for batch in asked] == [2, 2, 4, 12]
    assert [(s.base, s.epochs, s.learning_rate, s.seed) for s in asked[0]] == [
        (s.base, s.epochs, s.learning_rate, s.seed) for s in asked[1]]
    assert outcome["weights"] == {"dias_intra": 1.0, "csa": 1.0}  # paper weight (0.1) × 10 scored higher
    assert all(spec.epochs == 16 and spec.learning_rate == 1e-4 for batch in asked for spec in batch)
    assert set(outcome["runs"]) == {"InfoNCE baseline", "Triplet baseline", "+L_intra (sparse)", "+CSA"}


def test_fixed_weights_train_no_sweep_and_reach_every_row_that_uses_the_term(tmp_path):
    """--fixed_weights: a rerun of the full DIAS at the weights an earlier study selected for each of its terms (at
    different factors of their paper weights) trains the baseline and the row only, with exactly those weights."""
    fixed = {"dias_dim": 1.0, "dias_inter": 0.0005, "dias_intra": 0.01}
    settings = StudySettings(regimes=("pretrained",), seeds=3,
                             variant_names=("DIAS (full: K-means batches, sparse)", "DIAS, random batches"),
                             learning_rates={"pretrained": (3e-4,), "scratch": (1e-3,)},
                             epochs={"pretrained": 32, "scratch": 5}, fixed_weights=fixed, max_grid_extensions=0)
    study = MethodStudy(settings, data_args=None, output_dir=tmp_path)
    fetch, asked = _scored_fetch(lambda spec: 100.0 + sum(weight for _, weight, _ in spec.gap_terms))
    outcome = study._stages("pretrained", {"translation", "teacher"}, fetch)
    # stages 0 and 1: the triplet baseline's one run (asked twice); no stage-2 batch; stage 3: 3 + 3 + 1 runs
    assert [len(batch) for batch in asked] == [1, 1, 7]
    assert outcome["weights"] == fixed
    for spec in asked[-1]:
        weights = {name: weight for name, weight, _ in spec.gap_terms}
        assert weights == ({} if spec.label.startswith("pretrained: Triplet") else fixed), spec.label
    assert {spec.sampler for spec in asked[-1] if spec.gap_terms} == {"kmeans", "random"}
    assert study.unused_weight_terms({"translation", "teacher"}) == []
    chosen = outcome["selection"]["weights"]["dias_inter"]
    assert chosen["selected"] == 0.0005 and chosen["fixed"] and chosen["validation_rsum"] == {}
    # a term that is not fixed is still swept, next to one that is
    mixed = MethodStudy(replace(settings, variant_names=("+CSA", "+L_intra (sparse)"), fixed_weights={"csa": 10.0},
                                weight_factors=(1.0, 10.0)), data_args=None, output_dir=tmp_path)
    fetch, asked = _scored_fetch(lambda spec: 100.0 - sum(weight for _, weight, _ in spec.gap_terms))
    outcome = mixed._stages("pretrained", {"translation", "teacher"}, fetch)
    assert [sorted(w for _, w, _ in s.gap_terms) for s in asked[2]] == [[0.1], [1.0]]  # only dias_intra's grid
    assert outcome["weights"] == {"dias_intra": 0.1, "csa": 10.0}
    # a fixed term no chosen row uses (or one whose row the data cannot run: CSA needs the teacher) is reported
    unused = MethodStudy(replace(settings, variant_names=("+CSA",), fixed_weights={"csa": 10.0, "dias_dim": 1.0}),
                         data_args=None, output_dir=tmp_path)
    assert unused.unused_weight_terms({"translation", "teacher"}) == ["dias_dim"]
    assert unused.unused_weight_terms({"translation"}) == ["csa", "dias_dim"]
    section = {"run_count": 0, "trained_count": 0, "run_seconds": 0.0, "wall_seconds": 0.0, "stopped_after": "weights",
               "selection": outcome["selection"], "methods": {}, "weight_factors": [1.0, 10.0]}
    text = render_markdown({"settings": {"seeds": 3, "batch_size": 8}, "data": {}, "wall_seconds": 0.0,
                            "machine": {"cpus": 2, "torch": "x", "load_average_at_write": None},
                            "regimes": {"pretrained": section}})
    assert "- csa: **10**, given (`--fixed_weights`), not selected in this study (paper: *0.1*)" in text
    assert "- dias_intra: *0.1*: 99.9, 1: 99.0 → **0.1**" in text
    # the baseline (no term: 100.0) beat both of dias_intra's weights on validation, and the report says so
    assert ("→ **0.1** (its baseline: 100.0; every weight scores below it: the grid has no \"off\" point, so the "
            "best of them is used)") in text


def test_weight_centres_move_a_terms_grid_to_an_earlier_selection_and_the_report_says_so(tmp_path):
    """--weight_centres: a weight selected again (e.g. at a longer schedule) on ``centre × factors`` around the one an
    earlier study chose, not around the paper's; other terms keep the paper-centred grid. Values are rounded to 12
    significant digits (0.05 × 0.1 is 0.005, not 0.005000000000000001), and a grid end that wins still grows."""
    settings = StudySettings(regimes=("pretrained",), seeds=2, variant_names=("+CSA", "+USA"),
                             learning_rates={"pretrained": (3e-4,), "scratch": (1e-3,)},
                             epochs={"pretrained": 32, "scratch": 5}, weight_factors=(0.1, 1.0, 10.0),
                             weight_centres={"usa": 0.05}, max_grid_extensions=1)
    study = MethodStudy(settings, data_args=None, output_dir=tmp_path)
    assert study.weight_grid("usa") == (0.005, 0.05, 0.5)
    assert study.weight_grid("csa") == tuple(0.1 * f for f in (0.1, 1.0, 10.0))  # the paper's 0.1, as before
    # validation peaks at weight 0.05 for USA; CSA rises with its weight, so its grid grows once past 1
    fetch, asked = _scored_fetch(lambda spec: 100.0 + sum(
        (-abs(weight - 0.05) if name == "usa" else weight) for name, weight, _ in spec.gap_terms))
    outcome = study._stages("pretrained", {"teacher"}, fetch)
    assert [sorted(w for s in asked[2] for n, w, _ in s.gap_terms if n == "usa")] == [[0.005, 0.05, 0.5]]
    assert [w for s in asked[3] for _, w, _ in s.gap_terms] == [10.0]  # CSA's one extension; USA's best is inside
    assert outcome["weights"] == {"csa": 10.0, "usa": 0.05}
    usa, csa = outcome["selection"]["weights"]["usa"], outcome["selection"]["weights"]["csa"]
    assert usa["centre"] == 0.05 and usa["paper"] == 0.5 and "centre" not in csa
    section = {"run_count": 0, "trained_count": 0, "run_seconds": 0.0, "wall_seconds": 0.0, "stopped_after": "weights",
               "selection": outcome["selection"], "methods": {}, "weight_factors": [0.1, 1.0, 10.0]}
    text = render_markdown({"settings": {"seeds": 2, "batch_size": 8}, "data": {}, "wall_seconds": 0.0,
                            "machine": {"cpus": 2, "torch": "x", "load_average_at_write": None},
                            "regimes": {"pretrained": section}})
    assert "- usa (grid around 0.05, `--weight_centres`): 0.005: 100.0, 0.05: 100.0, *0.5*: 99.5 → **0.05**" in text
    assert "- csa: 0.01: 100.0, *0.1*: 100.1, 1: 101.0, 10†: 110.0 → **10** (its baseline: 100.0)" in text
    # a centre for a term no chosen row uses is reported like an unused fixed weight
    unused = MethodStudy(replace(settings, variant_names=("+CSA",), weight_centres={"usa": 0.05, "gst": 0.1}),
                         data_args=None, output_dir=tmp_path)
    assert unused.unused_weight_terms({"teacher"}, "weight_centres") == ["gst", "usa"]
    assert unused.unused_weight_terms({"teacher"}) == []


def test_a_grid_whose_best_value_is_at_an_end_grows_that_way():
    study = MethodStudy(StudySettings(max_grid_extensions=2), data_args=None, output_dir="unused")
    scores = {1e-4: 10.0, 3e-4: 12.0, 9e-4: 14.0, 2.7e-3: 15.0, 8.1e-3: 11.0, 0.5: 1.0, 5.0: 2.0, 50.0: 3.0,
              500.0: 2.5, 2.0: 4.0, 4.0: 5.0, 3.0: 6.0}
    asked = []

    def fetch(specs):
        asked.append([s.learning_rate for s in specs])
        return [{"validation": {"rsum": scores[s.learning_rate]}} for s in specs]

    def spec(group, value):
        return SimpleNamespace(learning_rate=value)

    selected, grids = study._select({"a": (1e-4, 3e-4, 9e-4), "b": (0.5, 5.0), "c": (2.0, 3.0, 4.0)}, spec, fetch)
    # "a": 9e-4 is best at the top end → 2.7e-3 (better, the top again) → 8.1e-3 (worse): 2.7e-3
    # "b": 5.0 is best at the top → 50 (better) → 500 (worse): 50, after the 2 extensions allowed
    # "c": the best (3.0) is inside its grid: nothing added
    assert selected == {"a": 2.7e-3, "b": 50.0, "c": 3.0}
    assert asked == [[1e-4, 3e-4, 9e-4, 0.5, 5.0, 2.0, 3.0, 4.0], [2.7e-3, 50.0], [8.1e-3, 500.0]]
    assert sorted(grids["a"]) == [1e-4, 3e-4, 9e-4, 2.7e-3, 8.1e-3]
    low = study._select({"d": (2.0, 4.0)}, spec, lambda specs: [{"validation": {"rsum": -x.learning_rate}}
                                                               for x in specs])
    assert low[0] == {"d": 0.5}  # best at the bottom: 2 → 1 → 0.5


def _scored_fetch(score):
    asked = []

    def fetch(specs):
        asked.append(list(specs))
        return [{"validation": {"rsum": score(spec)}, "best_epoch": spec.epochs} for spec in specs]

    return fetch, asked


def test_stage_0_selects_each_base_loss_schedule_length_and_every_later_run_uses_it(tmp_path):
    settings = StudySettings(regimes=("pretrained",), seeds=2, max_grid_extensions=1,
                             learning_rates={"pretrained": (1e-4, 3e-4, 9e-4), "scratch": (1e-3,)},
                             epochs={"pretrained": (1, 2, 4), "scratch": (5,)})
    study = MethodStudy(settings, data_args=None, output_dir=tmp_path)
    # InfoNCE is best at 2 epochs (inside the grid); triplet's best, 4, is at the end: 8 is tried and is worse.
    # The learning rate scores peak at 3e-4 (inside its grid): no extension there.
    preferred = {"infonce": 2, "triplet": 4}

    def score(spec):
        return 100.0 - abs(spec.epochs - preferred[spec.base]) - 1e4 * abs(spec.learning_rate - 3e-4)

    fetch, asked = _scored_fetch(score)
    outcome = study._stages("pretrained", {"translation", "teacher"}, fetch)
    assert outcome["epochs"] == {"infonce": 2, "triplet": 4}
    stage_0 = [(s.base, s.epochs, s.learning_rate) for s in asked[0]]
    assert stage_0 == [(b, e, 3e-4) for b in ("infonce", "triplet") for e in (1, 2, 4)]  # at the middle lr
    assert [(s.base, s.epochs) for s in asked[1]] == [("triplet", 8)]
    selection = outcome["selection"]["epochs"]
    assert selection["triplet"]["validation_rsum"] == {"1": 97.0, "2": 98.0, "4": 100.0, "8": 96.0}
    assert selection["triplet"]["selected"] == 4 and selection["infonce"]["grid"] == [1, 2, 4]
    later = [spec for batch in asked[2:] for spec in batch]
    assert later and all(spec.epochs == outcome["epochs"][spec.base] for spec in later)
    assert outcome["learning_rate"] == {"infonce": 3e-4, "triplet": 3e-4}
    assert {spec.seed for spec in later} == {0, 1}  # stage 3 ran


@pytest.mark.parametrize("stop_after,done", [("epochs", 1), ("learning_rate", 2), ("weights", 3)])
def test_stop_after_ends_the_study_after_that_selection(tmp_path, stop_after, done):
    settings = StudySettings(regimes=("pretrained",), max_grid_extensions=0, stop_after=stop_after,
                             coordinate_rounds=1)
    study = MethodStudy(settings, data_args=None, output_dir=tmp_path)
    fetch, asked = _scored_fetch(lambda spec: float(spec.epochs))
    outcome = study._stages("pretrained", {"translation", "teacher"}, fetch)
    assert len(asked) == done and not outcome["runs"]
    assert bool(outcome["learning_rate"]) == (done >= 2) and bool(outcome["weights"]) == (done >= 3)


def _interacting_score(spec):
    """Validation RSUM of a run where the best length depends on the rate: 4 epochs at 1e-4 or below, 8 above; the
    best rate is 3e-4 at any length."""
    best_length = 4 if spec.learning_rate <= 1e-4 else 8
    return 100.0 - abs(math.log2(spec.epochs / best_length)) - 5 * abs(math.log(spec.learning_rate / 3e-4))


def test_length_and_rate_are_searched_again_until_neither_moves(tmp_path):
    settings = StudySettings(regimes=("pretrained",), max_grid_extensions=1,
                             learning_rates={"pretrained": (3e-5, 1e-4, 3e-4), "scratch": (1e-3,)},
                             epochs={"pretrained": (1, 2, 4), "scratch": (5,)})
    study = MethodStudy(settings, data_args=None, output_dir=tmp_path)
    fetch, asked = _scored_fetch(_interacting_score)
    outcome = study._stages("pretrained", {"translation", "teacher"}, fetch)
    # Round 1: 4 epochs at the middle rate (1e-4; 8 was tried and is worse), then 3e-4 at 4 epochs (9e-4 tried).
    # 3e-4 is not the rate the length was chosen at, so round 2 chooses the length again at 3e-4 around 4 (2, 4, 8;
    # 8 is best at the end, so 16 is tried) and, the length having moved to 8, the rate around 3e-4 at 8 epochs: it
    # stays, so (8, 3e-4) is a fixed point and no round 3 is run.
    assert outcome["epochs"] == {"infonce": 8, "triplet": 8}
    assert outcome["learning_rate"] == {"infonce": 3e-4, "triplet": 3e-4}
    batches = [sorted({(s.epochs, s.learning_rate) for s in batch if not s.gap_terms and s.seed == 0})
               for batch in asked[:6]]
    assert batches == [
        [(1, 1e-4), (2, 1e-4), (4, 1e-4)], [(8, 1e-4)],  # round 1, stage 0 and its extension
        [(4, 3e-5), (4, 1e-4), (4, 3e-4)], [(4, 9e-4)],  # round 1, stage 1 and its extension
        [(2, 3e-4), (4, 3e-4), (8, 3e-4)], [(16, 3e-4)],  # round 2, stage 0 at the new rate and its extension
    ]
    assert sorted({(s.epochs, s.learning_rate) for s in asked[6]}) == [(8, 1e-4), (8, 3e-4), (8, 9e-4)]
    later = [spec for batch in asked[7:] for spec in batch]
    assert later and all(spec.epochs == 8 and spec.learning_rate == 3e-4 for spec in later)
    lengths, rates = outcome["selection"]["epochs"]["infonce"], outcome["selection"]["learning_rate"]["infonce"]
    assert [(r["round"], r["learning_rate"], r["grid"], r["selected"]) for r in lengths["rounds"]] == [
        (1, 1e-4, [1, 2, 4], 4), (2, 3e-4, [2, 4, 8], 8)]
    assert lengths["selected"] == 8 and sorted(lengths["validation_rsum"], key=int) == ["2", "4", "8", "16"]
    assert [(r["round"], r["epochs"], r["selected"]) for r in rates["rounds"]] == [(1, 4, 3e-4), (2, 8, 3e-4)]
    assert rates["fixed_point"] is True
    assert outcome["selection"]["weights"]["csa"]["baseline_validation_rsum"] == 100.0

    # One pass (the search before rounds): the length chosen at 1e-4 is kept, and the report says it is no fixed point.
    one_pass = MethodStudy(replace(settings, coordinate_rounds=1), data_args=None, output_dir=tmp_path)
    outcome = one_pass._stages("pretrained", {"translation", "teacher"}, _scored_fetch(_interacting_score)[0])
    assert outcome["epochs"] == {"infonce": 4, "triplet": 4}
    assert outcome["selection"]["learning_rate"]["infonce"]["fixed_point"] is False


def test_the_report_lists_every_round_of_the_search(tmp_path):
    study = MethodStudy(StudySettings(regimes=("pretrained",), max_grid_extensions=1, stop_after="learning_rate",
                                      epochs={"pretrained": (1, 2, 4), "scratch": (5,)}),
                        data_args=None, output_dir=tmp_path)
    outcome = study._stages("pretrained", {"translation", "teacher"}, _scored_fetch(_interacting_score)[0])
    section = {"run_count": 0, "trained_count": 0, "run_seconds": 0.0, "wall_seconds": 0.0, "stopped_after": "learning_rate",
               "selection": outcome["selection"], "methods": {}, "weight_factors": [1.0]}
    results = {"settings": {"seeds": 1, "batch_size": 8}, "data": {}, "wall_seconds": 0.0,
               "machine": {"cpus": 2, "torch": "x", "load_average_at_write": None}, "regimes": {"pretrained": section}}
    text = render_markdown(results)
    # 100 - |log2(length / best length)| - 5 |ln(rate / 3e-4)|, e.g. 4 epochs at 1e-4: 100 - 0 - 5 ln 3 = 94.5
    assert "- infonce (lr 0.0001): 1: 92.5 (1), 2: 93.5 (2), 4: 94.5 (4), 8†: 93.5 (8) → **4 epochs**" in text
    assert ("- infonce, round 2 (lr 0.0003): 2: 98.0 (2), 4: 99.0 (4), 8: 100.0 (8), 16†: 99.0 (16) → **8 epochs**"
            in text)
    assert "- triplet: 3e-05: 88.5, 0.0001: 94.5, 0.0003: 99.0, 0.0009†: 93.5 → **0.0003**" in text
    assert "- triplet, round 2 (8 epochs): 0.0001: 93.5, 0.0003: 100.0, 0.0009: 94.5 → **0.0003**" in text
    assert "still moved" not in text
    one_pass = MethodStudy(replace(study.settings, coordinate_rounds=1), data_args=None, output_dir=tmp_path)
    section["selection"] = one_pass._stages("pretrained", {"translation", "teacher"},
                                            _scored_fetch(_interacting_score)[0])["selection"]
    text = render_markdown(results)
    assert "round 2" not in text and "(infonce: the rate still moved in the last of the rounds allowed" in text


def test_a_whole_number_grid_never_grows_below_one():
    study = MethodStudy(StudySettings(max_grid_extensions=2), data_args=None, output_dir="unused")
    asked = []

    def fetch(specs):
        asked.append([s.epochs for s in specs])
        return [{"validation": {"rsum": -s.epochs}} for s in specs]

    selected, _ = study._select({"a": (1, 2)}, lambda group, e: SimpleNamespace(epochs=e), fetch, whole=True)
    assert selected == {"a": 1} and asked == [[1, 2]]  # 1 × 1/2 rounds to 1: already tried, nothing added
    up, grid = study._select({"a": (3, 5)}, lambda group, e: SimpleNamespace(epochs=e),
                             lambda specs: [{"validation": {"rsum": s.epochs}} for s in specs], whole=True)
    assert up == {"a": 13} and sorted(grid["a"]) == [3, 5, 8, 13]  # 5 × 5/3 = 8.3 → 8, then 8 × 8/5 = 12.8 → 13


@pytest.mark.parametrize(
    "kwargs,match",
    [({"regimes": ("finetune",)}, "regimes"), ({"families": ("CLIP",)}, "families"), ({"seeds": 0}, "seeds"),
     ({"weight_factors": (0.0,)}, "weight_factors"), ({"epochs": {"pretrained": 0, "scratch": 1}}, "epochs"),
     ({"epochs": {"pretrained": (1, 2.5), "scratch": 1}}, "epochs"), ({"stop_after": "test"}, "stop_after"),
     ({"max_grid_extensions": -1}, "max_grid_extensions"), ({"variant_names": ("+CSB",)}, "variant_names"),
     ({"coordinate_rounds": 0}, "coordinate_rounds"), ({"coordinate_rounds": 1.5}, "coordinate_rounds"),
     ({"comparisons": (("+CSA", "+CSA"),)}, r"\(--compare\): \('\+CSA', '\+CSA'\) must name two different rows"),
     ({"families": ("CUSA",), "comparisons": (("+CSA", "+L_intra (sparse)"),)},
      r"\(--compare\): \['\+L_intra \(sparse\)'\] not among the rows this study runs"),
     ({"fixed_weights": {"dias_full": 1.0}}, r"fixed_weights: unknown terms \['dias_full'\]"),
     ({"fixed_weights": {"csa": 0.0}}, "fixed_weights must be positive"),
     ({"weight_centres": {"dias_full": 1.0}}, r"weight_centres: unknown terms \['dias_full'\]"),
     ({"weight_centres": {"csa": -1.0}}, "weight_centres must be positive"),
     ({"fixed_weights": {"csa": 10.0}, "weight_centres": {"csa": 10.0, "usa": 0.05}},
      r"\['csa'\]: a term's weight is either given \(fixed_weights\) or selected on a grid around a centre")],
)
def test_bad_settings_name_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StudySettings(**kwargs)


def test_the_report_says_how_many_runs_this_invocation_trained():
    """A resumed or read-back study's wall time is not its runs' time: the report says which is which."""
    from gapclip.study.report import _invocation

    assert _invocation({"trained_count": 3, "run_count": 5, "wall_seconds": 120.0}) == (
        "3 trained in this invocation, 2.0 min wall; 2 read back")
    assert _invocation({"trained_count": 5, "run_count": 5, "wall_seconds": 90.0}) == (
        "5 trained in this invocation, 1.5 min wall")
    assert _invocation({"trained_count": 0, "run_count": 5, "wall_seconds": 30.0}) == (
        "all read back from earlier invocations: none trained in this one")


def test_own_weights_give_each_fusion_and_distance_a_sweep_of_its_own_over_the_same_runs(tmp_path):
    """By default the max/mean fusions and the KL/L2 distances use the weight selected for concat and InfoNCE; with
    ``own_weights`` each has its own sweep. The term is the same either way, so a run at a given weight is shared."""
    shared = {v.name: v for v in default_variants()}
    own = {v.name: v for v in default_variants(own_weights=True)}
    assert list(own) == list(shared)
    moved = {name: own[name].terms[0].sweep for name in own if own[name] != shared[name]}
    assert moved == {"+LSC (max)": "lsc_max", "+LSC (mean)": "lsc_mean", "+GST (KL)": "gst_kl", "+GST (L2)": "gst_l2"}
    assert sorted(moved.values()) == sorted(OWN_WEIGHT_SWEEPS)
    assert {name: SWEEPS[name].shares for name in OWN_WEIGHT_SWEEPS} == {
        "lsc_max": "lsc", "lsc_mean": "lsc", "gst_kl": "gst", "gst_l2": "gst"}
    assert all(SWEEPS[SWEEPS[name].shares].term == SWEEPS[name].term for name in OWN_WEIGHT_SWEEPS)
    assert not {use.sweep for v in shared.values() for use in v.terms} & set(OWN_WEIGHT_SWEEPS)  # plans unchanged
    weights = dict.fromkeys(SWEEPS, 0.3)
    for name in moved:
        assert own[name].gap_terms(weights) == shared[name].gap_terms(weights)
    assert [t["options"]["distance"] for t in own["+GST (L2)"].gap_terms(weights)] == ["l2"]
    assert [t["options"]["fusion"] for t in own["+LSC (mean)"].gap_terms(weights)] == ["mean"]

    everything = {"translation", "teacher"}
    names = ("+LSC (max)", "+GST (KL)", "LG-MGC (LSC concat + GST InfoNCE)")
    study = MethodStudy(StudySettings(variant_names=names, own_weights=True), data_args=None, output_dir=tmp_path)
    assert study.needed_sweeps(everything) == ["lsc", "lsc_max", "gst", "gst_kl"]
    # its own sweep's run at the selected weight is the row's seed 0, read back rather than trained again
    assert study.is_stage_run(own["+GST (KL)"], 0) and not study.is_stage_run(shared["+GST (KL)"], 0)
    default = MethodStudy(StudySettings(variant_names=names), data_args=None, output_dir=tmp_path)
    assert default.needed_sweeps(everything) == ["lsc", "gst"]


def test_an_own_weight_without_own_weights_is_refused_by_name():
    for option in ("fixed_weights", "weight_centres"):
        with pytest.raises(ValueError, match=r"\['gst_kl'\].*only with own_weights \(--own_weights\)"):
            StudySettings(**{option: {"gst_kl": 0.01}})
        assert getattr(StudySettings(own_weights=True, **{option: {"gst_kl": 0.01}}), option) == {"gst_kl": 0.01}
