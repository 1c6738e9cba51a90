from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict, Features, Image, IterableDatasetDict, List, Value
from PIL import Image as PILImage

from gapclip.data import (
    CAPTION_FEATURES,
    attach_columns,
    attach_translations,
    load_caption_dataset,
    load_captions_file,
    load_hub_captions,
    load_karpathy,
)


# ---------------------------------------------------------------------------------------------------------------------
# Karpathy
# ---------------------------------------------------------------------------------------------------------------------
def test_karpathy_round_trip_coco(coco_tree):
    json_path, root = coco_tree
    dsd = load_karpathy(json_path, root)
    assert isinstance(dsd, DatasetDict)
    assert list(dsd) == ["train", "validation", "test"]
    assert dsd["train"].features == CAPTION_FEATURES
    # restval goes into train; ids come from cocoid.
    assert dsd["train"]["image_id"] == ["1000", "1001", "1002"]
    assert dsd["validation"]["image_id"] == ["1003"]
    row = dsd["test"][0]
    assert row["captions"] == [f"image 4 caption {k}" for k in range(5)]
    assert isinstance(row["image"], PILImage.Image) and row["image"].size == (32, 32)
    # The image path honours filepath.
    raw = dsd["test"].cast_column("image", Image(decode=False))[0]["image"]
    assert raw["path"].endswith("val2014/COCO_val2014_000000000004.jpg")


def test_karpathy_restval_off_and_split_selection(coco_tree):
    json_path, root = coco_tree
    assert load_karpathy(json_path, root, use_restval=False)["train"].num_rows == 2
    only_val = load_karpathy(json_path, root, splits=["val"])
    assert list(only_val) == ["validation"]


def test_karpathy_flickr_style_without_filepath(tmp_path, make_image, make_json):
    entries = []
    for i, split in enumerate(["train", "val", "test"]):
        make_image(tmp_path / "images" / f"{i}.jpg")
        entries.append({"filename": f"{i}.jpg", "imgid": i, "split": split, "sentences": [{"raw": "a dog"}]})
    path = make_json(tmp_path / "dataset_flickr30k.json", {"images": entries, "dataset": "flickr30k"})
    dsd = load_karpathy(path, tmp_path / "images")
    assert [dsd[s]["image_id"] for s in dsd] == [["0"], ["1"], ["2"]]


def test_karpathy_missing_image_file(coco_tree):
    json_path, root = coco_tree
    missing = root / "val2014" / "COCO_val2014_000000000003.jpg"
    missing.unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_karpathy(json_path, root)
    message = str(info.value)
    assert str(missing) in message and "1003" in message and "dataset_coco.json" in message and "images[3]" in message


@pytest.mark.parametrize("sentences", [[], [{"raw": "   "}, {"raw": ""}]], ids=["zero", "whitespace"])
def test_karpathy_image_without_captions(coco_tree, coco_entries, make_json, sentences):
    json_path, root = coco_tree
    entries = coco_entries()
    entries[1]["sentences"] = sentences
    make_json(json_path, {"images": entries})
    with pytest.raises(ValueError) as info:
        load_karpathy(json_path, root)
    assert "1001" in str(info.value) and "dataset_coco.json" in str(info.value) and "caption" in str(info.value)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ([{"filename": "x"}], "expected a dict with an 'images' list"),
        ({"pictures": []}, "'images'"),
        ({"images": [None]}, "images[0]"),
    ],
    ids=["list", "no-images-key", "entry-not-dict"],
)
def test_karpathy_wrong_shape(tmp_path, make_json, data, expected):
    path = make_json(tmp_path / "bad.json", data)
    with pytest.raises(ValueError) as info:
        load_karpathy(path, tmp_path)
    assert "bad.json" in str(info.value) and expected in str(info.value)


@pytest.mark.parametrize("key", ["filename", "split", "sentences", "imgid"])
def test_karpathy_entry_missing_key(coco_tree, coco_entries, make_json, key):
    json_path, root = coco_tree
    entries = coco_entries()
    del entries[2][key]
    if key == "imgid":
        del entries[2]["cocoid"]
    make_json(json_path, {"images": entries})
    with pytest.raises(ValueError) as info:
        load_karpathy(json_path, root)
    assert "images[2]" in str(info.value) and repr(key) in str(info.value) and "dataset_coco.json" in str(info.value)


