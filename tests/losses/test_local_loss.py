"""The local form of the losses (``GapClipConfig.local_loss``) on one process.

Processes are simulated by blocks of rows: for every loss whose share needs nothing from the other processes, the
shares of the blocks add up to the global value and their gradients to the global gradient. The terms that gather or
sum what they derive from their rows (LSC, USA, the sparse DIAS mask, ``dias_dim``) can only be split over real
processes: ``tests/multiprocess/test_local_loss_two_process.py`` checks every term there. Here the model path, the
error for terms without a local form and the distance-weighted sampler's per-row draws are checked too.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

from gapclip import GapClipConfig, GapClipModel
from gapclip.losses import TERM_REGISTRY, GapBatch, GapTerm, InfoNCELoss, SigmoidLoss, TripletLoss, register_term
from gapclip.losses.cusa import CSALoss
from gapclip.losses.dias import InterSpatialLoss, IntraSpatialLoss
from gapclip.losses.lgmgc import GSTLoss
from gapclip.testing import tiny_clip_config
from tests.multiprocess.test_custom_term_two_process import unregister  # noqa: F401  (fixture)

BLOCKS = (slice(0, 3), slice(3, 4), slice(4, 9))  # uneven "processes"; 9 rows


def _batch(seed: int = 0, missing=()) -> GapBatch:
    generator = torch.Generator().manual_seed(seed)
    n, dim = 9, 6

    def unit(rows):
        return F.normalize(torch.randn(rows, dim, generator=generator, dtype=torch.float64), dim=-1)

    image_index = torch.tensor([0, 0, 1, 2, 3, 3, 4, 3, 5])  # row 1 and rows 4, 5, 7 repeat an image across blocks
    images = unit(n)
    images[1], images[5], images[7] = images[0], images[4], images[4]
    has_translation = torch.ones(n, dtype=torch.bool)
    has_translation[list(missing)] = False
    return GapBatch(
        image_embeds=images.requires_grad_(), text_embeds=unit(n).requires_grad_(),
        logit_scale=torch.tensor(7.0, dtype=torch.float64, requires_grad=True),
        logit_bias=torch.tensor(-2.0, dtype=torch.float64, requires_grad=True), image_index=image_index,
        extras={
            "translation_embeds": unit(n).requires_grad_(), "has_translation": has_translation,
            "teacher_image_embeds": torch.randn(n, 5, generator=generator, dtype=torch.float64),
            "teacher_text_embeds": torch.randn(n, 5, generator=generator, dtype=torch.float64),
            "label": torch.tensor([0, 0, 1, 2, 1, 1, 3, 1, 4]),
        },
    )


def _leaves(batch: GapBatch) -> list[torch.Tensor]:
    return [batch.image_embeds, batch.text_embeds, batch.logit_scale, batch.logit_bias,
            batch.extras["translation_embeds"]]


def _value_and_grads(loss_fn, batch: GapBatch, params=()) -> tuple[torch.Tensor, list[torch.Tensor]]:
    value = loss_fn(batch)
    inputs = [*_leaves(batch), *params]
    grads = torch.autograd.grad(value, inputs, allow_unused=True)
    return value.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def _local(batch: GapBatch, rows: slice) -> GapBatch:
    return GapBatch(**{**batch.__dict__, "local_rows": rows})


def _custom_supcon():
    from gapclip.cli import import_term_modules

    import_term_modules(str(Path(__file__).resolve().parents[2] / "examples" / "custom_term.py"))
    return TERM_REGISTRY["label_supcon"](6, temperature=0.3)


LOSSES = {
    "infonce": lambda: InfoNCELoss(),
    "sigmoid": lambda: SigmoidLoss(),
    **{f"triplet-{mining}-{reduction}": (lambda m=mining, r=reduction: TripletLoss(0.2, m, reduction=r, seed=3))
       for mining in ("hardest", "sum", "distance_weighted") for reduction in ("mean", "sum")},
    **{f"gst-{d}": (lambda d=d: GSTLoss(6, distance=d)) for d in ("infonce", "kl", "l2")},
    **{f"gst-{d}-skip": (lambda d=d: GSTLoss(6, distance=d, on_missing="skip")) for d in ("infonce", "kl", "l2")},
    "csa": lambda: CSALoss(6),
    **{f"dias_{kind}-{reduction}": (lambda c=cls, r=reduction: c(6, sparse=False, reduction=r))
       for kind, cls in (("inter", InterSpatialLoss), ("intra", IntraSpatialLoss)) for reduction in ("sum", "mean")},
    "label_supcon": _custom_supcon,
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_shares_of_row_blocks_add_up_to_the_global_loss(name, unregister):  # noqa: F811
    missing = (2, 5) if name.endswith("skip") else ()
    loss_fn = LOSSES[name]()
    assert loss_fn.supports_local_loss
    params = [p for p in loss_fn.parameters() if p.requires_grad]
    value, grads = _value_and_grads(loss_fn, _batch(missing=missing), params)
    if isinstance(loss_fn, TripletLoss) and loss_fn.mining == "distance_weighted":
        loss_fn.call_count -= 1  # every block must draw from the stream the global call drew from
    total, total_grads = torch.zeros(()), None
    for rows in BLOCKS:
        share, share_grads = _value_and_grads(loss_fn, _local(_batch(missing=missing), rows), params)
        if isinstance(loss_fn, TripletLoss) and loss_fn.mining == "distance_weighted":
            loss_fn.call_count -= 1
        total = total + share
        total_grads = share_grads if total_grads is None else [a + b for a, b in zip(total_grads, share_grads)]
    torch.testing.assert_close(total.to(value.dtype), value, rtol=1e-10, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in grads)
    for got, expected in zip(total_grads, grads):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_gst_counts_skipped_rows_of_the_whole_batch():
    term = GSTLoss(6, on_missing="skip")
    term(_local(_batch(missing=(2, 5, 6)), slice(0, 3)))
    assert term.last_skipped == 3  # the gathered has_translation is global: every process logs the same count


def test_local_positive_mask_is_rows_of_the_positive_mask():
    batch = _local(_batch(), slice(3, 8))
    assert torch.equal(batch.local_positive_mask, batch.positive_mask[3:8])
    assert batch.is_local and batch.rows == slice(3, 8)
    assert not _batch().is_local and _batch().rows == slice(0, 9)


@pytest.mark.parametrize("terms", [
    [], [{"name": "lsc"}, {"name": "gst"}], [{"name": "csa"}, {"name": "usa"}],
    [{"name": "dias_dim"}, {"name": "dias_inter"}, {"name": "dias_intra"}],
])
def test_model_local_loss_on_one_process_is_the_global_loss(terms, make_clip_model, clip_inputs):
    """One process holds every row: the local form computes the whole objective, through the model's plumbing
    (local features not gathered, the shares summed over the one process)."""
    term_inputs = _term_inputs(clip_inputs["input_ids"].shape[0])
    values = {}
    for local in (False, True):
        model = make_clip_model(gap_terms=terms, local_loss=local).double()
        inputs = {k: v.double() if v.is_floating_point() else v for k, v in clip_inputs.items()}
        outputs = model(**inputs, return_loss=True, term_inputs=term_inputs)
        outputs.loss.backward()
        values[local] = (outputs.loss_terms, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    for name, value in values[False][0].items():
        torch.testing.assert_close(values[True][0][name], value, msg=name)
    for name, grad in values[False][1].items():
        torch.testing.assert_close(values[True][1][name], grad, msg=name)


def _term_inputs(n: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 60, (n, 5), generator=generator)
    ids[:, 0], ids[:, -1] = 2, 3
    return {
        "translation": {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        "teacher_image_embeds": torch.randn(n, 7, generator=generator, dtype=torch.float64),
        "teacher_text_embeds": torch.randn(n, 7, generator=generator, dtype=torch.float64),
    }


class _GlobalOnly(GapTerm):
    """A term of one's own without a local form."""

    name: ClassVar[str] = "_global_only_term"

    def forward(self, batch: GapBatch) -> torch.Tensor:
        return (batch.image_embeds @ batch.text_embeds.t()).logsumexp(dim=0).mean()


