"""Schedules, denoiser, DDIM, CFG, caption dropout, EMA: math checked against hand computations.
(Equivalence with diffusers: test_samplers_diffusers.py; objectives: test_objectives.py.)"""

import math

import pytest
import torch
from torch import nn

from models.denoiser import EpsDenoiser, drop_conditioning
from models.ema import EMA
from models.samplers import SAMPLERS, cfg_model, ddim_timesteps, sample_ddim, sampler_timesteps
from models.schedules import (
    SCHEDULES,
    ScheduleConfig,
    alpha_bar_at,
    alphas_cumprod,
    cosine_betas,
    linear_betas,
    scaled_linear_betas,
)

# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_schedule_shapes_and_monotone(kind):
    ac = ScheduleConfig(kind=kind, num_timesteps=1000).alphas_cumprod()
    assert ac.shape == (1000,) and ac.dtype == torch.float64
    assert bool((ac > 0).all() and (ac < 1).all())
    assert bool((ac[1:] < ac[:-1]).all())  # strictly decreasing: every step adds noise


def test_schedule_golden_values():
    b = scaled_linear_betas(1000)
    assert b[[0, 999]].tolist() == pytest.approx([0.00085, 0.012], abs=1e-12)
    assert b.dtype == torch.float64
    # sqrt-linear, not linear: midpoint is ((sqrt(a) + sqrt(b)) / 2)^2
    mid = scaled_linear_betas(3)[1].item()
    assert mid == pytest.approx(((math.sqrt(0.00085) + math.sqrt(0.012)) / 2) ** 2, rel=1e-12)
    # Stable Diffusion's terminal alpha_bar, well known to be ~0.0047 (SNR never reaches 0).
    assert alphas_cumprod(b)[-1].item() == pytest.approx(0.0046601, abs=1e-7)
    assert linear_betas(1000)[[0, 999]].tolist() == pytest.approx([1e-4, 2e-2], abs=1e-12)
    assert ScheduleConfig().alphas_cumprod().tolist() == alphas_cumprod(b).tolist()


def test_cosine_schedule_matches_closed_form():
    n, s = 1000, 0.008
    ac = alphas_cumprod(cosine_betas(n))
    assert ac[0].item() == pytest.approx(1.0, abs=1e-4)

    def f(t):  # Nichol & Dhariwal eq. 17, unnormalised
        return math.cos((t / n + s) / (1 + s) * math.pi / 2) ** 2

    for t in (0, 100, 500, 900):  # before the max_beta clip kicks in
        assert ac[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert cosine_betas(n).max().item() <= 0.999


def test_schedule_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"^kind: expected one of cosine, linear, scaled_linear, got 'foo'$"):
        ScheduleConfig(kind="foo")
    with pytest.raises(ValueError, match="^num_timesteps:"):
        ScheduleConfig(num_timesteps=1)
    with pytest.raises(ValueError, match="^num_timesteps:"):
        ScheduleConfig(num_timesteps=True)
    with pytest.raises(ValueError, match="^beta_start:"):
        ScheduleConfig(beta_start=0.0)
    with pytest.raises(ValueError, match="^beta_end:"):
        ScheduleConfig(beta_end=1.5)
    with pytest.raises(ValueError, match="^beta_start:"):
        ScheduleConfig(beta_start=0.02, beta_end=0.01)
    with pytest.raises(ValueError, match="unknown"):
        ScheduleConfig.from_dict({"kind": "linear", "steps": 10})


def test_schedule_config_round_trip():
    c = ScheduleConfig(kind="linear", num_timesteps=500, beta_start=1e-4, beta_end=0.02)
    assert ScheduleConfig.from_dict(c.to_dict()) == c
    assert torch.equal(c.alphas_cumprod(), alphas_cumprod(linear_betas(500)))


# ---------------------------------------------------------------- denoiser


