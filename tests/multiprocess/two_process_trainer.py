"""Worker of ``test_trainer_two_process.py``: ``GapClipTrainer`` under DDP, plain and with the scaling flags.

Run as ``torchrun --nproc_per_node 2 -m tests.multiprocess.two_process_trainer DEMO_ROOT OUT_DIR``. Each variant
trains a fresh model (same seed, same data) for 2 optimizer steps of 2 accumulated micro-batches of 4 rows per
process; rank 0 saves the final weights and the logged losses as ``OUT_DIR/<variant>.safetensors`` / ``.json``
(and the untrained weights as ``initial.safetensors``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from gapclip import GapClipConfig, GapClipModel
from gapclip.cli import GapClipTrainingArguments, scratch_clip_config
from gapclip.data import CaptionPairs, GapClipCollator, load_caption_dataset, make_demo_processor
from gapclip.distributed import end_process_group
from gapclip.trainer import GapClipTrainer

#: variant -> (local_loss, gradient_cache_chunk_size); the first is the reference.
VARIANTS = {"plain": (False, None), "cached": (False, 3), "local": (True, None), "local-cached": (True, 3)}
#: LSC gathers its fused rows, dias_dim all-reduces its sums, dias_inter gathers its mask's column statistics.
GAP_TERMS = [{"name": "lsc"}, {"name": "dias_dim", "weight": 2.0}, {"name": "dias_inter", "weight": 0.1}]


def train(variant: str, root: Path, out: Path) -> None:
    local_loss, chunk_size = VARIANTS[variant]
    processor = make_demo_processor(root)
    torch.manual_seed(0)
    config = GapClipConfig(scratch_clip_config(processor, 32, 32, 1), gap_terms=GAP_TERMS, local_loss=local_loss)
    model = GapClipModel(config)
    if variant == "plain" and int(os.environ.get("RANK", "0")) == 0:
        save_file({name: value.detach().clone().contiguous() for name, value in model.state_dict().items()},
                  str(out / "initial.safetensors"))
    args = GapClipTrainingArguments(
        output_dir=str(out / variant), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2,
        learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=0.0, logging_steps=1, eval_strategy="no", save_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=True, seed=0, load_best_model_at_end=False, dataloader_pin_memory=False,
        gradient_cache_chunk_size=chunk_size,
    )
    trainer = GapClipTrainer(
        model=model, args=args, train_dataset=CaptionPairs(load_caption_dataset("demo", root=root)["train"], seed=0),
        data_collator=GapClipCollator(processor), processing_class=processor,
    )
    trainer.train()
    if trainer.is_world_process_zero():
        state = {name: value.detach().contiguous() for name, value in trainer.model.state_dict().items()}
        save_file(state, str(out / f"{variant}.safetensors"))
        history = trainer.state.log_history
        logged = [entry["loss"] for entry in history if "loss" in entry and "train_loss" not in entry]
        (out / f"{variant}.json").write_text(json.dumps(logged))


def main(root: str, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for variant in VARIANTS:
        train(variant, Path(root), out)
    end_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
