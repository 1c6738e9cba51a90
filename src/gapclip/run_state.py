"""What a training recipe finds in its ``--output_dir``: nothing, a run to resume, a finished run, or another run.

A training run records what it trains in ``OUTPUT_DIR/gapclip_run.json`` (the *run record*): the configuration that
defines the model being trained, the budget, whether the run finished, and its "before training" retrieval row.
Running a recipe again into the same folder then does what the folder calls for (:func:`plan_run`):

- nothing a run writes is there (no folder, an empty one, or only unrelated files such as a config): a fresh run;
- a **finished** run of the same configuration whose budget covers this one: nothing is trained and no result is
  overwritten; the recipe says so and hands back the recorded results;
- a run of the same configuration that **stopped** (killed, pre-empted) or whose budget was raised (``--max_steps``,
  ``--num_train_epochs``): it resumes from the last checkpoint, announced with a WARNING. When that checkpoint already
  is the budget's last step (a kill after the final save), nothing more is trained: the checkpoint is loaded and only
  the final evaluation, report and export run (the stock ``Trainer`` would train one step past ``--max_steps``);
- a run of **another configuration**, or a non-empty folder that holds training output but no run record: an error,
  unless ``--overwrite_output_dir``, which deletes the earlier run's checkpoints and results and starts over.

*Same configuration* means the same objective (base loss and its options; gap terms with weights and options, default
options filled in), model (``--model_name_or_path``/``--processor_name_or_path`` with local paths made absolute, or
the from-scratch sizes), training data (source, files, columns, ``--extra_columns``, train split, translations, pair
mode, ``--max_length``, ``--max_train_samples``, demo sizes) and LoRA settings. The budget and the other ``Trainer``
hyper-parameters (learning rate, batch size, evaluation and saving) may change from one run to the next.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import logging

logger = logging.get_logger(__name__)

RUN_RECORD_NAME = "gapclip_run.json"
RUN_RECORD_FORMAT = "gapclip-run/1"

#: Names a training run writes into its output folder; a folder holding none of them has nothing to lose.
RUN_OUTPUTS = (
    RUN_RECORD_NAME, "model.safetensors", "config.json", "trainer_state.json", "retrieval.md", "retrieval.json",
    "train_results.json", "test_results.json", "all_results.json", "export", ".checkpoint-staging",
)
#: What ``--overwrite_output_dir`` deletes before starting over (besides ``checkpoint-*``).
_OVERWRITTEN = (
    RUN_RECORD_NAME, "retrieval.md", "retrieval.json", "trainer_state.json", "train_results.json", "test_results.json",
    "all_results.json", "export", ".checkpoint-staging",
)

_MODEL_FIELDS = ("model_name_or_path", "processor_name_or_path", "base_loss", "triplet_margin", "triplet_mining",
                 "triplet_reduction")
_SCRATCH_FIELDS = ("scratch_width", "scratch_layers", "scratch_image_size")
_DATA_FIELDS = ("dataset", "karpathy_json", "image_root", "dataset_name", "data_file", "image_column",
                "caption_column", "id_column", "extra_columns", "train_split", "translations", "pair_mode",
                "max_length", "max_train_samples")
_DEMO_FIELDS = ("demo_train", "demo_val", "demo_test", "demo_image_size")
_LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
_PATH_FIELDS = ("model_name_or_path", "processor_name_or_path", "karpathy_json", "image_root", "dataset_name",
                "data_file", "extra_columns", "translations")


@dataclass
class RunPlan:
    """What :func:`plan_run` decided for an output folder.

    Attributes:
        action: ``"fresh"`` (train from the start), ``"resume"`` (train on from ``checkpoint``), ``"complete"``
            (``checkpoint`` is the budget's last step: load it, evaluate and export, train nothing) or
            ``"finished"`` (the folder holds this configuration's finished run: do nothing).
        checkpoint: the checkpoint to resume from / complete with.
        record: the folder's run record, if any.
        message: for ``"finished"``: what to tell the user.
    """

    action: str
    checkpoint: str | None = None
    record: dict[str, Any] | None = None
    message: str = ""
    before_training: dict[str, float] | None = field(default=None)


def run_configuration(model_args: Any, data_args: Any, lora_args: Any, gap_terms: list[dict[str, Any]]) -> dict:
    """The fields that make two runs "the same configuration" (see the module docstring), JSON-able."""
    from .losses import TERM_REGISTRY, validate_term_specs

    terms = [
        {**spec, "options": {**TERM_REGISTRY[spec["name"]].default_options, **spec["options"]}}
        for spec in validate_term_specs(gap_terms)
    ]
    model = {name: getattr(model_args, name, None) for name in _MODEL_FIELDS}
    if model_args.model_name_or_path is None:
        model.update({name: getattr(model_args, name) for name in _SCRATCH_FIELDS})
    data = {name: getattr(data_args, name, None) for name in _DATA_FIELDS}
    if getattr(data_args, "reduced_jpeg_decoding", False):  # other pixels; absent when off, as in older records
        data["reduced_jpeg_decoding"] = True
    if data_args.dataset == "demo":
        data.update({name: getattr(data_args, name) for name in _DEMO_FIELDS})
    lora = {name: getattr(lora_args, name, None) for name in _LORA_FIELDS} if lora_args is not None else {}
    if not lora.get("lora_r"):
        lora = {"lora_r": 0}
    configuration = {"gap_terms": terms, **model, **data, **lora}
    for name in _PATH_FIELDS:
        value = configuration.get(name)
        if isinstance(value, str) and os.path.exists(value):
            configuration[name] = os.path.abspath(value)
    return json.loads(json.dumps(configuration))  # tuples → lists, as read back from the file


def read_run_record(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run record of ``output_dir``, or None when there is none."""
    path = Path(output_dir, RUN_RECORD_NAME)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path} is not a readable gapclip run record ({err}); start over with --overwrite_output_dir, or use "
            "another --output_dir."
        ) from err
    if not isinstance(record, dict) or record.get("format") != RUN_RECORD_FORMAT:
        raise ValueError(f"{path} is not a gapclip run record (format {RUN_RECORD_FORMAT!r} expected).")
    return record