class ToyNet(nn.Module):
    """net(x_t, t, context, context_mask) -> eps, touching every input so all of them get gradients."""

    def __init__(self, channels=4, dim=8):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.t_emb = nn.Embedding(1000, channels)
        self.ctx = nn.Linear(dim, channels)

    def forward(self, x, t, context, context_mask=None):
        if context_mask is not None:  # masked mean over tokens: (B, L, D) -> (B, D)
            w = context_mask.to(context.dtype)[..., None]
            pooled = (context * w).sum(1) / w.sum(1).clamp(min=1)
        else:
            pooled = context.mean(1)
        bias = self.t_emb(t) + self.ctx(pooled)  # (B, C)
        return self.conv(x) + bias[:, :, None, None]


def test_q_sample_statistics():
    ac = ScheduleConfig().alphas_cumprod()
    den = EpsDenoiser(ToyNet(), ac)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((4, 4, 64, 64), 2.0, dtype=torch.float64)
    for t_val in (0, 500, 999):
        t = torch.full((4,), t_val)
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        x_t = den.q_sample(x0, t, noise)
        a = ac[t_val].item()
        assert x_t.mean().item() == pytest.approx(math.sqrt(a) * 2.0, abs=0.01)
        assert x_t.std().item() == pytest.approx(math.sqrt(1 - a), rel=0.01)
    # exact, per sample: different t per row
    t = torch.tensor([0, 10, 500, 999])
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    expected = ac[t].sqrt()[:, None, None, None] * x0 + (1 - ac[t]).sqrt()[:, None, None, None] * noise
    assert torch.allclose(den.q_sample(x0, t, noise), expected, atol=1e-12)


def test_denoiser_keeps_float64_schedule_and_net_only_state():
    den = EpsDenoiser(ToyNet(), ScheduleConfig().alphas_cumprod()).bfloat16()
    assert den.alphas_cumprod.dtype == torch.float64
    assert den.net.conv.weight.dtype == torch.bfloat16
    assert set(den.state_dict()) == {"net." + k for k in den.net.state_dict()}
    with pytest.raises(ValueError, match="^prediction:"):
        EpsDenoiser(ToyNet(), ScheduleConfig().alphas_cumprod(), prediction="v")


def test_denoiser_loss_finite_backprops_and_seeded():
    torch.manual_seed(0)
    den = EpsDenoiser(ToyNet(), ScheduleConfig().alphas_cumprod())
    x0 = torch.randn(3, 4, 8, 8)
    ctx, mask = torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool)
    loss = den.loss(x0, ctx, mask, generator=torch.Generator().manual_seed(1))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in den.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    again = den.loss(x0, ctx, mask, generator=torch.Generator().manual_seed(1))
    assert again.item() == loss.item()
    eps = den(x0, torch.zeros(3, dtype=torch.long), ctx, mask)
    assert eps.shape == x0.shape


# ---------------------------------------------------------------- DDIM


def test_ddim_timesteps_properties():
    for spacing in ("trailing", "leading"):
        for steps in (1, 3, 10, 50, 999, 1000):
            ts = ddim_timesteps(1000, steps, spacing)
            assert ts.dtype == torch.long and ts.shape == (steps,)
            assert bool((ts[1:] < ts[:-1]).all()) and ts.min() >= 0 and ts.max() <= 999
        assert ddim_timesteps(1000, 1000, spacing).tolist() == list(range(999, -1, -1))
    assert ddim_timesteps(1000, 10).tolist() == list(range(999, 0, -100))  # 999, 899, ..., 99
    assert ddim_timesteps(1000, 3).tolist() == [999, 666, 332]  # diffusers "trailing" golden
    assert ddim_timesteps(1000, 10, "leading").tolist() == list(range(900, -1, -100))
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="^steps:"):
            ddim_timesteps(1000, bad)
    with pytest.raises(ValueError, match="^spacing:"):
        ddim_timesteps(1000, 10, "uniform")


def oracle_model(x0_star, ac):
    """Exact for a data distribution that is the single point x0*, as an eps-predicting net wrapped
    in EpsDenoiser (so the eps -> x0 conversion is exercised too)."""

    class EpsNet(nn.Module):
        def forward(self, x, t, context=None, context_mask=None):
            # In float64 like the sampler: a float32 1 - a at small t is off by ~1e-4 relative.
            a = alpha_bar_at(ac, t).reshape(-1, *([1] * (x.ndim - 1)))  # fractional t: Euler/linspace
            return ((x.double() - a.sqrt() * x0_star.double()) / (1 - a).sqrt()).to(x.dtype)

    return EpsDenoiser(EpsNet(), ac)


