"""KL-regularised autoencoder of latent diffusion (CompVis LDM `AutoencoderKL`), compact.

Images x in [-1, 1], (B, C, H, W), map to a diagonal Gaussian over latents
(B, z, H/f, W/f) with f = 2 ** (len(ch_mult) - 1); the decoder maps a latent
sample back to pixels. The net is fully convolutional: any H, W divisible by f
work; `resolution` only decides at which feature-map sizes attention is built.

Layout follows LDM's `Encoder`/`Decoder` (taming-transformers lineage) layer for
layer: GroupNorm (eps 1e-6) + SiLU ResNet blocks, stride-2 downsampling convs
padded (0, 1, 0, 1), nearest upsampling + conv, num_res_blocks + 1 blocks per
decoder level, single-head attention in the middle block (and optionally at
`attn_resolutions`). Parameter names are our own; diffusers' `AutoencoderKL`
has the same layout, and `models.interop.diffusers_autoencoder` maps weights
1:1 both ways.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import SelfAttention2d
from models.checkpoint import (
    check_dropout,
    check_int,
    check_int_tuple,
    config_from_dict,
    config_to_dict,
    load_state,
    save_module,
)

__all__ = [
    "AutoencoderConfig",
    "AUTOENCODER_PRESETS",
    "DiagonalGaussian",
    "AttnBlock",
    "Encoder",
    "Decoder",
    "AutoencoderKL",
    "kl_autoencoder_loss",
    "save_pretrained",
    "load_pretrained",
    "load_state_checked",
]


# LDM's Normalize(): GroupNorm with 32 groups, eps 1e-6, affine.
LDM_NORM_GROUPS = 32
NORM_EPS = 1e-6


@dataclass
class AutoencoderConfig:
    in_channels: int = 3  # image channels; the decoder outputs the same number
    resolution: int = 32  # training image size (square); fixes where attention sits, see attn_resolutions
    ch: int = 64  # base channel count; level i has ch * ch_mult[i] channels
    ch_mult: tuple[int, ...] = (1, 2, 2)  # per level; downsampling factor f = 2 ** (len(ch_mult) - 1)
    num_res_blocks: int = 1  # ResNet blocks per encoder level (the decoder uses one more, as LDM)
    attn_resolutions: tuple[int, ...] = ()  # feature-map sizes (in units of `resolution`) with self-attention
    mid_attention: bool = True  # self-attention in the middle block, at the latent resolution
    z_channels: int = 4  # latent channels; the encoder emits 2 * z_channels (mean and log-variance)
    dropout: float = 0.0  # dropout inside ResNet blocks
    # GroupNorm groups: each norm over `width` channels uses gcd(norm_num_groups, width),
    # i.e. exactly norm_num_groups (LDM: 32) at widths it divides, fewer for narrow test nets.
    norm_num_groups: int = LDM_NORM_GROUPS
    # Encoder output: 2 * z_channels (mean and log-variance, KL) or z_channels (VQ, LDM's double_z=False).
    double_z: bool = True

    def __post_init__(self):
        check_int("in_channels", self.in_channels)
        check_int("resolution", self.resolution)
        check_int("ch", self.ch)
        self.ch_mult = check_int_tuple("ch_mult", self.ch_mult)
        check_int("num_res_blocks", self.num_res_blocks)
        self.attn_resolutions = check_int_tuple("attn_resolutions", self.attn_resolutions, nonempty=False)
        if not isinstance(self.mid_attention, bool):
            raise ValueError(f"mid_attention: expected a bool, got {self.mid_attention!r}")
        check_int("z_channels", self.z_channels)
        self.dropout = check_dropout("dropout", self.dropout)
        check_int("norm_num_groups", self.norm_num_groups)
        if not isinstance(self.double_z, bool):
            raise ValueError(f"double_z: expected a bool, got {self.double_z!r}")
        f = self.downsample_factor
        if self.resolution % f:
            raise ValueError(f"resolution: {self.resolution} is not divisible by the downsampling factor {f}")
        # An attention size that no level has would silently build nothing.
        sizes = [self.resolution // 2**i for i in range(len(self.ch_mult))]
        missing = sorted(set(self.attn_resolutions) - set(sizes))
        if missing:
            raise ValueError(f"attn_resolutions: {missing} are not feature-map sizes of this net ({sizes})")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def widths(self) -> tuple[int, ...]:
        """Channels of each level, ch * ch_mult[i]."""
        return tuple(self.ch * m for m in self.ch_mult)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(z_channels, resolution // f, resolution // f) for a `resolution`-sized image."""
        side = self.resolution // self.downsample_factor
        return (self.z_channels, side, side)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutoencoderConfig:
        return config_from_dict(cls, d)


