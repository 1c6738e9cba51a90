"""Decode once: every training image resized and cropped a single time, kept as uint8 pixels in one memory-mapped file.

Multi-epoch training decodes every JPEG again each epoch. :func:`build_pixel_cache` runs the processor's geometry
(:class:`~gapclip.data.image_transform.ImageTransform`: decode, resize, center crop; no randomness, so caching it
changes nothing) over a split once, in a thread pool with a progress bar, and stores the result as a
`(rows, height, width, 3)` uint8 `.npy` file. :class:`CaptionPairs` then reads each row from the memory map, and the
collator only stacks and normalises (:meth:`ImageTransform.normalize`): the float32 `pixel_values` equal the uncached
path's exactly.

The cache folder is named by a key over everything that changes the pixels: the transform's settings (backend,
resize mode and size, filter, crop, reduced decoding), and per row the image id and the image itself (for a file: its
absolute path, size and modification time; for bytes stored in the dataset: their xxh3 hash). Another image size,
processor or data gets another folder; a cache is never reused for data it was not built from. A folder appears
under its key only when complete (built under a temporary name, then renamed), so a killed build leaves no cache to
trust, and the next run builds again.

Disk: `rows × height × width × 3` bytes, e.g. 118,287 COCO images at 224 px take 17.8 GB (16.6 GiB); the build
checks the free space first. Each cache is one folder under `$GAPCLIP_CACHE/pixels/` (or the folder given); delete
it to reclaim the space.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, Image
from tqdm.auto import tqdm
from transformers.utils import logging

from .image_transform import ImageTransform
from .pairs import decode_pixels
from .verify import BadImage

logger = logging.get_logger(__name__)

__all__ = ["PixelCache", "build_pixel_cache", "pixel_cache_bytes", "pixel_cache_key"]

CACHE_FORMAT = "gapclip-pixels-v1"
_META = "meta.json"
_PIXELS = "pixels.npy"
# Room left on the disk beside the cache, for everything else that writes there during training.
_DISK_MARGIN = 1 << 30


@dataclass
class PixelCache:
    """A built cache: `cache[row]` is that row's (height, width, 3) uint8 pixels (a read-only memory-mapped view).

    `bad` lists the rows whose image could not be decoded (their pixels are zeros); the memory map is opened lazily
    in each process, so a DataLoader worker maps the file itself instead of receiving a copy.
    """

    folder: Path
    shape: tuple[int, int, int, int]
    settings: dict[str, Any]
    bad: list[BadImage] = field(default_factory=list)
    _array: np.ndarray | None = field(default=None, repr=False, compare=False)

    @classmethod
    def open(cls, folder: str | os.PathLike) -> PixelCache:
        folder = Path(folder)
        meta = json.loads((folder / _META).read_text(encoding="utf-8"))
        if meta.get("format") != CACHE_FORMAT:
            raise ValueError(f"{folder} is not a gapclip pixel cache of format {CACHE_FORMAT!r}.")
        bad = [BadImage(**entry) for entry in meta["bad"]]
        return cls(folder, tuple(meta["shape"]), meta["settings"], bad)

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.folder / _PIXELS, mmap_mode="r")
        return self._array

    @property
    def bad_rows(self) -> dict[int, str]:
        return {entry.row: entry.describe() for entry in self.bad}

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, row: int) -> np.ndarray:
        return self.array[row]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}


def pixel_cache_bytes(num_images: int, transform: ImageTransform) -> int:
    """The size of the cache of ``num_images`` images: rows × height × width × 3 bytes."""
    height, width = _output_shape(transform)
    return int(num_images) * height * width * 3


def _output_shape(transform: ImageTransform) -> tuple[int, int]:
    if transform.crop is not None:
        return transform.crop
    if transform.resize == "exact":
        return (transform.size[0], transform.size[1])
    raise ValueError(
        "The pixel cache stores one image size: it needs a processor that center-crops or resizes to a fixed "
        f"height and width (this one: resize={transform.resize!r}, crop=None)."
    )


def _image_cells(dataset: Dataset, batch_size: int = 1024) -> Iterator[tuple[int, str, Any]]:
    raw = dataset.select_columns(["image_id", "image"]).cast_column("image", Image(decode=False))
    for start in range(0, len(raw), batch_size):
        chunk = raw[start : start + batch_size]
        for offset, (image_id, value) in enumerate(zip(chunk["image_id"], chunk["image"])):
            yield start + offset, str(image_id), value


def _identity(value: dict[str, Any]) -> str:
    """What identifies an image: its file (absolute path, size, modification time) or a hash of its stored bytes."""
    import xxhash

    if value.get("bytes") is not None:
        return "bytes:" + xxhash.xxh3_64_hexdigest(value["bytes"])
    path = os.path.abspath(value.get("path") or "")
    try:
        stat = os.stat(path)
    except OSError:
        return f"file:{path}:missing"
    return f"file:{path}:{stat.st_size}:{stat.st_mtime_ns}"


def pixel_cache_key(dataset: Dataset, transform: ImageTransform) -> str:
    """The cache key of ``dataset`` under ``transform`` (see the module docstring): 24 hex digits."""
    import xxhash

    digest = xxhash.xxh3_128()
    digest.update(json.dumps({"format": CACHE_FORMAT, "settings": transform.settings(), "rows": len(dataset)},
                             sort_keys=True).encode())
    for _, image_id, value in _image_cells(dataset):
        digest.update(f"\0{image_id}\0{_identity(value)}".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:24]


def _check_disk(root: Path, needed: int, num_images: int, shape: tuple[int, int]) -> None:
    free = shutil.disk_usage(root).free
    if needed + _DISK_MARGIN > free:
        raise ValueError(
            f"The pixel cache needs {needed / 1e9:.1f} GB in {root} ({num_images:,} images × {shape[0]}×{shape[1]}×3 "
            f"bytes) plus {_DISK_MARGIN / 1e9:.1f} GB to spare, but only {free / 1e9:.1f} GB are free. Free some "
            "space, point --pixel_cache_dir at a disk with room, or train without --pixel_cache."
        )


def _remove_abandoned_builds(root: Path, key: str) -> None:
    """Temporary folders of builds of this key whose process is gone (killed mid-build)."""
    for partial in root.glob(f"{key}.partial-*"):
        pid = partial.name.split(".partial-", 1)[1].split("-", 1)[0]  # mkdtemp's suffix holds no "-"
        try:
            os.kill(int(pid), 0)
            continue  # still building
        except (ValueError, ProcessLookupError):
            shutil.rmtree(partial, ignore_errors=True)
        except PermissionError:
            continue


def build_pixel_cache(
    dataset: Dataset,
    transform: ImageTransform,
    cache_dir: str | os.PathLike | None = None,
    *,
    split: str = "train",
    num_threads: int | None = None,
    show_progress: bool = True,
) -> PixelCache:
    """The pixel cache of ``dataset`` under ``transform``: opened when a complete one exists, built otherwise.

    Args:
        dataset: a caption split (``image_id``, ``image`` columns; see :mod:`gapclip.data.loaders`).
        transform: the processor's :class:`ImageTransform` (its crop, or exact resize, fixes the stored size).
        cache_dir: the folder holding caches (default ``$GAPCLIP_CACHE/pixels``, i.e. ``~/.cache/gapclip/pixels``).
        split: the split's name, for the progress bar and the report of unreadable images.
        num_threads: decoding threads (default one per CPU, at most 32; Pillow releases the GIL while decoding).
        show_progress: a tqdm progress bar while building.

    Unreadable images do not stop the build: they are listed in ``cache.bad`` (the caller decides, as with
    ``--on_bad_image``) and their pixels are zeros.

    Raises:
        ValueError: too little free disk space (the message gives the size needed and the space free), or a
            processor without a fixed output size.
    """
    from .demo import cache_root

    root = Path(cache_dir) if cache_dir is not None else cache_root() / "pixels"
    root.mkdir(parents=True, exist_ok=True)
    height, width = _output_shape(transform)
    key = pixel_cache_key(dataset, transform)
    folder = root / key
    if (folder / _META).is_file():
        cache = PixelCache.open(folder)
        logger.info(f"Using the pixel cache {folder} ({len(cache):,} images, {cache.nbytes / 1e9:.2f} GB).")
        return cache
    num_images = len(dataset)
    needed = pixel_cache_bytes(num_images, transform)
    _check_disk(root, needed, num_images, (height, width))
    _remove_abandoned_builds(root, key)
    logger.warning(
        f"Building the pixel cache of split {split!r}: {num_images:,} images × {height}×{width}×3 bytes = "
        f"{needed / 1e9:.2f} GB in {folder} (every image decoded and resized once; later epochs and runs on the same "
        "data and image settings read it)."
    )
    partial = Path(tempfile.mkdtemp(prefix=f"{key}.partial-{os.getpid()}-", dir=root))
    try:
        pixels = np.lib.format.open_memmap(partial / _PIXELS, mode="w+", dtype=np.uint8,
                                           shape=(num_images, height, width, 3))
        bad = _fill(pixels, dataset, transform, split, num_threads, show_progress)
        pixels.flush()
        del pixels
        meta = {"format": CACHE_FORMAT, "key": key, "shape": [num_images, height, width, 3],
                "settings": transform.settings(), "bad": [entry.__dict__ for entry in bad],
                "built": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (partial / _META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        try:
            os.replace(partial, folder)
        except OSError:
            if not (folder / _META).is_file():  # not another process finishing first: a real error
                raise
            shutil.rmtree(partial, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return PixelCache.open(folder)


def _fill(pixels: np.ndarray, dataset: Dataset, transform: ImageTransform, split: str, num_threads: int | None,
          show_progress: bool) -> list[BadImage]:
    workers = num_threads or min(32, os.cpu_count() or 1)
    bad: list[BadImage] = []

    def one(cell: tuple[int, str, Any]) -> BadImage | None:
        row, image_id, value = cell
        try:
            array = decode_pixels(value, transform, image_id=image_id, row=row)
        except ValueError as err:
            cause = err.__cause__ or err
            path = value.get("path") if isinstance(value, dict) else None
            return BadImage(split, row, image_id, path, f"{type(cause).__name__}: {cause}")
        if array.shape != pixels.shape[1:]:
            return BadImage(split, row, image_id, value.get("path"),
                            f"ValueError: processed to {array.shape}, not {pixels.shape[1:]}")
        pixels[row] = array
        return None

    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=len(dataset), desc=f"Pixel cache ({split})", unit="img", disable=not show_progress
    ) as progress:
        cells = _image_cells(dataset)
        while True:
            chunk = [cell for _, cell in zip(range(256 * workers), cells)]
            if not chunk:
                break
            for result in pool.map(one, chunk):
                if result is not None:
                    bad.append(result)
                progress.update(1)
    return bad