# cosine runs in float64: its alpha_bar at t = 999 is 2.4e-9, and the eps -> x0 conversion
# (x - sqrt(1-a) eps) / sqrt(a) multiplies float32 rounding by 1/sqrt(a) = 2e4 (a 1-step sample from
# t = 999 is then only good to ~5e-3 in float32; more steps are not affected).
@pytest.mark.parametrize(
    "kind,dtype", [("scaled_linear", torch.float32), ("linear", torch.float32), ("cosine", torch.float64)]
)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_recovers_point_mass_with_oracle(kind, dtype, eta):
    ac = alphas_cumprod(SCHEDULES[kind](1000))  # each kind at its own defaults
    g = torch.Generator().manual_seed(0)
    x0_star = torch.randn(2, 4, 8, 8, generator=g, dtype=dtype)
    model = oracle_model(x0_star, ac)
    for spacing in ("trailing", "leading"):
        for steps in (1, 2, 10, 50, 1000):
            x_T = 3 * torch.randn(x0_star.shape, generator=g, dtype=dtype)  # "any noise", even off-distribution
            out = sample_ddim(model, x_T, ddim_timesteps(1000, steps, spacing), ac, eta=eta, generator=g)
            assert out.shape == x_T.shape and out.dtype == x_T.dtype
            assert torch.allclose(out, x0_star, atol=1e-4), (spacing, steps, (out - x0_star).abs().max())


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m", "euler"])
@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_every_diffusion_sampler_recovers_point_mass(name, spacing):
    # float64: cosine's alpha_bar_{T-1} = 2.4e-9 would amplify float32 rounding by 2e4 (see above).
    ac = ScheduleConfig(kind="cosine").alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    x0_star = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    for steps in (1, 3, 25):
        x_T = torch.randn(x0_star.shape, generator=g, dtype=torch.float64)
        ts = sampler_timesteps(name, 1000, steps, spacing)
        out = SAMPLERS[name](oracle_model(x0_star, ac), x_T, ts, ac, generator=g)
        assert torch.allclose(out, x0_star, atol=1e-8), (steps, (out - x0_star).abs().max())


def test_ddim_callback_extra_args_and_determinism():
    ac = ScheduleConfig().alphas_cumprod()
    seen = []

    def model(x, t, context=None):
        assert t.shape == (x.shape[0],) and t.dtype == torch.long
        return 0.1 * x + context

    ts = ddim_timesteps(1000, 5)
    x_T = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    args = {"context": torch.ones(2, 3)}
    out = sample_ddim(model, x_T, ts, ac, extra_args=args, callback=seen.append)
    assert [d["i"] for d in seen] == list(range(5)) and [d["t"] for d in seen] == ts.tolist()
    assert set(seen[0]) == {"i", "t", "x", "denoised"}
    assert torch.equal(seen[-1]["x"], out)
    assert torch.equal(sample_ddim(model, x_T, ts, ac, extra_args=args), out)  # eta=0: deterministic
    # eta > 0: reproducible from the generator, and actually stochastic
    run = lambda seed: sample_ddim(model, x_T, ts, ac, args, eta=1.0, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))
    with pytest.raises(ValueError, match="^timesteps:"):
        sample_ddim(model, x_T, ts.flip(0), ac, extra_args=args)


def test_ddim_single_step_matches_eq12_by_hand():
    ac = ScheduleConfig().alphas_cumprod()
    x = torch.randn(1, 4, dtype=torch.float64)
    eps = torch.randn(1, 4, dtype=torch.float64)
    ts = torch.tensor([999, 499])
    seen = []
    a_t, a_p = ac[999].item(), ac[499].item()
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    sample_ddim(lambda x_, t_: x0, x, ts, ac, callback=seen.append)  # model contract: returns x0_hat
    assert torch.allclose(seen[0]["x"], math.sqrt(a_p) * x0 + math.sqrt(1 - a_p) * eps, atol=1e-12)


# ---------------------------------------------------------------- CFG


