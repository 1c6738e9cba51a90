"""Training pairs over a canonical caption dataset (see `gapclip.data.loaders`).

`CaptionPairs` wraps a `datasets.Dataset` and serves `{"image", "caption", "caption_index", "image_index",
"image_id"}` items plus the row's value of every further column (e.g. `translation`, or a column a gap term of your
own reads; see `gapclip.losses.TermInput`), either one caption per image per epoch (`mode="one_per_image"`) or
every (image, caption) pair (`mode="all_pairs"`). `IterableCaptionPairs` is the streaming counterpart for a
`datasets.IterableDataset` and picks captions with the same rule, so both yield the same items for the same rows.

The caption chosen for row `r` at epoch `e` in `one_per_image` mode is `perm[e % n]`, where `n` is the number of
captions and `perm` is a permutation of `range(n)` drawn from a numpy Generator seeded with `(seed, r, e // n)`: each
caption of an image is used once every `n` epochs, in an order that differs between images, and a resumed run (same
seed and epoch) sees the same captions.

Images are decoded when an item is fetched and converted to RGB (greyscale, palette and RGBA images work; transparency
is composited onto white). With an `image_transform` (the backbone processor's geometry, see
`gapclip.data.image_transform`) items carry the resized and cropped uint8 `pixels` instead of the PIL `image`, and
with a `pixel_cache` (`gapclip.data.pixel_cache`) those pixels are read from the cache instead of decoded. An unreadable image raises ValueError naming its id and path; with `on_bad_image="skip"` the
item is replaced by the next readable one and the bad images are counted and logged, and once the fraction of distinct
bad images exceeds `max_bad_image_fraction` of the split (of the rows seen so far when streaming) a ValueError says how
many were bad.

The epoch lives in shared memory, so DataLoader workers, persistent ones (`--dataloader_persistent_workers`) included,
draw the captions of the epoch that `set_epoch` set in the main process.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from datasets import Dataset, Image, IterableDataset
from PIL import Image as PILImage
from transformers.utils import logging

from .image_transform import ImageTransform, open_image, to_rgb

logger = logging.get_logger(__name__)

__all__ = ["CaptionPairs", "IterableCaptionPairs", "choose_caption_index", "decode_image", "decode_pixels"]

_MODES = ("one_per_image", "all_pairs")
_ON_BAD_IMAGE = ("error", "skip")


def choose_caption_index(num_captions: int, *, seed: int, epoch: int, row: int) -> int:
    """Deterministic caption index for `row` at `epoch` (cycles through all captions every `num_captions` epochs)."""
    if num_captions <= 0:
        raise ValueError(f"row {row} has {num_captions} captions; at least one is required.")
    cycle, offset = divmod(int(epoch), num_captions)
    permutation = np.random.default_rng([int(seed), int(row), cycle]).permutation(num_captions)
    return int(permutation[offset])


def decode_image(value: Any, *, image_id: str, row: int) -> PILImage.Image:
    """Decode an undecoded `Image` cell (`{"bytes", "path"}`), a path or a PIL image into an RGB PIL image.

    Raises:
        ValueError: naming the image id, row and path when the image cannot be read.
    """
    with _reading(value, image_id, row):
        image, _ = open_image(value)
        image.load()
        return to_rgb(image)


def decode_pixels(value: Any, transform: ImageTransform, *, image_id: str, row: int) -> np.ndarray:
    """Decode an image cell (as `decode_image`) straight into the processor's resized and cropped uint8 pixels
    (`transform.load`: reduced-scale JPEG decoding when the transform asks for it).

    Raises:
        ValueError: naming the image id, row and path when the image cannot be read.
    """
    with _reading(value, image_id, row):
        image, _ = open_image(value)
        return transform.load(image)


@contextlib.contextmanager
def _reading(value: Any, image_id: str, row: int) -> Iterator[None]:
    try:
        yield
    except Exception as err:  # PIL raises OSError, UnidentifiedImageError, SyntaxError, ValueError, ...
        path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
        raise ValueError(
            f"could not read image of image_id={image_id!r} (row {row}, path={path!r}): {type(err).__name__}: {err}"
        ) from err


def _check_options(mode: str, on_bad_image: str, max_bad_image_fraction: float) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode={mode!r} is not supported; accepted values are {list(_MODES)}.")
    if on_bad_image not in _ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image={on_bad_image!r} is not supported; accepted values are {list(_ON_BAD_IMAGE)}.")
    if not 0.0 <= float(max_bad_image_fraction) <= 1.0:
        raise ValueError(f"max_bad_image_fraction must be in [0, 1], got {max_bad_image_fraction!r}.")


def _check_columns(column_names: list[str] | None, features: Any, kind: str) -> None:
    if column_names is None:
        return
    missing = [c for c in ("image", "captions", "image_id") if c not in column_names]
    if missing:
        raise ValueError(
            f"{kind} needs a caption dataset with columns 'image_id', 'image', 'captions' (see gapclip.data.loaders); "
            f"missing {missing}, available columns: {column_names}."
        )
    if features is not None and not isinstance(features["image"], Image):
        raise TypeError(f"{kind}: column 'image' must be a datasets.Image feature, got {features['image']!r}.")


def _set_pair_options(
    pairs: Any, dataset: Any, kind: str, mode: str, seed: int, on_bad_image: str, max_bad_image_fraction: float
) -> None:
    """Validate and store the options both pair datasets share."""
    _check_options(mode, on_bad_image, max_bad_image_fraction)
    _check_columns(dataset.column_names, dataset.features, kind)
    pairs.dataset = dataset
    pairs.mode = mode
    pairs.seed = int(seed)
    pairs.on_bad_image = on_bad_image
    pairs.max_bad_image_fraction = float(max_bad_image_fraction)
    pairs._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
    pairs.num_skipped = 0


class _SharedEpoch:
    """`epoch` kept in shared memory: a DataLoader worker forked or spawned from the main process (a persistent
    one too) reads what `set_epoch` writes there afterwards."""

    _epoch: torch.Tensor

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.fill_(int(value))


def _undecoded(dataset: Dataset | IterableDataset) -> Dataset | IterableDataset:
    return dataset.cast_column("image", Image(decode=False))


#: The canonical caption columns; every other column of a split is passed on in the items as it is.
_CAPTION_COLUMNS = ("image_id", "image", "captions")


def _item(record: dict[str, Any], visual: dict[str, Any], captions: list[str], caption_index: int, row: int) -> dict:
    item = {
        **visual,
        "caption": captions[caption_index],
        "caption_index": caption_index,
        "image_index": row,
        "image_id": str(record["image_id"]),
    }
    for column, value in record.items():
        if column in _CAPTION_COLUMNS:
            continue
        if column in item:
            raise ValueError(
                f"The dataset column {column!r} clashes with the item key of the same name "
                f"({sorted(item)}); rename the column."
            )
        item[column] = value
    return item


class CaptionPairs(_SharedEpoch, torch.utils.data.Dataset):
    """Map-style (image, caption) pairs over a caption `datasets.Dataset`.

    Args:
        dataset: a split with columns `image_id`, `image` (`Image` feature), `captions`, and any further columns
            (e.g. `translation`), which are passed on in every item under their own names.
        mode: `"one_per_image"` (default; `len` = number of images, one caption per image chosen by
            `choose_caption_index(seed, epoch, row)`) or `"all_pairs"` (`len` = total number of captions).
        seed: seed of the caption choice.
        on_bad_image: `"error"` (default) or `"skip"` (serve the next readable item instead).
        max_bad_image_fraction: in skip mode, raise once more than this fraction of the split's images is unreadable.
        image_transform: the processor's :class:`~gapclip.data.image_transform.ImageTransform`: items carry
            `"pixels"` ((height, width, 3) uint8, resized and cropped) instead of `"image"`.
        pixel_cache: a :class:`~gapclip.data.pixel_cache.PixelCache` built from this split: items carry its
            `"pixels"`; the images it could not decode count as unreadable.

    Items: `{"image": PIL.Image (RGB)` or `"pixels": uint8 array, "caption": str, "caption_index": int,
    "image_index": int (row in the split), "image_id": str, **further columns}`. Call `set_epoch(epoch)` at the start
    of every epoch. With DataLoader workers, each worker keeps its own bad-image counters.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        mode: str = "one_per_image",
        seed: int = 0,
        on_bad_image: str = "error",
        max_bad_image_fraction: float = 0.01,
        image_transform: ImageTransform | None = None,
        pixel_cache: Any = None,  # a PixelCache; not imported, since pixel_cache imports this module
    ) -> None:
        if not isinstance(dataset, Dataset):
            raise TypeError(
                f"CaptionPairs expects a datasets.Dataset, got {type(dataset).__name__}; "
                "use IterableCaptionPairs for a datasets.IterableDataset."
            )
        _set_pair_options(self, dataset, "CaptionPairs", mode, seed, on_bad_image, max_bad_image_fraction)
        self.image_transform = image_transform
        self.pixel_cache: Any = None
        self._cache_bad: dict[int, str] = {}
        if pixel_cache is not None:
            self.use_pixel_cache(pixel_cache)
        self.bad_rows: dict[int, str] = {}
        self._raw = _undecoded(dataset)
        self._counts = self._caption_counts()
        empty = np.flatnonzero(self._counts == 0)
        if len(empty):
            ids = [self.dataset[int(r)]["image_id"] for r in empty[:5]]
            raise ValueError(f"CaptionPairs: {len(empty)} image(s) have no caption, e.g. image_id(s) {ids}.")
        blank = np.flatnonzero(self._blank)
        if len(blank):
            ids = [self.dataset[int(r)]["image_id"] for r in blank[:5]]
            raise ValueError(
                f"CaptionPairs: {int(self._blank.sum())} caption(s) of {len(blank)} image(s) are empty or "
                f"whitespace-only, e.g. image_id(s) {ids}; drop them first (gapclip's loaders do)."
            )
        self._ends = np.cumsum(self._counts)

    def _caption_counts(self) -> np.ndarray:
        counted = self._raw.map(
            lambda captions: {
                "n": [len(c) for c in captions],
                "blank": [sum(not (text or "").strip() for text in c) for c in captions],
            },
            batched=True,
            input_columns="captions",
            remove_columns=self._raw.column_names,
            keep_in_memory=True,
        )
        self._blank = np.asarray(counted["blank"], dtype=np.int64)
        return np.asarray(counted["n"], dtype=np.int64)

    def use_pixel_cache(self, cache: Any) -> None:
        """Serve the `pixels` of ``cache`` (built from this split) instead of decoding images."""
        if len(cache) != len(self.dataset):
            raise ValueError(
                f"CaptionPairs: the pixel cache {cache.folder} holds {len(cache)} images but the split has "
                f"{len(self.dataset)} rows; build the cache from this split (gapclip.data.pixel_cache.build_pixel_cache)."
            )
        self.pixel_cache = cache
        self._cache_bad = cache.bad_rows

    @property
    def num_images(self) -> int:
        return len(self._counts)

    @property
    def num_captions(self) -> int:
        return int(self._counts.sum())

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch used by the `one_per_image` caption choice."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_images if self.mode == "one_per_image" else self.num_captions

    def _locate(self, index: int) -> tuple[int, int | None]:
        """Item index -> (row, caption index or None for the epoch rule)."""
        if self.mode == "one_per_image":
            return index, None
        row = int(np.searchsorted(self._ends, index, side="right"))
        start = int(self._ends[row - 1]) if row > 0 else 0
        return row, index - start

    def _fetch(self, row: int, caption_index: int | None) -> dict[str, Any]:
        record = self._raw[row]
        image_id = str(record["image_id"])
        captions = record["captions"]
        if caption_index is None:
            caption_index = choose_caption_index(len(captions), seed=self.seed, epoch=self.epoch, row=row)
        return _item(record, self._visual(record["image"], image_id, row), captions, caption_index, row)

    def _visual(self, value: Any, image_id: str, row: int) -> dict[str, Any]:
        if self.pixel_cache is not None:
            if row in self._cache_bad:
                raise ValueError(f"unreadable when the pixel cache was built: {self._cache_bad[row]}")
            return {"pixels": self.pixel_cache[row]}
        if self.image_transform is not None:
            return {"pixels": decode_pixels(value, self.image_transform, image_id=image_id, row=row)}
        return {"image": decode_image(value, image_id=image_id, row=row)}

    def _record_bad(self, row: int, err: ValueError) -> None:
        if row not in self.bad_rows:
            self.bad_rows[row] = str(err)
            logger.warning(f"Skipping unreadable image ({len(self.bad_rows)} bad so far): {err}")
        limit = self.max_bad_image_fraction * self.num_images
        if len(self.bad_rows) > limit:
            raise ValueError(
                f"{len(self.bad_rows)} of {self.num_images} images are unreadable, more than "
                f"max_bad_image_fraction={self.max_bad_image_fraction} of the split; last error: {err}"
            ) from err

    def __getitem__(self, index: int) -> dict[str, Any]:
        size = len(self)
        if not -size <= index < size:
            raise IndexError(f"index {index} out of range for CaptionPairs of length {size}.")
        index %= size
        for attempt in range(size):
            row, caption_index = self._locate((index + attempt) % size)
            if row in self.bad_rows:
                continue
            try:
                item = self._fetch(row, caption_index)
            except ValueError as err:
                if self.on_bad_image == "error":
                    raise
                self._record_bad(row, err)
                continue
            if attempt:
                self.num_skipped += 1
            return item
        raise ValueError(f"CaptionPairs: no readable image in the whole split ({self.num_images} images).")


