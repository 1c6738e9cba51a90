"""Gathering per-sample tensors across processes, with or without gradients.

Every gap term in gapclip is written as single-process code over the *global* batch: the model gathers the
embeddings (and the local features and extras the terms need) from all processes first. With
``gather_with_grad=True`` the gather is differentiable and its backward sums the incoming gradients over all
processes; since every process then computes the identical global loss, each process' local gradient is
``world_size`` times the single-process gradient of its own samples, and the data-parallel gradient averaging
(DDP / accelerate) divides that back, so a 2-process run reproduces the 1-process run on the concatenated batch
exactly. This is open_clip's ``gather_with_grad`` mode without ``local_loss``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers.utils import logging

logger = logging.get_logger(__name__)


def distributed_info() -> tuple[int, int]:
    """Return ``(rank, world_size)``, read at call time; ``(0, 1)`` when no process group is running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_sizes(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """All processes' shapes as a ``[world_size, ndim]`` tensor, so uneven batches/lengths can be padded."""
    shape = torch.tensor(tensor.shape, dtype=torch.long, device=tensor.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape)
    return torch.stack(shapes)


def _pad_to(tensor: torch.Tensor, shape: list[int], pad_value: float) -> torch.Tensor:
    if list(tensor.shape) == shape:
        return tensor
    out = tensor.new_full(shape, pad_value)
    out[tuple(slice(0, n) for n in tensor.shape)] = tensor
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate a tensor from all processes along dim 0; backward sums the gradients over processes."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, pad_value: float) -> torch.Tensor:
        rank, world_size = distributed_info()
        shapes = _gather_sizes(tensor, world_size)
        max_shape = shapes.max(dim=0).values.tolist()
        buffers = [tensor.new_empty(max_shape) for _ in range(world_size)]
        dist.all_gather(buffers, _pad_to(tensor.contiguous(), max_shape, pad_value).contiguous())
        # Trailing dims are padded to the common maximum, the batch dim is trimmed back per process.
        pieces = [piece[: shape[0]] for piece, shape in zip(buffers, shapes.tolist())]
        ctx.rank = rank
        ctx.batch_sizes = shapes[:, 0].tolist()
        ctx.local_shape = list(tensor.shape)
        return torch.cat(pieces, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.batch_sizes[: ctx.rank])
        local = grad[start : start + ctx.batch_sizes[ctx.rank]]
        local = local[tuple(slice(0, n) for n in ctx.local_shape)]
        return local, None


def gather_features(tensor: torch.Tensor, *, gather_with_grad: bool = True, pad_value: float = 0.0) -> torch.Tensor:
    """Concatenate ``tensor`` (batch first) from every process, in rank order.

    Batch sizes may differ between processes (the last batch of an epoch); trailing dimensions (e.g. token
    lengths) are padded to the largest one with ``pad_value``.

    Args:
        tensor: ``[B_local, ...]`` per-process tensor.
        gather_with_grad: differentiable gather (backward sums gradients over processes). Without it, the
            other processes' rows are constants and only the local rows carry gradient (open_clip's
            ``gather_with_grad=False``).
        pad_value: fill for padded trailing positions (use ``0``/``False`` for masks).

    Returns:
        ``[sum(B), ...]``; the input itself on a single process.
    """
    rank, world_size = distributed_info()
    if world_size == 1:
        return tensor
    if tensor.dtype == torch.bool:  # gloo cannot all_gather bool tensors
        return gather_features(tensor.to(torch.uint8), gather_with_grad=False, pad_value=int(pad_value)).bool()
    if gather_with_grad and tensor.requires_grad:
        return _AllGatherWithGrad.apply(tensor, pad_value)
    shapes = _gather_sizes(tensor, world_size)
    max_shape = shapes.max(dim=0).values.tolist()
    buffers = [tensor.new_empty(max_shape) for _ in range(world_size)]
    dist.all_gather(buffers, _pad_to(tensor.detach().contiguous(), max_shape, pad_value).contiguous())
    pieces = [piece[: shape[0]] for piece, shape in zip(buffers, shapes.tolist())]
    # Put the local tensor back so that its gradient survives the gather.
    local = tensor
    if list(tensor.shape[1:]) != max_shape[1:]:
        local = torch.nn.functional.pad(
            tensor, [p for n, m in reversed(list(zip(tensor.shape[1:], max_shape[1:]))) for p in (0, m - n)],
            value=pad_value,
        )
    pieces[rank] = local
    return torch.cat(pieces, dim=0)
