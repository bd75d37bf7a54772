"""Glow: Kingma & Dhariwal 2018, "Glow: Generative Flow with Invertible 1x1 Convolutions", on the
multi-scale architecture of RealNVP (Dinh, Sohl-Dickstein & Bengio 2017, "Density estimation using
Real NVP").

    x --squeeze--> K x [actnorm -> invertible 1x1 conv -> affine coupling] --split--> ... (L levels)

A bijection x <-> eps between the image and standard-normal noise of the same size D = C * H * W, so

    log p(x) = sum_d log N(eps_d; 0, 1) + log |det d eps / d x|          (exact)

Choices:
  * Squeeze: space-to-depth (F.pixel_unshuffle), (C, H, W) -> (4C, H/2, W/2); its channel order differs
    from the paper's reshape, which is only a fixed permutation (log-det 0).
  * ActNorm: per-channel y = (x + b) * exp(s), initialised from the first training batch so that each
    channel has zero mean and unit variance (the paper's data-dependent init). The "initialised" flag
    is a bool buffer: it travels in the state_dict, so a reloaded model does not re-initialise.
    Initialisation happens only in training mode: scoring never changes the model.
  * Invertible 1x1 conv, LU-decomposed by default (W = P L (U + diag(sign(s) exp(log|s|))), the
    paper's sec. 3.2: log-det = H W sum log|s|, O(C)); P and sign(s) are fixed buffers. Initialised
    as a random orthogonal matrix (log-det 0). `lu_decomposed=False` keeps a dense W and uses slogdet.
  * Affine coupling: the first half of the channels conditions the second,
    y_b = (x_b + t(x_a)) * sigmoid(r(x_a) + 2) with a conv3x3 -> ReLU -> conv1x1 -> ReLU -> conv3x3 net
    whose last layer starts at zero (each coupling starts as the identity up to the sigmoid(2) scale).
    The sigmoid bounds the scale in (0, 1), as in the released Glow code, which keeps training stable.
    The paper's actnorm inside the coupling net is left out.
  * Split (RealNVP's factoring out): after each level but the last, half the channels leave as z
    with a learned conditional prior N(mu(h), exp(log_sigma(h))^2) from a zero-initialised conv3x3 of
    the kept half h; the last level's prior has learned per-position mean and log-scale. Both are
    folded into the bijection (eps = (z - mu) / sigma, log-det -sum log_sigma), so eps is N(0, I).
  * Data: uniformly dequantised [-1, 1] images (base.dequantize), so -log p is a density on [-1, 1]^D;
    bits_per_dim goes through base.density_nats_to_bpd (an upper bound on the 8-bit NLL, Theis et al.
    2016). Training minimises that bits/dim, Adam with the gradient norm clipped at `max_grad_norm`.
  * sample(): eps ~ N(0, temperature^2 I) from the caller's generator (temperature scales every
    prior's standard deviation, the paper's sec. 5), inverted, clamped to [-1, 1].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.baselines.base import Baseline, BaselineConfig, SyncGrads, dequantize, density_nats_to_bpd, no_sync

__all__ = ["Config", "Glow", "ActNorm", "InvConv1x1", "AffineCoupling", "FlowStep", "squeeze", "unsqueeze",
           "latent_shapes"]

_LOG_2PI = math.log(2 * math.pi)


def _check_int(name: str, v, minimum: int = 1) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {v!r}")


@dataclass
class Config(BaselineConfig):
    hidden: int = 256             # width of each coupling's conv net (the paper: 512)
    num_scales: int = 3           # L levels of squeeze -> K steps -> split; each halves the side
    steps_per_scale: int = 16     # K flow steps per level (the paper: 32)
    lu_decomposed: bool = True    # LU-parameterised 1x1 convs (O(C) log-det) instead of dense W with slogdet
    temperature: float = 1.0      # sample(): std of eps (< 1 trades diversity for fidelity, the paper's sec. 5)
    max_grad_norm: float = 50.0   # clip the global gradient norm before each Adam step; 0 disables

    def __post_init__(self):
        super().__post_init__()
        r = self.resolution
        if r < 8 or r & (r - 1):
            raise ValueError(f"resolution: expected a power of two >= 8, got {r!r}")
        _check_int("hidden", self.hidden)
        _check_int("num_scales", self.num_scales)
        if 2 ** self.num_scales > r:
            raise ValueError(f"num_scales: expected 2**num_scales <= resolution ({r}), got {self.num_scales}")
        _check_int("steps_per_scale", self.steps_per_scale)
        if not isinstance(self.lu_decomposed, bool):
            raise ValueError(f"lu_decomposed: expected a bool, got {self.lu_decomposed!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0:
            raise ValueError(f"temperature: expected a number >= 0, got {t!r}")
        g = self.max_grad_norm
        if isinstance(g, bool) or not isinstance(g, (int, float)) or g < 0:
            raise ValueError(f"max_grad_norm: expected a number >= 0 (0 disables), got {g!r}")


# ------------------------------------------------------------------ layers
# Every layer: forward(x) -> (y, logdet (B,)), inverse(y) -> x. logdet = log |det dy/dx| per sample.


def squeeze(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2): each 2x2 patch into channels (a permutation: log-det 0)."""
    return F.pixel_unshuffle(x, 2)


