"""TripletLoss (DIAS Eq. 3): hardest / sum mining and distance-weighted negative sampling (Wu et al. 2017)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gapclip import GapClipConfig, GapClipModel
from gapclip.losses import GapBatch, TripletLoss
from gapclip.testing import tiny_clip_config

torch.set_num_threads(1)


def batch(b=6, d=8, seed=0, image_index=None):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    return GapBatch(img, txt, torch.tensor(1.0), image_index=image_index)


def np_wu_weights(scores: np.ndarray, negatives: np.ndarray, dim: int, cutoff=0.5, nonzero=1.4) -> np.ndarray:
    """Wu et al. 2017: w ∝ q(δ)⁻¹, q(δ) = δ^(n-2) (1 - δ²/4)^((n-3)/2), δ clipped at `cutoff`, δ >= `nonzero` → 0."""
    out = np.zeros_like(scores)
    for i in range(scores.shape[0]):
        for j in range(scores.shape[1]):
            delta = max(math.sqrt(max(2 - 2 * scores[i, j], 0.0)), cutoff)
            if negatives[i, j] and delta < nonzero:
                out[i, j] = 1.0 / (delta ** (dim - 2) * (1 - delta**2 / 4) ** ((dim - 3) / 2))
        if out[i].sum() == 0:
            out[i] = negatives[i].astype(float)
        elif out[i].sum() > 0:
            out[i] /= out[i].max()
    return out


def test_hardest_and_sum_hand_computed():
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.3, 0.5, 0.6], [0.2, 0.0, 0.7]], dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.bool)
    a = 0.2
    cost_t = np.maximum(a - np.diag(scores.numpy())[:, None] + scores.numpy(), 0) * (1 - np.eye(3))
    cost_i = np.maximum(a - np.diag(scores.numpy())[None, :] + scores.numpy(), 0) * (1 - np.eye(3))
    hardest = (cost_t.max(1) + cost_i.max(0)).mean()
    total = (cost_t.sum(1) + cost_i.sum(0)).mean()
    assert TripletLoss(a, "hardest").compute_loss_from_scores(scores, eye).item() == pytest.approx(hardest)
    assert TripletLoss(a, "sum").compute_loss_from_scores(scores, eye).item() == pytest.approx(total)


@pytest.mark.parametrize("mining", ["hardest", "sum", "distance_weighted"])
def test_sum_reduction_is_batch_size_times_mean(mining):
    # VSE++/SCAN/DIAS sum the hinge costs over the batch; "mean" divides by N.
    b = batch(b=7, d=8, seed=3, image_index=torch.tensor([0, 1, 1, 2, 3, 4, 5]))
    mean = TripletLoss(0.2, mining, reduction="mean")(b)
    total = TripletLoss(0.2, mining, reduction="sum")(b)  # same sampler seed and call count: same negatives
    assert total.item() == pytest.approx(7 * mean.item(), rel=1e-12)
    assert total.item() > 0


def test_triplet_reduction_through_config_and_bad_value():
    config = GapClipConfig(tiny_clip_config(), base_loss="triplet", triplet_reduction="sum")
    model = GapClipModel(config)
    assert model.base_loss.reduction == "sum" and model.base_loss.get_config_dict()["reduction"] == "sum"
    assert GapClipConfig.from_dict(config.to_dict()).triplet_reduction == "sum"
    with pytest.raises(ValueError, match="triplet_reduction"):
        GapClipConfig(tiny_clip_config(), triplet_reduction="max")
    with pytest.raises(ValueError, match="reduction"):
        TripletLoss(reduction="max")


def test_distance_weights_match_wu_et_al():
    b = batch(b=5, d=16, seed=1)
    scores = (b.image_embeds @ b.text_embeds.t()).numpy()
    negatives = ~b.positive_mask
    weights = TripletLoss(mining="distance_weighted").distance_weights(torch.from_numpy(scores), negatives, 16)
    ref = np_wu_weights(scores, negatives.numpy(), 16)
    np.testing.assert_allclose(weights.numpy() / weights.numpy().max(1, keepdims=True), ref, rtol=1e-9)


def test_distance_weights_cutoffs_and_fallback():
    loss = TripletLoss(mining="distance_weighted")
    # row 0: one negative too far (δ = 2 ≥ 1.4) and one close; row 1: every negative too far → uniform fallback
    scores = torch.tensor([[1.0, -1.0, 0.6], [-1.0, 1.0, -1.0], [0.6, -1.0, 1.0]], dtype=torch.float64)
    weights = loss.distance_weights(scores, ~torch.eye(3, dtype=torch.bool), embed_dim=8)
    assert weights[0, 1] == 0 and weights[0, 2] > 0 and weights[0, 0] == 0
    assert weights[1].tolist() == [1.0, 0.0, 1.0]


def test_sampled_negatives_are_never_same_image():
    index = torch.tensor([0, 0, 1, 1, 2, 3])
    b = batch(image_index=index, seed=2)
    loss = TripletLoss(mining="distance_weighted")
    scores = b.image_embeds @ b.text_embeds.t()
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        choice = loss.sample_distance_weighted(scores, ~b.positive_mask, 8, g)
        assert not b.positive_mask[torch.arange(6), choice].any()


def test_distance_weighted_loss_is_hinge_of_sampled_negatives():
    b = batch(seed=3)
    loss = TripletLoss(0.2, "distance_weighted", seed=7)
    scores = b.image_embeds @ b.text_embeds.t()
    value = loss(b)
    g = torch.Generator().manual_seed(7)  # forward uses seed + call_count (0)
    text_choice = loss.sample_distance_weighted(scores, ~b.positive_mask, 8, g)
    image_choice = loss.sample_distance_weighted(scores.t(), ~b.positive_mask.t(), 8, g)
    s = scores.numpy()
    expected = np.mean([
        max(0.2 - s[i, i] + s[i, text_choice[i]], 0) + max(0.2 - s[i, i] + s[image_choice[i], i], 0) for i in range(6)
    ])
    assert value.item() == pytest.approx(expected)


def test_distance_weighted_is_deterministic_and_varies_between_calls():
    b = batch(b=12, seed=4)
    first = TripletLoss(mining="distance_weighted", seed=3)
    second = TripletLoss(mining="distance_weighted", seed=3)
    run1 = [first(b).item() for _ in range(6)]
    run2 = [second(b).item() for _ in range(6)]
    assert run1 == run2
    assert len(set(run1)) > 1  # a new draw per call
    assert first.get_config_dict() == {
        "margin": 0.2, "mining": "distance_weighted", "reduction": "mean", "seed": 3, "distance_cutoff": 0.5,
        "nonzero_loss_cutoff": 1.4,
    }


def test_distance_weighted_gradient_flows():
    b = batch(seed=5)
    b.image_embeds.requires_grad_(True)
    TripletLoss(0.5, "distance_weighted")(b).backward()
    assert b.image_embeds.grad.abs().sum() > 0


def test_invalid_mining_lists_options():
    with pytest.raises(ValueError, match="distance_weighted"):
        TripletLoss(mining="semi_hard")
    with pytest.raises(ValueError, match="distance_cutoff"):
        TripletLoss(mining="distance_weighted", distance_cutoff=1.5)


def test_model_with_distance_weighted_triplet():
    torch.manual_seed(0)
    config = GapClipConfig(tiny_clip_config(), base_loss="triplet", triplet_mining="distance_weighted")
    model = GapClipModel(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 60, (4, 6), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    out = model(input_ids=ids, pixel_values=torch.randn(4, 3, 32, 32, generator=g), return_loss=True)
    assert math.isfinite(out.loss.item())
    out.loss.backward()
