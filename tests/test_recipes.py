"""The recipes end to end with a tiny budget: before/after retrieval report, YAML configs, data sources, bad input.

Every run uses the session's demo set (same sizes as ``tests/conftest.DEMO_SIZES``, found through ``$GAPCLIP_CACHE``)
and a 1-layer, 32-wide CLIP trained from scratch for a few steps.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import BertModel, CLIPModel

from gapclip.cli import scratch_clip_config
from gapclip.losses import TERM_REGISTRY
from gapclip.testing import tiny_bert_config

from .conftest import DEMO_SIZES

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"_gapclip_recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def tiny_flags(output_dir: Path, *extra: str, terms: bool = False) -> list[str]:
    flags = [
        "--dataset", "demo", "--demo_train", str(DEMO_SIZES["num_train"]), "--demo_val", str(DEMO_SIZES["num_val"]),
        "--demo_test", str(DEMO_SIZES["num_test"]), "--demo_image_size", str(DEMO_SIZES["image_size"]),
        "--scratch_width", "32", "--scratch_layers", "1", "--max_steps", "4", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "16", "--output_dir", str(output_dir), "--eval_strategy", "no",
        "--save_strategy", "no", "--load_best_model_at_end", "false", "--report_to", "none", "--disable_tqdm", "true",
        "--logging_steps", "2", "--dataloader_pin_memory", "false",
    ]
    if not terms:
        flags += ["--no_lsc", "--no_gst"]
    return [*flags, *extra]


def assert_report(output_dir: Path) -> dict:
    rows = json.loads((output_dir / "retrieval.json").read_text())
    assert list(rows) == ["before training", "after training"]
    for metrics in rows.values():
        assert {"i2t_r1", "t2i_r10", "rsum", "modality_gap", "loss_base"} <= set(metrics)
    table = (output_dir / "retrieval.md").read_text()
    assert re.search(r"^\| before training +\|", table, re.M) and re.search(r"^\| after training +\|", table, re.M)
    assert "RSUM" in table
    assert (output_dir / "model.safetensors").is_file()
    return rows


@pytest.fixture(scope="module")
def lgmgc():
    return load_recipe("train_clip_lgmgc")


@pytest.fixture(scope="module")
def saved_clip(tiny_demo_processor, tmp_path_factory) -> Path:
    """A tiny CLIPModel + the demo processor saved as a plain backbone folder."""
    folder = tmp_path_factory.mktemp("clip_backbone")
    torch.manual_seed(0)
    CLIPModel(scratch_clip_config(tiny_demo_processor, 32, 32, 1)).save_pretrained(folder)
    tiny_demo_processor.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------- happy paths
@pytest.mark.parametrize("terms", [False, True], ids=["base_only", "lgmgc_default"])
def test_train_recipe_writes_before_and_after_rows(lgmgc, tiny_demo_root, tmp_path, capsys, terms):
    if terms and not {"lsc", "gst"} <= set(TERM_REGISTRY):
        pytest.skip("LG-MGC terms 'lsc'/'gst' are not registered yet")
    result = lgmgc.main(tiny_flags(tmp_path / "out", terms=terms))
    rows = assert_report(tmp_path / "out")
    assert result["rows"] == rows
    assert result["trainer"].state.global_step == 4
    expected_terms = ["lsc", "gst"] if terms else []
    assert [spec["name"] for spec in result["trainer"].model.config.gap_terms] == expected_terms
    for name in expected_terms:
        assert f"loss_{name}" in rows["after training"]
    assert re.search(r"^\| after training +\|", capsys.readouterr().out, re.M)


def test_train_recipe_streams_the_training_split(lgmgc, tiny_demo_root, tmp_path):
    result = lgmgc.main(tiny_flags(tmp_path / "out", "--streaming", "--max_steps", "3"))
    assert_report(tmp_path / "out")
    assert result["trainer"].state.global_step == 3
    assert type(result["trainer"].train_dataset).__name__ == "IterableCaptionPairs"


def test_streaming_needs_max_steps(lgmgc, tiny_demo_root, tmp_path):
    flags = [f for f in tiny_flags(tmp_path / "out", "--streaming") if f not in ("--max_steps", "4")]
    with pytest.raises(ValueError, match="--streaming needs --max_steps"):
        lgmgc.main([*flags, "--num_train_epochs", "1"])


def test_train_recipe_reads_a_yaml_config(lgmgc, tiny_demo_root, tmp_path):
    flags = tiny_flags(tmp_path / "out", "--base_loss", "triplet", "--max_steps", "2")
    config: dict = {}
    for index, flag in enumerate(flags):
        if not flag.startswith("--"):
            continue
        value = flags[index + 1] if index + 1 < len(flags) and not flags[index + 1].startswith("--") else None
        name = flag[2:]
        if name in ("no_lsc", "no_gst"):
            config[name[3:]] = False
        else:
            config[name] = {"false": False, "true": True}.get(value, value)
    for name in ("demo_train", "demo_val", "demo_test", "demo_image_size", "scratch_width", "scratch_layers",
                 "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size", "logging_steps"):
        config[name] = int(config[name])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = lgmgc.main([str(path)])
    assert_report(tmp_path / "out")
    assert result["trainer"].model.config.base_loss == "triplet"
    assert result["trainer"].state.global_step == 2


def test_train_recipe_on_a_save_to_disk_dataset(lgmgc, tiny_demo_datasets, saved_clip, tmp_path):
    tiny_demo_datasets.save_to_disk(str(tmp_path / "hub"))
    flags = [
        "--dataset", "hub", "--dataset_name", str(tmp_path / "hub"), "--caption_column", "captions",
        "--id_column", "image_id", "--model_name_or_path", str(saved_clip), "--max_steps", "2",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--output_dir",
        str(tmp_path / "out"), "--no_lsc", "--no_gst", "--eval_strategy", "no", "--save_strategy", "no",
        "--load_best_model_at_end", "false", "--report_to", "none", "--disable_tqdm", "true",
    ]
    result = lgmgc.main(flags)
    assert_report(tmp_path / "out")
    assert result["trainer"].model.config.backbone_config.model_type == "clip"


# ---------------------------------------------------------------------------------------------------- bad input
def test_a_bert_checkpoint_is_not_a_dual_encoder(lgmgc, tiny_demo_root, tmp_path):
    BertModel(tiny_bert_config()).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="not a supported image-text dual encoder") as info:
        lgmgc.main(tiny_flags(tmp_path / "out", "--model_name_or_path", str(tmp_path / "bert")))
    assert "'bert'" in str(info.value) and "--model_name_or_path" in str(info.value)


def test_batch_size_one_is_a_clear_error(lgmgc, tiny_demo_root, tmp_path):
    with pytest.raises(ValueError, match="at least 2 pairs per global batch.*per_device_train_batch_size=1"):
        lgmgc.main(tiny_flags(tmp_path / "out", "--per_device_train_batch_size", "1"))


def test_karpathy_needs_its_json(lgmgc, tmp_path):
    with pytest.raises(ValueError, match="--dataset karpathy needs --karpathy_json FILE and --image_root FOLDER"):
        lgmgc.main(["--dataset", "karpathy", "--output_dir", str(tmp_path / "out")])


def test_karpathy_missing_image_names_the_file(lgmgc, saved_clip, tmp_path):
    (tmp_path / "images").mkdir()
    entries = [
        {"filename": f"img{i}.png", "imgid": i, "split": split, "sentences": [{"raw": "a red circle"}]}
        for i, split in enumerate(["train", "val", "test"])
    ]
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": entries}))
    flags = [
        "--dataset", "karpathy", "--karpathy_json", str(tmp_path / "karpathy.json"), "--image_root",
        str(tmp_path / "images"), "--model_name_or_path", str(saved_clip), "--output_dir", str(tmp_path / "out"),
        "--no_lsc", "--no_gst", "--report_to", "none",
    ]
    with pytest.raises(FileNotFoundError, match="img0.png"):
        lgmgc.main(flags)


def test_unknown_dataset_source_lists_the_valid_ones(lgmgc, tmp_path):
    with pytest.raises(ValueError, match=r"--dataset must be one of \['demo', 'karpathy', 'hub', 'csv', 'jsonl'\]"):
        lgmgc.main(["--dataset", "coco", "--output_dir", str(tmp_path / "out")])


# ---------------------------------------------------------------------------------------------------- evaluation recipe
def test_evaluate_recipe_prints_a_table_and_writes_json(saved_clip, tiny_demo_root, tmp_path, capsys):
    if not (RECIPES / "evaluate_retrieval.py").is_file():
        pytest.skip("recipes/evaluate_retrieval.py is not written yet")
    if importlib.util.find_spec("gapclip.evaluate_cli") is None:
        pytest.skip("recipes/evaluate_retrieval.py needs gapclip.evaluate_cli, which is not written yet")
    module = load_recipe("evaluate_retrieval")
    out_json = tmp_path / "test.json"
    module.main([
        "--model_name_or_path", str(saved_clip), "--dataset", "demo", "--demo_train", str(DEMO_SIZES["num_train"]),
        "--demo_val", str(DEMO_SIZES["num_val"]), "--demo_test", str(DEMO_SIZES["num_test"]), "--demo_image_size",
        str(DEMO_SIZES["image_size"]), "--output_json", str(out_json),
    ])
    printed = capsys.readouterr().out
    assert "| i2t R@1 |" in printed or "i2t R@1" in printed
    assert printed.count("|") > 10
    metrics = json.loads(out_json.read_text())
    assert "rsum" in json.dumps(metrics)


def test_recipes_parse_from_the_command_line(lgmgc, monkeypatch, tmp_path):
    """`main()` without argv reads sys.argv (as under accelerate launch); a bad flag value stops the parse."""
    monkeypatch.setattr(sys, "argv", ["train_clip_lgmgc.py", "--base_loss", "hinge", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--base_loss must be auto, infonce, sigmoid or triplet, got 'hinge'"):
        lgmgc.main()


def test_cusa_recipe_precomputes_once_then_reuses_the_file(tiny_demo_root, tmp_path, caplog):
    cusa = load_recipe("train_clip_cusa")
    teachers = tmp_path / "teachers"
    flags = tiny_flags(tmp_path / "out", "--max_steps", "2", "--skip_initial_eval", "true",
                       "--teachers", str(teachers), "--teacher_batch_size", "32", terms=True)  # no LG-MGC flags
    result = cusa.main(flags)
    file = teachers / "teachers.safetensors"
    assert file.is_file() and result["trainer"].state.global_step == 2
    assert [s["name"] for s in result["trainer"].model.config.gap_terms] == ["csa", "usa"]
    assert {"loss_csa", "loss_usa"} <= set(result["rows"]["after training"])
    stamp = file.stat().st_mtime_ns
    with caplog.at_level("WARNING"):
        cusa.main([*flags, "--output_dir", str(tmp_path / "out2"), "--text_teacher", "some/other-teacher"])
    assert file.stat().st_mtime_ns == stamp  # reused, not recomputed (the other teacher is not even loadable here)
    assert any("computed with teachers" in r.getMessage() and "some/other-teacher" in r.getMessage()
               for r in caplog.records)


def test_dias_recipe_sums_the_triplet_loss_unless_told_otherwise(monkeypatch):
    """DIAS's ω are set against the VSE++/SCAN hinge loss summed over the batch: the recipe uses that scale."""
    monkeypatch.syspath_prepend(str(RECIPES))
    dias = load_recipe("train_clip_dias")
    from gapclip.cli import ModelArguments

    args = ModelArguments()
    dias.use_paper_base_loss(args)
    assert (args.base_loss, args.triplet_mining, args.triplet_reduction) == ("triplet", "distance_weighted", "sum")
    args = ModelArguments(triplet_reduction="mean")
    dias.use_paper_base_loss(args)
    assert args.triplet_reduction == "mean"
    with pytest.raises(ValueError, match="--triplet_reduction must be mean or sum, got 'max'"):
        ModelArguments(triplet_reduction="max")


