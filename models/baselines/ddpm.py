"""Pixel-space diffusion: DDPM (Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models")
sampled with the project's samplers (DDIM, Song et al. 2021, by default), scored by the variational
bound in the form of Nichol & Dhariwal 2021 ("Improved Denoising Diffusion Probabilistic Models").

The same parts as the latent model, on pixels instead of latents: the U-Net of models/unet.py, the
denoiser of models/denoiser.py (eps / v / x0 parameterisations and L_simple), the schedules of
models/schedules.py and a sampler from models/samplers.SAMPLERS.

Choices:
  * Unconditional U-Net: the project's U-Net always cross-attends to a text context, so it is given a
    length-1 all-zero context of width 1 (context_dim=1). q/k/v have no bias, so cross-attention then
    adds only its output projection's learned bias: a constant, the same for every image.
    Widths ch * channel_mult, `num_res_blocks` per level, self-attention (one head, as Ho et al.) at
    the levels whose side is <= attn_max_res (Ho et al.: 16x16) and in the middle; dropout as Ho et
    al.'s CIFAR-10 model. No EMA of the weights (the stage has no hook for a second copy).
  * Schedule: cosine (Nichol & Dhariwal eq. 17) by default, which keeps the last alpha_bar near 0
    for any T (the prior term vanishes); "linear" is Ho et al.'s 1e-4..0.02 at T = 1000, scaled by
    1000 / T for shorter chains as guided-diffusion does.
  * Training: the denoiser's loss (L_simple for eps-prediction, Ho et al. eq. 14) on x in [-1, 1],
    Adam with the gradient norm clipped at 1 (Ho et al.).
  * Sampling: x_T ~ N(0, I) from the caller's generator, then SAMPLERS[sampler] over `sample_steps`
    trailing timesteps; the sampler's stochastic noise (ddpm, ddim with eta > 0) uses that generator
    too. With clip_denoised the model's x0 prediction is clamped to [-1, 1] at each step (diffusers'
    clip_sample, Ho et al.'s released sampler); the result is clamped to [-1, 1].
  * bits_per_dim: the bound L = L_T + sum_{t=2..T} L_{t-1} + L_0 of Ho et al. eq. 5 (indices here are
    0..T-1 for the paper's 1..T):
      L_T     = KL(q(x_T | x_0) || N(0, I))                         (prior_kl; no parameters)
      L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))     (gaussian_kl), x_t ~ q(x_t | x_0)
      L_0     = -log p(x_0 | x_1), the Gaussian N(x0_hat(x_1), sigma_1^2) integrated over each 8-bit
                value's bin [x - 1/255, x + 1/255], the outer bins open (discretized_gaussian_nll).
    p(x_{t-1} | x_t) has the posterior's mean at x0_hat and a fixed variance: beta_tilde_t (the
    posterior variance; the decoder then uses beta_tilde at the paper's t = 2, where beta_tilde_1 = 0,
    as guided-diffusion's clipped log-variance) or beta_t (`vlb_variance`). x0_hat is the same
    clamped prediction the sampler uses (any p gives a valid bound). Each L_{t-1} is estimated with
    one draw of x_t, as Ho et al. and Nichol & Dhariwal report it: an unbiased estimate of the bound.
    L_0 is the negative log of a probability over the 256 values, so L bounds the discrete 8-bit NLL
    and bits/dim = L / (D log 2) (no dequantisation offset). likelihood_kind "bound".
    bpd_stride k > 1 evaluates the KL terms t = 1 + o, 1 + o + k, ... with a random offset
    o ~ U{0..k-1} and weight k: each term is included with probability exactly 1/k, so the sum stays
    an unbiased estimate of the same bound (systematic sampling); only its variance grows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from models.baselines.base import Baseline, BaselineConfig, SyncGrads, no_sync, to_8bit
from models.denoiser import PREDICTIONS, ObjectiveConfig, build_denoiser
from models.samplers import SAMPLER_OBJECTIVES, SAMPLERS, sampler_timesteps
from models.schedules import ScheduleConfig
from models.unet import UNet, UNetConfig

__all__ = ["Config", "PixelDDPM", "VLB_VARIANCES", "SCHEDULE_KINDS", "prior_kl", "gaussian_kl",
           "discretized_gaussian_nll", "vlb_terms", "schedule_config"]

VLB_VARIANCES = ("beta_tilde", "beta")
SCHEDULE_KINDS = ("cosine", "linear")
_CONTEXT_DIM = 1   # the zero context's width: the U-Net is used unconditionally (see the module doc)


def _check_int(name: str, v, minimum: int = 1) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {v!r}")


def _check_choice(name: str, v, choices) -> None:
    if v not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(choices)}, got {v!r}")


@dataclass
class Config(BaselineConfig):
    ch: int = 128                                 # U-Net base width (Ho et al. CIFAR-10: 128)
    channel_mult: tuple[int, ...] = (1, 2, 2)     # width multiplier per U-Net level (Ho et al. 32x32: 1, 2, 2, 2)
    num_res_blocks: int = 2                       # ResBlocks per level on the way down (Ho et al.: 2)
    attn_max_res: int = 16                        # self-attention at levels whose side is <= this (Ho et al.: 16)
    dropout: float = 0.1                          # U-Net dropout (Ho et al. CIFAR-10: 0.1)
    timesteps: int = 1000                         # T, the length of the forward process
    schedule: str = "cosine"                      # "cosine" (Nichol & Dhariwal) | "linear" (Ho et al., x 1000/T)
    objective: str = "eps"                        # what the U-Net predicts: "eps" | "v" | "x0" (models/denoiser.py)
    sampler: str = "ddim"                         # a diffusion sampler of models/samplers.SAMPLERS
    sample_steps: int = 50                        # sampler steps (trailing spacing), <= timesteps
    clip_denoised: bool = True                    # clamp x0_hat to [-1, 1] when sampling and in the bound
    vlb_variance: str = "beta_tilde"              # reverse-process variance in the bound: "beta_tilde" | "beta"
    bpd_batch: int = 16                           # timesteps per U-Net call in bits_per_dim (memory vs speed)
    bpd_stride: int = 1                           # evaluate every k-th KL term (random offset, weight k); 1: all
    max_grad_norm: float = 1.0                    # clip the gradient norm before each step (Ho et al.: 1); 0 disables

    def __post_init__(self):
        super().__post_init__()
        r = self.resolution
        if r < 8 or r & (r - 1):
            raise ValueError(f"resolution: expected a power of two >= 8, got {r!r}")
        _check_int("ch", self.ch)
        mult = self.channel_mult
        if (not isinstance(mult, (tuple, list)) or not mult
                or not all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in mult)):
            raise ValueError(f"channel_mult: expected a non-empty list of positive ints, got {mult!r}")
        self.channel_mult = tuple(mult)               # JSON gives a list
        if 2 ** len(mult) > r:
            raise ValueError(f"channel_mult: {len(mult)} levels leave the lowest side below 2 at resolution {r}")
        _check_int("num_res_blocks", self.num_res_blocks)
        _check_int("attn_max_res", self.attn_max_res, minimum=0)
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
            raise ValueError(f"dropout: expected a number in [0, 1), got {d!r}")
        _check_int("timesteps", self.timesteps, minimum=2)
        _check_choice("schedule", self.schedule, SCHEDULE_KINDS)
        if self.schedule == "linear" and self.timesteps <= 20:
            raise ValueError(f"timesteps: schedule 'linear' needs > 20 (beta_T = 20 / T < 1), got {self.timesteps}")
        _check_choice("objective", self.objective, PREDICTIONS)
        diffusion = tuple(k for k in SAMPLERS if SAMPLER_OBJECTIVES.get(k) == "diffusion")
        _check_choice("sampler", self.sampler, diffusion)
        _check_int("sample_steps", self.sample_steps)
        try:
            sampler_timesteps(self.sampler, self.timesteps, self.sample_steps)
        except ValueError as e:
            raise ValueError(f"sample_steps: {self.sample_steps} does not fit timesteps={self.timesteps} "
                             f"({e})") from None
        if not isinstance(self.clip_denoised, bool):
            raise ValueError(f"clip_denoised: expected a bool, got {self.clip_denoised!r}")
        _check_choice("vlb_variance", self.vlb_variance, VLB_VARIANCES)
        _check_int("bpd_batch", self.bpd_batch)
        _check_int("bpd_stride", self.bpd_stride)
        if self.bpd_stride > self.timesteps - 1:
            raise ValueError(f"bpd_stride: expected <= timesteps - 1 ({self.timesteps - 1}), got {self.bpd_stride}")
        g = self.max_grad_norm
        if isinstance(g, bool) or not isinstance(g, (int, float)) or g < 0:
            raise ValueError(f"max_grad_norm: expected a number >= 0 (0 disables), got {g!r}")


def schedule_config(c: Config) -> ScheduleConfig:
    """The project's ScheduleConfig for this family's `schedule` and `timesteps`."""
    if c.schedule == "linear":
        scale = 1000.0 / c.timesteps                  # guided-diffusion's rescaling of Ho et al.'s range
        return ScheduleConfig(kind="linear", num_timesteps=c.timesteps, beta_start=1e-4 * scale, beta_end=0.02 * scale)
    return ScheduleConfig(kind="cosine", num_timesteps=c.timesteps)


# ------------------------------------------------------------------ the bound's terms (pure, float64)


def gaussian_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats (broadcasting)."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def prior_kl(x0: Tensor, alpha_bar_last: float) -> Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) summed over dims: (B, C, H, W) -> (B,) nats, with
    q(x_T | x_0) = N(sqrt(a) x_0, (1 - a) I), a = alpha_bar at the last timestep."""
    a = torch.as_tensor(alpha_bar_last, dtype=torch.float64)
    x0 = x0.double()
    kl = gaussian_kl(a.sqrt() * x0, torch.log1p(-a).expand_as(x0), torch.zeros_like(x0), torch.zeros_like(x0))
    return kl.flatten(1).sum(1)