class CountingToy:
    """eps = w_t * x + pooled(context): cond and uncond differ through the context only."""

    def __init__(self):
        self.batch_sizes = []

    def __call__(self, x, t, context, context_mask=None, bias=0.0):
        self.batch_sizes.append(x.shape[0])
        w = context_mask.to(x.dtype)[..., None] if context_mask is not None else torch.ones_like(context[..., :1])
        pooled = (context * w).sum(1) / w.sum(1)  # (B, D)
        return (t.to(x.dtype)[:, None] / 1000 + 1) * x + pooled + bias


def test_cfg_model():
    g = torch.Generator().manual_seed(0)
    b, seq, dim = 3, 5, 4
    x, t = torch.randn(b, dim, generator=g), torch.tensor([999, 10, 500])
    ctx = torch.randn(b, seq, dim, generator=g)
    mask = torch.ones(b, seq, dtype=torch.bool)
    mask[0, 3:] = False
    null_ctx, null_mask = torch.randn(seq, dim, generator=g), torch.zeros(seq, dtype=torch.bool)
    null_mask[:2] = True
    extra = dict(context=ctx, context_mask=mask, null_context=null_ctx, null_mask=null_mask, bias=0.5)

    toy = CountingToy()
    cond = toy(x, t, ctx, mask, bias=0.5)
    uncond = toy(x, t, null_ctx.expand(b, -1, -1), null_mask.expand(b, -1), bias=0.5)
    assert not torch.allclose(cond, uncond)

    toy.batch_sizes.clear()
    assert torch.equal(cfg_model(toy, 1.0)(x, t, **extra), cond)
    assert toy.batch_sizes == [b]  # uncond pass skipped

    for s in (0.0, 3.0, 7.5):
        toy.batch_sizes.clear()
        out = cfg_model(toy, s)(x, t, **extra)
        assert torch.allclose(out, uncond + s * (cond - uncond), atol=1e-6)
        assert toy.batch_sizes == [2 * b]  # one batched call
    # (1, L, D) null context and no masks
    out = cfg_model(toy, 2.0)(x, t, context=ctx, null_context=null_ctx[None])
    ref_c, ref_u = toy(x, t, ctx), toy(x, t, null_ctx.expand(b, -1, -1))
    assert torch.allclose(out, ref_u + 2.0 * (ref_c - ref_u), atol=1e-6)
    # usable inside the sampler through extra_args
    ac = ScheduleConfig().alphas_cumprod()
    sample_ddim(cfg_model(toy, 7.5), x, ddim_timesteps(1000, 3), ac, extra_args=extra)
    with pytest.raises(ValueError, match="^null_mask:"):
        cfg_model(toy, 2.0)(x, t, context=ctx, context_mask=mask, null_context=null_ctx)


# ---------------------------------------------------------------- caption dropout


def test_drop_conditioning():
    g = torch.Generator().manual_seed(0)
    b, seq, dim = 6, 4, 3
    ctx, mask = torch.randn(b, seq, dim, generator=g), torch.ones(b, seq, dtype=torch.bool)
    null_ctx, null_mask = torch.zeros(seq, dim), torch.tensor([True, True, False, False])

    c, m = drop_conditioning(ctx, mask, null_ctx, null_mask, 0.0, generator=g)
    assert torch.equal(c, ctx) and torch.equal(m, mask)
    c, m = drop_conditioning(ctx, mask, null_ctx[None], null_mask[None], 1.0, generator=g)
    assert torch.equal(c, null_ctx.expand(b, -1, -1)) and torch.equal(m, null_mask.expand(b, -1))
    assert torch.equal(ctx, ctx.clone()) and mask.all()  # inputs untouched

    big = 20000
    ctx = torch.randn(big, seq, dim, generator=g)
    mask = torch.ones(big, seq, dtype=torch.bool)
    c, m = drop_conditioning(ctx, mask, null_ctx, null_mask, 0.1, generator=g)
    dropped = (c == 0).all(dim=(1, 2))
    assert abs(dropped.float().mean().item() - 0.1) < 0.01
    # whole samples: context and mask dropped together, the rest untouched
    assert torch.equal(m[dropped], null_mask.expand(int(dropped.sum()), -1))
    assert torch.equal(c[~dropped], ctx[~dropped]) and m[~dropped].all()

    c, m = drop_conditioning(ctx[:4], None, null_ctx, None, 1.0)
    assert m is None and torch.equal(c, null_ctx.expand(4, -1, -1))
    with pytest.raises(ValueError, match="^p:"):
        drop_conditioning(ctx, mask, null_ctx, null_mask, 1.5)
    with pytest.raises(ValueError, match="^null_mask:"):
        drop_conditioning(ctx, mask, null_ctx, None, 0.5)
    with pytest.raises(ValueError, match="^null_context:"):
        drop_conditioning(ctx, mask, torch.zeros(2, seq, dim), null_mask, 0.5)


