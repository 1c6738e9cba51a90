from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from gapclip.data.demo import make_demo_dataset, make_demo_processor


def write_image(path: Path, *, mode: str = "RGB", size: int = 32, colour: Any = (200, 30, 30)) -> Path:
    """Write a tiny PNG (any PIL mode) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":
        image = Image.new("RGB", (size, size), colour).convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode == "L":
        image = Image.new("L", (size, size), 128)
    elif mode == "RGBA":
        image = Image.new("RGBA", (size, size), (*colour, 128))
    else:
        image = Image.new("RGB", (size, size), colour).convert(mode)
    image.save(path, format="PNG")
    return path


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _coco_entries() -> list[dict[str, Any]]:
    def entry(i: int, split: str, folder: str) -> dict[str, Any]:
        return {
            "filepath": folder,
            "filename": f"COCO_{folder}_{i:012d}.jpg",
            "imgid": i,
            "cocoid": 1000 + i,
            "split": split,
            "sentences": [{"raw": f" image {i} caption {k} ", "tokens": []} for k in range(5)],
        }

    return [
        entry(0, "train", "train2014"),
        entry(1, "train", "train2014"),
        entry(2, "restval", "val2014"),
        entry(3, "val", "val2014"),
        entry(4, "test", "val2014"),
    ]


@pytest.fixture
def coco_tree(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny COCO-style Karpathy set: (json_path, image_root) with filepath sub-folders and a restval image."""
    root = tmp_path / "coco"
    entries = _coco_entries()
    for i, e in enumerate(entries):
        # A .jpg name holding PNG bytes is fine for PIL and keeps the test fast.
        write_image(root / e["filepath"] / e["filename"], colour=(40 * i, 10, 10))
    return write_json(tmp_path / "dataset_coco.json", {"images": entries, "dataset": "coco"}), root


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(
        tmp_path_factory.mktemp("demo") / "set", num_train=40, num_val=10, num_test=20, image_size=32, seed=3
    )


@pytest.fixture(scope="session")
def demo_processor(demo_root: Path) -> Any:
    return make_demo_processor(demo_root)


@pytest.fixture
def make_image() -> Any:
    """The `write_image(path, mode=..., size=..., colour=...)` helper."""
    return write_image


@pytest.fixture
def make_json() -> Any:
    """The `write_json(path, data)` helper."""
    return write_json


@pytest.fixture(name="coco_entries")
def coco_entries_fixture() -> Any:
    """Builds fresh Karpathy entries (the ones written by `coco_tree`) for tests that edit them."""
    return _coco_entries
