"""``--verify_images`` (gapclip.data.verify): every image decoded once at load, every bad one reported at once."""

from __future__ import annotations

import io
import logging

import pytest
from datasets import Dataset
from PIL import Image as PILImage

from gapclip.data import CAPTION_FEATURES
from gapclip.data.verify import find_bad_images, format_bad_images

from ..reliability import save_with_bad_training_images
from ..test_recipes import saved_clip  # noqa: F401  (a fixture)


def jpeg_bytes(seed: int, size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    PILImage.effect_noise(size, 40 + seed).convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def split_with_bad_files(tmp_path) -> tuple[Dataset, dict[int, str]]:
    """8 images, of which row 2 is zero bytes, row 5 a truncated JPEG and row 6 not an image at all."""
    bad = {2: b"", 5: jpeg_bytes(5)[:600], 6: b"caption,text\nnot,an image\n"}
    paths = []
    for row in range(8):
        path = tmp_path / f"img{row}.jpg"
        path.write_bytes(bad.get(row, jpeg_bytes(row)))
        paths.append(str(path))
    split = Dataset.from_dict(
        {"image_id": [f"id{row}" for row in range(8)], "image": paths,
         "captions": [[f"caption {row}"] for row in range(8)]},
        features=CAPTION_FEATURES,
    )
    return split, {row: paths[row] for row in bad}


def test_every_bad_file_is_reported_at_once(split_with_bad_files):
    split, bad_paths = split_with_bad_files
    bad = find_bad_images(split, split="train", num_workers=3, chunk_size=3, show_progress=False)
    assert [(b.row, b.image_id, b.path) for b in bad] == [(row, f"id{row}", bad_paths[row]) for row in (2, 5, 6)]
    assert "UnidentifiedImageError" in bad[0].error and "UnidentifiedImageError" in bad[2].error
    assert "truncated" in bad[1].error.lower()  # found only by decoding the whole file, not by opening it
    report = format_bad_images(bad)
    assert report.startswith("--verify_images found 3 unreadable image(s):")
    for row in (2, 5, 6):
        assert f"{bad_paths[row]} (image_id='id{row}', split 'train', row {row}): " in report


def test_the_rows_split_between_processes_give_the_same_report(split_with_bad_files):
    split, _ = split_with_bad_files
    whole = find_bad_images(split, show_progress=False)
    shards = [find_bad_images(split, show_progress=False, rank=rank, world_size=3) for rank in range(3)]
    assert sorted((b for shard in shards for b in shard), key=lambda b: b.row) == whole
    assert [b.row for b in shards[2]] == [2, 5]  # rows 2 and 5 are rank 2's (row % 3)


def test_embedded_image_bytes_are_checked_too():
    split = Dataset.from_dict(
        {"image_id": ["a", "b"], "image": [{"bytes": jpeg_bytes(0), "path": None}, {"bytes": b"junk", "path": None}],
         "captions": [["x"], ["y"]]},
        features=CAPTION_FEATURES,
    )
    (bad,) = find_bad_images(split, show_progress=False)
    assert bad.image_id == "b" and bad.path is None and "<image bytes stored in the dataset>" in bad.describe()


def _flags(data, saved_clip, out, *extra):
    return [
        "--dataset", "hub", "--dataset_name", data, "--caption_column", "captions", "--id_column", "image_id",
        "--model_name_or_path", str(saved_clip), "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--output_dir", str(out), "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end",
        "false", "--report_to", "none", "--disable_tqdm", "true", "--skip_initial_eval", "true", "--verify_images",
        *extra,
    ]


def test_a_run_with_verify_images_stops_before_training(tiny_demo_datasets, saved_clip, tmp_path, monkeypatch):
    from gapclip.trainer import GapClipTrainer

    from ..reliability.conftest import run

    data = save_with_bad_training_images(tiny_demo_datasets, tmp_path / "hub", {3, 9})
    ids = [tiny_demo_datasets["train"]["image_id"][row] for row in (3, 9)]
    monkeypatch.setattr(GapClipTrainer, "__init__", lambda *a, **k: pytest.fail("verification let training start"))
    with pytest.raises(ValueError) as info:
        run(_flags(data, saved_clip, tmp_path / "out"), [])
    message = str(info.value)
    assert message.startswith("--verify_images found 2 unreadable image(s):")
    for image_id, row in zip(ids, (3, 9)):
        assert f"image_id='{image_id}', split 'train', row {row})" in message
    assert "--on_bad_image skip" in message


def test_verify_images_with_skip_leaves_the_bad_training_images_out(tiny_demo_datasets, saved_clip, tmp_path,
                                                                   caplog):
    from ..reliability.conftest import run

    data = save_with_bad_training_images(tiny_demo_datasets, tmp_path / "hub", {3})
    with caplog.at_level(logging.WARNING, logger="gapclip.cli"):
        result = run(_flags(data, saved_clip, tmp_path / "out", "--on_bad_image", "skip",
                            "--max_bad_image_fraction", "0.1"), [])
    assert result["trainer"].state.global_step == 2
    pairs = result["trainer"].train_dataset
    assert pairs.num_images == 15 and tiny_demo_datasets["train"]["image_id"][3] not in pairs.dataset["image_id"]
    assert any("Leaving them out of training" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=r"1 of 16 training images are unreadable, more than "
                                         r"--max_bad_image_fraction=0.01"):
        run(_flags(data, saved_clip, tmp_path / "out2", "--on_bad_image", "skip"), [])
