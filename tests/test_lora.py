"""LoRA on the backbone (gapclip.lora): what trains, saving/reloading, merging."""

from __future__ import annotations

import pytest
import torch

from gapclip import GapClipConfig, GapClipModel
from gapclip.lora import (
    apply_lora,
    count_lora_layers,
    is_lora_model,
    load_gapclip_model,
    merge_lora,
    trainable_parameter_summary,
)
from gapclip.testing import tiny_clip_config, tiny_siglip_config, tiny_vision_text_dual_encoder

peft = pytest.importorskip("peft")

TERMS = [{"name": "dias_inter", "weight": 0.5}]  # owns parameters (β)


def tiny_clip_model(gap_terms=TERMS) -> GapClipModel:
    torch.manual_seed(0)
    return GapClipModel(GapClipConfig(tiny_clip_config(), gap_terms=gap_terms)).eval()


def tiny_vtde_model() -> GapClipModel:
    torch.manual_seed(0)
    backbone = tiny_vision_text_dual_encoder()
    return GapClipModel(GapClipConfig(backbone.config), backbone=backbone).eval()


def randomise_adapters(model: GapClipModel, seed: int = 1) -> None:
    """LoRA B starts at zero (the adapter is then the identity): give it values so merging is really tested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


def clip_batch(batch_size: int = 4, seq_len: int = 7):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, 60, (batch_size, seq_len), generator=generator)
    input_ids[:, 0] = 2
    input_ids[:, -1] = 3
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, -3:] = torch.tensor([3, 0, 0])
    attention_mask[1, -2:] = 0
    pixel_values = torch.randn(batch_size, 3, 32, 32, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def vtde_batch(batch_size: int = 4):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 5000, (batch_size, 6), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = 101, 102
    attention_mask = torch.ones_like(input_ids)
    input_ids[2, -2:] = torch.tensor([102, 0])
    attention_mask[2, -1] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "pixel_values": torch.randn(batch_size, 3, 32, 32, generator=generator)}


def features(model: GapClipModel, batch) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return (
            model.get_image_features(batch["pixel_values"]),
            model.get_text_features(batch["input_ids"], batch["attention_mask"]),
        )


def trainable_names(model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


# ------------------------------------------------------------------------------------------------------ what trains
def test_clip_only_adapters_logit_scale_and_term_parameters_train():
    model = apply_lora(tiny_clip_model(), r=4, alpha=8, dropout=0.0)
    names = trainable_names(model)
    assert is_lora_model(model)
    assert count_lora_layers(model) == 2 * 2 * 4  # 2 towers × 2 layers × q/k/v/out
    non_adapter = {name for name in names if ".lora_A." not in name and ".lora_B." not in name}
    assert non_adapter == {
        "backbone.base_model.model.logit_scale", "gap_terms.dias_inter.beta_image", "gap_terms.dias_inter.beta_text"
    }
    assert not any("projection" in name or "embeddings" in name for name in names)
    trainable, total, pct = trainable_parameter_summary(model)
    expected = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected and total == sum(p.numel() for p in model.parameters())
    assert 0 < pct < 15
    assert {key: model.config.lora[key] for key in ("r", "alpha", "dropout")} == {"r": 4, "alpha": 8, "dropout": 0.0}


def test_vision_text_dual_encoder_targets_vit_and_bert_attention():
    model = apply_lora(tiny_vtde_model(), r=4, alpha=16, dropout=0.0)
    from peft.tuners.lora import LoraLayer

    wrapped = {
        name.split("base_model.model.")[-1] for name, module in model.named_modules() if isinstance(module, LoraLayer)
    }
    bert_layers = model.backbone.config.text_config.num_hidden_layers
    assert len(wrapped) == 2 * 4 + bert_layers * 4  # ViT q/k/v/o + BERT query/key/value/attention.output.dense
    assert "vision_model.layers.0.attention.o_proj" in wrapped
    assert "text_model.encoder.layer.0.attention.self.query" in wrapped
    assert "text_model.encoder.layer.0.attention.output.dense" in wrapped
    assert "text_model.encoder.layer.0.output.dense" not in wrapped  # the MLP output is not attention
    non_adapter = {n for n in trainable_names(model) if ".lora_A." not in n and ".lora_B." not in n}
    assert non_adapter == {"backbone.base_model.model.logit_scale"}


def test_siglip_keeps_logit_bias_trainable_and_skips_the_pooling_head():
    torch.manual_seed(0)
    model = apply_lora(GapClipModel(GapClipConfig(tiny_siglip_config())), r=2)
    non_adapter = {n for n in trainable_names(model) if ".lora_A." not in n and ".lora_B." not in n}
    assert non_adapter == {"backbone.base_model.model.logit_scale", "backbone.base_model.model.logit_bias"}
    assert count_lora_layers(model) == 2 * 2 * 4
    assert not any("head" in n and "lora" in n for n, _ in model.named_parameters())


def test_custom_targets_and_errors():
    model = apply_lora(tiny_clip_model([]), r=2, target_modules=["q_proj", "v_proj"])
    assert count_lora_layers(model) == 2 * 2 * 2
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, r=2)
    with pytest.raises(ValueError, match="positive integer"):
        apply_lora(tiny_clip_model([]), r=0)


def test_one_optimizer_step_changes_only_trainable_parameters():
    model = apply_lora(tiny_clip_model(), r=4, alpha=8, dropout=0.0).train()
    randomise_adapters(model)  # so lora_A gets a gradient too
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = model(**clip_batch(), return_loss=True).loss
    loss.backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    frozen = set(before) - trainable_names(model)
    assert not changed & frozen
    assert any(".lora_A." in name for name in changed) and any(".lora_B." in name for name in changed)
    assert "backbone.base_model.model.logit_scale" in changed


# ------------------------------------------------------------------------------------------------------ save / load
def test_save_reload_resume_and_merge(tmp_path):
    model = apply_lora(tiny_clip_model(), r=4, alpha=8)
    randomise_adapters(model)
    batch = clip_batch()
    reference = features(model, batch)
    model.save_pretrained(tmp_path / "ckpt")

    reloaded = load_gapclip_model(tmp_path / "ckpt")
    assert is_lora_model(reloaded) and reloaded.config.lora == model.config.lora
    assert trainable_names(reloaded) == trainable_names(model)
    for ours, theirs in zip(reference, features(reloaded, batch)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # the reloaded model resumes training from the same state: same loss, same gradients
    reloaded.train(), model.train()
    loss_a, loss_b = model(**batch, return_loss=True).loss, reloaded(**batch, return_loss=True).loss
    torch.testing.assert_close(loss_a, loss_b)

    merge_lora(reloaded.eval())
    assert not is_lora_model(reloaded) and type(reloaded.backbone).__name__ == "CLIPModel"
    assert getattr(reloaded.config, "lora", None) is None and reloaded.config.merged_lora["r"] == 4
    for ours, theirs in zip(reference, features(reloaded, batch)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # a merged checkpoint is a plain gapclip checkpoint again
    reloaded.save_pretrained(tmp_path / "merged")
    plain = GapClipModel.from_pretrained(tmp_path / "merged").eval()
    for ours, theirs in zip(reference, features(plain, batch)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_vtde_save_reload_merge(tmp_path):
    model = apply_lora(tiny_vtde_model(), r=4, alpha=16)
    randomise_adapters(model)
    batch = vtde_batch()
    reference = features(model, batch)
    model.save_pretrained(tmp_path / "ckpt")
    reloaded = load_gapclip_model(tmp_path / "ckpt")
    for ours, theirs in zip(reference, features(reloaded, batch)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    merge_lora(reloaded)
    for ours, theirs in zip(reference, features(reloaded, batch)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_load_gapclip_model_without_lora_is_from_pretrained(tmp_path):
    model = tiny_clip_model([])
    model.save_pretrained(tmp_path)
    reloaded = load_gapclip_model(tmp_path)
    assert not is_lora_model(reloaded)
    for ours, theirs in zip(features(model, clip_batch()), features(reloaded, clip_batch())):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
