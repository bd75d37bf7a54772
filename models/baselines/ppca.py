"""Probabilistic PCA: Tipping & Bishop 1999, "Probabilistic Principal Component Analysis" (JRSS-B),
the closed-form maximum-likelihood solution of their section 3.2:

    x = mean + W z + eps,   z ~ N(0, I_q),  eps ~ N(0, s2 I_D)   =>   x ~ N(mean, C),  C = W W^T + s2 I
    mean = sample mean,  s2 = mean of the D - q smallest eigenvalues of the sample covariance S,
    W = U_q (L_q - s2 I)^(1/2)        (U_q, L_q: the top-q eigenvectors / eigenvalues; rotation R = I)

Choices:
  * Fitted by `fit_closed_form`, not by gradient steps: batches are streamed and only the sum of x
    and the sum of outer products x x^T (D x D, float64: D = C*H*W, 12288 at 64x64x3, about 1.2 GB)
    and the count are kept; `all_reduce` sums them over data-parallel ranks in one fixed order, then
    every rank runs the same eigendecomposition. `train_step` raises; `make_optimizers` is empty.
  * The density is scored on uniformly dequantised data (base.dequantize), so the fit maximises the
    expected log-likelihood of dequantised data E_u log N(x + u). A Gaussian's expected
    log-likelihood depends on the data only through its first two moments, and those are known
    exactly for x' = (p + u)/128 - 1 = a (x + 1) - 1 + u/128 with a = 127.5/128, u ~ U(0, 1):
        E x' = a (mean_x + 1) - 1 + 1/256,     Cov x' = a^2 S_x + I / (12 * 128^2)
    so the fit is deterministic and exact (no noise is drawn), and s2 >= 1/(12 * 128^2) > 0 even when
    the data's covariance is rank deficient (fewer images than dimensions).
  * Log-density with the matrix determinant and Woodbury lemmas, q x q work per sample:
        M = W^T W + s2 I_q,  log det C = (D - q) log s2 + log det M,
        r^T C^-1 r = (|r|^2 - |L^-1 W^T r|^2) / s2       (L L^T = M, Cholesky)
    bits_per_dim is exact for the dequantised density (base.density_nats_to_bpd), computed in float64.
  * Parameters live in float64 buffers (mean, W, s2): nothing is learned by gradient. Before a fit the
    model is N(0, I).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor

from models.baselines.base import (Baseline, BaselineConfig, SyncGrads, dequantize, density_nats_to_bpd,
                                   no_sync)

__all__ = ["Config", "PPCA", "dequantized_moments", "ppca_from_covariance", "ppca_log_prob"]

# base.dequantize maps the 8-bit value p to (p + u) / 128 - 1 while x = p / 127.5 - 1.
_A = 127.5 / 128.0
_DEQ_VAR = 1.0 / (12.0 * 128.0 ** 2)   # variance of u / 128, u ~ U(0, 1)


@dataclass
class Config(BaselineConfig):
    latent_dim: int = 64   # q: principal directions kept (must be < D = in_channels * resolution^2)

    def __post_init__(self):
        super().__post_init__()
        q = self.latent_dim
        d = self.in_channels * self.resolution ** 2
        if not isinstance(q, int) or isinstance(q, bool) or not 1 <= q < d:
            raise ValueError(f"latent_dim: expected an int in [1, {d}) (D = in_channels * resolution^2), got {q!r}")


def dequantized_moments(sum_x: Tensor, sum_xx: Tensor, n: float) -> tuple[Tensor, Tensor]:
    """Exact mean (D,) and covariance (D, D) of the dequantised data from the sums over n images of
    x (D,) and x x^T (D, D) of the 8-bit data in [-1, 1] (see the module docstring)."""
    mean_x = sum_x / n
    cov_x = sum_xx / n - torch.outer(mean_x, mean_x)           # ML (biased) covariance
    mean = _A * (mean_x + 1.0) - 1.0 + 0.5 / 128.0
    cov = _A ** 2 * cov_x
    cov.diagonal().add_(_DEQ_VAR)
    return mean, cov


def ppca_from_covariance(cov: Tensor, q: int) -> tuple[Tensor, Tensor, Tensor]:
    """Tipping & Bishop's ML solution from a covariance S (D, D): (W (D, q), s2 (), eigenvalues (D,)
    in descending order)."""
    evals, evecs = torch.linalg.eigh(cov)                      # ascending
    evals, evecs = evals.flip(0).clamp_min(0.0), evecs.flip(1)
    s2 = evals[q:].mean()
    w = evecs[:, :q] * (evals[:q] - s2).clamp_min(0.0).sqrt()  # (D, q): U_q (L_q - s2 I)^1/2
    return w, s2, evals


def ppca_log_prob(x: Tensor, mean: Tensor, w: Tensor, s2: Tensor) -> Tensor:
    """log N(x; mean, W W^T + s2 I) for x (B, D), by Woodbury; (B,) in x's dtype."""
    d, q = w.shape
    r = x - mean                                               # (B, D)
    m = w.T @ w + s2 * torch.eye(q, dtype=w.dtype, device=w.device)
    chol = torch.linalg.cholesky(m)                            # (q, q)
    proj = torch.linalg.solve_triangular(chol, (r @ w).T, upper=False)   # (q, B): L^-1 W^T r
    maha = (r.pow(2).sum(1) - proj.pow(2).sum(0)) / s2
    logdet = (d - q) * torch.log(s2) + 2.0 * torch.log(torch.diagonal(chol)).sum()
    return -0.5 * (d * math.log(2 * math.pi) + logdet + maha)


