"""Objectives: eps / v / x0 targets and conversions, min-SNR weights, offset noise, zero terminal SNR,
flow matching; configs validated early."""

import pytest
import torch
from torch import nn

from models.denoiser import (
    Denoiser,
    EpsDenoiser,
    FlowDenoiser,
    ObjectiveConfig,
    build_denoiser,
    min_snr_weight,
    prediction_target,
    prediction_to_x0,
    x0_to_prediction,
)
from models.samplers import SAMPLERS, sample_flow_euler, sampler_timesteps
from models.schedules import ScheduleConfig, rescale_zero_terminal_snr, snr


class TinyNet(nn.Module):
    """net(x, t, context, context_mask): a 1x1 conv plus a learned per-time bias, float t allowed."""

    def __init__(self, c=2):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.t_scale = nn.Parameter(torch.zeros(c))

    def forward(self, x, t, context=None, context_mask=None):
        return self.conv(x) + (t.float() / 1000)[:, None, None, None] * self.t_scale[None, :, None, None]


# ------------------------------------------------------------------ conversions and targets


@pytest.mark.parametrize("zero_snr", [False, True])
def test_targets_and_round_trips(zero_snr):
    ac = ScheduleConfig(kind="scaled_linear", rescale_zero_terminal_snr=zero_snr).alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 1, 500, 998, 999])
    a = ac[t]
    x0 = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    col = lambda c: c.reshape(-1, 1, 1, 1)  # noqa: E731
    x_t = col(a.sqrt()) * x0 + col((1 - a).sqrt()) * eps
    v = prediction_target(x0, eps, a, "v")
    assert torch.allclose(v, col(a.sqrt()) * eps - col((1 - a).sqrt()) * x0)  # Salimans & Ho eq. in sec. 4
    assert torch.equal(prediction_target(x0, eps, a, "eps"), eps)
    assert torch.equal(prediction_target(x0, eps, a, "x0"), x0)
    # every prediction type maps to the same x0, and back
    for pred, out in (("eps", eps), ("v", v), ("x0", x0)):
        rows = slice(None) if pred != "eps" or not zero_snr else slice(0, 4)  # eps -> x0 is 0/0 at a = 0
        got = prediction_to_x0(out[rows], x_t[rows], a[rows], pred)
        assert torch.allclose(got, x0[rows], atol=1e-9), pred
        back = x0_to_prediction(x0, x_t, a, pred)
        assert torch.isfinite(back).all() and torch.allclose(back, out, atol=1e-9), pred
    if zero_snr:  # at t = T-1: x_t is pure noise, v = -x0, x0 = -v, eps = x_t
        assert a[-1] == 0 and torch.equal(x_t[-1], eps[-1])
        assert torch.allclose(v[-1], -x0[-1]) and torch.allclose(x0_to_prediction(x0, x_t, a, "eps")[-1], x_t[-1])


def test_min_snr_weights():
    s = torch.tensor([0.01, 1.0, 5.0, 100.0], dtype=torch.float64)
    g = 5.0
    assert torch.allclose(min_snr_weight(s, "eps", g), torch.tensor([1.0, 1.0, 1.0, 0.05], dtype=torch.float64))
    assert torch.allclose(min_snr_weight(s, "x0", g), torch.tensor([0.01, 1.0, 5.0, 5.0], dtype=torch.float64))
    assert torch.allclose(
        min_snr_weight(s, "v", g), torch.tensor([0.01 / 1.01, 0.5, 5 / 6, 5 / 101], dtype=torch.float64)
    )
    # The three are one weighting: w_pred * ||pred error||^2 == min(snr, g) * ||x0 error||^2, since
    # ||eps err||^2 = snr ||x0 err||^2 and ||v err||^2 = (snr + 1) ||x0 err||^2 at fixed x_t.
    for pred, factor in (("eps", s), ("v", s + 1), ("x0", torch.ones_like(s))):
        assert torch.allclose(min_snr_weight(s, pred, g) * factor, s.clamp(max=g))
    # zero terminal SNR: v and x0 weights are 0 (finite) there
    assert min_snr_weight(torch.zeros(1, dtype=torch.float64), "v", g).item() == 0.0