def test_from_scratch_on_karpathy_data_builds_a_word_level_tokenizer(lgmgc, tiny_demo_root, tmp_path):
    """Training from scratch is not limited to the demo data: any dataset gets a tokenizer of its training captions."""
    flags = [f for f in tiny_flags(tmp_path / "out", "--max_steps", "2") if f not in ("--dataset", "demo")]
    flags += ["--dataset", "karpathy", "--karpathy_json", str(tiny_demo_root / "dataset_demo.json"),
              "--image_root", str(tiny_demo_root / "images"), "--scratch_image_size", "32"]
    result = lgmgc.main(flags)
    assert_report(tmp_path / "out")
    from gapclip.data.tokenization import caption_vocabulary

    entries = json.loads((tiny_demo_root / "dataset_demo.json").read_text())["images"]
    train_captions = [s["raw"] for e in entries if e["split"] == "train" for s in e["sentences"]]
    vocab = result["trainer"].processing_class.tokenizer.get_vocab()
    assert sorted(set(vocab) - {"[PAD]", "[UNK]", "[SOS]", "[EOS]"}) == caption_vocabulary(train_captions)
    assert result["trainer"].model.config.backbone_config.vision_config.image_size == 32
    assert (tmp_path / "out" / "tokenizer.json").is_file()  # the processor travels with the model