def holds_a_run(output_dir: str | os.PathLike) -> bool:
    """Whether ``output_dir`` holds anything a training run writes (checkpoints, weights, results, a record)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return False
    return any((folder / name).exists() for name in RUN_OUTPUTS) or any(folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*"))


def plan_run(training_args: Any, configuration: dict[str, Any]) -> RunPlan:
    """Decide what a run with ``training_args`` and ``configuration`` does with its output folder.

    Raises:
        ValueError: the folder holds a run of another configuration, or training output without a run record
            (``--overwrite_output_dir`` starts over), or a finished run whose budget was raised but which saved no
            checkpoint to continue from.
    """
    output_dir = training_args.output_dir
    explicit = training_args.resume_from_checkpoint or None
    if getattr(training_args, "overwrite_output_dir", False):
        if explicit and Path(os.path.abspath(explicit)).is_relative_to(os.path.abspath(output_dir)):
            raise ValueError(
                f"--overwrite_output_dir would delete --resume_from_checkpoint {explicit} (it is inside --output_dir "
                f"{output_dir}); drop one of the two."
            )
        if holds_a_run(output_dir) and training_args.should_save:
            clear_output_dir(output_dir)
        return _checked(RunPlan("resume" if explicit else "fresh", checkpoint=explicit), training_args)
    if not holds_a_run(output_dir):
        return _checked(RunPlan("resume" if explicit else "fresh", checkpoint=explicit), training_args)

    record = read_run_record(output_dir)
    last = get_last_checkpoint(output_dir)
    if record is None:
        if last is None and not explicit:
            raise ValueError(
                f"--output_dir {output_dir} is not empty and holds no gapclip run record ({RUN_RECORD_NAME}): "
                "training would overwrite what is there. Use another --output_dir, or add --overwrite_output_dir "
                "to replace its contents."
            )
        # A folder written before run records existed: resume as the Trainer would (the trainer still checks
        # that the checkpoint was trained with this objective).
        return _checked(_resume_plan(explicit or last, explicit, None), training_args)

    differences = _differences(record.get("configuration", {}), configuration)
    if differences:
        where = f" (last checkpoint: {last})" if last else ""
        lines = "; ".join(f"{name}: {theirs!r} there, {ours!r} here" for name, theirs, ours in differences)
        raise ValueError(
            f"--output_dir {output_dir} holds a run of another configuration{where}: {lines}. Start this "
            "configuration in a fresh --output_dir, or add --overwrite_output_dir to delete that run's checkpoints "
            "and results and start over."
        )
    before = record.get("before_training")
    if record.get("status") == "finished" and _budget_reached(record.get("global_step", 0),
                                                              record.get("epoch", 0.0), training_args):
        return RunPlan("finished", record=record, before_training=before, message=_finished_message(
            output_dir, record, training_args))
    checkpoint = explicit or last
    if checkpoint is None:
        if record.get("status") == "finished":
            raise ValueError(
                f"--output_dir {output_dir} holds a finished run of this configuration ({record.get('global_step')} "
                "steps) but no checkpoint to continue it from (it was trained with --save_strategy no), so the "
                "raised budget cannot be trained on. Add --overwrite_output_dir to train again from scratch, or use "
                "another --output_dir."
            )
        logger.warning(
            f"{output_dir} holds a run of this configuration that stopped before its first checkpoint; starting it "
            "again from scratch."
        )
        return RunPlan("fresh", record=record)
    return _checked(_resume_plan(checkpoint, explicit, record), training_args)


def _resume_plan(checkpoint: str, explicit: str | None, record: dict | None) -> RunPlan:
    before = record.get("before_training") if record else None
    if not explicit:
        logger.warning(
            f"Resuming from {checkpoint} (found in --output_dir: a run of this configuration that did not finish, "
            "or whose budget was raised). To start over instead, add --overwrite_output_dir or use another "
            "--output_dir."
        )
    return RunPlan("resume", checkpoint=checkpoint, record=record, before_training=before)


def _checked(plan: RunPlan, training_args: Any) -> RunPlan:
    """A resume from a checkpoint that already is the budget's last step becomes ``"complete"``."""
    if plan.action != "resume" or not plan.checkpoint:
        return plan
    state_path = Path(plan.checkpoint, "trainer_state.json")
    if not state_path.is_file():
        return plan
    state = json.loads(state_path.read_text(encoding="utf-8"))
    if _budget_reached(state.get("global_step", 0), state.get("epoch") or 0.0, training_args):
        logger.warning(
            f"{plan.checkpoint} already is the last step of the budget (global step {state.get('global_step')}): "
            "nothing more is trained; loading it for the final evaluation and export."
        )
        plan.action = "complete"
    return plan


