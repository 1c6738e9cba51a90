"""Gradient caching (GradCache): the exact gradient of a large batch in the activation memory of a chunk.

A contrastive objective couples every row of the batch with every other, so a batch cannot be cut into independent
micro-batches (gradient accumulation would train with fewer negatives). But the objective reads the encoders only
through the per-row *encodings* ``e_i`` (normalised embeddings, projected local features, the terms' encoded inputs
such as GST's translation embeddings), so ``dL/dθ = Σ_i ⟨∂L/∂e_i, ∂e_i/∂θ⟩ + ∂L/∂θ|_e`` (the last part for the
parameters the objective uses itself: the logit scale, a term's β, projectors, temperatures). GradCache:

1. embeds the batch in chunks of ``chunk_size`` rows without building a graph, saving each chunk's random state;
   the last chunk keeps its graph;
2. computes the objective on the encodings (as leaf tensors) and its gradients with respect to them and to the
   parameters the objective uses directly;
3. in ``backward``: back-propagates the cached ``∂L/∂e_i`` of the last chunk's rows through its kept graph, then
   re-embeds every other chunk with its graph, replaying the chunk's random state (the same dropout masks, LoRA
   dropout included), and back-propagates its rows' ``∂L/∂e_i``, one chunk's activations at a time; the objective's
   own parameter gradients are added, and the gradients averaged over processes when asked.

Peak memory: one chunk's activations + the batch's encodings + the objective; time: one more forward pass of the
encoders for every chunk but the last (none for a batch of one chunk: caching it would save nothing). Where every
loss computes the share of any block of rows alone (``row_block_shares``: InfoNCE, sigmoid, triplet without
distance-weighted sampling, GST, dense L_inter/L_intra), step 2 too goes a block of query rows at a time
(:func:`objective_and_gradients`), so the objective holds ``rows × B`` matrices of at most
``max(chunk × B, OBJECTIVE_BLOCK_ELEMENTS)`` elements, not ``B × B``, and the peak stays flat in the batch size up
to the ``B × D`` encodings. The gradient equals the uncached step's (up to float rounding); dropout draws its masks
chunk by chunk, which is the same distribution, not the same numbers, as one pass over the whole batch.

References: Gao, Zhang, Han, Callan, *Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup*,
RepL4NLP 2021 (arXiv:2101.06983); sentence-transformers' ``CachedMultipleNegativesRankingLoss`` (the same scheme,
with the re-runs in a backward hook of the returned loss, so the stock ``Trainer`` backward drives them).

Multi-process: the re-runs call the unwrapped model, never DDP's ``forward`` (the objective's own parameters are not
in the re-run graph, which DDP would count as unused), so nothing is reduced by DDP; :func:`average_gradients` does
its work once the last chunk is back-propagated, when ``sync_gradients()`` says this micro-batch ends an optimizer
step (``GapClipTrainer`` passes ``accelerator.sync_gradients``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.checkpoint import get_device_states, set_device_states
from transformers.utils import logging

from .distributed import average_gradients, distributed_info, global_values

logger = logging.get_logger(__name__)

#: The per-row model inputs a chunk takes (the rest of a collated batch is read by the objective only).
ROW_INPUTS = ("input_ids", "attention_mask", "word_mask", "pixel_values")
#: The fields of a chunk's encoding (``GapClipOutput``) the objective reads, as ``loss_from_encodings`` arguments.
ENCODING_FIELDS = ("image_embeds", "text_embeds", "patch_embeds", "patch_mask", "token_embeds", "token_mask",
                   "term_extras")

#: The elements of a ``rows × B`` matrix of the blockwise objective (2**18: 1 MiB in float32) below which a block takes
#: more query rows than a chunk: every block is an autograd call of its own, so fewer, larger blocks are faster
#: (16 blocks of 64 rows took twice the whole objective's time at B = 1024 on CPU), and the bound stays a constant.
OBJECTIVE_BLOCK_ELEMENTS = 1 << 18

Path = tuple[str, ...]


class RandomState:
    """The CPU and device random states at construction; :meth:`replay` runs a block from them again and then
    restores the states it found (so replaying does not move the random stream)."""

    def __init__(self, *tensors: torch.Tensor):
        self.cpu_state = torch.get_rng_state()
        self.devices, self.device_states = get_device_states(*tensors)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu_state)
            set_device_states(self.devices, self.device_states)
            yield


def gradient_cached_forward(
    model: Any,
    inputs: Mapping[str, Any],
    chunk_size: int,
    *,
    sync_gradients: Callable[[], bool] | None = None,
    block_elements: int = OBJECTIVE_BLOCK_ELEMENTS,
) -> Any:
    """The model's training output for ``inputs`` (a collated batch), with the encoders run ``chunk_size`` rows at a
    time: ``loss`` is a leaf whose ``backward`` re-runs the chunks and fills the gradients of every parameter.

    Args:
        model: the (unwrapped) :class:`~gapclip.GapClipModel`.
        inputs: what ``model(**inputs)`` would take: ``input_ids``, ``attention_mask``, ``pixel_values``, optional
            ``word_mask``, ``image_index`` and ``term_inputs``.
        chunk_size: rows embedded at once (``>= 1``); memory holds one chunk's activations.
        sync_gradients: called at the end of ``backward``; when it returns True, every gradient is averaged over
            processes (what DDP would have done). ``None``: never (one process, or the caller averages).
        block_elements: the size of the objective's blocks (see :func:`objective_block_rows`); 0: a chunk's rows.

    Returns:
        A :class:`~gapclip.modeling.GapClipOutput` with ``loss`` (call ``backward`` on it, or on anything computed
        from it, exactly once), detached ``loss_terms`` and the batch's detached encodings.

    Example::

        >>> outputs = gradient_cached_forward(model, batch, chunk_size=64)
        >>> outputs.loss.backward()  # re-embeds the chunks; model's .grad now holds the full batch's gradient
    """
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"gradient_cache_chunk_size must be an integer >= 1, got {chunk_size!r}.")
    chunks = split_inputs(inputs, chunk_size, not_per_row=model.unshared_extras)
    with_local = model.needs_local_features
    device_type = inputs["pixel_values"].device.type
    autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))

    # 1. Encodings, chunk by chunk, without a graph; each chunk's random state is kept for its re-run. The last chunk
    #    keeps its graph instead: it is back-propagated first in step 3, so memory still holds one chunk's graph at a
    #    time, and it needs no second forward pass (a batch of one chunk needs none at all).
    states, encodings = [], []
    with torch.no_grad():
        for chunk in chunks[:-1]:
            states.append(RandomState(chunk["pixel_values"], chunk["input_ids"]))
            encodings.append(_encode(model, chunk, with_local))
    kept = _encode(model, chunks[-1], with_local)
    encodings.append(_detached(kept))
    merged = _merge(encodings, model.unshared_extras)

    # 2. The objective on leaf copies of the encodings, and its gradients (nothing accumulated into .grad yet).
    leaves = {path: tensor.detach().requires_grad_() for path, tensor in _float_tensors(merged)}
    leaf_encodings = _replace(merged, leaves)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    with torch.enable_grad():
        loss, loss_terms, grads = objective_and_gradients(
            model, {field: leaf_encodings[field] for field in ENCODING_FIELDS}, inputs.get("image_index"),
            [*leaves.values(), *parameters], block_size=chunk_size, block_elements=block_elements,
        )
    outputs = _output(merged, loss, loss_terms)
    if grads is None:
        return outputs
    cached = dict(zip(leaves, grads[: len(leaves)]))

    # 3. The returned loss: backward re-embeds every chunk and back-propagates its rows' cached gradients.
    replay = _ChunkReplay(
        model, chunks, states, with_local, cached, list(zip(parameters, grads[len(leaves) :])), autocast,
        device_type, model.unshared_extras, sync_gradients, kept=kept,
    )
    outputs.loss = loss.detach().requires_grad_()
    outputs.loss.register_hook(replay)
    return outputs


def objective_and_gradients(
    model: Any, encodings: Mapping[str, Any], image_index: torch.Tensor | None, wrt: list[torch.Tensor], *,
    block_size: int, block_elements: int = OBJECTIVE_BLOCK_ELEMENTS,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple[torch.Tensor | None, ...] | None]:
    """The objective of encoded rows (``loss_from_encodings``' arguments) and its gradients with respect to ``wrt``
    (``None`` when nothing in it needs one).

    When the base loss and every gap term compute the share of any block of rows from the gathered batch alone
    (``GapClipModel.computes_row_blocks``), the objective is computed ``objective_block_rows(B, block_size,
    block_elements)`` query rows at a time: each block's share (its rows against the whole batch, divided by the whole
    batch's normaliser; see ``GapBatch``) is differentiated and freed before the next, so the objective holds
    ``rows × B`` matrices instead of ``B × B``. The shares add up to the objective, so the value and the gradients
    are the whole objective's (up to float rounding). Otherwise (LSC, L_dim, CUSA, the sparse DIAS mask,
    distance-weighted triplets: they gather or sum across the batch, or draw per call) the whole objective is
    computed at once.
    """
    batch = model.global_batch(**encodings, image_index=image_index)
    query_rows = range(batch.rows.start, batch.rows.stop)
    # Decided on the global batch size, the same on every process: all of them take the same collectives.
    rows = objective_block_rows(batch.batch_size, block_size, block_elements)
    if not model.computes_row_blocks or rows >= batch.batch_size:
        loss, loss_terms = model.compute_loss(batch)
        if not loss.requires_grad:
            return loss, loss_terms, None
        return loss, loss_terms, torch.autograd.grad(loss, wrt, allow_unused=True)

    # The gathered batch's tensors as leaves: the blocks' gradients collect on them, and go back through the gather
    # (and the logit scale's exp) once, after the last block.
    fields = {field.name: getattr(batch, field.name) for field in dataclasses.fields(batch)}
    gathered = {path: tensor for path, tensor in _float_tensors(fields) if tensor.requires_grad}
    batch_leaves = {path: tensor.detach().requires_grad_() for path, tensor in gathered.items()}
    leaf_batch = type(batch)(**_replace(fields, batch_leaves))
    # Each block is differentiated with respect to the batch's leaves and the losses' own parameters only (the
    # objective reads nothing else; asking for every model parameter at every block costs more than the block).
    position = {id(tensor): index for index, tensor in enumerate(wrt)}
    own = [parameter for loss in (model.base_loss, *model.gap_terms.values()) for parameter in loss.parameters()
           if id(parameter) in position]
    targets = [*batch_leaves.values(), *own]
    sums: dict[str, torch.Tensor] = {}
    totals: list[torch.Tensor | None] = [None] * len(targets)
    for start in query_rows[::rows]:
        block = dataclasses.replace(leaf_batch, local_rows=slice(start, min(start + rows, query_rows.stop)))
        shares = model.loss_shares(block)
        for name, share in shares.items():
            sums[name] = share.detach() if name not in sums else sums[name] + share.detach()
        total = model.weighted_total(shares)
        if total.requires_grad:
            block_grads = torch.autograd.grad(total, targets, allow_unused=True)
            totals = [_add(old, new) for old, new in zip(totals, block_grads)]
    world_size = distributed_info()[1]
    if batch.is_local and world_size > 1:
        # The local form: the shares of every process add up to the objective (one all-reduce of the values); the
        # gradient is world_size × this process' share's, which the processes' gradient average turns into the
        # objective's (see gapclip.distributed).
        sums = global_values(sums)
        totals = [None if grad is None else world_size * grad for grad in totals]
    loss_terms = sums
    loss = model.weighted_total(loss_terms)
    if all(grad is None for grad in totals):
        return loss, loss_terms, None
    batch_grads, own_grads = totals[: len(batch_leaves)], totals[len(batch_leaves) :]
    wrt_grads: list[torch.Tensor | None] = [None] * len(wrt)
    for parameter, grad in zip(own, own_grads):
        wrt_grads[position[id(parameter)]] = grad
    reached = [(tensor, grad) for tensor, grad in zip(gathered.values(), batch_grads) if grad is not None]
    if reached:
        through = torch.autograd.grad(
            [tensor for tensor, _ in reached], wrt, [grad for _, grad in reached], allow_unused=True
        )
        wrt_grads = [_add(old, new) for old, new in zip(wrt_grads, through)]
    return loss, loss_terms, tuple(wrt_grads)


def _add(total: torch.Tensor | None, grad: torch.Tensor | None) -> torch.Tensor | None:
    if grad is None:
        return total
    return grad if total is None else total + grad


class _ChunkReplay:
    """The backward hook of a gradient-cached loss (see :func:`gradient_cached_forward`, step 3)."""

    def __init__(self, model, chunks, states, with_local, cached, parameter_grads, autocast, device_type, not_per_row,
                 sync_gradients, kept):
        self.model, self.chunks, self.states, self.with_local = model, chunks, states, with_local
        self.kept = kept  # the last chunk's encoding, with its graph (nothing to re-run)
        self.cached, self.parameter_grads, self.not_per_row = cached, parameter_grads, not_per_row
        self.autocast, self.device_type, self.sync_gradients = autocast, device_type, sync_gradients

    def __call__(self, grad_output: torch.Tensor) -> None:
        enabled, dtype = self.autocast
        starts = [0]
        for chunk in self.chunks[:-1]:
            starts.append(starts[-1] + chunk["input_ids"].shape[0])
        last = len(self.chunks) - 1
        # The kept last chunk first: its graph is freed before any other chunk's is built.
        for index in (last, *range(last)):
            chunk = self.chunks[index]
            if index == last:
                encoding, self.kept = self.kept, None
            else:
                with torch.enable_grad(), self.states[index].replay(), torch.autocast(
                    self.device_type, dtype=dtype, enabled=enabled
                ):
                    encoding = _encode(self.model, chunk, self.with_local)
            tensors, grads = [], []
            for path, tensor in _float_tensors(encoding):
                grad = self.cached.get(path)
                if grad is None or not tensor.requires_grad:
                    continue
                if _is_per_row(path, self.not_per_row):
                    grad = grad[starts[index] : starts[index] + chunk["input_ids"].shape[0]]
                elif index > 0:  # one value for the whole batch: the objective read chunk 0's, back-propagated once
                    continue
                tensors.append(tensor)
                grads.append((grad * grad_output).to(tensor.dtype))
            if tensors:
                torch.autograd.backward(tensors, grads)
        for parameter, grad in self.parameter_grads:
            if grad is None:
                continue
            grad = (grad * grad_output).to(parameter.dtype)
            parameter.grad = grad if parameter.grad is None else parameter.grad + grad
        if self.sync_gradients is not None and self.sync_gradients():
            average_gradients(self.model.parameters())


def objective_block_rows(batch_size: int, block_size: int, block_elements: int = OBJECTIVE_BLOCK_ELEMENTS) -> int:
    """Query rows per block of the blockwise objective for a global batch of ``batch_size``: ``block_size`` (the
    chunk), or more while a ``rows × batch_size`` matrix stays within ``block_elements``; ``>= batch_size``: one block.

    Example::

        >>> objective_block_rows(1024, 64), objective_block_rows(4096, 64), objective_block_rows(256, 64)
        (256, 64, 1024)
    """
    return max(block_size, block_elements // batch_size)


def split_inputs(inputs: Mapping[str, Any], chunk_size: int, *, not_per_row: set[str] = frozenset()) -> list[dict]:
    """The per-row model inputs of ``inputs`` cut into chunks of ``chunk_size`` rows (the last may be shorter).

    ``term_inputs`` entries named in ``not_per_row`` (declared ``TermInput(gather=False)``) go whole to every chunk.
    """
    batch_size = inputs["input_ids"].shape[0]
    term_inputs = inputs.get("term_inputs") or {}
    chunks = []
    for start in range(0, batch_size, chunk_size):
        stop = min(start + chunk_size, batch_size)
        chunk = {key: inputs[key][start:stop] for key in ROW_INPUTS if inputs.get(key) is not None}
        chunk["term_inputs"] = {
            name: value if name in not_per_row else _rows(value, start, stop) for name, value in term_inputs.items()
        }
        chunks.append(chunk)
    return chunks


def _rows(value: Any, start: int, stop: int) -> Any:
    if isinstance(value, Mapping):
        return {key: _rows(item, start, stop) for key, item in value.items()}
    return value[start:stop] if isinstance(value, torch.Tensor) else value


def _encode(model: Any, chunk: Mapping[str, Any], with_local: bool) -> dict[str, Any]:
    outputs = model(**chunk, return_loss=False, return_local=with_local, return_term_extras=True)
    return {field: getattr(outputs, field) for field in ENCODING_FIELDS}


def _merge(encodings: list[dict[str, Any]], not_per_row: set[str]) -> dict[str, Any]:
    """The chunks' encodings as one batch: per-row tensors concatenated, anything else taken from chunk 0."""

    def merge(values: list[Any], path: Path) -> Any:
        first = values[0]
        if isinstance(first, Mapping):
            return {key: merge([value[key] for value in values], (*path, key)) for key in first}
        if isinstance(first, torch.Tensor) and _is_per_row(path, not_per_row):
            return torch.cat(values, dim=0)
        return first

    return {field: merge([encoding[field] for encoding in encodings], (field,)) for field in ENCODING_FIELDS}


