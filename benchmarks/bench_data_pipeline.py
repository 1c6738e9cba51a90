"""Data pipeline: images/s per core for decode → preprocess → collate at 224 px, from COCO-size JPEGs.

Writes N synthetic 640×480 / 480×640 JPEGs (quality 90, ~155 KiB each, about COCO's mean file size) into a temporary
folder and times, side by side in one run (interleaved, repeated; one DataLoader per variant, persistent workers,
a warm-up epoch first so worker start-up and the page cache are out of the figures):

- ``before``: gapclip's path before issue 16 = the slow processor: ``CaptionPairs`` decodes a PIL image, the
  collator calls the backbone's PIL-backend processor (``CLIPImageProcessorPil``, what CPU installs get);
- ``gapclip default``: ``CaptionPairs`` decodes and resizes/crops to uint8 in the worker
  (:class:`gapclip.data.image_transform.ImageTransform`), the collator stacks and normalises once per batch;
- ``gapclip + reduced JPEG decoding``: the same with ``--reduced_jpeg_decoding`` (opt-in; other pixels);
- ``gapclip cached``: ``--pixel_cache`` (the cache's one-time build is timed separately, on one thread);
- where torchvision imports: transformers' fast processor (``CLIPImageProcessor``, torchvision backend) called by
  the collator, gapclip's path over that processor, and ``run_clip.py``'s pipeline rebuilt here
  (``torchvision.io.decode_image`` → scripted Resize/CenterCrop/ConvertImageDtype/Normalize → ``torch.stack``).

gapclip's collator also tokenizes the captions of each batch (a word-level tokenizer here); run_clip.py tokenizes
ahead of time, so its rows leave that out. Every variant runs with 0, 1 and 2 DataLoader workers; "per core" is
images/s divided by the number of workers (0 workers: the main process, one torch thread).

Also: the data time of one batch against the model's training step at the documented benchmark shape (6 layers,
width 256, 96 px, batch 128; the data at 96 px from the same JPEGs, one core), and how many cores a ViT-B/16 GPU step
would need: ``batch 256 / (images/s per core) / GPU step time``, where the GPU step time is an ASSUMPTION (``--gpu_step_s``,
default 0.15 s: ViT-B/16 CLIP, batch 256, bf16, ~60 GFLOP per image for forward + backward, at ~100 TFLOP/s
sustained on an A100-class GPU), not a measurement.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "data_pipeline"
COCO_TRAIN_IMAGES = 118_287
GPU_BATCH = 256
DEFAULT_GPU_STEP_S = 0.15

MODES = {  # images, JPEG size, processor size, batch, workers, repeats
    "full": {"images": 256, "jpeg": (640, 480), "px": 224, "batch": 32, "workers": (0, 1, 2), "repeats": 3},
    "quick": {"images": 64, "jpeg": (640, 480), "px": 224, "batch": 16, "workers": (0, 1, 2), "repeats": 2},
    "smoke": {"images": 12, "jpeg": (64, 48), "px": 32, "batch": 4, "workers": (0, 1), "repeats": 1},
}


def _torchvision_error() -> str | None:
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError, OSError) as err:  # a torchvision built for another torch: RuntimeError
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def _captions(count: int, seed: int = 0) -> list[list[str]]:
    from gapclip.data.demo import demo_vocabulary

    words, rng = demo_vocabulary(), random.Random(seed)
    return [[" ".join(rng.choice(words) for _ in range(12)) for _ in range(2)] for _ in range(count)]


def _split(paths: Sequence[Path]):
    from datasets import Dataset

    from gapclip.data import CAPTION_FEATURES

    return Dataset.from_dict(
        {"image_id": [path.stem for path in paths], "image": [str(path) for path in paths],
         "captions": _captions(len(paths))},
        features=CAPTION_FEATURES,
    )


def _processor(px: int, backend: str):
    from transformers import CLIPProcessor

    from gapclip.data.demo import demo_vocabulary
    from gapclip.data.tokenization import word_level_tokenizer

    if backend == "pil":
        from transformers import CLIPImageProcessorPil as Processor
    else:
        from transformers import CLIPImageProcessor as Processor
    image_processor = Processor(size={"shortest_edge": px}, crop_size={"height": px, "width": px})
    return CLIPProcessor(image_processor=image_processor, tokenizer=word_level_tokenizer(demo_vocabulary()))


def _gapclip_source(split, processor, *, transform: str | None, reduced: bool = False, cache_dir: Path | None = None):
    """(dataset, collate_fn) of gapclip's training path with the given image settings."""
    from gapclip.data import CaptionPairs, GapClipCollator
    from gapclip.data.input_pipeline import configure_training_images

    collator = GapClipCollator(processor, image_transform=transform)
    pairs = CaptionPairs(split, seed=0)
    if transform is not None:
        configure_training_images(pairs, collator, reduced_decoding=reduced, pixel_cache=cache_dir is not None,
                                  pixel_cache_dir=cache_dir, show_progress=False)
    return pairs, collator


