"""Embedding a caption dataset (all images, all captions) for retrieval evaluation, sharded over processes."""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers.utils import logging

from .data.collator import ImageCollator, TextCollator
from .data.pairs import decode_image
from .evaluation.evaluators import EmbeddedCaptions, EvaluationContext, RetrievalEvaluator

logger = logging.get_logger(__name__)


class _Images(torch.utils.data.Dataset):
    def __init__(self, dataset: Dataset):
        from datasets import Image

        self.dataset = dataset.select_columns(["image_id", "image"]).cast_column("image", Image(decode=False))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, row: int):
        record = self.dataset[row]
        return decode_image(record["image"], image_id=str(record["image_id"]), row=row)


class _Texts(torch.utils.data.Dataset):
    def __init__(self, texts: list[str]):
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> str:
        return self.texts[index]


def _embed(loader, encode, accelerator, desc: str, disable: bool) -> torch.Tensor:
    chunks = []
    for batch in tqdm(loader, desc=desc, disable=disable):
        with torch.no_grad():
            embeds = torch.nn.functional.normalize(encode(batch).float(), dim=-1)
        chunks.append(accelerator.gather_for_metrics(embeds) if accelerator is not None else embeds)
    return torch.cat(chunks).cpu()


def embed_caption_dataset(
    model: Any,
    dataset: Dataset,
    processor: Any,
    *,
    batch_size: int = 64,
    accelerator: Any = None,
    max_length: int | None = None,
    padding: str = "longest",
    num_workers: int = 0,
    show_progress: bool = True,
) -> EmbeddedCaptions:
    """Embed every image and every caption of a caption dataset (columns ``image_id``, ``image``, ``captions``).

    With an ``accelerate.Accelerator`` the work is split between processes and gathered back (every process gets
    the full embeddings); without one, everything runs here.
    """
    texts, text_to_image = [], []
    for row, captions in enumerate(dataset["captions"]):
        texts.extend(captions)
        text_to_image.extend([row] * len(captions))
    device = next(model.parameters()).device
    image_loader = torch.utils.data.DataLoader(
        _Images(dataset), batch_size=batch_size, collate_fn=ImageCollator(processor), num_workers=num_workers
    )
    text_loader = torch.utils.data.DataLoader(
        _Texts(texts), batch_size=batch_size, num_workers=num_workers,
        collate_fn=TextCollator(processor, max_length=max_length, padding=padding),
    )
    if accelerator is not None:
        image_loader, text_loader = accelerator.prepare(image_loader, text_loader)
    disable = not show_progress or (accelerator is not None and not accelerator.is_local_main_process)

    def encode_images(batch):
        return model.get_image_features(pixel_values=batch["pixel_values"].to(device))

    def encode_texts(batch):
        mask = batch.get("attention_mask")
        return model.get_text_features(batch["input_ids"].to(device), None if mask is None else mask.to(device))

    was_training = model.training
    model.eval()
    try:
        image_embeds = _embed(image_loader, encode_images, accelerator, "Embedding images", disable)
        text_embeds = _embed(text_loader, encode_texts, accelerator, "Embedding captions", disable)
    finally:
        model.train(was_training)
    return EmbeddedCaptions(image_embeds, text_embeds, torch.tensor(text_to_image, dtype=torch.long))


def embed_images(
    model: Any, dataset: Dataset, processor: Any, *, batch_size: int = 64, show_progress: bool = True
) -> torch.Tensor:
    """Normalised image embeddings ``[N, D]`` of every row of a caption dataset, in row order (this process)."""
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(_Images(dataset), batch_size=batch_size, collate_fn=ImageCollator(processor))
    was_training = model.training
    model.eval()
    try:
        return _embed(
            loader, lambda batch: model.get_image_features(pixel_values=batch["pixel_values"].to(device)), None,
            "Embedding images", not show_progress,
        )
    finally:
        model.train(was_training)


def retrieval_report(
    embedded: EmbeddedCaptions, *, chunk_size: int = 1024, gap_pairs: int = 1000, coco_1k: bool = False
) -> dict[str, float]:
    """R@1/5/10 both ways, RSUM, ranks and the modality gap (optionally COCO 1K fold means, prefixed ``1k_``): the
    :class:`~gapclip.evaluation.RetrievalEvaluator` on embeddings alone."""
    context = EvaluationContext(model=None, processor=None, dataset=None, embedded=embedded, chunk_size=chunk_size)
    return RetrievalEvaluator(gap_pairs=gap_pairs, coco_1k=coco_1k)(context)