def unsqueeze(x: Tensor) -> Tensor:
    """(B, 4C, H/2, W/2) -> (B, C, H, W), the inverse of squeeze."""
    return F.pixel_shuffle(x, 2)


class ActNorm(nn.Module):
    """y = (x + bias) * exp(log_scale) per channel; data-dependent init on the first training batch."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        # A buffer, not a Python attribute: saved and reloaded with the weights.
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def _init_from(self, x: Tensor) -> None:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)                       # (1, C, 1, 1)
        var = x.var(dim=(0, 2, 3), keepdim=True, unbiased=False)
        self.bias.copy_(-mean)
        # + 1e-6: a constant channel (one 1x1 position in a batch of 1) gets a finite scale.
        self.log_scale.copy_(-0.5 * torch.log(var + 1e-6))
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not bool(self.initialized):
            self._init_from(x)
        y = (x + self.bias) * torch.exp(self.log_scale)
        logdet = (x.shape[2] * x.shape[3]) * self.log_scale.sum()
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return y * torch.exp(-self.log_scale) - self.bias


class InvConv1x1(nn.Module):
    """y = W x at every pixel, W (C, C) invertible; LU-parameterised when `lu` (the paper's sec. 3.2)."""

    def __init__(self, channels: int, lu: bool = True):
        super().__init__()
        self.lu = lu
        w = torch.linalg.qr(torch.randn(channels, channels))[0]          # random orthogonal: log|det| = 0
        if lu:
            p, lower, upper = torch.linalg.lu(w)
            s = torch.diagonal(upper)
            self.register_buffer("perm", p)                             # fixed permutation
            self.register_buffer("sign_s", torch.sign(s))               # fixed signs of diag(U)
            self.lower = nn.Parameter(lower)                            # strictly-lower part is used
            self.upper = nn.Parameter(torch.triu(upper, 1))             # strictly-upper part is used
            self.log_s = nn.Parameter(torch.log(torch.abs(s)))
        else:
            self.weight = nn.Parameter(w)

    def _weight_and_logdet(self) -> tuple[Tensor, Tensor]:
        """(W (C, C), log |det W|) in the parameters' dtype."""
        if not self.lu:
            return self.weight, torch.linalg.slogdet(self.weight)[1]
        c = self.log_s.shape[0]
        eye = torch.eye(c, dtype=self.lower.dtype, device=self.lower.device)
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.perm @ lower @ upper, self.log_s.sum()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        w, logdet = self._weight_and_logdet()
        y = F.conv2d(x, w[:, :, None, None])                            # (B, C, H, W)
        return y, ((x.shape[2] * x.shape[3]) * logdet).expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        w, _ = self._weight_and_logdet()
        # Inverted in float64: a float32 inverse of a long-trained W loses digits the test checks (1e-5).
        w_inv = torch.linalg.inv(w.double()).to(y.dtype)
        return F.conv2d(y, w_inv[:, :, None, None])


class AffineCoupling(nn.Module):
    """y_a = x_a, y_b = (x_b + shift(x_a)) * sigmoid(raw(x_a) + 2) over the channel halves."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.ca = channels // 2                                         # conditioning half
        cb = channels - self.ca                                         # transformed half
        last = nn.Conv2d(hidden, 2 * cb, 3, padding=1)
        nn.init.zeros_(last.weight)                                     # starts as the identity (up to sigmoid(2))
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(
            nn.Conv2d(self.ca, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
            last,
        )

    def _shift_log_scale(self, xa: Tensor) -> tuple[Tensor, Tensor]:
        shift, raw = self.net(xa).chunk(2, dim=1)                       # (B, cb, H, W) each
        return shift, F.logsigmoid(raw + 2.0)                           # log scale < 0: scale in (0, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xa, xb = x[:, :self.ca], x[:, self.ca:]
        shift, log_scale = self._shift_log_scale(xa)
        yb = (xb + shift) * torch.exp(log_scale)
        return torch.cat([xa, yb], dim=1), log_scale.sum(dim=(1, 2, 3))

    def inverse(self, y: Tensor) -> Tensor:
        ya, yb = y[:, :self.ca], y[:, self.ca:]
        shift, log_scale = self._shift_log_scale(ya)
        return torch.cat([ya, yb * torch.exp(-log_scale) - shift], dim=1)


class FlowStep(nn.Module):
    """One step of flow (the paper's Fig. 2a): actnorm -> 1x1 conv -> affine coupling."""

    def __init__(self, channels: int, hidden: int, lu: bool = True):
        super().__init__()
        self.layers = nn.ModuleList([ActNorm(channels), InvConv1x1(channels, lu), AffineCoupling(channels, hidden)])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: Tensor) -> Tensor:
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y


def latent_shapes(c: Config) -> list[tuple[int, int, int]]:
    """(C, H, W) of what leaves at each level: the split-off halves, then the top. Sizes sum to D."""
    ch, side, shapes = c.in_channels, c.resolution, []
    for level in range(c.num_scales):
        ch, side = 4 * ch, side // 2
        if level < c.num_scales - 1:
            shapes.append((ch // 2, side, side))
            ch = ch - ch // 2
    shapes.append((ch, side, side))
    return shapes


# ------------------------------------------------------------------ the model


class Glow(Baseline):
    family = "glow"
    Config = Config
    has_likelihood = True
    likelihood_kind = "exact"

    def __init__(self, config: Config):
        super().__init__(config)
        c = config
        self.shapes = latent_shapes(c)
        self.levels = nn.ModuleList()
        self.split_priors = nn.ModuleList()     # level i < L-1: kept half (B, ck, h, w) -> (mu, log_sigma) of z
        ch = c.in_channels
        for level in range(c.num_scales):
            ch *= 4
            self.levels.append(nn.ModuleList(FlowStep(ch, c.hidden, c.lu_decomposed)
                                             for _ in range(c.steps_per_scale)))
            if level < c.num_scales - 1:
                cz = ch // 2
                kept = ch - cz
                prior = nn.Conv2d(kept, 2 * cz, 3, padding=1)
                nn.init.zeros_(prior.weight)                            # starts as N(0, I)
                nn.init.zeros_(prior.bias)
                self.split_priors.append(prior)
                ch = kept
        top = self.shapes[-1]
        self.top_mean = nn.Parameter(torch.zeros(top))                  # (C_top, h, w)
        self.top_log_scale = nn.Parameter(torch.zeros(top))

    @property
    def num_dims(self) -> int:
        c = self.config
        return c.in_channels * c.resolution * c.resolution

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, C, H, W) -> (eps (B, D) standard-normal coordinates, log |det d eps/dx| (B,))."""
        h, logdet, parts = x, x.new_zeros(x.shape[0]), []
        last = len(self.levels) - 1
        for level, steps in enumerate(self.levels):
            h = squeeze(h)
            for step in steps:
                h, ld = step(h)
                logdet = logdet + ld
            if level < last:
                cz = self.shapes[level][0]
                h, z = h[:, :-cz], h[:, -cz:]
                mean, log_sigma = self.split_priors[level](h).chunk(2, dim=1)
            else:
                z, mean, log_sigma = h, self.top_mean, self.top_log_scale.expand_as(h)
            parts.append(((z - mean) * torch.exp(-log_sigma)).flatten(1))
            logdet = logdet - log_sigma.flatten(1).sum(1)
        return torch.cat(parts, dim=1), logdet

    def decode(self, eps: Tensor) -> Tensor:
        """eps (B, D) -> x (B, C, H, W), the inverse of encode."""
        sizes = [math.prod(s) for s in self.shapes]
        parts = [p.reshape(-1, *s) for p, s in zip(eps.split(sizes, dim=1), self.shapes)]
        h = self.top_mean + torch.exp(self.top_log_scale) * parts[-1]
        last = len(self.levels) - 1
        for level in range(last, -1, -1):
            if level < last:
                mean, log_sigma = self.split_priors[level](h).chunk(2, dim=1)
                h = torch.cat([h, mean + torch.exp(log_sigma) * parts[level]], dim=1)
            for step in reversed(self.levels[level]):
                h = step.inverse(h)
            h = unsqueeze(h)
        return h

    def log_prob(self, x: Tensor) -> Tensor:
        """(B,) log-density (nats) of continuous x (B, C, H, W) in [-1, 1]."""
        eps, logdet = self.encode(x)
        return -0.5 * (eps.pow(2) + _LOG_2PI).sum(1) + logdet

    def train_step(self, x: Tensor, opts: dict[str, torch.optim.Optimizer], step: int,
                   sync_grads: SyncGrads = no_sync) -> dict[str, float]:
        opt = opts["model"]
        bpd = density_nats_to_bpd(-self.log_prob(dequantize(x)), self.num_dims).mean()
        opt.zero_grad(set_to_none=True)
        bpd.backward()
        params = list(self.parameters())
        sync_grads(params)
        logs = {"bpd": float(bpd.detach())}
        if self.config.max_grad_norm > 0:
            logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm))
        opt.step()
        return logs

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        dev = self.top_mean.device
        draw_dev = generator.device if generator is not None else dev
        eps = torch.randn(n, self.num_dims, generator=generator, device=draw_dev).to(dev)
        x = self.decode(eps * self.config.temperature)
        return x.float().clamp(-1, 1)

    @torch.no_grad()
    def bits_per_dim(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B,) bits/dim of 8-bit x under one uniform dequantisation draw (from `generator` if given)."""
        return density_nats_to_bpd(-self.log_prob(dequantize(x, generator)), self.num_dims)
