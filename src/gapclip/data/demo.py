"""Offline synthetic demo data: captioned images of coloured shapes in Karpathy layout.

`make_demo_dataset` draws a background colour plus 2-4 objects (shape, colour, size, position on a 3x3 grid) per image
and writes 5 true captions per image from templates that mention different subsets of objects and attributes, so that
matching a caption needs local detail (several objects, small objects, attributes, positions). It also writes a
deliberately partial "translation" per image (only the most salient object) and a word-level tokenizer/processor for
training a CLIP from scratch (`make_demo_processor`).

Layout of the generated folder::

    root/meta.json              generation parameters (used for caching)
    root/dataset_demo.json      Karpathy-style split file; entries also carry "background" and "objects" metadata
    root/images/demo_000000.png ...
    root/translations.jsonl     {"image_id", "translation"} per image
    root/processor/             CLIPProcessor (word-level tokenizer + CLIPImageProcessor)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "DEMO_VERSION",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "default_demo_root",
    "demo_vocabulary",
    "make_demo_dataset",
    "make_demo_processor",
]

DEMO_VERSION = "demo-v1"
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 225, 30),
    "purple": (140, 50, 190),
    "orange": (250, 135, 20),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "brown": (115, 75, 40),
    "teal": (30, 115, 115),
    "pink": (235, 165, 190),
}
# name -> (column, row) on a 3x3 grid; the phrase used in captions is POSITION_PHRASES[name].
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "center": (1, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
POSITION_PHRASES: dict[str, str] = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "center": "in the center",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
SIZES: dict[str, float] = {"small": 0.08, "large": 0.15}  # half-extent as a fraction of the image side
_NUMBERS = {2: "two", 3: "three", 4: "four"}
_TEMPLATE_WORDS = (
    "a an and the in at of on to with is are picture scene shapes objects background including left right above "
    "below bigger smaller than top bottom center , :"
)
_CAPTIONS_PER_IMAGE = 5


@dataclass(frozen=True)
class DemoObject:
    """One drawn object; `center` is in pixels and `half_extent` is half the object's width in pixels."""

    shape: str
    colour: str
    size: str
    position: str
    center: tuple[float, float]
    half_extent: float

    def phrase(self, *, with_size: bool = True) -> str:
        words = f"{self.size} {self.colour} {self.shape}" if with_size else f"{self.colour} {self.shape}"
        return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def cache_root() -> Path:
    """gapclip's cache folder: `$GAPCLIP_CACHE`, or `~/.cache/gapclip`."""
    return Path(os.environ.get("GAPCLIP_CACHE") or Path.home() / ".cache" / "gapclip")


def default_demo_root(num_train: int, num_val: int, num_test: int, image_size: int, seed: int) -> Path:
    """`cache_root()` / `demo-v1-<train>-<val>-<test>-<size>-s<seed>`."""
    return cache_root() / f"{DEMO_VERSION}-{num_train}-{num_val}-{num_test}-{image_size}-s{seed}"


# ---------------------------------------------------------------------------------------------------------------------
# Scene sampling and drawing
# ---------------------------------------------------------------------------------------------------------------------
def _sample_scene(rng: np.random.Generator, image_size: int) -> tuple[str, list[DemoObject]]:
    background = str(rng.choice(list(BACKGROUNDS)))
    num_objects = int(rng.integers(2, 5))
    positions = [str(p) for p in rng.choice(list(POSITIONS), size=num_objects, replace=False)]
    objects: list[DemoObject] = []
    used: set[tuple[str, str]] = set()
    cell = image_size / 3
    for position in positions:
        while True:
            shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
            if (colour, shape) not in used:
                used.add((colour, shape))
                break
        size = str(rng.choice(list(SIZES)))
        col, row = POSITIONS[position]
        jitter = rng.uniform(-0.015, 0.015, size=2) * image_size
        center = (float((col + 0.5) * cell + jitter[0]), float((row + 0.5) * cell + jitter[1]))
        objects.append(DemoObject(shape, colour, size, position, center, SIZES[size] * image_size))
    return background, objects


def _draw_object(draw: ImageDraw.ImageDraw, obj: DemoObject) -> None:
    cx, cy = obj.center
    r = obj.half_extent
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif obj.shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        draw.polygon([(cx + rr * np.cos(a), cy - rr * np.sin(a)) for a, rr in zip(angles, radii)], fill=fill)
    elif obj.shape == "cross":
        w = 0.35 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:  # pragma: no cover - internal invariant
        raise AssertionError(obj.shape)


def _render(background: str, objects: list[DemoObject], image_size: int) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw_object(draw, obj)
    return image


# ---------------------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------------------
def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _shuffled(rng: np.random.Generator, objects: list[DemoObject]) -> list[DemoObject]:
    return [objects[i] for i in rng.permutation(len(objects))]


def _t_full_positions(rng: np.random.Generator, bg: str, objects: list[DemoObject]) -> str:
    # At most 3 objects, so that the caption stays within the demo tokenizer's 32 tokens.
    return _join([f"{o.phrase()} {POSITION_PHRASES[o.position]}" for o in _shuffled(rng, objects)[:3]])


