"""GapClipModel on the three backbone families: output contract, local features, logit scale, persistence, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel

from gapclip import TERM_REGISTRY, GapClipConfig, GapClipModel, GapClipOutput, GapTerm, register_term
from gapclip.losses import InfoNCELoss, SigmoidLoss, TermInput, TripletLoss
from gapclip.testing import tiny_clip_config

from .conftest import clip_text_batch, pixel_batch

CLS, SEP, PAD = 101, 102, 0  # MiniLM (BERT) special ids


def bert_inputs(batch_size: int = 3, length: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """[CLS] words [SEP] [PAD]… with ragged lengths, in MiniLM's vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([length, length - 2, 4][:batch_size])
    input_ids = torch.randint(1000, 2000, (batch_size, length), generator=generator)
    attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    input_ids[:, 0] = CLS
    input_ids[torch.arange(batch_size), lengths - 1] = SEP
    input_ids = input_ids.masked_fill(attention_mask == 0, PAD)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_batch(batch_size)}


@pytest.fixture(params=["clip", "siglip", "vtde"])
def family_model_and_inputs(request, make_clip_model, make_siglip_model, make_vtde_model, clip_inputs):
    if request.param == "clip":
        return request.param, make_clip_model(), clip_inputs
    if request.param == "siglip":
        return request.param, make_siglip_model(), clip_inputs
    return request.param, make_vtde_model(), bert_inputs()


# ---------------------------------------------------------------------------------------------------- output contract
def test_forward_output_contract(family_model_and_inputs):
    family, model, inputs = family_model_and_inputs
    with torch.no_grad():
        out = model(**inputs)
    batch_size = inputs["input_ids"].shape[0]
    assert isinstance(out, GapClipOutput)
    assert out.loss is None and out.loss_terms is None
    assert out.image_embeds.shape == out.text_embeds.shape == (batch_size, model.embed_dim)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(batch_size))
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(batch_size))
    scale, bias = model.logit_scale_and_bias()
    expected = scale * out.text_embeds @ out.image_embeds.t() + (0.0 if bias is None else bias)
    torch.testing.assert_close(out.logits_per_text, expected)
    torch.testing.assert_close(out.logits_per_image, out.logits_per_text.t())
    assert (bias is not None) == (family == "siglip")
    # The embeddings are the normalised projected features of the encoding path.
    torch.testing.assert_close(out.image_embeds, F.normalize(model.get_image_features(inputs["pixel_values"]), dim=-1))
    torch.testing.assert_close(
        out.text_embeds, F.normalize(model.get_text_features(inputs["input_ids"], inputs["attention_mask"]), dim=-1)
    )
    assert out.patch_embeds is None and out.token_embeds is None


def test_forward_needs_both_modalities(make_clip_model, clip_inputs):
    with pytest.raises(ValueError, match="needs both `input_ids` and `pixel_values`"):
        make_clip_model()(input_ids=clip_inputs["input_ids"])


