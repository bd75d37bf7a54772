"""Noise schedules: pure functions of tensors, all float64.

A schedule is the sequence beta_1..beta_T of DDPM (Ho et al. 2020); everything the denoiser and the
samplers need is derived from alpha_bar_t = prod_{s<=t} (1 - beta_s), indexed 0..T-1 here.
Optionally rescaled to zero terminal SNR (Lin et al. 2024), where alpha_bar_{T-1} = 0 exactly.
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
    "alpha_bar_at",
    "alphas_cumprod",
    "cosine_betas",
    "linear_betas",
    "rescale_zero_terminal_snr",
    "scaled_linear_betas",
    "snr",
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


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), Algorithm 1:
    shift and scale sqrt(alpha_bar) so that its last value is exactly 0 (zero terminal SNR: x_{T-1} is
    pure noise, as at sampling time) while its first value is unchanged. Same result as diffusers'
    rescale_zero_terminal_snr, which does it to the betas (then re-derives alpha_bar from them).
    (T,) -> (T,) float64, alpha_bar_{T-1} = 0.
    """
    sqrt_ab = alphas_cumprod.to(torch.float64).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    return sqrt_ab**2


def snr(alphas_cumprod: Tensor) -> Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) (Kingma et al. 2021). (T,) -> (T,) float64;
    0 at a zero-terminal-SNR t = T-1. Finite everywhere since every beta > 0 keeps alpha_bar < 1."""
    a = alphas_cumprod.to(torch.float64)
    return a / (1 - a)


def alpha_bar_at(alphas_cumprod: Tensor, t: Tensor) -> Tensor:
    """alpha_bar at timesteps t: (B,) long or float in [0, T-1] -> (B,) float64 on t's device.

    Integral t (any dtype) is an exact lookup. Fractional t (EulerDiscreteScheduler with "linspace"
    spacing visits e.g. t = 41.625) interpolates the VE noise level sigma = sqrt((1 - a) / a)
    linearly in t, exactly as diffusers' EulerDiscreteScheduler does (np.interp over sigmas), then
    maps back with a = 1 / (1 + sigma^2); denoiser and sampler then agree on the noise level.
    """
    ac = alphas_cumprod.to(device=t.device, dtype=torch.float64)
    if not t.is_floating_point() or bool((t == t.round()).all()):
        return ac[t.round().long()]
    tf = t.to(torch.float64).clamp(0, ac.numel() - 1)
    lo = tf.floor().long().clamp(max=ac.numel() - 2)
    w = tf - lo
    # sigma_{T-1} is inf at zero terminal SNR: pick the endpoints where w is 0 or 1 (integral t in a
    # batch with fractional ones) instead of computing 0 * inf = nan.
    sig = ((1 - ac) / ac).sqrt()  # (T,)
    s_lo, s_hi = sig[lo], sig[lo + 1]
    sigma = torch.where(w == 1, s_hi, torch.where(w == 0, s_lo, (1 - w) * s_lo + w * s_hi))
    return 1 / (1 + sigma**2)


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
    # Lin et al. 2024: rescale so alpha_bar_{T-1} = 0 (the model trains on pure noise at t = T-1, as it
    # is sampled). Requires v- or x0-prediction: eps is unidentifiable from pure noise (the objective
    # config refuses eps with it). Pair with "trailing" timestep spacing, which starts at t = T-1.
    rescale_zero_terminal_snr: bool = False

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
        if not isinstance(self.rescale_zero_terminal_snr, bool):
            raise ValueError(f"rescale_zero_terminal_snr: expected a bool, got {self.rescale_zero_terminal_snr!r}")

    def _base_betas(self) -> Tensor:
        factory = SCHEDULES[self.kind]
        if self.kind in _USES_BETA_RANGE:
            return factory(self.num_timesteps, self.beta_start, self.beta_end)
        return factory(self.num_timesteps)

    def betas(self) -> Tensor:
        """(num_timesteps,) float64; the last is exactly 1 with rescale_zero_terminal_snr."""
        if not self.rescale_zero_terminal_snr:
            return self._base_betas()
        ac = self.alphas_cumprod()
        return 1 - ac / torch.cat([ac.new_ones(1), ac[:-1]])

    def alphas_cumprod(self) -> Tensor:
        """(num_timesteps,) float64, strictly decreasing in (0, 1); alpha_bar_{T-1} = 0 exactly with
        rescale_zero_terminal_snr (then SNR = 0 there: see snr, and the denoiser's checks)."""
        ac = alphas_cumprod(self._base_betas())
        return rescale_zero_terminal_snr(ac) if self.rescale_zero_terminal_snr else ac

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScheduleConfig":
        return config_from_dict(cls, d)
