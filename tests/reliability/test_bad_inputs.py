"""The bad-input matrix: each row raises a clear error (type + the culprit named) or just works.

Rows already covered elsewhere are not repeated here (see the README's Troubleshooting table): corrupt image and
the skip mode (``tests/data/test_pairs_collator.py``), greyscale/RGBA/palette images
(``test_non_rgb_images_are_converted``), over-long captions (``test_collator_truncates_and_warns_once``), missing
image files, empty captions and duplicate ids in each loader (``tests/data/test_loaders.py``), teacher coverage
(``tests/test_teachers.py``), GST missing translations (``tests/losses/test_lgmgc.py``), batch of one
(``tests/test_recipes.py``).
"""

from __future__ import annotations

import logging

import pytest
import torch
from datasets import Dataset
from PIL import Image as PILImage

from gapclip import GapClipConfig, GapClipModel
from gapclip.data import CAPTION_FEATURES, CaptionPairs, GapClipCollator, IterableCaptionPairs
from gapclip.data.kmeans_sampler import KMeansBatchSampler
from gapclip.testing import tiny_clip_config

from ..conftest import clip_text_batch, pixel_batch
from ..test_recipes import load_recipe, saved_clip, tiny_flags  # noqa: F401  (saved_clip is a fixture)
from .conftest import run


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
    from datasets import DatasetDict, Image

    train = tiny_demo_datasets["train"].select(range(16)).cast_column("image", Image(decode=False))
    bad_rows = {3, 9}
    bad_ids = [train["image_id"][i] for i in sorted(bad_rows)]
    train = train.map(
        lambda row, i: {"image": {"bytes": b"not an image", "path": None}} if i in bad_rows else {},
        with_indices=True,
    ).cast_column("image", Image())
    DatasetDict({"train": train, "validation": tiny_demo_datasets["validation"],
                 "test": tiny_demo_datasets["test"]}).save_to_disk(str(tmp_path / "hub"))
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
