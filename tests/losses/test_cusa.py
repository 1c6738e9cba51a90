"""CUSA gap terms (CSA Eq. 6, USA Eq. 8): hand-computed values, KL direction, temperatures, gradients, persistence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gapclip import GapClipConfig, GapClipModel
from gapclip.losses import TERM_REGISTRY, GapBatch, describe_terms
from gapclip.losses.cusa import CSALoss, USALoss, kl_batchmean, teacher_targets
from gapclip.testing import tiny_clip_config, tiny_siglip_config, tiny_vision_text_dual_encoder

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------- numpy reference
def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(P‖Q) with batchmean: Σ_ij P_ij log(P_ij / Q_ij) / B."""
    return float((p * np.log(p / q)).sum() / p.shape[0])


def np_csa(img, txt, t_img, t_txt, tau, teacher_t=1.0):
    img, txt, t_img, t_txt = map(np_normalize, (img, txt, t_img, t_txt))
    p_i2i, p_t2t = np_softmax(t_img @ t_img.T / teacher_t), np_softmax(t_txt @ t_txt.T / teacher_t)
    q_i2t, q_t2i = np_softmax(img @ txt.T / tau), np_softmax(txt @ img.T / tau)
    return 0.5 * (np_kl(p_i2i, q_i2t) + np_kl(p_t2t, q_t2i))


def np_usa(proj_img, proj_txt, t_img, t_txt, tau_i, tau_t, teacher_t=1.0):
    proj_img, proj_txt, t_img, t_txt = map(np_normalize, (proj_img, proj_txt, t_img, t_txt))
    p_i2i, p_t2t = np_softmax(t_img @ t_img.T / teacher_t), np_softmax(t_txt @ t_txt.T / teacher_t)
    q_i2i, q_t2t = np_softmax(proj_img @ proj_img.T / tau_i), np_softmax(proj_txt @ proj_txt.T / tau_t)
    return 0.5 * (np_kl(p_i2i, q_i2i) + np_kl(p_t2t, q_t2t))


def random_batch(b=6, d=8, t_img=5, t_txt=7, seed=0, dtype=torch.float64, image_index=None) -> GapBatch:
    g = torch.Generator().manual_seed(seed)
    return GapBatch(
        image_embeds=F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1),
        text_embeds=F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1),
        logit_scale=torch.tensor(10.0, dtype=dtype),
        image_index=image_index,
        extras={
            "teacher_image_embeds": torch.randn(b, t_img, generator=g, dtype=dtype),
            "teacher_text_embeds": torch.randn(b, t_txt, generator=g, dtype=dtype),
        },
    )


# --------------------------------------------------------------------------------------------- hand-computed cases
def test_csa_two_by_two_closed_form():
    # Orthogonal teachers: cos = I, so every P row is softmax([1, 0]); student pairs aligned, τ = 0.5: Q rows are
    # softmax([2, 0]). Both rows and both directions give the same binary KL.
    eye = torch.eye(2, dtype=torch.float64)
    loss = CSALoss.compute_loss_from_embeddings(eye, eye, eye, eye, 0.5)
    p, q = math.e / (math.e + 1), math.e**2 / (math.e**2 + 1)
    row = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    assert loss.item() == pytest.approx(row, rel=1e-12)


def test_usa_two_by_two_closed_form():
    # Uni-modal logits of orthonormal projected vectors: diag 1/τ, off-diag 0 (diagonal kept).
    eye = torch.eye(2, dtype=torch.float64)
    loss = USALoss.compute_loss_from_embeddings(eye, 3 * eye, eye, eye, 0.5, 0.25)
    p = math.e / (math.e + 1)

    def row(q):
        return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))

    expected = 0.5 * (row(math.e**2 / (math.e**2 + 1)) + row(math.e**4 / (math.e**4 + 1)))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_csa_matches_numpy_reference():
    batch = random_batch()
    term = CSALoss(8, init_temperature=0.3).double()
    args = [t.numpy() for t in (batch.image_embeds, batch.text_embeds, *batch.extras.values())]
    tau = term.temperature.item()  # 0.3 as stored in float32, then cast to float64
    assert tau == pytest.approx(0.3)
    assert term(batch).item() == pytest.approx(np_csa(*args, tau=tau), rel=1e-10)
    term_t = CSALoss(8, teacher_temperature=0.5).double()
    tau = term_t.temperature.item()
    assert term_t(batch).item() == pytest.approx(np_csa(*args, tau=tau, teacher_t=0.5), rel=1e-10)


