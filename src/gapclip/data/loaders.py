"""Loaders that turn captioned image collections into gapclip's canonical caption dataset.

Every loader returns a `datasets.DatasetDict` (or an `IterableDatasetDict` with `streaming=True`) whose splits are
among `"train"`, `"validation"` and `"test"`. Each split has the features of `CAPTION_FEATURES`:

- `image_id` (`Value("string")`): unique id of the image across all splits,
- `image` (`Image()`): decoded lazily to a PIL image when a row is read,
- `captions` (`List(Value("string"))`): one or more non-empty captions,

plus an optional `translation` (`Value("string")`, may be None) added by `attach_translations`, and any per-image
columns `attach_columns` adds (e.g. the input of a gap term of your own).

Validation at load time is cheap and never decodes images: missing image files, images without captions, malformed
Karpathy JSON and duplicate image ids are reported with the file, row/entry and id involved.
"""

from __future__ import annotations

import csv
import functools
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict, Features, Image, IterableDataset, IterableDatasetDict, List, Value
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "CANONICAL_SPLITS",
    "CAPTION_FEATURES",
    "attach_columns",
    "attach_translations",
    "load_caption_dataset",
    "load_captions_file",
    "load_demo",
    "load_hub_captions",
    "load_karpathy",
]

CANONICAL_SPLITS: tuple[str, ...] = ("train", "validation", "test")
CAPTION_FEATURES = Features({"image_id": Value("string"), "image": Image(), "captions": List(Value("string"))})
TRANSLATION_FEATURES = Features({**CAPTION_FEATURES, "translation": Value("string")})

# Split spellings found in the wild, mapped to the canonical names.
_SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "training": "train",
    "val": "validation",
    "valid": "validation",
    "validation": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}
_KARPATHY_SPLITS = ("train", "val", "test", "restval")
_MAX_EXAMPLES = 5
_STREAM_SHARDS = 8

AnyDatasetDict = DatasetDict | IterableDatasetDict
Record = dict[str, Any]


# ---------------------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------------------
def _canonical_split(name: str, *, where: str) -> str:
    split = _SPLIT_ALIASES.get(str(name).strip().lower())
    if split is None:
        raise ValueError(
            f"{where}: unknown split {name!r}; accepted split names are {sorted(_SPLIT_ALIASES)} "
            f"(mapped onto {list(CANONICAL_SPLITS)})."
        )
    return split


def _normalize_requested_splits(splits: Iterable[str] | None) -> set[str] | None:
    if splits is None:
        return None
    if isinstance(splits, str):
        splits = [splits]
    return {_canonical_split(s, where="option `splits`") for s in splits}


def _clean_captions(captions: Any, *, image_id: str, source: str) -> list[str]:
    """Coerce a caption cell (string or list of strings) into a list of non-empty stripped captions."""
    if captions is None:
        captions = []
    elif isinstance(captions, str):
        captions = [captions]
    elif not isinstance(captions, (list, tuple)):
        raise TypeError(
            f"{source}: captions of image_id={image_id!r} must be a string or a list of strings, "
            f"got {type(captions).__name__}: {captions!r}."
        )
    cleaned = []
    for caption in captions:
        if caption is None:
            continue
        if not isinstance(caption, str):
            raise TypeError(
                f"{source}: a caption of image_id={image_id!r} is a {type(caption).__name__} ({caption!r}); "
                "captions must be strings."
            )
        caption = caption.strip()
        if caption:
            cleaned.append(caption)
    if not cleaned:
        raise ValueError(
            f"{source}: image_id={image_id!r} has no usable caption (received {list(captions)!r}); every image needs "
            "at least one non-empty, non-whitespace caption."
        )
    if len(cleaned) < len(captions):
        logger.warning_once(f"{source}: dropped empty/whitespace-only captions (first seen at image_id={image_id!r}).")
    return cleaned


