"""Style-based GAN: Karras, Laine & Aila 2019, "A Style-Based Generator Architecture for Generative
Adversarial Networks" (mapping network z -> w, learned constant 4x4 input, per-layer styles and noise
inputs, truncation in w), with the modulated convolutions of Karras et al. 2020, "Analyzing and
Improving the Image Quality of StyleGAN" (StyleGAN2), and the R1 penalty of Mescheder, Geiger &
Nowozin 2018, "Which Training Methods for GANs do actually Converge?".

Choices:
  * Mapping: z normalised to unit RMS (pixel norm), mapping_layers equalised-lr linear layers with
    LeakyReLU(0.2) * sqrt(2), learning-rate multiplier mapping_lr_mult (0.01 in the paper).
  * Synthesis: constant (w4, 4, 4) input; at 4x4 one style layer, then per doubling (bilinear
    upsampling, as the paper's progressive generator without the growing) two style layers; widths
    ch * min(8, R / r) at side r. A style layer is a 3x3 modulated conv with demodulation (StyleGAN2,
    instead of AdaIN: no droplet artefacts), a per-pixel noise image times a learned per-layer
    strength (zero at init, as in the paper), a bias and the activation. toRGB (a modulated 1x1 conv,
    no demodulation) at every side, summed over upsampled sides (StyleGAN2's skip generator).
    One w for every layer: style mixing regularisation is left out.
  * Equalised learning rate everywhere (weights N(0, 1), scaled by 1/sqrt(fan_in) at run time), so
    Adam's step is the same relative size for every layer; Adam betas (0, 0.99) as in the paper.
  * Discriminator: StyleGAN2's small ResNet (fromRGB 1x1; per halving two 3x3 convs and a 1x1 skip,
    2x2 average pooling, sum / sqrt(2); at 4x4 a 3x3 conv and two linear layers). Minibatch standard
    deviation is left out (it mixes the samples of a batch).
  * Non-saturating loss; R1 = E ||grad_x D(x)||^2 on real images, weighted r1_gamma / 2 and applied
    every step (r1_gamma = 0 turns it off; the paper's lazy regularisation is left out).
  * Truncation trick: w_avg is an exponential moving average of the mapped w (decay w_avg_beta),
    kept as a buffer (the stage averages it over ranks); sample() uses
    w = w_avg + truncation_psi * (w - w_avg) on every layer (psi = 1: no truncation).
  * The generator's weights are used directly (no EMA copy), like the other GAN baseline.
  * sample(): z, then every noise image, from the caller's generator in a fixed order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.optim import adam
from models.baselines.base import Baseline, BaselineConfig, SyncGrads, no_sync
from models.baselines.dcgan import check_gan_config, discriminator_loss, requires_grad

__all__ = ["Config", "StyleGAN", "StyleGenerator", "ResNetDiscriminator", "ModulatedConv2d", "EqualLinear",
           "EqualConv2d", "r1_penalty"]

_LRELU_GAIN = math.sqrt(2.0)   # keeps unit activation variance through LeakyReLU(0.2) (StyleGAN2)


def _lrelu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, 0.2) * _LRELU_GAIN


@dataclass
class Config(BaselineConfig):
    ch: int = 64                   # width at the output side; doubles per halving, capped at 8 ch
    z_dim: int = 512               # latent z size
    w_dim: int = 512               # intermediate latent w size
    mapping_layers: int = 8        # depth of the mapping MLP (paper: 8)
    mapping_lr_mult: float = 0.01  # mapping network's learning-rate multiplier (paper: 0.01)
    r1_gamma: float = 10.0         # R1 weight on real images (paper: 10 on FFHQ); 0 turns it off
    truncation_psi: float = 1.0    # truncation in sample(): 1 = none, 0 = every sample is w_avg's
    w_avg_beta: float = 0.995      # decay of the running mean of w used by truncation
    beta1: float = 0.0             # Adam beta1 (paper: 0)
    beta2: float = 0.99            # Adam beta2 (paper: 0.99)

    def __post_init__(self):
        super().__post_init__()
        check_gan_config(self)
        for name in ("w_dim", "mapping_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if not isinstance(self.mapping_lr_mult, (int, float)) or not self.mapping_lr_mult > 0:
            raise ValueError(f"mapping_lr_mult: expected > 0, got {self.mapping_lr_mult!r}")
        if not isinstance(self.r1_gamma, (int, float)) or not self.r1_gamma >= 0:
            raise ValueError(f"r1_gamma: expected >= 0, got {self.r1_gamma!r}")
        if not isinstance(self.truncation_psi, (int, float)) or not 0 <= self.truncation_psi <= 1:
            raise ValueError(f"truncation_psi: expected a float in [0, 1], got {self.truncation_psi!r}")
        if not isinstance(self.w_avg_beta, (int, float)) or not 0 <= self.w_avg_beta < 1:
            raise ValueError(f"w_avg_beta: expected a float in [0, 1), got {self.w_avg_beta!r}")


# ---- equalised-learning-rate layers ------------------------------------------------------------
class EqualLinear(nn.Module):
    """Linear layer whose weight is stored N(0, 1/lr_mult^2) and scaled by lr_mult/sqrt(in) at run
    time: He initialisation at every step, and the step size of Adam scaled by lr_mult."""

    def __init__(self, in_features: int, out_features: int, bias_init: float = 0.0, lr_mult: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mult)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init) / lr_mult))
        self.w_gain, self.b_gain = lr_mult / math.sqrt(in_features), lr_mult

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.w_gain, self.bias * self.b_gain)


class EqualConv2d(nn.Module):
    """Same-padded conv with an equalised learning rate (weight scaled by 1/sqrt(fan_in))."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        self.gain = 1.0 / math.sqrt(in_ch * kernel * kernel)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.gain, self.bias, padding=self.weight.shape[-1] // 2)