def test_karpathy_sentence_missing_raw_and_bad_split(coco_tree, coco_entries, make_json):
    json_path, root = coco_tree
    entries = coco_entries()
    entries[0]["sentences"][1] = {"tokens": ["a"]}
    make_json(json_path, {"images": entries})
    with pytest.raises(ValueError, match=r"images\[0\]\.sentences\[1\].*'raw'"):
        load_karpathy(json_path, root)
    entries = coco_entries()
    entries[0]["split"] = "holdout"
    make_json(json_path, {"images": entries})
    with pytest.raises(ValueError, match=r"images\[0\].*'holdout'"):
        load_karpathy(json_path, root)


def test_karpathy_duplicate_ids(coco_tree, coco_entries, make_json):
    json_path, root = coco_tree
    entries = coco_entries()
    entries[4]["cocoid"] = entries[0]["cocoid"]
    make_json(json_path, {"images": entries})
    with pytest.raises(ValueError) as info:
        load_karpathy(json_path, root)
    assert "duplicate" in str(info.value) and "1000" in str(info.value)


def test_karpathy_streaming_matches(coco_tree):
    json_path, root = coco_tree
    eager = load_karpathy(json_path, root)
    stream = load_karpathy(json_path, root, streaming=True)
    assert isinstance(stream, IterableDatasetDict)
    for split in eager:
        rows = list(stream[split])
        assert [r["image_id"] for r in rows] == eager[split]["image_id"]
        assert [r["captions"] for r in rows] == eager[split]["captions"]
        assert isinstance(rows[0]["image"], PILImage.Image)


# ---------------------------------------------------------------------------------------------------------------------
# Translations
# ---------------------------------------------------------------------------------------------------------------------
def test_translations_attached_with_missing_ids_none(coco_tree, tmp_path):
    json_path, root = coco_tree
    tr = tmp_path / "tr.jsonl"
    tr.write_text(json.dumps({"image_id": "1000", "translation": "a red thing"}) + "\n", encoding="utf-8")
    dsd = load_karpathy(json_path, root, translations=tr)
    assert dsd["train"].features["translation"] == Value("string")
    assert dsd["train"]["translation"] == ["a red thing", None, None]
    stream = attach_translations(load_karpathy(json_path, root, streaming=True), tr)
    assert [r["translation"] for r in stream["train"]] == ["a red thing", None, None]


def test_translations_bad_file(coco_tree, tmp_path):
    json_path, root = coco_tree
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_karpathy(json_path, root, translations=tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image_id": "1"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 1.*'translation'"):
        load_karpathy(json_path, root, translations=bad)


def test_extra_columns_attached_with_types_and_missing_ids_none(coco_tree, tmp_path, caplog):
    json_path, root = coco_tree
    columns = tmp_path / "columns.jsonl"
    rows = [
        {"image_id": "1001", "label": 2, "weights": [0.5, 0.25]},
        {"image_id": "1000", "label": 7, "weights": [1.0, 0.0], "note": "first"},
    ]
    columns.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    dsd = attach_columns(load_karpathy(json_path, root), columns)
    train = dsd["train"]
    assert train.features["label"] == Value("int64") and train.features["note"] == Value("string")
    assert train["label"] == [7, 2, None] and train["weights"] == [[1.0, 0.0], [0.5, 0.25], None]
    assert train["note"] == ["first", None, None]
    assert dsd["test"]["label"] == [None]  # every split gets the columns
    stream = attach_columns(load_karpathy(json_path, root, streaming=True), columns)
    assert [r["label"] for r in stream["train"]] == [7, 2, None]
    again = attach_columns(dsd, columns)  # attaching twice replaces the columns
    assert again["train"]["label"] == [7, 2, None]


