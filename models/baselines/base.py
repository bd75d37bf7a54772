"""The contract every baseline family follows (pure torch: no Ray, no MLflow).

A family is an nn.Module subclass of `Baseline` with a typed, validated config dataclass
(`Config`, built by `Config.from_dict`, saved beside the weights as `config.json`). The stage
(`pipelines/train_baseline.py`) only ever calls what is below, so every family trains, samples and is
scored the same way.

Data convention: images are float tensors (B, C, H, W) in [-1, 1], made from 8-bit pixels
(x = p / 127.5 - 1). Likelihoods are reported as bits per dimension of the 8-bit data, so discrete
models (PixelCNN, ImageGPT: a 256-way softmax) and continuous ones (PPCA, VAE, flows, diffusion:
densities on [-1, 1] under uniform dequantisation) are on one scale:
    bpd = (-log p(x) + D * log(128)) / (D * log 2)    for a density p on [-1, 1]^D
(one 8-bit bin is 2/256 wide in [-1, 1]); see `density_nats_to_bpd`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch
from torch import nn

from models.optim import adam

# Called after each backward with the parameters whose .grad must be averaged over data-parallel
# ranks (the stage passes an all_reduce; a single process passes a no-op).
SyncGrads = Callable[[Iterable[nn.Parameter]], None]


def no_sync(params: Iterable[nn.Parameter]) -> None:
    """SyncGrads for one process."""


class NoLikelihood(NotImplementedError):
    """Raised by bits_per_dim of a family without a (bound on its) likelihood, e.g. a GAN."""


@dataclass
class BaselineConfig:
    """Fields every family has; a family's Config subclasses this and adds its own."""
    in_channels: int = 3      # image channels
    resolution: int = 32      # square image side
    lr: float = 2e-4          # Adam learning rate (every optimizer of the family)

    def __post_init__(self):
        for name in ("in_channels", "resolution"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if not isinstance(self.lr, (int, float)) or self.lr <= 0:
            raise ValueError(f"lr: expected > 0, got {self.lr!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BaselineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown field (expected one of {sorted(known)})")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Baseline(nn.Module):
    """One generative family. Subclasses set `family`, `Config`, `has_likelihood` and implement
    `train_step` and `sample` (and `bits_per_dim` when has_likelihood)."""

    family: ClassVar[str]
    Config: ClassVar[type[BaselineConfig]] = BaselineConfig
    has_likelihood: ClassVar[bool] = False      # exact likelihood or a bound on it (VAE, diffusion ELBO)
    likelihood_kind: ClassVar[str] = "n/a"      # "exact" | "bound" | "n/a": said in the comparison table

    def __init__(self, config: BaselineConfig):
        super().__init__()
        self.config = config

    # ---- training --------------------------------------------------------------------------
    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Named optimizers (one Adam over all parameters unless the family overrides it; a GAN has
        "generator" and "discriminator"). Their state is checkpointed by name."""
        return {"model": adam(self.parameters(), lr=self.config.lr)}

    def train_step(self, x: torch.Tensor, opts: dict[str, torch.optim.Optimizer], step: int,
                   sync_grads: SyncGrads = no_sync) -> dict[str, float]:
        """One optimisation step on batch x (B, C, H, W) in [-1, 1]; returns scalar logs. Calls
        sync_grads(params) between each backward and its optimizer step."""
        raise NotImplementedError

    def fit_closed_form(self, batches: Iterator[torch.Tensor],
                        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float] | None:
        """Families with a closed-form fit (PPCA) fit from `batches` here and return logs; others
        return None and are trained by train_step. all_reduce sums a tensor over ranks."""
        return None

    # ---- sampling and scoring --------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images (n, C, H, W) in [-1, 1], reproducible from `generator`."""
        raise NotImplementedError

    def bits_per_dim(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) bits per dimension of x (B, C, H, W) in [-1, 1] (8-bit data), or NoLikelihood."""
        raise NoLikelihood(f"{self.family}: has no likelihood (bits per dimension is n/a)")


def density_nats_to_bpd(nll_nats: torch.Tensor, num_dims: int) -> torch.Tensor:
    """Negative log-density (nats) of a continuous model on [-1, 1]^D -> bits/dim of 8-bit data."""
    return (nll_nats + num_dims * math.log(128.0)) / (num_dims * math.log(2.0))


def dequantize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform dequantisation of 8-bit data in [-1, 1]: add U(0, 2/256) to each value's bin floor
    (x = p/127.5 - 1 sits on the bin's low edge up to the 255/127.5 vs 256/128 scale)."""
    p = torch.round((x.clamp(-1, 1) + 1) * 127.5)              # the 8-bit value 0..255
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (p + u) / 128.0 - 1.0                                 # in [-1, 1)


def to_8bit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> long pixel values 0..255 (what discrete models predict)."""
    return torch.round((x.clamp(-1, 1) + 1) * 127.5).long()
