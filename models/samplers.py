"""Samplers: pure @torch.no_grad functions sharing one signature, in the k-diffusion spirit.

A "model" is any callable model(x, t, **extra_args) -> eps, with x: (B, ...) and t: (B,) long
timesteps in [0, T). EpsDenoiser satisfies it with extra_args = {"context", "context_mask"};
cfg_model wraps one into a guided model. The loop stays visible here, the schedule is a tensor
argument, and nothing holds state between calls.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["Model", "cfg_model", "ddim_timesteps", "sample_ddim"]

Model = Callable[..., Tensor]  # model(x, t, **extra_args) -> eps


def ddim_timesteps(num_train_timesteps: int, steps: int, spacing: str = "trailing") -> Tensor:
    """The `steps` training timesteps DDIM visits, descending. -> (steps,) long

    "trailing" (default; diffusers' timestep_spacing="trailing"; Lin et al. 2024, "Common Diffusion
    Noise Schedules and Sample Steps are Flawed"): starts at t = T-1, the noisiest level trained,
    where x_T ~ N(0, I) is closest to the true marginal; ends at t = round(T/steps) - 1, from which
    sample_ddim's last step jumps straight to x_0 (alpha_bar_prev = 1). steps == T gives T-1..0.

    "leading" (original DDIM / Stable Diffusion v1, steps_offset=0): (steps-1)*(T//steps), ..., 0.
    It ends exactly at t = 0 but never visits the noisiest timesteps, so pure noise is fed in at a
    noise level lower than the one it matches.
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps: expected 1 <= steps <= {num_train_timesteps}, got {steps}")
    if spacing == "trailing":
        # round(T - k*T/steps) - 1 for k = 0..steps-1: T-1, ..., round(T/steps) - 1
        k = torch.arange(steps, dtype=torch.float64)
        ts = torch.round(num_train_timesteps - k * (num_train_timesteps / steps)) - 1
    elif spacing == "leading":
        ts = (torch.arange(steps, dtype=torch.float64) * (num_train_timesteps // steps)).flip(0)
    else:
        raise ValueError(f"spacing: expected 'trailing' or 'leading', got {spacing!r}")
    return ts.long()


@torch.no_grad()
def sample_ddim(
    model: Model,
    x: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    extra_args: dict[str, Any] | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12), from x_T to x_0.

    x: (B, ...) initial noise x_T ~ N(0, I) (pass it in float32); timesteps: (S,) long, strictly
    descending (see ddim_timesteps); alphas_cumprod: (T,) the training schedule.
    eta = 0: deterministic DDIM; eta = 1: DDPM-like ancestral sampling (eq. 16).
    generator: for the eta > 0 noise, on any device (drawn there, then moved to x's device).
    callback({"i", "t", "x", "denoised"}) after each step, x being the new x_{t_prev}.
    Returns x_0 with the shape and dtype of x.
    """
    extra_args = {} if extra_args is None else extra_args
    ts = [int(t) for t in timesteps.tolist()]
    if not ts:
        raise ValueError("timesteps: empty")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps: expected strictly descending, got {ts}")
    if ts[-1] < 0 or ts[0] >= alphas_cumprod.numel():
        raise ValueError(f"timesteps: expected values in [0, {alphas_cumprod.numel()}), got {ts[-1]}..{ts[0]}")
    abar = alphas_cumprod.detach().to("cpu", torch.float64)  # scalars per step; float64 for 1 - a near 0

    for i, t in enumerate(ts):
        a_t = abar[t].item()
        # After the last step, jump to alpha_bar = 1, i.e. return the clean prediction x_0
        # (diffusers' set_alpha_to_one): otherwise a residual sqrt(1 - alpha_bar_0) noise stays.
        a_prev = abar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0

        eps = model(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device), **extra_args).to(x.dtype)
        # eq. 12, "predicted x_0": (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
        denoised = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        # eq. 16: sigma_t(eta) = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        # eq. 12: x_prev = sqrt(a_prev) x0_pred + sqrt(1 - a_prev - sigma^2) eps + sigma z
        x = math.sqrt(a_prev) * denoised + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            # drawn on the generator's device (a CPU generator may drive CUDA sampling), then moved
            dev = generator.device if generator is not None else x.device
            x = x + sigma * torch.randn(x.shape, device=dev, dtype=x.dtype, generator=generator).to(x.device)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": denoised})
    return x


def cfg_model(model: Model, guidance_scale: float) -> Model:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6) as a model-callable:
    eps~ = eps(x|null) + s * (eps(x|c) - eps(x|null)), s = 1 + w in the paper's notation.

    The returned callable takes extra_args context (B, L, D), context_mask (B, L) or None,
    null_context (L, D) / (1, L, D) / (B, L, D), null_mask likewise or None, and forwards any other
    extra_args unchanged to both halves. Cond and uncond run in ONE batched call (2B) so the
    network sees one large batch instead of two; s == 1 skips the uncond half entirely.
    """

    def guided(
        x: Tensor,
        t: Tensor,
        context: Tensor,
        context_mask: Tensor | None = None,
        null_context: Tensor | None = None,
        null_mask: Tensor | None = None,
        **extra: Any,
    ) -> Tensor:
        if guidance_scale == 1.0:
            return model(x, t, context=context, context_mask=context_mask, **extra)
        if null_context is None:
            raise ValueError("null_context: required when guidance_scale != 1")
        if (context_mask is None) != (null_mask is None):
            raise ValueError("null_mask: must be given exactly when context_mask is given")
        b, seq, dim = context.shape
        null_c = null_context.reshape(-1, seq, dim).to(context).expand(b, -1, -1)  # (B, L, D)
        mask_in = None
        if context_mask is not None:
            null_m = null_mask.reshape(-1, seq).to(context_mask).expand(b, -1)  # (B, L)
            mask_in = torch.cat([null_m, context_mask])  # (2B, L)
        out = model(
            torch.cat([x, x]),
            torch.cat([t, t]),
            context=torch.cat([null_c, context]),  # (2B, L, D): uncond first, then cond
            context_mask=mask_in,
            **extra,
        )
        eps_uncond, eps_cond = out.chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    return guided
