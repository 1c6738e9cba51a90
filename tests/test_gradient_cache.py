"""Gradient caching (``gapclip.gradient_cache``, ``--gradient_cache_chunk_size``): the gradients of the uncached step
for every base loss and gap term, dropout replayed per chunk (LoRA's too), the Trainer under gradient accumulation,
and the argument checks. The 2-process runs are in ``tests/multiprocess/test_gradient_cache_two_process.py``."""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import ClassVar

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gapclip import GapClipConfig, GapClipModel
from gapclip.cli import GapClipTrainingArguments
from gapclip.gradient_cache import (
    OBJECTIVE_BLOCK_ELEMENTS,
    RandomState,
    gradient_cached_forward,
    objective_and_gradients,
    objective_block_rows,
    split_inputs,
)
from gapclip.losses import TERM_REGISTRY, GapBatch, GapTerm, TermInput, register_term
from gapclip.testing import tiny_clip_config
from tests.multiprocess.test_custom_term_two_process import unregister  # noqa: F401  (fixture)
from tests.multiprocess.two_process_step import make_batch, make_model

#: Every base loss and gap term (options that change the computation path included).
SPECS = {
    "infonce": {"gap_terms": []},
    "sigmoid": {"backbone": "siglip", "gap_terms": []},
    "triplet-hardest": {"base_loss": "triplet", "gap_terms": []},
    "triplet-sum": {"base_loss": "triplet", "triplet_mining": "sum", "triplet_reduction": "sum", "gap_terms": []},
    "triplet-distance-weighted": {"base_loss": "triplet", "triplet_mining": "distance_weighted", "gap_terms": []},
    **{f"lsc-{f}": {"gap_terms": [{"name": "lsc", "options": {"fusion": f}}]} for f in ("concat", "max", "mean")},
    **{f"gst-{d}": {"gap_terms": [{"name": "gst", "options": {"distance": d}}]} for d in ("infonce", "kl", "l2")},
    "gst-skip": {"gap_terms": [{"name": "gst", "options": {"on_missing": "skip"}}], "missing_translation_rows": [2]},
    "csa+usa": {"gap_terms": [{"name": "csa", "weight": 0.1}, {"name": "usa", "weight": 0.5}]},
    "dias_dim-pair_mean": {"gap_terms": [{"name": "dias_dim", "options": {"aggregation": "pair_mean"}}]},
    "dias-all": {
        "base_loss": "triplet", "triplet_mining": "distance_weighted",
        "gap_terms": [{"name": "dias_dim", "weight": 10.0}, {"name": "dias_inter", "weight": 0.05},
                      {"name": "dias_intra", "weight": 0.1, "options": {"beta_init": -0.3}}],
    },
    "dias-dense": {
        "base_loss": "triplet",
        "gap_terms": [{"name": "dias_inter", "weight": 0.05, "options": {"sparse": False}},
                      {"name": "dias_intra", "weight": 0.1, "options": {"sparse": False}}],
    },
    "label_supcon": {"term_modules": ["examples/custom_term.py"], "gap_terms": [{"name": "label_supcon"}]},
}
#: The objectives whose every loss computes the share of any block of rows alone (``row_block_shares``): the cached
#: step computes them a chunk of rows at a time. The others (gathers, sums or draws across the batch) at once.
ROW_BLOCKS = {"infonce", "sigmoid", "triplet-hardest", "triplet-sum", "gst-infonce", "gst-kl", "gst-l2", "gst-skip",
              "dias-dense"}


def _step(model, batch, chunk_size=None, **kwargs):
    model.zero_grad(set_to_none=True)
    outputs = gradient_cached_forward(model, batch, chunk_size, **kwargs) if chunk_size else model(**batch,
                                                                                                   return_loss=True)
    outputs.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return outputs, grads


