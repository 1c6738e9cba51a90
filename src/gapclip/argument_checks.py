"""Checks the recipes' argument dataclasses run in ``__post_init__``, so a bad option stops the command at parsing,
before any data is loaded or embedded, with a message that names the flag."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable
from typing import Any

__all__ = [
    "check_choice",
    "check_declared_choices",
    "check_model_path",
    "check_non_negative",
    "parse_json_flag",
    "require_module",
]


def check_choice(flag: str, value: Any, choices: Iterable[Any]) -> None:
    """``ValueError`` naming ``flag`` unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{flag} must be one of {choices}, got {value!r}.")


def check_declared_choices(arguments: Any) -> None:
    """Every field of the dataclass instance ``arguments`` that declares ``choices`` in its metadata holds one of them.

    On the command line argparse enforces those choices itself (e.g. a term option's ``Literal`` values, which
    :func:`gapclip.cli.term_option_field` declares), but a YAML/JSON config file and a dataclass built in Python never
    reach argparse: this check, run from ``__post_init__``, stops them at parsing too, naming the flag.
    """
    for spec in dataclasses.fields(arguments):
        if "choices" in spec.metadata:
            check_choice(f"--{spec.name}", getattr(arguments, spec.name), spec.metadata["choices"])


def check_non_negative(flag: str, value: float, *, strictly: bool = False) -> None:
    """``ValueError`` naming ``flag`` unless ``value`` is finite and >= 0 (> 0 with ``strictly``)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and (value > 0 if strictly else value >= 0)):
        raise ValueError(f"{flag} must be a finite number {'>' if strictly else '>='} 0, got {value!r}.")


def parse_json_flag(flag: str, text: str | None, expected: type | tuple[type, ...]) -> Any:
    """``json.loads(text)``, with a ``ValueError`` naming ``flag`` when it is not valid JSON of the expected type."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag} is not valid JSON ({err.msg} at character {err.pos}): {text!r}.") from None
    if not isinstance(value, expected):
        names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
        raise ValueError(f"{flag} must be a JSON {names}, got {type(value).__name__}: {text!r}.")
    return value


def check_model_path(flag: str, value: str | None) -> None:
    """A value that can only be meant as a local folder must exist (and be a folder).

    ``./model``, ``/abs/model``, ``~/model``, ``a/b/c`` are not Hub repository ids, so when no such folder exists the
    error says so, instead of transformers' "invalid repo id". ``owner/name`` is left to transformers (a Hub id),
    unless ``owner`` is an existing local folder: then it is a missing local folder too.
    """
    if not value:
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = os.path.expanduser(value)
    if os.path.isdir(path):
        return
    if os.path.exists(path):
        raise ValueError(f"{flag} {value!r} is a file; give a model folder (with config.json) or a Hub id.")
    try:
        validate_repo_id(value)
        local = os.path.isdir(value.split("/")[0]) and "/" in value
    except HFValidationError:
        local = True
    if local:
        raise ValueError(
            f"{flag} {value!r}: no such folder (looked in {os.path.abspath(path)}). Give an existing model folder or "
            "a Hub repository id such as openai/clip-vit-base-patch16."
        )


def require_module(flag: str, module: str, extra: str) -> None:
    """``ImportError`` naming ``flag`` and the extra to install when ``module`` cannot be imported."""
    try:
        __import__(module)
    except ImportError:
        raise ImportError(
            f"{flag} needs {module}, which is not installed: pip install 'gapclip[{extra}]' (in a source checkout: "
            f"pip install -e '.[{extra}]')."
        ) from None
