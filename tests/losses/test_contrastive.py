"""Base losses (InfoNCE, sigmoid, triplet): hand-computed cases from the papers' equations, agreement with
transformers' CLIP/SigLIP losses, symmetry, temperature, permutation invariance, gradients, gather on one process."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import SiglipModel
from transformers.models.clip import modeling_clip

from gapclip.distributed import distributed_info, gather_features
from gapclip.losses import BASE_LOSSES, GapBatch, InfoNCELoss, SigmoidLoss, TripletLoss
from gapclip.testing import tiny_siglip_config


def make_batch(n: int = 5, d: int = 6, *, seed: int = 0, scale: float = 7.0, bias: float | None = None,
               image_index=None, dtype=torch.float32) -> GapBatch:
    generator = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n, d, generator=generator, dtype=dtype), dim=-1)
    texts = F.normalize(images + 0.8 * torch.randn(n, d, generator=generator, dtype=dtype), dim=-1)
    return GapBatch(
        image_embeds=images, text_embeds=texts, logit_scale=torch.tensor(scale, dtype=dtype),
        logit_bias=None if bias is None else torch.tensor(bias, dtype=dtype),
        image_index=None if image_index is None else torch.tensor(image_index),
    )


def cosines(batch: GapBatch) -> list[list[float]]:
    return (batch.image_embeds @ batch.text_embeds.t()).tolist()


# ------------------------------------------------------------------------------------- plain-python references
def reference_infonce(sim: list[list[float]], scale: float, image_index: list[int]) -> float:
    """½ [CE(rows) + CE(columns)] with the same-image mask spread evenly over each row's positives (CLIP Sec. 2.3)."""
    n = len(sim)

    def direction(logit) -> float:
        total = 0.0
        for i in range(n):
            positives = [j for j in range(n) if image_index[i] == image_index[j]]
            log_norm = math.log(sum(math.exp(logit(i, j)) for j in range(n)))
            total += -sum((logit(i, j) - log_norm) / len(positives) for j in positives)
        return total / n

    return 0.5 * (direction(lambda i, j: scale * sim[i][j]) + direction(lambda i, j: scale * sim[j][i]))


def reference_sigmoid(sim: list[list[float]], scale: float, bias: float, image_index: list[int]) -> float:
    """SigLIP Sec. 3: -(1/B) Σ_ij log σ(z_ij (s·x_i·y_j + b))."""
    n = len(sim)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if image_index[i] == image_index[j] else -1.0
            total += math.log(1.0 + math.exp(-z * (scale * sim[i][j] + bias)))
    return total / n


def reference_triplet(sim: list[list[float]], margin: float, mining: str, image_index: list[int]) -> float:
    """DIAS Eq. 3 / VSE++ over in-batch negatives (rows of another image), averaged over the batch."""
    n = len(sim)
    total = 0.0
    for i in range(n):
        negatives = [j for j in range(n) if image_index[i] != image_index[j]]
        text_costs = [max(0.0, margin - sim[i][i] + sim[i][j]) for j in negatives]  # image i, wrong captions
        image_costs = [max(0.0, margin - sim[i][i] + sim[j][i]) for j in negatives]  # caption i, wrong images
        if mining == "hardest":
            total += max(text_costs, default=0.0) + max(image_costs, default=0.0)
        else:
            total += sum(text_costs) + sum(image_costs)
    return total / n


# ------------------------------------------------------------------------------------- InfoNCE
def test_infonce_two_by_two_by_hand():
    # I = e1, e2; T = (0.6, 0.8), (1, 0): cosines [[0.6, 1.0], [0.8, 0.0]], scale 1.
    batch = GapBatch(
        image_embeds=torch.tensor([[1.0, 0.0], [0.0, 1.0]]), text_embeds=torch.tensor([[0.6, 0.8], [1.0, 0.0]]),
        logit_scale=torch.tensor(1.0),
    )
    image_to_text = -math.log(math.exp(0.6) / (math.exp(0.6) + math.exp(1.0))) - math.log(1 / (math.exp(0.8) + 1))
    text_to_image = -math.log(math.exp(0.6) / (math.exp(0.6) + math.exp(0.8))) - math.log(1 / (math.exp(1.0) + 1))
    expected = 0.5 * (image_to_text / 2 + text_to_image / 2)
    assert InfoNCELoss()(batch).item() == pytest.approx(expected, rel=1e-6)


def test_infonce_three_by_three_matches_reference():
    batch = make_batch(3, 4, seed=1, scale=5.0)
    expected = reference_infonce(cosines(batch), 5.0, [0, 1, 2])
    assert InfoNCELoss()(batch).item() == pytest.approx(expected, rel=1e-5)


