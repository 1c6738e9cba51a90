"""Decode every image of a caption dataset once, up front (``--verify_images``).

Without it, a corrupt, truncated or zero-byte image is found only when its row is fetched, possibly hours into a
run. :func:`find_bad_images` fully decodes each image (``PIL.Image.load``, which is where truncated files fail) in a
thread pool (Pillow releases the GIL while decoding), with a tqdm progress bar, and returns every bad one at once;
:func:`format_bad_images` turns them into one report (file, image id, split, row, error).

Under several processes each one decodes its share of the rows (row ``i`` goes to process ``i % world_size``) and
the lists are gathered, so every process gets the whole report.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from datasets import Dataset, Image
from tqdm.auto import tqdm

from .pairs import decode_image

__all__ = ["BadImage", "find_bad_images", "format_bad_images", "verify_splits"]


@dataclass(frozen=True)
class BadImage:
    """An image that could not be decoded: where it is and why."""

    split: str
    row: int
    image_id: str
    path: str | None
    error: str

    def describe(self) -> str:
        where = self.path if self.path else "<image bytes stored in the dataset>"
        return f"{where} (image_id={self.image_id!r}, split {self.split!r}, row {self.row}): {self.error}"


def _check(value: Any, image_id: str, row: int, split: str) -> BadImage | None:
    try:
        decode_image(value, image_id=image_id, row=row)
    except ValueError as err:
        cause = err.__cause__ or err
        path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
        return BadImage(split, row, image_id, path, f"{type(cause).__name__}: {cause}")
    return None


def find_bad_images(
    dataset: Dataset,
    *,
    split: str = "",
    num_workers: int | None = None,
    chunk_size: int = 256,
    show_progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> list[BadImage]:
    """Decode every image of ``dataset`` (an ``image_id``/``image`` caption split); return the ones that fail.

    Args:
        dataset: a caption split (``gapclip.data.loaders`` features).
        split: its name, for the report.
        num_workers: decoding threads (default: the number of CPUs, at most 32).
        chunk_size: rows read from the dataset at a time.
        show_progress: a tqdm progress bar.
        rank, world_size: decode only rows ``rank, rank + world_size, ...`` (the caller gathers the results).

    Returns:
        The undecodable images, in row order.
    """
    workers = num_workers or min(32, os.cpu_count() or 1)
    raw = dataset.select_columns(["image_id", "image"]).cast_column("image", Image(decode=False))
    rows = range(rank, len(raw), world_size)
    bad: list[BadImage] = []
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=len(rows), desc=f"Verifying images{f' ({split})' if split else ''}", unit="img",
        disable=not show_progress,
    ) as progress:
        for start in range(0, len(rows), chunk_size):
            indices = list(rows[start : start + chunk_size])
            chunk = raw[indices] if world_size > 1 else raw[indices[0] : indices[-1] + 1]
            results = pool.map(
                _check, chunk["image"], [str(i) for i in chunk["image_id"]], indices, [split] * len(indices)
            )
            for result in results:
                if result is not None:
                    bad.append(result)
                progress.update(1)
    return bad


def format_bad_images(bad: Sequence[BadImage], *, flag: str = "--verify_images") -> str:
    """One report of every bad image, one per line."""
    lines = "\n".join(f"  {image.describe()}" for image in bad)
    return f"{flag} found {len(bad)} unreadable image(s):\n{lines}"


def verify_splits(
    splits: dict[str, Dataset],
    *,
    train_split: str,
    on_bad_image: str = "error",
    max_bad_image_fraction: float = 0.01,
    rank: int = 0,
    world_size: int = 1,
    show_progress: bool = True,
) -> Dataset:
    """Decode every image of ``splits`` (``{name: split}``); return the training split, checked.

    Any unreadable image is a ``ValueError`` listing every one of them, except with ``on_bad_image="skip"``, where
    unreadable *training* images are left out (with that list as a warning) as long as they are at most
    ``max_bad_image_fraction`` of the split; evaluation splits must be readable either way. Under several processes
    each decodes its share of the rows and the lists are gathered (``torch.distributed``), so all get the same split.
    """
    import torch.distributed as dist
    from transformers.utils import logging

    from ..distributed import distributed_info

    logger = logging.get_logger(__name__)
    bad = [b for name, split in splits.items()
           for b in find_bad_images(split, split=name, rank=rank, world_size=world_size, show_progress=show_progress)]
    if world_size > 1 and distributed_info()[1] > 1:
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, bad)
        order = list(splits)
        bad = sorted((b for part in gathered for b in part), key=lambda b: (order.index(b.split), b.row))
    train = splits[train_split]
    if not bad:
        if rank == 0:
            logger.warning(f"--verify_images: every image of the {list(splits)} split(s) decodes.")
        return train
    in_train = [b for b in bad if b.split == train_split]
    if on_bad_image == "error" or len(in_train) < len(bad):
        hint = ("--on_bad_image skip leaves unreadable training images out" if on_bad_image == "error"
                else "--on_bad_image skip applies to the training split only")
        raise ValueError(f"{format_bad_images(bad)}\nFix or remove these files ({hint}; evaluation splits must be "
                         "readable).")
    if len(in_train) > max_bad_image_fraction * len(train):
        raise ValueError(
            f"{format_bad_images(bad)}\n{len(in_train)} of {len(train)} training images are unreadable, more than "
            f"--max_bad_image_fraction={max_bad_image_fraction}."
        )
    logger.warning(f"{format_bad_images(bad)}\nLeaving them out of training (--on_bad_image skip).")
    bad_rows = {b.row for b in in_train}
    return train.select([row for row in range(len(train)) if row not in bad_rows])