def _t_count_background(rng: np.random.Generator, bg: str, objects: list[DemoObject]) -> str:
    listed = _join([o.phrase(with_size=False) for o in _shuffled(rng, objects)])
    return f"{_NUMBERS[len(objects)]} shapes on a {bg} background: {listed}"


def _t_relation(rng: np.random.Generator, bg: str, objects: list[DemoObject]) -> str:
    a, b = _shuffled(rng, objects)[:2]
    (ca, ra), (cb, rb) = POSITIONS[a.position], POSITIONS[b.position]
    with_size = bool(rng.integers(2))
    options = []
    if ca != cb:
        options.append("to the left of" if ca < cb else "to the right of")
    if ra != rb:
        options.append("above" if ra < rb else "below")
    relation = options[int(rng.integers(len(options)))]
    return f"{a.phrase(with_size=with_size)} {relation} {b.phrase(with_size=with_size)}"


def _t_single_background(rng: np.random.Generator, bg: str, objects: list[DemoObject]) -> str:
    o = objects[int(rng.integers(len(objects)))]
    return f"a {bg} scene with {o.phrase()} {POSITION_PHRASES[o.position]}"


def _t_pair(rng: np.random.Generator, bg: str, objects: list[DemoObject]) -> str:
    a, b = _shuffled(rng, objects)[:2]
    return f"{a.phrase()} and {b.phrase()}"


def _t_where(rng: np.random.Generator, bg: str, objects: list[DemoObject]) -> str:
    o = objects[int(rng.integers(len(objects)))]
    return f"the {o.colour} {o.shape} is {POSITION_PHRASES[o.position]}"


def _t_including(rng: np.random.Generator, bg: str, objects: list[DemoObject]) -> str:
    o = objects[int(rng.integers(len(objects)))]
    return f"{bg} background with {_NUMBERS[len(objects)]} objects including {o.phrase()}"


def _t_compare(rng: np.random.Generator, bg: str, objects: list[DemoObject]) -> str:
    large = [o for o in objects if o.size == "large"]
    small = [o for o in objects if o.size == "small"]
    a, b = large[int(rng.integers(len(large)))], small[int(rng.integers(len(small)))]
    if rng.integers(2):
        return f"the {a.colour} {a.shape} is bigger than the {b.colour} {b.shape}"
    return f"the {b.colour} {b.shape} is smaller than the {a.colour} {a.shape}"


_TEMPLATES = (
    _t_full_positions,
    _t_count_background,
    _t_relation,
    _t_single_background,
    _t_pair,
    _t_where,
    _t_including,
    _t_compare,
)


def _captions(rng: np.random.Generator, background: str, objects: list[DemoObject]) -> list[str]:
    sizes = {o.size for o in objects}
    applicable = [t for t in _TEMPLATES if t is not _t_compare or len(sizes) == 2]
    chosen = [applicable[i] for i in rng.choice(len(applicable), size=_CAPTIONS_PER_IMAGE, replace=False)]
    return [template(rng, background, objects) for template in chosen]


def _salient(objects: list[DemoObject]) -> DemoObject:
    """Largest object; ties broken by reading order of the position (row, then column)."""
    return min(objects, key=lambda o: (-SIZES[o.size], POSITIONS[o.position][1], POSITIONS[o.position][0]))


def _translation(objects: list[DemoObject]) -> str:
    return f"a picture of {_salient(objects).phrase()}"


# ---------------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------------
def _validate_params(num_train: int, num_val: int, num_test: int, image_size: int, seed: int) -> None:
    for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"make_demo_dataset: {name} must be a non-negative int, got {value!r}.")
    if num_train + num_val + num_test == 0:
        raise ValueError("make_demo_dataset: num_train + num_val + num_test must be > 0, got 0 images.")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 24:
        raise ValueError(f"make_demo_dataset: image_size must be an int >= 24 pixels, got {image_size!r}.")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"make_demo_dataset: seed must be a non-negative int, got {seed!r}.")


