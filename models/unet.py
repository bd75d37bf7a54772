"""A compact Stable-Diffusion-style U-Net: eps/v/x0 network over latents, text-conditioned.

Layout of guided-diffusion / LDM `UNetModel`: ResBlocks with a scale-shift (or, as
in Stable Diffusion 1/2, additive) timestep embedding, spatial transformers (self-attention, cross-attention to the
text states, GEGLU feed-forward) at chosen levels and in the middle, skip
connections from every input block to the matching output block. Residual
branches and the output conv start at zero, so the initial net outputs zeros and
each block starts as the identity (guided-diffusion's `zero_module`).

The same math as diffusers' `UNet2DConditionModel` for the configs it shares
with us; `models.interop.diffusers_unet` converts weights both ways.

The net knows nothing of the objective: what it predicts and how t is scaled is
the business of the denoiser wrapper around it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.attention import CrossAttention, norm
from models.checkpoint import check_dropout, check_int, check_int_tuple, config_from_dict, config_to_dict

__all__ = ["UNetConfig", "UNET_PRESETS", "UNet", "TimeConditioning", "timestep_embedding"]

# How a ResBlock takes the time embedding: "scale_shift" = GroupNorm(h) * (1 + scale) + shift
# (guided-diffusion, diffusers resnet_time_scale_shift="scale_shift"); "additive" =
# GroupNorm(h + proj(emb)) (Stable Diffusion 1/2 checkpoints, diffusers "default").
TimeConditioning = Literal["scale_shift", "additive"]


@dataclass
class UNetConfig:
    in_channels: int = 4  # latent channels in (the autoencoder's z_channels)
    out_channels: int = 4  # channels predicted (eps, v or x0: same shape as the input)
    channels: int = 64  # base width; level i has channels * channel_mult[i]; time embedding is 4x this
    channel_mult: tuple[int, ...] = (1, 2, 2)  # per level; the latent is downsampled 2 ** (len - 1) times
    num_res_blocks: int = 1  # ResBlocks per level on the way down (one more on the way up)
    attention_levels: tuple[int, ...] = (1, 2)  # level indices with spatial transformers (the middle always has one)
    num_heads: int = 4  # attention heads; head width = level width // num_heads (unless head_dim is set)
    context_dim: int = 512  # width of the text encoder's per-token states
    transformer_depth: int = 1  # transformer blocks per spatial transformer
    dropout: float = 0.0  # dropout in ResBlocks and feed-forwards
    gradient_checkpointing: bool = False  # recompute block activations in backward: less memory, ~30% more compute
    # Fields below default to the behaviour from before they existed, so older saved configs load unchanged.
    head_dim: int | None = None  # fixed head width instead of num_heads (SD 2: 64); heads = level width // head_dim
    time_conditioning: TimeConditioning = "scale_shift"  # how ResBlocks take the time embedding (see TimeConditioning)
    norm_groups: int = 32  # GroupNorm groups: gcd(norm_groups, width), so narrow test widths still build
    norm_eps: float = 1e-6  # GroupNorm eps in ResBlocks and the output norm (SD checkpoints: 1e-5); transformers keep 1e-6
    channels_last: bool = False  # keep weights and activations in NHWC: faster convs on CUDA tensor cores / oneDNN

    def __post_init__(self):
        check_int("in_channels", self.in_channels)
        check_int("out_channels", self.out_channels)
        check_int("channels", self.channels)
        self.channel_mult = check_int_tuple("channel_mult", self.channel_mult)
        check_int("num_res_blocks", self.num_res_blocks)
        self.attention_levels = check_int_tuple("attention_levels", self.attention_levels, minimum=0, nonempty=False)
        bad = [i for i in self.attention_levels if i >= len(self.channel_mult)]
        if bad or len(set(self.attention_levels)) != len(self.attention_levels):
            raise ValueError(
                f"attention_levels: expected distinct level indices below {len(self.channel_mult)}, "
                f"got {self.attention_levels}"
            )
        check_int("num_heads", self.num_heads)
        if self.head_dim is not None:
            check_int("head_dim", self.head_dim)
        check_int("context_dim", self.context_dim)
        check_int("transformer_depth", self.transformer_depth)
        self.dropout = check_dropout("dropout", self.dropout)
        for name in ("gradient_checkpointing", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if self.time_conditioning not in get_args(TimeConditioning):
            raise ValueError(
                f"time_conditioning: expected one of {', '.join(get_args(TimeConditioning))}, "
                f"got {self.time_conditioning!r}"
            )
        check_int("norm_groups", self.norm_groups)
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) or not self.norm_eps > 0:
            raise ValueError(f"norm_eps: expected a positive float, got {self.norm_eps!r}")
        self.norm_eps = float(self.norm_eps)
        # Heads split each attended width evenly: the attention levels and the middle.
        for level in (*self.attention_levels, len(self.channel_mult) - 1):
            width = self.channels * self.channel_mult[level]
            if self.head_dim is not None:
                if width % self.head_dim:
                    raise ValueError(f"head_dim: {self.head_dim} does not divide the width {width} of level {level}")
            elif width % self.num_heads:
                raise ValueError(f"num_heads: {self.num_heads} does not divide the width {width} of level {level}")

    def heads(self, width: int) -> int:
        """Attention heads of a spatial transformer `width` channels wide."""
        return self.num_heads if self.head_dim is None else width // self.head_dim

    @property
    def downsample_factor(self) -> int:
        """Latent height and width must be multiples of this."""
        return 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        return config_from_dict(cls, d)


# name -> factory (DiT_models style); keyword arguments override, e.g.
# UNET_PRESETS["small"](context_dim=768). "base" is Stable Diffusion 1.x's layout
# (mult 1,2,4,4; attention on the first three levels; 2 blocks; 8 heads) at 128
# instead of 320 channels. "sd1" and "sd2" are the released Stable Diffusion U-Nets
# exactly (860M parameters; load their weights with models.interop.diffusers_unet):
# additive time conditioning and GroupNorm eps 1e-5 as they were trained; SD 2 has
# 64-wide heads and OpenCLIP ViT-H's 1024-wide text states.
UNET_PRESETS: dict[str, Callable[..., UNetConfig]] = {
    "tiny": partial(UNetConfig, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1, 2), num_heads=4),
    "small": partial(UNetConfig, channels=64, channel_mult=(1, 2, 4), num_res_blocks=2, attention_levels=(1, 2), num_heads=4),
    "base": partial(UNetConfig, channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_levels=(0, 1, 2), num_heads=8),
    "sd1": partial(UNetConfig, channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_levels=(0, 1, 2),
                   num_heads=8, context_dim=768, time_conditioning="additive", norm_eps=1e-5),
    "sd2": partial(UNetConfig, channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_levels=(0, 1, 2),
                   head_dim=64, context_dim=1024, time_conditioning="additive", norm_eps=1e-5),
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) float32 (guided-diffusion's).

    [cos, sin] halves with frequencies max_period ** (-i / half): diffusers'
    `get_timestep_embedding` with flip_sin_to_cos=True, downscale_freq_shift=0
    (tests/test_unet_diffusers.py checks it).

    Frequencies run from 1 to 1/max_period, which resolves t on the scale of
    discrete training steps (0..1000); continuous-time objectives scale t to that
    range in their wrapper.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """(B, cin, H, W), emb (B, E) -> (B, cout, H, W).

    The embedding enters at the second norm: as a scale and shift after it
    ("scale_shift"), or added before it ("additive")."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        dropout: float,
        time_conditioning: TimeConditioning = "scale_shift",
        norm_groups: int = 32,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.scale_shift = time_conditioning == "scale_shift"
        self.in_norm = norm(in_channels, norm_groups, norm_eps)
        self.in_conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, (2 if self.scale_shift else 1) * out_channels)
        self.out_norm = norm(out_channels, norm_groups, norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_conv(F.silu(self.in_norm(x)))
        e = self.emb_proj(F.silu(emb))[:, :, None, None]  # (B, 2 * cout or cout, 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)  # (B, cout, 1, 1) each
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class GEGLU(nn.Module):
    """Feed-forward with a GELU-gated linear unit: (B, N, dim) -> (B, N, dim), 4x hidden."""

    def __init__(self, dim: int, dropout: float, mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(self.dropout(h * F.gelu(gate)))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the context, GEGLU; each residual."""

    def __init__(self, dim: int, heads: int, context_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, None, heads, dim // heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim // heads, dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLU(dim, dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, context_mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on the text. (B, C, H, W) -> same."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, dropout: float, norm_groups: int = 32):
        super().__init__()
        self.norm = norm(channels, norm_groups)  # eps 1e-6 whatever the ResBlocks use, as in LDM and diffusers
        # Linear projections (SD 2's use_linear_in_transformer): same as 1x1 convs,
        # applied in (B, HW, C) where the tokens already are.
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(TransformerBlock(channels, heads, context_dim, dropout) for _ in range(depth))
        self.proj_out = _zero(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        b, c, h, w = x.shape
        # (B, C, H, W) -> (B, HW, C); a view when x is channels_last.
        tokens = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c))
        for block in self.blocks:
            tokens = block(tokens, context, context_mask)
        out = self.proj_out(tokens).reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)
        return x + out


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # (B, C, H, W) -> (B, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class _Stage(nn.ModuleList):
    """A sequence of layers, each given what it needs: ResBlocks the time embedding,
    transformers the context, resamplers only x (guided-diffusion's TimestepEmbedSequential)."""

    def forward(self, x, emb, context, context_mask):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, context_mask)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c = config
        emb_dim = 4 * c.channels
        self.time_embed = nn.Sequential(nn.Linear(c.channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def transformer(width: int) -> SpatialTransformer:
            return SpatialTransformer(
                width, c.heads(width), c.transformer_depth, c.context_dim, c.dropout, c.norm_groups
            )

        def resblock(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, c.dropout, c.time_conditioning, c.norm_groups, c.norm_eps)

        self.input_blocks = nn.ModuleList([_Stage([nn.Conv2d(c.in_channels, c.channels, 3, padding=1)])])
        skip_widths, width = [c.channels], c.channels
        last = len(c.channel_mult) - 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [resblock(width, c.channels * mult)]
                width = c.channels * mult
                if level in c.attention_levels:
                    layers.append(transformer(width))
                self.input_blocks.append(_Stage(layers))
                skip_widths.append(width)
            if level != last:
                self.input_blocks.append(_Stage([Downsample(width)]))
                skip_widths.append(width)

        self.middle_block = _Stage(
            [resblock(width, width), transformer(width), resblock(width, width)]
        )

        # Each output block takes one skip (popped in reverse); each level has one
        # more block than on the way down, to consume the downsampler's skip too.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [resblock(width + skip_widths.pop(), c.channels * mult)]
                width = c.channels * mult
                if level in c.attention_levels:
                    layers.append(transformer(width))
                if level != 0 and i == c.num_res_blocks:
                    layers.append(Upsample(width))
                self.output_blocks.append(_Stage(layers))
        assert not skip_widths, "every skip connection is consumed"

        self.out_norm = norm(width, c.norm_groups, c.norm_eps)
        self.out_conv = _zero(nn.Conv2d(width, c.out_channels, 3, padding=1))
        if c.channels_last:
            self.to(memory_format=torch.channels_last)  # conv weights (O, I, kh, kw) stored NHWC-style

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, in_channels, H, W) latents, H and W multiples of config.downsample_factor;
        t: (B,) or () timesteps, int or float; context: (B, L, context_dim) text states;
        context_mask: (B, L) bool, True = real token (padding is ignored by cross-attention).
        Returns (B, out_channels, H, W)."""
        c = self.config
        f = c.downsample_factor
        if x.ndim != 4 or x.shape[1] != c.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"x: expected (B, {c.in_channels}, H, W) with H, W divisible by {f}, got {tuple(x.shape)}"
            )
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != c.context_dim:
            raise ValueError(f"context: expected (B, L, {c.context_dim}) with B = {x.shape[0]}, got {tuple(context.shape)}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])  # one timestep for the whole batch, as samplers often pass
        if t.shape != (x.shape[0],):
            raise ValueError(f"t: expected shape ({x.shape[0]},) or (), got {tuple(t.shape)}")

        # A low-precision copy of the net (bf16 weights for sampling) takes the float32 latents and
        # text states samplers pass; a no-op for a float32 net, with or without autocast.
        dtype = self.out_conv.weight.dtype
        if x.dtype != dtype:
            x = x.to(dtype)
        if context.dtype != dtype:
            context = context.to(dtype)

        if c.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # convs keep the format; cat of skips too

        # Sinusoids in float32, then the MLP's dtype (bf16 under DeepSpeed without autocast).
        emb = timestep_embedding(t, c.channels).to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(emb)  # (B, 4 * channels)

        use_ckpt = c.gradient_checkpointing and self.training and torch.is_grad_enabled()

        def run(stage: _Stage, h: torch.Tensor) -> torch.Tensor:
            if use_ckpt:
                return checkpoint(stage, h, emb, context, context_mask, use_reentrant=False)
            return stage(h, emb, context, context_mask)

        h, skips = x, []
        for stage in self.input_blocks:
            h = run(stage, h)
            skips.append(h)
        h = run(self.middle_block, h)
        for stage in self.output_blocks:
            h = run(stage, torch.cat([h, skips.pop()], dim=1))
        return self.out_conv(F.silu(self.out_norm(h)))