# name -> factory; keyword arguments override preset fields, e.g.
# AUTOENCODER_PRESETS["small-f8"](resolution=256). z_channels = 4 throughout so any
# preset feeds a U-Net with in_channels = 4. The small ones put a 16x16 latent at
# their training resolution.
AUTOENCODER_PRESETS: dict[str, Callable[..., AutoencoderConfig]] = {
    "tiny-f4": partial(AutoencoderConfig, resolution=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1),
    "small-f4": partial(AutoencoderConfig, resolution=64, ch=64, ch_mult=(1, 2, 4), num_res_blocks=2),
    "small-f8": partial(AutoencoderConfig, resolution=128, ch=64, ch_mult=(1, 2, 4, 4), num_res_blocks=2),
}


class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) from the encoder's (B, 2z, h, w) output."""

    def __init__(self, parameters: torch.Tensor):
        if parameters.ndim != 4 or parameters.shape[1] % 2:
            raise ValueError(f"parameters: expected (B, 2*z, h, w), got {tuple(parameters.shape)}")
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)  # (B, z, h, w) each
        # LDM's clamp: keeps exp() finite early in training, when the encoder is random.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise  # (B, z, h, w)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over (z, h, w): (B,)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


def group_norm(channels: int, groups: int = LDM_NORM_GROUPS) -> nn.GroupNorm:
    """GroupNorm with gcd(groups, channels) groups: `groups` where it divides the width, as LDM."""
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice, plus a 1x1 shortcut when the width changes. (B, cin, H, W) -> (B, cout, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, norm_groups: int = LDM_NORM_GROUPS):
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv, padded (0, 1, 0, 1) as LDM so even sizes halve exactly."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H, W) -> (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class AttnBlock(SelfAttention2d):
    """LDM's AttnBlock (single head, q/k/v fused in one 1x1 conv) with the config's norm groups.

    (B, C, H, W) -> (B, C, H, W), residual. Parameter names are SelfAttention2d's.
    """

    def __init__(self, channels: int, norm_groups: int = LDM_NORM_GROUPS):
        super().__init__(channels)
        self.norm = group_norm(channels, norm_groups)


