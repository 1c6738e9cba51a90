"""GapClipModel (no gap terms) + GapClipTrainer vs CLIPModel(return_loss=True) + transformers.Trainer.

Same initial weights (the GapClipModel wraps a deep copy of the CLIPModel), same synthetic in-memory dataset, same
TrainingArguments. A second pair runs one GapClipModel with every registered gap term under GapClipTrainer and under
the plain Trainer: the same model's work, so the ratio is the framework's own per-step cost with every term on (the
non-finite guard, the per-term bookkeeping); what the terms cost the model is bench_term_overhead's figure. The runs
alternate (gap, hf, gap + terms, hf + terms, ...) after a warm-up run of each. Throughput is the batch size over the
median optimizer-step time of a run (a callback times every step after the first, data loading included): unlike
``train_samples_per_second`` it leaves out ``train()``'s start-up and is not moved by one stalled step of a shared
machine. Each ratio is the median over the run pairs, printed with the spread of the pairs' ratios (interquartile
range: how far one pair is from another) and a 95 % bootstrap interval of the median itself (how far the printed
figure could move in a rerun on the same machine state). Whole runs of a shared CPU differ by several per cent from
one another, so a second measurement pairs single steps: both trainers of a pair train in one process, in two
threads that take turns step by step (a callback hands the turn over at each step's end), so that each gapclip step
is compared with the reference step just before it; the median of these per-step ratios, with its bootstrap
interval, is the figure the target is read from. The load average at the start and the end is printed with
the table: a figure measured on a busy machine is not the target's. Memory: tracemalloc peak of the Python
allocations during one extra, untimed ``train()`` (on CUDA: torch.cuda.max_memory_allocated). Target (printed, never
asserted): gapclip ≥ 0.97× the plain Trainer's samples/s, in both pairs, read from the interleaved steps.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import threading
import tracemalloc
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "trainer_throughput"


def step_timer(before=None, after=None):
    """A TrainerCallback that records the wall time of every optimizer step.

    ``before`` / ``after`` run just outside the timed span (the interleaved measurement waits for its turn and hands
    it over there, so the waiting is never timed).
    """
    import time

    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.durations: list[float] = []
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if before is not None:
                before()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.durations.append(time.perf_counter() - self._start)
            if after is not None:
                after()

    return StepTimer()


class TensorDataset:
    """Rows of in-memory tensors; nested dicts (the gap terms' ``term_inputs``) are indexed the same way."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def __len__(self):
        return len(self.tensors["input_ids"])

    def __getitem__(self, i):
        return _index(self.tensors, i)


def _index(tensors: dict, i: int) -> dict:
    return {k: _index(v, i) if isinstance(v, dict) else v[i] for k, v in tensors.items()}


def _stack(rows: list[dict]) -> dict:
    import torch

    return {k: _stack([r[k] for r in rows]) if isinstance(v, dict) else torch.stack([r[k] for r in rows])
            for k, v in rows[0].items()}


def collate(rows):
    out = _stack(rows)
    out["return_loss"] = True
    return out


def median_interval(ratios: list[float], resamples: int = 2000, seed: int = 0) -> str:
    """95 % percentile-bootstrap interval of the median of the pairs' ratios (pairs resampled with replacement)."""
    import random
    import statistics

    if len(ratios) < 2:
        return "-"
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return f"{medians[int(0.025 * resamples)]:.3f}–{medians[int(0.975 * resamples) - 1]:.3f}"


class _Turns:
    """Whose step it is: the two threads of :func:`interleaved_steps` alternate through it."""

    def __init__(self, order: list[str]):
        self.order, self.turn, self.finished = order, 0, set()
        self.condition = threading.Condition()

    def wait(self, who: str) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.order[self.turn] in (who, *self.finished))

    def hand_over(self, who: str, finished: bool = False) -> None:
        with self.condition:
            if finished:
                self.finished.add(who)
            if self.order[self.turn] == who or finished:
                self.turn = (self.turn + 1) % len(self.order)
            self.condition.notify_all()


def interleaved_steps(make_trainer, kinds: tuple[str, str]) -> dict[str, list[float]]:
    """Step times of two trainers whose steps alternate in one process (``make_trainer(kind, callback)``)."""
    turns = _Turns(list(kinds))
    callbacks = {kind: step_timer(before=lambda who=kind: turns.wait(who), after=lambda who=kind: turns.hand_over(who))
                 for kind in kinds}
    trainers = {kind: make_trainer(kind, callbacks[kind]) for kind in kinds}
    errors: list[BaseException] = []

    def train(kind):
        try:
            trainers[kind].train()
        except BaseException as error:  # re-raised in the main thread
            errors.append(error)
        finally:
            turns.hand_over(kind, finished=True)

    other = threading.Thread(target=train, args=(kinds[1],))
    other.start()
    train(kinds[0])
    other.join()
    if errors:
        raise errors[0]
    return {kind: callbacks[kind].durations for kind in kinds}