# ---------------------------------------------------------------------------------------------------- local features
def test_local_features_clip(make_clip_model, clip_inputs):
    model = make_clip_model()
    with torch.no_grad():
        out = model(**clip_inputs, return_local=True)
    ids, attention = clip_inputs["input_ids"], clip_inputs["attention_mask"]
    num_patches = (32 // 8) ** 2
    assert out.patch_embeds.shape == (4, num_patches, 16)
    assert out.patch_mask.dtype == torch.bool and out.patch_mask.all() and out.patch_mask.shape == (4, num_patches)
    assert out.token_embeds.shape == (*ids.shape, 16)
    expected = attention.bool() & (ids != 0) & (ids != 2) & (ids != 3)  # no PAD, BOS, EOS
    assert torch.equal(out.token_mask, expected)
    # CLIP pools its text at the EOS token: the projected EOS token is the (unnormalised) text embedding.
    eos = attention.sum(dim=1) - 1
    pooled = out.token_embeds[torch.arange(4), eos]
    torch.testing.assert_close(F.normalize(pooled, dim=-1), out.text_embeds)


def test_local_features_siglip(make_siglip_model, clip_inputs):
    model = make_siglip_model()
    with torch.no_grad():
        out = model(**clip_inputs, return_local=True)
    ids, attention = clip_inputs["input_ids"], clip_inputs["attention_mask"]
    assert out.patch_embeds.shape == (4, 16, 32) and out.patch_mask.all()
    assert out.token_embeds.shape == (*ids.shape, 32)
    assert torch.equal(out.token_mask, attention.bool() & (ids != 0) & (ids != 3))  # no PAD, EOS
    # SigLIP pools its text at the last position through `head`: the same map the word tokens go through.
    torch.testing.assert_close(F.normalize(out.token_embeds[:, -1], dim=-1), out.text_embeds)


def test_local_features_vision_text_dual_encoder(make_vtde_model):
    model = make_vtde_model()
    inputs = bert_inputs()
    with torch.no_grad():
        out = model(**inputs, return_local=True)
    ids, attention = inputs["input_ids"], inputs["attention_mask"]
    assert out.patch_embeds.shape == (3, 16, 16) and out.patch_mask.all()  # ViT: CLS dropped, 4x4 patches
    assert out.token_embeds.shape == (*ids.shape, 16)
    expected = attention.bool() & (ids != CLS) & (ids != SEP) & (ids != PAD)
    assert torch.equal(out.token_mask, expected)
    assert out.token_mask.sum(dim=1).tolist() == [6, 4, 2]
    # A word_mask from the collator takes precedence over the default.
    custom = torch.zeros_like(ids, dtype=torch.bool)
    custom[:, 1] = True
    with torch.no_grad():
        out = model(**inputs, word_mask=custom, return_local=True)
    assert torch.equal(out.token_mask, custom)


# ---------------------------------------------------------------------------------------------------- logit scale
def test_logit_scale_is_clamped_at_100(make_clip_model, clip_inputs):
    model = make_clip_model()
    with torch.no_grad():
        model.backbone.logit_scale.fill_(math.log(1000.0))
        out = model(**clip_inputs)
    scale, _ = model.logit_scale_and_bias()
    assert scale.item() == pytest.approx(100.0, rel=1e-5)
    torch.testing.assert_close(out.logits_per_text, 100.0 * out.text_embeds @ out.image_embeds.t())
    with torch.no_grad():
        model.backbone.logit_scale.fill_(math.log(20.0))  # below the clamp: unchanged
    assert model.logit_scale_and_bias()[0].item() == pytest.approx(20.0, rel=1e-5)


def test_logit_scale_max_comes_from_the_config(make_clip_model):
    model = make_clip_model(logit_scale_max=10.0)
    with torch.no_grad():
        model.backbone.logit_scale.fill_(math.log(1000.0))
    assert model.logit_scale_and_bias()[0].item() == pytest.approx(10.0, rel=1e-5)


# ---------------------------------------------------------------------------------------------------- persistence
def test_save_and_load_round_trip(family_model_and_inputs, tmp_path):
    family, model, inputs = family_model_and_inputs
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    loaded = GapClipModel.from_pretrained(tmp_path).eval()
    assert loaded.config.backbone_config.model_type == model.config.backbone_config.model_type
    with torch.no_grad():
        expected, got = model(**inputs), loaded(**inputs)
    torch.testing.assert_close(got.image_embeds, expected.image_embeds, rtol=0, atol=0)
    torch.testing.assert_close(got.text_embeds, expected.text_embeds, rtol=0, atol=0)
    torch.testing.assert_close(got.logits_per_text, expected.logits_per_text, rtol=0, atol=0)


def test_from_backbone_matches_the_backbones_own_features(tmp_path, clip_inputs):
    torch.manual_seed(0)
    clip = CLIPModel(tiny_clip_config()).eval()
    clip.save_pretrained(tmp_path / "clip")
    model = GapClipModel.from_backbone(str(tmp_path / "clip")).eval()
    assert model.config.backbone_config.model_type == "clip"
    with torch.no_grad():
        image = clip.get_image_features(pixel_values=clip_inputs["pixel_values"])
        text = clip.get_text_features(input_ids=clip_inputs["input_ids"], attention_mask=clip_inputs["attention_mask"])
        image = getattr(image, "pooler_output", image)  # transformers 5 returns an output with the projection
        text = getattr(text, "pooler_output", text)
        torch.testing.assert_close(model.get_image_features(clip_inputs["pixel_values"]), image)
        torch.testing.assert_close(
            model.get_text_features(clip_inputs["input_ids"], clip_inputs["attention_mask"]), text
        )
        # ... and the logits equal CLIPModel's.
        ours, theirs = model(**clip_inputs), clip(**clip_inputs)
    torch.testing.assert_close(ours.logits_per_image, theirs.logits_per_image)


# ---------------------------------------------------------------------------------------------------- loss and errors
def test_batch_of_one_with_loss_is_a_clear_error(make_clip_model):
    inputs = {**clip_text_batch(batch_size=1), "pixel_values": pixel_batch(1)}
    with pytest.raises(ValueError, match="single image-caption pair.*batch_size"):
        make_clip_model()(**inputs, return_loss=True)


def test_return_loss_gives_base_term_and_gradients(make_clip_model, clip_inputs):
    model = make_clip_model().train()
    out = model(**clip_inputs, return_loss=True)
    assert set(out.loss_terms) == {"base"}
    torch.testing.assert_close(out.loss, out.loss_terms["base"])
    expected = InfoNCELoss.compute_loss_from_logits(out.logits_per_image, torch.eye(4, dtype=torch.bool))
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.backbone.logit_scale.grad is not None
    assert model.backbone.visual_projection.weight.grad.abs().sum() > 0


def test_shared_image_index_changes_the_targets(make_clip_model, clip_inputs):
    model = make_clip_model()
    image_index = torch.tensor([0, 0, 1, 2])
    with torch.no_grad():
        out = model(**clip_inputs, image_index=image_index, return_loss=True)
    expected = InfoNCELoss.compute_loss_from_logits(out.logits_per_image, image_index[:, None] == image_index[None, :])
    torch.testing.assert_close(out.loss, expected)


def test_base_loss_auto_resolution(make_clip_model, make_siglip_model, make_vtde_model):
    assert isinstance(make_clip_model().base_loss, InfoNCELoss)
    assert isinstance(make_siglip_model().base_loss, SigmoidLoss)
    assert make_siglip_model().config.resolved_base_loss == "sigmoid"
    assert isinstance(make_vtde_model().base_loss, InfoNCELoss)
    triplet = make_clip_model(base_loss="triplet", triplet_margin=0.3, triplet_mining="sum").base_loss
    assert isinstance(triplet, TripletLoss) and (triplet.margin, triplet.mining) == (0.3, "sum")


def test_sigmoid_base_loss_on_clip_is_a_clear_error():
    with pytest.raises(ValueError, match="base_loss='sigmoid' needs a backbone with a logit bias.*'clip'"):
        GapClipModel(GapClipConfig(tiny_clip_config(), base_loss="sigmoid"))


def test_siglip_loss_matches_siglip_model(make_siglip_model, clip_inputs):
    model = make_siglip_model()
    with torch.no_grad():
        ours = model(**clip_inputs, return_loss=True)
        theirs = model.backbone(**clip_inputs, return_loss=True)
    torch.testing.assert_close(ours.logits_per_image, theirs.logits_per_image)
    torch.testing.assert_close(ours.loss, theirs.loss)


def test_wrapping_keeps_the_backbones_attention_implementation(make_vtde_model):
    """Regression: GapClipConfig used to reset the shared backbone config's attention implementation to None, and
    then the BERT tower of a wrapped VisionTextDualEncoder ignored its padding mask."""
    model = make_vtde_model()
    assert model.backbone.text_model.config._attn_implementation == "sdpa"
    inputs = bert_inputs()
    with torch.no_grad():
        padded = model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
        short = model.get_text_features(inputs["input_ids"][2:, :4], inputs["attention_mask"][2:, :4])
    torch.testing.assert_close(padded[2:], short, atol=1e-5, rtol=1e-5)
    explicit = GapClipConfig(tiny_clip_config(), attn_implementation="eager")
    assert explicit.backbone_config.text_config._attn_implementation == "eager"


# ---------------------------------------------------------------------------------------------------- term inputs
class _WeightedInput(GapTerm):
    """Weights each pair's cosine by a per-row input, passed through an encode hook; adds a per-batch table."""

    name = "_test_weighted_input"
    inputs = (TermInput("row_weight"), TermInput("table", gather=False))

    def encode_inputs(self, inputs, model):
        assert isinstance(model, GapClipModel)  # the hook may encode through the model's towers
        return {"doubled_weight": 2.0 * inputs["row_weight"], "table": inputs["table"]}

    def forward(self, batch):
        cosine = (batch.image_embeds * batch.text_embeds).sum(-1)
        return (batch.extras["doubled_weight"] * cosine).mean() + batch.extras["table"].sum()


@pytest.fixture
def weighted_input_term():
    register_term(_WeightedInput)
    yield _WeightedInput
    TERM_REGISTRY.pop(_WeightedInput.name, None)


def test_term_inputs_reach_the_term_through_its_hook(weighted_input_term, make_clip_model, clip_inputs):
    model = make_clip_model(gap_terms=[{"name": _WeightedInput.name, "weight": 0.5}])
    assert model.declared_term_inputs == _WeightedInput.inputs
    weights, table = torch.tensor([1.0, 0.0, 2.0, 3.0]), torch.tensor([0.25, 0.5, 1.0])
    out = model(**clip_inputs, return_loss=True, term_inputs={"row_weight": weights, "table": table, "other": 1})
    expected = (2.0 * weights * (out.image_embeds * out.text_embeds).sum(-1)).mean() + 1.75
    torch.testing.assert_close(out.loss_terms[_WeightedInput.name], expected)
    torch.testing.assert_close(out.loss, out.loss_terms["base"] + 0.5 * expected)
    with pytest.raises(ValueError) as info:
        model(**clip_inputs, return_loss=True, term_inputs={"row_weight": weights})
    message = str(info.value)
    assert f"gap term(s) ['{_WeightedInput.name}'] need input 'table'" in message and "has ['row_weight']" in message
    model(**clip_inputs)  # no loss asked for: no term input needed


def test_terms_sharing_an_input_must_declare_it_alike(weighted_input_term, make_clip_model):
    class _Other(GapTerm):
        name = "_test_other_table"
        inputs = (TermInput("table"),)  # gathered, unlike _WeightedInput's

        def forward(self, batch):
            return batch.image_embeds.sum() * 0.0

    register_term(_Other)
    try:
        model = make_clip_model(gap_terms=[_WeightedInput.name, _Other.name])
        with pytest.raises(ValueError, match="terms that share an input must declare it the same way"):
            model.declared_term_inputs
    finally:
        TERM_REGISTRY.pop(_Other.name, None)


def test_only_inputs_declared_per_row_are_gathered(weighted_input_term, make_clip_model, clip_inputs, monkeypatch):
    """What a second process would add, simulated: gathering repeats every per-row tensor; ``gather=False`` stays."""
    seen = {}

    def fake_gather(tensor, *, gather_with_grad=True, pad_value=0.0):
        return torch.cat([tensor, tensor])

    def record(batch):
        seen.update(batch.extras)
        return batch.image_embeds.sum() * 0.0

    monkeypatch.setattr("gapclip.modeling.gather_features", fake_gather)
    monkeypatch.setattr(_WeightedInput, "forward", lambda self, batch: record(batch))
    model = make_clip_model(gap_terms=[_WeightedInput.name])
    model(**clip_inputs, return_loss=True, term_inputs={"row_weight": torch.ones(4), "table": torch.ones(3)})
    assert seen["doubled_weight"].shape == (8,) and seen["table"].shape == (3,)