def _assert_same(got, ref, rtol=1e-5, atol=1e-6):
    (outputs, grads), (ref_outputs, ref_grads) = got, ref
    torch.testing.assert_close(outputs.loss, ref_outputs.loss.detach(), rtol=rtol, atol=atol)
    for name, value in ref_outputs.loss_terms.items():
        torch.testing.assert_close(outputs.loss_terms[name], value.detach(), rtol=rtol, atol=atol, msg=name)
    assert set(grads) == set(ref_grads)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("local_loss", [False, True], ids=["global", "local"])
def test_cached_step_has_the_uncached_gradients(name, local_loss, unregister):  # noqa: F811
    """Chunks of 3 rows (3, 3, 2) of the 8-row batch with its same-image rows: loss, terms and every gradient."""
    spec = {**SPECS[name], "local_loss": local_loss}
    reference = _step(make_model(spec), make_batch(spec))
    assert len(reference[1]) > 0
    _assert_same(_step(make_model(spec), make_batch(spec), chunk_size=3, block_elements=0), reference)


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("local_loss", [False, True], ids=["global", "local"])
def test_objective_is_computed_a_chunk_of_rows_at_a_time_where_every_loss_allows(
    name, local_loss, unregister  # noqa: F811
):
    """Chunks of 3, blocks of a chunk (``block_elements=0``): the objective's losses see the query rows 0–3, 3–6,
    6–8 in turn where every loss computes a block's share alone, else the whole batch once (the global form's
    ``None``, or all 8 rows in the local form). With the default block size (8 × 8 is far below it): once."""
    spec = {**SPECS[name], "local_loss": local_loss}
    model, seen = make_model(spec), []
    loss_shares = model.loss_shares

    def recording(batch):
        seen.append(batch.local_rows)
        return loss_shares(batch)

    model.loss_shares = recording
    gradient_cached_forward(model, make_batch(spec), 3, block_elements=0).loss.backward()
    whole = slice(0, 8) if local_loss else None
    assert model.computes_row_blocks == (name in ROW_BLOCKS)
    assert seen == ([slice(0, 3), slice(3, 6), slice(6, 8)] if name in ROW_BLOCKS else [whole])
    seen.clear()
    gradient_cached_forward(model, make_batch(spec), 3).loss.backward()
    assert seen == [whole]


@pytest.mark.parametrize("batch_size,chunk,elements,rows", [
    (1024, 64, 1 << 18, 256), (4096, 64, 1 << 18, 64), (8192, 64, 1 << 18, 64), (256, 64, 1 << 18, 1024),
    (96, 4, 0, 4), (96, 4, 96 * 10 + 5, 10),
])
def test_objective_blocks_take_more_rows_than_a_chunk_while_they_stay_small(batch_size, chunk, elements, rows):
    """Rows per block: never fewer than a chunk's, more while rows × B stays within the element bound (so that the
    bound, not the batch, sets the block's matrices); at least B rows is one block."""
    assert objective_block_rows(batch_size, chunk, elements) == rows
    assert rows * batch_size <= max(chunk * batch_size, elements)


class _LargestOutput(TorchDispatchMode):
    """The most elements any operator's output had while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("spec", [{"gap_terms": []}, {"base_loss": "triplet", "gap_terms": [
    {"name": "gst", "options": {"distance": "kl"}}, {"name": "dias_intra", "options": {"sparse": False}}]}],
    ids=["infonce", "triplet+gst+dias_intra-dense"])
def test_blockwise_objective_never_holds_a_batch_by_batch_matrix(spec):
    """B = 96 encoded rows of width D = 16, blocks of 4: no tensor of the objective or its gradients has B² (9216)
    elements, only blocks of 4 × B (and the B × D encodings); the whole objective's does."""
    model = make_model(spec)
    generator = torch.Generator().manual_seed(0)
    n, width = 96, model.backbone.config.projection_dim

    def unit():
        return torch.nn.functional.normalize(torch.randn(n, width, generator=generator, dtype=torch.float64), dim=-1)

    encodings = {"image_embeds": unit(), "text_embeds": unit(), "term_extras": {}}
    if "gst" in str(spec):
        encodings["term_extras"] = {"translation_embeds": unit(), "has_translation": torch.ones(n, dtype=torch.bool)}
    leaves = [encodings["image_embeds"].requires_grad_(), encodings["text_embeds"].requires_grad_()]
    largest, results = {}, {}
    # block_elements=0: blocks of 4 rows; the default bound makes 96 × 96 one block (the whole objective)
    for form, elements in (("blockwise", 0), ("whole", OBJECTIVE_BLOCK_ELEMENTS)):
        with _LargestOutput() as mode:
            results[form] = objective_and_gradients(
                model, encodings, None, leaves, block_size=4, block_elements=elements
            )
        largest[form] = mode.largest
    assert largest["blockwise"] <= max(n * width, 4 * n) < n * n
    assert largest["whole"] >= n * n
    (loss, _, grads), (reference_loss, _, reference_grads) = results["blockwise"], results["whole"]
    torch.testing.assert_close(loss, reference_loss)
    for got, expected in zip(grads, reference_grads):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("chunk_size,encodes", [(3, 5), (8, 1), (100, 1)])