def ratio_spread(ratios: list[float]) -> str:
    """The interquartile range of the pairs' ratios: how far one run pair is from another."""
    import statistics

    if len(ratios) < 2:
        return "-"
    low, _, high = statistics.quantiles(ratios, n=4)
    return f"{low:.3f}–{high:.3f}"


def main(argv: Sequence[str] | None = None) -> dict:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    import torch
    import transformers
    from transformers import CLIPModel, Trainer, TrainingArguments

    from gapclip import GapClipConfig, GapClipModel
    from gapclip.losses import TERM_REGISTRY
    from gapclip.trainer import GapClipTrainer

    transformers.logging.set_verbosity_error()
    mode, device = args.mode, args.device
    batch_size = C.SHAPES[mode]["batch"]
    # Whole train() runs of a shared CPU scatter by several per cent from one another (at 40 steps × 16 pairs the
    # median's 95 % bootstrap interval was still about ±8 %), so they are kept for context only, in a few pairs; the
    # target is read from the interleaved steps. At 300 interleaved steps the median's interval was ±1.1–1.9 % on a
    # quiet machine; its width falls as 1/√steps, so 1200 (--quick) aim at ±1 %.
    steps = {"full": 60, "quick": 40, "smoke": 3}[mode]
    interleaved_count = {"full": 2400, "quick": 1200, "smoke": 4}[mode]
    repeats = args.repeats or {"full": 8, "quick": 4, "smoke": 1}[mode]
    full = C.make_batch(mode, batch_size * steps, device="cpu")
    plain_data = TensorDataset({k: full[k] for k in ("input_ids", "attention_mask", "pixel_values")})
    term_data = TensorDataset({k: full[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_index",
                                                    "term_inputs")})
    term_names = sorted(TERM_REGISTRY)

    torch.manual_seed(0)
    clip_init = CLIPModel(C.clip_config(mode))
    gap_init = GapClipModel(GapClipConfig(C.clip_config(mode)), backbone=copy.deepcopy(clip_init))
    terms_init = GapClipModel(
        GapClipConfig(C.clip_config(mode), gap_terms=[C.term_spec(name, batch_size) for name in term_names]),
        backbone=copy.deepcopy(clip_init),
    )
    # setup: (initial model, Trainer class, dataset)
    setups = {
        "gap": (gap_init, GapClipTrainer, plain_data),
        "hf": (clip_init, Trainer, plain_data),
        "gap_terms": (terms_init, GapClipTrainer, term_data),
        "hf_terms": (terms_init, Trainer, term_data),
    }
    tmp = tempfile.mkdtemp(prefix="gapclip_bench_trainer_")

    def make_trainer(kind: str, timer, max_steps: int = steps):
        targs = TrainingArguments(
            output_dir=tmp, eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
            max_steps=max_steps, remove_unused_columns=False, per_device_train_batch_size=batch_size,
            logging_strategy="no", use_cpu=device == "cpu", dataloader_num_workers=0, seed=0,
        )
        init, cls, dataset = setups[kind]
        return cls(model=copy.deepcopy(init), args=targs, train_dataset=dataset, data_collator=collate,
                   callbacks=[timer])

    def run(kind: str, measure_memory: bool = False) -> dict:
        timer = step_timer()
        trainer = make_trainer(kind, timer)
        peak = None  # measured only on CUDA, or in the separate tracemalloc run
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            out = trainer.train()
            peak = torch.cuda.max_memory_allocated() / 2**20
        elif measure_memory:  # separate runs: tracemalloc slows Python code down and would distort samples/s
            tracemalloc.start()
            out = trainer.train()
            peak = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
        else:
            out = trainer.train()
        steady = timer.durations[1:] or timer.durations  # the first step pays for lazy initialisation
        return {"samples_per_s": batch_size / C.median(steady), "peak_mib": peak,
                "train_samples_per_second": float(out.metrics["train_samples_per_second"]),
                "loss": float(out.metrics["train_loss"])}

    for kind in setups:  # warm-up
        run(kind)
    runs = {kind: [] for kind in setups}
    for _ in range(repeats):
        for kind in setups:
            runs[kind].append(run(kind))

    # Step-interleaved pairs: the reference's step, then ours, in turn, in one process (first step of each left out).
    step_ratios = {}
    for ours, reference in (("gap", "hf"), ("gap_terms", "hf_terms")):
        times = interleaved_steps(
            lambda kind, timer: make_trainer(kind, timer, interleaved_count + 1), (reference, ours)
        )
        step_ratios[ours] = [r / o for r, o in zip(times[reference][1:], times[ours][1:])]

    sps = {k: [r["samples_per_s"] for r in v] for k, v in runs.items()}
    if device == "cuda":
        peak = {k: C.median([r["peak_mib"] for r in v]) for k, v in runs.items()}
    else:
        peak = {k: run(k, measure_memory=True)["peak_mib"] for k in setups}
    pair_ratios = {ours: [g / h for g, h in zip(sps[ours], sps[reference])]
                   for ours, reference in (("gap", "hf"), ("gap_terms", "hf_terms"))}
    ratio = {ours: C.median(values) for ours, values in pair_ratios.items()}
    mem_label = "CUDA max allocated (MiB)" if device == "cuda" else "tracemalloc peak, Python heap (MiB)"
    whole = {k: C.median([r["train_samples_per_second"] for r in v]) for k, v in runs.items()}
    labels = {
        "hf": "CLIPModel + Trainer (reference)",
        "gap": "GapClipModel + GapClipTrainer",
        "hf_terms": f"GapClipModel, every gap term ({len(term_names)}) + Trainer (reference)",
        "gap_terms": f"GapClipModel, every gap term ({len(term_names)}) + GapClipTrainer",
    }
    rows = []
    for ours, reference in (("gap", "hf"), ("gap_terms", "hf_terms")):
        rows.append([labels[reference], C.median(sps[reference]), 1.0, "-", "-", whole[reference], peak[reference],
                     "reference", "-"])
        rows.append([labels[ours], C.median(sps[ours]), ratio[ours], median_interval(pair_ratios[ours]),
                     ratio_spread(pair_ratios[ours]), whole[ours], peak[ours], "read below", "-"])
    columns = ["setup", "samples/s (median step)", "median ratio", "95 % CI of the median", "ratio IQR over pairs",
               "train() samples/s incl. start-up", mem_label, "target", "status"]
    table = C.markdown_table(columns, rows)
    step_ratio = {ours: C.median(values) for ours, values in step_ratios.items()}
    step_table = C.markdown_table(
        ["pair (ours vs reference)", "step pairs", "median per-step ratio", "95 % CI of the median",
         "ratio IQR over step pairs", "target", "status"],
        [[f"{labels[ours]} vs {labels[reference]}", len(step_ratios[ours]), step_ratio[ours],
          median_interval(step_ratios[ours]), ratio_spread(step_ratios[ours]), "≥ 0.97",
          C.met(step_ratio[ours] >= 0.97)] for ours, reference in (("gap", "hf"), ("gap_terms", "hf_terms"))],
    )
    s = C.SHAPES[mode]
    shape = (f"{s['num_layers']} layers, width {s['hidden_size']}, {s['image_size']} px, batch {batch_size}, "
             f"{steps} steps per run; {repeats} alternating runs of each after 1 warm-up run; gap terms: "
             f"{', '.join(term_names)}")
    note = ("tracemalloc sees Python-level allocations only (not torch's CPU tensor storage), so the memory column "
            "is the framework overhead, not the tensors; it is measured in one extra run per setup, outside the "
            "timed runs." if device == "cpu" else "")
    met_all = all(value >= 0.97 for value in step_ratio.values())
    step_caption = (f"Interleaved steps: each pair's two trainers in one process, taking turns step by step "
                    f"({interleaved_count} steps each; ratio = reference step time / ours, i.e. our throughput "
                    f"relative to the reference)")
    C.write_results(args, NAME, "Trainer throughput: GapClipTrainer vs transformers.Trainer",
                    [(shape, table + ("\n\n" + note if note else "")), (step_caption, step_table)],
                    {"shape": shape, "ratio": ratio["gap"], "ratio_every_term": ratio["gap_terms"],
                     "pair_ratios": pair_ratios, "step_ratio": step_ratio["gap"],
                     "step_ratio_every_term": step_ratio["gap_terms"], "step_ratios": step_ratios,
                     "met": met_all, "runs": runs, "peak_mib": peak})
    return runs


if __name__ == "__main__":
    main()
