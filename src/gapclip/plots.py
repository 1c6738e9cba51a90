"""Pictures from the LG-MGC supplement: patch-wise similarity maps (Fig. 1) and the modality-gap plot (Fig. 2).

matplotlib is an optional extra (``pip install gapclip[plots]``); it is imported only when a picture is drawn, and
figures are rendered with the Agg canvas directly (no pyplot, no global backend switch), so this works on headless
machines and inside training jobs.
"""

from __future__ import annotations

import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from transformers.utils import logging

from .evaluation import modality_gap

logger = logging.get_logger(__name__)


def _matplotlib() -> tuple[Any, Any]:
    """``(Figure, FigureCanvasAgg)``, or an ImportError that says how to install the extra."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "gapclip.plots needs matplotlib, an optional extra: pip install gapclip[plots]"
        ) from err
    return Figure, FigureCanvasAgg


def _save(figure: Any, canvas_cls: Any, output_path: str | os.PathLike, dpi: int) -> Path:
    path = Path(output_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas_cls(figure)
    figure.savefig(path, dpi=dpi, format=path.suffix.lstrip(".").lower() or "png")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Patch-wise similarity maps (supplement Fig. 1)
# ---------------------------------------------------------------------------------------------------------------------
def substitute_words(caption: str, substitutions: Mapping[str, str]) -> str:
    """Replace whole words in ``caption`` (case-insensitive; a capitalised word stays capitalised).

    ``substitute_words("A dog runs on the grass", {"dog": "cat"}) == "A cat runs on the grass"``, as in the
    supplement's Fig. 1 (object words swapped, or the background description replaced).

    Raises:
        ValueError: a word to replace is not in the caption (the map would silently show the original caption).
    """
    result = caption
    missing = []
    for word, replacement in substitutions.items():
        pattern = re.compile(rf"\b{re.escape(word)}\b", flags=re.IGNORECASE)
        if not pattern.search(result):
            missing.append(word)
            continue

        def replace(match: re.Match, replacement: str = replacement) -> str:
            return replacement[:1].upper() + replacement[1:] if match.group(0)[:1].isupper() else replacement

        result = pattern.sub(replace, result)
    if missing:
        raise ValueError(f"substitute_words: {missing} not found as whole word(s) in caption {caption!r}.")
    return result


def _patch_grid(num_patches: int, pixel_values: torch.Tensor, model: Any) -> tuple[int, int]:
    config = getattr(getattr(model, "backbone", model), "config", None)
    vision_config = getattr(config, "vision_config", None)
    patch_size = getattr(vision_config, "patch_size", None)
    if isinstance(patch_size, (list, tuple)):
        patch_size = patch_size[0]
    if isinstance(patch_size, int) and patch_size > 0:
        height, width = pixel_values.shape[-2] // patch_size, pixel_values.shape[-1] // patch_size
        if height * width == num_patches:
            return height, width
    side = round(num_patches**0.5)
    if side * side != num_patches:
        raise ValueError(f"Cannot arrange {num_patches} patch tokens on a grid; expected a square number of patches.")
    return side, side


@torch.no_grad()
def patch_similarity(model: Any, processor: Any, image: PILImage.Image, captions: Sequence[str]) -> torch.Tensor:
    """Cosine similarity of every projected image patch with the global embedding of each caption.

    Following the supplement (Sec. C, after Yi et al.), the map of caption ``c`` is ``cos(p_j, t_c)`` for the patch
    tokens ``p_j`` projected by the backbone's own head (``model(..., return_local=True).patch_embeds``) and the
    caption's global text embedding ``t_c``.

    Args:
        model: a :class:`~gapclip.GapClipModel` (anything whose forward takes ``return_local`` and returns
            ``patch_embeds`` and ``text_embeds``).
        processor: called as ``processor(text=captions, images=[image], return_tensors="pt", padding=True,
            truncation=True)``: a caption longer than the tokenizer's limit is cut there, as in training.
        image: the image.
        captions: one or more captions.

    Returns:
        ``[len(captions), grid_h, grid_w]`` float tensor on the CPU.
    """
    if isinstance(captions, str) or not captions:
        raise ValueError("patch_similarity: `captions` must be a non-empty list of strings.")
    inputs = processor(
        text=list(captions), images=[image.convert("RGB")], return_tensors="pt", padding=True, truncation=True
    )
    parameter = next(model.parameters())
    attention_mask = inputs.get("attention_mask")
    was_training = model.training
    model.eval()
    try:
        outputs = model(
            input_ids=inputs["input_ids"].to(parameter.device),
            attention_mask=None if attention_mask is None else attention_mask.to(parameter.device),
            pixel_values=inputs["pixel_values"].to(device=parameter.device, dtype=parameter.dtype),
            return_local=True,
        )
    finally:
        model.train(was_training)
    patches = F.normalize(outputs.patch_embeds[0].float(), dim=-1)  # [P, D]
    texts = F.normalize(outputs.text_embeds.float(), dim=-1)  # [C, D]
    similarity = texts @ patches.t()  # [C, P]
    height, width = _patch_grid(patches.shape[0], inputs["pixel_values"], model)
    return similarity.reshape(len(captions), height, width).cpu()


def _center_square(image: PILImage.Image) -> PILImage.Image:
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def patch_similarity_map(
    model: Any,
    processor: Any,
    image: PILImage.Image,
    captions: Sequence[str],
    *,
    output_path: str | os.PathLike,
    alpha: float = 0.6,
    cmap: str = "inferno",
    shared_scale: bool = True,
    display_size: int = 224,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Draw the image and one patch-similarity overlay per caption (supplement Fig. 1); returns the PNG path.

    Each map (see :func:`patch_similarity`) is upsampled bicubically from the patch grid to the image (the
    supplement smooths each pixel over its neighbours) and overlaid on the image, brighter = more similar. The image
    is shown centre-cropped to a square, the region CLIP-style processors keep. With ``shared_scale`` (default) all
    panels share one colour scale, so brightness can be compared across captions, as the supplement does when it
    swaps words (build the variants with :func:`substitute_words`).

    Example::

        >>> caption = "a dog runs on the grass"
        >>> captions = [caption] + [substitute_words(caption, {"dog": w}) for w in ("cat", "boy")]
        >>> patch_similarity_map(model, processor, image, captions, output_path="maps.png")
    """
    Figure, FigureCanvasAgg = _matplotlib()
    maps = patch_similarity(model, processor, image, captions)
    shown = _center_square(image.convert("RGB")).resize((display_size, display_size))
    size = (display_size, display_size)
    upsampled = F.interpolate(maps[:, None], size=size, mode="bicubic", align_corners=False)[:, 0]
    vmin, vmax = (maps.min().item(), maps.max().item()) if shared_scale else (None, None)

    figure = Figure(figsize=(3 * (len(captions) + 1), 3.6))
    axes = figure.subplots(1, len(captions) + 1, squeeze=False)[0]
    axes[0].imshow(shown)
    axes[0].set_title("image", fontsize=9)
    for axis, caption, heat in zip(axes[1:], captions, upsampled):
        axis.imshow(shown)
        overlay = axis.imshow(heat.numpy(), cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax)
        axis.set_title("\n".join(textwrap.wrap(caption, 32)), fontsize=8)
        if not shared_scale:
            figure.colorbar(overlay, ax=axis, fraction=0.046, pad=0.02)
    if shared_scale:
        figure.colorbar(overlay, ax=list(axes[1:]), fraction=0.02, pad=0.02, label="cosine(patch, caption)")
    for axis in axes:
        axis.set_axis_off()
    if title:
        figure.suptitle(title)
    return _save(figure, FigureCanvasAgg, output_path, dpi)