def test_usa_matches_numpy_reference():
    batch = random_batch(seed=3)
    term = USALoss(8).double()
    with torch.no_grad():
        for proj in (term.image_projector, term.text_projector):
            proj[1].weight.normal_()
            proj[1].bias.normal_()
        term.text_temperature.fill_(0.7)
    proj_img = term.image_projector(batch.image_embeds).detach().numpy()
    proj_txt = term.text_projector(batch.text_embeds).detach().numpy()
    # The projector is LayerNorm -> Linear; check against a hand-written LayerNorm too.
    x = batch.image_embeds.numpy()
    ln = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5)
    w, b = term.image_projector[1].weight.detach().numpy(), term.image_projector[1].bias.detach().numpy()
    np.testing.assert_allclose(proj_img, ln @ w.T + b, rtol=1e-10, atol=1e-12)
    tau_i, tau_t = term.image_temperature.item(), term.text_temperature.item()
    expected = np_usa(proj_img, proj_txt, *(t.numpy() for t in batch.extras.values()), tau_i=tau_i, tau_t=tau_t)
    assert term(batch).item() == pytest.approx(expected, rel=1e-10)


def test_kl_direction_is_target_first():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=torch.float64)
    q = torch.tensor([[0.4, 0.4, 0.2], [0.3, 0.3, 0.4]], dtype=torch.float64)
    forward_kl = kl_batchmean(p, q.log()).item()  # logits = log q -> softmax gives q back
    assert forward_kl == pytest.approx(np_kl(p.numpy(), q.numpy()), rel=1e-12)
    reverse_kl = kl_batchmean(q, p.log()).item()
    assert reverse_kl == pytest.approx(np_kl(q.numpy(), p.numpy()), rel=1e-12)
    assert abs(forward_kl - reverse_kl) > 1e-3  # swapping P and Q changes the value