def test_infonce_equals_transformers_clip_loss():
    batch = make_batch(6, 8, seed=2, scale=12.0)
    logits_per_text = batch.logit_scale * batch.text_embeds @ batch.image_embeds.t()
    clip_loss = getattr(modeling_clip, "clip_loss", None) or modeling_clip.image_text_contrastive_loss
    torch.testing.assert_close(InfoNCELoss()(batch), clip_loss(logits_per_text))


def test_infonce_same_image_rows_share_the_target_mass():
    image_index = [0, 0, 1, 2]  # rows 0 and 1: two captions of one image
    batch = make_batch(4, 5, seed=3, scale=4.0, image_index=image_index)
    expected = reference_infonce(cosines(batch), 4.0, image_index)
    assert InfoNCELoss()(batch).item() == pytest.approx(expected, rel=1e-5)
    targets = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    logits = 4.0 * batch.image_embeds @ batch.text_embeds.t()
    by_hand = 0.5 * (
        -(targets * logits.log_softmax(1)).sum(1).mean() - (targets * logits.t().log_softmax(1)).sum(1).mean()
    )
    torch.testing.assert_close(InfoNCELoss()(batch), by_hand)
    # ... and it differs from treating the duplicate as a negative.
    assert InfoNCELoss()(batch).item() != pytest.approx(InfoNCELoss()(make_batch(4, 5, seed=3, scale=4.0)).item())


def test_infonce_temperature_multiplies_the_logits():
    low, high = make_batch(seed=4, scale=1.0), make_batch(seed=4, scale=30.0)
    logits = 30.0 * high.image_embeds @ high.text_embeds.t()
    torch.testing.assert_close(InfoNCELoss()(high), InfoNCELoss.compute_loss_from_logits(logits, high.positive_mask))
    assert InfoNCELoss()(low).item() != pytest.approx(InfoNCELoss()(high).item())


# ------------------------------------------------------------------------------------- sigmoid
def test_sigmoid_matches_reference_with_shared_images():
    image_index = [0, 1, 1, 2, 3]
    batch = make_batch(5, 6, seed=5, scale=10.0, bias=-3.0, image_index=image_index)
    expected = reference_sigmoid(cosines(batch), 10.0, -3.0, image_index)
    assert SigmoidLoss()(batch).item() == pytest.approx(expected, rel=1e-5)


def test_sigmoid_equals_siglip_models_own_loss():
    torch.manual_seed(0)
    siglip = SiglipModel(tiny_siglip_config()).eval()
    with torch.no_grad():
        siglip.logit_scale.fill_(math.log(10.0))
        siglip.logit_bias.fill_(-2.0)
        out = siglip(
            input_ids=torch.randint(4, 60, (4, 6)), pixel_values=torch.randn(4, 3, 32, 32), return_loss=True
        )
    batch = GapBatch(
        image_embeds=out.image_embeds, text_embeds=out.text_embeds, logit_scale=siglip.logit_scale.exp().squeeze(),
        logit_bias=siglip.logit_bias.squeeze(),
    )
    torch.testing.assert_close(SigmoidLoss()(batch), out.loss)


def test_sigmoid_needs_a_bias():
    with pytest.raises(ValueError, match="needs a logit bias"):
        SigmoidLoss()(make_batch())


def test_sigmoid_temperature_and_bias_enter_the_logits():
    batch = make_batch(seed=6, scale=20.0, bias=1.5)
    logits = 20.0 * batch.image_embeds @ batch.text_embeds.t() + 1.5
    torch.testing.assert_close(SigmoidLoss()(batch), SigmoidLoss.compute_loss_from_logits(logits, batch.positive_mask))


# ------------------------------------------------------------------------------------- triplet
@pytest.mark.parametrize("mining", ["hardest", "sum"])
@pytest.mark.parametrize("image_index", [[0, 1, 2, 3], [0, 0, 1, 2]])
def test_triplet_matches_reference(mining, image_index):
    batch = make_batch(4, 5, seed=7, image_index=image_index)
    expected = reference_triplet(cosines(batch), 0.3, mining, image_index)
    assert TripletLoss(margin=0.3, mining=mining)(batch).item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_triplet_two_by_two_by_hand():
    # cosines [[0.6, 1.0], [0.8, 0.0]] (as above), margin 0.2:
    # image 0: [0.2 - 0.6 + 1.0]+ = 0.6 ; caption 0: [0.2 - 0.6 + 0.8]+ = 0.4
    # image 1: [0.2 - 0.0 + 0.8]+ = 1.0 ; caption 1: [0.2 - 0.0 + 1.0]+ = 1.2   → mean (1.0 + 2.2) / 2 = 1.6
    batch = GapBatch(
        image_embeds=torch.tensor([[1.0, 0.0], [0.0, 1.0]]), text_embeds=torch.tensor([[0.6, 0.8], [1.0, 0.0]]),
        logit_scale=torch.tensor(1.0),
    )
    for mining in ("hardest", "sum"):  # one negative each: both minings agree
        assert TripletLoss(margin=0.2, mining=mining)(batch).item() == pytest.approx(1.6, rel=1e-6)
    # Both rows showing the same image: no negatives left, the loss is 0.
    shared = GapBatch(batch.image_embeds, batch.text_embeds, batch.logit_scale, image_index=torch.tensor([0, 0]))
    assert TripletLoss(margin=0.2)(shared).item() == 0.0


