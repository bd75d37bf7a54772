"""Variational autoencoder: Kingma & Welling 2014, "Auto-Encoding Variational Bayes" (Gaussian
posterior, reparameterisation, ELBO), with the importance-weighted bound of Burda, Grosse &
Salakhutdinov 2016, "Importance Weighted Autoencoders", for scoring.

    log p(x) >= E_{z_1..k ~ q(z|x)} log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x)     (k = 1: the ELBO)

Choices:
  * Convolutional encoder/decoder as in DCGAN-style VAEs: stride-2 4x4 convs halve the side down to
    4x4 (log2(resolution) - 2 of them, width ch * 2^i capped at 8 ch), a linear layer to the
    posterior's mean and log-variance over a vector latent of latent_dim; the decoder mirrors it
    with transposed convs. LeakyReLU(0.2), no normalisation layers (train and eval then agree).
  * Decoder likelihood: a Gaussian per sub-pixel with the decoder's mean and log-scale, a density on
    uniformly dequantised data (base.dequantize), so -ELBO is a bound on the continuous NLL, which
    itself bounds the 8-bit NLL (Theis et al. 2016); bits_per_dim reports it through
    base.density_nats_to_bpd (likelihood_kind "bound"). The log-scale is floored at the standard
    deviation of the dequantisation noise itself: no narrower Gaussian is needed to model it, and the
    floor keeps early training from chasing spikes.
  * Prior N(0, I); KL(q || p) in closed form during training (a lower-variance estimator of the same
    ELBO); the importance-weighted score uses sampled log-weights.
  * Training loss: -ELBO per dimension (mean over the batch), on a fresh dequantisation each step.
  * sample(): z ~ N(0, I) from the caller's generator, the decoder's mean (the usual figure; the
    pixel noise that the likelihood also counts is not added), clamped to [-1, 1].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.baselines.base import Baseline, BaselineConfig, SyncGrads, dequantize, density_nats_to_bpd, no_sync

__all__ = ["Config", "VAE", "gaussian_log_prob", "gaussian_kl"]

# Standard deviation of base.dequantize's noise (uniform over one 2/256-wide bin): the decoder's floor.
_MIN_LOG_SCALE = math.log(2.0 / 256.0 / math.sqrt(12.0))


def _check_int(name: str, v, minimum: int = 1) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {v!r}")


@dataclass
class Config(BaselineConfig):
    ch: int = 64            # width of the first encoder stage (doubles per halving, capped at 8 ch)
    latent_dim: int = 128   # size of the vector latent z
    iw_samples: int = 1     # k importance samples in bits_per_dim (1: the ELBO; > 1: IWAE, tighter)

    def __post_init__(self):
        super().__post_init__()
        r = self.resolution
        if r < 8 or r & (r - 1):
            raise ValueError(f"resolution: expected a power of two >= 8, got {r!r}")
        _check_int("ch", self.ch)
        _check_int("latent_dim", self.latent_dim)
        _check_int("iw_samples", self.iw_samples)


def gaussian_log_prob(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Elementwise log N(x; mean, exp(log_scale)^2), nats."""
    return -0.5 * ((x - mean) * torch.exp(-log_scale)).pow(2) - log_scale - 0.5 * math.log(2 * math.pi)


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) summed over the last dim: (B, Z) -> (B,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def _widths(c: Config) -> list[int]:
    """Encoder widths after each stride-2 stage (resolution -> 4)."""
    n = int(math.log2(c.resolution)) - 2
    return [c.ch * min(2 ** i, 8) for i in range(n)]


class VAE(Baseline):
    family = "vae"
    Config = Config
    has_likelihood = True
    likelihood_kind = "bound"

    def __init__(self, config: Config):
        super().__init__(config)
        c = config
        widths = _widths(c)
        enc: list[nn.Module] = []
        ch_in = c.in_channels
        for w in widths:
            enc += [nn.Conv2d(ch_in, w, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            ch_in = w
        self.encoder = nn.Sequential(*enc, nn.Flatten())              # (B, top * 16)
        top = widths[-1]
        self.to_posterior = nn.Linear(top * 16, 2 * c.latent_dim)     # [mu | logvar]
        self.from_latent = nn.Linear(c.latent_dim, top * 16)
        dec: list[nn.Module] = []
        rev = widths[::-1]
        for i, w in enumerate(rev):
            out = rev[i + 1] if i + 1 < len(rev) else c.ch
            dec += [nn.LeakyReLU(0.2), nn.ConvTranspose2d(w, out, 4, stride=2, padding=1)]
        self.decoder = nn.Sequential(*dec, nn.LeakyReLU(0.2),
                                     nn.Conv2d(c.ch, 2 * c.in_channels, 3, padding=1))   # [mean | log-scale]
        self.top = top

    # ---- the model ---------------------------------------------------------------------------
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) -> posterior mean and log-variance, each (B, Z)."""
        return self.to_posterior(self.encoder(x)).chunk(2, dim=-1)

    def decode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(B, Z) -> the decoder's mean and log-scale, each (B, C, H, W)."""
        h = self.from_latent(z).view(z.shape[0], self.top, 4, 4)
        mean, log_scale = self.decoder(h).chunk(2, dim=1)
        return mean, log_scale.clamp_min(_MIN_LOG_SCALE)

    def neg_elbo(self, xd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One-sample -ELBO (B,) nats of dequantised xd, with its reconstruction and KL parts."""
        mu, logvar = self.encode(xd)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)      # reparameterisation
        mean, log_scale = self.decode(z)
        recon = -gaussian_log_prob(xd, mean, log_scale).flatten(1).sum(1)
        kl = gaussian_kl(mu, logvar)
        return recon + kl, recon, kl

    # ---- contract ----------------------------------------------------------------------------
    def train_step(self, x: Tensor, opts: dict[str, torch.optim.Optimizer], step: int,
                   sync_grads: SyncGrads = no_sync) -> dict[str, float]:
        d = x[0].numel()
        nelbo, recon, kl = self.neg_elbo(dequantize(x))
        loss = nelbo.mean() / d                                       # nats per dimension
        opt = opts["model"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync_grads(self.parameters())
        opt.step()
        return {"loss": loss.item(), "recon": (recon.mean() / d).item(), "kl": (kl.mean() / d).item(),
                "bpd": density_nats_to_bpd(nelbo.detach().mean(), d).item()}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        dev = self.from_latent.weight.device
        z = torch.randn(n, self.config.latent_dim, generator=generator, device=dev)
        return self.decode(z)[0].clamp(-1, 1).float()

    @torch.no_grad()
    def log_likelihood_bound(self, xd: Tensor, k: int) -> Tensor:
        """The k-sample importance-weighted lower bound on log p(xd) (B,) nats (k = 1: the ELBO)."""
        mu, logvar = self.encode(xd)
        std = torch.exp(0.5 * logvar)
        log_w = []
        for _ in range(k):   # one decoder pass per sample keeps memory at one batch
            eps = torch.randn_like(mu)
            z = mu + std * eps
            mean, log_scale = self.decode(z)
            log_px = gaussian_log_prob(xd, mean, log_scale).flatten(1).sum(1)
            log_pz = gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z)).sum(1)
            log_qz = gaussian_log_prob(z, mu, 0.5 * logvar).sum(1)
            log_w.append(log_px + log_pz - log_qz)
        return torch.logsumexp(torch.stack(log_w), 0) - math.log(k)

    @torch.no_grad()
    def bits_per_dim(self, x: Tensor) -> Tensor:
        bound = self.log_likelihood_bound(dequantize(x), self.config.iw_samples)
        return density_nats_to_bpd(-bound, x[0].numel())