def test_the_last_chunk_is_encoded_once(chunk_size, encodes, monkeypatch):
    """Chunks of 3 (rows 0-3, 3-6, 6-8): the first two are encoded without a graph and re-run in backward, the last
    keeps its graph and is back-propagated before any re-run builds another (5 passes, not 6); a batch that fits one
    chunk is encoded once. The gradients are the uncached ones all the same."""
    import gapclip.gradient_cache as gradient_cache

    spec = {"gap_terms": [{"name": "gst"}]}
    reference = _step(make_model(spec), make_batch(spec))
    events = []
    encode = gradient_cache._encode
    chunks = len(split_inputs(make_batch(spec), chunk_size))

    def recording_encode(model, chunk, with_local):
        encoding = encode(model, chunk, with_local)
        rows = chunk["input_ids"].shape[0]
        events.append(("graph" if torch.is_grad_enabled() else "no graph", rows))
        if torch.is_grad_enabled() and len(events) == chunks:  # the last chunk's first (kept) encoding
            encoding["image_embeds"].register_hook(lambda grad: events.append(("backward", rows)))
        return encoding

    monkeypatch.setattr(gradient_cache, "_encode", recording_encode)
    _assert_same(_step(make_model(spec), make_batch(spec), chunk_size=chunk_size), reference)
    encoded = [event for event in events if event[0] != "backward"]
    assert len(encoded) == encodes
    if chunk_size == 3:
        assert events == [("no graph", 3), ("no graph", 3), ("graph", 2), ("backward", 2), ("graph", 3), ("graph", 3)]
    else:
        assert events == [("graph", 8), ("backward", 8)]


@pytest.mark.parametrize("chunk_size", [1, 8, 100])
def test_any_chunk_size_float32(chunk_size):
    """float32 (the training dtype), one row per chunk up to one chunk for everything: equal at 1e-5."""
    spec = {"gap_terms": [{"name": "lsc"}, {"name": "gst"}, {"name": "dias_intra"}]}
    model = make_model(spec).float()
    batch = _float(make_batch(spec))
    reference = _step(model, batch)
    _assert_same(_step(model, batch, chunk_size=chunk_size), reference, rtol=1e-5, atol=1e-5)


def _float(value):
    if isinstance(value, dict):
        return {key: _float(item) for key, item in value.items()}
    return value.float() if value.is_floating_point() else value


