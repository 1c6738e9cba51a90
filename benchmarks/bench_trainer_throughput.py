"""GapClipModel (no gap terms) + GapClipTrainer vs CLIPModel(return_loss=True) + transformers.Trainer.

Same initial weights (the GapClipModel wraps a deep copy of the CLIPModel), same synthetic in-memory dataset, same
TrainingArguments. The two runs alternate (gap, hf, gap, hf, ...) after a warm-up run of each. Throughput is the
batch size over the median optimizer-step time of a run (a callback times every step after the first, data loading
included): unlike ``train_samples_per_second`` it leaves out ``train()``'s start-up and is not moved by one stalled
step of a shared machine. The ratio is the median over the run pairs. Memory: tracemalloc peak of the Python allocations during one extra, untimed ``train()`` (on CUDA:
torch.cuda.max_memory_allocated). Target (printed, never asserted): gapclip ≥ 0.97× the plain Trainer's samples/s.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import tracemalloc
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "trainer_throughput"


def step_timer():
    """A TrainerCallback that records the wall time of every optimizer step."""
    import time

    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.durations: list[float] = []
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.durations.append(time.perf_counter() - self._start)

    return StepTimer()


class TensorDataset:
    def __init__(self, tensors: dict):
        self.tensors = tensors

    def __len__(self):
        return len(self.tensors["input_ids"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.tensors.items()}


def collate(rows):
    import torch

    out = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    out["return_loss"] = True
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    import torch
    import transformers
    from transformers import CLIPModel, Trainer, TrainingArguments

    from gapclip import GapClipConfig, GapClipModel
    from gapclip.trainer import GapClipTrainer

    transformers.logging.set_verbosity_error()
    mode, device = args.mode, args.device
    batch_size = C.SHAPES[mode]["batch"]
    # Short runs, many pairs: the load of a shared machine drifts over seconds, so pairs close in time compare best.
    steps = {"full": 12, "quick": 12, "smoke": 3}[mode]
    repeats = args.repeats or {"full": 7, "quick": 15, "smoke": 1}[mode]
    full = C.make_batch(mode, batch_size * steps, device="cpu")
    dataset = TensorDataset({k: full[k] for k in ("input_ids", "attention_mask", "pixel_values")})

    torch.manual_seed(0)
    clip_init = CLIPModel(C.clip_config(mode))
    gap_init = GapClipModel(GapClipConfig(C.clip_config(mode)), backbone=copy.deepcopy(clip_init))
    tmp = tempfile.mkdtemp(prefix="gapclip_bench_trainer_")

    def run(kind: str, measure_memory: bool = False) -> dict:
        targs = TrainingArguments(
            output_dir=tmp, eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
            max_steps=steps, remove_unused_columns=False, per_device_train_batch_size=batch_size,
            logging_strategy="no", use_cpu=device == "cpu", dataloader_num_workers=0, seed=0,
        )
        model = copy.deepcopy(clip_init if kind == "hf" else gap_init)
        cls = Trainer if kind == "hf" else GapClipTrainer
        timer = step_timer()
        trainer = cls(model=model, args=targs, train_dataset=dataset, data_collator=collate, callbacks=[timer])
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

    run("gap"), run("hf")  # warm-up
    runs = {"gap": [], "hf": []}
    for _ in range(repeats):
        for kind in ("gap", "hf"):
            runs[kind].append(run(kind))

    sps = {k: [r["samples_per_s"] for r in v] for k, v in runs.items()}
    if device == "cuda":
        peak = {k: C.median([r["peak_mib"] for r in v]) for k, v in runs.items()}
    else:
        peak = {k: run(k, measure_memory=True)["peak_mib"] for k in ("gap", "hf")}
    ratio = C.median([g / h for g, h in zip(sps["gap"], sps["hf"])])
    mem_label = "CUDA max allocated (MiB)" if device == "cuda" else "tracemalloc peak, Python heap (MiB)"
    whole = {k: C.median([r["train_samples_per_second"] for r in v]) for k, v in runs.items()}
    rows = [
        ["CLIPModel + Trainer (reference)", C.median(sps["hf"]), 1.0, whole["hf"], peak["hf"], "reference", "-"],
        ["GapClipModel + GapClipTrainer", C.median(sps["gap"]), ratio, whole["gap"], peak["gap"], "≥ 0.97",
         C.met(ratio >= 0.97)],
    ]
    columns = ["setup", "samples/s (median step)", "median ratio", "train() samples/s incl. start-up", mem_label,
               "target", "status"]
    table = C.markdown_table(columns, rows)
    s = C.SHAPES[mode]
    shape = (f"{s['num_layers']} layers, width {s['hidden_size']}, {s['image_size']} px, batch {batch_size}, "
             f"{steps} steps per run; {repeats} alternating runs of each after 1 warm-up run")
    note = ("tracemalloc sees Python-level allocations only (not torch's CPU tensor storage), so the memory column "
            "is the framework overhead, not the tensors; it is measured in one extra run per setup, outside the "
            "timed runs." if device == "cpu" else "")
    C.write_results(args, NAME, "Trainer throughput: GapClipTrainer vs transformers.Trainer",
                    [(shape, table + ("\n\n" + note if note else ""))],
                    {"shape": shape, "ratio": ratio, "met": ratio >= 0.97, "runs": runs, "peak_mib": peak})
    return runs


if __name__ == "__main__":
    main()