class ModulatedConv2d(nn.Module):
    """StyleGAN2's modulated conv: per sample, input channel i of the weight is scaled by the style
    s_i = A(w)_i, then (demodulate) each output filter is renormalised to unit L2 norm. One grouped
    conv over the batch. x (B, in, H, W), w (B, w_dim) -> (B, out, H, W)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, w_dim: int, demodulate: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.affine = EqualLinear(w_dim, in_ch, bias_init=1.0)   # styles start at 1: plain conv at init
        self.gain = 1.0 / math.sqrt(in_ch * kernel * kernel)
        self.demodulate = demodulate

    def modulated_weight(self, w: Tensor) -> Tensor:
        """(B, out, in, k, k) per-sample weights."""
        s = self.affine(w)                                                    # (B, in)
        weight = self.weight[None] * self.gain * s[:, None, :, None, None]
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
        return weight

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        b, c, h, wd = x.shape
        weight = self.modulated_weight(w)
        out_ch, k = weight.shape[1], weight.shape[-1]
        y = F.conv2d(x.reshape(1, b * c, h, wd), weight.reshape(b * out_ch, c, k, k), padding=k // 2, groups=b)
        return y.view(b, out_ch, h, wd)


class StyleLayer(nn.Module):
    """Modulated 3x3 conv + noise image * learned strength + bias, then the activation."""

    def __init__(self, in_ch: int, out_ch: int, w_dim: int):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, 3, w_dim)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(out_ch))

    def forward(self, x: Tensor, w: Tensor, generator: torch.Generator | None) -> Tensor:
        y = self.conv(x, w)
        b, _, h, wd = y.shape
        noise = torch.randn(b, 1, h, wd, generator=generator, device=y.device, dtype=y.dtype)
        return _lrelu(y + self.noise_strength * noise + self.bias[None, :, None, None])


class ToRGB(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, w_dim: int):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(out_ch))

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        return self.conv(x, w) + self.bias[None, :, None, None]


def _width(c: Config, side: int) -> int:
    return c.ch * min(8, c.resolution // side)


def _up(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class StyleGenerator(nn.Module):
    """Mapping z -> w and synthesis w -> images (B, C, R, R); w_avg (w_dim,) for truncation."""

    def __init__(self, c: Config):
        super().__init__()
        maps: list[nn.Module] = []
        for i in range(c.mapping_layers):
            maps.append(EqualLinear(c.z_dim if i == 0 else c.w_dim, c.w_dim, lr_mult=c.mapping_lr_mult))
        self.mapping = nn.ModuleList(maps)
        self.register_buffer("w_avg", torch.zeros(c.w_dim))
        w4 = _width(c, 4)
        self.const = nn.Parameter(torch.randn(1, w4, 4, 4))
        self.layers = nn.ModuleList([StyleLayer(w4, w4, c.w_dim)])
        self.to_rgbs = nn.ModuleList([ToRGB(w4, c.in_channels, c.w_dim)])
        side, w_prev = 8, w4
        while side <= c.resolution:
            w_out = _width(c, side)
            self.layers.extend([StyleLayer(w_prev, w_out, c.w_dim), StyleLayer(w_out, w_out, c.w_dim)])
            self.to_rgbs.append(ToRGB(w_out, c.in_channels, c.w_dim))
            side, w_prev = side * 2, w_out

    def map(self, z: Tensor) -> Tensor:
        """(B, z_dim) -> (B, w_dim)."""
        x = z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)   # pixel norm
        for layer in self.mapping:
            x = _lrelu(layer(x))
        return x

    def synthesis(self, w: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, w_dim) -> (B, C, R, R); noise images drawn from `generator` layer by layer."""
        x = self.const.expand(w.shape[0], -1, -1, -1)
        x = self.layers[0](x, w, generator)
        rgb = self.to_rgbs[0](x, w)
        for i, to_rgb in enumerate(self.to_rgbs[1:]):
            x = self.layers[1 + 2 * i](_up(x), w, generator)
            x = self.layers[2 + 2 * i](x, w, generator)
            rgb = _up(rgb) + to_rgb(x, w)
        return rgb