class PPCA(Baseline):
    family = "ppca"
    Config = Config
    has_likelihood = True
    likelihood_kind = "exact"

    def __init__(self, config: Config):
        super().__init__(config)
        d = config.in_channels * config.resolution ** 2
        self.dim, self.q = d, config.latent_dim
        self.register_buffer("mean", torch.zeros(d, dtype=torch.float64))
        self.register_buffer("w", torch.zeros(d, config.latent_dim, dtype=torch.float64))
        self.register_buffer("s2", torch.ones((), dtype=torch.float64))

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}   # closed form: nothing to optimise

    def train_step(self, x: Tensor, opts: dict[str, torch.optim.Optimizer], step: int,
                   sync_grads: SyncGrads = no_sync) -> dict[str, float]:
        raise NotImplementedError("ppca: fitted in closed form by fit_closed_form, it has no train_step")

    @torch.no_grad()
    def fit_closed_form(self, batches: Iterator[Tensor],
                        all_reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        dev = self.mean.device
        sum_x = torch.zeros(self.dim, dtype=torch.float64, device=dev)
        sum_xx = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=dev)
        n = torch.zeros((), dtype=torch.float64, device=dev)
        for x in batches:
            if x.shape[1:] != (self.config.in_channels, self.config.resolution, self.config.resolution):
                raise ValueError(f"x: expected (B, {self.config.in_channels}, {self.config.resolution}, "
                                 f"{self.config.resolution}), got {tuple(x.shape)}")
            flat = x.to(device=dev, dtype=torch.float64).reshape(x.shape[0], -1)   # (B, D)
            sum_x += flat.sum(0)
            sum_xx.addmm_(flat.T, flat)
            n += flat.shape[0]
        if all_reduce is not None:   # every rank calls in this order: sums of the whole data set
            n, sum_x, sum_xx = all_reduce(n), all_reduce(sum_x), all_reduce(sum_xx)
        if n.item() < 2:
            raise ValueError(f"batches: expected at least 2 images to fit, got {int(n.item())}")
        mean, cov = dequantized_moments(sum_x, sum_xx, n)
        w, s2, evals = ppca_from_covariance(cov, self.q)
        self.mean.copy_(mean)
        self.w.copy_(w)
        self.s2.copy_(s2)
        # At the ML solution tr(C^-1 S) = D, so the mean training NLL is 0.5 (D log 2 pi + log det C + D).
        logdet = (self.dim - self.q) * torch.log(s2) + torch.log(evals[:self.q]).sum()
        nll = 0.5 * (self.dim * math.log(2 * math.pi) + logdet + self.dim)
        return {"images": float(n), "s2": float(s2), "explained_variance": float(evals[:self.q].sum() / evals.sum()),
                "train_bpd": float(density_nats_to_bpd(nll, self.dim))}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        dev = self.mean.device
        z = torch.randn(n, self.q, generator=generator, device=dev, dtype=torch.float64)
        eps = torch.randn(n, self.dim, generator=generator, device=dev, dtype=torch.float64)
        x = self.mean + z @ self.w.T + self.s2.sqrt() * eps    # (n, D)
        c, r = self.config.in_channels, self.config.resolution
        return x.clamp(-1, 1).float().reshape(n, c, r, r)

    @torch.no_grad()
    def bits_per_dim(self, x: Tensor) -> Tensor:
        xd = dequantize(x).to(torch.float64).reshape(x.shape[0], -1)   # (B, D)
        nll = -ppca_log_prob(xd, self.mean, self.w, self.s2)
        return density_nats_to_bpd(nll, self.dim).float()
