"""A run killed (SIGKILL) in the middle of writing a checkpoint leaves no half-written ``checkpoint-N``:
GapClipTrainer writes into ``.checkpoint-staging`` and renames when complete, so ``get_last_checkpoint`` returns the
previous, complete checkpoint, and rerunning the same command resumes from it and ends as the uninterrupted run."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import torch
from transformers.trainer_utils import get_last_checkpoint

from gapclip import GapClipModel
from gapclip.trainer import STAGING_DIR

from ..test_recipes import RECIPES, load_recipe, tiny_flags
from . import assert_same_weights, load_weights, step_losses

CHILD = textwrap.dedent("""
    import importlib.util, json, pathlib, sys, time
    from gapclip.trainer import GapClipTrainer

    recipe, marker, flags = sys.argv[1], pathlib.Path(sys.argv[2]), json.loads(sys.argv[3])
    original = GapClipTrainer._save_rng_state

    def slow_save(self, output_dir):  # the model and optimizer of step 3 are written; hang before the rest
        if self.state.global_step == 3:
            marker.write_text(output_dir)
            time.sleep(300)
        return original(self, output_dir)

    GapClipTrainer._save_rng_state = slow_save
    spec = importlib.util.spec_from_file_location("recipe", recipe)
    module = importlib.util.module_from_spec(spec)
    sys.modules["recipe"] = module
    spec.loader.exec_module(module)
    module.main(flags)
""")


def flags(out):
    return tiny_flags(
        out, "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "10", "--logging_steps", "1",
        "--seed", "0", "--skip_initial_eval", "true",
    )


def test_kill_during_save_leaves_a_resumable_run(tiny_demo_root, tmp_path, caplog):
    out, marker = tmp_path / "out", tmp_path / "saving"
    # The child computes steps 1-2 of the run resumed here: with another thread count than this process, its float
    # sums run in another order and the resumed steps differ from the clean run's in the last bit.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(RECIPES / "train_clip_lgmgc.py"), str(marker), json.dumps(flags(out))],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "the child never reached the step-3 save"
            time.sleep(0.1)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    partial = marker.read_text()
    assert STAGING_DIR in partial and os.path.isfile(os.path.join(partial, "model.safetensors"))

    last = get_last_checkpoint(str(out))
    assert last == str(out / "checkpoint-2")
    assert not (out / "checkpoint-3").exists()
    json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    GapClipModel.from_pretrained(last)

    lgmgc = load_recipe("train_clip_lgmgc")
    with caplog.at_level(logging.WARNING):
        result = lgmgc.main(flags(out))  # the same command again
    assert any(f"Resuming from {out / 'checkpoint-2'}" in r.getMessage() for r in caplog.records)
    assert result["trainer"].state.global_step == 4
    assert not (out / STAGING_DIR).exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{i}" for i in (1, 2, 3, 4)]

    clean = tmp_path / "clean"
    lgmgc.main(flags(clean))
    assert step_losses(out) == step_losses(clean)
    assert_same_weights(load_weights(out), load_weights(clean))
