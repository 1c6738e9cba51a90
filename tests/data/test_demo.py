from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoProcessor

from gapclip.data import load_demo, make_demo_dataset, make_demo_processor
from gapclip.data.demo import COLOURS, POSITION_PHRASES, SHAPES, SIZES

SMALL = {"num_train": 6, "num_val": 2, "num_test": 3, "image_size": 32}
_NP = re.compile(
    rf"(?:({'|'.join(SIZES)}) )?({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
    rf"(?: ({'|'.join(sorted(POSITION_PHRASES.values(), key=len, reverse=True))}))?"
)


def _entries(root: Path) -> list[dict]:
    return json.loads((root / "dataset_demo.json").read_text(encoding="utf-8"))["images"]


def _translations(root: Path) -> dict[str, str]:
    lines = (root / "translations.jsonl").read_text(encoding="utf-8").splitlines()
    return {row["image_id"]: row["translation"] for row in map(json.loads, lines)}


def test_layout_and_counts(demo_root):
    for name in ("dataset_demo.json", "translations.jsonl", "meta.json", "images", "processor"):
        assert (demo_root / name).exists(), name
    entries = _entries(demo_root)
    assert [sum(e["split"] == s for e in entries) for s in ("train", "val", "test")] == [40, 10, 20]
    for e in entries:
        assert 2 <= len(e["objects"]) <= 4
        assert len(e["sentences"]) == 5 and len({s["raw"] for s in e["sentences"]}) == 5
        assert Image.open(demo_root / "images" / e["filename"]).size == (32, 32)
    dsd = load_demo(demo_root)
    assert {s: dsd[s].num_rows for s in dsd} == {"train": 40, "validation": 10, "test": 20}


def test_deterministic_and_cached(tmp_path):
    a = make_demo_dataset(tmp_path / "a", seed=1, **SMALL)
    b = make_demo_dataset(tmp_path / "b", seed=1, **SMALL)
    c = make_demo_dataset(tmp_path / "c", seed=2, **SMALL)
    assert (a / "dataset_demo.json").read_bytes() == (b / "dataset_demo.json").read_bytes()
    assert (a / "translations.jsonl").read_bytes() == (b / "translations.jsonl").read_bytes()
    for png in sorted((a / "images").iterdir()):
        assert png.read_bytes() == (b / "images" / png.name).read_bytes()
    assert (a / "dataset_demo.json").read_bytes() != (c / "dataset_demo.json").read_bytes()
    stamp = (a / "meta.json").stat().st_mtime_ns
    start = time.perf_counter()
    assert make_demo_dataset(tmp_path / "a", seed=1, **SMALL) == a
    assert time.perf_counter() - start < 0.5
    assert (a / "meta.json").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_default_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GAPCLIP_CACHE", str(tmp_path / "cache"))
    root = make_demo_dataset(seed=5, **SMALL)
    assert root == tmp_path / "cache" / "demo-v1-6-2-3-32-s5"


