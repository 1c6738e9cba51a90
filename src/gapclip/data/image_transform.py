"""The backbone image processor's resize → center crop → rescale → normalise, split into uint8 work per image and one
torch op per batch.

transformers 5 ships each image processor in two backends: the torchvision one (`CLIPImageProcessor`, "fast") and a
PIL/NumPy one (`CLIPImageProcessorPil`, "slow"), which `AutoProcessor` hands out when torchvision is not installed
(gapclip's CPU install). The slow backend resizes with Pillow, then crops, rescales and normalises every image in
NumPy (a float64 copy, channel transposes), which costs about as much as the resize itself.

:class:`ImageTransform` runs the processor's own steps with its own settings:

- per image, the geometry in uint8 (:meth:`ImageTransform.pixels`, :meth:`ImageTransform.load`): for a PIL-backend
  processor the same `Image.resize` call (filter, output size) and center crop (zero padding included) as
  transformers' PIL backend, in Pillow directly; for a torchvision-backend processor its own `resize` and
  `center_crop` on the uint8 tensor. The pixels are *identical* to the processor's before rescaling.
- per batch, one fused rescale + normalise (:meth:`ImageTransform.normalize`), `x · (scale/std) − mean/std`, which
  differs from the processor's float32 arithmetic by rounding only (at most 1e-6; tests/data/test_image_transform.py
  checks it on real photos and COCO-size JPEGs).

uint8 pixels are what the pixel cache (:mod:`gapclip.data.pixel_cache`) stores, at a quarter of float32's size. A
processor whose class changes a step (a model-specific `_preprocess`, padding, patching) is called as it is, with one
warning: :func:`fast_image_transform` says why.

Opt-in, `reduced_decoding=True` decodes JPEGs at the smallest DCT scale (1/2, 1/4 or 1/8, libjpeg's own, through
`Image.draft`) that leaves them at least as large as the resize target, then resizes to the output size of the full
image (with Pillow, from the region the full image covers, as `Image.thumbnail` does). A 640×480 photo decodes at
320×240 for 224 px: about twice the images per second, at the price of pixels that differ from the full decode (the
README gives the measured difference). The pixel cache keys on it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["ImageTransform", "UnsupportedImageProcessor", "fast_image_transform", "open_image", "to_rgb"]

# The steps of transformers' image processor backends that ImageTransform reproduces: a class that overrides any of
# them does something else, and is called as it is.
_STEPS = {
    "pil": ("preprocess", "_preprocess_image_like_inputs", "_prepare_image_like_inputs", "_prepare_images_structure",
            "process_image", "_preprocess", "resize", "center_crop", "rescale", "normalize", "convert_to_rgb",
            "_standardize_kwargs"),
    "torchvision": ("preprocess", "_preprocess_image_like_inputs", "_prepare_image_like_inputs",
                    "_prepare_images_structure", "process_image", "_preprocess", "resize", "center_crop",
                    "rescale_and_normalize", "rescale", "normalize", "convert_to_rgb", "_standardize_kwargs"),
}


class UnsupportedImageProcessor(ValueError):
    """The image processor does something :class:`ImageTransform` does not reproduce (the message says what)."""


def open_image(value: Any) -> tuple[PILImage.Image, str | None]:
    """An undecoded `Image` cell (`{"bytes", "path"}`), a path or a PIL image, opened (not yet decoded), and its path."""
    if isinstance(value, PILImage.Image):
        return value, getattr(value, "filename", None) or None
    if isinstance(value, dict):
        path, data = value.get("path"), value.get("bytes")
        return (PILImage.open(io.BytesIO(data)) if data is not None else PILImage.open(path)), path
    if isinstance(value, str):
        return PILImage.open(value), value
    raise TypeError(f"unsupported image value of type {type(value).__name__}")


def to_rgb(image: PILImage.Image) -> PILImage.Image:
    """RGB, with transparency composited onto white (greyscale, palette, RGBA, LA and 1-bit images)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = PILImage.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