def _budget_reached(global_step: int, epoch: float, training_args: Any) -> bool:
    if training_args.max_steps > 0:
        return global_step >= training_args.max_steps
    return epoch >= training_args.num_train_epochs - 1e-6


def _differences(theirs: dict[str, Any], ours: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    return [(name, theirs.get(name), ours.get(name)) for name in sorted(set(theirs) | set(ours))
            if theirs.get(name) != ours.get(name)]


def _finished_message(output_dir: str, record: dict[str, Any], training_args: Any) -> str:
    budget = (f"--max_steps {training_args.max_steps}" if training_args.max_steps > 0
              else f"--num_train_epochs {training_args.num_train_epochs:g}")
    trained = f"{record.get('global_step')} steps, {float(record.get('epoch') or 0):.3g} epochs"
    return (
        f"{output_dir} already holds a finished run of this configuration ({trained}; {budget} asks for no more). "
        "Nothing was trained and no result was overwritten. To train longer, raise --max_steps or "
        "--num_train_epochs; to train again from scratch, add --overwrite_output_dir or use another --output_dir."
    )


def report_finished(plan: RunPlan, training_args: Any, *, push_repo_id: str | None = None) -> dict[str, Any]:
    """For a ``"finished"`` plan: say so (main process), touch nothing, and return the run's recorded results in the
    shape ``run_training`` returns (``rows`` and ``train`` metrics as the run saved them, ``trainer`` None,
    ``already_finished`` True), so a caller such as :func:`gapclip.pretrain.pretrain_demo_backbone` can report them."""
    from .console import format_summary

    out = Path(training_args.output_dir).resolve()
    rows_file, export_dir, train_file = out / "retrieval.json", out / "export", out / "train_results.json"
    rows = json.loads(rows_file.read_text(encoding="utf-8")) if rows_file.is_file() else {}
    train = json.loads(train_file.read_text(encoding="utf-8")) if train_file.is_file() else {}
    if training_args.should_save:
        push = None if push_repo_id is None else (
            f"nothing pushed; to push this export: python recipes/export.py {export_dir} --push_to_hub "
            f"--hub_model_id {push_repo_id}")
        print(plan.message, flush=True)
        print(format_summary("That run's results:", [
            ("model", str(out)),
            ("export", str(export_dir) if export_dir.is_dir() else None),
            ("tables", f"{out / 'retrieval.md'}, {rows_file}" if rows_file.is_file() else None),
            ("Hub", push),
        ]), flush=True)
    return {"rows": rows, "train": train, "trainer": None, "export_dir": export_dir if export_dir.is_dir() else None,
            "already_finished": True}


def clear_output_dir(output_dir: str | os.PathLike) -> list[str]:
    """Delete an earlier run's checkpoints and results from ``output_dir`` (``--overwrite_output_dir``)."""
    folder = Path(output_dir)
    removed = sorted(p.name for p in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir())
    removed += [name for name in _OVERWRITTEN if (folder / name).exists()]
    for name in removed:
        path = folder / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if removed:
        logger.warning(f"--overwrite_output_dir: deleted {removed} from {folder} before starting over.")
    return removed


def write_run_record(
    training_args: Any,
    configuration: dict[str, Any],
    *,
    status: str,
    before_training: dict[str, float] | None = None,
    state: Any = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write (atomically) the run record of ``training_args.output_dir``; main process only."""
    record = {
        "format": RUN_RECORD_FORMAT,
        "status": status,
        "configuration": configuration,
        "budget": {"max_steps": training_args.max_steps, "num_train_epochs": training_args.num_train_epochs},
        "global_step": getattr(state, "global_step", 0) if state is not None else 0,
        "epoch": float(getattr(state, "epoch", 0.0) or 0.0) if state is not None else 0.0,
        "before_training": before_training,
        **(extra or {}),
    }
    folder = Path(training_args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RUN_RECORD_NAME
    tmp = folder / f".{RUN_RECORD_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def restore_final_checkpoint(trainer: Any, checkpoint: str) -> None:
    """Load ``checkpoint`` (the budget's last step) into ``trainer`` as ``train()`` would have left it at the end:
    its weights and state, then the best checkpoint when ``--load_best_model_at_end`` asks for it."""
    from transformers.trainer_callback import TrainerState

    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
    best = trainer.state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best and os.path.isdir(best):
        trainer._load_best_model()


__all__ = [
    "RUN_RECORD_NAME",
    "RunPlan",
    "clear_output_dir",
    "holds_a_run",
    "plan_run",
    "read_run_record",
    "report_finished",
    "restore_final_checkpoint",
    "run_configuration",
    "write_run_record",
]
