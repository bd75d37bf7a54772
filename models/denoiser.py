"""Denoisers: the network apart from its objective (k-diffusion's layers.Denoiser, EDM's *Precond).

`net(x_t, t, context, context_mask)` is any network; a denoiser owns the forward process, what the
net's output means (eps, v or x0 for diffusion; a velocity for flow matching), the training target,
the loss weighting and the loss. ObjectiveConfig names the choice and build_denoiser makes the module.

Sampler contract (models/samplers.py): a denoiser's forward(x_t, t, context, context_mask) returns
the DENOISED prediction x0_hat, whatever the net predicts. x0 rather than eps because x0 stays
finite everywhere: at zero terminal SNR (alpha_bar_{T-1} = 0) eps -> x0 divides by sqrt(alpha_bar) = 0,
while v -> x0 (= -v there) and x0 -> eps (= x_t there) do not. Classifier-free guidance is unchanged by
the choice: at fixed (x_t, t), x0 and eps are affine images of each other, and an affine map commutes
with the guidance combination u + s (c - u).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import config_from_dict, config_to_dict
from .schedules import ScheduleConfig, alpha_bar_at

__all__ = [
    "LOSS_WEIGHTINGS",
    "OBJECTIVES",
    "PREDICTIONS",
    "Denoiser",
    "EpsDenoiser",
    "FlowDenoiser",
    "ObjectiveConfig",
    "build_denoiser",
    "drop_conditioning",
    "min_snr_weight",
    "prediction_target",
    "prediction_to_x0",
    "x0_to_prediction",
]

# What the wrapped diffusion network outputs: the noise (DDPM), v = sqrt(a) eps - sqrt(1-a) x0
# (Salimans & Ho 2022, sec. 4), or the clean sample. For the flow objective the net outputs the
# rectified-flow velocity eps - x0, spelled "v" in ObjectiveConfig.
PREDICTIONS = ("eps", "v", "x0")
OBJECTIVES = ("diffusion", "flow")
LOSS_WEIGHTINGS = ("none", "min_snr")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class ObjectiveConfig:
    """What the network is trained to predict and how the loss weighs it. Saved beside the weights:
    sampling must convert the net's output the same way."""

    kind: str = "diffusion"  # "diffusion" (DDPM forward process of the ScheduleConfig) or "flow"
    # diffusion: "eps" | "v" | "x0". flow: "v" only (the velocity eps - x0 of x_s = (1-s) x0 + s eps).
    prediction: str = "eps"
    # "min_snr": Hang et al. 2023, per-sample weight min(SNR, gamma) expressed for the prediction type
    # (see min_snr_weight); diffusion only (flow has no DDPM SNR).
    loss_weighting: str = "none"
    min_snr_gamma: float = 5.0  # the paper's gamma; used only with loss_weighting="min_snr"
    # Offset noise (Guttenberg 2023): noise + offset * N(0, 1) per (sample, channel), letting the model
    # change a latent's mean brightness; 0 disables. 0.1 is the usual value.
    offset_noise: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVES:
            raise ValueError(f"kind: expected one of {', '.join(OBJECTIVES)}, got {self.kind!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction: expected one of {', '.join(PREDICTIONS)}, got {self.prediction!r}")
        if self.kind == "flow" and self.prediction != "v":
            raise ValueError(f"prediction: kind='flow' predicts the velocity, expected 'v', got {self.prediction!r}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(
                f"loss_weighting: expected one of {', '.join(LOSS_WEIGHTINGS)}, got {self.loss_weighting!r}"
            )
        if self.kind == "flow" and self.loss_weighting != "none":
            raise ValueError(f"loss_weighting: kind='flow' supports 'none' only, got {self.loss_weighting!r}")
        if not _is_number(self.min_snr_gamma) or not self.min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma: expected a positive number, got {self.min_snr_gamma!r}")
        if not _is_number(self.offset_noise) or not 0 <= self.offset_noise < 1:
            raise ValueError(f"offset_noise: expected a number in [0, 1), got {self.offset_noise!r}")

    def check_schedule(self, schedule: ScheduleConfig) -> None:
        """Refuse combinations that cannot train, before any work (build_denoiser calls it; a pipeline
        config can call it in its own __post_init__).

        eps-prediction with zero terminal SNR: at t = T-1, x_t is pure noise, so eps = x_t is trivial to
        predict but carries no information about x0, and x0 = (x_t - sqrt(1-a) eps) / sqrt(a) divides by
        0; Lin et al. 2024 (sec. 3.2) switch to v-prediction for this reason.
        """
        if self.kind == "diffusion" and self.prediction == "eps" and schedule.rescale_zero_terminal_snr:
            raise ValueError(
                "prediction: 'eps' is ill-posed with rescale_zero_terminal_snr (x0 = (x_t - eps) / 0 at "
                "t = T-1); use 'v' (Lin et al. 2024) or 'x0'"
            )

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ObjectiveConfig":
        return config_from_dict(cls, d)