@pytest.mark.parametrize(
    "lines,match",
    [
        (['{"label": 1}'], r"line 1: expected an object with an 'image_id' key"),
        (['{"image_id": "1", "caption": "x"}'], r"line 1: column\(s\) \['caption'\] clash with gapclip's own"),
        (['{"image_id": "1", "a": 1}', '{"image_id": "1", "a": 2}'], r"line 2: image_id '1' appears twice"),
        (['{"image_id": "1"}'], "no column besides 'image_id'"),
        (["[1, 2]"], r"line 1: expected a JSON object, got list"),
    ],
)
def test_extra_columns_bad_file(coco_tree, tmp_path, lines, match):
    json_path, root = coco_tree
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        attach_columns(load_karpathy(json_path, root), bad)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        attach_columns(load_karpathy(json_path, root), tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------------------------------------------------
# Hub-style: save_to_disk folders and parquet
# ---------------------------------------------------------------------------------------------------------------------
def _image_paths(tmp_path, make_image, n):
    return [str(make_image(tmp_path / "img" / f"{i}.png", colour=(10 * i, 0, 0))) for i in range(n)]


def test_hub_save_to_disk_with_custom_columns_and_list_captions(tmp_path, make_image):
    paths = _image_paths(tmp_path, make_image, 3)
    features = Features({"picture": Image(), "texts": List(Value("string")), "uid": Value("int64")})
    saved = DatasetDict(
        {
            "train": Dataset.from_dict(
                {"picture": paths[:2], "texts": [["a", "b"], ["c"]], "uid": [7, 8]}, features=features
            ),
            "val": Dataset.from_dict({"picture": paths[2:], "texts": [["d", " e "]], "uid": [9]}, features=features),
        }
    )
    saved.save_to_disk(tmp_path / "saved")
    dsd = load_hub_captions(tmp_path / "saved", image_column="picture", caption_column="texts", id_column="uid")
    assert list(dsd) == ["train", "validation"]
    assert dsd["train"].features == CAPTION_FEATURES
    assert dsd["train"]["image_id"] == ["7", "8"]
    assert dsd["validation"][0]["captions"] == ["d", "e"]
    assert dsd["validation"][0]["image"].size == (32, 32)


def test_hub_parquet_string_captions_and_path_column(tmp_path, make_image):
    _image_paths(tmp_path, make_image, 2)
    Dataset.from_dict({"file": ["0.png", "1.png"], "caption": ["a cat", "a dog"]}).to_parquet(tmp_path / "d.parquet")
    dsd = load_hub_captions(
        tmp_path / "d.parquet", image_column="file", image_root=tmp_path / "img", cache_dir=str(tmp_path / "c")
    )
    assert list(dsd) == ["train"]
    train = dsd["train"]
    assert train["image_id"] == ["0", "1"]  # row index
    assert train["captions"] == [["a cat"], ["a dog"]]
    assert train[1]["image"].size == (32, 32)
    stream = load_hub_captions(
        tmp_path / "d.parquet",
        image_column="file",
        image_root=tmp_path / "img",
        streaming=True,
        cache_dir=str(tmp_path / "c"),
    )
    assert [r["captions"] for r in stream["train"]] == [["a cat"], ["a dog"]]


def test_hub_parquet_image_feature_list_captions(tmp_path, make_image):
    paths = _image_paths(tmp_path, make_image, 2)
    ds = Dataset.from_dict(
        {"image": paths, "sentences": [["x", "y"], ["z"]]},
        features=Features({"image": Image(), "sentences": List(Value("string"))}),
    )
    ds.to_parquet(tmp_path / "imgs.parquet")
    train = load_hub_captions(tmp_path / "imgs.parquet", caption_column="sentences", cache_dir=str(tmp_path / "c"))[
        "train"
    ]
    assert train["captions"] == [["x", "y"], ["z"]]
    assert train[0]["image"].size == (32, 32)


def test_hub_missing_column_lists_available(tmp_path, make_image):
    _image_paths(tmp_path, make_image, 1)
    Dataset.from_dict({"file": ["0.png"], "text": ["a"]}).to_parquet(tmp_path / "d.parquet")
    with pytest.raises(ValueError) as info:
        load_hub_captions(tmp_path / "d.parquet", image_column="file", cache_dir=str(tmp_path / "c"))
    message = str(info.value)
    assert "caption_column='caption'" in message and "'file'" in message and "'text'" in message


def test_hub_missing_image_file_and_empty_caption(tmp_path, make_image):
    _image_paths(tmp_path, make_image, 1)
    Dataset.from_dict({"file": ["0.png", "gone.png"], "caption": ["a", "b"]}).to_parquet(tmp_path / "d.parquet")
    with pytest.raises(FileNotFoundError, match=r"gone\.png.*image_id='1'"):
        load_hub_captions(
            tmp_path / "d.parquet", image_column="file", image_root=tmp_path / "img", cache_dir=str(tmp_path / "c")
        )
    Dataset.from_dict({"file": ["0.png"], "caption": ["  "]}).to_parquet(tmp_path / "e.parquet")
    with pytest.raises(ValueError, match=r"e\.parquet.*image_id='0'"):
        load_hub_captions(
            tmp_path / "e.parquet", image_column="file", image_root=tmp_path / "img", cache_dir=str(tmp_path / "c")
        )


def test_hub_duplicate_ids(tmp_path, make_image):
    paths = _image_paths(tmp_path, make_image, 2)
    Dataset.from_dict({"image": paths, "caption": ["a", "b"], "id": ["x", "x"]}).to_parquet(tmp_path / "d.parquet")
    with pytest.raises(ValueError, match=r"duplicate.*'x'"):
        load_hub_captions(tmp_path / "d.parquet", id_column="id", cache_dir=str(tmp_path / "c"))


# ---------------------------------------------------------------------------------------------------------------------
# CSV / JSONL
# ---------------------------------------------------------------------------------------------------------------------
def _write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_csv_groups_rows_by_image(tmp_path, make_image):
    for name in ("a.png", "b.png", "c.png"):
        make_image(tmp_path / name)
    rows = [
        {"image": "a.png", "caption": "first", "split": "train"},
        {"image": "b.png", "caption": "third", "split": "val"},
        {"image": "a.png", "caption": "second", "split": "train"},
        {"image": "c.png", "caption": "fourth", "split": ""},
    ]
    dsd = load_caption_dataset("csv", _write_csv(tmp_path / "caps.csv", rows), tmp_path)
    assert dsd["train"]["image_id"] == ["a.png", "c.png"]
    assert dsd["train"]["captions"] == [["first", "second"], ["fourth"]]
    assert dsd["validation"]["captions"] == [["third"]]


def test_csv_without_split_column_all_train(tmp_path, make_image):
    make_image(tmp_path / "a.png")
    dsd = load_captions_file(_write_csv(tmp_path / "caps.csv", [{"image": "a.png", "caption": "x"}]), tmp_path)
    assert list(dsd) == ["train"]


def test_csv_errors_name_line_and_file(tmp_path, make_image):
    make_image(tmp_path / "a.png")
    missing = _write_csv(tmp_path / "m.csv", [{"image": "a.png", "caption": "x"}, {"image": "b.png", "caption": "y"}])
    with pytest.raises(FileNotFoundError, match=r"m\.csv, line 3.*b\.png"):
        load_captions_file(missing, tmp_path)
    empty = _write_csv(tmp_path / "e.csv", [{"image": "a.png", "caption": "  "}])
    with pytest.raises(ValueError, match=r"e\.csv.*image_id='a\.png'"):
        load_captions_file(empty, tmp_path)
    wrong = _write_csv(tmp_path / "w.csv", [{"img": "a.png", "caption": "x"}])
    with pytest.raises(ValueError, match=r"w\.csv, line 2.*'image'.*available columns.*'img'"):
        load_captions_file(wrong, tmp_path)
    split_clash = _write_csv(
        tmp_path / "s.csv",
        [{"image": "a.png", "caption": "x", "split": "train"}, {"image": "a.png", "caption": "y", "split": "test"}],
    )
    with pytest.raises(ValueError, match=r"s\.csv, line 3.*one split"):
        load_captions_file(split_clash, tmp_path)


def test_jsonl_with_caption_lists_and_ids(tmp_path, make_image):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png")
    lines = [
        {"file": "a.png", "caps": ["one", "two"], "id": 1, "split": "test"},
        {"file": "b.png", "caps": "three", "id": 2, "split": "test"},
        {"file": "a.png", "caps": ["four"], "id": 1, "split": "test"},
    ]
    path = tmp_path / "caps.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    dsd = load_caption_dataset("jsonl", path, tmp_path, image_column="file", caption_column="caps", id_column="id")
    assert list(dsd) == ["test"]
    assert dsd["test"]["image_id"] == ["1", "2"]
    assert dsd["test"]["captions"] == [["one", "two", "four"], ["three"]]
    stream = load_captions_file(
        path, tmp_path, image_column="file", caption_column="caps", id_column="id", streaming=True
    )
    assert [r["captions"] for r in stream["test"]] == dsd["test"]["captions"]


# ---------------------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------------------
def test_dispatch_unknown_source():
    with pytest.raises(ValueError) as info:
        load_caption_dataset("tfrecord", "x")
    assert "'tfrecord'" in str(info.value) and "karpathy" in str(info.value) and "demo" in str(info.value)


def test_dispatch_karpathy_and_demo(coco_tree, tmp_path):
    json_path, root = coco_tree
    assert load_caption_dataset("karpathy", json_path, root)["train"].num_rows == 3
    demo = load_caption_dataset("demo", root=tmp_path / "demo", num_train=4, num_val=2, num_test=2, image_size=32)
    assert {s: demo[s].num_rows for s in demo} == {"train": 4, "validation": 2, "test": 2}
    assert all(t is not None for t in demo["train"]["translation"])