def test_min_snr_loss_is_the_weighted_mse():
    torch.manual_seed(0)
    ac = ScheduleConfig().alphas_cumprod()
    for pred in ("eps", "v", "x0"):
        den = Denoiser(TinyNet(), ac, prediction=pred, loss_weighting="min_snr", min_snr_gamma=5.0)
        x0, ctx = torch.randn(6, 2, 4, 4), torch.randn(6, 3, 8)
        loss = den.loss(x0, ctx, generator=torch.Generator().manual_seed(3))
        # recompute by hand from the same draws
        g = torch.Generator().manual_seed(3)
        t = torch.randint(0, 1000, (6,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = den.q_sample(x0, t, noise)
        err = (den.net(x_t, t) - prediction_target(x0, noise, ac[t], pred).float()).pow(2).mean((1, 2, 3))
        w = min_snr_weight(snr(ac)[t], pred, 5.0).float()
        assert loss.item() == pytest.approx((w * err).mean().item(), rel=1e-5), pred


def test_offset_noise_statistics():
    den = Denoiser(nn.Identity(), ScheduleConfig().alphas_cumprod(), prediction="x0", offset_noise=0.1)
    from models.denoiser import _draw_noise

    n = _draw_noise(torch.Size((4000, 3, 8, 8)), torch.float64, torch.device("cpu"), 0.1, torch.Generator().manual_seed(0))
    per_channel_mean = n.mean((2, 3))  # (B, C): var 1/64 from the white part + 0.01 from the offset
    assert per_channel_mean.var().item() == pytest.approx(1 / 64 + 0.01, rel=0.05)
    assert n.var().item() == pytest.approx(1.01, rel=0.02)
    n0 = _draw_noise(torch.Size((4000, 3, 8, 8)), torch.float64, torch.device("cpu"), 0.0, torch.Generator().manual_seed(0))
    assert n0.mean((2, 3)).var().item() == pytest.approx(1 / 64, rel=0.05)
    assert den.offset_noise == 0.1


def test_q_sample_at_zero_terminal_snr_and_finite_gradients():
    sc = ScheduleConfig(kind="scaled_linear", rescale_zero_terminal_snr=True)
    ac = sc.alphas_cumprod()
    assert ac[-1].item() == 0.0 and torch.isfinite(snr(ac)).all() and snr(ac)[-1] == 0
    # Lin et al.: sqrt(alpha_bar) is shifted and scaled; first value unchanged
    base = ScheduleConfig(kind="scaled_linear").alphas_cumprod()
    assert torch.allclose(rescale_zero_terminal_snr(base)[0], base[0])
    den = build_denoiser(TinyNet(), sc, ObjectiveConfig(prediction="v", loss_weighting="min_snr"))
    x0, noise = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)
    x_T = den.q_sample(x0, torch.tensor([999, 999]), noise)
    assert torch.allclose(x_T, noise)  # pure noise: no signal left
    out = den(x_T, torch.tensor([999, 999]))
    assert torch.isfinite(out).all()
    # gradients finite across all t, including t = T-1
    for pred in ("v", "x0"):
        d = build_denoiser(TinyNet(), sc, ObjectiveConfig(prediction=pred, loss_weighting="min_snr", offset_noise=0.1))
        for seed in range(5):
            d.zero_grad()
            loss = d.loss(torch.randn(64, 2, 4, 4), None, generator=torch.Generator().manual_seed(seed))
            loss.backward()
            assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in d.parameters())
    # every diffusion sampler stays finite from t = T-1
    for name in ("ddpm", "ddim", "dpmpp_2m", "euler"):
        ts = sampler_timesteps(name, 1000, 5, "trailing")
        x = SAMPLERS[name](den, torch.randn(2, 2, 4, 4), ts, ac, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(x).all(), name


# ------------------------------------------------------------------ configs


def test_objective_config_validation_and_round_trip():
    c = ObjectiveConfig(kind="diffusion", prediction="v", loss_weighting="min_snr", min_snr_gamma=3.0, offset_noise=0.05)
    assert ObjectiveConfig.from_dict(c.to_dict()) == c
    for kwargs, field in (
        ({"kind": "edm"}, "kind"),
        ({"prediction": "score"}, "prediction"),
        ({"kind": "flow", "prediction": "eps"}, "prediction"),
        ({"loss_weighting": "p2"}, "loss_weighting"),
        ({"kind": "flow", "prediction": "v", "loss_weighting": "min_snr"}, "loss_weighting"),
        ({"min_snr_gamma": 0}, "min_snr_gamma"),
        ({"offset_noise": -0.1}, "offset_noise"),
        ({"offset_noise": True}, "offset_noise"),
    ):
        with pytest.raises(ValueError, match=f"^{field}:"):
            ObjectiveConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown"):
        ObjectiveConfig.from_dict({"predict": "v"})
    zsnr = ScheduleConfig(rescale_zero_terminal_snr=True)
    with pytest.raises(ValueError, match="^prediction: 'eps' is ill-posed"):
        build_denoiser(TinyNet(), zsnr, ObjectiveConfig())
    with pytest.raises(ValueError, match="^prediction:"):
        Denoiser(TinyNet(), zsnr.alphas_cumprod(), prediction="eps")
    with pytest.raises(ValueError, match="^rescale_zero_terminal_snr:"):
        ScheduleConfig(rescale_zero_terminal_snr=1)
    assert ScheduleConfig.from_dict(zsnr.to_dict()) == zsnr


def test_build_denoiser_kinds_and_eps_alias():
    sc = ScheduleConfig()
    d = build_denoiser(TinyNet(), sc, ObjectiveConfig(prediction="x0"))
    assert type(d) is Denoiser and d.prediction == "x0" and torch.equal(d.alphas_cumprod, sc.alphas_cumprod())
    f = build_denoiser(TinyNet(), sc, ObjectiveConfig(kind="flow", prediction="v"))
    assert isinstance(f, FlowDenoiser) and f.num_timesteps == 1000
    e = EpsDenoiser(TinyNet(), sc.alphas_cumprod())
    assert isinstance(e, Denoiser) and e.prediction == "eps"
    # the state dict is the net's only (schedule rebuilt from the saved ScheduleConfig)
    assert set(d.state_dict()) == {"net." + k for k in d.net.state_dict()}


# ------------------------------------------------------------------ flow matching


def test_flow_path_target_and_x0_contract():
    net = TinyNet()
    f = FlowDenoiser(net, 1000)
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    s = torch.tensor([0.0, 0.25, 1.0])
    x_s = f.q_sample(x0, s, eps)
    assert torch.allclose(x_s[0], x0[0]) and torch.allclose(x_s[2], eps[2])
    assert torch.allclose(x_s[1], 0.75 * x0[1] + 0.25 * eps[1])
    # the net receives t = s * 1000; forward returns x0_hat = x_s - s v_hat
    seen = {}
    net.register_forward_hook(lambda m, args, out: seen.update(t=args[1]))
    out = f(x_s, s)
    assert torch.allclose(seen["t"], torch.tensor([0.0, 250.0, 1000.0]))
    assert torch.allclose(out, x_s - s[:, None, None, None] * net(x_s, s * 1000), atol=1e-6)


def test_flow_loss_goes_down_and_sampler_transports():
    # Data: a point mass at mu (per channel); the exact velocity (x_s - mu) / s is only approximately
    # within TinyNet's reach, but the loss must still fall well below its start.
    torch.manual_seed(0)
    mu = torch.tensor([1.5, -1.0]).reshape(1, 2, 1, 1)
    f = FlowDenoiser(TinyNet(), 1000)
    opt = torch.optim.Adam(f.parameters(), lr=3e-2)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(150):
        loss = f.loss(mu.expand(32, 2, 4, 4), None, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert end < 0.6 * start, (start, end)
    # an oracle velocity model (exact for the point mass) is transported exactly by flow Euler
    oracle = lambda x, s, **kw: mu.expand_as(x)  # x0_hat = mu  # noqa: E731
    x = sample_flow_euler(oracle, torch.randn(2, 2, 4, 4), sampler_timesteps("flow_euler", 1000, 7, "trailing"))
    assert torch.allclose(x, mu.expand_as(x), atol=1e-6)
    with pytest.raises(ValueError, match="^timesteps:"):
        sample_flow_euler(oracle, torch.randn(1, 2, 4, 4), torch.tensor([0.5, 1.0]))


def test_samplers_reject_bad_timesteps_before_any_work():
    calls = []
    model = lambda x, t, **kw: calls.append(1) or x  # noqa: E731
    ac = ScheduleConfig().alphas_cumprod()
    x = torch.randn(1, 2, 4, 4)
    for name in ("ddpm", "ddim", "dpmpp_2m", "euler"):
        for bad in (torch.tensor([10, 500]), torch.tensor([999, 999]), torch.tensor([1000, 5]), torch.tensor([], dtype=torch.long)):
            with pytest.raises(ValueError, match="^timesteps:"):
                SAMPLERS[name](model, x, bad, ac)
        with pytest.raises(ValueError, match="^steps:"):
            sampler_timesteps(name, 1000, 1001)
    with pytest.raises(ValueError, match="^timesteps:"):
        SAMPLERS["ddim"](model, x, torch.tensor([900.5, 10.0]), ac)  # discrete samplers need integral t
    with pytest.raises(ValueError, match="^sampler:"):
        sampler_timesteps("heun", 1000, 10)
    assert calls == []