def _chunked_reference(model, batch, chunk_size):
    """What the cached step must equal under dropout: the chunks embedded one after the other *with* their graphs
    (the same random draws as the cached step's first pass), then the objective on their concatenation."""
    model.zero_grad(set_to_none=True)
    pieces = [model(**chunk, return_loss=False, return_local=model.needs_local_features, return_term_extras=True)
              for chunk in split_inputs(batch, chunk_size)]
    extras = {key: torch.cat([piece.term_extras[key] for piece in pieces]) for key in pieces[0].term_extras}

    def cat(field):
        return None if getattr(pieces[0], field) is None else torch.cat([getattr(piece, field) for piece in pieces])

    loss, _ = model.loss_from_encodings(
        cat("image_embeds"), cat("text_embeds"), patch_embeds=cat("patch_embeds"), patch_mask=cat("patch_mask"),
        token_embeds=cat("token_embeds"), token_mask=cat("token_mask"), term_extras=extras,
        image_index=batch["image_index"],
    )
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _dropout_model(spec, lora: bool = False):
    torch.manual_seed(0)
    backbone = tiny_clip_config()
    for tower in (backbone.text_config, backbone.vision_config):
        tower.dropout, tower.attention_dropout = 0.2, 0.2
    model = GapClipModel(GapClipConfig(backbone, gap_terms=spec["gap_terms"])).double()
    if lora:
        from gapclip.lora import apply_lora

        apply_lora(model, r=4, alpha=8, dropout=0.3)
    return model.train()


