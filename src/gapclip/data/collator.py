"""Collators turning `gapclip.data.pairs` items into model inputs with the backbone's processor.

`GapClipCollator` returns `input_ids`, `attention_mask` (when the tokenizer makes one), `word_mask`, `pixel_values`,
`image_index`, `return_loss=True` and `term_inputs`: the per-row inputs the model's gap terms declare
(`GapClipModel.declared_term_inputs`), each collated as its `TermInput` says, from the item key of the same name (a
dataset column) or from an input provider (e.g. CUSA's `TeacherStore`). The collator knows no method by name.
`ImageCollator` and `TextCollator` encode images or strings alone, e.g. to embed an evaluation set.

Images go through gapclip's image path (:mod:`gapclip.data.image_transform`) when it reproduces the processor:
the same pixels as the processor's own resize and crop, normalised once per batch (equal to float32 rounding, at
most 1e-6), several times faster than transformers' PIL backend. Items that already carry uint8 `"pixels"` (decoded
by `CaptionPairs` with an `image_transform`, or read from a pixel cache) are only stacked and normalised.
`image_transform=None` calls the processor itself, the reference path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image as PILImage
from transformers.utils import logging

from ..losses.base import TermInput
from .image_transform import ImageTransform, fast_image_transform

logger = logging.get_logger(__name__)

__all__ = ["GapClipCollator", "ImageCollator", "TextCollator"]

_PADDING = ("longest", "max_length", "do_not_pad", True, False)
# transformers' sentinel for "no limit" (VERY_LARGE_INTEGER) is ~1e30; anything this big means "unset".
_UNSET_MAX_LENGTH = 1_000_000


def _get_tokenizer(processor: Any) -> Any:
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None and callable(getattr(processor, "batch_decode", None)):
        tokenizer = processor  # a bare tokenizer
    if tokenizer is None:
        raise TypeError(
            f"processor of type {type(processor).__name__} has no tokenizer; pass the backbone's AutoProcessor "
            "(e.g. CLIPProcessor, SiglipProcessor, VisionTextDualEncoderProcessor)."
        )
    return tokenizer


def _get_image_processor(processor: Any) -> Any:
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        raise TypeError(
            f"processor of type {type(processor).__name__} has no image_processor; pass the backbone's AutoProcessor "
            "(e.g. CLIPProcessor, SiglipProcessor, VisionTextDualEncoderProcessor)."
        )
    return image_processor


def _resolve_max_length(tokenizer: Any, max_length: int | None) -> int | None:
    if max_length is not None:
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (or None for the tokenizer's), got {max_length!r}.")
        return max_length
    model_max = getattr(tokenizer, "model_max_length", None)
    if model_max is None or model_max >= _UNSET_MAX_LENGTH:
        return None
    return int(model_max)


def _as_rgb(image: Any, position: int) -> PILImage.Image:
    if isinstance(image, dict) and "image" in image:
        image = image["image"]
    if not isinstance(image, PILImage.Image):
        raise TypeError(f"image {position} of the batch is a {type(image).__name__}; expected a PIL image.")
    return image if image.mode == "RGB" else image.convert("RGB")


def _resolve_transform(image_processor: Any, image_transform: ImageTransform | str | None) -> ImageTransform | None:
    if image_transform == "auto":
        return fast_image_transform(image_processor)
    if image_transform is None or isinstance(image_transform, ImageTransform):
        return image_transform
    raise ValueError(
        f"image_transform={image_transform!r} is not supported; pass 'auto', None (the processor itself) or an "
        "ImageTransform."
    )


def _encode_images(collator: Any, entries: Sequence[Any]) -> torch.Tensor:
    """`pixel_values` of items or images: stacked uint8 `pixels`, or images through the transform or the processor."""
    with_pixels = [isinstance(entry, Mapping) and "pixels" in entry for entry in entries]
    if any(with_pixels):
        if not all(with_pixels):
            rows = [row for row, has in enumerate(with_pixels) if not has]
            raise ValueError(f"Batch rows {rows[:5]} have an 'image' and the others uint8 'pixels'; use one kind.")
        transform = collator.image_transform or collator.pixel_transform()
        return transform.normalize(transform.stack([entry["pixels"] for entry in entries]))
    images = [_as_rgb(entry, i) for i, entry in enumerate(entries)]
    if collator.image_transform is not None:
        return collator.image_transform(images)
    return collator.image_processor(images=images, return_tensors="pt")["pixel_values"]


class _ImageEncoding:
    """What the collators share for images: the processor, gapclip's transform of it, and `pixel_values`."""

    image_processor: Any
    image_transform: ImageTransform | None

    def pixel_transform(self) -> ImageTransform:
        """The transform that normalises uint8 `pixels` items (also when the processor is called for images)."""
        transform = getattr(self, "_pixel_transform", None)
        if transform is None:
            transform = self._pixel_transform = ImageTransform.from_image_processor(self.image_processor)
        return transform


