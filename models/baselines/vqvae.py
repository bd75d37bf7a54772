"""VQ-VAE with a PixelCNN prior: van den Oord, Vinyals, Kavukcuoglu 2017, "Neural Discrete
Representation Learning".

Encoder (strided 4x4 convs, `num_res` 3x3/1x1 residual blocks, 2 in the paper) -> vector quantiser (models/quantize.py:
nearest code, straight-through gradient, codebook loss + beta * commitment) -> decoder (the mirror,
transposed convs); then a Gated PixelCNN (models/baselines/pixelcnn.py, one "channel" with
codebook_size classes) is fitted to the frozen encoder's code grids.

Training is two-phase in one train_step schedule: steps < prior_start train the autoencoder
(optimizer "autoencoder"), steps >= prior_start train only the prior (optimizer "prior") on the codes
of the now-frozen encoder, as in the paper.

Likelihood (likelihood_kind "bound"). A deterministic decoder with an MSE loss defines no density of
x, so `-log p(z) + reconstruction error` bounds nothing. Here the decoder is a likelihood: each 8-bit
sub-pixel gets a discretised logistic (PixelCNN++, Salimans et al. 2017) with the decoder's mean and
log-scale, a proper distribution over the 256 values. With the prior p(z) over code grids,
p(x) = sum_z p(z) p(x|z) >= p(z*) p(x|z*) for any code grid z*, so for the encoder's code z*(x):

    -log2 p(x) <= -log2 p(z*) - log2 p(x | z*)

(the ELBO with a one-hot posterior, whose entropy is 0: the paper's bits/dim with a learned prior).
bits_per_dim reports the right side / D. The decoder has two heads on one trunk: a mean and a
log-scale per sub-pixel (clamped at -7 as in PixelCNN++). The autoencoder phase trains the mean by
the paper's MSE and the scale head by -log p(x|z) on detached features and a detached mean (means
over sub-pixels), plus the quantiser loss. Measured on smooth 16x16 images: with the likelihood's
gradient reaching the shared trunk (whether the mean was trained by it or by MSE) the MSE did not
move in 300 steps while the scales shrank; with the scale head detached it fell from 0.23 to 0.11.
Any decoder distribution gives a valid bound, so the scale is fitted to the mean, not the reverse.

Codebook: EMA updates (decay 0.99, VQ-VAE's appendix; the project's VQ recipe) and dead-code
restarts after `dead_code_steps` unused steps: with a gradient-trained codebook our tiny runs
collapsed onto one or two codes (on smooth and on random images, cosine lookup or not).
Data parallel: the quantiser's all_reduce is made of the contract's sync_grads (a scratch
parameter whose .grad is averaged over ranks), so it returns the mean over ranks, not the sum.
Every use is scale-free (code counts, and EMA sums divided by EMA counts) except restart
candidates, which become the mean of each rank's candidate: still identical on every rank (every
rank passes rank 0, so each contributes its own). One process: the mean is the identity.

Samples are the decoder's mean for a code grid drawn from the prior (the paper's figures); the
logistic noise that the bound also counts is not added.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.optim import adam
from models.baselines.base import Baseline, BaselineConfig, SyncGrads, no_sync, to_8bit
from models.baselines.pixelcnn import GatedPixelCNNNet, categorical_nll, check_resolution, sample_grid
from models.quantize import AllReduce, QuantizerConfig, VectorQuantizer

__all__ = ["Config", "VQVAEPixelCNN", "discretized_logistic_log_prob", "mean_over_ranks"]

# PixelCNN++'s floor on the decoder's log-scale: keeps the logistic from collapsing to a spike.
_MIN_LOG_SCALE = -7.0


@dataclass
class Config(BaselineConfig):
    ch: int = 128               # encoder/decoder width
    downsample: int = 2         # stride-2 stages: the code grid is resolution / 2**downsample
    num_res: int = 2            # residual blocks in the encoder and in the decoder
    codebook_size: int = 512    # K codes
    code_dim: int = 64          # width of a code
    beta: float = 0.25          # commitment weight
    prior_ch: int = 64          # the prior PixelCNN's hidden features
    prior_layers: int = 12      # the prior's gated layers
    prior_start: int = 5000     # first step that trains the prior (earlier steps: the autoencoder)
    dead_code_steps: int = 100  # restart a code no vector picked for this many steps; 0 = never

    def __post_init__(self):
        super().__post_init__()
        check_resolution(self.resolution)
        for name, minimum in (("ch", 1), ("downsample", 1), ("num_res", 0), ("codebook_size", 2),
                              ("code_dim", 1), ("prior_ch", 1), ("prior_layers", 1), ("prior_start", 1),
                              ("dead_code_steps", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
                raise ValueError(f"{name}: expected an int >= {minimum}, got {v!r}")
        if 2 ** self.downsample > self.resolution:
            raise ValueError(f"downsample: expected 2**downsample <= resolution {self.resolution}, "
                             f"got {self.downsample}")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not self.beta >= 0:
            raise ValueError(f"beta: expected a number >= 0, got {self.beta!r}")


def discretized_logistic_log_prob(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(8-bit value of x) under a logistic(mean, exp(log_scale)) discretised to the 256 bins
    [x - 1/255, x + 1/255] of x = p / 127.5 - 1, the outer bins open to +-inf (sums to 1 over p).
    All (B, C, H, W); nats."""
    p = to_8bit(x)
    xc = p.to(mean.dtype) / 127.5 - 1.0                    # the bin centre, exactly on the grid
    inv_s = torch.exp(-log_scale)
    hi = inv_s * (xc - mean + 1.0 / 255)                    # standardised upper edge
    lo = inv_s * (xc - mean - 1.0 / 255)
    # sigma(hi) - sigma(lo) = sigma(hi) * sigma(-lo) * (1 - exp(lo - hi)), stable in logs.
    mid = F.logsigmoid(hi) + F.logsigmoid(-lo) + torch.log(-torch.expm1(lo - hi))
    return torch.where(p == 0, F.logsigmoid(hi), torch.where(p == 255, F.logsigmoid(-lo), mid))


