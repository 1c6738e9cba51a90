"""Input checks and preparation shared by the evaluation modules: clear errors naming the argument at fault."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def check_embeds(name: str, embeds: Any) -> torch.Tensor:
    if not isinstance(embeds, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(embeds).__name__}.")
    if embeds.dim() != 2:
        raise ValueError(f"`{name}` must be 2-D [num_items, dim], got shape {tuple(embeds.shape)}.")
    if embeds.shape[0] == 0 or embeds.shape[1] == 0:
        raise ValueError(f"`{name}` is empty (shape {tuple(embeds.shape)}); at least one item of dim >= 1 is needed.")
    if not embeds.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor, got dtype {embeds.dtype}.")
    return embeds


def check_same_dim(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"Embedding dims differ: `{a_name}` has dim {a.shape[1]} but `{b_name}` has dim {b.shape[1]}."
        )


def check_index(name: str, index: Any, length: int, upper: int, upper_name: str) -> torch.Tensor:
    """Validate a 1-D integer index tensor of ``length`` entries in ``[0, upper)``."""
    if not isinstance(index, torch.Tensor):
        index = torch.as_tensor(index)
    if index.dim() != 1:
        raise ValueError(f"`{name}` must be 1-D, got shape {tuple(index.shape)}.")
    if index.dtype in (torch.bool,) or index.is_floating_point() or index.is_complex():
        raise ValueError(f"`{name}` must be an integer tensor, got dtype {index.dtype}.")
    if index.shape[0] != length:
        raise ValueError(f"`{name}` has {index.shape[0]} entries but {length} are expected (one per row).")
    if length > 0:
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= upper:
            raise ValueError(
                f"`{name}` values must lie in [0, {upper}) ({upper_name}), got values in [{low}, {high}]."
            )
    return index.long()


def check_chunk_size(chunk_size: Any) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive int, got {chunk_size!r}.")
    return chunk_size


def check_ks(ks: Any) -> tuple[int, ...]:
    try:
        values = tuple(ks)
    except TypeError:
        raise ValueError(f"`ks` must be a sequence of positive ints, got {ks!r}.") from None
    if not values or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in values):
        raise ValueError(f"`ks` must be a non-empty sequence of positive ints, got {ks!r}.")
    return tuple(dict.fromkeys(values))  # de-duplicated, order kept


def prepare(embeds: torch.Tensor, normalize: bool, device: torch.device | None = None) -> torch.Tensor:
    """Detach, move, promote half precision to float32 (scores in fp16/bf16 tie too often) and optionally normalise."""
    embeds = embeds.detach()
    if device is not None:
        embeds = embeds.to(device)
    if embeds.dtype in (torch.float16, torch.bfloat16):
        embeds = embeds.float()
    return F.normalize(embeds, dim=-1) if normalize else embeds


def check_label_tensor(name: str, labels: Any, length: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != length:
        raise ValueError(
            f"`{name}` must be 1-D with {length} entries (one per item), got shape {tuple(labels.shape)}."
        )
    return labels