def _grads_from(model, batch, chunk_size, seed, cached):
    torch.manual_seed(seed)
    if cached:
        return _step(model, batch, chunk_size)[1]
    return _chunked_reference(model, batch, chunk_size)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dropout_is_replayed_per_chunk(lora, monkeypatch):
    """Train mode with dropout (and LoRA's own dropout): each chunk's re-run draws the masks of its first pass, so
    the cached gradients equal the chunk-by-chunk graph's; without the replay they would not (checked)."""
    spec = {"gap_terms": [{"name": "lsc"}, {"name": "gst"}]}
    model, batch = _dropout_model(spec, lora), make_batch(spec)
    assert lora == any(".lora_" in name for name, _ in model.named_parameters())
    reference = _grads_from(model, batch, 3, seed=5, cached=False)
    other_draws = _grads_from(model, batch, 3, seed=6, cached=False)
    assert any(not torch.allclose(reference[name], other_draws[name]) for name in reference)  # dropout is active
    cached = _grads_from(model, batch, 3, seed=5, cached=True)
    assert set(cached) == set(reference)
    for name, grad in reference.items():
        torch.testing.assert_close(cached[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    monkeypatch.setattr(RandomState, "replay", lambda self: nullcontext())
    unreplayed = _grads_from(model, batch, 3, seed=5, cached=True)
    assert any(not torch.allclose(unreplayed[name], grad, rtol=1e-5, atol=1e-6) for name, grad in reference.items())


def test_cached_step_leaves_the_random_stream_where_the_first_pass_left_it():
    """The re-runs replay saved states inside a fork: what follows the step draws as after an uncached chunked pass."""
    spec = {"gap_terms": []}
    model, batch = _dropout_model(spec), make_batch(spec)
    torch.manual_seed(3)
    _chunked_reference(model, batch, 3)
    after_reference = torch.rand(4)
    torch.manual_seed(3)
    _step(model, batch, 3)
    torch.testing.assert_close(torch.rand(4), after_reference)


def test_lora_without_dropout_has_the_uncached_gradients():
    from gapclip.lora import apply_lora

    spec = {"gap_terms": [{"name": "csa"}, {"name": "usa"}]}
    model = make_model(spec)
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    model.eval()
    batch = make_batch(spec)
    reference = _step(model, batch)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_" in name for name in reference[1]) and set(reference[1]) <= trainable
    _assert_same(_step(model, batch, chunk_size=2), reference)


class _TableTerm(GapTerm):
    """A term with a per-row input and an input that is not per row (``gather=False``), encoded with the model."""

    name: ClassVar[str] = "_gradient_cache_table_term"
    supports_local_loss: ClassVar[bool] = True
    inputs: ClassVar[tuple[TermInput, ...]] = (TermInput("row_weight"), TermInput("table", gather=False))

    def encode_inputs(self, inputs, model):
        anchor = model.get_text_features(inputs["table"]["input_ids"])  # [T, D], the same for every chunk
        return {"row_weight": inputs["row_weight"], "table": anchor}

    def forward(self, batch: GapBatch) -> torch.Tensor:
        rows = batch.rows
        weights = batch.extras["row_weight"][rows]
        scores = batch.image_embeds[rows] @ torch.nn.functional.normalize(batch.extras["table"], dim=-1).t()
        return (weights[:, None] * scores.pow(2)).sum() / batch.batch_size


@pytest.fixture
def table_term():
    register_term(_TableTerm)
    yield _TableTerm.name
    TERM_REGISTRY.pop(_TableTerm.name, None)


def test_inputs_that_are_not_per_row_go_whole_to_every_chunk(table_term):
    spec = {"gap_terms": [{"name": table_term}]}
    batch = make_batch(spec)
    batch["term_inputs"]["row_weight"] = torch.linspace(0.5, 2.0, 8, dtype=torch.float64)
    batch["term_inputs"]["table"] = {"input_ids": torch.tensor([[2, 5, 9, 3], [2, 7, 11, 3], [2, 13, 4, 3]])}
    chunks = split_inputs(batch, 3, not_per_row={"table"})
    assert [chunk["input_ids"].shape[0] for chunk in chunks] == [3, 3, 2]
    assert all(chunk["term_inputs"]["table"]["input_ids"].shape[0] == 3 for chunk in chunks)
    assert [chunk["term_inputs"]["row_weight"].shape[0] for chunk in chunks] == [3, 3, 2]
    reference = _step(make_model(spec), batch)
    _assert_same(_step(make_model(spec), batch, chunk_size=3), reference)


def test_chunk_size_must_be_positive():
    spec = {"gap_terms": []}
    with pytest.raises(ValueError, match="gradient_cache_chunk_size must be an integer >= 1, got 0"):
        gradient_cached_forward(make_model(spec), make_batch(spec), 0)
    with pytest.raises(ValueError, match="--gradient_cache_chunk_size must be >= 1"):
        GapClipTrainingArguments(output_dir="unused", gradient_cache_chunk_size=0, report_to="none")


def test_trainer_with_gradient_accumulation_moves_the_weights_as_uncached(
    tiny_demo_processor, tiny_demo_datasets, tmp_path
):
    """Two optimizer steps of 2 accumulated micro-batches of 8, cached in chunks of 3 vs. not: the same weights."""
    from gapclip.cli import scratch_clip_config
    from gapclip.data import CaptionPairs, GapClipCollator
    from gapclip.trainer import GapClipTrainer

    def train(chunk_size):
        torch.manual_seed(0)
        config = GapClipConfig(scratch_clip_config(tiny_demo_processor, 32, 32, 1),
                               gap_terms=[{"name": "lsc"}, {"name": "dias_intra", "weight": 0.1}])
        args = GapClipTrainingArguments(
            output_dir=str(tmp_path / str(chunk_size)), per_device_train_batch_size=8, gradient_accumulation_steps=2,
            max_steps=2, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, eval_strategy="no", save_strategy="no",
            report_to="none", disable_tqdm=True, use_cpu=True, seed=0, load_best_model_at_end=False,
            gradient_cache_chunk_size=chunk_size,
        )
        model = GapClipModel(config)
        initial = copy.deepcopy(model.state_dict())
        trainer = GapClipTrainer(
            model=model, args=args, train_dataset=CaptionPairs(tiny_demo_datasets["train"], seed=0),
            data_collator=GapClipCollator(tiny_demo_processor), processing_class=tiny_demo_processor,
        )
        trainer.train()
        logged = [entry for entry in trainer.state.log_history if "loss" in entry and "train_loss" not in entry]
        return initial, copy.deepcopy(trainer.model.state_dict()), logged

    initial, reference, reference_logs = train(None)
    _, cached, cached_logs = train(3)
    for name, parameter in reference.items():
        torch.testing.assert_close(cached[name], parameter, rtol=1e-5, atol=1e-6, msg=name)
    assert sum(not torch.equal(reference[name], value) for name, value in initial.items()) > 10
    assert [entry["loss"] for entry in cached_logs] == pytest.approx([entry["loss"] for entry in reference_logs])
    assert all("loss_lsc" in entry for entry in cached_logs)
