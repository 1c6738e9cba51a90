"""Retrieval results as a Markdown table laid out like the papers' tables."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .checks import check_ks

_EXTRA_COLUMN_FORMATS: dict[str, tuple[str, int]] = {"modality_gap": ("Gap", 3)}


def format_retrieval_table(
    rows: Mapping[str, Mapping[str, float]],
    *,
    title: str | None = None,
    extra_columns: Sequence[str] = ("modality_gap",),
    ks: Sequence[int] = (1, 5, 10),
) -> str:
    """Render retrieval results as a Markdown table laid out like the papers' tables.

    Columns: ``Method | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | RSUM`` followed by each of ``extra_columns``
    present in at least one row (``modality_gap`` is shown as ``Gap`` with 3 decimals; other extras use their key and
    1 decimal). Recalls and RSUM use 1 decimal; a missing value prints as ``-``. RSUM is taken from ``"rsum"`` or,
    when absent, summed from the recalls if they are all present.

    Args:
        rows: method name → metrics dict (e.g. the output of :func:`retrieval_metrics`, plus ``"modality_gap"``).
        title: optional line printed above the table.
        extra_columns: metric keys appended as columns when any row has them.
        ks: the recall columns, per direction.

    Returns:
        The table as one string (no trailing newline).
    """
    if not isinstance(rows, Mapping):
        raise TypeError(f"`rows` must be a mapping of method name to metrics, got {type(rows).__name__}.")
    ks = check_ks(ks)
    extras = [column for column in extra_columns if any(column in metrics for metrics in rows.values())]

    def number(value: Any, decimals: int) -> str:
        if value is None:
            return "-"
        value = float(value)
        return "-" if math.isnan(value) else f"{value:.{decimals}f}"

    header = ["Method"]
    for direction in ("i2t", "t2i"):
        header += [f"{direction} R@{k}" if i == 0 else f"R@{k}" for i, k in enumerate(ks)]
    header.append("RSUM")
    header += [_EXTRA_COLUMN_FORMATS.get(column, (column, 1))[0] for column in extras]

    body: list[list[str]] = []
    for method, metrics in rows.items():
        recall_keys = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in ks]
        cells = [str(method)] + [number(metrics.get(key), 1) for key in recall_keys]
        rsum = metrics.get("rsum")
        if rsum is None and all(metrics.get(key) is not None for key in recall_keys):
            rsum = sum(float(metrics[key]) for key in recall_keys)
        cells.append(number(rsum, 1))
        cells += [number(metrics.get(column), _EXTRA_COLUMN_FORMATS.get(column, (column, 1))[1]) for column in extras]
        body.append(cells)

    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def render(cells: list[str]) -> str:
        padded = [cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(cells)]
        return "| " + " | ".join(padded) + " |"

    separator = "|" + "|".join(
        ":" + "-" * (widths[i] + 1) if i == 0 else "-" * (widths[i] + 1) + ":" for i in range(len(header))
    ) + "|"
    lines = [render(header), separator, *(render(cells) for cells in body)]
    if title:
        lines = [title, "", *lines]
    return "\n".join(lines)
