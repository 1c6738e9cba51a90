"""Shared helpers for the gapclip benchmarks: CLI, interleaved timing, tables, output files, synthetic models."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch


def parse_args(description: str, argv: Sequence[str] | None = None, extra: Callable | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="reduced shapes (a few minutes on 2 CPU cores)")
    size.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat (for tests)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--output", default="benchmark_results", help="folder for <name>.json and <name>.md")
    parser.add_argument("--repeats", type=int, default=None, help="override the number of interleaved repeats")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    args.mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    args.load_at_start = load_average()
    return args


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages (``None`` where the platform has none): a figure measured while other
    work held the cores is not comparable with a quiet machine's, so every result carries the load it ran under."""
    try:
        return tuple(round(value, 2) for value in os.getloadavg())
    except (AttributeError, OSError):
        return None


def describe_load(start: tuple[float, float, float] | None, end: tuple[float, float, float] | None) -> str:
    if start is None or end is None:
        return "load average: not available on this platform"
    return (f"load average (1/5/15 min) {'/'.join(map(str, start))} at the start, {'/'.join(map(str, end))} at the "
            f"end, on {os.cpu_count()} CPUs")


def machine_description(device: str = "cpu") -> str:
    proc = platform.processor() or platform.machine()
    desc = (f"{platform.system()} {proc}, {os.cpu_count()} CPUs (torch threads {torch.get_num_threads()}), "
            f"torch {torch.__version__}, device {device}")
    if device == "cuda" and torch.cuda.is_available():
        desc += f" ({torch.cuda.get_device_name()})"
    return desc


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, device: str = "cpu") -> dict[str, list[float]]:
    """Run every function ``warmup`` times, then ``repeats`` rounds of A, B, C, ...; wall seconds per call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def paired(
    fns: dict[str, Callable[[], Any]], reference: str, repeats: int, warmup: int = 1, device: str = "cpu"
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Time every variant back to back with its own run of ``reference``, ``repeats`` rounds after a warm-up.

    Each round runs, for every variant, the pair (reference, variant), in alternating order from round to round so
    that drift within a pair cancels. Returns wall seconds per call (the reference's list has one entry per pair)
    and, per variant, the ratio variant / reference of each pair. Pairing makes the ratios robust to the load
    changes of a shared machine, which a single reference run per round of many variants is not.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    ratios: dict[str, list[float]] = {name: [] for name in fns if name != reference}

    def timed(name: str) -> float:
        sync(device)
        start = time.perf_counter()
        fns[name]()
        sync(device)
        elapsed = time.perf_counter() - start
        times[name].append(elapsed)
        return elapsed

    for round_index in range(repeats):
        for name in ratios:
            if round_index % 2 == 0:
                ref, var = timed(reference), timed(name)
            else:
                var, ref = timed(name), timed(reference)
            ratios[name].append(var / ref)
    return times, ratios


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def median_ratio(values: Sequence[float], reference: Sequence[float]) -> float:
    """Median of the per-round ratios (rounds are interleaved, so round i of both ran back to back)."""
    return median([v / r for v, r in zip(values, reference)])


def fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.1f}"
        if abs(value) >= 1:
            return f"{value:.3f}"
        return f"{value:.4g}"
    return str(value)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def met(ok: bool) -> str:
    return "met" if ok else "missed"


def write_results(args: argparse.Namespace, name: str, title: str, sections: list[tuple[str, str]], data: dict) -> str:
    """Write ``<output>/<name>.json`` and ``<name>.md``; return (and print) the Markdown."""
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_description(args.device)
    start, end = getattr(args, "load_at_start", None), load_average()
    load = describe_load(start, end)
    md = [f"## {title}", "", f"Machine: {machine}; mode: {args.mode}", "", load.capitalize(), ""]
    for heading, body in sections:
        if heading:
            md += [f"**{heading}**", ""]
        md += [body, ""]
    text = "\n".join(md)
    payload = {"name": name, "title": title, "mode": args.mode, "machine": machine,
               "load_average": {"start": start, "end": end}, **data}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1, default=float))
    (out / f"{name}.md").write_text(text)
    print(text, flush=True)
    return text


# ------------------------------------------------------------------------------------------------ synthetic models
SHAPES = {
    "full": {"num_layers": 6, "hidden_size": 256, "image_size": 96, "patch_size": 16, "batch": 128},
    "quick": {"num_layers": 2, "hidden_size": 128, "image_size": 64, "patch_size": 16, "batch": 32},
    "smoke": {"num_layers": 1, "hidden_size": 32, "image_size": 32, "patch_size": 16, "batch": 8},
}
SEQ_LEN = 16
VOCAB = 1000
TEACHER_DIM = 384


def clip_config(mode: str):
    from gapclip.testing import tiny_clip_config

    s = SHAPES[mode]
    return tiny_clip_config(
        vocab_size=VOCAB, image_size=s["image_size"], patch_size=s["patch_size"], hidden_size=s["hidden_size"],
        num_layers=s["num_layers"], num_heads=max(2, s["hidden_size"] // 64), projection_dim=s["hidden_size"],
        max_position_embeddings=max(32, SEQ_LEN),
    )


METHODS: dict[str, dict[str, Any]] = {
    "LG-MGC (lsc+gst)": {"gap_terms": ["lsc", "gst"]},
    "DIAS (triplet+dim+inter+intra)": {"base_loss": "triplet", "gap_terms": ["dias_dim", "dias_inter", "dias_intra"]},
    "CUSA (csa+usa)": {"gap_terms": ["csa", "usa"]},
}


def term_spec(name: str, batch: int) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": name, "weight": 1.0}
    if name in ("dias_inter", "dias_intra"):
        spec["options"] = {"max_batch_size": max(batch, 2)}
    return spec


def make_model(mode: str, gap_terms: Sequence[str] = (), base_loss: str = "auto", batch: int = 8, seed: int = 0,
               device: str = "cpu"):
    from gapclip import GapClipConfig, GapClipModel

    torch.manual_seed(seed)
    config = GapClipConfig(clip_config(mode), gap_terms=[term_spec(n, batch) for n in gap_terms] or None,
                           base_loss=base_loss)
    model = GapClipModel(config).to(device)
    model.train()
    return model


def make_batch(mode: str, batch: int, device: str = "cpu", seed: int = 1) -> dict[str, Any]:
    """Every per-row input the built-in terms declare (GST's translations, CUSA's teacher embeddings), as the
    collator's ``term_inputs``; the model reads those its terms declare."""
    g = torch.Generator().manual_seed(seed)
    s = SHAPES[mode]
    n, length = batch, SEQ_LEN
    input_ids = torch.randint(4, VOCAB, (n, length), generator=g)
    lengths = torch.randint(6, length + 1, (n,), generator=g)
    attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    input_ids[:, 0] = 2
    input_ids[torch.arange(n), lengths - 1] = 3
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    translation_ids = torch.randint(4, VOCAB, (n, 12), generator=g)
    translation_ids[:, 0], translation_ids[:, -1] = 2, 3
    unit = lambda: torch.nn.functional.normalize(torch.randn(n, TEACHER_DIM, generator=g), dim=-1)  # noqa: E731
    # Every row has a translation, so no `present` mask: as GapClipCollator collates such a batch.
    translation = {"input_ids": translation_ids, "attention_mask": torch.ones_like(translation_ids)}
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": torch.randn(n, 3, s["image_size"], s["image_size"], generator=g),
        "image_index": torch.arange(n),
        "term_inputs": {"translation": translation, "teacher_image_embeds": unit(), "teacher_text_embeds": unit()},
    }
    return _to(out, device)


def _to(value: Any, device: str) -> Any:
    return {k: _to(v, device) for k, v in value.items()} if isinstance(value, dict) else value.to(device)


def train_step_fn(model, batch: dict[str, torch.Tensor]) -> Callable[[], float]:
    """One forward + backward + AdamW step (the optimizer's state is created during warm-up)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch, return_loss=True).loss
        loss.backward()
        optimizer.step()
        return loss.item()

    return step