def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    # Draw on the generator's own device (a CPU generator may drive CUDA tensors; the draw is then
    # copied over, and gives the same numbers on any accelerator), else on the target's.
    return generator.device if generator is not None else device


def _expand_like(coef: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against x, in x's dtype."""
    return coef.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def _work_dtype(x: Tensor) -> torch.dtype:
    # Conversions in at least float32: a bf16 net output times 1/sqrt(alpha_bar) would lose everything.
    return torch.promote_types(x.dtype, torch.float32)


# ------------------------------------------------------------------ prediction conversions
# Pure functions of (B, ...) tensors and alpha_bar (B,) float64 (one value per sample). With
# a = alpha_bar, x_t = sqrt(a) x0 + sqrt(1-a) eps and v = sqrt(a) eps - sqrt(1-a) x0.


def prediction_to_x0(out: Tensor, x_t: Tensor, alpha_bar: Tensor, prediction: str) -> Tensor:
    """The net's output -> x0_hat, in the promoted dtype of x_t and float32.
    eps: (x_t - sqrt(1-a) eps) / sqrt(a) (infinite at a = 0); v: sqrt(a) x_t - sqrt(1-a) v; x0: itself."""
    dt = _work_dtype(x_t)
    out, x = out.to(dt), x_t.to(dt)
    if prediction == "x0":
        return out
    sa, s1 = _expand_like(alpha_bar.sqrt(), x), _expand_like((1 - alpha_bar).sqrt(), x)
    if prediction == "eps":
        return (x - s1 * out) / sa
    if prediction == "v":
        return sa * x - s1 * out
    raise ValueError(f"prediction: expected one of {', '.join(PREDICTIONS)}, got {prediction!r}")


def x0_to_prediction(x0: Tensor, x_t: Tensor, alpha_bar: Tensor, prediction: str) -> Tensor:
    """Inverse of prediction_to_x0 at the same (x_t, a). eps = (x_t - sqrt(a) x0) / sqrt(1-a);
    v = sqrt(a) eps - sqrt(1-a) x0 = (sqrt(a) x_t - x0) / sqrt(1-a). Finite for every a < 1 (all t)."""
    dt = _work_dtype(x_t)
    x0, x = x0.to(dt), x_t.to(dt)
    if prediction == "x0":
        return x0
    sa, s1 = _expand_like(alpha_bar.sqrt(), x), _expand_like((1 - alpha_bar).sqrt(), x)
    if prediction == "eps":
        return (x - sa * x0) / s1
    if prediction == "v":
        return (sa * x - x0) / s1
    raise ValueError(f"prediction: expected one of {', '.join(PREDICTIONS)}, got {prediction!r}")


def prediction_target(x0: Tensor, noise: Tensor, alpha_bar: Tensor, prediction: str) -> Tensor:
    """The regression target for a net of this prediction type, given the clean x0 and the noise that
    made x_t. eps: noise (DDPM eq. 14); v: sqrt(a) noise - sqrt(1-a) x0 (Salimans & Ho 2022); x0: x0."""
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    if prediction == "v":
        return _expand_like(alpha_bar.sqrt(), noise) * noise - _expand_like((1 - alpha_bar).sqrt(), x0) * x0
    raise ValueError(f"prediction: expected one of {', '.join(PREDICTIONS)}, got {prediction!r}")


def min_snr_weight(snr: Tensor, prediction: str, gamma: float) -> Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for an MSE on the given prediction type. (B,) -> (B,)

    The paper's weight min(SNR, gamma) is defined for the x0-MSE. An eps-MSE equals SNR times the x0-MSE,
    so its weight is min(SNR, gamma) / SNR; a v-MSE equals (SNR + 1) times it, so min(SNR, gamma) / (SNR + 1).
    (eps at SNR = 0 is 0 / 0; ObjectiveConfig refuses eps with zero terminal SNR.)
    """
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "v":
        return clipped / (snr + 1)
    if prediction == "x0":
        return clipped
    raise ValueError(f"prediction: expected one of {', '.join(PREDICTIONS)}, got {prediction!r}")


def _draw_noise(
    shape: torch.Size, dtype: torch.dtype, device: torch.device, offset: float, generator: torch.Generator | None
) -> Tensor:
    """N(0, I) of `shape` (B, C, ...), plus offset * N(0, 1) constant over each (sample, channel)'s
    spatial dims when offset > 0 (offset noise: B x C extra draws of shape (B, C, 1, ..., 1))."""
    dev = _draw_device(generator, device)
    noise = torch.randn(shape, device=dev, dtype=dtype, generator=generator)
    if offset > 0:
        per_channel = (shape[0], shape[1]) + (1,) * (len(shape) - 2)
        noise = noise + offset * torch.randn(per_channel, device=dev, dtype=dtype, generator=generator)
    return noise.to(device)


class Denoiser(nn.Module):
    """DDPM-process denoiser: wraps net(x_t, t, context, context_mask) -> eps | v | x0.

    forward returns x0_hat (the sampler contract, see the module doc) with
    extra_args = {"context": ..., "context_mask": ...}.
    """

    def __init__(
        self,
        net: nn.Module,
        alphas_cumprod: Tensor,
        prediction: str = "eps",
        loss_weighting: str = "none",
        min_snr_gamma: float = 5.0,
        offset_noise: float = 0.0,
    ):
        super().__init__()
        # Same checks as the config, so direct construction fails as early and as clearly.
        ObjectiveConfig(
            prediction=prediction, loss_weighting=loss_weighting, min_snr_gamma=min_snr_gamma, offset_noise=offset_noise
        )
        if alphas_cumprod.ndim != 1 or alphas_cumprod.numel() < 2:
            raise ValueError(f"alphas_cumprod: expected a 1-D tensor (T,), got shape {tuple(alphas_cumprod.shape)}")
        if prediction == "eps" and float(alphas_cumprod.min()) <= 0:
            raise ValueError("prediction: 'eps' is ill-posed when alphas_cumprod reaches 0 (zero terminal SNR); use 'v'")
        self.net = net
        self.prediction = prediction
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = float(min_snr_gamma)
        self.offset_noise = float(offset_noise)
        # (T,) float64. Not persistent: the schedule is rebuilt from ScheduleConfig saved beside the
        # weights, so a checkpoint's state_dict is exactly the net's, and a mismatched schedule can
        # never be loaded silently from a stale buffer.
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().to(torch.float64), persistent=False)

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def _apply(self, fn, recurse=True):
        # .bfloat16()/.half()/.to(dtype) (DeepSpeed bf16 does this) would cast the schedule too; in
        # bf16, 1 - alpha_bar at small t (~1e-3) rounds to 0 or 2^-8 and the low-noise targets break.
        # Let the device move happen, keep float64.
        ac = self.alphas_cumprod
        super()._apply(fn, recurse)
        self.alphas_cumprod = ac.to(device=self.alphas_cumprod.device, dtype=torch.float64)
        return self

    def alpha_bar(self, t: Tensor) -> Tensor:
        """(B,) timesteps (long, or float for fractional ones) -> (B,) float64 alpha_bar_t."""
        return alpha_bar_at(self.alphas_cumprod, t)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (DDPM eq. 4). x0, noise: (B, ...); t: (B,)."""
        if t.shape != (x0.shape[0],):
            raise ValueError(f"t: expected shape ({x0.shape[0]},), got {tuple(t.shape)}")
        a = self.alpha_bar(t)
        return _expand_like(a.sqrt(), x0) * x0 + _expand_like((1 - a).sqrt(), x0) * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return prediction_target(x0, noise, self.alpha_bar(t), self.prediction)

    def loss_weights(self, t: Tensor) -> Tensor:
        """(B,) float64 per-sample loss weights (all 1 for loss_weighting='none')."""
        if self.loss_weighting == "none":
            return torch.ones(t.shape, dtype=torch.float64, device=t.device)
        a = self.alpha_bar(t)
        return min_snr_weight(a / (1 - a), self.prediction, self.min_snr_gamma)

    def loss(
        self,
        x0: Tensor,
        context: Tensor,
        context_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """t ~ U{0..T-1}, noise ~ N(0, I) (+ offset noise), weighted MSE(net(x_t, t), target).
        With prediction='eps' and no weighting this is L_simple (DDPM eq. 14).

        x0: (B, C, H, W) latents; context: (B, L, D); context_mask: (B, L) bool.
        generator: draws t and the noise on its device (any), then moves them to x0's. Returns a float32 scalar.
        """
        b, dev = x0.shape[0], _draw_device(generator, x0.device)
        t = torch.randint(0, self.num_timesteps, (b,), device=dev, generator=generator).to(x0.device)
        noise = _draw_noise(x0.shape, x0.dtype, x0.device, self.offset_noise, generator)
        x_t = self.q_sample(x0, t, noise)
        out = self.net(x_t, t, context, context_mask)
        # MSE in float32: a bf16 reduction over millions of elements loses the small-t signal.
        target = self.target(x0, noise, t).float()
        if self.loss_weighting == "none":
            return F.mse_loss(out.float(), target)
        per_sample = (out.float() - target).pow(2).flatten(1).mean(1)  # (B,)
        return (self.loss_weights(t).float() * per_sample).mean()

    def forward(
        self, x_t: Tensor, t: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor:
        """x0_hat in x_t's dtype. x_t: (B, C, H, W); t: (B,) long (or float, for fractional timesteps);
        context: (B, L, D); context_mask: (B, L)."""
        out = self.net(x_t, t, context, context_mask)
        return prediction_to_x0(out, x_t, self.alpha_bar(t), self.prediction).to(x_t.dtype)


class EpsDenoiser(Denoiser):
    """The eps-prediction Denoiser under its historical name (pipelines build it directly)."""

    def __init__(self, net: nn.Module, alphas_cumprod: Tensor, prediction: str = "eps"):
        if prediction != "eps":
            raise ValueError(f"prediction: EpsDenoiser predicts 'eps' only (use build_denoiser), got {prediction!r}")
        super().__init__(net, alphas_cumprod, prediction="eps")


class FlowDenoiser(nn.Module):
    """Flow matching / rectified flow (Liu et al. 2022; Lipman et al. 2023), SD3's convention (Esser et al.
    2024): x_s = (1 - s) x0 + s eps for continuous s in [0, 1] (s = 1 is pure noise), and the net
    regresses the constant velocity dx_s/ds = eps - x0.

    The net is called with t = s * num_timesteps, so a network whose sinusoidal embedding was designed
    for discrete steps 0..T-1 (models/unet.py) sees the same range of t. Its `t` argument is therefore
    a float tensor here. forward(x_s, s, ...) takes s itself (the flow sampler's time) and returns
    x0_hat = x_s - s v, the same contract as Denoiser.
    """

    def __init__(self, net: nn.Module, num_timesteps: int = 1000, offset_noise: float = 0.0):
        super().__init__()
        ObjectiveConfig(kind="flow", prediction="v", offset_noise=offset_noise)  # validate
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps: expected a positive int, got {num_timesteps!r}")
        self.net = net
        self.prediction = "v"
        self.num_timesteps = num_timesteps
        self.offset_noise = float(offset_noise)

    def net_time(self, s: Tensor) -> Tensor:
        """(B,) s in [0, 1] -> (B,) float32 t = s * num_timesteps, the net's time input."""
        return s.float() * self.num_timesteps

    def q_sample(self, x0: Tensor, s: Tensor, noise: Tensor) -> Tensor:
        """x_s = (1 - s) x0 + s noise. x0, noise: (B, ...); s: (B,) float in [0, 1]."""
        if s.shape != (x0.shape[0],):
            raise ValueError(f"s: expected shape ({x0.shape[0]},), got {tuple(s.shape)}")
        s = s.to(torch.float64)
        return _expand_like(1 - s, x0) * x0 + _expand_like(s, x0) * noise

    def target(self, x0: Tensor, noise: Tensor) -> Tensor:
        return noise - x0

    def loss(
        self,
        x0: Tensor,
        context: Tensor,
        context_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """s ~ U[0, 1), noise ~ N(0, I) (+ offset noise), MSE(net(x_s, s * T), noise - x0). Same signature,
        shapes and generator rules as Denoiser.loss; returns a float32 scalar."""
        b, dev = x0.shape[0], _draw_device(generator, x0.device)
        s = torch.rand((b,), device=dev, dtype=torch.float64, generator=generator).to(x0.device)
        noise = _draw_noise(x0.shape, x0.dtype, x0.device, self.offset_noise, generator)
        x_s = self.q_sample(x0, s, noise)
        out = self.net(x_s, self.net_time(s), context, context_mask)
        return F.mse_loss(out.float(), self.target(x0, noise).float())

    def forward(
        self, x_s: Tensor, s: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor:
        """x0_hat = x_s - s v_hat in x_s's dtype. x_s: (B, C, H, W); s: (B,) float in [0, 1]."""
        v = self.net(x_s, self.net_time(s), context, context_mask)
        dt = _work_dtype(x_s)
        return (x_s.to(dt) - _expand_like(s.to(torch.float64), x_s.to(dt)) * v.to(dt)).to(x_s.dtype)


def build_denoiser(net: nn.Module, schedule: ScheduleConfig, objective: ObjectiveConfig) -> nn.Module:
    """The denoiser for this (schedule, objective): Denoiser for kind='diffusion', FlowDenoiser for
    kind='flow' (which uses only schedule.num_timesteps, as the scale of the net's time input)."""
    objective.check_schedule(schedule)
    if objective.kind == "flow":
        return FlowDenoiser(net, schedule.num_timesteps, offset_noise=objective.offset_noise)
    return Denoiser(
        net,
        schedule.alphas_cumprod(),
        prediction=objective.prediction,
        loss_weighting=objective.loss_weighting,
        min_snr_gamma=objective.min_snr_gamma,
        offset_noise=objective.offset_noise,
    )


def drop_conditioning(
    context: Tensor,
    context_mask: Tensor | None,
    null_context: Tensor,
    null_mask: Tensor | None,
    p: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Caption dropout for classifier-free guidance (Ho & Salimans 2022, Alg. 1): each sample's whole
    context is replaced by the empty caption's states with probability p, so one network learns both
    eps(x|c) and eps(x|null).

    context: (B, L, D); context_mask: (B, L) bool or None; null_context: (L, D) or (1, L, D);
    null_mask: (L,) or (1, L) (None iff context_mask is None). generator: on any device (see loss).
    Returns new (context, context_mask); inputs are not modified.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p: expected a probability in [0, 1], got {p!r}")
    if (context_mask is None) != (null_mask is None):
        raise ValueError("null_mask: must be given exactly when context_mask is given")
    b, seq, dim = context.shape
    null_context = null_context.reshape(-1, seq, dim)
    if null_context.shape[0] != 1:
        raise ValueError(
            f"null_context: expected shape ({seq}, {dim}) or (1, {seq}, {dim}), got {tuple(null_context.shape)}"
        )
    # rand in [0, 1): p=0 never drops, p=1 always drops.
    u = torch.rand(b, device=_draw_device(generator, context.device), generator=generator)
    drop = u.to(context.device) < p  # (B,)
    new_context = torch.where(drop[:, None, None], null_context.to(context), context)
    if context_mask is None:
        return new_context, None
    null_mask = null_mask.reshape(1, seq).to(device=context_mask.device, dtype=context_mask.dtype)
    return new_context, torch.where(drop[:, None], null_mask, context_mask)