@dataclass(frozen=True)
class ImageTransform:
    """An image processor's geometry (uint8, per image) and normalisation (float32, per batch).

    Build it with :meth:`from_image_processor`; the fields are the processor's settings, resolved.

    Args:
        backend: `"pil"` (Pillow resize, as transformers' PIL backend) or `"torchvision"` (the processor's own
            `resize`/`center_crop` on uint8 tensors).
        resize: `"shortest_edge"` (the short side becomes `size[0]`, the long side keeps the aspect ratio, truncated
            as transformers does), `"exact"` (to `size` = (height, width)) or None (no resize).
        size: the resize target, (shortest edge,) or (height, width).
        resample: the Pillow filter (`PIL.Image.Resampling` value) the processor names.
        crop: center-crop size (height, width), or None.
        rescale: the rescale factor, or None.
        mean, std: per-channel normalisation, or None.
        reduced_decoding: decode JPEGs at a reduced DCT scale that still covers the resize target (opt-in; not
            identical to the full decode, see the module docstring).
        processor: the image processor (the torchvision backend's geometry calls its methods).
    """

    backend: str
    resize: str | None
    size: tuple[int, ...]
    resample: int
    crop: tuple[int, int] | None
    rescale: float | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    reduced_decoding: bool = False
    processor: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def from_image_processor(cls, image_processor: Any, *, reduced_decoding: bool = False) -> ImageTransform:
        """The transform of a transformers image processor (PIL or torchvision backend).

        Raises:
            UnsupportedImageProcessor: the processor is not a stock backend pipeline (a class that overrides a step,
                or an older "slow" processor of its own) or uses a setting this transform does not reproduce
                (padding, a size other than `shortest_edge` or `height`/`width`); the message names it.
        """
        name = type(image_processor).__name__
        backend = getattr(image_processor, "backend", None)
        base = _backend_class(backend)
        if base is None or not isinstance(image_processor, base):
            raise UnsupportedImageProcessor(
                f"{name} is not a transformers PIL- or torchvision-backend image processor (backend {backend!r})."
            )
        changed = [step for step in _STEPS[backend] if _implementation(type(image_processor), step) is not
                   _implementation(base, step)]
        if changed:
            raise UnsupportedImageProcessor(f"{name} changes the {backend} pipeline's step(s) {changed}.")
        if getattr(image_processor, "do_pad", None):
            raise UnsupportedImageProcessor(f"{name} pads its images (do_pad=True).")
        resize, size = _resize_settings(image_processor, name)
        crop = None
        if image_processor.do_center_crop:
            crop_size = image_processor.crop_size
            if not (crop_size and crop_size.height and crop_size.width):
                raise UnsupportedImageProcessor(f"{name} has do_center_crop=True without a crop height and width.")
            crop = (int(crop_size.height), int(crop_size.width))
        resample = image_processor.resample
        resample = int(resample) if resample is not None else int(PILImage.Resampling.BILINEAR)
        if resample not in {int(r) for r in PILImage.Resampling}:
            raise UnsupportedImageProcessor(f"{name} resamples with {image_processor.resample!r}, not a Pillow filter.")
        mean = std = None
        if image_processor.do_normalize:
            mean, std = _per_channel(image_processor.image_mean, name), _per_channel(image_processor.image_std, name)
        rescale = float(image_processor.rescale_factor) if image_processor.do_rescale else None
        return cls(backend, resize, size, resample, crop, rescale, mean, std, bool(reduced_decoding),
                   image_processor if backend == "torchvision" else None)

    # ------------------------------------------------------------------------------------------------ per image
    @property
    def draft_size(self) -> tuple[int, int] | None:
        """The (width, height) a reduced JPEG decode must keep (None: decode in full)."""
        if not self.reduced_decoding or self.resize is None:
            return None
        if self.resize == "shortest_edge":
            return (self.size[0], self.size[0])
        return (self.size[1], self.size[0])

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """The (height, width) an image of `width` × `height` is resized to, as transformers computes it."""
        if self.resize == "exact":
            return (self.size[0], self.size[1])
        if self.resize == "shortest_edge":
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = self.size[0], int(self.size[0] * long / short)
            return (new_long, new_short) if width <= height else (new_short, new_long)
        return (height, width)

    def load(self, image: PILImage.Image) -> np.ndarray:
        """Decode an opened, not yet loaded image (:func:`open_image`), reduced-scale under `reduced_decoding`, into
        the (height, width, 3) uint8 pixels of :meth:`pixels`."""
        original = image.size
        box = None
        if self.draft_size is not None and image.format == "JPEG":
            drafted = image.draft("RGB", self.draft_size)
            if drafted is not None and image.size != original:
                box = drafted[1]
        image.load()
        return self._geometry(to_rgb(image), original, box)

    def pixels(self, image: PILImage.Image) -> np.ndarray:
        """The resized and cropped RGB image as (height, width, 3) uint8: the processor's pixels before rescaling."""
        if image.mode != "RGB":
            raise ValueError(f"ImageTransform.pixels needs an RGB image, got mode {image.mode!r}.")
        return self._geometry(image, image.size, None)

    def _geometry(self, image: PILImage.Image, original: tuple[int, int], box: Any) -> np.ndarray:
        out_size = self.output_size(*original) if self.resize is not None else None
        if self.backend == "torchvision":
            return self._torchvision_geometry(image, out_size)
        if out_size is not None:
            image = image.resize((out_size[1], out_size[0]), self.resample, box=box)
        if self.crop is not None:
            crop_height, crop_width = self.crop
            # Floor division puts a too-small image at ceil(missing / 2) in zero padding, as transformers does;
            # Pillow fills the part of the box outside the image with zeros.
            left, top = (image.width - crop_width) // 2, (image.height - crop_height) // 2
            if (left, top, crop_width, crop_height) != (0, 0, image.width, image.height):
                image = image.crop((left, top, left + crop_width, top + crop_height))
        return np.asarray(image)

    def _torchvision_geometry(self, image: PILImage.Image, out_size: tuple[int, int] | None) -> np.ndarray:
        from transformers.image_utils import SizeDict

        tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        if out_size is not None:
            tensor = self.processor.resize(
                image=tensor, size=SizeDict(height=out_size[0], width=out_size[1]), resample=self.processor.resample
            )
        if self.crop is not None:
            tensor = self.processor.center_crop(tensor, SizeDict(height=self.crop[0], width=self.crop[1]))
        return tensor.permute(1, 2, 0).numpy()

    # ------------------------------------------------------------------------------------------------ per batch
    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """A (batch, height, width, 3) uint8 batch → float32 `pixel_values` (batch, 3, height, width), rescaled and
        normalised as the processor does (to float32 rounding)."""
        if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[-1] != 3:
            raise ValueError(
                f"normalize needs a (batch, height, width, 3) uint8 batch, got {pixels.dtype} of shape "
                f"{tuple(pixels.shape)}."
            )
        out = torch.empty((pixels.shape[0], 3, *pixels.shape[1:3]), dtype=torch.float32)
        out.copy_(pixels.permute(0, 3, 1, 2))
        scale, shift = self._affine()
        if scale is not None:
            out.mul_(scale)
        if shift is not None:
            out.add_(shift)
        return out

    def _affine(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        # Rescale and normalisation folded into one multiply-add, computed in float64 and rounded once to float32.
        factor = self.rescale if self.rescale is not None else 1.0
        if self.mean is None:
            return (torch.tensor(factor, dtype=torch.float32) if self.rescale is not None else None), None
        std, mean = np.asarray(self.std, dtype=np.float64), np.asarray(self.mean, dtype=np.float64)
        scale = torch.from_numpy((factor / std).astype(np.float32)).view(1, 3, 1, 1)
        shift = torch.from_numpy((-mean / std).astype(np.float32)).view(1, 3, 1, 1)
        return scale, shift

    def stack(self, arrays: Sequence[np.ndarray | torch.Tensor]) -> torch.Tensor:
        """Per-image uint8 pixels → one (batch, height, width, 3) uint8 tensor (an error names differing sizes)."""
        shapes = sorted({tuple(array.shape) for array in arrays})
        if len(shapes) > 1:
            raise ValueError(
                f"The images of a batch have different sizes after the processor's resize/crop ({shapes}); stacking "
                "them needs a processor that resizes or crops to one size."
            )
        out = torch.empty((len(arrays), *shapes[0]), dtype=torch.uint8)
        for row, array in enumerate(arrays):
            if isinstance(array, torch.Tensor):
                out[row] = array
            else:
                out[row].numpy()[...] = array  # one copy, also from Pillow's read-only array view
        return out

    def __call__(self, images: Sequence[PILImage.Image]) -> torch.Tensor:
        """RGB PIL images → float32 `pixel_values` (batch, 3, height, width)."""
        return self.normalize(self.stack([self.pixels(image) for image in images]))

    def settings(self) -> dict[str, Any]:
        """Every setting that changes the uint8 pixels (the pixel cache's key)."""
        return {"backend": self.backend, "resize": self.resize, "size": list(self.size), "resample": self.resample,
                "crop": list(self.crop) if self.crop else None, "reduced_decoding": self.reduced_decoding}


def _backend_class(backend: str | None) -> type | None:
    if backend == "pil":
        from transformers.image_processing_backends import PilBackend

        return PilBackend
    if backend == "torchvision":
        from transformers.image_processing_backends import TorchvisionBackend

        return TorchvisionBackend
    return None


def _implementation(cls: type, name: str) -> Any:
    for klass in cls.__mro__:
        if name in vars(klass):
            return vars(klass)[name]
    return None


def _resize_settings(image_processor: Any, name: str) -> tuple[str | None, tuple[int, ...]]:
    if not image_processor.do_resize:
        return None, ()
    size = image_processor.size
    if size is None:
        raise UnsupportedImageProcessor(f"{name} has do_resize=True without a size.")
    keys = {key for key, value in dict(size).items() if value}
    if keys == {"shortest_edge"}:
        return "shortest_edge", (int(size.shortest_edge),)
    if keys == {"height", "width"}:
        return "exact", (int(size.height), int(size.width))
    raise UnsupportedImageProcessor(f"{name} resizes to {dict(size)} (only shortest_edge or height/width are reproduced).")


def _per_channel(values: Any, name: str) -> tuple[float, float, float]:
    values = [float(v) for v in values] if isinstance(values, (list, tuple)) else [float(values)] * 3
    if len(values) != 3:
        raise UnsupportedImageProcessor(f"{name} normalises {len(values)} channels; RGB images have 3.")
    return (values[0], values[1], values[2])


def fast_image_transform(image_processor: Any, *, reduced_decoding: bool = False) -> ImageTransform | None:
    """gapclip's transform for `image_processor`, or None (with one warning that says why) when it cannot reproduce
    the processor, which is then called as it is."""
    try:
        return ImageTransform.from_image_processor(image_processor, reduced_decoding=reduced_decoding)
    except UnsupportedImageProcessor as reason:
        logger.warning_once(
            f"gapclip's fast image path does not apply: {reason} Images go through the processor itself (one at a "
            "time in NumPy on the PIL backend)."
        )
        return None