def _check_duplicate_ids(ids: Iterable[str], *, source: str) -> None:
    seen: set[str] = set()
    duplicates: list[str] = []
    for image_id in ids:
        if image_id in seen:
            duplicates.append(image_id)
        seen.add(image_id)
    if duplicates:
        examples = sorted(set(duplicates))[:_MAX_EXAMPLES]
        raise ValueError(
            f"{source}: {len(duplicates)} duplicate image id(s), e.g. {examples}; image ids must be unique across all "
            "splits (a duplicated id usually means the same image is listed twice or leaks between splits)."
        )


def _check_image_file(path: str, *, image_id: str, where: str) -> None:
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"{where}: image path {path!r} of image_id={image_id!r} is a directory, not an image file."
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: image file {path!r} of image_id={image_id!r} does not exist.")


def _not_utf8(path: Path, err: UnicodeDecodeError) -> ValueError:
    """The first line of ``path`` that is not valid UTF-8, as an error naming the file, line and byte."""
    for number, line in enumerate(path.read_bytes().splitlines(keepends=True), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as bad:
            return ValueError(
                f"{path}, line {number}: not valid UTF-8 (byte 0x{line[bad.start]:02x} at column {bad.start + 1}). "
                "gapclip reads text files as UTF-8: re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
            )
    return ValueError(f"{path}: not valid UTF-8 ({err}).")


def _records_generator(shards: list[list[Record]]) -> Iterator[Record]:
    for shard in shards:
        yield from shard


def _records_to_split(records: list[Record], *, streaming: bool) -> Dataset | IterableDataset:
    if streaming:
        # Contiguous shards (a list in gen_kwargs is split across shards), so DataLoader workers can share the work
        # while a single-process iteration keeps the file order.
        num_shards = max(1, min(_STREAM_SHARDS, len(records)))
        bounds = [len(records) * i // num_shards for i in range(num_shards + 1)]
        shards = [records[bounds[i] : bounds[i + 1]] for i in range(num_shards)]
        return IterableDataset.from_generator(
            _records_generator, features=CAPTION_FEATURES, gen_kwargs={"shards": shards}
        )
    columns = {key: [record[key] for record in records] for key in CAPTION_FEATURES}
    return Dataset.from_dict(columns, features=CAPTION_FEATURES)


def _records_to_dict(split_records: Mapping[str, list[Record]], *, streaming: bool) -> AnyDatasetDict:
    container = IterableDatasetDict() if streaming else DatasetDict()
    for split in CANONICAL_SPLITS:
        if split_records.get(split):
            container[split] = _records_to_split(split_records[split], streaming=streaming)
    return container


def _maybe_attach(dsdict: AnyDatasetDict, translations: str | os.PathLike | None) -> AnyDatasetDict:
    return dsdict if translations is None else attach_translations(dsdict, translations)


# ---------------------------------------------------------------------------------------------------------------------
# Translations
# ---------------------------------------------------------------------------------------------------------------------
def read_translations(path: str | os.PathLike) -> dict[str, str]:
    """Read a JSONL file of `{"image_id": ..., "translation": ...}` lines into a dict keyed by image id."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"translations file {str(path)!r} does not exist.")
    table: dict[str, str] = {}
    with path.open(encoding="utf-8-sig") as handle:
        for line_number, row in _iter_json_objects(handle, path):
            if "image_id" not in row or "translation" not in row:
                raise ValueError(
                    f"{path}, line {line_number}: expected an object with keys 'image_id' and 'translation', "
                    f"got {row!r}."
                )
            if row["translation"] is not None and not isinstance(row["translation"], str):
                raise TypeError(
                    f"{path}, line {line_number}: 'translation' must be a string or null, "
                    f"got {type(row['translation']).__name__}."
                )
            table[str(row["image_id"])] = row["translation"]
    return table


def _iter_json_objects(handle: Any, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSONL file; anything else is an error naming the line."""
    try:
        yield from _json_lines(handle, path)
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from None


def _json_lines(handle: Any, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for line_number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {line_number}: not valid JSON ({err}).") from err
        if not isinstance(row, dict):
            got = type(row).__name__
            raise ValueError(f"{path}, line {line_number}: expected a JSON object, got {got}.")  # noqa: TRY004
        yield line_number, row


def attach_translations(dsdict: AnyDatasetDict | Dataset | IterableDataset, path: str | os.PathLike) -> Any:
    """Add a `translation` column read from a JSONL file; image ids missing from the file get None.

    Works on `DatasetDict`, `IterableDatasetDict`, `Dataset` and `IterableDataset`, returning the same kind.
    """
    table = {image_id: {"translation": text} for image_id, text in read_translations(path).items()}
    return _attach(dsdict, table, Features({"translation": Value("string")}), f"translations file {str(path)!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Further per-image columns (inputs of gap terms)
# ---------------------------------------------------------------------------------------------------------------------
#: Names a further column cannot take: the caption columns and the keys of a training item.
_RESERVED_COLUMNS = ("image_id", "image", "captions", "caption", "caption_index", "image_index", "pixels")


def read_image_columns(path: str | os.PathLike) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Read a JSONL file of per-image values, `{"image_id": ..., "<column>": value, ...}` per line.

    Returns:
        `({image_id: {column: value}}, column names in order of first appearance)`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"columns file {str(path)!r} does not exist.")
    table: dict[str, dict[str, Any]] = {}
    columns: dict[str, None] = {}
    with path.open(encoding="utf-8") as handle:
        for line_number, row in _iter_json_objects(handle, path):
            if "image_id" not in row:
                raise ValueError(
                    f"{path}, line {line_number}: expected an object with an 'image_id' key, got {row!r}."
                )
            values = {key: value for key, value in row.items() if key != "image_id"}
            reserved = sorted(set(values) & set(_RESERVED_COLUMNS))
            if reserved:
                raise ValueError(
                    f"{path}, line {line_number}: column(s) {reserved} clash with gapclip's own columns and item keys "
                    f"{list(_RESERVED_COLUMNS)}; rename them."
                )
            image_id = str(row["image_id"])
            if image_id in table:
                raise ValueError(f"{path}, line {line_number}: image_id {image_id!r} appears twice.")
            table[image_id] = values
            columns.update(dict.fromkeys(values))
    if not columns:
        raise ValueError(f"{path}: no column besides 'image_id' in any line; nothing to attach.")
    return table, list(columns)


def _column_features(table: Mapping[str, Mapping[str, Any]], columns: list[str]) -> Features:
    """Each column's feature, inferred from its first non-null value (all null: a string column)."""
    features = {}
    for column in columns:
        example = next((row[column] for row in table.values() if row.get(column) is not None), None)
        if example is None:
            features[column] = Value("string")
        else:
            features[column] = Dataset.from_dict({column: [example]}).features[column]
    return Features(features)


def _add_columns_batch(image_ids: list[str], *, table: Mapping[str, Mapping[str, Any]], columns: list[str]):
    rows = [table.get(str(image_id), {}) for image_id in image_ids]
    return {column: [row.get(column) for row in rows] for column in columns}


def attach_columns(dsdict: AnyDatasetDict | Dataset | IterableDataset, path: str | os.PathLike) -> Any:
    """Add the per-image columns of a JSONL file (`{"image_id": ..., "<column>": value, ...}` per line), e.g. the
    input a gap term of your own reads (`gapclip.losses.TermInput`); images missing from the file get None.

    Column types are inferred from the first non-null value. Works on `DatasetDict`, `IterableDatasetDict`, `Dataset`
    and `IterableDataset`, returning the same kind; a column the dataset already has is replaced.
    """
    table, columns = read_image_columns(path)
    return _attach(dsdict, table, _column_features(table, columns), f"columns file {str(path)!r}")


def _attach(dsdict: Any, table: Mapping[str, Mapping[str, Any]], added: Features, source: str) -> Any:
    """Add the columns of ``added`` from ``table`` ({image_id: {column: value}}); ids not in it get None."""
    columns = list(added)
    fn = functools.partial(_add_columns_batch, table=table, columns=columns)

    def _one(ds: Dataset | IterableDataset) -> Dataset | IterableDataset:
        existing = [column for column in columns if ds.column_names is not None and column in ds.column_names]
        if existing:
            ds = ds.remove_columns(existing)
        features = Features({**ds.features, **added}) if ds.features is not None else None
        return ds.map(fn, batched=True, input_columns="image_id", features=features)

    if isinstance(dsdict, (DatasetDict, IterableDatasetDict)):
        out = type(dsdict)({split: _one(ds) for split, ds in dsdict.items()})
        if isinstance(dsdict, DatasetDict):
            total = sum(len(ds) for ds in dsdict.values())
            matched = sum(
                table.get(str(image_id), {}).get(columns[0]) is not None
                for ds in dsdict.values() for image_id in ds["image_id"]
            )
            if matched < total:
                logger.warning(f"{source}: {total - matched} of {total} images have none.")
        return out
    if isinstance(dsdict, (Dataset, IterableDataset)):
        return _one(dsdict)
    raise TypeError(
        f"attach_translations/attach_columns expect a DatasetDict, IterableDatasetDict, Dataset or IterableDataset, "
        f"got {type(dsdict).__name__}."
    )


# ---------------------------------------------------------------------------------------------------------------------
# Karpathy splits
# ---------------------------------------------------------------------------------------------------------------------
def _read_karpathy_records(
    json_path: Path, image_root: Path, *, use_restval: bool, wanted: set[str] | None
) -> dict[str, list[Record]]:
    try:
        with json_path.open(encoding="utf-8-sig") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as err:
        raise ValueError(f"Karpathy JSON {str(json_path)!r} is not valid JSON ({err}).") from err
    except UnicodeDecodeError as err:
        raise _not_utf8(json_path, err) from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        got = type(data).__name__ if not isinstance(data, dict) else f"a dict with keys {sorted(data)}"
        raise ValueError(  # noqa: TRY004 - malformed file content, not a wrong argument type
            f"Karpathy JSON {str(json_path)!r}: expected a dict with an 'images' list "
            f"(like dataset_coco.json / dataset_flickr30k.json), got {got}."
        )
    split_records: dict[str, list[Record]] = {split: [] for split in CANONICAL_SPLITS}
    all_ids: list[str] = []
    for index, entry in enumerate(data["images"]):
        where = f"Karpathy JSON {str(json_path)!r}, images[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a dict, got {type(entry).__name__}.")  # noqa: TRY004
        for key in ("filename", "split", "sentences"):
            if key not in entry:
                raise ValueError(f"{where}: missing key {key!r} (entry has keys {sorted(entry)}).")
        if "cocoid" not in entry and "imgid" not in entry:
            raise ValueError(f"{where}: missing key 'imgid' (or 'cocoid'); entry has keys {sorted(entry)}.")
        if not isinstance(entry["sentences"], list):
            got = type(entry["sentences"]).__name__
            raise ValueError(f"{where}: 'sentences' must be a list, got {got}.")  # noqa: TRY004
        raw_split = entry["split"]
        if raw_split not in _KARPATHY_SPLITS:
            raise ValueError(f"{where}: unknown split {raw_split!r}; accepted values are {list(_KARPATHY_SPLITS)}.")
        if raw_split == "restval":
            if not use_restval:
                continue
            split = "train"
        else:
            split = _canonical_split(raw_split, where=where)
        image_id = str(entry["cocoid"] if "cocoid" in entry else entry["imgid"])
        all_ids.append(image_id)
        if wanted is not None and split not in wanted:
            continue
        raw_captions = []
        for s_index, sentence in enumerate(entry["sentences"]):
            if not isinstance(sentence, dict) or "raw" not in sentence:
                raise ValueError(f"{where}.sentences[{s_index}]: missing key 'raw' (got {sentence!r}).")
            raw_captions.append(sentence["raw"])
        captions = _clean_captions(raw_captions, image_id=image_id, source=where)
        path = image_root / _inside_root(entry.get("filepath") or "", entry["filename"], image_root, where=where)
        _check_image_file(str(path), image_id=image_id, where=where)
        split_records[split].append({"image_id": image_id, "image": str(path), "captions": captions})
    _check_duplicate_ids(all_ids, source=f"Karpathy JSON {str(json_path)!r}")
    return split_records


def _inside_root(filepath: Any, filename: Any, image_root: Path, *, where: str) -> str:
    """``filepath/filename`` when it stays inside ``image_root``; a downloaded split file must not make gapclip read
    files elsewhere (``../``, an absolute path)."""
    if not isinstance(filepath, str) or not isinstance(filename, str) or not filename:
        raise ValueError(f"{where}: 'filepath' and 'filename' must be strings, got {filepath!r} and {filename!r}.")
    relative = os.path.normpath(os.path.join(filepath, filename))
    if os.path.isabs(relative) or relative == os.pardir or relative.startswith(os.pardir + os.sep):
        raise ValueError(
            f"{where}: image path {os.path.join(filepath, filename)!r} (filepath {filepath!r} + filename "
            f"{filename!r}) leads outside --image_root {str(image_root)!r}; Karpathy image paths must stay inside the "
            "image root."
        )
    return relative


def load_karpathy(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike,
    *,
    use_restval: bool = True,
    splits: Iterable[str] | None = None,
    translations: str | os.PathLike | None = None,
    streaming: bool = False,
) -> AnyDatasetDict:
    """Load a Karpathy split file (`dataset_coco.json`, `dataset_flickr30k.json`, ...).

    Args:
        json_path: the Karpathy JSON (`{"images": [{"filename", "filepath"?, "imgid", "cocoid"?, "split",
            "sentences": [{"raw"}, ...]}, ...]}`).
        image_root: folder holding the images; an image's path is `image_root / filepath / filename`.
        use_restval: put COCO's `restval` images into `train` (default True); if False they are dropped.
        splits: keep only these splits (canonical names or `"val"`); default all.
        translations: optional JSONL of `{"image_id", "translation"}` added as a `translation` column.
        streaming: return an `IterableDatasetDict` (validation still runs eagerly; it is cheap).
    """
    json_path, image_root = Path(json_path), Path(image_root)
    if not json_path.is_file():
        raise FileNotFoundError(f"Karpathy JSON {str(json_path)!r} does not exist.")
    if not image_root.is_dir():
        raise FileNotFoundError(
            f"image_root {str(image_root)!r} (for Karpathy JSON {str(json_path)!r}) is not a folder."
        )
    records = _read_karpathy_records(
        json_path, image_root, use_restval=use_restval, wanted=_normalize_requested_splits(splits)
    )
    return _maybe_attach(_records_to_dict(records, streaming=streaming), translations)


# ---------------------------------------------------------------------------------------------------------------------
# CSV / JSONL caption files
# ---------------------------------------------------------------------------------------------------------------------
def _iter_caption_file_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        yield from _caption_file_rows(path)
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from None


def _caption_file_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8-sig", newline="") as handle:
        if suffix in (".csv", ".tsv"):
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            for line_number, row in enumerate(reader, start=2):
                yield line_number, row
        elif suffix in (".jsonl", ".json"):
            yield from _iter_json_objects(handle, path)
        else:
            raise ValueError(
                f"caption file {str(path)!r}: unsupported extension {suffix!r}; accepted: .csv, .tsv, .jsonl."
            )


def _read_caption_file_records(
    path: Path,
    image_root: Path,
    *,
    image_column: str,
    caption_column: str,
    id_column: str | None,
    split_column: str | None,
) -> dict[str, list[Record]]:
    grouped: dict[str, Record] = {}
    split_of: dict[str, str] = {}
    path_owner: dict[str, str] = {}
    for line_number, row in _iter_caption_file_rows(path):
        where = f"{path}, line {line_number}"
        for column in (image_column, caption_column) + ((id_column,) if id_column else ()):
            if column not in row:
                raise ValueError(f"{where}: missing column {column!r}; available columns: {sorted(row)}.")
        image_value = row[image_column]
        if not isinstance(image_value, str) or not image_value.strip():
            raise ValueError(f"{where}: column {image_column!r} must be a non-empty image path, got {image_value!r}.")
        image_id = str(row[id_column]) if id_column else image_value
        split_value = row.get(split_column) if split_column else None
        split = (
            "train"
            if split_value in (None, "")
            else _canonical_split(split_value, where=f"{where}, column {split_column!r}")
        )
        captions = row[caption_column]
        if isinstance(captions, str):
            captions = [captions]
        if image_id not in grouped:
            image_path = str(image_root / image_value)
            _check_image_file(image_path, image_id=image_id, where=where)
            if image_path in path_owner:
                raise ValueError(
                    f"{where}: image {image_path!r} appears under two ids "
                    f"({path_owner[image_path]!r} and {image_id!r})."
                )
            path_owner[image_path] = image_id
            grouped[image_id] = {"image_id": image_id, "image": image_path, "captions": [], "_where": where}
            split_of[image_id] = split
        elif split_of[image_id] != split:
            raise ValueError(
                f"{where}: image_id={image_id!r} is in split {split!r} here but in {split_of[image_id]!r} earlier; "
                "an image must belong to one split."
            )
        if captions is not None:
            grouped[image_id]["captions"].extend(captions if isinstance(captions, list) else [captions])
    if not grouped:
        raise ValueError(f"caption file {str(path)!r} has no rows.")
    split_records: dict[str, list[Record]] = {split: [] for split in CANONICAL_SPLITS}
    for image_id, record in grouped.items():
        where = record.pop("_where")
        record["captions"] = _clean_captions(
            record["captions"], image_id=image_id, source=f"{where} (first row of this image)"
        )
        split_records[split_of[image_id]].append(record)
    return split_records


def load_captions_file(
    path: str | os.PathLike,
    image_root: str | os.PathLike,
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    id_column: str | None = None,
    split_column: str | None = "split",
    translations: str | os.PathLike | None = None,
    streaming: bool = False,
) -> AnyDatasetDict:
    """Load a CSV/TSV or JSONL caption file with one row per (image, caption) or per image.

    Rows that share an image (the `id_column` value, or the image path when `id_column` is None) are grouped into one
    row with the list of their captions; a JSONL caption cell may already hold a list. Rows without a split value (or
    files without `split_column`) go to `"train"`. Image paths are relative to `image_root`.
    """
    path, image_root = Path(path), Path(image_root)
    if not path.is_file():
        raise FileNotFoundError(f"caption file {str(path)!r} does not exist.")
    records = _read_caption_file_records(
        path,
        image_root,
        image_column=image_column,
        caption_column=caption_column,
        id_column=id_column,
        split_column=split_column,
    )
    return _maybe_attach(_records_to_dict(records, streaming=streaming), translations)


# ---------------------------------------------------------------------------------------------------------------------
# Hub datasets, save_to_disk folders and parquet
# ---------------------------------------------------------------------------------------------------------------------
def _normalize_batch(
    captions: list[Any],
    ids: list[Any] | None,
    indices: list[int],
    *,
    split: str,
    source: str,
) -> dict[str, list[Any]]:
    image_ids = [str(i) for i in ids] if ids is not None else [str(i) for i in indices]
    out_captions = [
        _clean_captions(cell, image_id=image_id, source=f"{source} [{split}] row {index}")
        for cell, image_id, index in zip(captions, image_ids, indices)
    ]
    return {"__gapclip_image_id": image_ids, "__gapclip_captions": out_captions}


def _normalize_hub_split(
    ds: Dataset | IterableDataset,
    *,
    split: str,
    source: str,
    image_column: str,
    caption_column: str,
    id_column: str | None,
    image_root: Path | None,
) -> Dataset | IterableDataset:
    columns = ds.column_names
    if columns is not None:
        for option, column in (
            ("image_column", image_column),
            ("caption_column", caption_column),
            ("id_column", id_column),
        ):
            if column is not None and column not in columns:
                raise ValueError(
                    f"{source} [{split}]: {option}={column!r} is not a column; available columns: {sorted(columns)}."
                )
    image_feature = ds.features.get(image_column) if ds.features is not None else None
    is_path_column = image_feature is None or image_feature == Value("string")
    if isinstance(image_feature, Image):
        ds = ds.cast_column(image_column, Image(decode=False))
    input_columns = [caption_column] + ([id_column] if id_column else []) + ([image_column] if is_path_column else [])

    def fn(*args: Any) -> dict[str, list[Any]]:
        *cols, indices = args
        out = _normalize_batch(cols[0], cols[1] if id_column else None, indices, split=split, source=source)
        if is_path_column:
            out["__gapclip_image"] = [
                p if image_root is None or os.path.isabs(p) else str(image_root / p) for p in cols[-1]
            ]
        return out

    keep = set() if is_path_column else {image_column}
    to_remove = [c for c in (columns or []) if c not in keep]
    out_features = Features(
        {
            "__gapclip_image_id": Value("string"),
            "__gapclip_captions": List(Value("string")),
            **({"__gapclip_image": Value("string")} if is_path_column else {image_column: Image(decode=False)}),
        }
    )
    ds = ds.map(
        fn,
        batched=True,
        with_indices=True,
        input_columns=input_columns,
        remove_columns=to_remove,
        features=out_features,
    )
    renames = {"__gapclip_image_id": "image_id", "__gapclip_captions": "captions"}
    renames.update(
        {"__gapclip_image": "image"} if is_path_column else {} if image_column == "image" else {image_column: "image"}
    )
    ds = ds.rename_columns(renames)
    if is_path_column and isinstance(ds, Dataset):
        for row, (image_path, image_id) in enumerate(zip(ds["image"], ds["image_id"])):
            _check_image_file(image_path, image_id=image_id, where=f"{source} [{split}] row {row}")
    ds = ds.cast_column("image", Image())
    ds = ds.select_columns(list(CAPTION_FEATURES))
    if isinstance(ds, Dataset):
        ds = ds.cast(CAPTION_FEATURES)
    return ds


def _is_parquet_path(path: Path) -> bool:
    if path.is_file():
        return path.suffix.lower() == ".parquet"
    return path.is_dir() and any(path.rglob("*.parquet"))


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def load_hub_captions(
    name_or_path: str | os.PathLike,
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    id_column: str | None = None,
    split_map: Mapping[str, str] | None = None,
    streaming: bool = False,
    image_root: str | os.PathLike | None = None,
    translations: str | os.PathLike | None = None,
    **load_kwargs: Any,
) -> AnyDatasetDict:
    """Load a captioned image dataset from the Hub, a `save_to_disk` folder or parquet file(s).

    Args:
        name_or_path: a Hub dataset name, a folder written by `save_to_disk`, a `.parquet` file or a folder of them
            (split names are inferred from the file names, otherwise everything is `"train"`).
        image_column: column holding an `Image` feature or image path strings.
        caption_column: column holding a caption string or a list of captions.
        id_column: column with unique image ids; default: the row index within the split.
        split_map: maps source split names to canonical ones (default: `train`, `validation`/`val`/`valid`/`dev`,
            `test`); source splits that map to nothing are dropped with a warning.
        streaming: return an `IterableDatasetDict` (column checks still run eagerly when features are known).
        image_root: folder that relative image path strings are resolved against.
        translations: optional JSONL of `{"image_id", "translation"}` added as a `translation` column.
        **load_kwargs: passed to `datasets.load_dataset` (e.g. `name`, `revision`, `data_files`).
    """
    source = str(name_or_path)
    path = Path(source)
    if _is_saved_dataset(path):
        loaded = datasets.load_from_disk(source)
        if streaming:
            loaded = (
                IterableDatasetDict({k: v.to_iterable_dataset() for k, v in loaded.items()})
                if isinstance(loaded, DatasetDict)
                else loaded.to_iterable_dataset()
            )
    elif _is_parquet_path(path):
        if path.is_file():
            loaded = datasets.load_dataset("parquet", data_files={"train": source}, streaming=streaming, **load_kwargs)
        else:
            loaded = datasets.load_dataset("parquet", data_dir=source, streaming=streaming, **load_kwargs)
    elif path.exists():
        raise ValueError(
            f"load_hub_captions: {source!r} exists locally but is neither a `save_to_disk` folder (with "
            "dataset_dict.json/state.json) nor a parquet file or folder of parquet files."
        )
    else:
        loaded = datasets.load_dataset(source, streaming=streaming, **load_kwargs)
    if isinstance(loaded, (Dataset, IterableDataset)):
        loaded = (IterableDatasetDict if streaming else DatasetDict)({"train": loaded})

    mapping = dict(split_map) if split_map is not None else {k: v for k, v in _SPLIT_ALIASES.items()}
    for target in mapping.values():
        if target not in CANONICAL_SPLITS:
            raise ValueError(f"split_map maps onto {target!r}; accepted targets are {list(CANONICAL_SPLITS)}.")
    out = IterableDatasetDict() if streaming else DatasetDict()
    for split_name, ds in loaded.items():
        target = mapping.get(split_name)
        if target is None:
            logger.warning(f"{source}: split {split_name!r} is not in split_map {mapping}; dropping it.")
            continue
        if target in out:
            raise ValueError(f"{source}: two source splits map onto {target!r} (split_map={mapping}).")
        out[target] = _normalize_hub_split(
            ds,
            split=split_name,
            source=source,
            image_column=image_column,
            caption_column=caption_column,
            id_column=id_column,
            image_root=Path(image_root) if image_root is not None else None,
        )
    if not out:
        raise ValueError(f"{source}: no split left after split_map {mapping}; source splits are {list(loaded)}.")
    if not streaming:
        _check_duplicate_ids((i for ds in out.values() for i in ds["image_id"]), source=source)
    return _maybe_attach(out, translations)


# ---------------------------------------------------------------------------------------------------------------------
# Demo and dispatch
# ---------------------------------------------------------------------------------------------------------------------
def load_demo(
    root: str | os.PathLike | None = None,
    *,
    with_translations: bool = True,
    splits: Iterable[str] | None = None,
    streaming: bool = False,
    **make_kwargs: Any,
) -> AnyDatasetDict:
    """Generate (or reuse the cached) synthetic demo set and load it; see `gapclip.data.demo.make_demo_dataset`."""
    from .demo import make_demo_dataset

    if root is not None and not make_kwargs and (Path(root) / "meta.json").is_file():
        root = Path(root)  # an existing demo folder, whatever its parameters
    else:
        root = make_demo_dataset(root, **make_kwargs)
    return load_karpathy(
        root / "dataset_demo.json",
        root / "images",
        splits=splits,
        streaming=streaming,
        translations=root / "translations.jsonl" if with_translations else None,
    )


_LOADERS: dict[str, Callable[..., AnyDatasetDict]] = {
    "karpathy": load_karpathy,
    "hub": load_hub_captions,
    "csv": load_captions_file,
    "jsonl": load_captions_file,
    "demo": load_demo,
}


def load_caption_dataset(source: str, *args: Any, **kwargs: Any) -> AnyDatasetDict:
    """Single entry point: `source` is one of "karpathy", "hub", "csv", "jsonl", "demo"; other args go to the loader.

    - "karpathy": `load_karpathy(json_path, image_root, ...)`
    - "hub": `load_hub_captions(name_or_path, ...)`
    - "csv" / "jsonl": `load_captions_file(path, image_root, ...)`
    - "demo": `load_demo(root=None, ...)` with `make_demo_dataset` keyword arguments
    """
    if not isinstance(source, str) or source.lower() not in _LOADERS:
        raise ValueError(f"load_caption_dataset: unknown source {source!r}; accepted sources are {sorted(_LOADERS)}.")
    source = source.lower()
    if source in ("csv", "jsonl"):
        path = args[0] if args else kwargs.get("path")
        if path is not None:
            suffix = Path(path).suffix.lower()
            accepted = (".csv", ".tsv") if source == "csv" else (".jsonl", ".json")
            if suffix not in accepted:
                raise ValueError(
                    f"load_caption_dataset(source={source!r}): file {str(path)!r} should end in {accepted}."
                )
    return _LOADERS[source](*args, **kwargs)