def test_teacher_targets_rows_diagonal_and_same_image_rows():
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)  # rows 0 and 1: same image
    p = teacher_targets(t)
    torch.testing.assert_close(p.sum(1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(p[0], p[1])
    assert p[0, 0] == p[0, 1] > p[0, 2]  # the duplicate image gets the same mass as the diagonal
    e = math.e
    torch.testing.assert_close(p[2], torch.tensor([1 / (2 + e), 1 / (2 + e), e / (2 + e)], dtype=torch.float64))


# --------------------------------------------------------------------------------------------- temperatures, options
@pytest.mark.parametrize("value, expected", [(5.0, 0.99), (0.01, 0.10), (0.3, 0.3)])
def test_csa_temperature_is_projected_into_range(value, expected):
    batch = random_batch()
    term = CSALoss(8).double()
    with torch.no_grad():
        term.temperature.fill_(value)
    loss = term(batch)
    assert term.temperature.item() == pytest.approx(expected)  # projected in place, as the authors do
    reference = CSALoss.compute_loss_from_embeddings(
        batch.image_embeds, batch.text_embeds, *batch.extras.values(), expected
    )
    assert loss.item() == pytest.approx(reference.item(), rel=1e-12)
    loss.backward()
    assert term.temperature.grad is not None and term.temperature.grad.item() != 0.0  # can leave the bound again


def test_usa_temperatures_are_projected_into_range():
    term = USALoss(8).double()
    with torch.no_grad():
        term.image_temperature.fill_(3.0)
        term.text_temperature.fill_(-1.0)
    term(random_batch())
    assert term.image_temperature.item() == pytest.approx(1.0)
    assert term.text_temperature.item() == pytest.approx(0.10)


def test_default_options_follow_the_authors():
    assert CSALoss.default_options == {
        "init_temperature": 0.45, "min_temperature": 0.10, "max_temperature": 0.99, "teacher_temperature": 1.0
    }
    assert USALoss.default_options["max_temperature"] == 1.00
    assert CSALoss(4).temperature.item() == pytest.approx(0.45)
    usa = USALoss(4)
    assert usa.image_temperature.item() == usa.text_temperature.item() == pytest.approx(0.45)
    assert usa.get_config_dict() == dict(USALoss.default_options)
    assert "AAAI" in CSALoss.citation and CSALoss.citation == USALoss.citation
    assert TERM_REGISTRY["csa"] is CSALoss and TERM_REGISTRY["usa"] is USALoss
    assert CSALoss.requires == USALoss.requires == frozenset()  # no local features
    assert [i.name for i in CSALoss.inputs] == [i.name for i in USALoss.inputs] == [
        "teacher_image_embeds", "teacher_text_embeds"
    ]
    assert describe_terms()["usa"]["summary"].startswith("Uni-modal Soft-label Alignment")


@pytest.mark.parametrize(
    "options, match",
    [
        ({"init_temperature": 2.0}, "init_temperature=2.0"),
        ({"min_temperature": 0.0}, "min_temperature"),
        ({"min_temperature": 0.5, "max_temperature": 0.4}, "max_temperature"),
        ({"teacher_temperature": 0.0}, "teacher_temperature"),
    ],
)
def test_invalid_options_raise(options, match):
    for cls in (CSALoss, USALoss):
        with pytest.raises(ValueError, match=match):
            cls(8, **options)


def test_missing_or_misshaped_teachers_raise():
    batch = random_batch()
    batch.extras.pop("teacher_text_embeds")
    with pytest.raises(ValueError, match="precompute_teachers"):
        CSALoss(8).double()(batch)
    batch = random_batch()
    batch.extras["teacher_text_embeds"] = batch.extras["teacher_text_embeds"][:3]
    with pytest.raises(ValueError, match=r"teacher_text_embeds must have shape \[batch_size=6"):
        USALoss(8).double()(batch)


# --------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("cls", [CSALoss, USALoss])
def test_gradients_reach_students_not_teachers(cls):
    batch = random_batch()
    for tensor in (batch.image_embeds, batch.text_embeds, *batch.extras.values()):
        tensor.requires_grad_(True)
    term = cls(8).double()
    term(batch).backward()
    assert batch.extras["teacher_image_embeds"].grad is None
    assert batch.extras["teacher_text_embeds"].grad is None
    assert batch.image_embeds.grad.abs().sum() > 0 and batch.text_embeds.grad.abs().sum() > 0
    assert all(p.grad is not None for p in term.parameters())


def test_two_forwards_before_backward():
    # The in-place temperature projection must not invalidate an earlier graph (e.g. gradient caching).
    term = USALoss(8).double()
    first, second = term(random_batch(seed=1)), term(random_batch(seed=2))
    (first + second).backward()


@pytest.mark.parametrize("cls", [CSALoss, USALoss])
def test_joint_permutation_invariance(cls):
    batch = random_batch(b=7, image_index=torch.tensor([0, 0, 1, 2, 3, 3, 4]))
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(5))
    permuted = GapBatch(
        image_embeds=batch.image_embeds[perm], text_embeds=batch.text_embeds[perm], logit_scale=batch.logit_scale,
        image_index=batch.image_index[perm], extras={k: v[perm] for k, v in batch.extras.items()},
    )
    term = cls(8).double()
    assert term(permuted).item() == pytest.approx(term(batch).item(), rel=1e-12)


def test_bf16_student_computes_in_float32():
    batch = random_batch(dtype=torch.bfloat16)
    batch.extras = {k: v.float() for k, v in batch.extras.items()}
    for cls in (CSALoss, USALoss):
        value = cls(8).to(torch.bfloat16)(batch)
        assert value.dtype == torch.float32 and torch.isfinite(value)


# --------------------------------------------------------------------------------------------- inside GapClipModel
def model_inputs(b=4, teacher_dim=12, seed=0, bert=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 60, (b, 7), generator=g)
    if bert:
        ids = torch.randint(1000, 2000, (b, 7), generator=g)
        ids[:, 0], ids[:, -1] = 101, 102
        ids[0, 4:] = torch.tensor([102, 0, 0])
    else:
        ids[:, 0], ids[:, -1] = 2, 3
    mask = (ids != 0).long()
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(b, 3, 32, 32, generator=g),
        "term_inputs": {
            "teacher_image_embeds": torch.randn(b, teacher_dim, generator=g),
            "teacher_text_embeds": torch.randn(b, teacher_dim + 3, generator=g),
        },
    }


