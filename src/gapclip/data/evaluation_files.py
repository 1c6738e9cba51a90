"""Readers of the files extra evaluations take: ECCV Caption's extra positive pairs and STS sentence pairs.

The metrics themselves are in :mod:`gapclip.evaluation` (``eccv_metrics``, ``sts_spearman``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["StsPairs", "load_extra_positives", "load_sts_pairs"]


def load_extra_positives(path: str | Path) -> list[tuple[Any, int]]:
    """Read extra positive (image, caption) pairs, e.g. ECCV Caption's verified false negatives.

    Format: ``.jsonl`` with one object per line, or ``.json`` holding a list of such objects (or an object with a
    ``"positives"`` list). Each object has ``"image_id"`` (an image id, mapped to a row by the ``image_ids`` of
    :func:`gapclip.evaluation.build_positive_sets`, or the image row itself) and ``"caption_index"`` (the caption's
    row in ``text_embeds``)::

        {"image_id": 391895, "caption_index": 17}

    Returns:
        ``[(image_id, caption_index), ...]`` in file order.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Extra positives file not found: {path}")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif suffix == ".json":
        data = json.loads(text)
        records = data.get("positives") if isinstance(data, dict) else data
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of objects (or {{'positives': [...]}}).")
    else:
        raise ValueError(f"Unsupported extra positives file extension {suffix!r} for {path}; accepted: .json, .jsonl.")
    pairs: list[tuple[Any, int]] = []
    for number, record in enumerate(records):
        if not isinstance(record, dict) or "image_id" not in record or "caption_index" not in record:
            available = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(
                f"{path}: record {number} needs keys 'image_id' and 'caption_index'; available: {available}."
            )
        pairs.append((record["image_id"], int(record["caption_index"])))
    return pairs


class StsPairs(NamedTuple):
    """Sentence pairs with gold similarity scores, as returned by :func:`load_sts_pairs`."""

    sentence1: list[str]
    sentence2: list[str]
    scores: list[float]


def load_sts_pairs(
    path_or_name: str | Path,
    *,
    split: str | None = None,
    sentence1_column: str = "sentence1",
    sentence2_column: str = "sentence2",
    score_column: str = "score",
) -> StsPairs:
    """Load STS sentence pairs from a local CSV/TSV/JSON/JSONL file or a Hugging Face Hub dataset.

    A path to an existing file is read locally (``.csv``, ``.tsv`` with a header row; ``.jsonl`` one object per line;
    ``.json`` a list of objects); ``split`` is ignored for files. Anything else is passed to
    ``datasets.load_dataset(path_or_name, split=split or "test")`` (e.g. ``"sentence-transformers/stsb"``).

    Raises:
        ValueError: a required column is missing (the available columns are listed), a score is not a number, or the
            file extension is not supported.
    """
    columns = (sentence1_column, sentence2_column, score_column)
    path = Path(path_or_name)
    if path.is_file():
        if split is not None:
            logger.warning_once(f"load_sts_pairs: `split={split!r}` is ignored for the local file {path}.")
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
                available = list(reader.fieldnames or [])
                records = list(reader)
        elif suffix in (".jsonl", ".json"):
            text = path.read_text(encoding="utf-8")
            if suffix == ".jsonl":
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                records = json.loads(text)
            if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                raise ValueError(f"{path}: expected JSON objects (one per line for .jsonl, a list for .json).")
            available = sorted({key for record in records for key in record})
        else:
            raise ValueError(
                f"Unsupported STS file extension {suffix!r} for {path}; accepted: .csv, .tsv, .json, .jsonl."
            )
        source = str(path)
    else:
        from datasets import load_dataset

        dataset = load_dataset(str(path_or_name), split=split or "test")
        available = list(dataset.column_names)
        source = f"{path_or_name} (split {split or 'test'!r})"
        _require_columns(source, columns, available)
        records = dataset.select_columns(list(columns)).to_list()

    _require_columns(source, columns, available)
    sentence1, sentence2, scores = [], [], []
    for number, record in enumerate(records):
        if any(record.get(column) is None for column in columns):
            missing = [column for column in columns if record.get(column) is None]
            raise ValueError(f"{source}: row {number} has no value for {missing}.")
        try:
            scores.append(float(record[score_column]))
        except (TypeError, ValueError):
            raise ValueError(
                f"{source}: row {number} has a non-numeric {score_column!r}: {record[score_column]!r}."
            ) from None
        sentence1.append(str(record[sentence1_column]))
        sentence2.append(str(record[sentence2_column]))
    return StsPairs(sentence1, sentence2, scores)


def _require_columns(source: str, columns: Sequence[str], available: Sequence[str]) -> None:
    missing = [column for column in columns if column not in available]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; available columns: {list(available)}.")
