"""Our schedules, timesteps and samplers against diffusers' schedulers, step by step.

Each case runs the diffusers loop (set_timesteps, init_noise_sigma, scale_model_input, step) and our
sampler on the same toy network and the same initial noise (and, for the stochastic ones, the same
seeded generator), comparing every step's state through the callback.

Precision: DDPM and DDIM step in the dtype of their inputs, so they run in float64 with our float64
alpha_bar put in place of diffusers' float32 table (which test_schedules_match_diffusers compares
separately): agreement is ~1e-12. DPMSolverMultistep and EulerDiscrete cast the sample and sigmas to
float32 inside step() whatever the inputs, so those comparisons are float32 ones, on x/scale.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from models.denoiser import Denoiser, FlowDenoiser  # noqa: E402
from models.samplers import (  # noqa: E402
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_flow_euler,
    sampler_timesteps,
)
from models.schedules import ScheduleConfig  # noqa: E402

T = 1000
DIFFUSERS_KIND = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
BETA_RANGE = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "cosine": (1e-4, 0.02)}
DIFFUSERS_PRED = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
ZERO_SNR_ALPHA_BAR = 2.0**-24  # what diffusers' sigma-space schedulers clamp alpha_bar_{T-1} = 0 to


def our_schedule(kind, zero_snr=False, n=T):
    lo, hi = BETA_RANGE[kind]
    return ScheduleConfig(kind=kind, num_timesteps=n, beta_start=lo, beta_end=hi, rescale_zero_terminal_snr=zero_snr)


def diffusers_kwargs(kind, zero_snr=False, prediction="eps", spacing="trailing", n=T):
    lo, hi = BETA_RANGE[kind]
    return dict(
        num_train_timesteps=n,
        beta_start=lo,
        beta_end=hi,
        beta_schedule=DIFFUSERS_KIND[kind],
        prediction_type=DIFFUSERS_PRED[prediction],
        timestep_spacing=spacing,
        rescale_betas_zero_snr=zero_snr,
    )


class ToyNet(nn.Module):
    """A fixed, nonlinear function of (x, t): a random 3x3 conv through tanh, modulated by t. Any
    prediction type; t may be long or float (Euler's fractional timesteps)."""

    def __init__(self, channels=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w", 0.3 * torch.randn(channels, channels, 3, 3, generator=g, dtype=torch.float64))
        self.register_buffer("b", 0.2 * torch.randn(channels, generator=g, dtype=torch.float64))

    def forward(self, x, t, context=None, context_mask=None):
        tt = t.to(x.dtype).reshape(-1, 1, 1, 1) / T  # (B, 1, 1, 1)
        h = torch.tanh(F.conv2d(x, self.w.to(x.dtype), padding=1))
        return h * (1 + tt) + 0.3 * torch.cos(3 * tt) * x + self.b.to(x.dtype)[:, None, None] * tt


def noise(dtype, seed=1, shape=(2, 3, 4, 4)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def diffusers_loop(sched, net, x_T, steps, step_kwargs=None, generator=None):
    """The standard diffusers denoising loop. -> (timesteps, [prev_sample per step])"""
    sched.set_timesteps(steps)
    x = x_T * getattr(sched, "init_noise_sigma", 1.0)  # FlowMatchEuler has neither of these two
    states = [x]
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        out = net(inp, t.reshape(1).expand(x.shape[0]))
        x = sched.step(out, t, x, generator=generator, **(step_kwargs or {})).prev_sample
        states.append(x)
    return sched.timesteps, states[1:], states[0]


def ours(sampler, model, x_T, ts, ac, **kw):
    seen = []
    out = sampler(model, x_T, ts, ac, callback=seen.append, **kw)
    assert torch.equal(seen[-1]["x"], out)
    return [d["x"] for d in seen], [d["t"] for d in seen]


def assert_steps_close(mine, theirs, atol, scale=None):
    assert len(mine) == len(theirs)
    for i, (a, b) in enumerate(zip(mine, theirs)):
        s = 1.0 if scale is None else scale[i]
        err = (a.double() - b.double()).abs().max().item() / s
        assert err <= atol, f"step {i}: max |diff| / scale = {err:.3g} > {atol}"


# ------------------------------------------------------------------ schedules and timesteps


@pytest.mark.parametrize("kind", sorted(DIFFUSERS_KIND))
@pytest.mark.parametrize("zero_snr", [False, True])
def test_schedules_match_diffusers(kind, zero_snr):
    # diffusers builds float32 betas (and rescales those); ours is float64: equal to float32 rounding.
    theirs = DDPMScheduler(**diffusers_kwargs(kind, zero_snr)).alphas_cumprod.double()
    mine = our_schedule(kind, zero_snr).alphas_cumprod()
    assert torch.allclose(mine, theirs, rtol=2e-5, atol=1e-7), (mine - theirs).abs().max()
    if zero_snr:
        assert mine[-1].item() == 0.0 and mine[0].item() == pytest.approx(our_schedule(kind).alphas_cumprod()[0].item())
        ours_betas = our_schedule(kind, zero_snr).betas()
        assert ours_betas[-1].item() == 1.0
        # their betas are re-derived from float32 ratios of alpha_bar (1 - abar_t / abar_t-1): a
        # ratio near 1 carries a few float32 ulps of absolute error (eps 1.2e-7), whatever the beta;
        # 2.5e-7 measured on an AVX2 CPU (cosine, t=59), so atol is 4 ulps.
        theirs_b = DDPMScheduler(**diffusers_kwargs(kind, zero_snr)).betas.double()
        assert torch.allclose(ours_betas, theirs_b, rtol=1e-4, atol=4 * 1.2e-7)


SCHEDULER_OF = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}


@pytest.mark.parametrize("sampler", sorted(SCHEDULER_OF))
@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_timesteps_match_diffusers_for_every_step_count(sampler, spacing):
    cls = SCHEDULER_OF[sampler]
    for n, offset in ((100, 0), (1000, 0), (1000, 1)):
        if offset and spacing != "leading":
            continue
        sched = cls(num_train_timesteps=n, timestep_spacing=spacing, steps_offset=offset)
        counts = range(1, n + 1) if n == 100 else (1, 2, 3, 7, 10, 25, 50, 333, 999, 1000)
        for steps in counts:
            sched.set_timesteps(steps)
            theirs = sched.timesteps.double()
            try:
                mine = sampler_timesteps(sampler, n, steps, spacing, steps_offset=offset)
            except ValueError as e:
                # we refuse only what diffusers gets wrong: repeated timesteps or t >= T
                assert str(e).startswith(("steps:", "steps_offset:")), e
                assert bool((theirs[1:] >= theirs[:-1]).any()) or theirs.max() >= n, (steps, theirs)
                continue
            assert mine.dtype == (torch.float64 if sampler == "euler" else torch.long)
            if spacing == "trailing" and len(theirs) == steps + 1:
                # numpy's arange overshoots for some counts: diffusers then visits t = -1 last
                assert theirs[-1] == -1, (n, steps, theirs)
                theirs = theirs[:-1]
            assert torch.equal(mine.double(), theirs), (n, steps, mine, theirs)


def test_flow_timesteps_match_diffusers():
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T)
    for steps in (1, 2, 10, 28, 1000):
        sched.set_timesteps(steps)
        mine = sampler_timesteps("flow_euler", T, steps, "linspace")
        assert torch.allclose(mine, sched.sigmas[:-1].double(), atol=1e-7)
    assert sampler_timesteps("flow_euler", T, 4, "trailing").tolist() == [1.0, 0.75, 0.5, 0.25]
    with pytest.raises(ValueError, match="^spacing:"):
        sampler_timesteps("flow_euler", T, 4, "leading")


# ------------------------------------------------------------------ DDPM / DDIM, float64


def _patched(sched, ac):
    # our float64 table in place of diffusers' float32 one (compared in test_schedules_match_diffusers),
    # so the comparison isolates the sampler arithmetic
    sched.alphas_cumprod = ac.clone()
    return sched


CASES_F64 = [
    # (kind, prediction, zero_snr)
    ("linear", "eps", False),
    ("scaled_linear", "eps", False),
    ("scaled_linear", "v", False),
    ("cosine", "eps", False),
    ("cosine", "v", False),
    ("scaled_linear", "x0", False),
    ("scaled_linear", "v", True),
    ("cosine", "v", True),
    ("linear", "x0", True),
]


@pytest.mark.parametrize("kind,prediction,zero_snr", CASES_F64)
@pytest.mark.parametrize("spacing,steps", [("trailing", 7), ("leading", 10), ("linspace", 10)])
def test_ddpm_matches_diffusers(kind, prediction, zero_snr, spacing, steps):
    ac = our_schedule(kind, zero_snr).alphas_cumprod()
    net = ToyNet()
    sched = _patched(DDPMScheduler(**diffusers_kwargs(kind, zero_snr, prediction, spacing), clip_sample=False), ac)
    x_T = noise(torch.float64)
    ts_theirs, theirs, _ = diffusers_loop(sched, net, x_T, steps, generator=torch.Generator().manual_seed(5))
    ts = sampler_timesteps("ddpm", T, steps, spacing)
    assert torch.equal(ts, ts_theirs)
    den = Denoiser(net, ac, prediction=prediction)
    mine, _ = ours(sample_ddpm, den, x_T, ts, ac, generator=torch.Generator().manual_seed(5))
    assert all(torch.isfinite(m).all() for m in mine)
    assert_steps_close(mine, theirs, atol=1e-9)


@pytest.mark.parametrize("kind,prediction,zero_snr", CASES_F64)
@pytest.mark.parametrize("spacing,steps", [("trailing", 10), ("trailing", 20), ("leading", 25)])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_matches_diffusers(kind, prediction, zero_snr, spacing, steps, eta):
    # steps divide T: there diffusers' prev = t - T // steps is the next visited timestep (see sample_ddim)
    ac = our_schedule(kind, zero_snr).alphas_cumprod()
    net = ToyNet()
    sched = DDIMScheduler(**diffusers_kwargs(kind, zero_snr, prediction, spacing), clip_sample=False)
    sched = _patched(sched, ac)
    x_T = noise(torch.float64)
    ts_theirs, theirs, _ = diffusers_loop(
        sched, net, x_T, steps, step_kwargs={"eta": eta}, generator=torch.Generator().manual_seed(5)
    )
    ts = sampler_timesteps("ddim", T, steps, spacing)
    assert torch.equal(ts, ts_theirs)
    den = Denoiser(net, ac, prediction=prediction)
    mine, _ = ours(sample_ddim, den, x_T, ts, ac, eta=eta, generator=torch.Generator().manual_seed(5))
    assert_steps_close(mine, theirs, atol=1e-9)


def test_ddim_set_alpha_to_one_false_matches_diffusers():
    ac = our_schedule("scaled_linear").alphas_cumprod()
    net = ToyNet()
    sched = _patched(DDIMScheduler(**diffusers_kwargs("scaled_linear", spacing="leading"), clip_sample=False,
                                   set_alpha_to_one=False), ac)
    sched.final_alpha_cumprod = ac[0].clone()
    x_T = noise(torch.float64)
    _, theirs, _ = diffusers_loop(sched, net, x_T, 10)
    mine, _ = ours(sample_ddim, Denoiser(net, ac), x_T, sampler_timesteps("ddim", T, 10, "leading"), ac,
                   set_alpha_to_one=False)
    assert_steps_close(mine, theirs, atol=1e-9)


# ------------------------------------------------------------------ DPM-Solver++ 2M / Euler, float32

CASES_F32 = [
    ("linear", "eps", False),
    ("scaled_linear", "eps", False),
    ("scaled_linear", "v", False),
    ("cosine", "v", False),
    ("scaled_linear", "v", True),
    ("cosine", "v", True),
]


def _sigma_space_ac(kind, zero_snr):
    ac = our_schedule(kind, zero_snr).alphas_cumprod()
    if zero_snr:
        ac[-1] = ZERO_SNR_ALPHA_BAR  # diffusers' clamp; both sides then use the same table
    return ac


@pytest.mark.parametrize("kind,prediction,zero_snr", CASES_F32)
@pytest.mark.parametrize("spacing,steps", [("trailing", 10), ("leading", 12), ("linspace", 8), ("trailing", 20)])
def test_dpmpp_2m_matches_diffusers(kind, prediction, zero_snr, spacing, steps):
    ac = _sigma_space_ac(kind, zero_snr)
    net = ToyNet()
    sched = DPMSolverMultistepScheduler(
        **diffusers_kwargs(kind, zero_snr, prediction, spacing), algorithm_type="dpmsolver++", solver_order=2
    )
    sched = _patched(sched, ac)  # set_timesteps derives its sigmas from this table
    x_T = noise(torch.float32)
    ts_theirs, theirs, _ = diffusers_loop(sched, net.float(), x_T, steps)
    ts = sampler_timesteps("dpmpp_2m", T, steps, spacing)
    assert torch.equal(ts, ts_theirs)
    mine, _ = ours(sample_dpmpp_2m, Denoiser(net, ac, prediction=prediction), x_T, ts, ac)
    # float32 inside diffusers' step; eps at cosine's t = 999 (alpha ~ 5e-5) amplifies its rounding
    assert_steps_close(mine, theirs, atol=1e-5, scale=[max(1.0, s.abs().max().item()) for s in theirs])


@pytest.mark.parametrize("kind,prediction,zero_snr", CASES_F32)
@pytest.mark.parametrize("spacing,steps", [("trailing", 10), ("leading", 10), ("linspace", 7), ("linspace", 25)])
def test_euler_matches_diffusers(kind, prediction, zero_snr, spacing, steps):
    ac = _sigma_space_ac(kind, zero_snr)
    net = ToyNet()
    sched = _patched(EulerDiscreteScheduler(**diffusers_kwargs(kind, zero_snr, prediction, spacing)), ac)
    x_T = noise(torch.float32)
    ts_theirs, theirs, start = diffusers_loop(sched, net.float(), x_T, steps)
    ts = sampler_timesteps("euler", T, steps, spacing)
    assert torch.equal(ts, ts_theirs.double())
    if spacing == "linspace" and steps == 7:
        assert bool((ts != ts.round()).any())  # fractional timesteps really exercised
    mine, _ = ours(sample_euler, Denoiser(net, ac, prediction=prediction), x_T, ts, ac)
    # The state is the VE sample x_t / sqrt(alpha_bar): up to sigma_max * |noise| (sigma_max = 2e4 for
    # cosine, 4096 at zero SNR). diffusers' float32 step from there cancels x against the derivative
    # term, leaving an absolute error of float32 rounding times the largest state so far (measured:
    # ~5e-4 at zero SNR against a float64 run), which then carries to every later step. So each
    # step is compared relative to the largest state up to it, at 1e-6 (~16 float32 ulps).
    scale, running = [], max(1.0, start.abs().max().item())
    for s in theirs:
        running = max(running, s.abs().max().item())
        scale.append(running)
    assert_steps_close(mine, theirs, atol=1e-6, scale=scale)


def test_zero_snr_exact_limits_are_finite_and_near_diffusers_clamp():
    # Our DPM++ takes the exact alpha_bar_{T-1} = 0 limit; diffusers clamps it to 2^-24.
    sc = our_schedule("scaled_linear", zero_snr=True)
    exact, clamped = sc.alphas_cumprod(), _sigma_space_ac("scaled_linear", True)
    net = ToyNet()
    x_T = noise(torch.float64)
    for sampler, name in ((sample_dpmpp_2m, "dpmpp_2m"), (sample_ddim, "ddim"), (sample_ddpm, "ddpm"),
                          (sample_euler, "euler")):
        ts = sampler_timesteps(name, T, 10, "trailing")
        g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        a = sampler(Denoiser(net, exact, prediction="v"), x_T, ts, exact, generator=g())
        b = sampler(Denoiser(net, clamped, prediction="v"), x_T, ts, clamped, generator=g())
        assert torch.isfinite(a).all(), name
        # the clamp moves the first step by O(sqrt(2^-24) / alpha_t') = O(2.4e-4 / 0.1)
        assert (a - b).abs().max().item() < 1e-2, name


# ------------------------------------------------------------------ flow matching


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_flow_euler_matches_diffusers(steps):
    net = ToyNet()  # read as a velocity net; it receives t = s * T from both sides
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T)
    x_T = noise(torch.float64)
    _, theirs, _ = diffusers_loop(sched, net, x_T, steps)
    ss = sampler_timesteps("flow_euler", T, steps, "linspace")
    seen = []
    out = sample_flow_euler(FlowDenoiser(net, T), x_T, ss, None, callback=seen.append)
    assert torch.equal(seen[-1]["x"], out)
    # diffusers' sigmas are float32 (s in steps of 1e-7), the state is float64 on both sides
    assert_steps_close([d["x"] for d in seen], theirs, atol=1e-5)