def test_a_term_without_a_local_form_refuses_local_loss():
    register_term(_GlobalOnly)
    try:
        config = GapClipConfig(tiny_clip_config(), gap_terms=[{"name": "lsc"}, {"name": _GlobalOnly.name}],
                               local_loss=True)
        with pytest.raises(ValueError, match=r"local_loss=True, but \['_global_only_term'\] cannot compute their "
                                             r"local form.*supports_local_loss = True"):
            GapClipModel(config)
        config.local_loss = False
        model = GapClipModel(config)  # fine globally; switched on later, the forward refuses it just the same
        model.config.local_loss = True
        inputs = {"input_ids": torch.tensor([[2, 5, 6, 3], [2, 7, 8, 3]]), "pixel_values": torch.randn(2, 3, 32, 32)}
        with pytest.raises(ValueError, match="_global_only_term"):
            model(**inputs, return_loss=True)
    finally:
        TERM_REGISTRY.pop(_GlobalOnly.name, None)


def test_local_loss_needs_gather_with_grad():
    with pytest.raises(ValueError, match="local_loss=True needs gather_with_grad=True"):
        GapClipConfig(tiny_clip_config(), local_loss=True, gather_with_grad=False)
    config = GapClipConfig(tiny_clip_config(), local_loss=True)
    assert GapClipConfig.from_dict(config.to_dict()).local_loss is True


def test_distance_weighted_draws_follow_the_weights_row_by_row():
    """Inverse-CDF sampling at a uniform number per row: frequencies match the weights, a row's draw does not depend on
    the other rows, and the ends of [0, 1) never pick a column of weight 0."""
    loss = TripletLoss(mining="distance_weighted")
    generator = torch.Generator().manual_seed(0)
    scores = torch.tensor([[1.0, 0.3, -0.2, 0.6], [0.1, 1.0, 0.5, 0.4]], dtype=torch.float64)
    negatives = ~torch.eye(2, 4, dtype=torch.bool)
    weights = loss.distance_weights(scores, negatives, embed_dim=8)
    expected = weights / weights.sum(dim=1, keepdim=True)
    draws = torch.stack([loss.sample_distance_weighted(scores, negatives, 8, generator) for _ in range(20000)])
    for row in range(2):
        frequency = torch.bincount(draws[:, row], minlength=4).double() / draws.shape[0]
        torch.testing.assert_close(frequency, expected[row], atol=0.015, rtol=0)
    uniforms = torch.tensor([0.37, 0.81], dtype=torch.float64)
    both = loss.sample_distance_weighted(scores, negatives, 8, uniforms=uniforms)
    alone = loss.sample_distance_weighted(scores[1:], negatives[1:], 8, uniforms=uniforms[1:])
    assert both[1] == alone[0]
    ends = torch.tensor([0.0, torch.nextafter(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0)).item()],
                        dtype=torch.float64)
    for row in range(2):
        picked = loss.sample_distance_weighted(
            scores[row : row + 1].expand(2, 4), negatives[row : row + 1].expand(2, 4), 8, uniforms=ends
        )
        assert (weights[row, picked] > 0).all(), picked