class _DBlock(nn.Module):
    """Two 3x3 convs then 2x2 average pooling, plus a pooled 1x1 skip; sum / sqrt(2)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = EqualConv2d(in_ch, in_ch, 3)
        self.conv2 = EqualConv2d(in_ch, out_ch, 3)
        self.skip = EqualConv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        y = F.avg_pool2d(_lrelu(self.conv2(_lrelu(self.conv1(x)))), 2)
        return (y + self.skip(F.avg_pool2d(x, 2))) / math.sqrt(2.0)


class ResNetDiscriminator(nn.Module):
    """images (B, C, R, R) -> logits (B,)."""

    def __init__(self, c: Config):
        super().__init__()
        self.from_rgb = EqualConv2d(c.in_channels, _width(c, c.resolution), 1)
        blocks, side = [], c.resolution
        while side > 4:
            blocks.append(_DBlock(_width(c, side), _width(c, side // 2)))
            side //= 2
        self.blocks = nn.Sequential(*blocks)
        w4 = _width(c, 4)
        self.conv = EqualConv2d(w4, w4, 3)
        self.fc = EqualLinear(w4 * 16, w4)
        self.out = EqualLinear(w4, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(_lrelu(self.from_rgb(x)))             # (B, w4, 4, 4)
        h = _lrelu(self.conv(h)).flatten(1)
        return self.out(_lrelu(self.fc(h))).flatten()


def r1_penalty(discriminator: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(logits D(x) (B,), R1 = mean over the batch of ||grad_x D(x)||^2), differentiable twice."""
    x = x.detach().requires_grad_(True)
    logits = discriminator(x)
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)   # rows independent: sum is fine
    return logits, grad.pow(2).flatten(1).sum(1).mean()


class StyleGAN(Baseline):
    family = "stylegan"
    Config = Config
    has_likelihood = False
    likelihood_kind = "n/a"

    def __init__(self, config: Config):
        super().__init__(config)
        self.generator = StyleGenerator(config)
        self.discriminator = ResNetDiscriminator(config)

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        c = self.config
        betas = (c.beta1, c.beta2)
        return {"generator": adam(self.generator.parameters(), lr=c.lr, betas=betas),
                "discriminator": adam(self.discriminator.parameters(), lr=c.lr, betas=betas)}

    def train_step(self, x: Tensor, opts: dict[str, torch.optim.Optimizer], step: int,
                   sync_grads: SyncGrads = no_sync) -> dict[str, float]:
        c, g, d = self.config, self.generator, self.discriminator
        z = torch.randn(x.shape[0], c.z_dim, device=x.device)
        w = g.map(z)                                                 # (B, w_dim)
        with torch.no_grad():
            g.w_avg.lerp_(w.mean(0), 1.0 - c.w_avg_beta)
        fake = g.synthesis(w)                                        # (B, C, R, R); noise from the global RNG
        # Discriminator step: non-saturating loss + r1_gamma / 2 * R1 on the reals.
        requires_grad(d.parameters(), True)
        logs = {}
        if c.r1_gamma > 0:
            d_real, r1 = r1_penalty(d, x)
            logs["r1"] = r1.item()
        else:
            d_real, r1 = d(x), x.new_zeros(())
        d_fake = d(fake.detach())
        d_loss = discriminator_loss(d_real, d_fake)
        opts["discriminator"].zero_grad(set_to_none=True)
        (d_loss + 0.5 * c.r1_gamma * r1).backward()
        sync_grads(d.parameters())
        opts["discriminator"].step()
        # Generator step through the updated discriminator, frozen.
        requires_grad(d.parameters(), False)
        g_loss = F.softplus(-d(fake)).mean()
        opts["generator"].zero_grad(set_to_none=True)
        g_loss.backward()
        sync_grads(g.parameters())
        opts["generator"].step()
        requires_grad(d.parameters(), True)
        logs.update({"d_loss": d_loss.item(), "g_loss": g_loss.item(),
                     "d_real": torch.sigmoid(d_real).mean().item(), "d_fake": torch.sigmoid(d_fake).mean().item()})
        return logs

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, truncation_psi: float | None = None) -> Tensor:
        """n images; truncation_psi overrides the config's for this call."""
        g = self.generator
        psi = self.config.truncation_psi if truncation_psi is None else truncation_psi
        z = torch.randn(n, self.config.z_dim, generator=generator, device=g.const.device)
        w = g.map(z)
        w = g.w_avg + psi * (w - g.w_avg)                            # truncation trick in w
        return g.synthesis(w, generator).clamp(-1, 1).float()