class _Level(nn.Module):
    """ResNet blocks, each optionally followed by attention, then an optional resample."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], resample: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, attn in zip(self.blocks, self.attns):
            x = attn(block(x))
        return self.resample(x)


class _MidBlock(nn.Module):
    def __init__(self, channels: int, attention: bool, dropout: float, norm_groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, norm_groups)
        self.attn_1 = AttnBlock(channels, norm_groups) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout, norm_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, 2 * z_channels, H/f, W/f): mean and log-variance stacked.

    With config.double_z False: (B, z_channels, H/f, W/f), the VQ encoder's output.
    """

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        c = config
        g = c.norm_num_groups
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        levels, block_in, res = [], c.ch, c.resolution
        for i, mult in enumerate(c.ch_mult):
            block_out = c.ch * mult
            blocks, attns = [], []
            for _ in range(c.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, c.dropout, g))
                attns.append(AttnBlock(block_out, g) if res in c.attn_resolutions else nn.Identity())
                block_in = block_out
            last = i == len(c.ch_mult) - 1
            levels.append(_Level(blocks, attns, nn.Identity() if last else Downsample(block_in)))
            res = res if last else res // 2
        self.levels = nn.ModuleList(levels)
        self.mid = _MidBlock(block_in, c.mid_attention, c.dropout, g)
        self.norm_out = group_norm(block_in, g)
        out_channels = 2 * c.z_channels if c.double_z else c.z_channels
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.levels:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, in_channels, h*f, w*f). Mirrors the encoder, one extra block per level."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        c = config
        g = c.norm_num_groups
        block_in = c.ch * c.ch_mult[-1]
        res = c.resolution // c.downsample_factor
        self.conv_in = nn.Conv2d(c.z_channels, block_in, 3, padding=1)
        self.mid = _MidBlock(block_in, c.mid_attention, c.dropout, g)
        levels = []  # in execution order: lowest resolution first
        for i in reversed(range(len(c.ch_mult))):
            block_out = c.ch * c.ch_mult[i]
            blocks, attns = [], []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, c.dropout, g))
                attns.append(AttnBlock(block_out, g) if res in c.attn_resolutions else nn.Identity())
                block_in = block_out
            levels.append(_Level(blocks, attns, Upsample(block_in) if i > 0 else nn.Identity()))
            res = res * 2 if i > 0 else res
        self.levels = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in, g)
        # The adaptive GAN weight (LDM's calculate_adaptive_weight) differentiates through this weight.
        self.conv_out = nn.Conv2d(block_in, c.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        if not config.double_z:
            raise ValueError("double_z: AutoencoderKL needs the encoder's mean and log-variance (double_z=True)")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # 1x1 convs between the nets and the latent, as LDM (there they also change
        # the width to embed_dim; here embed_dim == z_channels).
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: (B, in_channels, H, W) in [-1, 1], H and W divisible by f -> posterior over (B, z, H/f, W/f)."""
        f = self.config.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.config.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"x: expected (B, {self.config.in_channels}, H, W) with H, W divisible by {f}, "
                f"got {tuple(x.shape)}"
            )
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, z_channels, h, w) -> (B, in_channels, h*f, w*f), roughly in [-1, 1] (not clamped)."""
        if z.ndim != 4 or z.shape[1] != self.config.z_channels:
            raise ValueError(f"z: expected (B, {self.config.z_channels}, h, w), got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self,
        x: torch.Tensor,
        sample_posterior: bool = True,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


def kl_autoencoder_loss(
    x: torch.Tensor, recon: torch.Tensor, posterior: DiagonalGaussian, kl_weight: float,
    l2_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 reconstruction (+ l2_weight * MSE) + kl_weight * KL, all per input element.

    The optional MSE term is not in LDM; on small, short runs it pulls flat colours into place
    much sooner (measured on the shapes quickstart: 25-28 dB vs 19-21 dB PSNR after the same
    90 s of CPU training), while L1 keeps the edges.

    Normalisation: LDM (`contperceptual.py`) uses
        sum_{pixels}|x - recon| / B + kl_weight * sum_{latent} KL / B,
    whose size grows with the image. Here both terms are divided by the number
    of elements of one input image, N = C * H * W:
        rec_loss = mean |x - recon|                      (over B, C, H, W)
        kl_loss  = mean_B( posterior.kl() ) / N          (nats per input element)
        loss     = rec_loss + kl_weight * kl_loss
    That is LDM's loss divided by N: same balance between the terms, so LDM's
    kl_weight (1e-6 for its KL-f8/f4 models; 1e-6..1e-4 sensible) means the same
    here, while the loss stays O(0.1) at any resolution so learning rates do too.

    Returns (loss, {"loss", "rec_loss", "kl_loss"}); the floats are detached
    (`.item()`, one device sync per call).
    """
    if x.shape != recon.shape:
        raise ValueError(f"recon: expected the shape of x {tuple(x.shape)}, got {tuple(recon.shape)}")
    if kl_weight < 0:
        raise ValueError(f"kl_weight: expected >= 0, got {kl_weight}")
    if l2_weight < 0:
        raise ValueError(f"l2_weight: expected >= 0, got {l2_weight}")
    n = x[0].numel()
    # float32 for the reductions: a half-precision sum over a batch of images is
    # where VAE losses turn into inf/NaN.
    diff = x.float() - recon.float()
    rec_loss = diff.abs().mean()
    if l2_weight:
        rec_loss = rec_loss + l2_weight * diff.square().mean()
    kl_loss = posterior.kl().float().mean() / n
    loss = rec_loss + kl_weight * kl_loss
    # Perceptual (LPIPS) and PatchGAN terms belong here, added to `loss` with their
    # own weights and logged under their own keys; LDM's learned output log-variance
    # (rec_loss / exp(logvar) + logvar) comes with them.
    logs = {"loss": loss.item(), "rec_loss": rec_loss.item(), "kl_loss": kl_loss.item()}
    return loss, logs


def save_pretrained(model: AutoencoderKL, directory, extra: dict[str, Any] | None = None) -> Path:
    """Write `model.safetensors` + `config.json` (config fields, `extra` under "extra")."""
    return save_module(model, model.config.to_dict(), directory, extra)


def load_state_checked(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """`module.load_state_dict(state)`, strict, with a short ValueError naming the mismatch.

    torch's own error lists every key; a checkpoint of another architecture (another
    ch_mult, num_res_blocks, attention layout) differs in dozens, so name the counts,
    the first few keys and the first shape mismatch instead.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        k, got, want = shapes[0]
        problems.append(f"{len(shapes)} shape mismatches (e.g. {k}: weights {got}, model {want})")
    if problems:
        raise ValueError(f"state_dict: the weights do not fit this {what}: {'; '.join(problems)}")
    module.load_state_dict(state)


def load_pretrained(directory, map_location: str | torch.device = "cpu") -> tuple[AutoencoderKL, dict[str, Any]]:
    """Rebuild the autoencoder saved by `save_pretrained`: (model in eval mode, extra).

    Weights that do not fit the saved config (another architecture's checkpoint, an
    edited config.json) raise ValueError naming the mismatching keys.
    """
    # Read onto the CPU where the fresh model is built, then move once.
    config_dict, state, extra = load_state(directory, "cpu")
    model = AutoencoderKL(AutoencoderConfig.from_dict(config_dict))
    try:
        load_state_checked(model, state, "AutoencoderKL")
    except ValueError as e:
        raise ValueError(f"{directory}: {e} (config.json and model.safetensors disagree)") from None
    return model.to(map_location).eval(), extra
