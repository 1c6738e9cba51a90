"""How a recipe talks to the person who ran it: one clear line for a configuration error, a summary at the end.

Errors
    :func:`run_recipe` runs a recipe's ``main``. A ``ValueError``, ``TypeError``, ``OSError``, ``ImportError`` or
    ``KeyError`` raised by gapclip's own code, a recipe, or the argument parser (a bad option value, a missing or
    unreadable file, a stale teacher file, a failed push ...) is printed as one line on stderr,
    ``train_clip_lgmgc.py: error: <message>``, and the process exits with status 2, instead of a traceback (which
    ``accelerate launch`` follows with its own ``CalledProcessError`` report; ``accelerate launch -q`` drops that).
    Set ``GAPCLIP_DEBUG=1`` to get the full traceback. Errors raised anywhere else (a crash inside torch, a bug)
    keep their traceback.

Summary
    :func:`format_summary` lays out where a run wrote what (model, export, tables, plots) and whether LoRA was on;
    the recipes print it at the end of every run, whatever the log level.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gapclip.distributed import end_process_group

DEBUG_ENV = "GAPCLIP_DEBUG"
USAGE_ERRORS = (ValueError, TypeError, OSError, ImportError, KeyError)
_PACKAGE_DIR = Path(__file__).resolve().parent

__all__ = ["DEBUG_ENV", "format_summary", "run_recipe", "training_summary"]


def run_recipe(main: Callable[[], Any]) -> Any:
    """``main()``, turning a configuration error into one line on stderr and exit status 2 (see the module doc).

    A multi-process run that returns ends its process group (:func:`gapclip.distributed.end_process_group`), so
    that tearing it down cannot abort or hang a finished run; a failed process leaves it to the launcher.
    """
    try:
        result = main()
    except USAGE_ERRORS as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0") or not _raised_by_us(err, main):
            raise
        print(_one_line(err), file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    end_process_group()
    return result


def _one_line(err: BaseException) -> str:
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "gapclip"
    rank, world = os.environ.get("RANK"), int(os.environ.get("WORLD_SIZE", "1") or 1)
    prefix = f"[rank {rank}] " if world > 1 and rank is not None else ""
    return f"{prefix}{program}: error: {message} (set {DEBUG_ENV}=1 for the traceback)"


def _raised_by_us(err: BaseException, main: Callable[[], Any]) -> bool:
    """Whether the innermost frame of ``err`` is gapclip's code, the recipe's folder or transformers' arg parser."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = Path(tb.tb_frame.f_code.co_filename).resolve()
    try:
        recipe_dir = Path(inspect.getfile(main)).resolve().parent
    except TypeError:
        recipe_dir = None
    owners = [_PACKAGE_DIR] + ([recipe_dir] if recipe_dir is not None else [])
    return any(filename.is_relative_to(owner) for owner in owners) or filename.name == "hf_argparser.py"


def format_summary(title: str, items: Sequence[tuple[str, Any]]) -> str:
    """``title`` and one aligned ``label  value`` line per item (items whose value is None are left out)."""
    kept = [(label, value) for label, value in items if value is not None]
    width = max((len(label) for label, _ in kept), default=0)
    return "\n".join([title, *(f"  {label + ':':<{width + 1}} {value}" for label, value in kept)])


def training_summary(
    output_dir: str | os.PathLike, model: Any, export_dir: Path | None, *, hub: str | None,
    run_record: str | os.PathLike | None = None,
) -> str:
    """Where a training run wrote what (model, export, tables, metrics, checkpoints, its run record), whether LoRA
    was on, the push. (``run_record`` is passed in: :mod:`gapclip.run_state` prints through this module.)"""
    out = Path(output_dir).resolve()
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[-1]))
    architecture = type(getattr(model.backbone, "get_base_model", lambda: model.backbone)()).__name__
    return format_summary(f"Run finished: {out}", [
        ("model", f"{out} (gapclip checkpoint: AutoModel.from_pretrained after `import gapclip`)"),
        ("export", f"{export_dir.resolve()} (plain {architecture} + processor + model card)" if export_dir else None),
        ("tables", f"{out / 'retrieval.md'}, {out / 'retrieval.json'}"),
        ("metrics", f"{out / 'all_results.json'}, {out / 'trainer_state.json'}"),
        ("checkpoints", f"{len(checkpoints)} in {out} (last: {checkpoints[-1].name})" if checkpoints else "none kept"),
        ("LoRA", lora_state(model.config)),
        ("Hub", hub),
        ("run record", Path(run_record).resolve() if run_record is not None else None),
    ])


def lora_state(config: Any) -> str:
    """Whether LoRA was on, with which settings, and where the adapters ended up."""
    kept, merged = config.lora, config.merged_lora
    settings = kept or merged
    if not settings:
        return "off (the whole backbone was trained)"
    how = "adapters kept in the checkpoint, merged in the export" if kept else "merged into the saved weights"
    return f"on (r={settings['r']}, alpha={settings['alpha']}, dropout={settings['dropout']}); {how}"