def test_existing_folder_with_other_content_is_rejected(tmp_path):
    make_demo_dataset(tmp_path / "a", seed=1, **SMALL)
    with pytest.raises(ValueError, match=r"'.*a'.*does not hold a demo set"):
        make_demo_dataset(tmp_path / "a", seed=2, **SMALL)


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"num_train": -1}, "num_train"), ({"image_size": 8}, "image_size"), ({"seed": -3}, "seed")]
)
def test_bad_parameters(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_demo_dataset(tmp_path / "x", **{**SMALL, **kwargs})


def test_captions_are_true_for_the_drawn_objects(demo_root):
    for e in _entries(demo_root):
        objects = e["objects"]
        by_name = {(o["colour"], o["shape"]): o for o in objects}
        for sentence in e["sentences"]:
            caption = sentence["raw"]
            mentions = _NP.findall(caption)
            assert mentions, caption
            for size, colour, shape, position in mentions:
                obj = by_name.get((colour, shape))
                assert obj is not None, (caption, objects)
                assert not size or obj["size"] == size, (caption, objects)
                assert not position or POSITION_PHRASES[obj["position"]] == position, (caption, objects)
            if "background" in caption or "scene" in caption:
                assert e["background"] in caption
            count = re.match(r"(two|three|four) ", caption) or re.search(r"with (two|three|four) objects", caption)
            if count:
                assert count.group(1) == {2: "two", 3: "three", 4: "four"}[len(objects)]
            # Relations: "X to the left of Y", "X above Y", ...
            rel = re.search(
                r"(\w+ \w+) (to the left of|to the right of|above|below) (?:a )?(?:\w+ )?(\w+ \w+)$", caption
            )
            if rel:
                a, b = by_name[tuple(rel.group(1).split())], by_name[tuple(rel.group(3).split())]
                pa = _grid(a["position"])
                pb = _grid(b["position"])
                relation = rel.group(2)
                if "left" in relation:
                    assert pa[0] < pb[0]
                elif "right" in relation:
                    assert pa[0] > pb[0]
                elif relation == "above":
                    assert pa[1] < pb[1]
                else:
                    assert pa[1] > pb[1]
            cmp = re.search(r"the (\w+ \w+) is (bigger|smaller) than the (\w+ \w+)", caption)
            if cmp:
                a, b = by_name[tuple(cmp.group(1).split())], by_name[tuple(cmp.group(3).split())]
                assert (a["size"], b["size"]) == (
                    ("large", "small") if cmp.group(2) == "bigger" else ("small", "large")
                )


def _grid(position: str) -> tuple[int, int]:
    from gapclip.data.demo import POSITIONS

    return POSITIONS[position]


def test_pixels_match_metadata(demo_root):
    for e in _entries(demo_root)[:15]:
        image = Image.open(demo_root / "images" / e["filename"]).convert("RGB")
        for o in e["objects"]:
            x, y = (round(v) for v in o["center"])
            assert image.getpixel((x, y)) == COLOURS[o["colour"]], (e["filename"], o)


def test_captions_are_diverse(demo_root):
    entries = _entries(demo_root)
    captions = [s["raw"] for e in entries for s in e["sentences"]]
    assert len(set(captions)) / len(captions) > 0.8
    assert len({tuple(s["raw"] for s in e["sentences"]) for e in entries}) == len(entries)


def test_translations_are_partial(demo_root):
    translations = _translations(demo_root)
    entries = _entries(demo_root)
    assert set(translations) == {str(e["imgid"]) for e in entries}
    for e in entries:
        text = translations[str(e["imgid"])]
        assert text not in {s["raw"] for s in e["sentences"]}
        mentions = _NP.findall(text)
        assert len(mentions) == 1
        size, colour, shape, _ = mentions[0]
        largest = {o["size"] for o in e["objects"]}
        expected_size = "large" if "large" in largest else "small"
        assert size == expected_size
        assert any(o["colour"] == colour and o["shape"] == shape and o["size"] == size for o in e["objects"])


def test_processor_covers_vocabulary_and_round_trips(demo_root, demo_processor, tmp_path):
    tok = demo_processor.tokenizer
    assert tok.pad_token_id == 0 and tok.convert_tokens_to_ids("[UNK]") == tok.unk_token_id
    assert tok.model_max_length == 32
    texts = [s["raw"] for e in _entries(demo_root) for s in e["sentences"]] + list(_translations(demo_root).values())
    ids = tok(texts)["input_ids"]
    assert all(tok.unk_token_id not in row for row in ids)
    assert all(row[0] == tok.bos_token_id and row[-1] == tok.eos_token_id for row in ids)
    assert tok.eos_token_id == len(tok) - 1  # highest id, as in OpenAI CLIP
    assert max(len(row) for row in ids) <= 32
    reloaded = AutoProcessor.from_pretrained(demo_root / "processor")
    assert reloaded.tokenizer("a red circle")["input_ids"] == tok("a red circle")["input_ids"]
    pixels = reloaded.image_processor(images=[Image.new("RGB", (32, 32))], return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 32, 32)
    assert make_demo_processor(demo_root).tokenizer.get_vocab() == tok.get_vocab()
    with pytest.raises(FileNotFoundError, match="meta.json"):
        make_demo_processor(tmp_path)