class _RunClipImages:
    """run_clip.py's image side: ``read_image``/``decode_image`` to a uint8 tensor, then its scripted ``Transform``;
    the captions were tokenized ahead of time (``dataset.map``), so items carry ready ``input_ids``."""

    def __init__(self, paths: Sequence[Path], input_ids: Any, transform: Any):
        self.paths, self.input_ids, self.transform = [str(p) for p in paths], input_ids, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from torchvision.io import ImageReadMode, decode_image

        image = decode_image(self.paths[index], mode=ImageReadMode.RGB)
        return {"pixel_values": self.transform(image), "input_ids": self.input_ids[index]}


def _run_clip_collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "input_ids": torch.stack([e["input_ids"] for e in examples]), "return_loss": True}


def _run_clip_source(paths: Sequence[Path], split, processor) -> tuple[Any, Callable, bool]:
    import torch
    from torchvision.transforms import CenterCrop, ConvertImageDtype, InterpolationMode, Normalize, Resize

    image_processor = processor.image_processor
    size = image_processor.crop_size.height

    class Transform(torch.nn.Module):  # as in transformers' examples/pytorch/contrastive-image-text/run_clip.py
        def __init__(self, image_size: int, mean: list[float], std: list[float]):
            super().__init__()
            self.transforms = torch.nn.Sequential(
                Resize([image_size], interpolation=InterpolationMode.BICUBIC, antialias=True),
                CenterCrop(image_size),
                ConvertImageDtype(torch.float),
                Normalize(mean, std),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self.transforms(x)

    transform = Transform(size, image_processor.image_mean, image_processor.image_std)
    try:
        transform, scripted = torch.jit.script(transform), True
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):  # TorchScript is deprecated; run_clip's transform then runs eagerly (the same ops)
        scripted = False
    captions = [captions[0] for captions in split["captions"]]
    input_ids = processor.tokenizer(captions, padding="max_length", max_length=32, truncation=True,
                                    return_tensors="pt")["input_ids"]
    return _RunClipImages(paths, input_ids, transform), _run_clip_collate, scripted


def _loader(dataset, collate_fn, batch: int, workers: int):
    import torch

    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False, collate_fn=collate_fn,
                                       num_workers=workers, persistent_workers=workers > 0)


def _epoch(loader) -> Callable[[], int]:
    def run() -> int:
        return sum(int(batch["pixel_values"].shape[0]) for batch in loader)

    return run


def _pixel_difference(sources: dict[str, tuple[Any, Callable]], reference: str, count: int) -> dict[str, float]:
    """The largest |pixel_values − reference| of the first `count` images, per variant (its first batch)."""
    import torch

    def first(name: str) -> torch.Tensor:
        dataset, collate = sources[name]
        return collate([dataset[i] for i in range(count)])["pixel_values"]

    expected = first(reference)
    return {name: float((first(name) - expected).abs().max()) for name in sources if name != reference}