# ---------------------------------------------------------------------------------------------------- term options
def test_recipe_option_flags_take_defaults_and_choices_from_the_terms(monkeypatch, capsys):
    """No recipe restates a term's defaults: the method dataclasses' defaults build exactly the terms' defaults."""
    monkeypatch.syspath_prepend(str(RECIPES))
    lgmgc = load_recipe("train_clip_lgmgc").LGMGCArguments()
    dias = load_recipe("train_clip_dias").DIASArguments()
    cusa = load_recipe("train_clip_cusa").CUSAArguments()
    for terms in (lgmgc.gap_terms(), dias.gap_terms(), cusa.gap_terms()):
        for spec in terms:
            defaults = TERM_REGISTRY[spec["name"]].default_options
            assert {key: defaults[key] for key in spec.get("options", {})} == spec.get("options", {}), spec
    assert (lgmgc.lsc_k, lgmgc.gst_distance) == (4, "infonce")  # LSC's and GST's own defaults
    from gapclip.cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(type(lgmgc), ["--lsc_fusion", "sum"])
    error = capsys.readouterr().err.replace("'", "")
    assert "--lsc_fusion" in error and "invalid choice: sum (choose from concat, max, mean)" in error
    with pytest.raises(SystemExit):
        parse_args(type(dias), ["--selection", "literal"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        parse_args(type(lgmgc), ["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--lsc_fusion {concat,max,mean}" in help_text
    expected = "local tokens selected per image and per caption (>= 1) (gap term 'lsc', option 'k'). (default: 4)"
    assert expected in help_text.lower()


def test_term_option_field_names_an_unknown_option():
    from gapclip.cli import term_option_field

    with pytest.raises(ValueError, match="gap term 'lsc' has no option 'K'"):
        term_option_field("lsc", "K")


# ---------------------------------------------------------------------------------------------------- what a run says
def test_every_training_run_ends_with_where_things_went(lgmgc, tiny_demo_root, tmp_path, capsys):
    out = (tmp_path / "out").resolve()
    lgmgc.main(tiny_flags(out, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"))
    printed = capsys.readouterr().out
    summary = printed[printed.index(f"Run finished: {out}"):]
    for line in (f"model:       {out} (gapclip checkpoint", f"export:      {out / 'export'} (plain CLIPModel",
                 f"tables:      {out / 'retrieval.md'}, {out / 'retrieval.json'}",
                 f"checkpoints: 1 in {out} (last: checkpoint-2)", "LoRA:        off",
                 f"run record:  {out / 'gapclip_run.json'}"):
        assert line in summary, summary
    assert (out / "export" / "model.safetensors").is_file() and (out / "retrieval.md").is_file()

    lgmgc.main(tiny_flags(tmp_path / "lora", "--max_steps", "2", "--lora_r", "4", "--lora_alpha", "8"))
    assert "LoRA:        on (r=4, alpha=8.0, dropout=0.0); adapters kept in the checkpoint, merged in the export" in (
        capsys.readouterr().out)
    lgmgc.main(tiny_flags(tmp_path / "merged", "--max_steps", "2", "--lora_r", "4", "--merge_lora"))
    assert "; merged into the saved weights" in capsys.readouterr().out


def _eval_flags(saved_clip, out_json) -> dict:
    return {
        "model_name_or_path": str(saved_clip), "dataset": "demo", "demo_train": DEMO_SIZES["num_train"],
        "demo_val": DEMO_SIZES["num_val"], "demo_test": DEMO_SIZES["num_test"],
        "demo_image_size": DEMO_SIZES["image_size"], "output_json": str(out_json),
    }


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_evaluate_recipe_reads_a_config_file_from_the_shell(saved_clip, tiny_demo_root, tmp_path, monkeypatch,
                                                            suffix):
    module = load_recipe("evaluate_retrieval")
    config = tmp_path / f"eval{suffix}"
    values = _eval_flags(saved_clip, tmp_path / "test.json")
    config.write_text(yaml.safe_dump(values) if suffix == ".yaml" else json.dumps(values))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["evaluate_retrieval.py", config.name])  # as typed in a shell
    metrics = module.main()
    assert "rsum" in metrics and json.loads((tmp_path / "test.json").read_text())


def test_evaluate_recipe_plots_need_matplotlib_before_any_work(saved_clip, tmp_path, monkeypatch):
    import gapclip.evaluate_cli as evaluate_cli

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the [plots] extra were not installed
    monkeypatch.setattr(evaluate_cli, "load_datasets", lambda *a, **k: pytest.fail("data loaded before the check"))
    with pytest.raises(ImportError) as info:
        evaluate_cli.main(["--model_name_or_path", str(saved_clip), "--plots", "--output_json",
                           str(tmp_path / "t.json")])
    assert str(info.value).startswith("--plots needs matplotlib") and "'gapclip[plots]'" in str(info.value)
    readme = (RECIPES.parent / "README.md").read_text()
    plot_command = readme[readme.index("`--plots` on the evaluation recipe"):][:600]
    assert 'pip install -e ".[plots]"' in plot_command


def test_evaluate_recipe_says_where_the_metrics_and_plots_are(saved_clip, tiny_demo_root, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    module = load_recipe("evaluate_retrieval")
    out_json = tmp_path / "eval" / "test.json"
    flags = [f"--{key}={value}" for key, value in _eval_flags(saved_clip, out_json).items()]
    module.main([*flags, "--plots"])
    printed = capsys.readouterr().out
    summary = printed[printed.index("Evaluation finished:"):]
    assert f"metrics: {out_json.resolve()}" in summary
    plots = [out_json.parent.resolve() / name for name in ("similarity_map.png", "modality_gap.png")]
    assert f"plots:   {plots[0]}, {plots[1]}" in summary and all(path.is_file() for path in plots)
