"""Vector-quantised autoencoder (LDM's `VQModel`, diffusers' `VQModel`), compact.

x (B, C, H, W) in [-1, 1] -> Encoder -> quant_conv -> VectorQuantizer -> post_quant_conv -> Decoder.
The Encoder/Decoder are the KL autoencoder's (models/autoencoder.py); only the bottleneck differs.

Latent for diffusion: as LDM's `VQModelInterface`, `encode()` returns the PRE-quantisation latent
h = quant_conv(encoder(x)), (B, code_dim, H/f, W/f), and `decode(h)` quantises first, so the
diffusion model works in a continuous space and the codebook snaps its samples back onto the
learned manifold. `decode(h, quantize=False)` skips that (LDM's force_not_quantize).

The shared Encoder emits 2 * z_channels (mean and log-variance for the KL model); here
quant_conv reads all of them as plain features (LDM's VQ config sets double_z=False instead, so its
encoder's last conv is half as wide; the difference is one 3x3 conv's width).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models.autoencoder import AutoencoderConfig, Decoder, Encoder
from models.checkpoint import load_state, save_module
from models.quantize import AllReduce, QuantizerConfig, QuantizerOutput, VectorQuantizer

__all__ = [
    "AutoencoderVQConfig",
    "AutoencoderVQ",
    "VQAutoencoderOutput",
    "save_pretrained",
    "load_pretrained",
]


@dataclass
class AutoencoderVQConfig:
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)  # encoder/decoder
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)  # code_dim = latent channels

    def __post_init__(self):
        # Dicts come from JSON (config_to_dict of the nested configs).
        if isinstance(self.autoencoder, dict):
            self.autoencoder = AutoencoderConfig.from_dict(self.autoencoder)
        if isinstance(self.quantizer, dict):
            self.quantizer = QuantizerConfig.from_dict(self.quantizer)
        if not isinstance(self.autoencoder, AutoencoderConfig):
            raise ValueError(f"autoencoder: expected an AutoencoderConfig, got {type(self.autoencoder).__name__}")
        if not isinstance(self.quantizer, QuantizerConfig):
            raise ValueError(f"quantizer: expected a QuantizerConfig, got {type(self.quantizer).__name__}")

    @property
    def downsample_factor(self) -> int:
        return self.autoencoder.downsample_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(code_dim, resolution // f, resolution // f): what encode() returns per image."""
        _, h, w = self.autoencoder.latent_shape
        return (self.quantizer.code_dim, h, w)

    def to_dict(self) -> dict[str, Any]:
        return {"autoencoder": self.autoencoder.to_dict(), "quantizer": self.quantizer.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutoencoderVQConfig:
        if not isinstance(d, dict):
            raise TypeError(f"AutoencoderVQConfig.from_dict: expected a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - {"autoencoder", "quantizer"})
        if unknown:
            raise ValueError(f"AutoencoderVQConfig: unknown keys {unknown}")
        return cls(**d)


@dataclass
class VQAutoencoderOutput:
    recon: Tensor  # (B, C, H, W), roughly in [-1, 1] (not clamped)
    vq_loss: Tensor  # () codebook + commitment loss of the quantiser
    indices: Tensor  # (B, h, w) code indices
    stats: dict[str, Tensor]  # quantiser statistics (perplexity, usage, ...), detached


class AutoencoderVQ(nn.Module):
    def __init__(self, config: AutoencoderVQConfig):
        super().__init__()
        self.config = config
        ae, q = config.autoencoder, config.quantizer
        self.encoder = Encoder(ae)
        self.decoder = Decoder(ae)
        # (B, 2z, h, w), or (B, z, h, w) with double_z=False as LDM's VQ configs -> (B, D, h, w)
        self.quant_conv = nn.Conv2d(self.encoder.conv_out.out_channels, q.code_dim, 1)
        self.quantize = VectorQuantizer(q)
        self.post_quant_conv = nn.Conv2d(q.code_dim, ae.z_channels, 1)  # (B, D, h, w) -> (B, z, h, w)

    @property
    def latent_channels(self) -> int:
        return self.config.quantizer.code_dim

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's output conv weight: where AutoencoderLoss balances its adversarial term."""
        return self.decoder.conv_out.weight

    def encode(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) in [-1, 1], H, W divisible by f -> pre-quantisation latent (B, code_dim, H/f, W/f)."""
        ae, f = self.config.autoencoder, self.config.downsample_factor
        if x.ndim != 4 or x.shape[1] != ae.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"x: expected (B, {ae.in_channels}, H, W) with H, W divisible by {f}, got {tuple(x.shape)}"
            )
        return self.quant_conv(self.encoder(x))

    def quantize_latent(self, h: Tensor, *, all_reduce: AllReduce | None = None, rank: int = 0) -> QuantizerOutput:
        return self.quantize(h, all_reduce=all_reduce, rank=rank)

    def decode_quantized(self, z_q: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    def decode(self, h: Tensor, *, quantize: bool = True) -> Tensor:
        """h: (B, code_dim, h, w) as returned by encode() (or sampled by a diffusion model) -> image."""
        if h.ndim != 4 or h.shape[1] != self.latent_channels:
            raise ValueError(f"h: expected (B, {self.latent_channels}, h, w), got {tuple(h.shape)}")
        z_q = self.quantize(h, update=False).z_q if quantize else h
        return self.decode_quantized(z_q)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """(B, h, w) code indices -> image, for priors over codes."""
        return self.decode_quantized(self.quantize.codes_from_indices(indices))

    def forward(self, x: Tensor, *, all_reduce: AllReduce | None = None, rank: int = 0) -> VQAutoencoderOutput:
        """Reconstruction through the codebook. all_reduce/rank: see models/quantize.py (data parallel)."""
        q = self.quantize(self.encode(x), all_reduce=all_reduce, rank=rank)
        return VQAutoencoderOutput(self.decode_quantized(q.z_q), q.loss, q.indices, q.stats)


def save_pretrained(model: AutoencoderVQ, directory, extra: dict[str, Any] | None = None) -> Path:
    """Write `model.safetensors` + `config.json` ({"autoencoder": ..., "quantizer": ...}, extra)."""
    return save_module(model, model.config.to_dict(), directory, extra)


def load_pretrained(directory, map_location: str | torch.device = "cpu") -> tuple[AutoencoderVQ, dict[str, Any]]:
    """Rebuild the model saved by `save_pretrained`: (model in eval mode, extra)."""
    config_dict, state, extra = load_state(directory, "cpu")
    model = AutoencoderVQ(AutoencoderVQConfig.from_dict(config_dict))
    model.load_state_dict(state)  # strict: config and weights must agree
    return model.to(map_location).eval(), extra