def _encode_texts(
    tokenizer: Any, texts: list[str], *, max_length: int | None, padding: Any, word_mask: bool = True
) -> dict[str, torch.Tensor]:
    """Tokenize with truncation; warn once when a text was longer than `max_length`."""
    if padding == "max_length" and max_length is None:
        raise ValueError(
            "padding='max_length' needs a max_length: pass max_length=... "
            "or use a tokenizer with model_max_length set."
        )
    encoded = tokenizer(
        texts,
        padding=padding,
        truncation=max_length is not None,
        max_length=max_length,
        return_tensors="pt",
        return_special_tokens_mask=True,
    )
    if max_length is not None:
        mask = encoded.get("attention_mask")
        if mask is not None:
            candidates = [i for i, n in enumerate(mask.sum(dim=1).tolist()) if n >= max_length]
        else:
            candidates = list(range(len(texts)))
        if candidates:
            full = tokenizer([texts[i] for i in candidates], truncation=False, padding=False, verbose=False)[
                "input_ids"
            ]
            truncated = sum(len(ids) > max_length for ids in full)
            if truncated:
                logger.warning_once(
                    f"Some texts (captions or text inputs of gap terms) are longer than max_length={max_length} "
                    "tokens and were truncated (this warning is shown once)."
                )
    out = {"input_ids": encoded["input_ids"]}
    if "attention_mask" in encoded:
        out["attention_mask"] = encoded["attention_mask"]
    if word_mask and "special_tokens_mask" in encoded:
        # Word tokens for the local-feature terms: the tokenizer knows its own special tokens.
        attended = encoded["attention_mask"].bool() if "attention_mask" in encoded else True
        out["word_mask"] = attended & ~encoded["special_tokens_mask"].bool()
    return out


@dataclass
class GapClipCollator(_ImageEncoding):
    """Collate `CaptionPairs` items into a batch of tensors for a dual encoder.

    Args:
        processor: the backbone's `AutoProcessor` (tokenizer + image processor).
        max_length: token limit; default the tokenizer's `model_max_length`. Longer captions are truncated with a
            one-time warning.
        padding: passed to the tokenizer; `"longest"` (default) or `"max_length"` (needed by SigLIP, which was
            trained on max-length padded text).
        term_inputs: the `TermInput`s to collate, usually `model.declared_term_inputs`. Each is read from the item
            key of its name (a dataset column; `CaptionPairs` passes every extra column on) and collated as it says
            (`"tensor"`: stacked; `"text"`: tokenised like the captions, with a `present` mask when a row has no
            text; or its callable).
            An input no item has is left out (the model then says which term needs it and how to provide it).
        input_providers: callables `provider(items) -> {name: collated value}` for inputs that do not come from
            the dataset, e.g. a `gapclip.teachers.TeacherStore` (CUSA's teacher embeddings); what they return is
            added to `term_inputs` as it is.
        image_transform: `"auto"` (default): gapclip's image path when it reproduces the processor (otherwise the
            processor, with one warning saying why); None: always the processor itself; or an `ImageTransform`.

    Returns a dict with `input_ids`, `attention_mask` (if the tokenizer makes one), `word_mask`, `pixel_values`,
    `image_index` (LongTensor), `return_loss=True` and, when there is any, `term_inputs` (name → tensor or dict of
    tensors).
    """

    processor: Any
    max_length: int | None = None
    padding: Any = "longest"
    term_inputs: Sequence[TermInput] = ()
    input_providers: Sequence[Callable[[list[dict[str, Any]]], Mapping[str, Any]]] = ()
    image_transform: ImageTransform | str | None = "auto"

    def __post_init__(self) -> None:
        if self.padding not in _PADDING:
            raise ValueError(f"padding={self.padding!r} is not supported; accepted values are {list(_PADDING)}.")
        self.tokenizer = _get_tokenizer(self.processor)
        self.image_processor = _get_image_processor(self.processor)
        self.image_transform = _resolve_transform(self.image_processor, self.image_transform)
        self.resolved_max_length = _resolve_max_length(self.tokenizer, self.max_length)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("GapClipCollator received an empty batch.")
        for key in ("image", "caption", "image_index"):
            missing = [i for i, item in enumerate(items) if key not in item and not (key == "image" and "pixels" in item)]
            if missing:
                raise ValueError(
                    f"GapClipCollator: batch items {missing[:5]} have no {key!r} key; "
                    f"got keys {sorted(items[missing[0]])}."
                )
        captions = [item["caption"] for item in items]
        batch: dict[str, Any] = _encode_texts(
            self.tokenizer, captions, max_length=self.resolved_max_length, padding=self.padding
        )
        batch["pixel_values"] = _encode_images(self, items)
        batch["image_index"] = torch.tensor([int(item["image_index"]) for item in items], dtype=torch.long)
        term_inputs = self.collate_term_inputs(items)
        if term_inputs:
            batch["term_inputs"] = term_inputs
        batch["return_loss"] = True
        return batch

    def encode_texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenise ``texts`` like the captions (truncation, padding): ``input_ids`` and ``attention_mask``."""
        return _encode_texts(
            self.tokenizer, texts, max_length=self.resolved_max_length, padding=self.padding, word_mask=False
        )

    def collate_term_inputs(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """The ``term_inputs`` of a batch: every provider's values, then each declared input found in the items."""
        collated: dict[str, Any] = {}
        for provider in self.input_providers:
            collated.update(provider(items))
        for declared in self.term_inputs:
            if declared.name in collated:
                continue
            values = [_row_value(item, declared, row) for row, item in enumerate(items)]
            if all(value is None for value in values):
                continue
            collated[declared.name] = self._collate_input(declared, values, items)
        return collated

    def _collate_input(self, declared: TermInput, values: list[Any], items: list[dict[str, Any]]) -> Any:
        if callable(declared.collate):
            return declared.collate(values, self)
        if declared.collate == "text":
            bad = [row for row, value in enumerate(values) if value is not None and not isinstance(value, str)]
            if bad:
                raise TypeError(
                    f"GapClipCollator: text input {declared.name!r} of batch rows {bad[:5]} is not a string "
                    f"(first: {type(values[bad[0]]).__name__})."
                )
            encoded = self.encode_texts([value if value is not None else "" for value in values])
            if any(value is None for value in values):  # absent means every row has text (nothing to read per step)
                encoded["present"] = torch.tensor([value is not None for value in values], dtype=torch.bool)
            return encoded
        missing = [row for row, value in enumerate(values) if value is None]
        if missing:
            ids = [items[row].get("image_id") for row in missing[:5]]
            raise ValueError(
                f"GapClipCollator: input {declared.name!r} (read by a gap term) has no value in batch rows "
                f"{missing[:5]} (image ids {ids}); every row needs one."
            )
        try:
            return torch.stack([torch.as_tensor(value, dtype=declared.dtype) for value in values])
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(
                f"GapClipCollator: input {declared.name!r} could not be stacked into a {declared.dtype} tensor "
                f"(values of the first rows: {values[:3]!r}): {error}"
            ) from None


