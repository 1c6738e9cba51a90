"""Retrieval evaluation at scale: ``retrieval_metrics`` (chunked) vs a naive full-similarity-matrix + argsort.

Synthetic L2-normalised embeddings (5 captions per image, captions = noisy copies of their image). Time: the two
variants interleaved in one process, median ratio. Memory, two honest views: (1) the largest intermediate computed
analytically; (2) the peak-RSS increase (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) of a fresh subprocess per
variant, measured after the embeddings exist, from ``VmHWM`` in ``/proc/self/status`` (per address space, so not
inherited from the parent the way ``ru_maxrss`` is across fork/exec; torch CPU tensors bypass tracemalloc).
The metrics of both variants are asserted identical (correctness, not a performance threshold). Then one
chunked-only run at a larger scale. Target (printed): chunked ≥ 0.9× the naive speed.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "eval_scale"
CAPTIONS = 5
SIZES = {  # (images, dim, large images)
    "full": (5000, 512, 50000),
    "quick": (2000, 256, 10000),
    "smoke": (100, 32, 400),
}


def make_embeds(num_images: int, dim: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(num_images, dim, generator=g), dim=-1)
    text_to_image = torch.arange(num_images).repeat_interleave(CAPTIONS)
    texts = images[text_to_image] + 4.0 * torch.randn(len(text_to_image), dim, generator=g) / dim**0.5
    return images, torch.nn.functional.normalize(texts, dim=-1), text_to_image


def naive_metrics(images, texts, text_to_image, ks=(1, 5, 10)) -> dict[str, float]:
    """Full [M, N] similarity matrix, full argsort per query, rank = position of the first positive."""
    import torch
    from gapclip.evaluation import metrics_from_ranks

    with torch.no_grad():
        sim = texts @ images.t()  # [M, N]
        order = sim.argsort(dim=1, descending=True)
        t2i = (order == text_to_image[:, None]).int().argmax(dim=1)
        del order
        order = sim.t().argsort(dim=1, descending=True)  # [N, M]
        i2t = (text_to_image[order] == torch.arange(images.shape[0])[:, None]).int().argmax(dim=1)
    return metrics_from_ranks(i2t, t2i, ks=ks)


def chunked_metrics(images, texts, text_to_image, chunk_size: int = 1024) -> dict[str, float]:
    from gapclip.evaluation import retrieval_metrics

    return retrieval_metrics(images, texts, text_to_image, chunk_size=chunk_size, normalize=False)


def _peak_rss_kib() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # may include the parent's peak (kept across exec)


def _rss_child(variant: str, num_images: int, dim: int, seed: int = 0) -> None:
    """Subprocess entry: print the peak-RSS increase (MiB), time and metrics of one variant."""
    fn = chunked_metrics if variant == "chunked" else naive_metrics
    fn(*make_embeds(8, dim, seed=seed))  # imports + first-call allocations happen before the baseline
    images, texts, t2i = make_embeds(num_images, dim, seed=seed)
    before = _peak_rss_kib()
    start = time.perf_counter()
    metrics = fn(images, texts, t2i)
    seconds = time.perf_counter() - start
    after = _peak_rss_kib()
    print(json.dumps({"rss_delta_mib": (after - before) / 1024, "seconds": seconds, "metrics": metrics}))


def rss_delta(variant: str, num_images: int, dim: int, seed: int = 0) -> dict:
    out = subprocess.run([sys.executable, __file__, "--_rss", variant, str(num_images), str(dim), str(seed)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> dict:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    if args.device == "cuda":
        print("eval_scale measures CPU retrieval; running on cpu.")
    num_images, dim, large_images = SIZES[args.mode]
    repeats = args.repeats or {"full": 3, "quick": 3, "smoke": 1}[args.mode]
    images, texts, t2i = make_embeds(num_images, dim)
    num_texts = len(t2i)

    fns = {"naive (full matrix + argsort)": lambda: naive_metrics(images, texts, t2i),
           "retrieval_metrics (chunk 1024)": lambda: chunked_metrics(images, texts, t2i)}
    naive_result, chunked_result = naive_metrics(images, texts, t2i), chunked_metrics(images, texts, t2i)
    assert naive_result == chunked_result, (naive_result, chunked_result)
    times = C.interleaved(fns, repeats, warmup=0)
    ref = times["naive (full matrix + argsort)"]
    chunk = times["retrieval_metrics (chunk 1024)"]
    speed = C.median_ratio(ref, chunk)  # naive time / chunked time = chunked speed relative to naive

    rss = {"naive": rss_delta("naive", num_images, dim), "chunked": rss_delta("chunked", num_images, dim)}
    # Largest live intermediates: naive holds sim [M,N] fp32 + argsort indices [M,N] int64 (+ a bool compare);
    # chunked holds per chunk scores [c,G] fp32 + ~4 bool masks [c,G], G = max(N, M).
    big = max(num_images, num_texts)
    naive_bytes = num_texts * num_images * (4 + 8 + 1)
    chunk_bytes = min(1024, big) * big * (4 + 4)
    rows = [
        ["naive (full matrix + argsort)", C.median(ref), 1.0, naive_bytes / 2**20, rss["naive"]["rss_delta_mib"],
         "reference", "-"],
        ["retrieval_metrics (chunk 1024)", C.median(chunk), speed, chunk_bytes / 2**20,
         rss["chunked"]["rss_delta_mib"], "≥ 0.9× naive speed", C.met(speed >= 0.9)],
    ]
    table = C.markdown_table(["variant", "median time (s)", "speed vs naive (×)", "largest intermediates, analytic (MiB)",
                              "peak RSS increase, subprocess (MiB)", "target", "status"], rows)
    shape = (f"{num_images} images × {num_texts} captions, d={dim}; {repeats} interleaved rounds; "
             f"metrics identical: {naive_result == chunked_result} (rsum {naive_result['rsum']:.2f})")

    del images, texts
    large_rss = rss_delta("chunked", large_images, dim, seed=1)  # one run, in a fresh subprocess: time + memory
    large_seconds, large_metrics = large_rss["seconds"], large_rss["metrics"]
    large_table = C.markdown_table(
        ["variant", "images", "captions", "d", "time (s, one run)", "peak RSS increase, subprocess (MiB)",
         "naive sim+argsort would need (MiB)"],
        [["retrieval_metrics (chunk 1024)", large_images, large_images * CAPTIONS, dim, large_seconds,
          large_rss["rss_delta_mib"], large_images**2 * CAPTIONS * 13 / 2**20]],
    )
    C.write_results(args, NAME, "Retrieval evaluation at scale", [(shape, table), ("Chunked only, large", large_table)],
                    {"shape": shape, "speed_vs_naive": speed, "met": speed >= 0.9, "times_s": times, "rss": rss,
                     "analytic_mib": {"naive": naive_bytes / 2**20, "chunked": chunk_bytes / 2**20},
                     "metrics": chunked_result, "large": {"images": large_images, "seconds": large_seconds,
                                                          "rss": large_rss, "metrics": large_metrics}})
    return {"speed": speed}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_rss":
        _rss_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else 0)
    else:
        main()