def mean_over_ranks(sync_grads: SyncGrads) -> AllReduce:
    """A tensor's mean over data-parallel ranks through the contract's sync_grads, which averages
    the .grad of the parameters it is given (a no-op in one process)."""
    def all_reduce(t: Tensor) -> Tensor:
        scratch = nn.Parameter(torch.zeros_like(t))
        scratch.grad = t.clone()
        sync_grads([scratch])
        return scratch.grad
    return all_reduce


class _ResBlock(nn.Module):
    """ReLU, 3x3 conv, ReLU, 1x1 conv, residual (the paper's block)."""

    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _encoder(c: Config) -> nn.Sequential:
    """(B, C, R, R) -> (B, code_dim, R/f, R/f), f = 2**downsample."""
    layers: list[nn.Module] = []
    ch_in = c.in_channels
    for _ in range(c.downsample):
        layers += [nn.Conv2d(ch_in, c.ch, 4, stride=2, padding=1), nn.ReLU()]
        ch_in = c.ch
    layers += [nn.Conv2d(c.ch, c.ch, 3, padding=1)]
    layers += [_ResBlock(c.ch) for _ in range(c.num_res)]
    layers += [nn.ReLU(), nn.Conv2d(c.ch, c.code_dim, 1)]
    return nn.Sequential(*layers)


def _decoder(c: Config) -> nn.Sequential:
    """(B, code_dim, R/f, R/f) -> (B, ch, R/2, R/2) features; the heads' last transposed conv makes R."""
    layers: list[nn.Module] = [nn.Conv2d(c.code_dim, c.ch, 3, padding=1)]
    layers += [_ResBlock(c.ch) for _ in range(c.num_res)]
    layers += [nn.ReLU()]
    for _ in range(c.downsample - 1):
        layers += [nn.ConvTranspose2d(c.ch, c.ch, 4, stride=2, padding=1), nn.ReLU()]
    return nn.Sequential(*layers)


