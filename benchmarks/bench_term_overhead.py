"""Train-step cost of each gap term and each family's full method, relative to the base InfoNCE step.

One step = forward + backward + AdamW step on a random tiny CLIP (same init for every variant). After a warm-up,
every variant runs back to back with its own base step (pairs alternate their order from round to round); we report
median step times and the median of the per-pair ratios to base. Targets (printed, never asserted): each term that
needs no extra encoder pass ≤ 1.05×; GST ≤ 1 + the text tower's share of the base step (GST encodes the
translations with the text tower); a family's full method ≤ 1.05× (+ the text share when it includes GST).
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
    times, ratios = C.paired(fns, "base (InfoNCE)", repeats, warmup=1, device=device)
    text_share = C.median(ratios["text tower fwd+bwd"])

    rows, results = [], {}
    for label, (terms, _) in variants.items():
        ratio = 1.0 if label == "base (InfoNCE)" else C.median(ratios[label])
        limit = 1.0 + text_share if label == "+ gst" else 1.05 + (text_share if "gst" in terms else 0.0)
        if label == "base (InfoNCE)":
            target, ok = "reference", None
        elif label == "+ gst":
            target, ok = f"≤ {limit:.3f} (1 + text share)", ratio <= limit
        elif "gst" in terms:
            target, ok = f"≤ {limit:.3f} (1.05 + text share)", ratio <= limit
        else:
            target, ok = "≤ 1.05", ratio <= limit
        results[label] = {"median_s": C.median(times[label]), "ratio_vs_base": ratio, "target": target,
                          "met": ok, "times_s": times[label], "ratios": ratios.get(label, [])}
        rows.append([label, C.median(times[label]) * 1000, ratio, target, "-" if ok is None else C.met(ok)])
    rows.append(["text tower fwd+bwd", C.median(times["text tower fwd+bwd"]) * 1000, text_share,
                 "(share of base step)", "-"])
    s = C.SHAPES[mode]
    shape = (f"{s['num_layers']} layers, width {s['hidden_size']}, {s['image_size']} px / patch {s['patch_size']}, "
             f"batch {batch_size}, text length {C.SEQ_LEN}; {repeats} rounds of (base, variant) pairs after 1 warm-up")
    table = C.markdown_table(["variant", "median step (ms)", "median ratio vs paired base", "target", "status"], rows)
    C.write_results(args, NAME, "Gap-term overhead per train step (fwd+bwd+AdamW)", [(shape, table)],
                    {"shape": shape, "repeats": repeats, "text_share": text_share, "results": results})
    return results


if __name__ == "__main__":
    main()
