"""Denoiser: the network apart from its parameterisation (k-diffusion's layers.Denoiser, EDM's *Precond).

`net(x_t, t, context, context_mask)` is any noise-prediction network; EpsDenoiser owns the forward
process q(x_t | x_0), the training target and the loss, so swapping eps for v-prediction later
touches only this file, never the network or the samplers (which always receive eps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PREDICTIONS", "EpsDenoiser", "drop_conditioning"]

# What the wrapped network outputs. Only "eps" for now; "v" (Salimans & Ho 2022) slots into
# EpsDenoiser._target / _to_eps without touching callers.
PREDICTIONS = ("eps",)


def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    # Draw on the generator's own device (a CPU generator may drive CUDA tensors; the draw is then
    # copied over, and gives the same numbers on any accelerator), else on the target's.
    return generator.device if generator is not None else device


def _expand_like(coef: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against x, in x's dtype."""
    return coef.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class EpsDenoiser(nn.Module):
    """Wraps any net(x_t, t, context, context_mask) -> eps and owns the forward process and the loss.

    Call signature matches the samplers' model contract: model(x, t, **extra_args) -> eps with
    extra_args = {"context": ..., "context_mask": ...}.
    """

    def __init__(self, net: nn.Module, alphas_cumprod: Tensor, prediction: str = "eps"):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction: expected one of {', '.join(PREDICTIONS)}, got {prediction!r}")
        if alphas_cumprod.ndim != 1 or alphas_cumprod.numel() < 2:
            raise ValueError(f"alphas_cumprod: expected a 1-D tensor (T,), got shape {tuple(alphas_cumprod.shape)}")
        self.net = net
        self.prediction = prediction
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

    def _coefs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t): (B,) float64 each."""
        a = self.alphas_cumprod.to(t.device)[t]
        return a.sqrt(), (1 - a).sqrt()

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (DDPM eq. 4). x0, noise: (B, ...); t: (B,) long."""
        if t.shape != (x0.shape[0],):
            raise ValueError(f"t: expected shape ({x0.shape[0]},), got {tuple(t.shape)}")
        sa, s1a = self._coefs(t)
        return _expand_like(sa, x0) * x0 + _expand_like(s1a, x0) * noise

    def _target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        # eps-prediction regresses the noise (DDPM eq. 14, L_simple). v would be
        # sqrt(a) eps - sqrt(1-a) x0.
        return noise

    def _to_eps(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        # Convert the net's output to eps so samplers need one contract only.
        return out

    def loss(
        self,
        x0: Tensor,
        context: Tensor,
        context_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """L_simple (DDPM eq. 14): t ~ U{0..T-1}, eps ~ N(0, I), MSE(net(x_t, t), eps), mean over all.

        x0: (B, C, H, W) latents; context: (B, L, D); context_mask: (B, L) bool.
        generator: draws t and eps on its device (any), then moves them to x0's. Returns a float32 scalar.
        """
        b, dev = x0.shape[0], _draw_device(generator, x0.device)
        t = torch.randint(0, self.num_timesteps, (b,), device=dev, generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, device=dev, dtype=x0.dtype, generator=generator).to(x0.device)
        x_t = self.q_sample(x0, t, noise)
        out = self.net(x_t, t, context, context_mask)
        # MSE in float32: a bf16 reduction over millions of elements loses the small-t signal.
        return F.mse_loss(out.float(), self._target(x0, noise, t).float())

    def forward(self, x_t: Tensor, t: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        """eps prediction. x_t: (B, C, H, W); t: (B,) long; context: (B, L, D); context_mask: (B, L)."""
        return self._to_eps(self.net(x_t, t, context, context_mask), x_t, t)


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
