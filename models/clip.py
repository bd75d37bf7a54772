"""A small CLIP trained from scratch, so that text states carry meaning where no weights can be downloaded.

The text tower is exactly the one `TextEncoder` builds from a `TextEncoderConfig` (same open_clip
text config and overrides), plus the pooled projection CLIP needs; the vision tower is a small
open_clip ViT sized for the dataset's resolution. Training uses open_clip's own `CLIP` module and
`ClipLoss`; after training, `text_encoder_from_clip` moves the text tower's weights into a
`TextEncoder` (per-token states for cross-attention), which is what the latent cache and the sampler
load. Nothing here is Ray- or MLflow-aware.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import check_int, config_from_dict, config_to_dict
from .text import TextEncoder, TextEncoderConfig, _model_cfg, text_state_from_clip

__all__ = ["VisionTowerConfig", "build_clip", "clip_text_cfg", "text_encoder_from_clip", "encode_pair"]


@dataclass
class VisionTowerConfig:
    """open_clip ViT for small images. Saved with the CLIP checkpoint."""

    image_size: int = 32  # input resolution (the dataset's)
    patch_size: int = 4  # 32 / 4 = 8x8 = 64 patch tokens
    width: int = 128
    layers: int = 3
    heads: int = 4
    embed_dim: int = 128  # joint image-text embedding width (both towers project to it)

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "width", "layers", "heads", "embed_dim"):
            check_int(name, getattr(self, name))
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size: {self.patch_size} does not divide image_size {self.image_size}")
        if self.width % self.heads:
            raise ValueError(f"heads: {self.heads} does not divide width {self.width}")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VisionTowerConfig":
        return config_from_dict(cls, d)


def clip_text_cfg(text: TextEncoderConfig) -> dict[str, Any]:
    """open_clip text_cfg for the tower `TextEncoder(text)` builds, keeping CLIP's pooled projection."""
    if text.pretrained is not None:
        raise ValueError("text.pretrained: a CLIP trained here starts from random init; set pretrained: null")
    if text.layer != "last":
        raise ValueError("text.layer: train the full tower ('last'); choose 'penultimate' only for pretrained towers")
    cfg = dict(_model_cfg(text.model)["text_cfg"])
    cfg["context_length"] = text.context_length or cfg.get("context_length", 77)
    for name in ("layers", "width", "heads"):
        if getattr(text, name) is not None:
            cfg[name] = getattr(text, name)
    return cfg


def build_clip(text: TextEncoderConfig, vision: VisionTowerConfig) -> nn.Module:
    """An open_clip CLIP with random init from text.seed (same init on every rank)."""
    from open_clip.model import CLIP

    vision_cfg = {"image_size": vision.image_size, "patch_size": vision.patch_size, "width": vision.width,
                  "layers": vision.layers, "head_width": vision.width // vision.heads}
    quick_gelu = bool(_model_cfg(text.model).get("quick_gelu", False))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(text.seed)
        return CLIP(vision.embed_dim, vision_cfg, clip_text_cfg(text), quick_gelu=quick_gelu)


def encode_pair(model: nn.Module, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """images (B, 3, R, R) in [-1, 1], tokens (B, L) -> unit image features (B, E), unit text
    features (B, E), logit scale (exp of the learned temperature). No ImageNet normalisation: the
    vision tower is trained from scratch on [-1, 1] inputs, which are already centred."""
    out = model(images, tokens)
    return out[0], out[1], out[2]


def text_encoder_from_clip(model: nn.Module, text: TextEncoderConfig) -> TextEncoder:
    """The trained text tower as a TextEncoder (per-token states; the pooled projection is dropped)."""
    enc = TextEncoder(text, load_pretrained=False)
    sd = text_state_from_clip(model.state_dict(), enc.context_length)
    enc.tower.load_state_dict(sd, strict=True)
    return enc
