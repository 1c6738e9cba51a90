"""Image "translations" for LG-MGC's GST term: one generated caption per image, written to a resumable JSONL file.

:func:`translate_images` runs a captioner over a dataset in batches and appends ``{"image_id", "translation"}``
lines to a JSONL file (flushed after every batch, so a crash loses at most one batch); on restart it skips the ids
already in the file. The file is what :func:`gapclip.data.loaders.attach_translations` (``--translations``) reads.

The captioner is either a transformers pipeline (:func:`load_captioner`) or any callable ``list[PIL.Image] ->
list[str]``. transformers 5 has no ``"image-to-text"`` pipeline task any more: captioning models such as
``Salesforce/blip-image-captioning-base`` run under ``"image-text-to-text"`` with a text prompt; older releases
that still have ``"image-to-text"`` use it without a prompt.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image as PILImage
from tqdm.auto import tqdm
from transformers.utils import logging

logger = logging.get_logger(__name__)

Captioner = Callable[[list[PILImage.Image]], list[str]]

DEFAULT_PROMPT = "a picture of"
DEFAULT_CHAT_PROMPT = "Describe this image in one sentence."


def captioning_task() -> str:
    """``"image-to-text"`` where this transformers release has that pipeline task, else ``"image-text-to-text"``."""
    from transformers.pipelines import SUPPORTED_TASKS

    return "image-to-text" if "image-to-text" in SUPPORTED_TASKS else "image-text-to-text"


class PipelineCaptioner:
    """Adapts a transformers ``image-to-text`` / ``image-text-to-text`` pipeline to ``list[PIL] -> list[str]``.

    Args:
        pipe: the pipeline.
        max_new_tokens: generation length limit.
        prompt: text prompt for ``image-text-to-text`` (ignored by ``image-to-text``). Default: ``"a picture of"``
            (BLIP's captioning prefix, kept in the output) for plain captioners; for chat models (a processor with a
            chat template) ``"Describe this image in one sentence."`` as a user turn, and only the answer is kept.
    """

    def __init__(self, pipe: Any, *, max_new_tokens: int = 30, prompt: str | None = None):
        self.pipe = pipe
        self.max_new_tokens = max_new_tokens
        self.task = getattr(pipe, "task", None) or captioning_task()
        processor = getattr(pipe, "processor", None)
        self.chat = self.task == "image-text-to-text" and getattr(processor, "chat_template", None) is not None
        self.prompt = prompt if prompt is not None else DEFAULT_CHAT_PROMPT if self.chat else DEFAULT_PROMPT

    def __call__(self, images: list[PILImage.Image]) -> list[str]:
        generate_kwargs = {"generate_kwargs": {"max_new_tokens": self.max_new_tokens}}
        if self.task == "image-to-text":
            outputs = self.pipe(images, batch_size=len(images), **generate_kwargs)
        elif self.chat:
            question = {"type": "text", "text": self.prompt}
            chats = [[{"role": "user", "content": [{"type": "image", "image": image}, question]}] for image in images]
            outputs = self.pipe(text=chats, batch_size=len(images), return_full_text=False, **generate_kwargs)
        else:
            prompts = [self.prompt] * len(images)
            outputs = self.pipe(images=images, text=prompts, batch_size=len(images), **generate_kwargs)
        return [_generated_text(output) for output in outputs]


def _generated_text(output: Any) -> str:
    if isinstance(output, list):  # one list of candidates per input
        output = output[0]
    text = output["generated_text"] if isinstance(output, dict) else output
    if isinstance(text, list):  # a chat: the last (assistant) message
        text = text[-1]["content"] if text else ""
        if isinstance(text, list):
            text = " ".join(part.get("text", "") for part in text if isinstance(part, dict))
    return str(text)


def load_captioner(
    model_name_or_path: str,
    *,
    max_new_tokens: int = 30,
    prompt: str | None = None,
    device: int | str | None = None,
    dtype: str | None = None,
) -> PipelineCaptioner:
    """Build a captioning pipeline (task from :func:`captioning_task`) wrapped as a :class:`PipelineCaptioner`.

    ``model_name_or_path`` is any image captioning / image-text-to-text model, e.g.
    ``Salesforce/blip-image-captioning-base`` or a local folder.
    """
    from transformers import pipeline

    kwargs: dict[str, Any] = {}
    if device is not None:
        kwargs["device"] = device
    if dtype is not None:
        kwargs["dtype"] = dtype
    pipe = pipeline(captioning_task(), model=model_name_or_path, **kwargs)
    return PipelineCaptioner(pipe, max_new_tokens=max_new_tokens, prompt=prompt)


def read_done_ids(output_jsonl: str | os.PathLike) -> set[str]:
    """Ids (as strings) already in a translations file; a truncated last line (crash mid-write) is cut off."""
    path = Path(output_jsonl)
    if not path.is_file():
        return set()
    done: set[str] = set()
    good_bytes = 0
    with path.open("rb") as handle:
        for raw in handle:
            if not raw.strip() and raw.endswith(b"\n"):  # blank line
                good_bytes += len(raw)
                continue
            try:
                row = json.loads(raw)
                if not raw.endswith(b"\n"):
                    raise ValueError("line without its newline")
                done.add(str(row["image_id"]))
            except (ValueError, KeyError, TypeError):
                if handle.read(1):  # not the last line: the file is corrupt, not just interrupted
                    raise ValueError(
                        f"{str(path)!r}: the line after byte {good_bytes} is not a complete "
                        "{image_id, translation} JSON object; fix or delete the file (or pass resume=False to "
                        "start over)."
                    ) from None
                logger.warning(f"{str(path)!r}: dropping an incomplete last line (interrupted write).")
                with path.open("r+b") as rewrite:
                    rewrite.truncate(good_bytes)
                break
            good_bytes += len(raw)
    return done


def _as_pil(image: Any) -> PILImage.Image:
    if isinstance(image, (str, os.PathLike)):
        with PILImage.open(image) as opened:
            image = opened.copy()
    elif isinstance(image, dict) and ("bytes" in image or "path" in image):  # undecoded datasets Image feature
        import io

        image = PILImage.open(io.BytesIO(image["bytes"])) if image.get("bytes") else PILImage.open(image["path"])
    if not isinstance(image, PILImage.Image):
        raise TypeError(f"Expected a PIL image, a path or a datasets image dict, got {type(image).__name__}.")
    return image.convert("RGB")


def _pending_batches(
    dataset: Any, *, image_column: str, id_column: str, done: set[str], batch_size: int
) -> Iterable[tuple[list[str], list[Any], list[Any]]]:
    """Batches of (string ids, original ids, images) not yet done, each id once, in dataset order."""
    seen = set(done)
    columns = getattr(dataset, "column_names", None)
    if hasattr(dataset, "select") and hasattr(dataset, "__len__") and columns is not None:
        # A datasets.Dataset: read the id column alone, then decode only the images still to caption.
        if id_column not in columns or image_column not in columns:
            raise ValueError(
                f"translate_images: the dataset needs columns {id_column!r} and {image_column!r}; it has {columns}."
            )
        indices = []
        for index, image_id in enumerate(dataset[id_column]):
            key = str(image_id)
            if key not in seen:
                seen.add(key)
                indices.append(index)
        for start in range(0, len(indices), batch_size):
            rows = dataset[indices[start : start + batch_size]]
            yield [str(i) for i in rows[id_column]], list(rows[id_column]), list(rows[image_column])
        return
    keys, ids, images = [], [], []
    for row in dataset:  # any iterable of dicts (IterableDataset, list of rows)
        key = str(row[id_column])
        if key in seen:
            continue
        seen.add(key)
        keys.append(key), ids.append(row[id_column]), images.append(row[image_column])
        if len(keys) == batch_size:
            yield keys, ids, images
            keys, ids, images = [], [], []
    if keys:
        yield keys, ids, images


def _all_ids(dataset: Any, id_column: str) -> set[str] | None:
    """Every id (as a string) of a sized dataset, for the progress bar; ``None`` for a stream."""
    if hasattr(dataset, "column_names") and hasattr(dataset, "select") and hasattr(dataset, "__len__"):
        return {str(i) for i in dataset[id_column]}
    if isinstance(dataset, Sequence):
        return {str(row[id_column]) for row in dataset}
    return None


def translate_images(
    dataset: Any,
    captioner: Captioner | Any,
    *,
    batch_size: int = 16,
    output_jsonl: str | os.PathLike,
    image_column: str = "image",
    id_column: str = "image_id",
    resume: bool = True,
    max_new_tokens: int = 30,
    prompt: str | None = None,
    show_progress: bool = True,
) -> Path:
    """Caption every image of ``dataset`` once and append ``{"image_id", "translation"}`` lines to a JSONL file.

    Args:
        dataset: a ``datasets.Dataset`` (only the id column is read up front), an ``IterableDataset`` or any
            iterable of dict rows. Rows sharing an image id are captioned once.
        captioner: a transformers pipeline (``image-to-text`` or ``image-text-to-text``; see
            :class:`PipelineCaptioner`) or any callable ``list[PIL.Image] -> list[str]`` returning one caption
            per image.
        batch_size: images per captioner call (and per flush of the file).
        output_jsonl: the translations file (parent folders are created).
        image_column / id_column: where images (PIL, path, or datasets image dict) and ids are read.
        resume: keep the ids already in the file and caption only the others; ``False`` starts a new file.
        max_new_tokens / prompt: passed to a pipeline captioner (ignored for plain callables).
        show_progress: tqdm bar over all unique ids (starting at the number already done).

    Returns:
        The path of the JSONL file.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"translate_images: batch_size must be an integer >= 1, got {batch_size!r}.")
    if _is_pipeline(captioner):
        captioner = PipelineCaptioner(captioner, max_new_tokens=max_new_tokens, prompt=prompt)
    elif not callable(captioner):
        raise TypeError(
            f"translate_images: captioner must be a transformers pipeline or a callable list[PIL.Image] -> list[str], "
            f"got {type(captioner).__name__}."
        )
    path = Path(output_jsonl)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = read_done_ids(path) if resume else set()
    if not resume and path.exists():
        path.unlink()
    all_ids = _all_ids(dataset, id_column) if show_progress else None
    if done:
        logger.info(f"{str(path)!r}: resuming, {len(done)} image(s) already translated.")

    written = 0
    with path.open("a", encoding="utf-8") as handle, tqdm(
        total=None if all_ids is None else len(all_ids), initial=len(done if all_ids is None else done & all_ids),
        desc="translating images", unit="img", disable=not show_progress,
    ) as progress:
        for keys, ids, images in _pending_batches(
            dataset, image_column=image_column, id_column=id_column, done=done, batch_size=batch_size
        ):
            captions = captioner([_as_pil(image) for image in images])
            if isinstance(captions, str):
                captions = [captions]
            if len(captions) != len(images):
                raise ValueError(
                    f"translate_images: the captioner returned {len(captions)} caption(s) for {len(images)} image(s); "
                    "it must return one string per image."
                )
            for image_id, caption in zip(ids, captions):
                if not isinstance(caption, str):
                    raise TypeError(
                        f"translate_images: the caption of {image_id!r} is a {type(caption).__name__}, not a str."
                    )
                row = {"image_id": image_id, "translation": caption.strip()}
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
            written += len(keys)
            progress.update(len(keys))
    logger.info(f"{str(path)!r}: wrote {written} new translation(s) ({len(done) + written} in total).")
    return path


def _is_pipeline(obj: Any) -> bool:
    try:
        from transformers import Pipeline
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, Pipeline)