class IterableCaptionPairs(_SharedEpoch, torch.utils.data.IterableDataset):
    """Streaming counterpart of `CaptionPairs` over a caption `datasets.IterableDataset`.

    Rows are numbered in iteration order (`image_index`); captions are chosen with the same rule as `CaptionPairs`,
    so for the same rows and epoch both yield the same items. `on_bad_image="skip"` drops unreadable rows, and raises
    once the bad fraction of the rows seen exceeds `max_bad_image_fraction` (checked after at least
    `1 / max_bad_image_fraction` rows, and at the end of the iteration). `set_epoch` is forwarded to the dataset so
    its shuffling follows the epoch too. Under DataLoader workers each worker streams its own shards and numbers its
    own rows, so `image_index` is unique within a batch but not across workers. With an `image_transform`, items
    carry `"pixels"` instead of `"image"`, as in `CaptionPairs`.
    """

    def __init__(
        self,
        dataset: IterableDataset,
        *,
        mode: str = "one_per_image",
        seed: int = 0,
        on_bad_image: str = "error",
        max_bad_image_fraction: float = 0.01,
        image_transform: ImageTransform | None = None,
    ) -> None:
        if not isinstance(dataset, IterableDataset):
            raise TypeError(
                f"IterableCaptionPairs expects a datasets.IterableDataset, got {type(dataset).__name__}; "
                "use CaptionPairs for a datasets.Dataset."
            )
        _set_pair_options(self, dataset, "IterableCaptionPairs", mode, seed, on_bad_image, max_bad_image_fraction)
        self.image_transform = image_transform
        self.num_seen = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.dataset.set_epoch(self.epoch)

    def _check_fraction(self, err: Exception | None, *, final: bool) -> None:
        if not self.num_skipped:
            return
        min_seen = math.ceil(1 / self.max_bad_image_fraction) if self.max_bad_image_fraction > 0 else 1
        if (final or self.num_seen >= min_seen) and self.num_skipped > self.max_bad_image_fraction * self.num_seen:
            raise ValueError(
                f"{self.num_skipped} of {self.num_seen} streamed images were unreadable, more than "
                f"max_bad_image_fraction={self.max_bad_image_fraction}" + (f"; last error: {err}" if err else ".")
            )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.num_seen = 0
        self.num_skipped = 0
        last_error: Exception | None = None
        for row, record in enumerate(_undecoded(self.dataset)):
            self.num_seen += 1
            image_id = str(record["image_id"])
            try:
                if self.image_transform is not None:
                    visual = {"pixels": decode_pixels(record["image"], self.image_transform, image_id=image_id, row=row)}
                else:
                    visual = {"image": decode_image(record["image"], image_id=image_id, row=row)}
            except ValueError as err:
                if self.on_bad_image == "error":
                    raise
                self.num_skipped += 1
                last_error = err
                logger.warning(f"Skipping unreadable image ({self.num_skipped} bad so far): {err}")
                self._check_fraction(err, final=False)
                continue
            captions = record["captions"]
            if not captions:
                raise ValueError(f"IterableCaptionPairs: image_id={image_id!r} (row {row}) has no caption.")
            if any(not (text or "").strip() for text in captions):
                raise ValueError(
                    f"IterableCaptionPairs: image_id={image_id!r} (row {row}) has an empty or whitespace-only "
                    f"caption ({list(captions)!r}); drop it first (gapclip's loaders do)."
                )
            if self.mode == "one_per_image":
                indices = [choose_caption_index(len(captions), seed=self.seed, epoch=self.epoch, row=row)]
            else:
                indices = range(len(captions))
            for caption_index in indices:
                yield _item(record, visual, captions, caption_index, row)
            self._check_fraction(last_error, final=False)
        self._check_fraction(last_error, final=True)
