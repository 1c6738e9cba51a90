"""How long ``--verify_images`` takes: decoding every image of a split once, per 1,000 COCO-size JPEGs.

Writes N synthetic 640×480 JPEGs (quality 90; smooth colour fields, shapes and sensor-like noise, so the files weigh
about what COCO's photos do) into a temporary folder, then times ``gapclip.data.verify.find_bad_images`` over them
with 1 thread and with one thread per CPU, interleaved and repeated (the page cache is warm after the first round, as
it is for a dataset that was just loaded). Prints seconds per 1,000 images and the extrapolation to COCO's 123,287
images (train2014 + val2014, the Karpathy splits), with the load average before and after.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "verify_images"
COCO_IMAGES = 123_287


def main(argv: Sequence[str] | None = None) -> dict:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    from datasets import Dataset

    from gapclip.data import CAPTION_FEATURES
    from gapclip.data.verify import find_bad_images
    from gapclip.testing import coco_like_jpeg

    count = {"full": 1000, "quick": 200, "smoke": 12}[args.mode]
    size = (640, 480) if args.mode != "smoke" else (64, 48)
    repeats = args.repeats or {"full": 3, "quick": 2, "smoke": 1}[args.mode]
    cpus = os.cpu_count() or 1
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="gapclip_bench_verify_"))
    try:
        sizes = [coco_like_jpeg(tmp / f"{i:06d}.jpg", i, size) for i in range(count)]
        split = Dataset.from_dict(
            {"image_id": [str(i) for i in range(count)], "image": [str(tmp / f"{i:06d}.jpg") for i in range(count)],
             "captions": [["a photo"]] * count},
            features=CAPTION_FEATURES,
        )
        variants = {f"{threads} thread{'s' if threads > 1 else ''}": threads for threads in sorted({1, cpus})}
        bad: dict[str, int] = {}

        def runner(name: str, threads: int):
            def run():
                bad[name] = len(find_bad_images(split, num_workers=threads, show_progress=False))
            return run

        times = C.interleaved({name: runner(name, threads) for name, threads in variants.items()}, repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()

    rows, results = [], {}
    for name, threads in variants.items():
        seconds = C.median(times[name])
        per_1000 = seconds * 1000 / count
        coco_minutes = seconds / count * COCO_IMAGES / 60
        results[name] = {"threads": threads, "median_s": seconds, "s_per_1000": per_1000,
                         "images_per_s": count / seconds, "coco_minutes": coco_minutes, "bad_found": bad[name]}
        rows.append([name, seconds, per_1000, count / seconds, coco_minutes])
    table = C.markdown_table(
        ["decoding threads", f"median time, {count} images (s)", "s per 1,000 images", "images/s",
         f"COCO {COCO_IMAGES:,} images (min, extrapolated)"], rows,
    )
    mean_kib = sum(sizes) / len(sizes) / 1024
    heading = (f"{count} JPEGs {size[0]}×{size[1]} (quality 90, mean {mean_kib:.0f} KiB); {repeats} interleaved "
               f"rounds after 1 warm-up; load average before {load_before[0]:.2f} / after {load_after[0]:.2f} "
               "(1 min)")
    C.write_results(args, NAME, "Image verification (--verify_images)", [(heading, table)], {
        "images": count, "size": list(size), "mean_file_kib": mean_kib, "repeats": repeats,
        "load_average_before": list(load_before), "load_average_after": list(load_after), "results": results,
    })
    return results


if __name__ == "__main__":
    main()
