"""Peak memory and step time vs global batch: global loss, local loss and gradient caching, side by side.

Each batch size runs in fresh subprocesses (at --smoke all sizes in one), its variants back to back and repeated in
alternating order, so their ratios are taken close in time. Memory is the peak above what the process holds just
before the measured step: on CPU the peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` before the step;
torch's CPU tensors are invisible to ``tracemalloc``), on GPU ``torch.cuda.max_memory_allocated``. On CPU, memory and
time come from two different subprocesses: the memory one pins glibc's mmap threshold so that freed tensors leave the
RSS, which makes every large allocation a fresh ``mmap`` with its page faults — a cost no training run pays, and one
that grows with the number of allocations (the chunks of gradient caching most of all); the timed one runs with the
allocator's defaults.

1. **Training step of one process** (forward + backward, no optimizer; a random CLIP at the mode's shape, InfoNCE):
   the global loss, the local loss (on one process the same objective through the local code path: its overhead) and
   gradient caching with chunks of C rows, for global batches 64 … 4096; timed beside them, the forward pass without
   a graph of every chunk but the last, which is what caching adds to the uncached step at the least (the cached
   step's ratio can be no lower than ``(global + extra forward) / global``, printed next to it).
2. **The objective of one process of a data-parallel run** with ``b`` rows per process and ``W = B/b`` processes
   (up to 64, more than one machine runs here): process 0's objective on stand-ins for the gathered embeddings of the
   whole batch, forward + backward, global (``B × B``) against local (``b × B``). Objective: InfoNCE + CSA + GST + DIAS
   inter/intra (dense), the terms whose local form needs no collective (LSC, USA, the sparse DIAS mask and
   ``dias_dim`` gather or sum what their rows derive, which one process cannot stand in for).

Gradient caching is also timed with chunks of 2C and 4C rows (in the same subprocesses, wherever the chunk is smaller
than the batch): a larger chunk costs activation memory, but fewer, larger re-run calls keep the threads busier and
the last chunk, which keeps its graph, saves a larger share of the extra forward. Plus, for each variant, the largest
batch of the ladder whose peak fits a fixed memory budget (``--budget_mib``).
Targets (printed, never asserted): the local objective grows as ``b·B`` (fitted exponent in ``B`` at fixed ``b``:
about 1, against about 2 for the global one) and its step takes ≤ 1.05× the global step; with gradient caching the
peak stays flat in the batch size beyond the chunk (fitted exponent near 0) and the step takes ≤ 1.35× the uncached
step wherever that fits the budget, read at the mode's chunk and for each chunk size (which of them meet both).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "memory"
BATCHES = {"full": (64, 128, 256, 512, 1024, 2048, 4096), "quick": (64, 256, 1024, 4096), "smoke": (8, 16, 32)}
CHUNK = {"full": 64, "quick": 64, "smoke": 8}
#: The chunk sizes gradient caching is timed at, in multiples of the mode's (or ``--chunk``'s) chunk.
CHUNK_FACTORS = (1, 2, 4)
PER_PROCESS = {"full": 64, "quick": 64, "smoke": 4}
BUDGET_MIB = {"full": 1024.0, "quick": 1024.0, "smoke": 64.0}
OBJECTIVE_DIM = {"full": 256, "quick": 128, "smoke": 32}  # the quick shape's embedding width
CACHED = "gradient caching"
STEP_VARIANTS = ("global loss", "local loss", CACHED)
#: What gradient caching adds to the uncached step at the least: a forward pass without a graph of every chunk but the
#: last (timed beside the steps, so the cached step's ratio can be read against it).
EXTRA_FORWARD = "extra forward"
OBJECTIVE_VARIANTS = ("global loss", "local loss")
OBJECTIVE_TERMS = [
    {"name": "csa", "weight": 0.1}, {"name": "gst", "weight": 1.0},
    {"name": "dias_inter", "weight": 0.05, "options": {"sparse": False}},
    {"name": "dias_intra", "weight": 0.1, "options": {"sparse": False}},
]
#: Allocations of 64 KiB or more are mmap'ed and given back when freed, so the RSS follows the live tensors.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def with_chunk(variant: str, chunk: int) -> str:
    """The name of ``variant`` (gradient caching or its extra forward) run with chunks of ``chunk`` rows."""
    return f"{variant} (C={chunk})"


# --------------------------------------------------------------------------------------------- measuring (child)
def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


class PeakMemory:
    """Peak memory above the level at :meth:`start`, in MiB (CPU: RSS high-water mark; CUDA: the allocator's)."""

    def __init__(self, device: str):
        self.device = device

    def start(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:  # not Linux / not allowed: the high-water mark then includes the set-up's peak
            pass
        self.base = _kib("VmRSS") * 1024

    def peak_mib(self) -> float:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        return (_kib("VmHWM") * 1024 - self.base) / 2**20


def _step_fn(task: dict[str, Any]):
    """The measured callable of one variant (and a warm-up callable on a few rows)."""
    import torch
    from gapclip import GapClipConfig, GapClipModel
    from gapclip.gradient_cache import gradient_cached_forward

    mode, device, size, variant = task["mode"], task["device"], task["batch"], task["variant"]
    chunk = task["chunks"].get(variant, task["chunk"])
    torch.manual_seed(0)
    if task["part"] == "step":
        config = GapClipConfig(C.clip_config(mode), local_loss=variant == "local loss")
        model = GapClipModel(config).to(device).train()
        batch = C.make_batch(mode, size, device)
        small = C.make_batch(mode, 4, device, seed=2)
        if variant.startswith(EXTRA_FORWARD):
            from gapclip.gradient_cache import split_inputs

            def extra_forward(inputs=batch):
                with torch.no_grad():
                    for rows in split_inputs(inputs, chunk)[:-1]:
                        model(**rows, return_loss=False)

            return extra_forward, lambda: extra_forward(small)
        cached = variant.startswith(CACHED)

        def step(inputs=batch):
            model.zero_grad(set_to_none=True)
            if cached:
                loss = gradient_cached_forward(model, inputs, chunk).loss
            else:
                loss = model(**inputs, return_loss=True).loss
            loss.backward()

        return step, lambda: step(small)

    from gapclip.losses import GapBatch

    config = GapClipConfig(C.clip_config("smoke"), gap_terms=OBJECTIVE_TERMS)
    model = GapClipModel(config).to(device)
    dim, rows = task["dim"], task["per_process"]
    generator = torch.Generator().manual_seed(1)

    def stand_ins(n: int) -> dict[str, torch.Tensor]:
        def unit(width):
            return torch.nn.functional.normalize(torch.randn(n, width, generator=generator), dim=-1).to(device)

        return {"image": unit(dim), "text": unit(dim), "translation": unit(dim), "teacher_image": unit(C.TEACHER_DIM),
                "teacher_text": unit(C.TEACHER_DIM)}

    def objective(values, local_rows):
        leaves = {key: value.clone().requires_grad_(key in ("image", "text", "translation"))
                  for key, value in values.items()}
        batch = GapBatch(
            image_embeds=leaves["image"], text_embeds=leaves["text"],
            logit_scale=torch.tensor(14.0, device=device), local_rows=local_rows,
            extras={"translation_embeds": leaves["translation"], "teacher_image_embeds": leaves["teacher_image"],
                    "teacher_text_embeds": leaves["teacher_text"],
                    "has_translation": torch.ones(values["image"].shape[0], dtype=torch.bool, device=device)},
        )
        model.compute_loss(batch)[0].backward()

    whole, few = stand_ins(size), stand_ins(2 * rows)
    local = task["variant"] == "local loss"
    return (lambda: objective(whole, slice(0, rows) if local else None),
            lambda: objective(few, slice(0, rows) if local else None))


def run_child(task: dict[str, Any]) -> dict[str, Any]:
    """Subprocess entry: every variant of one part at one batch size, each warmed up on a few rows, then ``repeats``
    rounds in alternating order; each step's time and peak memory above the level just before it."""
    import torch

    torch.set_num_threads(task["threads"])
    fns = {variant: _step_fn({**task, "variant": variant}) for variant in task["variants"]}
    for _, warm_up in fns.values():
        warm_up()  # imports, thread pools, autograd engine: allocated before any baseline
    meter = PeakMemory(task["device"]) if task["memory"] else None
    results = {variant: {"peak_mib": 0.0, "times_s": []} for variant in fns}
    for round_index in range(task["repeats"]):
        order = list(fns) if round_index % 2 == 0 else list(reversed(fns))
        for variant in order:
            if meter:
                meter.start()
            C.sync(task["device"])
            start = time.perf_counter()
            fns[variant][0]()
            C.sync(task["device"])
            results[variant]["times_s"].append(time.perf_counter() - start)
            if meter:
                results[variant]["peak_mib"] = max(results[variant]["peak_mib"], meter.peak_mib())
    return results


def measure(tasks: list[dict[str, Any]], *, memory: bool) -> list[dict[str, Any]]:
    """:func:`run_child` of each task, one after the other in one fresh interpreter: ``memory`` — peak memory (its
    RSS is its own; on CPU glibc's mmap threshold pinned at start-up); otherwise step times (allocator defaults)."""
    env = {**os.environ, **CHILD_ENV} if memory and tasks[0]["device"] == "cpu" else dict(os.environ)
    tasks = [{**task, "memory": memory} for task in tasks]
    out = subprocess.run([sys.executable, __file__, "--_child", json.dumps(tasks)], capture_output=True, text=True,
                         env=env)
    if out.returncode != 0:
        raise RuntimeError(f"bench_memory child {tasks} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------- the run (parent)
def fitted_exponent(sizes: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of ``log(value)`` against ``log(size)`` (values floored at 0.01 MiB)."""
    xs = [math.log(s) for s in sizes]
    ys = [math.log(max(v, 0.01)) for v in values]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    denominator = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / denominator if denominator else float("nan")


def largest_within(sizes: Sequence[int], peaks: Sequence[float], budget: float) -> str:
    fitting = [size for size, peak in zip(sizes, peaks) if peak <= budget]
    if not fitting:
        return f"< {sizes[0]}"
    return f"≥ {fitting[-1]} (all measured)" if fitting[-1] == sizes[-1] else str(fitting[-1])


def timing_rounds(size: int, sizes: Sequence[int], repeats: int, most: int = 16) -> int:
    """Timed rounds at batch ``size``: ``repeats`` at the largest size, more for smaller ones (``repeats × largest /
    size``, at most ``most``). A step of ~0.1 s is noisier than one of seconds, and the cached step's ratio at the
    smallest size read 1.24× and 1.41× in two quiet runs of 2 rounds each."""
    return max(repeats, min(most, repeats * max(sizes) // size))


def run_part(part: str, variants: Sequence[str], sizes: Sequence[int], base: dict[str, Any], repeats: int) -> dict:
    """Every variant at every size, the variants interleaved: one subprocess per size (at --smoke one for all sizes,
    since starting an interpreter with torch costs more than the smoke steps). A variant with its own chunk size
    (``base["chunks"]``) runs only at the sizes that chunk is smaller than."""
    tasks = [{**base, "part": part, "batch": size, "repeats": timing_rounds(size, sizes, repeats),
              "variants": [v for v in variants if base["chunks"].get(v, 0) < size]} for size in sizes]
    groups = [tasks] if base["mode"] == "smoke" else [[task] for task in tasks]
    results: dict[int, dict[str, dict]] = {}
    for group in groups:
        peaks = measure([{**task, "repeats": 1} for task in group], memory=True)
        times = measure(group, memory=False)
        for task, peak, timed in zip(group, peaks, times):
            results[task["batch"]] = {
                variant: {"peak_mib": peak[variant]["peak_mib"], "times_s": timed[variant]["times_s"]}
                for variant in task["variants"]
            }
    for size in sizes:
        print(f"  {part} B={size}: " + ", ".join(
            f"{v} {entry['peak_mib']:.1f} MiB {C.median(entry['times_s']) * 1e3:.1f} ms"
            for v, entry in results[size].items()), flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> dict:
    def extra(parser):
        parser.add_argument("--budget_mib", type=float, default=None, help="memory budget of the 'largest batch' rows")
        parser.add_argument("--threads", type=int, default=None, help="torch threads per measurement (default: all)")
        parser.add_argument("--batches", default=None,
                            help="comma-separated global batch sizes instead of the mode's ladder (at least two)")
        parser.add_argument("--chunk", type=int, default=None,
                            help="rows per chunk of gradient caching (default: the mode's); 2× and 4× are timed too")

    args = C.parse_args(__doc__.splitlines()[0], argv, extra=extra)
    import torch

    mode, device = args.mode, args.device
    repeats = args.repeats or {"full": 3, "quick": 2, "smoke": 1}[mode]
    budget = args.budget_mib or BUDGET_MIB[mode]
    sizes, per_process = BATCHES[mode], PER_PROCESS[mode]
    chunk = CHUNK[mode] if args.chunk is None else args.chunk
    if chunk < 1:
        raise SystemExit(f"--chunk takes a positive number of rows, got {args.chunk}")
    chunks = [chunk * factor for factor in CHUNK_FACTORS]
    if args.batches:
        try:
            sizes = tuple(sorted({int(value) for value in args.batches.split(",")}))
        except ValueError:
            raise SystemExit(f"--batches takes comma-separated whole numbers, got {args.batches!r}") from None
        if len(sizes) < 2 or sizes[0] < per_process:
            raise SystemExit(f"--batches needs at least two sizes, each at least {per_process} (the rows per "
                             f"process at this shape), got {args.batches!r}")
    if args.threads:
        torch.set_num_threads(args.threads)  # what the measuring subprocesses use, and what the header reports
    base = {"mode": mode, "device": device, "chunk": chunk, "threads": torch.get_num_threads(),
            "per_process": per_process, "dim": OBJECTIVE_DIM[mode],
            "chunks": {with_chunk(variant, size): size for size in chunks[1:] for variant in (CACHED, EXTRA_FORWARD)}}
    load = os.getloadavg() if hasattr(os, "getloadavg") else None

    # 1. the training step of one process
    steps = run_part("step", (*STEP_VARIANTS, EXTRA_FORWARD, *base["chunks"]), sizes, base, repeats)
    rows, step_summary = [], {}
    for size in sizes:
        row: list[Any] = [size]
        reference = C.median(steps[size]["global loss"]["times_s"])
        for variant in STEP_VARIANTS:
            entry = steps[size][variant]
            seconds = C.median(entry["times_s"])
            entry["median_s"], entry["ratio_vs_global"] = seconds, seconds / reference
            row += [f"{entry['peak_mib']:.1f}", f"{seconds * 1e3:.1f}"]
            if variant != "global loss":
                row.append(f"{entry['ratio_vs_global']:.2f}×")
        extra = steps[size][EXTRA_FORWARD]
        extra["median_s"] = C.median(extra["times_s"])
        extra["floor_vs_global"] = (reference + extra["median_s"]) / reference
        rows.append([*row, f"{extra['median_s'] * 1e3:.1f}", f"{extra['floor_vs_global']:.2f}×"])
    columns = ["B", "global MiB", "global ms", "local MiB", "local ms", "local/global", f"cached (C={chunk}) MiB",
               "cached ms", "cached/global", "extra forward ms", "(global + extra)/global"]
    beyond = [size for size in sizes if size > chunk]
    for variant in STEP_VARIANTS:
        peaks = [steps[size][variant]["peak_mib"] for size in sizes]
        step_summary[variant] = {
            "fitted_exponent": fitted_exponent(beyond, [steps[s][variant]["peak_mib"] for s in beyond])
            if len(beyond) > 1 else float("nan"),
            "largest_batch_within_budget": largest_within(sizes, peaks, budget),
        }
    fits_budget = [s for s in sizes if steps[s]["global loss"]["peak_mib"] <= budget]
    local_ratios = [steps[s]["local loss"]["ratio_vs_global"] for s in sizes]

    # gradient caching's chunk size: each C beside the same uncached step
    chunk_rows, by_chunk = [], {}
    for size in sizes:
        reference = steps[size]["global loss"]["median_s"]
        for chunk_size in [c for c in chunks if c < size]:
            cached, extra = ((CACHED, EXTRA_FORWARD) if chunk_size == chunk else
                             (with_chunk(CACHED, chunk_size), with_chunk(EXTRA_FORWARD, chunk_size)))
            seconds, extra_s = C.median(steps[size][cached]["times_s"]), C.median(steps[size][extra]["times_s"])
            entry = {"peak_mib": steps[size][cached]["peak_mib"], "median_s": seconds,
                     "ratio_vs_global": seconds / reference, "extra_forward_s": extra_s,
                     "floor_vs_global": (reference + extra_s) / reference}
            by_chunk.setdefault(size, {})[chunk_size] = entry
            chunk_rows.append([size, chunk_size, math.ceil(size / chunk_size), f"{entry['peak_mib']:.1f}",
                               f"{seconds * 1e3:.1f}", f"{entry['ratio_vs_global']:.2f}×", f"{extra_s * 1e3:.1f}",
                               f"{entry['floor_vs_global']:.2f}×"])
    chunk_summary = {}
    for chunk_size in chunks:
        measured = [size for size in sizes if chunk_size in by_chunk.get(size, {})]
        if not measured:  # a chunk no smaller than every batch: the step is the uncached one
            continue
        timed = [size for size in measured if size in fits_budget]
        ratios = {size: by_chunk[size][chunk_size]["ratio_vs_global"] for size in timed}
        worst_size = max(ratios, key=ratios.get, default=None)
        peaks = [by_chunk[size][chunk_size]["peak_mib"] for size in measured]
        chunk_summary[chunk_size] = {
            "worst_batch": worst_size, "worst_ratio_vs_global": ratios.get(worst_size),
            "fitted_exponent": fitted_exponent(measured, peaks) if len(measured) > 1 else None,
        }
    # the chunk sizes that meet both of gradient caching's targets at once (time where the uncached fits, flat peak)
    meeting = [c for c, entry in chunk_summary.items() if entry["worst_ratio_vs_global"] is not None
               and entry["worst_ratio_vs_global"] <= 1.35 and entry["fitted_exponent"] is not None
               and entry["fitted_exponent"] <= 0.25]
    worst = max(fits_budget, key=lambda s: steps[s]["gradient caching"]["ratio_vs_global"], default=None)
    worst_ratio = None if worst is None else steps[worst]["gradient caching"]["ratio_vs_global"]
    summary_rows = [
        [variant, f"{step_summary[variant]['fitted_exponent']:.2f}",
         step_summary[variant]["largest_batch_within_budget"]]
        for variant in STEP_VARIANTS
    ]
    targets = [
        ["local loss step ≤ 1.05× global (median over B)", f"{C.median(local_ratios):.3f}×",
         C.met(C.median(local_ratios) <= 1.05)],
        [f"cached step ≤ 1.35× uncached where the uncached fits {budget:.0f} MiB (worst B)",
         f"{worst_ratio:.3f}× (uncached + extra forward: {steps[worst][EXTRA_FORWARD]['floor_vs_global']:.3f}×)"
         if worst is not None else "n/a",
         C.met(worst is not None and worst_ratio <= 1.35)],
        [f"both cached targets at one chunk size C ∈ {{{', '.join(map(str, chunks))}}} (per-chunk table)",
         ", ".join(f"C = {c}" for c in meeting) or "none", C.met(bool(meeting))],
        [f"cached peak flat beyond the chunk (exponent in B over B > {chunk})",
         f"{step_summary['gradient caching']['fitted_exponent']:.2f}",
         C.met(step_summary["gradient caching"]["fitted_exponent"] <= 0.25)],
    ]

    # 2. the objective of one process of a W = B / b process run
    objectives = run_part("objective", OBJECTIVE_VARIANTS, sizes, base, repeats)
    objective_rows = []
    for size in sizes:
        glob, loc = objectives[size]["global loss"], objectives[size]["local loss"]
        ratio = C.median(loc["times_s"]) / C.median(glob["times_s"])
        loc["ratio_vs_global"] = ratio
        objective_rows.append([size, size // per_process, f"{glob['peak_mib']:.2f}",
                               f"{C.median(glob['times_s']) * 1e3:.2f}", f"{loc['peak_mib']:.2f}",
                               f"{C.median(loc['times_s']) * 1e3:.2f}", f"{ratio:.2f}×"])
    fit_sizes = [s for s in sizes if s >= 4 * per_process] or list(sizes)
    objective_summary = {
        variant: {
            "fitted_exponent": fitted_exponent(fit_sizes, [objectives[s][variant]["peak_mib"] for s in fit_sizes]),
            "largest_batch_within_budget": largest_within(
                sizes, [objectives[s][variant]["peak_mib"] for s in sizes], budget / 4),
        }
        for variant in OBJECTIVE_VARIANTS
    }
    local_exponent = objective_summary["local loss"]["fitted_exponent"]
    targets.insert(0, [f"local objective ∝ b·B: exponent in B at b = {per_process} (global: "
                       f"{objective_summary['global loss']['fitted_exponent']:.2f})", f"{local_exponent:.2f}",
                       C.met(abs(local_exponent - 1.0) <= 0.25)])

    s = C.SHAPES[mode]
    load_text = "n/a" if load is None else ", ".join(f"{value:.2f}" for value in load)
    shape = (f"{s['num_layers']} layers, width {s['hidden_size']}, {s['image_size']} px / patch {s['patch_size']}, "
             f"{C.SEQ_LEN} tokens; InfoNCE; forward + backward, no optimizer; peak memory above the process before "
             f"the step (one subprocess), median step time over "
             f"{', '.join(str(timing_rounds(size, sizes, repeats)) for size in sizes)} rounds at B = "
             f"{', '.join(map(str, sizes))} (another subprocess, allocator defaults); load average {load_text}")
    objective_text = (f"process 0 of W = B/{per_process} processes: objective (InfoNCE + CSA + GST + DIAS inter/intra "
                      f"dense) on stand-in gathered embeddings of width {OBJECTIVE_DIM[mode]}, forward + backward")
    sections = [
        (f"Training step of one process ({shape})", C.markdown_table(columns, rows)),
        (f"Fitted peak-memory exponent in B (over B > {chunk}) and largest batch within {budget:.0f} MiB",
         C.markdown_table(["variant", "exponent", "largest B"], summary_rows)),
        ("Gradient caching's chunk size C (same subprocesses and rounds as above; cached/global against the same "
         "uncached step)",
         C.markdown_table(["B", "C", "chunks", "cached MiB", "cached ms", "cached/global", "extra forward ms",
                           "(global + extra)/global"], chunk_rows)),
        ("Per chunk size: the cached step's worst ratio where the uncached step fits, and the peak's exponent in B "
         "over B > C", C.markdown_table(["C", "worst cached/global (B)", "peak exponent"], [
             [c, "n/a" if entry["worst_batch"] is None else
              f"{entry['worst_ratio_vs_global']:.2f}× ({entry['worst_batch']})",
              "n/a" if entry["fitted_exponent"] is None else f"{entry['fitted_exponent']:.2f}"]
             for c, entry in chunk_summary.items()])),
        (f"Objective of one process ({objective_text})",
         C.markdown_table(["B", "W", "global MiB", "global ms", "local MiB", "local ms", "local/global"],
                          objective_rows)),
        (f"Objective: fitted exponent in B (over B ≥ {4 * per_process}) and largest B within {budget / 4:.0f} MiB",
         C.markdown_table(["variant", "exponent", "largest B"], [
             [v, f"{objective_summary[v]['fitted_exponent']:.2f}", objective_summary[v]["largest_batch_within_budget"]]
             for v in OBJECTIVE_VARIANTS])),
        ("Targets (printed, not asserted)", C.markdown_table(["target", "measured", "status"], targets)),
    ]
    data = {
        "shape": shape, "load_average": load, "budget_mib": budget, "chunk": chunk, "per_process": per_process,
        "step": {str(size): steps[size] for size in sizes}, "step_summary": step_summary,
        "chunk_sizes": {str(size): {str(c): value for c, value in entry.items()}
                        for size, entry in by_chunk.items()},
        "chunk_summary": {str(c): entry for c, entry in chunk_summary.items()},
        "objective": {str(size): objectives[size] for size in sizes}, "objective_summary": objective_summary,
        "targets": [[str(cell) for cell in target] for target in targets],
    }
    C.write_results(args, NAME, "Memory and step time vs global batch: global loss, local loss, gradient caching",
                    sections, data)
    return data


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--_child":
        print(json.dumps([run_child(task) for task in json.loads(sys.argv[2])]))
    else:
        main()
