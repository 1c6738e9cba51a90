"""Train-step time vs batch size for the base InfoNCE step and each family's full method.

At each batch size the four variants run interleaved (base, LG-MGC, DIAS, CUSA, base, ...) after a warm-up; we
report the median step time and each method's median ratio to base at that batch size (no targets: the point is
how the overhead grows with the batch, e.g. the B×B terms of DIAS / CUSA).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "scaling"
BATCHES = {"full": (64, 128, 256, 512), "quick": (16, 32, 64), "smoke": (4, 8)}


def main(argv: Sequence[str] | None = None) -> dict:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    mode, device = args.mode, args.device
    repeats = args.repeats or {"full": 5, "quick": 3, "smoke": 1}[mode]
    variants = {"base (InfoNCE)": {"gap_terms": []}, **C.METHODS}
    results: dict[str, dict] = {}
    rows = []
    for batch_size in BATCHES[mode]:
        batch = C.make_batch(mode, batch_size, device)
        fns = {}
        for label, spec in variants.items():
            model = C.make_model(mode, spec["gap_terms"], spec.get("base_loss", "auto"), batch=batch_size,
                                 device=device)
            fns[label] = C.train_step_fn(model, batch)
        times = C.interleaved(fns, repeats, warmup=1, device=device)
        base = times["base (InfoNCE)"]
        results[str(batch_size)] = {
            label: {"median_s": C.median(t), "ratio_vs_base": C.median_ratio(t, base), "times_s": t}
            for label, t in times.items()
        }
        row = [batch_size]
        for label in variants:
            r = results[str(batch_size)][label]
            row.append(f"{r['median_s'] * 1000:.1f} ms" + ("" if label.startswith("base") else
                                                          f" ({r['ratio_vs_base']:.2f}×)"))
        rows.append(row)
        del fns
    s = C.SHAPES[mode]
    shape = (f"{s['num_layers']} layers, width {s['hidden_size']}, {s['image_size']} px / patch {s['patch_size']}; "
             f"median step (fwd+bwd+AdamW) and median ratio to base; {repeats} interleaved rounds after 1 warm-up")
    table = C.markdown_table(["batch", *variants], rows)
    C.write_results(args, NAME, "Step time vs batch size", [(shape, table)], {"shape": shape, "results": results})
    return results


if __name__ == "__main__":
    main()
