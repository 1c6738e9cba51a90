"""Train-step cost of each gap term and each family's full method, relative to the base InfoNCE step.

One step = forward + backward + AdamW step on a random tiny CLIP (same init for every variant). All variants run
interleaved (base, term1, term2, ..., base, term1, ...) after a warm-up; we report medians and the median of the
per-round ratios to base. Targets (printed, never asserted): GST ≤ 1 + text-tower share of the step (GST encodes the
translations with the text tower), every other term / method ≤ 1.05×.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "term_overhead"


def main(argv: Sequence[str] | None = None) -> dict:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    import torch
    from gapclip.losses import TERM_REGISTRY

    mode, device = args.mode, args.device
    batch_size = C.SHAPES[mode]["batch"]
    repeats = args.repeats or {"full": 10, "quick": 5, "smoke": 1}[mode]
    batch = C.make_batch(mode, batch_size, device)

    variants: dict[str, tuple[list[str], str]] = {"base (InfoNCE)": ([], "auto")}
    for name in TERM_REGISTRY:
        variants[f"+ {name}"] = ([name], "auto")
    for label, spec in C.METHODS.items():
        variants[label] = (spec["gap_terms"], spec.get("base_loss", "auto"))

    fns = {}
    for label, (terms, base_loss) in variants.items():
        model = C.make_model(mode, terms, base_loss, batch=batch_size, device=device)
        fns[label] = C.train_step_fn(model, batch)

    # Text tower alone: forward + backward of the text features of the same batch (base model's weights).
    text_model = C.make_model(mode, [], batch=batch_size, device=device)

    def text_only() -> None:
        text_model.zero_grad(set_to_none=True)
        text_model.get_text_features(batch["input_ids"], batch["attention_mask"]).sum().backward()

    fns["text tower fwd+bwd"] = text_only
    times = C.interleaved(fns, repeats, warmup=1, device=device)
    base = times["base (InfoNCE)"]
    text_share = C.median_ratio(times["text tower fwd+bwd"], base)

    rows, results = [], {}
    for label in variants:
        ratio = C.median_ratio(times[label], base)
        if label == "base (InfoNCE)":
            target, ok = "reference", None
        elif label == "+ gst":
            target, ok = f"≤ {1 + text_share:.3f} (1 + text share)", ratio <= 1 + text_share
        else:
            target, ok = "≤ 1.05", ratio <= 1.05
        results[label] = {"median_s": C.median(times[label]), "ratio_vs_base": ratio, "target": target,
                          "met": ok, "times_s": times[label]}
        rows.append([label, C.median(times[label]) * 1000, ratio, target, "-" if ok is None else C.met(ok)])
    rows.append(["text tower fwd+bwd", C.median(times["text tower fwd+bwd"]) * 1000, text_share,
                 "(share of base step)", "-"])
    s = C.SHAPES[mode]
    shape = (f"{s['num_layers']} layers, width {s['hidden_size']}, {s['image_size']} px / patch {s['patch_size']}, "
             f"batch {batch_size}, text length {C.SEQ_LEN}; {repeats} interleaved rounds after 1 warm-up")
    table = C.markdown_table(["variant", "median step (ms)", "median ratio vs base", "target", "status"], rows)
    C.write_results(args, NAME, "Gap-term overhead per train step (fwd+bwd+AdamW)", [(shape, table)],
                    {"shape": shape, "repeats": repeats, "text_share": text_share, "results": results})
    return results


if __name__ == "__main__":
    main()
