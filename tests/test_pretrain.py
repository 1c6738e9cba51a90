"""The offline pretraining corpus and the demo pretraining: separate from the demo set, deterministic, cached, and a
checkpoint that the training recipes fine-tune like any Hub model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from gapclip.data.demo import POSITION_PHRASES, make_demo_dataset
from gapclip.data.pretraining import make_pretraining_corpus

from .test_recipes import assert_report, load_recipe, tiny_flags

TINY_PRETRAIN = {"num_train": 64, "num_val": 16, "width": 32, "layers": 1, "epochs": 1.0, "batch_size": 16,
                 "image_size": 32}


def _digests(folder: Path) -> set[str]:
    return {hashlib.sha1(p.read_bytes()).hexdigest() for p in (folder / "images").glob("*.png")}


def test_corpus_is_deterministic_cached_and_disjoint_from_the_demo_set(tmp_path):
    a = make_pretraining_corpus(tmp_path / "a", num_train=40, num_val=8, image_size=32, seed=0)
    b = make_pretraining_corpus(tmp_path / "b", num_train=40, num_val=8, image_size=32, seed=0)
    assert (a / "dataset_pretrain.json").read_bytes() == (b / "dataset_pretrain.json").read_bytes()
    assert _digests(a) == _digests(b) and len(_digests(a)) == 48
    stamp = (a / "meta.json").stat().st_mtime_ns
    assert make_pretraining_corpus(a, num_train=40, num_val=8, image_size=32, seed=0) == a
    assert (a / "meta.json").stat().st_mtime_ns == stamp  # reused, not regenerated
    demo = make_demo_dataset(tmp_path / "demo", num_train=40, num_val=8, num_test=8, image_size=32, seed=0)
    assert not _digests(a) & _digests(demo)  # no image in common with the fine-tuning data
    with pytest.raises(ValueError, match="does not hold a pretraining corpus"):
        make_pretraining_corpus(a, num_train=41, num_val=8, image_size=32, seed=0)
    with pytest.raises(ValueError, match="num_train must be an int >= 1"):
        make_pretraining_corpus(tmp_path / "c", num_train=0)


def test_corpus_captions_are_in_their_own_style(tmp_path):
    root = make_pretraining_corpus(tmp_path / "p", num_train=200, num_val=8, image_size=32, seed=0)
    entries = json.loads((root / "dataset_pretrain.json").read_text())["images"]
    assert {e["split"] for e in entries} == {"train", "val"}
    captions = [s["raw"] for e in entries for s in e["sentences"]]
    assert all(len(e["sentences"]) == 2 and len({s["raw"] for s in e["sentences"]}) == 2 for e in entries)
    # none of the demo's phrasings of positions and sizes, and phrasings of its own
    demo_phrases = [*POSITION_PHRASES.values(), "large", "small", "background including", "is bigger than"]
    assert not any(phrase in caption for caption in captions for phrase in demo_phrases)
    assert any("corner" in c for c in captions) and any("tiny" in c or "big" in c for c in captions)
    counts = {len(e["objects"]) for e in entries}
    assert counts == {1, 2, 3, 4}


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory):
    from gapclip.pretrain import PretrainSettings, pretrain_demo_backbone

    root = tmp_path_factory.mktemp("pretrained")
    return pretrain_demo_backbone(PretrainSettings(**TINY_PRETRAIN), root=root, show_progress=False)


def test_pretrained_clip_uses_the_wordpiece_tokenizer_and_is_reused(tiny_pretrained, caplog):
    from transformers import AutoModel, AutoProcessor, CLIPModel

    from gapclip.pretrain import PretrainSettings, pretrain_demo_backbone

    model = AutoModel.from_pretrained(tiny_pretrained)
    assert isinstance(model, CLIPModel) and model.config.text_config.vocab_size == 30522
    processor = AutoProcessor.from_pretrained(tiny_pretrained)
    ids = processor.tokenizer("a zebra next to a lighthouse")["input_ids"]
    assert processor.tokenizer.unk_token_id not in ids  # any English caption, not only the demo words
    assert model.config.text_config.eos_token_id == processor.tokenizer.sep_token_id
    report = json.loads((tiny_pretrained.parents[1] / "pretrain.json").read_text())
    assert report["settings"]["epochs"] == 1.0 and "rsum" in report["held_out"]
    stamp = (tiny_pretrained / "model.safetensors").stat().st_mtime_ns
    again = pretrain_demo_backbone(PretrainSettings(**TINY_PRETRAIN), root=tiny_pretrained.parents[2])
    assert again == tiny_pretrained and (tiny_pretrained / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_pretraining_killed_after_its_training_is_reported_not_retrained(tiny_pretrained):
    """Killed after the training run finished but before pretrain.json: the run record marks the training finished,
    so the rerun trains nothing, overwrites nothing, and the report has the recorded results."""
    from gapclip.pretrain import REPORT_NAME, PretrainSettings, pretrain_demo_backbone

    report_file = tiny_pretrained.parents[1] / REPORT_NAME
    report = json.loads(report_file.read_text())
    assert report["train"]["train_loss"] > 0
    stamp = (tiny_pretrained / "model.safetensors").stat().st_mtime_ns
    report_file.unlink()
    again = pretrain_demo_backbone(PretrainSettings(**TINY_PRETRAIN), root=tiny_pretrained.parents[2],
                                   show_progress=False)
    assert again == tiny_pretrained and (tiny_pretrained / "model.safetensors").stat().st_mtime_ns == stamp
    redone = json.loads(report_file.read_text())
    assert redone["train"] == report["train"] and redone["held_out"] == report["held_out"]


def test_the_key_changes_with_every_setting():
    from gapclip.pretrain import PretrainSettings

    base = PretrainSettings(**TINY_PRETRAIN)
    assert base.key == PretrainSettings(**TINY_PRETRAIN).key
    for change in ({"seed": 1}, {"epochs": 2.0}, {"corpus_seed": 3}, {"backbone": "vtde"}, {"learning_rate": 1e-3}):
        assert PretrainSettings(**{**TINY_PRETRAIN, **change}).key != base.key
    with pytest.raises(ValueError, match="backbone must be one of"):
        PretrainSettings(backbone="siglip")


def test_the_training_recipe_fine_tunes_the_pretrained_checkpoint(tiny_pretrained, tiny_demo_root, tmp_path):
    lgmgc = load_recipe("train_clip_lgmgc")
    result = lgmgc.main(tiny_flags(tmp_path / "out", "--model_name_or_path", str(tiny_pretrained), "--max_steps", "2"))
    rows = assert_report(tmp_path / "out")
    assert result["trainer"].model.config.backbone_config.text_config.vocab_size == 30522
    assert rows["before training"]["rsum"] > 0


@pytest.mark.slow
def test_pretrain_recipe_prints_the_zero_shot_table(tmp_path, capsys, tiny_demo_root):
    from .conftest import DEMO_SIZES

    module = load_recipe("pretrain_demo")
    flags = [f"--{k}={v}" for k, v in TINY_PRETRAIN.items()] + [
        "--output_root", str(tmp_path), "--demo_train", str(DEMO_SIZES["num_train"]),
        "--demo_val", str(DEMO_SIZES["num_val"]), "--demo_test", str(DEMO_SIZES["num_test"]),
    ]
    results = module.main(flags)
    printed = capsys.readouterr().out
    assert "Zero-shot retrieval on the fine-tuning data (demo/test)" in printed and "--model_name_or_path" in printed
    (name, metrics), = results.items()
    assert name == "pretrained clip, zero-shot" and 0 <= metrics["modality_gap"] <= 2
    assert Path(metrics["path"], "config.json").is_file()