# ---------------------------------------------------------------- EMA


def _linear(w, b):
    lin = nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([w]))
        lin.bias.copy_(torch.tensor([b]))
    return lin


def test_ema_matches_hand_computation():
    lin = _linear([1.0, 2.0], 0.0)
    ema = EMA(lin, decay=0.9, warmup=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 4.0]]))
    ema.update(lin)
    # 0.9 * [1, 2] + 0.1 * [3, 4]
    assert torch.allclose(ema.shadow["weight"], torch.tensor([[1.2, 2.2]]))
    ema.update(lin)
    assert torch.allclose(ema.shadow["weight"], torch.tensor([[0.9 * 1.2 + 0.3, 0.9 * 2.2 + 0.4]]))
    assert ema.num_updates == 2


def test_ema_warmup_decay():
    lin = _linear([0.0, 0.0], 0.0)
    ema = EMA(lin, decay=0.999, warmup=True)
    expected = torch.zeros(1, 2)
    for n in range(1, 4):  # n = 1 on the first update: d = 2/11, 3/12, 4/13
        d = (1 + n) / (10 + n)
        assert ema.current_decay() == pytest.approx(d)
        with torch.no_grad():
            lin.weight.fill_(float(n))
        ema.update(lin)
        expected = d * expected + (1 - d) * n
        assert torch.allclose(ema.shadow["weight"], expected)
    ema.num_updates = 10**6
    assert ema.current_decay() == 0.999  # capped


def test_ema_bf16_module_buffers_copy_to_and_state_dict():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).to(torch.bfloat16)
    ema = EMA(net, decay=0.5, warmup=False)
    assert all(s.dtype == torch.float32 for s in ema.shadow.values())
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].running_mean.fill_(3.0)
    ema.update(net)
    assert torch.equal(ema.buffers["1.running_mean"], net[1].running_mean)  # copied, not averaged

    other = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).to(torch.bfloat16)
    ema.copy_to(other)
    assert other[0].weight.dtype == torch.bfloat16
    assert torch.equal(other[0].weight, ema.shadow["0.weight"].to(torch.bfloat16))
    assert torch.equal(other[1].running_mean, net[1].running_mean)

    restored = EMA(other, decay=0.1)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 1 and restored.decay == 0.5 and not restored.warmup
    assert all(torch.equal(restored.shadow[k], v) for k, v in ema.shadow.items())
    with pytest.raises(KeyError):
        ema.update(nn.Linear(4, 4))


def test_ema_follows_zero3_partition():
    # ZeRO-3 parameters carry this rank's flat slice in ds_tensor (world 1 here: the whole flattened
    # parameter); the EMA averages the slice and consolidated_state_dict() gives whole tensors.
    # Two real ranks: tests/test_resume.py (ZeRO-3 EMA == ZeRO-2 EMA).
    lin = nn.Linear(3, 2)
    start = {k: v.detach().clone() for k, v in lin.named_parameters()}
    for q in lin.parameters():
        q.ds_tensor, q.ds_numel, q.ds_shape = q.detach().reshape(-1).clone(), q.numel(), q.shape
    ema = EMA(lin, decay=0.5, warmup=False)
    assert ema.shadow["weight"].shape == (6,) and ema.partitioned["weight"] == (6, (2, 3))
    for q in lin.parameters():
        q.ds_tensor.add_(1.0)
    ema.update(lin)
    full = ema.consolidated_state_dict()
    assert torch.allclose(full["weight"], start["weight"] + 0.5, atol=1e-6)
    assert torch.allclose(full["bias"], start["bias"] + 0.5, atol=1e-6)
