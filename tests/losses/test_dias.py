"""DIAS gap terms (L_dim Eq. 4-6, L_inter Eq. 7/8/15, L_intra Eq. 9/10/16, sparse masks Eq. 11-14).

References are written out with numpy loops, straight from the equations.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gapclip import GapClipConfig, GapClipModel
from gapclip.losses import TERM_REGISTRY, GapBatch, describe_terms
from gapclip.losses.dias import (
    DimensionAlignmentLoss,
    InterSpatialLoss,
    IntraSpatialLoss,
    dimension_alignment_loss,
    dimension_correlation,
    sparse_correlation_mask,
)
from gapclip.testing import tiny_clip_config, tiny_siglip_config, tiny_vision_text_dual_encoder

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------- numpy references
def np_cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def np_eq6(c: np.ndarray, shift: bool = True) -> float:
    """Eq. 6 with loops: -Σ_i (c_ii / Σ_j c_ij + c_ii / Σ_j c_ji)."""
    if shift:
        c = (1 + c) / 2
    d = c.shape[0]
    total = 0.0
    for i in range(d):
        row = sum(c[i, j] for j in range(d))
        col = sum(c[j, i] for j in range(d))
        total -= c[i, i] / row + c[i, i] / col
    return total


def np_region_word_correlation(v, vmask, t, tmask) -> np.ndarray:
    """Build the expanded dimension vectors explicitly: one coordinate per (patch, word) of the same pair."""
    d = v.shape[-1]
    mv = [[] for _ in range(d)]
    mt = [[] for _ in range(d)]
    for n in range(v.shape[0]):
        for p in range(v.shape[1]):
            for w in range(t.shape[1]):
                if vmask[n, p] and tmask[n, w]:
                    for i in range(d):
                        mv[i].append(v[n, p, i])
                        mt[i].append(t[n, w, i])
    mv, mt = np.array(mv), np.array(mt)
    return np.array([[np_cos(mv[i], mt[j]) for j in range(d)] for i in range(d)])


def np_pair_mean_correlation(v, vmask, t, tmask) -> np.ndarray:
    rows_v, rows_t = [], []
    for n in range(v.shape[0]):
        if vmask[n].any() and tmask[n].any():
            rows_v.append(v[n][vmask[n]].mean(axis=0))
            rows_t.append(t[n][tmask[n]].mean(axis=0))
    mv, mt = np.array(rows_v).T, np.array(rows_t).T
    d = v.shape[-1]
    return np.array([[np_cos(mv[i], mt[j]) for j in range(d)] for i in range(d)])


def np_spatial(img: np.ndarray, txt: np.ndarray, kind: str, positive: np.ndarray, keep=None) -> float:
    """Σ_ij b_ij d_ij² over unmatched pairs, d = x_ij - x_ji (inter) or y_ij - z_ij (intra)."""
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            if positive[i, j]:
                continue
            if kind == "inter":
                diff = np_cos(img[i], txt[j]) - np_cos(img[j], txt[i])
            else:
                diff = np_cos(img[i], img[j]) - np_cos(txt[i], txt[j])
            total += (1.0 if keep is None else keep[i, j]) * diff**2
    return total


def np_sparse_mask(diff: np.ndarray, positive: np.ndarray, beta_v, beta_t, selection="dependency") -> np.ndarray:
    """Eq. 11-14, statistics over unmatched entries, loops. ``selection="dependency"`` (our reading):
    p_ij > max(κ_i^V, κ_j^T); ``"difference"`` (as printed): |d_ij| > max(κ_i^V, κ_j^T)."""
    n = diff.shape[0]
    p = 1 / (1 + np.exp(np.abs(diff)))
    kappa_v, kappa_t = np.zeros(n), np.zeros(n)
    for i in range(n):
        row = [p[i, j] for j in range(n) if not positive[i, j]]
        col = [p[j, i] for j in range(n) if not positive[j, i]]
        kappa_v[i] = np.mean(row) + beta_v[i] * np.std(row)
        kappa_t[i] = np.mean(col) + beta_t[i] * np.std(col)
    keep = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            compared = p[i, j] if selection == "dependency" else abs(diff[i, j])
            keep[i, j] = float(not positive[i, j] and compared > max(kappa_v[i], kappa_t[j]))
    return keep


def random_locals(b=4, p=3, length=5, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(b, p, d, generator=g, dtype=torch.float64)
    t = torch.randn(b, length, d, generator=g, dtype=torch.float64)
    vmask = torch.ones(b, p, dtype=torch.bool)
    vmask[1, 2] = False  # uneven patch counts too
    lengths = torch.tensor([5, 2, 4, 1])[:b]
    tmask = torch.arange(length)[None, :] < lengths[:, None]  # N_t = 12 ≠ N_v = 11
    return v, vmask, t, tmask


def random_globals(b=6, d=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1)
    txt = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1)
    return img, txt


# --------------------------------------------------------------------------------------------- L_dim
def test_eq6_on_hand_built_matrix():
    c = torch.tensor([[1.0, 0.5], [0.25, 1.0]], dtype=torch.float64)
    # rows sum to 1.5, 1.25; columns to 1.25, 1.5
    expected = -(1 / 1.5 + 1 / 1.25 + 1 / 1.25 + 1 / 1.5)
    assert dimension_alignment_loss(c, "none").item() == pytest.approx(expected)
    assert dimension_alignment_loss(c, "shift").item() == pytest.approx(np_eq6(c.numpy(), shift=True))
    # perfectly aligned, fully decorrelated dimensions reach the minimum -2d under the shift
    assert dimension_alignment_loss(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), "shift").item() == pytest.approx(-4.0)


def test_dim_region_word_matches_expanded_vectors_with_different_nv_nt():
    v, vmask, t, tmask = random_locals()
    assert vmask.sum() != tmask.sum()
    c = dimension_correlation(v, vmask, t, tmask, "region_word")
    ref = np_region_word_correlation(v.numpy(), vmask.numpy(), t.numpy(), tmask.numpy())
    np.testing.assert_allclose(c.numpy(), ref, rtol=1e-10, atol=1e-12)
    loss = DimensionAlignmentLoss(6).compute_loss_from_locals(v, vmask, t, tmask)
    assert loss.item() == pytest.approx(np_eq6(ref), rel=1e-10)


def test_dim_pair_mean_matches_reference():
    v, vmask, t, tmask = random_locals()
    c = dimension_correlation(v, vmask, t, tmask, "pair_mean")
    np.testing.assert_allclose(c.numpy(), np_pair_mean_correlation(v.numpy(), vmask.numpy(), t.numpy(), tmask.numpy()))
    term = DimensionAlignmentLoss(6, aggregation="pair_mean", correlation_transform="none")
    loss = term.compute_loss_from_locals(v, vmask, t, tmask)
    assert loss.item() == pytest.approx(np_eq6(c.numpy(), shift=False), rel=1e-10)


def test_dim_one_local_per_pair_is_plain_cosine_of_dimension_vectors():
    """N_v = N_t = N with one patch and one word per pair: Eq. 4 literally (cosine of N-long columns)."""
    g = torch.Generator().manual_seed(3)
    v, t = torch.randn(7, 1, 4, generator=g, dtype=torch.float64), torch.randn(7, 1, 4, generator=g, dtype=torch.float64)
    ones = torch.ones(7, 1, dtype=torch.bool)
    c = dimension_correlation(v, ones, t, ones)
    mv, mt = v[:, 0].numpy(), t[:, 0].numpy()
    ref = np.array([[np_cos(mv[:, i], mt[:, j]) for j in range(4)] for i in range(4)])
    np.testing.assert_allclose(c.numpy(), ref, rtol=1e-10)


def test_padding_never_enters_dim():
    v, vmask, t, tmask = random_locals()
    term = DimensionAlignmentLoss(6)
    t_req = t.clone().requires_grad_(True)
    loss = term.compute_loss_from_locals(v, vmask, t_req, tmask)
    loss.backward()
    assert torch.all(t_req.grad[~tmask] == 0)
    garbage_t, garbage_v = t.clone(), v.clone()
    garbage_t[~tmask] = torch.tensor([1e6, -3.0, float("nan"), 7.0, 0.0, float("inf")], dtype=torch.float64)
    garbage_v[~vmask] = 123.0
    again = term.compute_loss_from_locals(garbage_v, vmask, garbage_t, tmask)
    assert again.item() == pytest.approx(loss.item(), rel=1e-12)


def test_dim_reads_batch_and_needs_locals():
    v, vmask, t, tmask = random_locals()
    img, txt = random_globals(b=4, d=6)
    batch = GapBatch(img, txt, torch.tensor(1.0), patch_embeds=v, patch_mask=vmask, token_embeds=t, token_mask=tmask)
    term = TERM_REGISTRY["dias_dim"](6)
    assert term.requires == frozenset({"local"})
    assert term(batch).item() == pytest.approx(term.compute_loss_from_locals(v, vmask, t, tmask).item())
    with pytest.raises(ValueError, match="local features"):
        term(GapBatch(img, txt, torch.tensor(1.0)))


# --------------------------------------------------------------------------------------------- L_inter / L_intra
@pytest.mark.parametrize("cls,kind", [(InterSpatialLoss, "inter"), (IntraSpatialLoss, "intra")])
def test_dense_spatial_terms_match_loops_and_skip_same_image_pairs(cls, kind):
    img, txt = random_globals()
    image_index = torch.tensor([0, 0, 1, 2, 3, 4])  # rows 0 and 1 show the same image
    img[1] = img[0]
    batch = GapBatch(img, txt, torch.tensor(1.0), image_index=image_index)
    positive = batch.positive_mask.numpy()
    term = cls(5, sparse=False)
    assert term(batch).item() == pytest.approx(np_spatial(img.numpy(), txt.numpy(), kind, positive), rel=1e-10)
    mean = cls(5, sparse=False, reduction="mean")(batch)
    assert mean.item() == pytest.approx(term(batch).item() / 36, rel=1e-12)


def test_dense_inter_equals_eq8_without_shared_images():
    img, txt = random_globals(b=4)
    x = (img @ txt.t()).numpy()
    eq8 = sum((x[i, j] - x[j, i]) ** 2 for i in range(4) for j in range(4))
    assert InterSpatialLoss(5, sparse=False)(GapBatch(img, txt, torch.tensor(1.0))).item() == pytest.approx(eq8)


def test_sparse_mask_on_hand_built_matrix():
    # |d01| = 0, |d02| = 1, |d12| = 2 → p01 = 0.5, p02 = σ(-1) ≈ 0.269, p12 = σ(-2) ≈ 0.119
    diff = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -2.0], [-1.0, 2.0, 0.0]], dtype=torch.float64)
    unmatched = ~torch.eye(3, dtype=torch.bool)
    zeros = torch.zeros(3, dtype=torch.float64)
    # β = 0: κ0 = (0.5+0.269)/2 = 0.384, κ1 = 0.310, κ2 = 0.194 → only (0,1),(1,0) exceed both thresholds
    hard = sparse_correlation_mask(diff, unmatched, zeros, zeros, mask="hard")
    assert hard.tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 0]]
    # β^V_2 = -2 lowers κ^V_2 to 0.044 and β^T_0 = -2 lowers κ^T_0 to 0.154: (2,0) survives, (0,2) does not
    beta_v = torch.tensor([0.0, 0.0, -2.0], dtype=torch.float64)
    beta_t = torch.tensor([-2.0, 0.0, 0.0], dtype=torch.float64)
    hard = sparse_correlation_mask(diff, unmatched, beta_v, beta_t, mask="hard")
    assert hard.tolist() == [[0, 1, 0], [1, 0, 0], [1, 0, 0]]
    np.testing.assert_array_equal(
        hard.numpy(), np_sparse_mask(diff.numpy(), ~unmatched.numpy(), beta_v.numpy(), beta_t.numpy())
    )
    # the straight-through mask has the hard values in forward
    ste = sparse_correlation_mask(diff, unmatched, beta_v, beta_t, mask="straight_through")
    assert torch.equal(ste.detach(), hard)


def test_literal_eq14_mask_on_hand_built_matrix():
    # Same matrix: |d01| = 0, |d02| = 1, |d12| = 2; κ (β = 0) from p: κ0 = 0.3845, κ1 = 0.3096, κ2 = 0.1941.
    # Printed Eq. 14 keeps |d_ij| > max(κ_i^V, κ_j^T): every pair with |d| in {1, 2}, never the symmetric (0, 1).
    diff = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -2.0], [-1.0, 2.0, 0.0]], dtype=torch.float64)
    unmatched = ~torch.eye(3, dtype=torch.bool)
    zeros = torch.zeros(3, dtype=torch.float64)
    hard = sparse_correlation_mask(diff, unmatched, zeros, zeros, mask="hard", selection="difference")
    assert hard.tolist() == [[0, 0, 1], [0, 0, 1], [1, 1, 0]]
    # β^V_0 = 8: κ^V_0 = 0.3845 + 8 · 0.1155 = 1.308 > |d02| = 1, so (0, 2) goes; (2, 0) compares with κ^V_2 and
    # κ^T_0 (β^T = 0) and stays.
    beta_v = torch.tensor([8.0, 0.0, 0.0], dtype=torch.float64)
    hard = sparse_correlation_mask(diff, unmatched, beta_v, zeros, mask="hard", selection="difference")
    assert hard.tolist() == [[0, 0, 0], [0, 0, 1], [1, 1, 0]]
    np.testing.assert_array_equal(
        hard.numpy(), np_sparse_mask(diff.numpy(), ~unmatched.numpy(), beta_v.numpy(), zeros.numpy(), "difference")
    )
    ste = sparse_correlation_mask(diff, unmatched, beta_v, zeros, mask="straight_through", selection="difference")
    assert torch.equal(ste.detach(), hard)


@pytest.mark.parametrize("selection", ["dependency", "difference"])
def test_literal_and_our_selection_through_the_term(selection):
    img, txt = random_globals(b=6, seed=7)
    term = InterSpatialLoss(5, selection=selection, mask="hard")
    x = (img @ txt.t()).numpy()
    diff = x - x.T
    keep = np_sparse_mask(diff, np.eye(6, dtype=bool), np.zeros(6), np.zeros(6), selection)
    expected = float((keep * diff**2).sum())
    assert term(GapBatch(img, txt, torch.tensor(1.0))).item() == pytest.approx(expected)


@pytest.mark.parametrize("cls,kind", [(InterSpatialLoss, "inter"), (IntraSpatialLoss, "intra")])
def test_sparse_spatial_terms_match_loops(cls, kind):
    img, txt = random_globals(b=7, seed=4)
    image_index = torch.tensor([0, 1, 1, 2, 3, 4, 5])
    img[2] = img[1]
    batch = GapBatch(img, txt, torch.tensor(1.0), image_index=image_index)
    positive = batch.positive_mask.numpy()
    term = cls(5)
    with torch.no_grad():
        term.beta_image[:7] = torch.linspace(-1, 1, 7)
        term.beta_text[:7] = torch.linspace(0.5, -0.5, 7)
    x_img, x_txt = img.numpy(), txt.numpy()
    if kind == "inter":
        x = x_img @ x_txt.T
        diff = x - x.T
    else:
        diff = x_img @ x_img.T - x_txt @ x_txt.T
    keep = np_sparse_mask(diff, positive, term.beta_image[:7].detach().double().numpy(),
                          term.beta_text[:7].detach().double().numpy())
    assert 0 < keep.sum() < (~positive).sum()
    expected = np_spatial(x_img, x_txt, kind, positive, keep=keep)
    assert term(batch).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("cls", [InterSpatialLoss, IntraSpatialLoss, DimensionAlignmentLoss])
def test_joint_permutation_invariance_dense(cls):
    v, vmask, t, tmask = random_locals(b=4)
    img, txt = random_globals(b=4, d=6)
    index = torch.tensor([0, 0, 1, 2])
    perm = torch.tensor([2, 0, 3, 1])
    options = {} if cls is DimensionAlignmentLoss else {"sparse": False}
    term = cls(6, **options)

    def batch(order):
        return GapBatch(img[order], txt[order], torch.tensor(1.0), image_index=index[order], patch_embeds=v[order],
                        patch_mask=vmask[order], token_embeds=t[order], token_mask=tmask[order])

    assert term(batch(perm)).item() == pytest.approx(term(batch(torch.arange(4))).item(), rel=1e-10)


@pytest.mark.parametrize("cls", [InterSpatialLoss, IntraSpatialLoss])
def test_sparse_permutation_behaviour(cls):
    """β is per row slot: equal β → invariant; distinct β → invariant once β is permuted with the rows."""
    img, txt = random_globals(b=6, seed=2)
    perm = torch.tensor([3, 5, 0, 2, 1, 4])
    term = cls(5)
    base = term.compute_loss_from_embeddings(img, txt)
    assert term.compute_loss_from_embeddings(img[perm], txt[perm]).item() == pytest.approx(base.item(), rel=1e-10)
    with torch.no_grad():
        term.beta_image[:6] = torch.tensor([-1.0, 0.5, -0.3, 1.2, 0.0, -0.8])
        term.beta_text[:6] = torch.tensor([0.4, -1.1, 0.9, -0.2, 0.3, 0.0])
    base = term.compute_loss_from_embeddings(img, txt)
    permuted = cls(5)
    with torch.no_grad():
        permuted.beta_image[:6] = term.beta_image[:6][perm]
        permuted.beta_text[:6] = term.beta_text[:6][perm]
    assert permuted.compute_loss_from_embeddings(img[perm], txt[perm]).item() == pytest.approx(base.item(), rel=1e-10)


# --------------------------------------------------------------------------------------------- β learning
@pytest.mark.parametrize("cls", [InterSpatialLoss, IntraSpatialLoss])
def test_beta_receives_gradient_and_changes(cls):
    img, txt = random_globals(b=8, seed=5)
    img.requires_grad_(True)
    term = cls(5, max_batch_size=16)
    term.compute_loss_from_embeddings(img, txt).backward()
    for beta in (term.beta_image, term.beta_text):
        assert beta.grad is not None and beta.grad[:8].abs().sum() > 0
        assert torch.all(beta.grad[8:] == 0)  # unused slots
        assert torch.all(beta.grad[:8] <= 0)  # the loss is non-increasing in β
    assert img.grad is not None and img.grad.abs().sum() > 0
    start = [term.beta_image.detach().clone(), term.beta_text.detach().clone()]
    optimizer = torch.optim.Adam(term.parameters(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        term.compute_loss_from_embeddings(img.detach(), txt).backward()
        optimizer.step()
    assert not torch.equal(term.beta_image.detach(), start[0])
    assert not torch.equal(term.beta_text.detach(), start[1])


def test_hard_mask_gives_beta_no_gradient_and_soft_differs():
    img, txt = random_globals(b=6, seed=1)
    hard = InterSpatialLoss(5, mask="hard")
    value = hard.compute_loss_from_embeddings(img.clone().requires_grad_(True), txt)
    value.backward()
    assert hard.beta_image.grad is None and hard.beta_text.grad is None
    assert not list(hard.parameters()) and set(hard.state_dict()) == {"beta_image", "beta_text"}
    assert not list(InterSpatialLoss(5, sparse=False).parameters())
    ste = InterSpatialLoss(5).compute_loss_from_embeddings(img, txt)
    assert ste.item() == pytest.approx(value.item(), rel=1e-12)  # same forward value
    soft = InterSpatialLoss(5, mask="soft", temperature=0.5).compute_loss_from_embeddings(img, txt)
    assert soft.item() != pytest.approx(value.item())


def test_batch_larger_than_max_batch_size_raises():
    img, txt = random_globals(b=5)
    with pytest.raises(ValueError, match="max_batch_size"):
        IntraSpatialLoss(5, max_batch_size=4).compute_loss_from_embeddings(img, txt)
    IntraSpatialLoss(5, max_batch_size=4, sparse=False).compute_loss_from_embeddings(img, txt)


@pytest.mark.parametrize(
    "name,options,match",
    [
        ("dias_inter", {"mask": "sigmoid"}, "mask"),
        ("dias_intra", {"reduction": "max"}, "reduction"),
        ("dias_inter", {"max_batch_size": 1}, "max_batch_size"),
        ("dias_intra", {"temperature": 0.0}, "temperature"),
        ("dias_dim", {"aggregation": "max"}, "aggregation"),
        ("dias_dim", {"correlation_transform": "abs"}, "correlation_transform"),
        ("dias_inter", {"selection": "literal"}, "selection"),
    ],
)
def test_invalid_options_raise(name, options, match):
    with pytest.raises(ValueError, match=match):
        TERM_REGISTRY[name](8, **options)


def test_registry_metadata():
    listing = describe_terms()
    for name in ("dias_dim", "dias_inter", "dias_intra"):
        term = TERM_REGISTRY[name](8)
        assert "ma2024dias" in term.citation
        assert term.get_config_dict() == {**type(term).default_options}
        assert listing[name]["summary"].startswith("DIAS")
    assert TERM_REGISTRY["dias_inter"].default_options["max_batch_size"] == 512
    assert "ω_dim = 10" in DimensionAlignmentLoss.__doc__
    assert "ω_inter = 0.05" in InterSpatialLoss.__doc__ and "ω_intra = 0.1" in IntraSpatialLoss.__doc__


def test_bf16_computes_in_float32():
    img, txt = random_globals(b=4, dtype=torch.bfloat16)
    value = InterSpatialLoss(5).to(torch.bfloat16).compute_loss_from_embeddings(img, txt)
    assert value.dtype == torch.float32 and torch.isfinite(value)


# --------------------------------------------------------------------------------------------- inside GapClipModel
ALL_TERMS = [
    {"name": "dias_dim", "weight": 10.0},
    {"name": "dias_inter", "weight": 0.05},
    {"name": "dias_intra", "weight": 0.1},
]


def model_inputs(b=4, seed=0, bert=False):
    g = torch.Generator().manual_seed(seed)
    if bert:
        ids = torch.randint(1000, 2000, (b, 7), generator=g)
        ids[:, 0], ids[:, -1] = 101, 102
        ids[0, 4:] = torch.tensor([102, 0, 0])
    else:
        ids = torch.randint(4, 60, (b, 7), generator=g)
        ids[:, 0], ids[:, -1] = 2, 3
        ids[0, 4:] = torch.tensor([3, 0, 0])
    return {
        "input_ids": ids,
        "attention_mask": (ids != 0).long(),
        "pixel_values": torch.randn(b, 3, 32, 32, generator=g),
        "image_index": torch.tensor([0, 0, 1, 2])[:b],
    }


def test_beta_saved_and_resumed(tmp_path):
    torch.manual_seed(0)
    model = GapClipModel(GapClipConfig(tiny_clip_config(), gap_terms=[{"name": "dias_inter", "weight": 0.05}]))
    out = model(**model_inputs(), return_loss=True)
    out.loss.backward()
    beta = model.gap_terms["dias_inter"].beta_image
    assert beta.grad is not None and beta.grad[:4].abs().sum() > 0
    with torch.no_grad():
        beta.copy_(torch.linspace(-1, 1, beta.numel()))
        model.gap_terms["dias_inter"].beta_text.fill_(0.25)
    model.eval()
    before = model(**model_inputs(), return_loss=True).loss_terms["dias_inter"]
    model.save_pretrained(tmp_path)
    loaded = GapClipModel.from_pretrained(tmp_path).eval()
    term = loaded.gap_terms["dias_inter"]
    torch.testing.assert_close(term.beta_image, beta.detach())
    assert torch.all(term.beta_text == 0.25)
    after = loaded(**model_inputs(), return_loss=True).loss_terms["dias_inter"]
    assert after.item() == pytest.approx(before.item(), rel=1e-6)


@pytest.mark.parametrize("backbone", ["clip", "siglip", "vision_text_dual_encoder"])
def test_all_terms_run_on_backbones(backbone):
    torch.manual_seed(0)
    if backbone == "vision_text_dual_encoder":
        encoder = tiny_vision_text_dual_encoder()
        model = GapClipModel(GapClipConfig(encoder.config, gap_terms=ALL_TERMS, base_loss="triplet"), backbone=encoder)
    else:
        config = tiny_siglip_config() if backbone == "siglip" else tiny_clip_config()
        model = GapClipModel(GapClipConfig(config, gap_terms=ALL_TERMS, base_loss="triplet"))
    inputs = model_inputs(bert=backbone == "vision_text_dual_encoder")
    out = model(**inputs, return_loss=True)
    assert set(out.loss_terms) == {"base", "dias_dim", "dias_inter", "dias_intra"}
    assert all(math.isfinite(v.item()) for v in out.loss_terms.values())
    assert out.token_mask[0].sum() < out.token_mask[1].sum()  # padding / special tokens are masked
    out.loss.backward()
    assert model.gap_terms["dias_intra"].beta_text.grad is not None