def test_triplet_margin_and_mining_are_checked():
    with pytest.raises(ValueError, match=r"mining must be one of \['hardest', 'sum'"):
        TripletLoss(mining="semi_hard")
    with pytest.raises(ValueError, match="margin must be >= 0, got -0.1"):
        TripletLoss(margin=-0.1)


# ------------------------------------------------------------------------------------- shared properties
LOSSES = {
    "infonce": (InfoNCELoss, {}),
    "sigmoid": (SigmoidLoss, {"bias": -2.0}),
    "triplet_hardest": (lambda: TripletLoss(0.2, "hardest"), {}),
    "triplet_sum": (lambda: TripletLoss(0.2, "sum"), {}),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_swapping_images_and_texts_gives_the_same_loss(name):
    factory, kwargs = LOSSES[name]
    batch = make_batch(5, 6, seed=8, image_index=[0, 1, 1, 2, 3], **kwargs)
    swapped = GapBatch(batch.text_embeds, batch.image_embeds, batch.logit_scale, batch.logit_bias, batch.image_index)
    torch.testing.assert_close(factory()(swapped), factory()(batch))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_joint_permutation_of_the_batch_leaves_the_loss_unchanged(name):
    factory, kwargs = LOSSES[name]
    batch = make_batch(6, 6, seed=9, image_index=[0, 1, 1, 2, 3, 4], **kwargs)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    permuted = GapBatch(
        batch.image_embeds[perm], batch.text_embeds[perm], batch.logit_scale, batch.logit_bias, batch.image_index[perm]
    )
    torch.testing.assert_close(factory()(permuted), factory()(batch))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradcheck_float64(name):
    factory, kwargs = LOSSES[name]
    loss = factory()
    generator = torch.Generator().manual_seed(10)
    images = torch.randn(4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    texts = torch.randn(4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    log_scale = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(kwargs.get("bias", 0.0), dtype=torch.float64, requires_grad=True)
    image_index = torch.tensor([0, 0, 1, 2])

    def fn(images, texts, log_scale, bias):
        batch = GapBatch(
            F.normalize(images, dim=-1), F.normalize(texts, dim=-1), log_scale.exp(),
            bias if "bias" in kwargs else None, image_index,
        )
        return loss(batch)

    assert torch.autograd.gradcheck(fn, (images, texts, log_scale, bias), eps=1e-6, atol=1e-5)
    fn(images, texts, log_scale, bias).backward()
    assert images.grad.abs().sum() > 0 and texts.grad.abs().sum() > 0
    if not name.startswith("triplet"):  # the hinge loss uses cosines only
        assert log_scale.grad.abs() > 0


# ------------------------------------------------------------------------------------- gather on one process
def test_gather_is_identity_on_one_process():
    assert distributed_info() == (0, 1)
    tensor = torch.randn(3, 4, requires_grad=True)
    assert gather_features(tensor) is tensor
    assert gather_features(tensor, gather_with_grad=False) is tensor
    mask = torch.tensor([True, False, True])
    assert gather_features(mask, pad_value=False) is mask


@pytest.mark.parametrize("name", ["infonce", "sigmoid", "triplet"])
def test_model_loss_with_and_without_gather_grad_is_the_same(name, make_clip_model, make_siglip_model, clip_inputs):
    make = make_siglip_model if name == "sigmoid" else make_clip_model
    results = []
    for with_grad in (True, False):
        model = make(base_loss=name, gather_with_grad=with_grad)
        out = model(**clip_inputs, return_loss=True)
        out.loss.backward()
        grad = model.backbone.visual_projection.weight.grad if name != "sigmoid" else None
        results.append((out.loss.detach(), grad))
        # The loss on the (not gathered) local batch is exactly the base loss on the model's own embeddings.
        batch = GapBatch(out.image_embeds, out.text_embeds, *model.logit_scale_and_bias())
        torch.testing.assert_close(out.loss, BASE_LOSSES[name]()(batch))
    torch.testing.assert_close(results[0][0], results[1][0])
    if results[0][1] is not None:
        torch.testing.assert_close(results[0][1], results[1][1])


def test_losses_document_themselves():
    for cls in (InfoNCELoss, SigmoidLoss, TripletLoss):
        assert cls.citation.startswith("@")
        assert "arXiv" in (cls.__doc__ or "") or cls is TripletLoss
    assert TripletLoss(0.3, "sum").get_config_dict() == {"margin": 0.3, "mining": "sum", "reduction": "mean"}
    assert InfoNCELoss().get_config_dict() == {} and SigmoidLoss().get_config_dict() == {}