def _write_demo(folder: Path, meta: dict[str, Any]) -> None:
    rng = np.random.default_rng([meta["seed"], 20240601])
    image_size = meta["image_size"]
    (folder / "images").mkdir(parents=True)
    entries, translations = [], []
    split_sizes = (("train", meta["num_train"]), ("val", meta["num_val"]), ("test", meta["num_test"]))
    index = 0
    for split, count in split_sizes:
        for _ in range(count):
            background, objects = _sample_scene(rng, image_size)
            filename = f"demo_{index:06d}.png"
            _render(background, objects, image_size).save(folder / "images" / filename, format="PNG")
            captions = _captions(rng, background, objects)
            entries.append(
                {
                    "filename": filename,
                    "imgid": index,
                    "split": split,
                    "sentences": [{"raw": c, "tokens": c.split(), "imgid": index} for c in captions],
                    "background": background,
                    "objects": [asdict(o) for o in objects],
                }
            )
            translations.append({"image_id": str(index), "translation": _translation(objects)})
            index += 1
    with (folder / "dataset_demo.json").open("w", encoding="utf-8") as handle:
        json.dump({"images": entries, "dataset": "demo"}, handle)
    with (folder / "translations.jsonl").open("w", encoding="utf-8") as handle:
        for row in translations:
            handle.write(json.dumps(row) + "\n")
    _build_processor(image_size).save_pretrained(folder / "processor")
    # meta.json last: its presence marks a complete folder.
    with (folder / "meta.json").open("w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=2, sort_keys=True)


def make_demo_dataset(
    root: str | os.PathLike | None = None,
    *,
    num_train: int = 2000,
    num_val: int = 500,
    num_test: int = 1000,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Generate (or reuse) the synthetic demo set and return its folder.

    Generation is deterministic in all arguments (same seed -> identical JSON and PNG bytes) and cached: if `root`
    already holds a demo set with the same `meta.json` it is reused; a folder holding something else raises
    ValueError. The folder is written to a temporary sibling and renamed into place, so concurrent callers never see
    a half-written set.

    Args:
        root: output folder; default `$GAPCLIP_CACHE` (or `~/.cache/gapclip`) /
            `demo-v1-<train>-<val>-<test>-<size>-s<seed>`.
        num_train, num_val, num_test: images per split (Karpathy splits "train", "val", "test").
        image_size: side of the square images in pixels (>= 24).
        seed: random seed.
    """
    _validate_params(num_train, num_val, num_test, image_size, seed)
    meta = {
        "version": DEMO_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "num_test": num_test,
        "image_size": image_size,
        "seed": seed,
    }
    root = Path(root) if root is not None else default_demo_root(num_train, num_val, num_test, image_size, seed)
    return write_cached_folder(
        root, meta, _write_demo, what="demo set",
        description=f"demo dataset ({num_train}/{num_val}/{num_test} images, {image_size}px)",
    )


def write_cached_folder(
    root: Path, meta: dict[str, Any], write: Any, *, what: str, description: str
) -> Path:
    """Reuse ``root`` when its ``meta.json`` equals ``meta``; otherwise ``write(tmp, meta)`` into a temporary sibling
    and rename it into place (``write`` must write ``meta.json`` last), so concurrent callers never see a half-written
    folder. A non-empty ``root`` holding something else raises ``ValueError``."""
    if _matches(root, meta):
        logger.info(f"Reusing cached {what} at {root}.")
        return root
    if root.exists() and any(root.iterdir()):
        raise ValueError(
            f"folder {str(root)!r} exists but does not hold a {what} with parameters {meta} "
            f"(meta.json: {_read_meta(root)}); pass another root or remove the folder."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-{uuid.uuid4().hex[:8]}-", dir=root.parent))
    try:
        logger.info(f"Generating {description} in {root}.")
        write(tmp, meta)
        if root.exists():
            root.rmdir()  # empty folder left by the caller
        os.rename(tmp, root)
    except OSError:
        if _matches(root, meta):  # another process won the race
            return root
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _read_meta(root: Path) -> dict[str, Any] | None:
    try:
        with (root / "meta.json").open(encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None


def _matches(root: Path, meta: dict[str, Any]) -> bool:
    return _read_meta(root) == meta


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer / processor
# ---------------------------------------------------------------------------------------------------------------------
def demo_vocabulary() -> list[str]:
    """All words the demo captions and translations can contain (sorted, without special tokens)."""
    words = set(_TEMPLATE_WORDS.split())
    words.update(SHAPES, COLOURS, BACKGROUNDS, SIZES, _NUMBERS.values())
    for name in POSITIONS:
        words.update(name.split())
    words.update(w for phrase in POSITION_PHRASES.values() for w in phrase.split())
    return sorted(words)


def _build_processor(image_size: int) -> Any:
    from .tokenization import word_level_processor

    return word_level_processor(demo_vocabulary(), image_size, max_length=32)


def make_demo_processor(root: str | os.PathLike) -> Any:
    """Return the demo `CLIPProcessor` saved in `root/processor/`, building and saving it there if missing.

    The tokenizer is `gapclip.data.tokenization.word_level_tokenizer` over `demo_vocabulary()` (`[PAD]`=0,
    `[UNK]`=1, `[SOS]`=2, `[EOS]`=last id, `model_max_length=32`); the image processor is a `CLIPImageProcessor`
    resizing/cropping to the demo image size.
    """
    from transformers import CLIPProcessor

    root = Path(root)
    meta = _read_meta(root)
    if meta is None:
        raise FileNotFoundError(
            f"make_demo_processor: {str(root / 'meta.json')!r} not found; run make_demo_dataset first."
        )
    target = root / "processor"
    if not (target / "tokenizer.json").is_file():
        _build_processor(int(meta["image_size"])).save_pretrained(target)
    return CLIPProcessor.from_pretrained(target)
