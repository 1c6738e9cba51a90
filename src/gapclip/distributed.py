"""Gathering per-sample tensors across processes, with or without gradients, and the local-loss collectives.

Every gap term in gapclip is written over the *global* batch: the model gathers the embeddings (and the extras the
terms need) from all processes first. With ``gather_with_grad=True`` the gather is differentiable and its backward
sums the incoming gradients over all processes.

**Global loss** (``GapClipConfig.local_loss=False``, open_clip's ``gather_with_grad`` without ``local_loss``): every
process computes the identical global loss ``L``, so the summed backward hands each process ``W·∂L/∂e_i`` for its
own rows ``i`` (``W`` = world size), i.e. ``W`` times the single-process gradient of its samples, and the
data-parallel averaging (DDP / accelerate divide the summed gradients by ``W``) brings it back: a 2-process run
reproduces the 1-process run on the concatenated batch exactly. This is the factor open_clip#616 observes.

**Local loss** (``local_loss=True``): process ``r`` computes only the rows of the objective that belong to its own
samples, its *share* ``L_r`` with ``Σ_r L_r = L`` (each term divides by the *global* batch size, not the local one).
Now the summed backward of the gather adds *different* partial gradients, ``Σ_r ∂L_r/∂e_i = ∂L/∂e_i``, with no
factor ``W``; a parameter used outside the gather (the logit scale, a term's β) gets ``∂L_r/∂θ`` on process ``r``.
After DDP's division by ``W`` both would be ``W`` times too small, so each process back-propagates ``W·L_r``: the
gather then delivers ``W·∂L/∂e_i``, a direct parameter ``W·∂L_r/∂θ``, and the average over processes is exactly
``∂L/∂θ``. open_clip's local mean over the ``b`` local rows is the same ``W·L_r`` when every process has ``B/W``
rows; dividing by the global ``B`` keeps it exact for uneven batches (the last batch of an epoch) too.
(:func:`global_values` does the scaling for :meth:`gapclip.GapClipModel.compute_loss` and the gradient cache's
blockwise objective, and reports the global value of every term with one :func:`all_reduce_sum` of the detached
shares.)
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from transformers.utils import logging

logger = logging.get_logger(__name__)


def distributed_info() -> tuple[int, int]:
    """Return ``(rank, world_size)``, read at call time; ``(0, 1)`` when no process group is running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def end_process_group() -> None:
    """Wait for every process, then destroy the default process group; call it once a run has finished on all ranks.

    Why: a gloo run-loop thread frees each finished collective a moment after the caller has moved on, under the
    group's work lock, and freeing a tensor that Python also knows needs the GIL. When the group itself is torn down
    in that moment (at interpreter shutdown: SIGABRT, ``terminate called without an active exception``,
    pytorch#190489; or when the last reference to a DDP model goes, with the GIL held: a deadlock), a finished run
    fails or hangs. So: a barrier (every collective before it has finished), a pause that hands the GIL to the
    run-loop threads, and a second barrier, which cannot even be queued while one of them still holds the work lock;
    after it no finished collective is left to free. Not for a process that failed: the others would wait at the
    barrier for it.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        time.sleep(0.1)
        dist.barrier()
        dist.destroy_process_group()


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


def local_row_range(batch_size: int, device: torch.device | str | None = None) -> slice:
    """The rows of this process' samples inside the gathered batch (processes in rank order, sizes may differ)."""
    rank, world_size = distributed_info()
    if world_size == 1:
        return slice(0, batch_size)
    sizes = _gather_sizes(torch.zeros(batch_size, device=device), world_size)[:, 0].tolist()
    start = sum(sizes[:rank])
    return slice(start, start + batch_size)


class _AllReduceWithGrad(torch.autograd.Function):
    """Sum a tensor over processes; the gradient of every process' input is the sum of all processes' gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.detach().clone().contiguous()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone().contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """``Σ_processes tensor``, differentiable (each process' input receives the summed gradient); the input itself on
    one process. For statistics of the global batch made of per-process partial sums (DIAS's ``L_dim``)."""
    if distributed_info()[1] == 1:
        return tensor
    if not tensor.requires_grad:
        return all_reduce_sum(tensor)
    return _AllReduceWithGrad.apply(tensor)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``Σ_processes tensor`` without gradient (a new tensor; the input itself on one process)."""
    if distributed_info()[1] == 1:
        return tensor
    total = tensor.detach().clone().contiguous()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def global_values(shares: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Local form: each share becomes a value equal to the sum of the shares over processes, whose gradient is that
    of ``world_size × share`` (one all-reduce, no host sync)."""
    world_size = distributed_info()[1]
    if world_size == 1:
        return shares
    dtype = torch.promote_types(torch.float32, next(iter(shares.values())).dtype)
    for value in shares.values():
        dtype = torch.promote_types(dtype, value.dtype)
    totals = all_reduce_sum(torch.stack([value.detach().to(dtype) for value in shares.values()]))
    values = {}
    for (name, share), total in zip(shares.items(), totals):
        scaled = world_size * share
        values[name] = scaled + (total.to(share.dtype) - scaled.detach())
    return values


def average_gradients(parameters) -> None:
    """Replace every ``.grad`` by its mean over processes, what DDP's reducer does after ``backward``.

    For a backward that did not go through DDP's forward (gradient caching re-runs the unwrapped model, see
    :mod:`gapclip.gradient_cache`). Gradients are flattened into one buffer per dtype and device, so a model costs a
    few collectives, not one per parameter. Every process must hold gradients for the same parameters (they run the
    same graph); parameters without a gradient are left without one.
    """
    _, world_size = distributed_info()
    if world_size == 1:
        return
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for parameter in parameters:
        if parameter.grad is not None:
            buckets.setdefault((parameter.grad.dtype, parameter.grad.device), []).append(parameter.grad)
    for grads in buckets.values():
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world_size
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()