def discretized_gaussian_nll(x0: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """L_0 = -log P(x_0) summed over dims: (B, C, H, W) -> (B,) nats, where P gives each 8-bit value
    x = p / 127.5 - 1 the mass of N(mean, exp(log_scale)^2) over [x - 1/255, x + 1/255], the first bin
    extended to -inf and the last to +inf (Ho et al. sec. 3.3), so the 256 masses sum to 1."""
    p = torch.round((x0.double().clamp(-1, 1) + 1) * 127.5)           # 0..255
    x0, mean = p / 127.5 - 1, mean.double()                             # bin centres in float64: the bins tile
    inv_s = torch.exp(-log_scale.double())
    hi = (x0 + 1 / 255 - mean) * inv_s
    lo = (x0 - 1 / 255 - mean) * inv_s
    # Mass Phi(hi) - Phi(lo) computed in the tail it is far from (Phi(-lo) - Phi(-hi) above the mean):
    # both CDFs near 1 would cancel. Clamped at 1e-12 like guided-diffusion's log(max(., 1e-12)).
    mid = torch.where(lo > 0, torch.special.ndtr(-lo) - torch.special.ndtr(-hi),
                      torch.special.ndtr(hi) - torch.special.ndtr(lo))
    log_p = torch.where(p == 0, torch.special.log_ndtr(hi),
                        torch.where(p == 255, torch.special.log_ndtr(-lo), torch.log(mid.clamp(min=1e-12))))
    return -log_p.flatten(1).sum(1)


Denoise = Callable[[Tensor, Tensor], Tensor]   # (x_t (N, C, H, W), t (N,) long) -> x0_hat (N, C, H, W)


def vlb_terms(denoise: Denoise, x0: Tensor, alphas_cumprod: Tensor, *, vlb_variance: str = "beta_tilde",
              bpd_batch: int = 16, bpd_stride: int = 1,
              generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The three parts of the DDPM bound (see the module doc) for x0 (B, C, H, W) on the 8-bit grid:
    {"prior": L_T, "diffusion": sum_t L_{t-1} (t = 2..T), "decoder": L_0}, each (B,) float64 nats.

    alphas_cumprod (T,); indices 0..T-1 are the paper's t = 1..T. x_t for a chunk of `bpd_batch`
    timesteps is one call of `denoise` on (n_t * B) images, rows ordered (timestep, sample).
    Randomness (x_t noise, the stride offset) from `generator`, drawn on its device."""
    _check_choice("vlb_variance", vlb_variance, VLB_VARIANCES)
    b, dev = x0.shape[0], x0.device
    draw_dev = generator.device if generator is not None else dev
    ab = alphas_cumprod.detach().to(device=dev, dtype=torch.float64)            # (T,)
    T = ab.numel()
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    beta = 1 - ab / ab_prev
    beta_tilde = (1 - ab_prev) / (1 - ab) * beta                                # 0 at index 0
    coef_x0 = ab_prev.sqrt() * beta / (1 - ab)                                  # posterior mean's x0 weight
    coef_xt = (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)                      # ... and x_t weight
    if vlb_variance == "beta":
        model_logvar = torch.log(beta)
    else:   # beta_tilde, with index 0 (zero) replaced by index 1's, as guided-diffusion clips it
        model_logvar = torch.log(torch.cat([beta_tilde[1:2], beta_tilde[1:]]))
    x0d = x0.double()

    def x_t_and_pred(idx: Tensor) -> tuple[Tensor, Tensor]:
        """x_t ~ q(x_t | x0) and x0_hat for timesteps idx (n,): both (n, B, C, H, W) float64."""
        n = idx.numel()
        noise = torch.randn((n, *x0.shape), generator=generator, device=draw_dev, dtype=torch.float64).to(dev)
        a = ab[idx].view(n, 1, 1, 1, 1)
        x_t = a.sqrt() * x0d + (1 - a).sqrt() * noise
        t = idx.repeat_interleave(b)                                             # (n * B,)
        pred = denoise(x_t.reshape(n * b, *x0.shape[1:]).to(x0.dtype), t).double()
        return x_t, pred.reshape(n, *x0.shape)

    # L_{t-1}, t = 2..T: indices 1..T-1 (every bpd_stride-th from a random offset, weighted by the stride)
    offset = int(torch.randint(bpd_stride, (1,), generator=generator, device=draw_dev)) if bpd_stride > 1 else 0
    idx_all = torch.arange(1 + offset, T, bpd_stride, device=dev)
    diffusion = x0d.new_zeros(b)
    for chunk in idx_all.split(bpd_batch):
        x_t, pred = x_t_and_pred(chunk)
        view = lambda v: v[chunk].view(-1, 1, 1, 1, 1)                          # noqa: E731  (n,) -> (n, 1, 1, 1, 1)
        post_mean = view(coef_x0) * x0d + view(coef_xt) * x_t
        model_mean = view(coef_x0) * pred + view(coef_xt) * x_t
        kl = gaussian_kl(post_mean, view(torch.log(beta_tilde)), model_mean, view(model_logvar))
        diffusion = diffusion + kl.flatten(2).sum(2).sum(0)                      # (n, B, D) -> (B,)
    diffusion = diffusion * bpd_stride

    # L_0: the posterior mean at index 0 is x0 itself (coef_x0 = 1, coef_xt = 0), so the mean is x0_hat.
    _, pred0 = x_t_and_pred(torch.zeros(1, dtype=torch.long, device=dev))
    decoder = discretized_gaussian_nll(x0d, pred0[0], 0.5 * model_logvar[0])
    return {"prior": prior_kl(x0d, float(ab[-1])), "diffusion": diffusion, "decoder": decoder}


# ------------------------------------------------------------------ the model


class PixelDDPM(Baseline):
    family = "ddpm"
    Config = Config
    has_likelihood = True
    likelihood_kind = "bound"

    def __init__(self, config: Config):
        super().__init__(config)
        c = config
        attn = tuple(level for level in range(len(c.channel_mult)) if c.resolution >> level <= c.attn_max_res)
        self.unet_config = UNetConfig(
            in_channels=c.in_channels, out_channels=c.in_channels, channels=c.ch, channel_mult=c.channel_mult,
            num_res_blocks=c.num_res_blocks, attention_levels=attn, num_heads=1, context_dim=_CONTEXT_DIM,
            dropout=float(c.dropout))
        self.denoiser = build_denoiser(UNet(self.unet_config), schedule_config(c),
                                       ObjectiveConfig(kind="diffusion", prediction=c.objective))

    def _context(self, n: int, ref: Tensor) -> Tensor:
        """The unconditional context: (n, 1, context_dim) zeros."""
        return ref.new_zeros(n, 1, _CONTEXT_DIM)

    def denoise(self, x_t: Tensor, t: Tensor, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        """x0_hat (the sampler contract), clamped to [-1, 1] with clip_denoised."""
        if context is None:
            context = self._context(x_t.shape[0], x_t)
        x0 = self.denoiser(x_t, t, context, context_mask)
        return x0.clamp(-1, 1) if self.config.clip_denoised else x0

    def train_step(self, x: Tensor, opts: dict[str, torch.optim.Optimizer], step: int,
                   sync_grads: SyncGrads = no_sync) -> dict[str, float]:
        opt = opts["model"]
        loss = self.denoiser.loss(x, self._context(x.shape[0], x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = list(self.parameters())
        sync_grads(params)
        logs = {"loss": float(loss.detach())}
        if self.config.max_grad_norm > 0:
            logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm))
        opt.step()
        return logs

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        c = self.config
        dev = next(self.parameters()).device
        draw_dev = generator.device if generator is not None else dev
        x_T = torch.randn(n, c.in_channels, c.resolution, c.resolution, generator=generator, device=draw_dev).to(dev)
        ts = sampler_timesteps(c.sampler, c.timesteps, c.sample_steps)
        x = SAMPLERS[c.sampler](self.denoise, x_T, ts, self.denoiser.alphas_cumprod,
                                extra_args={"context": self._context(n, x_T)}, generator=generator)
        return x.float().clamp(-1, 1)

    @torch.no_grad()
    def vlb(self, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The bound's parts for x (B, C, H, W) in [-1, 1], (B,) nats each (see vlb_terms)."""
        c = self.config
        x0 = to_8bit(x).to(x.dtype) / 127.5 - 1                         # exactly on the 8-bit grid
        return vlb_terms(self.denoise, x0, self.denoiser.alphas_cumprod, vlb_variance=c.vlb_variance,
                         bpd_batch=c.bpd_batch, bpd_stride=c.bpd_stride, generator=generator)

    def bits_per_dim(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B,) the bound in bits per 8-bit dimension: (L_T + sum L_{t-1} + L_0) / (D log 2)."""
        terms = self.vlb(x, generator)
        total = terms["prior"] + terms["diffusion"] + terms["decoder"]
        return (total / (x[0].numel() * math.log(2.0))).float()