def _detached(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _detached(item) for key, item in value.items()}
    return value.detach() if isinstance(value, torch.Tensor) else value


def _is_per_row(path: Path, not_per_row: set[str]) -> bool:
    return not (len(path) > 1 and path[0] == "term_extras" and path[1] in not_per_row)


def _float_tensors(value: Any, path: Path = ()) -> Iterator[tuple[Path, torch.Tensor]]:
    """Every floating-point tensor of a nested mapping, with its key path, in a fixed order."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _float_tensors(item, (*path, key))
    elif isinstance(value, torch.Tensor) and value.is_floating_point():
        yield path, value


def _replace(value: Any, leaves: Mapping[Path, torch.Tensor], path: Path = ()) -> Any:
    if isinstance(value, Mapping):
        return {key: _replace(item, leaves, (*path, key)) for key, item in value.items()}
    return leaves.get(path, value)


def _output(merged: Mapping[str, Any], loss: torch.Tensor, loss_terms: Mapping[str, torch.Tensor]):
    """The batch's output; no ``logits_per_image`` (a ``b × b`` matrix is what caching avoids holding)."""
    from .modeling import GapClipOutput

    return GapClipOutput(
        loss=loss.detach(), loss_terms={name: value.detach() for name, value in loss_terms.items()},
        **{field: merged[field] for field in ENCODING_FIELDS},
    )


__all__ = ["RandomState", "gradient_cached_forward", "objective_and_gradients", "split_inputs"]