class VQVAEPixelCNN(Baseline):
    family = "vqvae"
    Config = Config
    has_likelihood = True
    likelihood_kind = "bound"

    def __init__(self, config: Config):
        super().__init__(config)
        c = config
        self.grid = c.resolution // 2 ** c.downsample
        self.encoder = _encoder(c)
        self.quantizer = VectorQuantizer(QuantizerConfig(codebook_size=c.codebook_size, code_dim=c.code_dim,
                                                         beta=float(c.beta), ema=True,
                                                         dead_code_steps=c.dead_code_steps))
        self.decoder = _decoder(c)
        self.mean_head = nn.ConvTranspose2d(c.ch, c.in_channels, 4, stride=2, padding=1)
        self.scale_head = nn.ConvTranspose2d(c.ch, c.in_channels, 4, stride=2, padding=1)
        self.prior = GatedPixelCNNNet(1, c.codebook_size, c.prior_ch, c.prior_layers)

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.quantizer.parameters(), *self.decoder.parameters(),
                *self.mean_head.parameters(), *self.scale_head.parameters()]

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        lr = self.config.lr
        return {"autoencoder": adam(self.autoencoder_parameters(), lr=lr),
                "prior": adam(self.prior.parameters(), lr=lr)}

    # ---- pieces ------------------------------------------------------------------------------
    def decode(self, z_q: Tensor) -> tuple[Tensor, Tensor]:
        """(B, code_dim, g, g) -> mean, log_scale (B, C, R, R). The scale head reads the features
        detached: its likelihood gradient never reaches the mean's path (see the module docstring)."""
        f = self.decoder(z_q)                                       # (B, ch, R/2, R/2)
        return self.mean_head(f), self.scale_head(f.detach()).clamp_min(_MIN_LOG_SCALE)

    def encode(self, x: Tensor) -> Tensor:
        """(B, C, R, R) -> (B, g, g) code indices, never moving the codebook."""
        return self.quantizer(self.encoder(x), update=False).indices

    def recon_nll(self, x: Tensor, z_q: Tensor) -> Tensor:
        """(B,) -log p(x | z) in nats of the 8-bit image."""
        mean, log_scale = self.decode(z_q)
        return -discretized_logistic_log_prob(x, mean, log_scale).flatten(1).sum(1)

    def prior_nll(self, idx: Tensor) -> Tensor:
        """(B, g, g) codes -> (B,) -log p(z) in nats."""
        idx = idx[:, None]                                     # (B, 1, g, g): one channel of K classes
        return categorical_nll(self.prior(idx), idx)

    # ---- contract ----------------------------------------------------------------------------
    def train_step(self, x: Tensor, opts: dict[str, torch.optim.Optimizer], step: int,
                   sync_grads: SyncGrads = no_sync) -> dict[str, float]:
        if step < self.config.prior_start:
            opt = opts["autoencoder"]
            opt.zero_grad(set_to_none=True)
            q = self.quantizer(self.encoder(x), all_reduce=mean_over_ranks(sync_grads), rank=0)
            mean, log_scale = self.decode(q.z_q)
            mse = F.mse_loss(mean, x)
            # The scale is fitted by the likelihood for the mean as it is; the mean by MSE (see above).
            recon = -discretized_logistic_log_prob(x, mean.detach(), log_scale).mean()   # nats per sub-pixel
            loss = mse + recon + q.loss
            loss.backward()
            sync_grads(self.autoencoder_parameters())
            opt.step()
            return {"loss": float(loss.detach()), "mse": float(mse.detach()),
                    "recon_bpd": float(recon.detach()) / math.log(2.0), "vq_loss": float(q.loss.detach()),
                    **{k: float(v) for k, v in q.stats.items()}}
        opt = opts["prior"]
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            idx = self.encode(x)
        loss = self.prior_nll(idx).mean() / idx[0].numel()            # nats per code
        loss.backward()
        sync_grads(self.prior.parameters())
        opt.step()
        return {"prior_loss": float(loss.detach()), "prior_bits_per_code": float(loss.detach()) / math.log(2.0)}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        device = self.quantizer.codebook.device
        idx = sample_grid(self.prior, n, self.grid, self.grid, generator, device)[:, 0]   # (n, g, g)
        mean, _ = self.decode(self.quantizer.codes_from_indices(idx))
        return mean.float().clamp(-1, 1)

    def bits_per_dim(self, x: Tensor) -> Tensor:
        idx = self.encode(x)
        z_q = self.quantizer.codes_from_indices(idx)
        return (self.prior_nll(idx) + self.recon_nll(x, z_q)) / (x[0].numel() * math.log(2.0))
