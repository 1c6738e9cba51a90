"""Teacher precompute (text part) vs a plain SentenceTransformer.encode of the same captions.

``precompute_teachers(image_teacher="captions")`` does only text work: it loads the offline all-MiniLM-L6-v2, encodes
every caption (batch size B, in shards) and writes ``teachers.safetensors``. The reference loads the same model with
``SentenceTransformer(str(minilm_path()))`` and encodes the same captions with the same batch size (normalised), so
both sides include the model load. Interleaved, repeated; throughput = captions/s. Target (printed): ≥ 0.95×.
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "teacher_precompute"
WORDS = ("a man woman dog cat child red blue green small large old young riding sitting standing on in near the "
         "street park beach table bicycle horse ball grass water tree car bus train window kitchen plate").split()


def captions(num_images: int, per_image: int = 5, seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    return [[" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) for _ in range(per_image)]
            for _ in range(num_images)]


def main(argv: Sequence[str] | None = None) -> dict:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer

    from gapclip.teachers import precompute_teachers
    from gapclip.testing import minilm_path

    num_images = {"full": 2000, "quick": 400, "smoke": 10}[args.mode]
    repeats = args.repeats or {"full": 5, "quick": 3, "smoke": 1}[args.mode]
    batch_size = 64
    caps = captions(num_images)
    flat = [c for group in caps for c in group]
    dataset = Dataset.from_dict({"image_id": [f"img{i}" for i in range(num_images)], "captions": caps})
    tmp = Path(tempfile.mkdtemp(prefix="gapclip_bench_teachers_"))
    results = {}

    def gapclip_precompute() -> None:
        out = tmp / "run"
        shutil.rmtree(out, ignore_errors=True)
        path = precompute_teachers(dataset, output_dir=out, image_teacher="captions", batch_size=batch_size,
                                   resume=False, device=args.device, show_progress=False)
        results["gapclip_path"] = str(path)

    def sentence_transformers() -> None:
        model = SentenceTransformer(str(minilm_path()), device=args.device)
        results["st"] = model.encode(flat, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                                     show_progress_bar=False)

    fns = {"SentenceTransformer load + encode (reference)": sentence_transformers,
           "precompute_teachers text part": gapclip_precompute}
    times = C.interleaved(fns, repeats, warmup=1, device=args.device)
    ref = times["SentenceTransformer load + encode (reference)"]
    ours = times["precompute_teachers text part"]
    ratio = C.median_ratio(ref, ours)  # reference time / our time = our throughput relative to the reference

    from safetensors.torch import load_file

    stored = load_file(results["gapclip_path"])
    text_key = next(k for k in stored if "text" in k)
    max_diff = float((stored[text_key].float() - results["st"].float().cpu()).abs().max())
    rows = [
        ["SentenceTransformer load + encode (reference)", C.median(ref), len(flat) / C.median(ref), 1.0,
         "reference", "-"],
        ["precompute_teachers text part", C.median(ours), len(flat) / C.median(ours), ratio, "≥ 0.95",
         C.met(ratio >= 0.95)],
    ]
    table = C.markdown_table(["variant", "median time (s)", "captions/s", "throughput ratio", "target", "status"], rows)
    shape = (f"{len(flat)} captions ({num_images} images × 5), batch size {batch_size}, {repeats} interleaved rounds "
             f"after 1 warm-up; max |Δ| of the stored vs reference embeddings: {max_diff:.2e}")
    C.write_results(args, NAME, "Teacher precompute (text) vs SentenceTransformer.encode", [(shape, table)],
                    {"shape": shape, "ratio": ratio, "met": ratio >= 0.95, "times_s": times, "max_abs_diff": max_diff,
                     "torch": torch.__version__})
    shutil.rmtree(tmp, ignore_errors=True)
    return {"ratio": ratio}


if __name__ == "__main__":
    main()
