"""Noise schedules: pure functions of tensors, all float64.

A schedule is the sequence beta_1..beta_T of DDPM (Ho et al. 2020); everything the denoiser and the
samplers need is derived from alpha_bar_t = prod_{s<=t} (1 - beta_s), indexed 0..T-1 here.
float64 throughout: at small t, 1 - alpha_bar_t is ~1e-4 and loses most of its digits in float32
(and all of them in bf16), which biases the lowest-noise training targets and the last sampling step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .checkpoint import check_int, config_from_dict, config_to_dict

__all__ = [
    "SCHEDULES",
    "ScheduleConfig",
    "alphas_cumprod",
    "cosine_betas",
    "linear_betas",
    "scaled_linear_betas",
]


def linear_betas(n: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> Tensor:
    """DDPM's linear schedule (Ho et al. 2020, sec. 4): betas evenly spaced. -> (n,) float64"""
    return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)


def scaled_linear_betas(n: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """Stable Diffusion's schedule: sqrt(beta) evenly spaced, then squared. -> (n,) float64"""
    return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), n, dtype=torch.float64) ** 2


def cosine_betas(n: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2),
    beta_t = 1 - alpha_bar(t) / alpha_bar(t-1), clipped to max_beta (the paper uses 0.999) because
    the last betas approach 1 and would make alpha_bar_T exactly 0. -> (n,) float64"""
    t = torch.arange(n + 1, dtype=torch.float64) / n  # (n+1,) in [0, 1]
    alpha_bar = torch.cos((t + s) / (1 + s) * (math.pi / 2)) ** 2
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


def alphas_cumprod(betas: Tensor) -> Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) (DDPM eq. 4's notation). (T,) -> (T,) float64"""
    return torch.cumprod(1 - betas.to(torch.float64), dim=0)


# name -> betas factory. Linear kinds take (n, beta_start, beta_end); cosine takes (n) and has
# its own shape parameters, so ScheduleConfig passes beta_start/beta_end to the linear kinds only.
SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "cosine": cosine_betas,
    "linear": linear_betas,
    "scaled_linear": scaled_linear_betas,
}
_USES_BETA_RANGE = ("linear", "scaled_linear")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class ScheduleConfig:
    """The training noise schedule. Saved beside the weights: sampling must use the same one."""

    kind: str = "scaled_linear"  # a key of SCHEDULES
    num_timesteps: int = 1000  # T, number of discrete training timesteps
    beta_start: float = 0.00085  # beta_1 for the linear kinds (ignored by cosine)
    beta_end: float = 0.012  # beta_T for the linear kinds (ignored by cosine)

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"kind: expected one of {', '.join(sorted(SCHEDULES))}, got {self.kind!r}")
        check_int("num_timesteps", self.num_timesteps, minimum=2)
        for name in ("beta_start", "beta_end"):
            v = getattr(self, name)
            if not _is_number(v) or not 0 < v < 1:
                raise ValueError(f"{name}: expected a number in (0, 1), got {v!r}")
        if self.beta_start > self.beta_end:
            raise ValueError(f"beta_start: must be <= beta_end ({self.beta_end}), got {self.beta_start}")

    def betas(self) -> Tensor:
        """(num_timesteps,) float64"""
        factory = SCHEDULES[self.kind]
        if self.kind in _USES_BETA_RANGE:
            return factory(self.num_timesteps, self.beta_start, self.beta_end)
        return factory(self.num_timesteps)

    def alphas_cumprod(self) -> Tensor:
        """(num_timesteps,) float64, strictly decreasing in (0, 1)."""
        return alphas_cumprod(self.betas())

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScheduleConfig":
        return config_from_dict(cls, d)
