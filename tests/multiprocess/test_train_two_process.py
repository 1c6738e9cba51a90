"""The LG-MGC training recipe under torchrun with 2 CPU processes (gloo) runs to completion and writes its report."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import DEMO_SIZES

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "train_clip_lgmgc.py"


def test_lgmgc_recipe_trains_on_two_processes(tiny_demo_root, gapclip_cache, tmp_path):
    out = tmp_path / "out"
    env = {
        **os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "GAPCLIP_CACHE": str(gapclip_cache),
        "TOKENIZERS_PARALLELISM": "false",
    }
    # `--standalone` picks a free rendezvous port itself (`--master_port 0` hangs).
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(RECIPE),
        "--dataset", "demo", "--demo_train", str(DEMO_SIZES["num_train"]), "--demo_val", str(DEMO_SIZES["num_val"]),
        "--demo_test", str(DEMO_SIZES["num_test"]), "--demo_image_size", str(DEMO_SIZES["image_size"]),
        "--scratch_width", "32", "--scratch_layers", "1", "--max_steps", "3", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8", "--output_dir", str(out), "--no_lsc", "--no_gst", "--eval_strategy", "no",
        "--save_strategy", "no", "--load_best_model_at_end", "false", "--report_to", "none", "--disable_tqdm", "true",
        "--logging_steps", "1", "--dataloader_pin_memory", "false", "--verify_images",
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = json.loads((out / "retrieval.json").read_text())
    assert list(rows) == ["before training", "after training"]
    assert all("rsum" in metrics and "modality_gap" in metrics for metrics in rows.values())
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert any("loss_base" in entry for entry in state["log_history"])
    # Only the main process prints the table and the summary; the two processes shared the image verification.
    assert len(re.findall(r"^\| after training +\|", result.stdout, re.M)) == 1
    assert result.stdout.count(f"Run finished: {out.resolve()}") == 1
    assert result.stderr.count("--verify_images: every image of the ['train', 'validation', 'test'] split(s)") == 1
