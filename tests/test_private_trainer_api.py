"""The private `Trainer` API gapclip relies on (``gapclip.checkpoints.PRIVATE_TRAINER_API``) is still there and does
what the crash-safe checkpoint assumes; the transformers version is within the bound ``pyproject.toml`` sets.

When a transformers release changes any of it, these tests fail first and name the member: check
``CrashSafeCheckpointMixin`` against the new code, then raise the bound in ``pyproject.toml``.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers import Trainer

from gapclip.checkpoints import PRIVATE_TRAINER_API, STAGING_DIR
from gapclip.trainer import SAMPLER_STATE_NAME

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def transformers_requirement() -> SpecifierSet:
    match = re.search(r'"transformers([^"]*)"', PYPROJECT.read_text(encoding="utf-8"))
    assert match, "pyproject.toml declares no transformers requirement"
    return SpecifierSet(match.group(1))


def test_transformers_has_an_upper_bound_and_the_installed_version_is_within_it():
    specifier = transformers_requirement()
    assert any(spec.operator in ("<", "<=", "~=", "==") for spec in specifier), (
        f"transformers{specifier}: gapclip overrides private Trainer methods, so the requirement needs an upper bound"
    )
    assert Version(transformers.__version__) in specifier, (
        f"transformers {transformers.__version__} is outside {specifier}: check PRIVATE_TRAINER_API against it"
    )


@pytest.mark.parametrize("name", sorted(PRIVATE_TRAINER_API))
def test_private_members_exist_with_the_expected_parameters(name):
    parameters, _ = PRIVATE_TRAINER_API[name]
    member = getattr(Trainer, name, None)
    assert member is not None, f"Trainer.{name} no longer exists (transformers {transformers.__version__})"
    assert tuple(inspect.signature(member).parameters) == parameters, (
        f"Trainer.{name}{inspect.signature(member)} changed; gapclip expects {parameters}"
    )


def test_save_checkpoint_writes_under_get_output_dir_and_rotates_there():
    """What CrashSafeCheckpointMixin relies on: the checkpoint folder is derived from ``_get_output_dir(trial)``."""
    source = inspect.getsource(Trainer._save_checkpoint)
    assert re.search(r"run_dir\s*=\s*self\._get_output_dir\(trial=trial\)", source)
    assert re.search(r"output_dir\s*=\s*os\.path\.join\(run_dir,\s*checkpoint_folder\)", source)
    assert re.search(r"rotate_checkpoints\(\s*output_dir=run_dir", source)


def test_a_checkpoint_is_published_complete_with_its_extras(tiny_demo_processor, tiny_demo_datasets, tmp_path):
    from .test_trainer import make_trainer, training_args

    class Sampler(list):  # a batch sampler with state, as DIAS's K-means sampler
        def state_dict(self):
            return {"epoch": 7}

    args = training_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    trainer = make_trainer(tiny_demo_processor, tiny_demo_datasets, args)
    trainer.train_batch_sampler = Sampler([list(range(8)), list(range(8, 16))])
    trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (tmp_path / STAGING_DIR).exists()
    for step in (1, 2):
        folder = tmp_path / f"checkpoint-{step}"
        assert (folder / "model.safetensors").is_file() and (folder / "optimizer.pt").is_file()
        assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == step
        assert json.loads((folder / SAMPLER_STATE_NAME).read_text()) == {"epoch": 7}


def test_the_gradient_norm_is_taken_right_before_each_optimizer_step():
    """What the non-finite guard relies on: ``_get_grad_norm`` hands it the norm of the step the optimizer takes next."""
    source = inspect.getsource(Trainer._run_epoch)
    assert re.search(
        r"grad_norm\s*=\s*self\._get_grad_norm\(model,\s*grad_norm=grad_norm\)\s*\n"
        r"(\s*\n|\s*#.*\n|\s*self\.control\s*=\s*self\.callback_handler\.on_pre_optimizer_step\(.*\)\s*\n)*"
        r"\s*self\.optimizer\.step\(\)",
        source,
    ), "Trainer._run_epoch no longer calls _get_grad_norm right before self.optimizer.step()"
