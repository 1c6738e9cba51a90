"""Readers of the extra evaluations' files: ECCV Caption's extra positive pairs and STS sentence pairs."""

from __future__ import annotations

import json

import pytest

from gapclip.data import StsPairs, load_extra_positives, load_sts_pairs


def test_load_extra_positives(tmp_path):
    jsonl = tmp_path / "extra.jsonl"
    jsonl.write_text('{"image_id": 100, "caption_index": 3}\n\n{"image_id": 300, "caption_index": 0}\n')
    assert load_extra_positives(jsonl) == [(100, 3), (300, 0)]
    as_json = tmp_path / "extra.json"
    as_json.write_text(json.dumps({"positives": [{"image_id": 100, "caption_index": 3}]}))
    assert load_extra_positives(as_json) == [(100, 3)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": 1, "caption_index": 0}\n')
    with pytest.raises(ValueError, match=r"available: \['caption_index', 'image'\]"):
        load_extra_positives(bad)


def test_load_sts_pairs_local_files(tmp_path):
    csv_path = tmp_path / "sts.csv"
    csv_path.write_text('sentence1,sentence2,score\n"A man, running",A man runs,4.5\nA cat,A dog,1\n')
    pairs = load_sts_pairs(csv_path)
    assert isinstance(pairs, StsPairs)
    assert pairs.sentence1 == ["A man, running", "A cat"] and pairs.scores == [4.5, 1.0]
    tsv_path = tmp_path / "sts.tsv"
    tsv_path.write_text("s1\ts2\tlabel\nx\ty\t0.2\n")
    assert load_sts_pairs(tsv_path, sentence1_column="s1", sentence2_column="s2", score_column="label").scores == [0.2]
    jsonl_path = tmp_path / "sts.jsonl"
    jsonl_path.write_text('{"sentence1": "a", "sentence2": "b", "score": 3}\n')
    assert load_sts_pairs(jsonl_path) == StsPairs(["a"], ["b"], [3.0])
    missing = tmp_path / "missing.csv"
    missing.write_text("text_a,text_b,score\nx,y,1\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['sentence1', 'sentence2'\]; available columns: "
                       r"\['text_a', 'text_b', 'score'\]"):
        load_sts_pairs(missing)
    bad_score = tmp_path / "bad.csv"
    bad_score.write_text("sentence1,sentence2,score\nx,y,high\n")
    with pytest.raises(ValueError, match="non-numeric"):
        load_sts_pairs(bad_score)
    with pytest.raises(ValueError, match="extension"):
        (tmp_path / "sts.txt").write_text("x")
        load_sts_pairs(tmp_path / "sts.txt")


def test_load_sts_pairs_datasets_code_path(tmp_path, monkeypatch):
    # Not a file -> datasets.load_dataset(name, split=...); a local folder stands in for a Hub repo (offline).
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "stsb"
    folder.mkdir()
    (folder / "test.csv").write_text("sentence1,sentence2,score\na,b,0.5\nc,d,1.0\n")
    assert load_sts_pairs(str(folder), split="test") == StsPairs(["a", "c"], ["b", "d"], [0.5, 1.0])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['similarity'\]; available columns"):
        load_sts_pairs(str(folder), score_column="similarity")
