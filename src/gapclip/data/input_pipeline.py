"""How the training images reach the model: gapclip's image path, reduced JPEG decoding, the pixel cache, and
advice on DataLoader workers.

On an accelerator the input pipeline, not the towers, often bounds CLIP fine-tuning: a ViT-B/16 step at batch 256
takes a fraction of a second on a current GPU, while decoding and resizing 256 COCO-size JPEGs takes a CPU core
about a second (``benchmarks/bench_data_pipeline.py`` measures both sides). The recipes therefore

- decode and resize each image in the DataLoader's worker (``CaptionPairs`` with the processor's
  :class:`~gapclip.data.image_transform.ImageTransform`), so a batch leaves the worker as uint8 pixels that the
  collator stacks and normalises once;
- with ``--pixel_cache``, decode every image once (:mod:`gapclip.data.pixel_cache`) and read the pixels from a
  memory map in every later epoch and run;
- say how many ``--dataloader_num_workers`` a GPU run needs, and to keep them between epochs
  (``--dataloader_persistent_workers``), when it runs with none.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from transformers.utils import logging

from .image_transform import ImageTransform
from .pixel_cache import PixelCache, build_pixel_cache
from .verify import format_bad_images

logger = logging.get_logger(__name__)

__all__ = ["configure_training_images", "dataloader_advice", "suggested_num_workers"]


def configure_training_images(
    pairs: Any,
    collator: Any,
    *,
    reduced_decoding: bool = False,
    pixel_cache: bool = False,
    pixel_cache_dir: str | os.PathLike | None = None,
    on_bad_image: str = "error",
    max_bad_image_fraction: float = 0.01,
    split: str = "train",
    show_progress: bool = True,
) -> PixelCache | None:
    """Let ``pairs`` (training pairs) hand ``collator`` uint8 pixels instead of PIL images, when gapclip's image path
    reproduces the processor; with ``pixel_cache``, from a cache built (or found) for the split.

    Returns the cache, or None. With no gapclip image path for the processor (``collator.image_transform`` is None),
    nothing changes, and ``reduced_decoding``/``pixel_cache`` are errors that say why.

    Raises:
        ValueError: ``pixel_cache`` on streamed pairs; ``reduced_decoding``/``pixel_cache`` for a processor gapclip's
            image path cannot reproduce; unreadable images while building the cache under ``on_bad_image="error"``
            (all of them listed), or more than ``max_bad_image_fraction`` of them under ``"skip"``.
    """
    transform: ImageTransform | None = collator.image_transform
    if transform is None:
        if reduced_decoding or pixel_cache:
            flags = " and ".join(f for f, on in (("--reduced_jpeg_decoding", reduced_decoding),
                                                 ("--pixel_cache", pixel_cache)) if on)
            raise ValueError(
                f"{flags} need gapclip's image path, which does not apply here (--fast_image_processing false, or a "
                f"processor it cannot reproduce: {type(collator.image_processor).__name__}, see the warning above)."
            )
        return None
    if reduced_decoding:
        transform = dataclasses.replace(transform, reduced_decoding=True)
    if not pixel_cache:
        pairs.image_transform = transform
        return None
    if not hasattr(pairs, "pixel_cache"):
        raise ValueError("--pixel_cache needs a training split on disk; it cannot cache a --streaming split.")
    cache = build_pixel_cache(pairs.dataset, transform, pixel_cache_dir, split=split, show_progress=show_progress)
    _check_unreadable(cache, on_bad_image, max_bad_image_fraction)
    pairs.use_pixel_cache(cache)
    return cache


def _check_unreadable(cache: PixelCache, on_bad_image: str, max_fraction: float) -> None:
    if not cache.bad:
        return
    report = format_bad_images(cache.bad, flag="--pixel_cache")
    if on_bad_image == "error":
        raise ValueError(f"{report}\nFix or remove these files (--on_bad_image skip leaves them out of training).")
    if len(cache.bad) > max_fraction * len(cache):
        raise ValueError(
            f"{report}\n{len(cache.bad)} of {len(cache)} training images are unreadable, more than "
            f"--max_bad_image_fraction={max_fraction}."
        )
    logger.warning(f"{report}\nLeaving them out of training (--on_bad_image skip).")


def suggested_num_workers(world_size: int = 1, cpu_count: int | None = None) -> int:
    """DataLoader workers per training process: the CPUs this process gets, less one for the training loop, at
    most 8 (past that, a ViT-B/16 step rarely waits on data; the benchmark's cores-per-step figure says when)."""
    cpus = cpu_count if cpu_count is not None else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count() or 1
    return max(1, min(8, cpus // max(1, world_size) - 1))


def dataloader_advice(args: Any, *, num_epochs: float | None = None, accelerator: str | None = None) -> list[str]:
    """Hints about ``args``' DataLoader settings for a run on ``accelerator`` (``"cuda"``, ``"xpu"``, ... or None
    for the CPU), for the recipes to log. Empty when there is nothing to say."""
    hints: list[str] = []
    workers = args.dataloader_num_workers
    if accelerator is not None and workers == 0:
        suggested = suggested_num_workers(args.world_size)
        hints.append(
            f"--dataloader_num_workers 0 on {accelerator}: every image is decoded and resized in the training "
            f"process between steps, while the {accelerator} waits. Try --dataloader_num_workers {suggested} "
            "--dataloader_persistent_workers true (workers per process; benchmarks/bench_data_pipeline.py gives "
            "the images/s one core delivers), and --pixel_cache to decode each image only once."
        )
    if workers > 0 and not args.dataloader_persistent_workers and (num_epochs is None or num_epochs > 1):
        hints.append(
            f"--dataloader_num_workers {workers} without --dataloader_persistent_workers: the workers are started "
            "again at every epoch and evaluation (seconds each, and the page cache of a pixel cache is mapped "
            "again); --dataloader_persistent_workers true keeps them."
        )
    if accelerator == "cuda" and not args.dataloader_pin_memory:
        hints.append("--dataloader_pin_memory false on cuda: batches are copied to the GPU from pageable memory "
                     "(slower, and not overlapped with compute); leave it on.")
    return hints


def epochs_of(args: Any, num_pairs: int | None) -> float | None:
    """The epochs a run trains: ``--num_train_epochs``, or ``--max_steps`` worth of batches over ``num_pairs``."""
    if args.max_steps is not None and args.max_steps > 0:
        if not num_pairs:
            return None
        per_step = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
        return args.max_steps * per_step / num_pairs
    return float(args.num_train_epochs) if math.isfinite(args.num_train_epochs) else None
