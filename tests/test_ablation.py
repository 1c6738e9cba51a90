"""The three ablation runners end to end on a tiny budget: every row trains, is evaluated and lands in the table."""

from __future__ import annotations

import json

import pytest

from .test_recipes import RECIPES, load_recipe, tiny_flags

EXPECTED_ROWS = {
    "ablate_lgmgc": [
        "Baseline", "+LSC_max", "+LSC_mean", "+LSC_concat", "+GST_kl", "+GST_l2", "+GST_infonce",
        "LG-MGC (LSC_concat + GST_infonce)",
    ],
    "ablate_dias": [
        "Triplet baseline", "+L_dim", "+L_inter", "+L_intra", "DIAS, dense constraints", "DIAS, random batches",
        "DIAS (full)",
    ],
    "ablate_cusa": ["Baseline", "+CSA", "+USA", "+CUSA"],
}
METHOD_FLAGS = {
    "ablate_lgmgc": [],
    "ablate_dias": ["--images_per_cluster", "4"],
    "ablate_cusa": [],
}


@pytest.mark.slow
@pytest.mark.parametrize("runner", sorted(EXPECTED_ROWS))
def test_ablation_runner_end_to_end(runner, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(RECIPES))  # the runners import their sibling training recipe
    flags = [flag for flag in tiny_flags(tmp_path / "out", "--max_steps", "2") if flag not in ("--no_lsc", "--no_gst")]
    rows = load_recipe(runner).main([*flags, *METHOD_FLAGS[runner]])
    assert list(rows) == EXPECTED_ROWS[runner]
    for metrics in rows.values():
        assert 0.0 <= metrics["rsum"] <= 600.0 and 0.0 <= metrics["modality_gap"] <= 2.0
    saved = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert list(saved) == EXPECTED_ROWS[runner]
    table = (tmp_path / "out" / "ablation.md").read_text()
    assert all(f"| {name}" in table for name in EXPECTED_ROWS[runner])


def test_a_rerun_reuses_the_finished_variants(tiny_demo_root, tmp_path, capsys):
    """Each variant has its own output folder: running the ablation again trains nothing and gives the same table."""
    from gapclip.ablation import Variant, run_ablation
    from gapclip.cli import parse_args

    from .reliability.conftest import NoMethodArguments

    model_args, data_args, _, lora_args, training_args = parse_args(
        NoMethodArguments, tiny_flags(tmp_path / "out", "--max_steps", "2", terms=True))
    variants = [Variant("Baseline"), Variant("+LSC", [{"name": "lsc", "weight": 1.0}])]
    first = run_ablation(variants, model_args, data_args, training_args, title="t", lora_args=lora_args)
    assert "Ablation finished" in capsys.readouterr().out
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("model.safetensors")}
    again = run_ablation(variants, model_args, data_args, training_args, title="t", lora_args=lora_args)
    assert again == first
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("model.safetensors")} == stamps
    assert capsys.readouterr().out.count("already holds a finished run of this configuration") == 2
