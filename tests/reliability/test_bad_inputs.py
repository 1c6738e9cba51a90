"""The bad-input matrix: each row raises a clear error (type + the culprit named) or just works.

Rows already covered elsewhere are not repeated here (see the README's Troubleshooting table): corrupt image and
the skip mode (``tests/data/test_pairs_collator.py``), greyscale/RGBA/palette images
(``test_non_rgb_images_are_converted``), over-long captions (``test_collator_truncates_and_warns_once``), missing
image files, empty captions and duplicate ids in each loader (``tests/data/test_loaders.py``), teacher coverage
(``tests/test_teachers.py``), GST missing translations (``tests/losses/test_lgmgc.py``), batch of one
(``tests/test_recipes.py``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from PIL import Image as PILImage

from gapclip import GapClipConfig, GapClipModel
from gapclip.cli import parse_args
from gapclip.data import CAPTION_FEATURES, CaptionPairs, GapClipCollator, IterableCaptionPairs
from gapclip.data.kmeans_sampler import KMeansBatchSampler
from gapclip.testing import tiny_clip_config

from ..conftest import clip_text_batch, pixel_batch
from ..test_recipes import load_recipe, saved_clip, tiny_flags  # noqa: F401  (saved_clip is a fixture)
from . import save_with_bad_training_images
from .conftest import NoMethodArguments, run


@pytest.fixture(scope="module")
def lgmgc():
    return load_recipe("train_clip_lgmgc")


def split_with(tmp_path, images: dict[int, bytes | str], n: int = 4, captions=None) -> Dataset:
    """n images; ``images`` maps a row to raw file bytes or to a PIL mode ("L", "RGBA") to write instead of RGB."""
    paths = []
    for i in range(n):
        path = tmp_path / f"{i}.png"
        value = images.get(i, "RGB")
        if isinstance(value, bytes):
            path.write_bytes(value)
        elif value != "missing":
            PILImage.new(value, (16, 16)).save(path)
        paths.append(str(path))
    return Dataset.from_dict(
        {"image_id": [f"id{i}" for i in range(n)], "image": paths,
         "captions": captions or [[f"caption {i}"] for i in range(n)]},
        features=CAPTION_FEATURES,
    )


# ------------------------------------------------------------------------------------------------------ images
def test_zero_size_image_names_id_and_path(tmp_path):
    pairs = CaptionPairs(split_with(tmp_path, {2: b""}))
    with pytest.raises(ValueError) as info:
        pairs[2]
    assert "id2" in str(info.value) and str(tmp_path / "2.png") in str(info.value)


def test_image_deleted_after_loading_names_id_and_path(tmp_path):
    pairs = CaptionPairs(split_with(tmp_path, {1: "missing"}))
    with pytest.raises(ValueError) as info:
        pairs[1]
    assert "id1" in str(info.value) and str(tmp_path / "1.png") in str(info.value)


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_greyscale_and_rgba_images_just_work_end_to_end(tmp_path, mode, tiny_demo_processor):
    pairs = CaptionPairs(split_with(tmp_path, {0: mode, 1: mode}))
    batch = GapClipCollator(tiny_demo_processor)([pairs[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and torch.isfinite(batch["pixel_values"]).all()


def test_skip_mode_counts_and_stops_past_the_fraction_in_a_run(tiny_demo_datasets, saved_clip, tmp_path, caplog):
    """`--on_bad_image skip` end to end: a warning with the running count, then an error past the fraction."""
    bad_rows = {3, 9}
    bad_ids = [tiny_demo_datasets["train"]["image_id"][i] for i in sorted(bad_rows)]
    save_with_bad_training_images(tiny_demo_datasets, tmp_path / "hub", bad_rows)
    flags = [
        "--dataset", "hub", "--dataset_name", str(tmp_path / "hub"), "--caption_column", "captions",
        "--id_column", "image_id", "--model_name_or_path", str(saved_clip), "--max_steps", "4",
        "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "out"), "--eval_strategy", "no",
        "--save_strategy", "no", "--load_best_model_at_end", "false", "--report_to", "none",
        "--disable_tqdm", "true", "--skip_initial_eval", "true", "--on_bad_image", "skip",
        "--max_bad_image_fraction", "0.1",
    ]
    with caplog.at_level(logging.WARNING, logger="gapclip.data.pairs"), pytest.raises(ValueError) as info:
        run(flags, [])
    warned = [r.getMessage() for r in caplog.records if "Skipping unreadable image" in r.getMessage()]
    assert len(warned) == 2 and "(1 bad so far)" in warned[0] and "(2 bad so far)" in warned[1]
    assert bad_ids[0] in warned[0] and bad_ids[1] in warned[1]
    message = str(info.value)
    assert "2 of 16 images are unreadable" in message and "max_bad_image_fraction" in message
    assert any(image_id in message for image_id in bad_ids)


# ------------------------------------------------------------------------------------------------------ captions
def test_whitespace_only_captions_are_a_clear_error(tmp_path):
    """A caption dataset built by hand (no loader cleaning) with only empty/whitespace captions for one image."""
    split = split_with(tmp_path, {}, n=3, captions=[["a red circle"], ["", "   "], ["a square"]])
    with pytest.raises(ValueError) as info:
        CaptionPairs(split)
    assert "id1" in str(info.value)
    with pytest.raises(ValueError) as info:  # the streaming twin finds it when it reaches the row
        list(IterableCaptionPairs(split.to_iterable_dataset()))
    assert "id1" in str(info.value) and "row 1" in str(info.value)


# ------------------------------------------------------------------------------------------------------ resume
def test_resume_with_other_gap_terms_names_both(tiny_demo_root, tmp_path):
    lsc = [{"name": "lsc", "weight": 1.0}]
    flags = tiny_flags(tmp_path / "out", "--max_steps", "1", "--save_strategy", "steps", "--save_steps", "1",
                       "--skip_initial_eval", "true", terms=True)
    run(flags, lsc)
    with pytest.raises(ValueError) as info:  # same output_dir: auto-resume from checkpoint-1 with another objective
        run([*flags, "--max_steps", "2"], [{"name": "dias_dim", "weight": 1.0}])
    message = str(info.value)
    assert "checkpoint-1" in message and "'lsc'" in message and "'dias_dim'" in message
    assert "fresh --output_dir" in message


def test_resume_with_the_same_terms_in_another_order_of_keys_is_fine(tiny_demo_root, tmp_path):
    flags = tiny_flags(tmp_path / "out", "--max_steps", "1", "--save_strategy", "steps", "--save_steps", "1",
                       "--skip_initial_eval", "true", terms=True)
    run(flags, [{"name": "lsc", "weight": 1.0}])
    result = run([*flags, "--max_steps", "2"], [{"weight": 1, "name": "lsc", "options": {}}])
    assert result["trainer"].state.global_step == 2


# ------------------------------------------------------------------------------------------------------ K-means
def test_kmeans_batch_not_divisible_by_processes():
    with pytest.raises(ValueError) as info:
        KMeansBatchSampler(torch.randn(12, 4), clusters_per_batch=3, images_per_cluster=1, num_replicas=2)
    assert "= 3 must be divisible by num_replicas=2" in str(info.value)


def test_dias_global_batch_not_a_multiple_of_images_per_cluster(tiny_demo_root, tmp_path):
    dias = load_recipe("train_clip_dias")
    with pytest.raises(ValueError) as info:
        dias.main(tiny_flags(tmp_path / "out", "--per_device_train_batch_size", "6", "--images_per_cluster", "4",
                             terms=True))
    assert "global batch (6)" in str(info.value) and "--images_per_cluster (4)" in str(info.value)


# ------------------------------------------------------------------------------------------------------ backbone
class _NoTokens(torch.nn.Module):
    """A vision tower that returns a pooled vector and a CNN-style feature map, no token sequence."""

    def __init__(self, tower):
        super().__init__()
        self.tower = tower

    def forward(self, pixel_values, return_dict=True):
        outputs = self.tower(pixel_values=pixel_values, return_dict=True)
        batch = pixel_values.shape[0]
        outputs.last_hidden_state = outputs.last_hidden_state[:, 1:].transpose(1, 2).reshape(batch, -1, 4, 4)
        return outputs


@pytest.mark.parametrize("term", ["lsc", "dias_dim"])  # the terms with requires={"local"}
def test_local_terms_on_a_tower_without_patch_tokens(term):
    torch.manual_seed(0)
    model = GapClipModel(GapClipConfig(tiny_clip_config(), gap_terms=[term]))
    model.backbone.vision_model = _NoTokens(model.backbone.vision_model)
    inputs = {**clip_text_batch(), "pixel_values": pixel_batch()}
    model(**inputs)  # no local features asked for: still works
    with pytest.raises(ValueError) as info:
        model(**inputs, return_loss=True)
    message = str(info.value)
    assert f"['{term}']" in message and "_NoTokens" in message and "(4, 32, 4, 4)" in message


# ------------------------------------------------------------------------------------------------------ first run
# (issue 15: what a new user runs into; each is a row of the README's Troubleshooting table)
def test_training_split_smaller_than_one_batch_fails_at_load_naming_both_sizes(lgmgc, tiny_demo_root, tmp_path,
                                                                               monkeypatch):
    from gapclip.trainer import GapClipTrainer

    monkeypatch.setattr(GapClipTrainer, "__init__", lambda *a, **k: pytest.fail("got past the data loading"))
    for budget in (["--max_steps", "4"], ["--max_steps", "-1", "--num_train_epochs", "2"]):
        with pytest.raises(ValueError) as info:
            lgmgc.main(tiny_flags(tmp_path / "out", "--max_train_samples", "5", "--per_device_train_batch_size", "8",
                                  *budget))
        message = str(info.value)
        assert "has 5 training pair(s) (5 images" in message and "one optimizer step needs 8" in message
        assert "--max_train_samples 5" in message and "nothing would be trained" in message
    with pytest.raises(ValueError, match=r"needs 12 \(per_device_train_batch_size 4 × 1 process\(es\) × "
                                         r"gradient_accumulation_steps 3"):
        lgmgc.main(tiny_flags(tmp_path / "out", "--max_train_samples", "10", "--per_device_train_batch_size", "4",
                              "--gradient_accumulation_steps", "3"))


def karpathy_file(tmp_path, entries: list[dict]) -> tuple:
    root = tmp_path / "images"
    root.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        target = Path(os.path.normpath(root / entry.get("filepath", "") / entry["filename"]))
        if target.is_relative_to(root):
            target.parent.mkdir(parents=True, exist_ok=True)
            PILImage.new("RGB", (8, 8)).save(target)
    path = tmp_path / "karpathy.json"
    path.write_text(json.dumps({"images": [{"imgid": i, "split": "train", "sentences": [{"raw": "a red circle"}],
                                            **entry} for i, entry in enumerate(entries)]}))
    return path, root


@pytest.mark.parametrize("entry", [
    {"filename": "../secret.png"},
    {"filepath": "../outside", "filename": "x.png"},
    {"filepath": "sub/../../..", "filename": "etc/passwd"},
    {"filename": "/etc/passwd"},
], ids=["filename_dotdot", "filepath_dotdot", "nested_dotdot", "absolute"])
def test_karpathy_paths_may_not_leave_the_image_root(tmp_path, entry):
    from gapclip.data import load_caption_dataset

    (tmp_path / "secret.png").write_bytes(b"not yours")
    path, root = karpathy_file(tmp_path, [{"filename": "ok.png"}, entry])
    with pytest.raises(ValueError) as info:
        load_caption_dataset("karpathy", path, root)
    message = str(info.value)
    assert "images[1]" in message and "leads outside --image_root" in message and entry["filename"] in message
    inside, root = karpathy_file(tmp_path / "fine", [{"filepath": "a/../b", "filename": "ok.png"}])
    assert load_caption_dataset("karpathy", inside, root)["train"][0]["image"].size == (8, 8)  # stays inside: fine


def test_non_utf8_caption_files_name_the_file_and_line(tmp_path):
    from gapclip.data import load_caption_dataset
    from gapclip.data.loaders import read_translations

    PILImage.new("RGB", (8, 8)).save(tmp_path / "a.png")
    csv_file = tmp_path / "captions.csv"
    csv_file.write_bytes("image,caption\na.png,a red circle\na.png,un café rouge\n".encode("latin-1"))
    with pytest.raises(ValueError) as info:
        load_caption_dataset("csv", csv_file, tmp_path)
    assert f"{csv_file}, line 3: not valid UTF-8 (byte 0xe9 at column 13)" in str(info.value)
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_bytes('{"image": "a.png", "caption": "ok"}\n{"image": "a.png", "caption": "naïve"}\n'.encode("cp1252"))
    with pytest.raises(ValueError, match=rf"{jsonl}, line 2: not valid UTF-8"):
        load_caption_dataset("jsonl", jsonl, tmp_path)
    with pytest.raises(ValueError, match=rf"{jsonl}, line 2: not valid UTF-8"):
        read_translations(jsonl)
    karpathy = tmp_path / "dataset_x.json"
    karpathy.write_bytes('{"images": [\n{"filename": "a.png", "imgid": 0, "split": "train", "sentences": '
                         '[{"raw": "déjà vu"}]}]}'.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{karpathy}, line 2: not valid UTF-8"):
        load_caption_dataset("karpathy", karpathy, tmp_path)
    bom = tmp_path / "bom.csv"  # a UTF-8 file with a byte-order mark (Excel's "CSV UTF-8") just works
    bom.write_bytes("image,caption\na.png,un café\n".encode("utf-8-sig"))
    assert load_caption_dataset("csv", bom, tmp_path)["train"][0]["captions"] == ["un café"]


def test_malformed_gap_terms_json_names_the_flag(tmp_path):
    with pytest.raises(ValueError) as info:
        parse_args(NoMethodArguments, ["--gap_terms", '[{"name": "lsc"', "--output_dir", str(tmp_path)])
    assert str(info.value).startswith("--gap_terms is not valid JSON (") and '[{"name": "lsc"' in str(info.value)
    with pytest.raises(ValueError, match=r"--gap_terms must be a JSON list, got dict"):
        parse_args(NoMethodArguments, ["--gap_terms", '{"name": "lsc"}', "--output_dir", str(tmp_path)])


@pytest.mark.parametrize("flag, value, accepted", [
    ("--lsc_fusion", "bogus", "['concat', 'max', 'mean']"),
    ("--gst_distance", "bogus", "['infonce', 'kl', 'l2']"),
    ("--gst_on_missing", "ignore", "['error', 'skip']"),
])
def test_bad_option_values_are_rejected_at_parsing(lgmgc, tmp_path, capsys, flag, value, accepted):
    """Rejected by the argument parser: no data is loaded (the parse alone raises). On the command line argparse
    rejects the value with the term's own choices (``term_option_field``); a YAML config file, which argparse never
    sees, and a dataclass built in Python get the same check from ``__post_init__``."""
    with pytest.raises(SystemExit):
        parse_args(lgmgc.LGMGCArguments, [flag, value, "--output_dir", str(tmp_path)])
    alias = flag.replace("_", "-")  # --lsc-fusion, which HfArgumentParser adds
    assert f"argument {flag}/{alias}: invalid choice: {value} (" in capsys.readouterr().err.replace("'", "")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({flag.removeprefix("--"): value, "output_dir": str(tmp_path)}))
    with pytest.raises(ValueError) as info:
        parse_args(lgmgc.LGMGCArguments, [str(config)])
    assert str(info.value) == f"{flag} must be one of {accepted}, got {value!r}."
    with pytest.raises(ValueError, match=rf"^{flag} must be one of"):
        lgmgc.LGMGCArguments(**{flag.removeprefix("--"): value})


def test_bad_dias_and_cusa_option_values_are_rejected_at_parsing(tmp_path, monkeypatch):
    from ..test_recipes import RECIPES

    monkeypatch.syspath_prepend(str(RECIPES))
    dias, cusa = load_recipe("train_clip_dias"), load_recipe("train_clip_cusa")
    config = tmp_path / "dias.yaml"  # on the command line argparse rejects it (the term's choices)
    config.write_text(yaml.safe_dump({"mask": "x", "output_dir": str(tmp_path)}))
    with pytest.raises(ValueError, match=r"--mask must be one of \['straight_through', 'soft', 'hard'\], got 'x'"):
        parse_args(dias.DIASArguments, [str(config)])
    with pytest.raises(ValueError, match=r"--images_per_cluster must be >= 1, got 0"):
        parse_args(dias.DIASArguments, ["--images_per_cluster", "0", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match=r"--teacher_temperature must be a finite number > 0, got 0.0"):
        parse_args(cusa.CUSAArguments, ["--teacher_temperature", "0", "--output_dir", str(tmp_path)])


@pytest.mark.parametrize("value", ["./no/such/model", "no/such/model/here", "/no/such/model"])
def test_a_missing_local_model_folder_says_no_such_folder(tmp_path, value, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as info:
        parse_args(NoMethodArguments, ["--model_name_or_path", value, "--output_dir", str(tmp_path)])
    message = str(info.value)
    assert message.startswith(f"--model_name_or_path {value!r}: no such folder") and "Hub repository id" in message
    (tmp_path / "outputs").mkdir()  # owner/name that names a missing folder under an existing local one
    with pytest.raises(ValueError, match="no such folder"):
        parse_args(NoMethodArguments, ["--model_name_or_path", "outputs/demo", "--output_dir", str(tmp_path)])
    parse_args(NoMethodArguments, ["--model_name_or_path", "openai/clip-vit-base-patch16", "--output_dir",
                                   str(tmp_path)])  # a Hub id is left to transformers


def test_a_folder_given_as_an_image_path_is_named_a_directory(tmp_path):
    from gapclip.data import load_caption_dataset

    (tmp_path / "images" / "photos").mkdir(parents=True)
    csv_file = tmp_path / "captions.csv"
    csv_file.write_text("image,caption\nphotos,a red circle\n")
    with pytest.raises(IsADirectoryError) as info:
        load_caption_dataset("csv", csv_file, tmp_path / "images")
    assert "line 2" in str(info.value) and "is a directory, not an image file" in str(info.value)
    assert "photos" in str(info.value)


def test_resume_from_a_checkpoint_of_another_objective_names_both(tiny_demo_root, tmp_path):
    """--resume_from_checkpoint into a fresh folder: the trainer's own check of the checkpoint's objective."""
    flags = tiny_flags(tmp_path / "first", "--max_steps", "1", "--save_strategy", "steps", "--save_steps", "1",
                       "--skip_initial_eval", "true", terms=True)
    run(flags, [{"name": "lsc", "weight": 1.0}])
    checkpoint = tmp_path / "first" / "checkpoint-1"
    with pytest.raises(ValueError) as info:
        run([*flags, "--output_dir", str(tmp_path / "second"), "--max_steps", "2", "--resume_from_checkpoint",
             str(checkpoint)], [{"name": "dias_dim", "weight": 1.0}])
    message = str(info.value)
    assert message.startswith(f"Cannot resume from {checkpoint}: it was trained with gap_terms=[{{'name': 'lsc'")
    assert "'dias_dim'" in message and "fresh --output_dir" in message