def _row_value(item: Mapping[str, Any], declared: TermInput, row: int) -> Any:
    value = item.get(declared.name)
    if value is None or not declared.per_caption:
        return value
    caption_index = item.get("caption_index")
    if caption_index is None or not 0 <= int(caption_index) < len(value):
        raise ValueError(
            f"GapClipCollator: input {declared.name!r} holds one value per caption, but batch row {row} "
            f"(image id {item.get('image_id')!r}) has caption_index={caption_index!r} and {len(value)} values."
        )
    return value[int(caption_index)]


@dataclass
class ImageCollator(_ImageEncoding):
    """Encode a list of PIL images (or items with an "image" or uint8 "pixels" key) into `{"pixel_values"}`.

    `image_transform` as in :class:`GapClipCollator`.
    """

    processor: Any
    image_transform: ImageTransform | str | None = "auto"

    def __post_init__(self) -> None:
        self.image_processor = _get_image_processor(self.processor)
        self.image_transform = _resolve_transform(self.image_processor, self.image_transform)

    def __call__(self, images: list[Any]) -> dict[str, torch.Tensor]:
        if not images:
            raise ValueError("ImageCollator received an empty list of images.")
        return {"pixel_values": _encode_images(self, images)}


@dataclass
class TextCollator:
    """Encode a list of strings into `{"input_ids", "attention_mask"?}` (truncated like `GapClipCollator`)."""

    processor: Any
    max_length: int | None = None
    padding: Any = "longest"

    def __post_init__(self) -> None:
        if self.padding not in _PADDING:
            raise ValueError(f"padding={self.padding!r} is not supported; accepted values are {list(_PADDING)}.")
        self.tokenizer = _get_tokenizer(self.processor)
        self.resolved_max_length = _resolve_max_length(self.tokenizer, self.max_length)

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if not texts:
            raise ValueError("TextCollator received an empty list of texts.")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"TextCollator: texts {bad[:5]} are not strings (first: {type(texts[bad[0]]).__name__}).")
        return _encode_texts(self.tokenizer, list(texts), max_length=self.resolved_max_length, padding=self.padding)