def _model_ratio(args, split, mode: str) -> dict[str, Any]:
    """Data time of one batch at the documented shape (one core) against the training step (all threads)."""
    import torch

    shape = C.SHAPES[mode]
    batch, px = shape["batch"], shape["image_size"]
    repeats = args.repeats or MODES[mode]["repeats"]
    rows = list(range(min(batch, len(split))))
    rows = (rows * (batch // len(rows) + 1))[:batch]
    processor = _processor(px, "pil")
    data = {}
    for name, transform in (("before (slow processor)", None), ("gapclip default", "auto")):
        pairs, collator = _gapclip_source(split, processor, transform=transform)
        data[name] = (lambda p=pairs, c=collator: c([p[i] for i in rows]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data_times = C.interleaved(data, repeats)
    finally:
        torch.set_num_threads(threads)
    model = C.make_model(mode, batch=batch)
    step = C.train_step_fn(model, C.make_batch(mode, batch))
    step_s = C.median(C.interleaved({"step": step}, repeats)["step"])
    return {
        "shape": {**shape, "text_length": C.SEQ_LEN}, "step_s": step_s, "torch_threads": threads,
        "data_s": {name: C.median(times) for name, times in data_times.items()},
        "data_to_step": {name: C.median(times) / step_s for name, times in data_times.items()},
    }


def main(argv: Sequence[str] | None = None) -> dict:
    args = C.parse_args(__doc__.splitlines()[0], argv, extra=lambda p: p.add_argument(
        "--gpu_step_s", type=float, default=DEFAULT_GPU_STEP_S,
        help="ASSUMED seconds of one ViT-B/16 training step at batch 256 on the GPU (for the cores-needed column)"))
    import datasets
    import torch

    from gapclip.data.pixel_cache import build_pixel_cache
    from gapclip.testing import coco_like_jpeg

    datasets.disable_progress_bars()  # CaptionPairs counts captions with a map per variant

    settings = MODES[args.mode]
    repeats = args.repeats or settings["repeats"]
    count, px, batch = settings["images"], settings["px"], settings["batch"]
    tv_error = _torchvision_error()
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="gapclip_bench_data_"))
    torch_threads = torch.get_num_threads()
    try:
        width, height = settings["jpeg"]
        paths = [tmp / f"{i:06d}.jpg" for i in range(count)]
        sizes = [coco_like_jpeg(path, i, (width, height) if i % 2 == 0 else (height, width))
                 for i, path in enumerate(paths)]
        split = _split(paths)
        pil = _processor(px, "pil")
        torch.set_num_threads(1)  # per core: the main process's share of a variant is one thread
        start = time.perf_counter()
        transform = _gapclip_source(split, pil, transform="auto")[1].image_transform
        cache = build_pixel_cache(split, transform, tmp / "cache", num_threads=1, show_progress=False)
        cache_build_s = time.perf_counter() - start
        sources: dict[str, tuple[Any, Callable]] = {
            "before: PIL decode + slow processor": _gapclip_source(split, pil, transform=None),
            "gapclip default": _gapclip_source(split, pil, transform="auto"),
            "gapclip + reduced JPEG decoding": _gapclip_source(split, pil, transform="auto", reduced=True),
            "gapclip cached (--pixel_cache)": _gapclip_source(split, pil, transform="auto", cache_dir=tmp / "cache"),
        }
        scripted = None
        if tv_error is None:
            fast = _processor(px, "torchvision")
            sources["transformers fast processor (torchvision)"] = _gapclip_source(split, fast, transform=None)
            sources["gapclip path over the fast processor"] = _gapclip_source(split, fast, transform="auto")
            dataset, collate, scripted = _run_clip_source(paths, split, pil)
            sources["run_clip.py torchvision pipeline"] = (dataset, collate)
        reference = "before: PIL decode + slow processor"
        difference = _pixel_difference(sources, reference, min(count, 8))
        timings: dict[int, dict[str, list[float]]] = {}
        for workers in settings["workers"]:
            loaders = {name: _loader(dataset, collate, batch, workers) for name, (dataset, collate) in sources.items()}
            timings[workers] = C.interleaved({name: _epoch(loader) for name, loader in loaders.items()}, repeats)
            del loaders  # ends the persistent workers
        torch.set_num_threads(torch_threads)
        model = _model_ratio(args, split, args.mode)
        del cache
    finally:
        torch.set_num_threads(torch_threads)
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()

    results: dict[str, dict[str, Any]] = {}
    rows = []
    for name in sources:
        per_workers = {}
        for workers, times in timings.items():
            images_per_s = count / C.median(times[name])
            per_workers[str(workers)] = {"images_per_s": images_per_s, "per_core": images_per_s / max(1, workers)}
        per_core = per_workers["0"]["per_core"]
        cores = GPU_BATCH / per_core / args.gpu_step_s
        results[name] = {"workers": per_workers, "max_abs_difference_to_before": difference.get(name, 0.0),
                         "cores_for_gpu_step": cores}
        rows.append([name, *(per_workers[str(w)]["images_per_s"] for w in settings["workers"]),
                     *(per_workers[str(w)]["per_core"] for w in settings["workers"] if w > 0), cores,
                     difference.get(name, 0.0)])
    columns = ["variant", *(f"images/s, {w} workers" for w in settings["workers"]),
               *(f"per core, {w} workers" for w in settings["workers"] if w > 0),
               f"cores for a {args.gpu_step_s:g} s GPU step (ASSUMED), from 0 workers", "max |Δ| vs before"]
    table = C.markdown_table(columns, rows)

    per_core = {name: results[name]["workers"]["0"]["per_core"] for name in results}
    default, cached, slow = per_core["gapclip default"], per_core["gapclip cached (--pixel_cache)"], per_core[reference]
    target_rows = [["cached ≥ 5× the slow processor (0 workers)", cached / slow, C.met(cached / slow >= 5)]]
    if tv_error is None:
        run_clip = per_core["run_clip.py torchvision pipeline"]
        target_rows.insert(0, ["gapclip default ≥ 1.0× run_clip.py's torchvision pipeline, per core (0 workers)",
                               default / run_clip, C.met(default / run_clip >= 1.0)])
    else:
        target_rows.insert(0, ["gapclip default ≥ 1.0× run_clip.py's torchvision pipeline", float("nan"),
                               f"not measured: torchvision does not import here ({tv_error})"])
    targets = C.markdown_table(["target", "ratio", "status"], target_rows)

    shape = model["shape"]
    model_rows = [[name, model["data_s"][name], model["step_s"], model["data_to_step"][name]] for name in model["data_s"]]
    model_table = C.markdown_table(
        ["data path (1 core, 0 workers)", f"data time of one batch of {shape['batch']} (s)",
         f"training step (s, {model['torch_threads']} threads)", "data / step"], model_rows,
    )
    coco_gb = COCO_TRAIN_IMAGES * 224 * 224 * 3 / 1e9
    mean_kib = sum(sizes) / len(sizes) / 1024
    heading = (f"{count} JPEGs {width}×{height} and {height}×{width} (quality 90, mean {mean_kib:.0f} KiB) → {px} px "
               f"(CLIP: shortest edge {px}, bicubic, center crop), batch {batch}; {repeats} interleaved epochs per "
               f"variant after a warm-up epoch; torchvision: {'yes' if tv_error is None else 'no'}"
               f"{'' if scripted is None else ', run_clip transform scripted' if scripted else ', run_clip eager'}; "
               f"load average before {load_before[0]:.2f} / after {load_after[0]:.2f} (1 min), {os.cpu_count()} CPUs")
    cache_line = (f"Pixel cache build, one thread: {count / cache_build_s:.1f} images/s ({cache_build_s:.2f} s for {count} "
                  f"images); at 224 px COCO's {COCO_TRAIN_IMAGES:,} training images take {coco_gb:.1f} GB.")
    model_heading = (f"Documented shape ({shape['num_layers']} layers, width {shape['hidden_size']}, "
                     f"{shape['image_size']} px / patch {shape['patch_size']}, batch {shape['batch']}, text length "
                     f"{shape['text_length']}): data at {shape['image_size']} px from the same JPEGs vs one "
                     "fwd+bwd+AdamW step of the base objective on this CPU")
    C.write_results(args, NAME, "Data pipeline: decode → preprocess → collate", [
        (heading, table), ("Targets", targets), ("", cache_line), (model_heading, model_table),
    ], {
        "images": count, "jpeg": [width, height], "px": px, "batch": batch, "repeats": repeats,
        "mean_file_kib": mean_kib, "torchvision": tv_error is None, "torchvision_error": tv_error,
        "run_clip_scripted": scripted, "load_average_before": list(load_before), "load_average_after": list(load_after),
        "assumed_gpu_step_s": args.gpu_step_s, "gpu_batch": GPU_BATCH, "cache_build_images_per_s": count / cache_build_s,
        "coco_cache_gb_224": coco_gb, "results": results, "model": model,
        "targets": {"default_vs_run_clip": None if tv_error else default / per_core["run_clip.py torchvision pipeline"],
                    "cached_vs_slow": cached / slow},
    })
    return results


if __name__ == "__main__":
    main()
