"""DCGAN: Radford, Metz & Chintala 2015, "Unsupervised Representation Learning with Deep
Convolutional Generative Adversarial Networks", trained with the non-saturating loss of Goodfellow
et al. 2014 ("Generative Adversarial Nets", section 3).

    D: max  log D(x) + log(1 - D(G(z)))        G: max  log D(G(z))      (non-saturating)

Choices (the paper's guidelines, section 3, and its appendix settings):
  * Generator: z (z_dim) -> 4x4 by a 4x4 transposed conv, then stride-2 4x4 transposed convs double
    the side up to the resolution (log2(resolution) - 2 of them); BatchNorm + ReLU on every hidden
    layer, tanh at the output. Widths halve per doubling and end at ch (capped at 8 ch at 4x4).
  * Discriminator: the mirror with stride-2 4x4 convs and LeakyReLU(0.2), BatchNorm on every hidden
    layer but the first, a 4x4 valid conv to one logit. No pooling, no fully connected layers.
  * Weights from N(0, 0.02), BatchNorm scales from N(1, 0.02); Adam(lr, betas (0.5, 0.999)), lr
    2e-4 by default (BaselineConfig.lr); two optimizers, "generator" and "discriminator".
  * One train_step: a discriminator step on the real batch and a fresh fake batch (BatchNorm sees
    them as two separate batches, as in the reference code), then a generator step through the
    updated discriminator on the same fakes. Under data parallel, BatchNorm running statistics are
    averaged by the stage (average_buffers).
  * sample(): the generator in eval mode (BatchNorm's running statistics), so a sample depends only
    on the caller's generator and calling it mid-training leaves the statistics untouched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.optim import adam
from models.baselines.base import Baseline, BaselineConfig, SyncGrads, no_sync

__all__ = ["Config", "DCGAN", "Generator", "Discriminator", "check_gan_config", "discriminator_loss",
           "requires_grad"]


def _check_int(name: str, v, minimum: int = 1) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {v!r}")


def _check_beta(name: str, v) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 1:
        raise ValueError(f"{name}: expected a float in [0, 1), got {v!r}")


def check_gan_config(c) -> None:
    """Checks shared by the GAN families: power-of-two resolution, widths, Adam betas."""
    r = c.resolution
    if r < 8 or r & (r - 1):
        raise ValueError(f"resolution: expected a power of two >= 8, got {r!r}")
    _check_int("ch", c.ch)
    _check_int("z_dim", c.z_dim)
    _check_beta("beta1", c.beta1)
    _check_beta("beta2", c.beta2)


@dataclass
class Config(BaselineConfig):
    ch: int = 64          # generator's last hidden width = discriminator's first (paper: 128)
    z_dim: int = 100      # latent size (paper: 100, uniform; here N(0, I))
    beta1: float = 0.5    # Adam beta1 (paper: 0.5, lowered from 0.9 for stability)
    beta2: float = 0.999  # Adam beta2

    def __post_init__(self):
        super().__post_init__()
        check_gan_config(self)


def _widths(resolution: int, ch: int) -> list[int]:
    """Hidden widths from 4x4 up to resolution/2: ch * 2^k, halving per doubling, capped at 8 ch."""
    n = int(math.log2(resolution)) - 2        # stride-2 stages between 4x4 and the resolution
    return [ch * min(2 ** (n - 1 - i), 8) for i in range(n)]


def _init_weights(m: nn.Module) -> None:
    """The paper's initialisation: N(0, 0.02) weights; BatchNorm scale N(1, 0.02), shift 0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """z (B, z_dim) -> images (B, C, R, R) in (-1, 1)."""

    def __init__(self, in_channels: int, resolution: int, ch: int, z_dim: int):
        super().__init__()
        widths = _widths(resolution, ch)
        layers: list[nn.Module] = [nn.ConvTranspose2d(z_dim, widths[0], 4, 1, 0, bias=False),   # 1 -> 4
                                   nn.BatchNorm2d(widths[0]), nn.ReLU()]
        for w_in, w_out in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1, bias=False), nn.BatchNorm2d(w_out), nn.ReLU()]
        layers += [nn.ConvTranspose2d(widths[-1], in_channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    """images (B, C, R, R) -> real/fake logits (B,)."""

    def __init__(self, in_channels: int, resolution: int, ch: int, batchnorm: bool = True):
        super().__init__()
        widths = _widths(resolution, ch)[::-1]   # ch at R/2 ... widest at 4x4
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2)]
        for w_in, w_out in zip(widths, widths[1:]):
            layers += [nn.Conv2d(w_in, w_out, 4, 2, 1, bias=not batchnorm)]
            layers += [nn.BatchNorm2d(w_out)] if batchnorm else []
            layers += [nn.LeakyReLU(0.2)]
        layers += [nn.Conv2d(widths[-1], 1, 4, 1, 0)]   # 4x4 -> 1x1
        self.net = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).flatten()


def discriminator_loss(d_real: Tensor, d_fake: Tensor) -> Tensor:
    """Non-saturating discriminator loss from logits: -log sigma(D(x)) - log(1 - sigma(D(G(z))))."""
    return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()


def requires_grad(params: Iterable[nn.Parameter], flag: bool) -> None:
    """Freeze a network while the other one steps (saves its weight gradients)."""
    for p in params:
        p.requires_grad_(flag)


class DCGAN(Baseline):
    family = "dcgan"
    Config = Config
    has_likelihood = False
    likelihood_kind = "n/a"

    def __init__(self, config: Config):
        super().__init__(config)
        c = config
        self.generator = Generator(c.in_channels, c.resolution, c.ch, c.z_dim)
        self.discriminator = Discriminator(c.in_channels, c.resolution, c.ch)

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        c = self.config
        betas = (c.beta1, c.beta2)
        return {"generator": adam(self.generator.parameters(), lr=c.lr, betas=betas),
                "discriminator": adam(self.discriminator.parameters(), lr=c.lr, betas=betas)}

    def train_step(self, x: Tensor, opts: dict[str, torch.optim.Optimizer], step: int,
                   sync_grads: SyncGrads = no_sync) -> dict[str, float]:
        g, d = self.generator, self.discriminator
        z = torch.randn(x.shape[0], self.config.z_dim, device=x.device)
        fake = g(z)                                                  # (B, C, R, R)
        # Discriminator step.
        requires_grad(d.parameters(), True)
        d_real, d_fake = d(x), d(fake.detach())
        d_loss = discriminator_loss(d_real, d_fake)
        opts["discriminator"].zero_grad(set_to_none=True)
        d_loss.backward()
        sync_grads(d.parameters())
        opts["discriminator"].step()
        # Generator step (non-saturating: -log sigma(D(G(z)))), D frozen.
        requires_grad(d.parameters(), False)
        g_loss = F.softplus(-d(fake)).mean()
        opts["generator"].zero_grad(set_to_none=True)
        g_loss.backward()
        sync_grads(g.parameters())
        opts["generator"].step()
        requires_grad(d.parameters(), True)
        return {"d_loss": d_loss.item(), "g_loss": g_loss.item(),
                "d_real": torch.sigmoid(d_real).mean().item(), "d_fake": torch.sigmoid(d_fake).mean().item()}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        g = self.generator
        was_training = g.training
        g.eval()   # BatchNorm from running statistics: deterministic, and they stay untouched
        try:
            z = torch.randn(n, self.config.z_dim, generator=generator, device=g.net[0].weight.device)
            return g(z).clamp(-1, 1).float()
        finally:
            g.train(was_training)