# ---------------------------------------------------------------------------------------------------------------------
# Modality gap (supplement Fig. 2)
# ---------------------------------------------------------------------------------------------------------------------
def project_2d(*embeds: torch.Tensor) -> list[torch.Tensor]:
    """PCA of the concatenated (row-stacked) embeddings onto their two main axes; returns one ``[N_i, 2]`` per input.

    Exact PCA through an SVD of the centred data (deterministic, unlike ``torch.pca_lowrank``), with each axis'
    sign fixed so that its largest-magnitude loading is positive.
    """
    stacked = torch.cat([e.double() for e in embeds], dim=0)
    centred = stacked - stacked.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    axes = vh[:2]
    if axes.shape[0] < 2:  # a single feature: the second axis is flat
        axes = torch.cat([axes, torch.zeros_like(axes)], dim=0)
    signs = torch.sign(axes.gather(1, axes.abs().argmax(dim=1, keepdim=True)))
    axes = axes * torch.where(signs == 0, torch.ones_like(signs), signs)
    projected = centred @ axes.t()
    return list(projected.split([e.shape[0] for e in embeds], dim=0))


@torch.no_grad()
def modality_gap_plot(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    *,
    output_path: str | os.PathLike,
    num_pairs: int | None = 1000,
    num_lines: int = 0,
    label: str | None = None,
    dpi: int = 100,
) -> Path:
    """2-D PCA scatter of paired image and text embeddings with the modality gap in the title (supplement Fig. 2).

    Args:
        image_embeds, text_embeds: ``[N, D]`` aligned pairs (row ``i`` of each belongs together); normalised here.
        output_path: where the PNG goes.
        num_pairs: the first ``num_pairs`` pairs are drawn and measured (1000 COCO test pairs in the paper);
            ``None`` uses all.
        num_lines: draw a line between image and text for the first ``num_lines`` pairs (0: none).
        label: model name shown before the gap, e.g. ``"CLIP"`` → ``"CLIP - (gap: 0.84)"``.

    The gap is :func:`gapclip.evaluation.modality_gap`: ``‖mean(normalised image emb) − mean(normalised text emb)‖₂``.
    """
    Figure, FigureCanvasAgg = _matplotlib()
    if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"modality_gap_plot needs two [N, D] tensors of the same shape (aligned pairs), got "
            f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}."
        )
    if num_pairs is not None:
        image_embeds, text_embeds = image_embeds[:num_pairs], text_embeds[:num_pairs]
    images = F.normalize(image_embeds.detach().double().cpu(), dim=-1)
    texts = F.normalize(text_embeds.detach().double().cpu(), dim=-1)
    gap = modality_gap(images, texts, num_pairs=None)
    image_xy, text_xy = project_2d(images, texts)

    figure = Figure(figsize=(5, 5))
    axis = figure.add_subplot(1, 1, 1)
    for i in range(min(num_lines, images.shape[0])):
        axis.plot([image_xy[i, 0], text_xy[i, 0]], [image_xy[i, 1], text_xy[i, 1]], color="0.7", linewidth=0.5,
                  zorder=1)
    axis.scatter(image_xy[:, 0], image_xy[:, 1], s=8, color="tab:blue", label="image", zorder=2)
    axis.scatter(text_xy[:, 0], text_xy[:, 1], s=8, color="tab:orange", label="text", zorder=2)
    axis.set_title(f"{label} - (gap: {gap:.2f})" if label else f"gap: {gap:.2f}")
    axis.set_xlabel("PC 1")
    axis.set_ylabel("PC 2")
    axis.legend(loc="best")
    return _save(figure, FigureCanvasAgg, output_path, dpi)
