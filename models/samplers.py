"""Samplers: pure @torch.no_grad functions sharing one signature, in the k-diffusion spirit.

    sample_xxx(model, x, timesteps, alphas_cumprod, extra_args=None, *, generator=None, callback=None,
               **options) -> x_0

The model contract: model(x, t, **extra_args) -> x0_hat, the DENOISED prediction (k-diffusion's
convention), with x: (B, ...) and t: (B,) timesteps. The denoisers in models/denoiser.py convert
whatever their net predicts (eps, v, x0, flow velocity) to x0_hat, so every sampler needs this one
contract; x0 (not eps) because it stays finite at zero terminal SNR, where eps -> x0 divides by 0.
cfg_model wraps a model into a guided one. The loop stays visible here, the schedule is a tensor
argument, and nothing holds state between calls.

  - x: the initial noise, unit variance N(0, I) for every sampler (Euler scales it itself).
  - timesteps: (S,) strictly descending; integral training timesteps in [0, T) for the discrete
    samplers (fractional ones for "euler" with "linspace" spacing), flow times s in (0, 1] for
    "flow_euler". sampler_timesteps(name, T, steps, spacing) gives diffusers' choices for each.
  - alphas_cumprod: (T,) the training schedule (ignored by "flow_euler").
  - generator: for the stochastic samplers' noise, on any device (drawn there, moved to x's).
  - callback({"i", "t", "x", "denoised"}) after each step; x is the new state.

Equivalence with diffusers' schedulers is tested step by step in tests/test_samplers_diffusers.py;
where we differ on purpose it is said next to the code.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from .schedules import alpha_bar_at

__all__ = [
    "SAMPLERS",
    "SAMPLER_OBJECTIVES",
    "SPACINGS",
    "Model",
    "cfg_model",
    "ddim_timesteps",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_flow_euler",
    "sampler_timesteps",
]

Model = Callable[..., Tensor]  # model(x, t, **extra_args) -> x0_hat
Callback = Callable[[dict[str, Any]], None]

SPACINGS = ("trailing", "leading", "linspace")

# diffusers clamps alpha_bar_{T-1} = 0 (zero terminal SNR) to 2^-24 in its sigma-space schedulers
# (Euler, DPM-Solver), where sigma = sqrt((1 - a) / a) would be infinite; Euler needs it too.
_ZERO_SNR_ALPHA_BAR = 2.0**-24


# ------------------------------------------------------------------ timesteps


def _np_linspace(start: float, stop: float, num: int) -> Tensor:
    """numpy.linspace's arithmetic (k * step + start, last = stop exactly), float64, so rounding
    the result picks the same integers as diffusers at .5 ties."""
    if num == 1:
        return torch.tensor([float(start)], dtype=torch.float64)
    step = (stop - start) / (num - 1)
    out = torch.arange(num, dtype=torch.float64) * step + start
    out[-1] = stop
    return out


def _trailing(num_train_timesteps: int, steps: int) -> Tensor:
    """np.round(np.arange(T, 0, -T/steps)) - 1: T-1, ..., round(T/steps) - 1 (Lin et al. 2024, Table 2).
    numpy's arange fills start + k * delta with delta = (start + step) - start, not step itself; the
    last-bit difference decides .5 ties (T=100, 24 steps: 87.4999... -> 86, not 87.5 -> 87), so do the same."""
    T = float(num_train_timesteps)
    delta = (T + (-T / steps)) - T
    k = torch.arange(steps, dtype=torch.float64)
    return torch.round(T + k * delta) - 1


def sampler_timesteps(
    sampler: str, num_train_timesteps: int, steps: int, spacing: str = "trailing", steps_offset: int = 0
) -> Tensor:
    """The timesteps `sampler` visits, descending, exactly as diffusers' scheduler for it would set them
    (set_timesteps(steps) with timestep_spacing=spacing, steps_offset=steps_offset). -> (steps,)

    "trailing" (default; Lin et al. 2024): starts at t = T-1, the noisiest level trained, where the
    pure-noise start matches the training marginal (exactly, at zero terminal SNR).
    "leading" (original DDIM / Stable Diffusion v1, which used steps_offset=1): k * (T // steps) + offset;
    never visits the noisiest timesteps. "linspace": evenly spaced over [0, T-1].
    Trailing differs from diffusers in one place: for some counts (T=1000: 976, 979, ...) numpy's
    arange gives diffusers steps + 1 values ending in t = -1; we return the first `steps`.

    Per sampler, following diffusers:
      ddpm, ddim: long; linspace rounds np.linspace(0, T-1, steps).
      dpmpp_2m (DPMSolverMultistepScheduler): long; linspace and leading use steps + 1 points and drop
        the last (t = 0): linspace(0, T-1, steps+1), leading k * (T // (steps+1)).
      euler (EulerDiscreteScheduler): float64 holding diffusers' float32 values; linspace is NOT
        rounded (fractional timesteps; the denoiser interpolates sigma there, see alpha_bar_at).
      flow_euler (FlowMatchEulerDiscreteScheduler, shift 1): float64 flow times s in (0, 1];
        linspace is linspace(1, 1/T, steps) as diffusers; trailing is its unrounded analogue
        1 - k/steps; leading has no flow counterpart (ValueError).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {', '.join(sorted(SAMPLERS))}, got {sampler!r}")
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps: expected an int >= 2, got {num_train_timesteps!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps: expected an int in [1, {num_train_timesteps}] (the schedule's length), got {steps!r}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing: expected one of {', '.join(SPACINGS)}, got {spacing!r}")
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
        raise ValueError(f"steps_offset: expected an int >= 0, got {steps_offset!r}")
    if steps_offset and spacing != "leading":
        raise ValueError(f"steps_offset: only used with spacing='leading' (as in diffusers), got {steps_offset}")
    T = num_train_timesteps

    if sampler == "flow_euler":
        if spacing == "leading":
            raise ValueError("spacing: 'leading' never starts at s = 1 (pure noise); use 'trailing' or 'linspace'")
        if spacing == "linspace":
            return _np_linspace(1.0, 1.0 / T, steps)
        return 1 - torch.arange(steps, dtype=torch.float64) / steps

    if sampler == "dpmpp_2m":
        if spacing == "linspace":
            ts = _np_linspace(0, T - 1, steps + 1).round().flip(0)[:-1]
        elif spacing == "leading":
            ratio = T // (steps + 1)
            if ratio == 0:
                raise ValueError(f"steps: 'leading' spacing for dpmpp_2m needs steps < {T}, got {steps}")
            ts = (torch.arange(steps + 1, dtype=torch.float64) * ratio).flip(0)[:-1] + steps_offset
        else:
            ts = _trailing(T, steps)
    else:
        if spacing == "linspace":
            ts = _np_linspace(0, T - 1, steps)
            ts = ts.float().double() if sampler == "euler" else ts.round()  # Euler: float32, unrounded
            ts = ts.flip(0)
        elif spacing == "leading":
            ts = (torch.arange(steps, dtype=torch.float64) * (T // steps)).flip(0) + steps_offset
        else:
            ts = _trailing(T, steps)

    if ts[0] >= T:
        raise ValueError(f"steps_offset: {steps_offset} puts the first timestep at {int(ts[0])} >= {T}")
    if bool((ts[1:] >= ts[:-1]).any()):
        raise ValueError(f"steps: {steps} {spacing} steps repeat a timestep of a {T}-step schedule; use fewer")
    return ts if sampler == "euler" else ts.long()


def ddim_timesteps(num_train_timesteps: int, steps: int, spacing: str = "trailing") -> Tensor:
    """The `steps` training timesteps DDIM visits, descending. -> (steps,) long.
    Kept for callers; sampler_timesteps("ddim", ...) is the same."""
    return sampler_timesteps("ddim", num_train_timesteps, steps, spacing)


def _check_timesteps(timesteps: Tensor, num_train_timesteps: int | None, integral: bool) -> list[float]:
    """Validate before any work. num_train_timesteps None: flow times in (0, 1]."""
    if timesteps.ndim != 1 or timesteps.numel() == 0:
        raise ValueError(f"timesteps: expected a non-empty 1-D tensor, got shape {tuple(timesteps.shape)}")
    ts = timesteps.detach().cpu().to(torch.float64)
    if bool((ts[1:] >= ts[:-1]).any()):
        raise ValueError(f"timesteps: expected strictly descending, got {ts.tolist()}")
    if num_train_timesteps is None:
        if not (0 < ts[-1] and ts[0] <= 1):
            raise ValueError(f"timesteps: expected flow times in (0, 1], got {ts[-1].item()}..{ts[0].item()}")
    else:
        if ts[-1] < 0 or ts[0] > num_train_timesteps - 1:
            raise ValueError(
                f"timesteps: expected values in [0, {num_train_timesteps - 1}], got {ts[-1].item()}..{ts[0].item()}"
            )
        if integral and bool((ts != ts.round()).any()):
            raise ValueError("timesteps: expected integral training timesteps for this sampler")
    return ts.tolist()


def _schedule(alphas_cumprod: Tensor) -> Tensor:
    if alphas_cumprod.ndim != 1 or alphas_cumprod.numel() < 2:
        raise ValueError(f"alphas_cumprod: expected a 1-D tensor (T,), got shape {tuple(alphas_cumprod.shape)}")
    # scalars per step; float64 because 1 - alpha_bar near t = 0 is ~1e-4
    return alphas_cumprod.detach().to("cpu", torch.float64)


def _t_batch(t: float, x: Tensor, integral: bool = True) -> Tensor:
    if integral:
        return torch.full((x.shape[0],), int(round(t)), dtype=torch.long, device=x.device)
    return torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    # drawn on the generator's device (a CPU generator may drive CUDA sampling), then moved
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, device=dev, dtype=x.dtype, generator=generator).to(x.device)


def _eps_from_x0(x: Tensor, x0: Tensor, a: float) -> Tensor:
    # x_t = sqrt(a) x0 + sqrt(1-a) eps; finite for a < 1 (always: every beta > 0), = x_t at a = 0.
    return (x - math.sqrt(a) * x0) / math.sqrt(1 - a)


# ------------------------------------------------------------------ samplers


@torch.no_grad()
def sample_ddpm(
    model: Model,
    x: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    extra_args: dict[str, Any] | None = None,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, eq. 6-7) over any descending subset of timesteps, as
    diffusers' DDPMScheduler (variance_type="fixed_small", clip_sample=False): from t to the next
    visited t' (alpha_bar = 1 after the last), with beta = 1 - a_t / a_t',
        x_t' = sqrt(a_t') beta / (1 - a_t) x0_hat + sqrt(a_t / a_t') (1 - a_t') / (1 - a_t) x_t
               + sqrt((1 - a_t') / (1 - a_t) beta) z.
    Like diffusers, z is drawn at every step whose t > 0 (so a seeded generator gives the same
    numbers); after the last step the variance is 0 anyway.
    """
    extra_args = {} if extra_args is None else extra_args
    abar = _schedule(alphas_cumprod)
    ts = [int(t) for t in _check_timesteps(timesteps, abar.numel(), integral=True)]
    for i, t in enumerate(ts):
        a_t = abar[t].item()
        a_prev = abar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        denoised = model(x, _t_batch(t, x), **extra_args).to(x.dtype)
        beta = 1 - a_t / a_prev  # the effective beta of the jump t -> t'; 1 at zero terminal SNR
        x = (math.sqrt(a_prev) * beta / (1 - a_t)) * denoised + (
            math.sqrt(a_t / a_prev) * (1 - a_prev) / (1 - a_t)
        ) * x
        if t > 0:
            variance = (1 - a_prev) / (1 - a_t) * beta  # posterior variance beta~ (eq. 7)
            x = x + math.sqrt(variance) * _randn_like(x, generator)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": denoised})
    return x


@torch.no_grad()
def sample_ddim(
    model: Model,
    x: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    extra_args: dict[str, Any] | None = None,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    eta: float = 0.0,
    set_alpha_to_one: bool = True,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12), from x_T to x_0, over any strictly descending timesteps.

    eta = 0: deterministic DDIM; eta = 1: DDPM-like ancestral sampling (eq. 16). With eta > 0 noise
    is drawn at every step (as diffusers does; the last step's sigma is 0).
    set_alpha_to_one: after the last step, jump to alpha_bar = 1, i.e. return the clean prediction
    (diffusers' default); False uses alpha_bar_0 (diffusers' set_alpha_to_one=False, SD v1 configs).

    Deliberate difference from diffusers' DDIMScheduler: the step goes to the NEXT timestep in
    `timesteps` (the paper's subsequence tau), where diffusers always jumps t - T // steps. They agree
    whenever the timesteps are evenly spaced by T // steps (trailing/leading spacing with steps dividing
    T); diffusers' linspace spacing, or trailing with steps not dividing T, would otherwise jump to a
    timestep it never visits.
    """
    extra_args = {} if extra_args is None else extra_args
    abar = _schedule(alphas_cumprod)
    ts = [int(t) for t in _check_timesteps(timesteps, abar.numel(), integral=True)]
    if eta < 0:
        raise ValueError(f"eta: expected >= 0, got {eta}")
    final = 1.0 if set_alpha_to_one else abar[0].item()

    for i, t in enumerate(ts):
        a_t = abar[t].item()
        a_prev = abar[ts[i + 1]].item() if i + 1 < len(ts) else final
        denoised = model(x, _t_batch(t, x), **extra_args).to(x.dtype)
        eps = _eps_from_x0(x, denoised, a_t)
        # eq. 16: sigma_t(eta) = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        # eq. 12: x_prev = sqrt(a_prev) x0_pred + sqrt(1 - a_prev - sigma^2) eps + sigma z
        x = math.sqrt(a_prev) * denoised + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        if eta > 0:
            x = x + sigma * _randn_like(x, generator)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": denoised})
    return x


def _half_log_snr(a: float) -> float:
    """lambda = log(alpha / sigma) = log(sqrt(a) / sqrt(1 - a)); -inf at a = 0, +inf at a = 1."""
    if a <= 0:
        return -math.inf
    if a >= 1:
        return math.inf
    return 0.5 * (math.log(a) - math.log1p(-a))


@torch.no_grad()
def sample_dpmpp_2m(
    model: Model,
    x: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    extra_args: dict[str, Any] | None = None,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2): multistep second order in
    lambda = log(alpha / sigma), on the data prediction; deterministic (generator unused).

    As diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
    solver_type="midpoint", final_sigmas_type="zero"): the first step is first order (no history
    yet), and the final step, to sigma = 0, is first order too (it returns x0_hat exactly; a second-order
    step to lambda = inf would be undefined), whatever lower_order_final says. With
    h = lambda_t' - lambda_t, r = h_prev / h, D = x0_hat + (x0_hat - x0_hat_prev) / (2 r):
        x_t' = (sigma_t' / sigma_t) x_t - alpha_t' (exp(-h) - 1) D.
    At zero terminal SNR (alpha_{T-1} = 0, lambda = -inf) the limits are taken exactly: exp(-h) = 0,
    and the correction from that step vanishes (r = inf). diffusers instead clamps alpha_bar to 2^-24.
    """
    extra_args = {} if extra_args is None else extra_args
    abar = _schedule(alphas_cumprod)
    ts = [int(t) for t in _check_timesteps(timesteps, abar.numel(), integral=True)]
    prev_denoised: Tensor | None = None
    h_prev = math.nan
    for i, t in enumerate(ts):
        denoised = model(x, _t_batch(t, x), **extra_args).to(x.dtype)
        if i + 1 == len(ts):
            x = denoised  # first-order step to sigma = 0: x = 0 * x - 1 * (0 - 1) * x0_hat
        else:
            a_s, a_t = abar[t].item(), abar[ts[i + 1]].item()
            lam_s, lam_t = _half_log_snr(a_s), _half_log_snr(a_t)
            h = lam_t - lam_s
            if prev_denoised is None:
                d = denoised
            else:
                r = h_prev / h
                d = denoised + (0.5 / r) * (denoised - prev_denoised)  # D0 + D1 / 2 (midpoint)
            # sigma_t' / sigma_s and exp(-h) = exp(lam_s - lam_t): both finite (0 at a_s = 0)
            x = (math.sqrt(1 - a_t) / math.sqrt(1 - a_s)) * x - (math.sqrt(a_t) * (math.exp(lam_s - lam_t) - 1)) * d
            h_prev = h
        prev_denoised = denoised
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": denoised})
    return x


@torch.no_grad()
def sample_euler(
    model: Model,
    x: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    extra_args: dict[str, Any] | None = None,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler on the probability-flow ODE in sigma = sqrt((1 - a) / a) (Karras et al. 2022, Alg. 1 without
    churn), as diffusers' EulerDiscreteScheduler (defaults; deterministic, generator unused):

      - the state is the VE sample x_ve = x_t / sqrt(a_t); sigmas at the timesteps, then a final 0;
        fractional timesteps (linspace spacing) interpolate sigma linearly (alpha_bar_at);
      - initial scaling: x_ve = noise * sigma_0 when the chain starts at t = T-1 (diffusers' rule for
        "linspace"/"trailing", as k-diffusion), else noise * sqrt(sigma_0^2 + 1) (its rule for "leading"
        and the exact std of x_t / sqrt(a_t)). diffusers keys this on the spacing name, so the two
        disagree only for "leading" with steps == T;
      - the model sees x_ve / sqrt(sigma^2 + 1) (scale_model_input, = x_t) and t, and the step is
        x_ve' = x_ve + (sigma' - sigma) (x_ve - x0_hat) / sigma; the last one lands on x0_hat.
      - zero terminal SNR: alpha_bar = 0 is replaced by 2^-24 (sigma ~ 4096), as diffusers does.
    callback's "x" is the VE state (diffusers' prev_sample); "denoised" is x0_hat.
    """
    extra_args = {} if extra_args is None else extra_args
    abar = _schedule(alphas_cumprod)
    # only an exact 0 (cosine's own alpha_bar_{T-1} = 2.4e-9 is below 2^-24 and stays)
    abar = torch.where(abar == 0, torch.full_like(abar, _ZERO_SNR_ALPHA_BAR), abar)
    T = abar.numel()
    ts = _check_timesteps(timesteps, T, integral=False)
    integral = all(t == round(t) for t in ts)
    a = alpha_bar_at(abar, torch.tensor(ts, dtype=torch.float64)).tolist()
    sigmas = [math.sqrt((1 - ai) / ai) for ai in a] + [0.0]
    x = x * (sigmas[0] if ts[0] == T - 1 else math.sqrt(sigmas[0] ** 2 + 1))
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x_in = x / math.sqrt(sigma**2 + 1)
        denoised = model(x_in, _t_batch(t, x, integral), **extra_args).to(x.dtype)
        derivative = (x - denoised) / sigma  # dx/dsigma of the probability-flow ODE
        x = x + derivative * (sigma_next - sigma)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": denoised})
    return x


@torch.no_grad()
def sample_flow_euler(
    model: Model,
    x: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor | None = None,
    extra_args: dict[str, Any] | None = None,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler on the flow-matching ODE dx/ds = v (x_s = (1 - s) x0 + s eps; FlowDenoiser), from s = 1 to
    s = 0, as diffusers' FlowMatchEulerDiscreteScheduler (shift 1, deterministic):
        x_s' = x_s + (s' - s) v,   v = (x_s - x0_hat) / s,
    with timesteps the flow times s in (0, 1] and a final s = 0. The model is called with t = s
    (FlowDenoiser scales it for its net). alphas_cumprod is ignored (the path is fixed by the objective);
    it is in the signature so every sampler is called alike.
    """
    extra_args = {} if extra_args is None else extra_args
    ss = _check_timesteps(timesteps, None, integral=False) + [0.0]
    for i in range(len(ss) - 1):
        s, s_next = ss[i], ss[i + 1]
        denoised = model(x, _t_batch(s, x, integral=False), **extra_args).to(x.dtype)
        v = (x - denoised) / s  # the model's velocity eps - x0, recovered from its x0_hat
        x = x + (s_next - s) * v
        if callback is not None:
            callback({"i": i, "t": s, "x": x, "denoised": denoised})
    return x


# name -> sampler, all with the signature above.
SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler": sample_euler,
    "flow_euler": sample_flow_euler,
}
# name -> the ObjectiveConfig.kind whose denoiser it samples (a pipeline config can check this early).
SAMPLER_OBJECTIVES: dict[str, str] = {
    "ddim": "diffusion",
    "ddpm": "diffusion",
    "dpmpp_2m": "diffusion",
    "euler": "diffusion",
    "flow_euler": "flow",
}


def cfg_model(model: Model, guidance_scale: float) -> Model:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6) as a model-callable:
    out~ = out(x|null) + s * (out(x|c) - out(x|null)), s = 1 + w in the paper's notation.

    The paper guides eps; guiding x0_hat (our model contract) is the same thing: at fixed (x, t) the
    two are affine images of each other and affine maps commute with this combination.

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
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + guidance_scale * (out_cond - out_uncond)

    return guided