def test_parameter_count_increase_is_exactly_projectors_and_temperatures():
    torch.manual_seed(0)
    plain = GapClipModel(GapClipConfig(tiny_clip_config()))
    base = sum(p.numel() for p in plain.parameters())
    d = plain.embed_dim
    usa = GapClipModel(GapClipConfig(tiny_clip_config(), gap_terms=[{"name": "usa", "weight": 0.5}]))
    assert sum(p.numel() for p in usa.parameters()) - base == 2 * (d * d + 3 * d) + 2
    both = GapClipModel(
        GapClipConfig(tiny_clip_config(), gap_terms=[{"name": "csa", "weight": 0.1}, {"name": "usa", "weight": 0.5}])
    )
    assert sum(p.numel() for p in both.parameters()) - base == 2 * (d * d + 3 * d) + 3


def test_projectors_and_temperatures_saved_and_resumed(tmp_path):
    torch.manual_seed(0)
    config = GapClipConfig(
        tiny_clip_config(), gap_terms=[{"name": "csa", "weight": 0.1}, {"name": "usa", "weight": 0.5}]
    )
    model = GapClipModel(config).eval()
    with torch.no_grad():  # move every term parameter away from its initial value
        for p in model.gap_terms.parameters():
            p.add_(0.1 * torch.randn_like(p)) if p.dim() else p.fill_(0.3)
    inputs = model_inputs()
    before = model(**inputs, return_loss=True)
    model.save_pretrained(tmp_path)
    loaded = GapClipModel.from_pretrained(tmp_path).eval()
    after = loaded(**inputs, return_loss=True)
    for name, p in model.gap_terms.state_dict().items():
        torch.testing.assert_close(loaded.gap_terms.state_dict()[name], p, msg=name)
    assert loaded.gap_terms["csa"].temperature.item() == pytest.approx(0.3)
    for key in ("csa", "usa"):
        assert after.loss_terms[key].item() == pytest.approx(before.loss_terms[key].item(), rel=1e-6)


@pytest.mark.parametrize("backbone", ["clip", "siglip", "vtde"])
def test_runs_on_tiny_backbones(backbone):
    torch.manual_seed(0)
    terms = [{"name": "csa", "weight": 0.1}, {"name": "usa", "weight": 0.5}]
    if backbone == "vtde":
        dual = tiny_vision_text_dual_encoder()
        model = GapClipModel(GapClipConfig(dual.config, gap_terms=terms), backbone=dual)
    else:
        cfg = tiny_siglip_config() if backbone == "siglip" else tiny_clip_config()
        model = GapClipModel(GapClipConfig(cfg, gap_terms=terms))
    out = model(**model_inputs(bert=backbone == "vtde"), return_loss=True)
    assert set(out.loss_terms) == {"base", "csa", "usa"}
    assert all(torch.isfinite(v) for v in out.loss_terms.values())
    out.loss.backward()
    assert model.gap_terms["usa"].image_projector[1].weight.grad is not None
    assert model.gap_terms["csa"].temperature.grad is not None


def test_model_without_teacher_inputs_points_to_the_recipe():
    model = GapClipModel(GapClipConfig(tiny_clip_config(), gap_terms=[{"name": "csa", "weight": 0.1}]))
    inputs = model_inputs()
    inputs["term_inputs"].pop("teacher_text_embeds")
    with pytest.raises(ValueError, match="precompute_teachers"):
        model(**inputs, return_loss=True)
