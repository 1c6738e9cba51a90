"""A synthetic *pretraining* corpus for the demo world, separate from the fine-tuning demo set.

The papers fine-tune encoders that were pretrained on web image-alt-text pairs. To study the gap terms the same way
offline, gapclip pretrains its demo-size encoders (``recipes/pretrain_demo.py``) on this corpus and fine-tunes them
on the demo set (``gapclip.data.demo``). The corpus was designed once, before any method was run on it, to resemble
the relation between web pretraining data and a captioning benchmark; it is never tuned toward a method:

- **Same world, other pictures.** The shapes, colours and backgrounds of the demo set, but 1-4 objects (the demo has
  2-4) at *continuous* positions anywhere in the frame (the demo uses a jittered 3×3 grid) with continuous sizes
  (half-extent 6-17 % of the side; the demo has two sizes); objects may overlap. Its own random stream
  (``seed`` and a stream tag the demo does not use), so no image is shared with the demo set.
- **Alt-text style captions**: two per image (the demo has five), short and partial, from phrasings the demo never
  uses ("photo of a red circle", "3 objects on grey: ...", "a big blue star near the upper left corner"): other
  words for positions (upper/lower/middle/side/corner) and sizes (big/tiny), digits for counts. Fine-tuning on the
  demo captions therefore has a vocabulary to adapt to, as with a real benchmark.
- **Size**: 12,000 training and 500 held-out images by default (6× the demo's training split).

Layout (Karpathy style, like the demo set, so every loader reads it)::

    root/meta.json                generation parameters (cache key; written last)
    root/dataset_pretrain.json    splits "train" and "val"; entries also carry "background" and "objects"
    root/images/pre_000000.png ...
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .demo import BACKGROUNDS, COLOURS, SHAPES, DemoObject, _render, cache_root, write_cached_folder

__all__ = ["PRETRAIN_VERSION", "default_pretraining_root", "make_pretraining_corpus"]

PRETRAIN_VERSION = "pretrain-v1"
_STREAM_TAG = 7_700_417  # separates this corpus' random stream from the demo set's (which uses 20240601)
_CAPTIONS_PER_IMAGE = 2
_HALF_EXTENT = (0.06, 0.17)  # fraction of the image side
_BIG = 0.115  # half-extent above which an object is "big", below "tiny"
_ROWS = ("upper", "middle", "lower")
_COLUMNS = ("left", "middle", "right")


def default_pretraining_root(num_train: int, num_val: int, image_size: int, seed: int) -> Path:
    """`cache_root()` / `pretrain-v1-<train>-<val>-<size>-s<seed>`."""
    return cache_root() / f"{PRETRAIN_VERSION}-{num_train}-{num_val}-{image_size}-s{seed}"


def _sample_scene(rng: np.random.Generator, image_size: int) -> tuple[str, list[DemoObject]]:
    background = str(rng.choice(list(BACKGROUNDS)))
    objects: list[DemoObject] = []
    used: set[tuple[str, str]] = set()
    for _ in range(int(rng.integers(1, 5))):
        while True:
            shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
            if (colour, shape) not in used:
                used.add((colour, shape))
                break
        half = float(rng.uniform(*_HALF_EXTENT)) * image_size
        cx, cy = (float(v) for v in rng.uniform(half, image_size - half, size=2))
        size = "big" if half > _BIG * image_size else "tiny"
        objects.append(DemoObject(shape, colour, size, _region(cx, cy, image_size), (cx, cy), half))
    return background, objects


def _region(cx: float, cy: float, image_size: int) -> str:
    """Where an object is, in this corpus' own words ("near the upper left corner", "in the middle" ...)."""
    row, col = _ROWS[min(int(3 * cy / image_size), 2)], _COLUMNS[min(int(3 * cx / image_size), 2)]
    if row == "middle" and col == "middle":
        return "in the middle"
    if row == "middle":
        return f"on the {col} side"
    if col == "middle":
        return f"near the {'top' if row == 'upper' else 'bottom'} edge"
    return f"near the {row} {col} corner"


def _article(words: str) -> str:
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def _caption(rng: np.random.Generator, background: str, objects: list[DemoObject]) -> str:
    pick = objects[int(rng.integers(len(objects)))]
    listed = ", ".join(f"{o.colour} {o.shape}" for o in (objects[i] for i in rng.permutation(len(objects))))
    templates = [
        lambda: f"photo of {_article(f'{pick.colour} {pick.shape}')}",
        lambda: f"{_article(f'{pick.size} {pick.colour} {pick.shape}')} {pick.position}",
        lambda: f"{len(objects)} object{'s' if len(objects) > 1 else ''} on {background}: {listed}",
        lambda: f"{background} backdrop with {_article(f'{pick.colour} {pick.shape}')}",
        lambda: f"a {pick.shape} that is {pick.colour}",
        lambda: f"{listed} on a {background} background",
    ]
    return templates[int(rng.integers(len(templates)))]()


def _write_corpus(folder: Path, meta: dict[str, Any]) -> None:
    rng = np.random.default_rng([meta["seed"], _STREAM_TAG])
    image_size = meta["image_size"]
    (folder / "images").mkdir(parents=True)
    entries = []
    index = 0
    for split, count in (("train", meta["num_train"]), ("val", meta["num_val"])):
        for _ in range(count):
            background, objects = _sample_scene(rng, image_size)
            filename = f"pre_{index:06d}.png"
            _render(background, objects, image_size).save(folder / "images" / filename, format="PNG")
            captions: list[str] = []
            while len(captions) < _CAPTIONS_PER_IMAGE:  # distinct captions (the templates always give several)
                caption = _caption(rng, background, objects)
                if caption not in captions:
                    captions.append(caption)
            entries.append({
                "filename": filename, "imgid": index, "split": split,
                "sentences": [{"raw": c, "tokens": c.split(), "imgid": index} for c in captions],
                "background": background, "objects": [asdict(o) for o in objects],
            })
            index += 1
    with (folder / "dataset_pretrain.json").open("w", encoding="utf-8") as handle:
        json.dump({"images": entries, "dataset": "pretrain"}, handle)
    with (folder / "meta.json").open("w", encoding="utf-8") as handle:  # last: marks a complete folder
        json.dump(meta, handle, indent=2, sort_keys=True)


def make_pretraining_corpus(
    root: str | os.PathLike | None = None,
    *,
    num_train: int = 12_000,
    num_val: int = 500,
    image_size: int = 48,
    seed: int = 0,
) -> Path:
    """Generate (or reuse the cached) pretraining corpus and return its folder (see the module docstring).

    Deterministic in all arguments and cached like the demo set (``meta.json`` is the key; written to a temporary
    sibling and renamed into place). Load it with
    ``load_caption_dataset("karpathy", root / "dataset_pretrain.json", root / "images")``.
    """
    for name, value, low in (("num_train", num_train, 1), ("num_val", num_val, 1), ("image_size", image_size, 24)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"make_pretraining_corpus: {name} must be an int >= {low}, got {value!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"make_pretraining_corpus: seed must be a non-negative int, got {seed!r}.")
    meta = {"version": PRETRAIN_VERSION, "num_train": num_train, "num_val": num_val, "image_size": image_size,
            "seed": seed}
    root = Path(root) if root is not None else default_pretraining_root(num_train, num_val, image_size, seed)
    return write_cached_folder(
        root, meta, _write_corpus, what="pretraining corpus",
        description=f"pretraining corpus ({num_train}/{num_val} images, {image_size}px)",
    )
