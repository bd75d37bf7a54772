"""Family-specific checks for the flow and diffusion baselines (models/baselines/glow.py, ddpm.py):
invertibility and log-determinants against brute-force Jacobians, the bound's terms against hand
computations, and that training lowers the loss. Tiny sizes, CPU, a few seconds each."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.baselines import build_baseline
from models.baselines.base import dequantize
from models.baselines.ddpm import discretized_gaussian_nll, gaussian_kl, prior_kl, vlb_terms
from models.baselines.glow import ActNorm, AffineCoupling, FlowStep, InvConv1x1, squeeze, unsqueeze
from models.samplers import sample_ddim, sampler_timesteps


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # see tests/conftest.py


def _batch(n=8, c=3, res=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, res, res), generator=g).float() / 127.5 - 1


def _brute_logdet(fn, x):
    """log |det d fn(x) / dx| of one sample x (1, ...), from the full Jacobian (float64)."""
    d = x.numel()
    jac = torch.autograd.functional.jacobian(lambda v: fn(v.reshape(x.shape)).reshape(-1), x.reshape(-1),
                                             vectorize=True)
    assert jac.shape == (d, d)
    return torch.linalg.slogdet(jac)[1]


def _randomize_(module: nn.Module, scale=0.3, seed=0):
    """Non-trivial weights everywhere (zero-initialised layers would make the checks vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ------------------------------------------------------------------ glow

GLOW = {"hidden": 8, "num_scales": 2, "steps_per_scale": 2}


def _glow(**kw):
    torch.manual_seed(0)
    return build_baseline("glow", {"in_channels": 3, "resolution": 8, **GLOW, **kw})


def _glow_layers(c=4, hidden=6):
    torch.manual_seed(0)
    layers = {"actnorm": ActNorm(c), "invconv_lu": InvConv1x1(c, lu=True), "invconv_dense": InvConv1x1(c, lu=False),
              "coupling": AffineCoupling(c, hidden), "step": FlowStep(c, hidden)}
    for i, layer in enumerate(layers.values()):
        layer.train()
        layer(torch.randn(16, c, 2, 2))      # data-dependent actnorm init where there is one
        _randomize_(layer, seed=i)
    return layers


@pytest.mark.parametrize("name", ["actnorm", "invconv_lu", "invconv_dense", "coupling", "step"])
def test_glow_layer_inverts_and_logdet_is_the_jacobians(name):
    layer = _glow_layers()[name].eval()
    x = torch.randn(5, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    y, logdet = layer(x)
    assert y.shape == x.shape and logdet.shape == (5,)
    assert (layer.inverse(y) - x).abs().max() < 1e-5
    assert not torch.allclose(y, x, atol=1e-3), "the layer is the identity: the check says nothing"
    layer = layer.double()
    for i in range(2):
        xi = x[i:i + 1].double()
        brute = _brute_logdet(lambda v: layer(v)[0], xi)        # 16 x 16 Jacobian of a 4 x 2 x 2 input
        assert layer(xi)[1].item() == pytest.approx(brute.item(), abs=1e-8)


def test_squeeze_is_a_permutation_and_inverts():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    s = squeeze(x)
    assert s.shape == (2, 12, 2, 2)
    assert torch.equal(unsqueeze(s), x)
    assert torch.equal(s.flatten().sort().values, x.flatten().sort().values)


def test_lu_conv_weight_is_plu_and_logdet_is_sum_log_s():
    conv = _glow_layers()["invconv_lu"].double()
    w, logdet = conv._weight_and_logdet()
    assert logdet.item() == pytest.approx(torch.linalg.slogdet(w)[1].item(), abs=1e-10)
    # Only the strictly-lower part of `lower` and the strictly-upper part of `upper` are used (L has a
    # unit diagonal, U's diagonal is sign * exp(log_s)): changing the rest leaves W as it was.
    with torch.no_grad():
        conv.lower.add_(torch.triu(torch.ones(4, 4, dtype=torch.float64)))
        conv.upper.add_(torch.tril(torch.ones(4, 4, dtype=torch.float64)))
    assert torch.equal(conv._weight_and_logdet()[0], w)
    assert set(dict(conv.named_buffers())) == {"perm", "sign_s"}


def _trained_tiny_glow(in_channels=1):
    m = _glow(in_channels=in_channels)
    m.train_step(_batch(c=in_channels), m.make_optimizers(), 0)   # actnorm init + one step
    _randomize_(m, scale=0.05)                                     # priors and couplings away from zero
    return m.eval()


def test_glow_whole_flow_inverts_and_logdet_is_the_jacobians():
    m = _trained_tiny_glow()
    x = _batch(n=3, c=1)
    eps, logdet = m.encode(x)
    assert eps.shape == (3, 64)
    assert (m.decode(eps) - x).abs().max() < 1e-5
    md = m.double()
    for i in range(2):
        xi = x[i:i + 1].double()
        brute = _brute_logdet(lambda v: md.encode(v)[0], xi)     # 64 x 64: x -> every eps, priors included
        assert md.encode(xi)[1].item() == pytest.approx(brute.item(), abs=1e-7)


def test_glow_log_prob_is_change_of_variables():
    m = _trained_tiny_glow(in_channels=3)
    x = _batch(n=4)
    eps, logdet = m.encode(x)
    normal = torch.distributions.Normal(0.0, 1.0).log_prob(eps).sum(1)
    assert torch.allclose(m.log_prob(x), normal + logdet, atol=1e-4)
    g = torch.Generator().manual_seed(5)
    bpd = m.bits_per_dim(x, generator=g)
    xd = dequantize(x, torch.Generator().manual_seed(5))
    expected = (-m.log_prob(xd) + 192 * math.log(128)) / (192 * math.log(2))
    assert torch.allclose(bpd, expected.detach(), atol=1e-5)


def test_glow_bpd_of_uniform_noise_is_about_8():
    # After actnorm's init on uniform 8-bit noise, every channel is a unit-variance uniform under a
    # near-standard-normal prior: about 8.25 bits/dim (exactly 8 would be the uniform density itself).
    m = _glow()
    x = _batch(n=16)
    m.train()
    m.encode(x)                    # the data-dependent init only
    m.eval()
    bpd = m.bits_per_dim(x, generator=torch.Generator().manual_seed(0))
    assert bpd.shape == (16,)
    assert 7.8 < float(bpd.mean()) < 8.7, bpd


def test_glow_actnorm_init_normalises_and_its_flag_survives_state_dict():
    m = _glow()
    x = _batch(n=16)
    m.train()
    first = m.levels[0][0].layers[0]
    h = squeeze(x)
    y, _ = first(h)
    assert bool(first.initialized)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(12), atol=1e-5)
    assert torch.allclose(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(12), atol=1e-3)
    state = m.state_dict()
    assert any(k.endswith("initialized") for k in state)
    m2 = _glow()
    m2.load_state_dict(state)
    m2.train()
    before = m2.levels[0][0].layers[0].bias.clone()
    m2.encode(_batch(n=16, seed=3))                      # other data: no second init
    assert torch.equal(m2.levels[0][0].layers[0].bias, before)
    # An uninitialised model in eval mode is not changed by scoring.
    m3 = _glow().eval()
    m3.bits_per_dim(x)
    assert not bool(m3.levels[0][0].layers[0].initialized)


def test_glow_temperature_scales_the_noise():
    m = _trained_tiny_glow(in_channels=3)
    g = lambda: torch.Generator().manual_seed(11)   # noqa: E731
    eps = torch.randn(2, 192, generator=g())
    m.config.temperature = 0.5
    assert torch.allclose(m.sample(2, generator=g()), m.decode(0.5 * eps).clamp(-1, 1), atol=1e-6)
    m.config.temperature = 0.0                     # the mode of every prior: the same image for any seed
    a, b = m.sample(2, generator=g()), m.sample(2, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and torch.allclose(a, m.decode(torch.zeros(2, 192)).clamp(-1, 1))


def test_glow_loss_decreases_on_a_fixed_batch():
    m = _glow(lr=1e-3)
    x = _batch(n=8)
    opts = m.make_optimizers()
    torch.manual_seed(0)
    bpd = [m.train_step(x, opts, s)["bpd"] for s in range(30)]
    assert all(math.isfinite(b) for b in bpd)
    assert sum(bpd[-5:]) / 5 < sum(bpd[:5]) / 5 - 0.05, bpd


@pytest.mark.parametrize("bad, match", [({"num_scales": 4}, "^num_scales: expected 2\\*\\*num_scales <= resolution"),
                                        ({"temperature": -1.0}, "^temperature: "),
                                        ({"hidden": 0}, "^hidden: "),
                                        ({"resolution": 12}, "^resolution: expected a power of two")])
def test_glow_config_errors_name_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        _glow(**bad)


# ------------------------------------------------------------------ ddpm

DDPM = {"ch": 8, "timesteps": 20, "sample_steps": 4}


def _ddpm(**kw):
    torch.manual_seed(0)
    return build_baseline("ddpm", {"in_channels": 3, "resolution": 8, **DDPM, **kw})


def _phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_prior_kl_against_hand_computation():
    a = 0.3
    x0 = _batch(n=2)
    # per dim: KL(N(m, s^2) || N(0, 1)) = 0.5 (s^2 + m^2 - 1 - log s^2), m = sqrt(a) x, s^2 = 1 - a
    hand = [sum(0.5 * ((1 - a) + a * v * v - 1 - math.log(1 - a)) for v in x0[i].flatten().tolist()) for i in range(2)]
    got = prior_kl(x0, a)
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx(hand, rel=1e-10)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(math.sqrt(a) * x0.double(), math.sqrt(1 - a)),
                                            torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    assert torch.allclose(got, ref, rtol=1e-10)
    assert prior_kl(torch.zeros(1, 3, 2, 2), 0.0).item() == 0.0      # N(0, I) itself


def test_gaussian_kl_golden():
    # KL(N(1, 4) || N(0, 1)) = 0.5 (4 + 1 - 1 - log 4)
    got = gaussian_kl(torch.tensor(1.0), torch.tensor(math.log(4.0)), torch.tensor(0.0), torch.tensor(0.0))
    assert got.item() == pytest.approx(0.5 * (4 - math.log(4.0)), rel=1e-6)


def test_discretized_gaussian_nll_against_hand_computation():
    values = torch.tensor([0, 1, 127, 200, 254, 255])
    x0 = (values.float() / 127.5 - 1).view(1, 6, 1, 1)
    mean = torch.tensor([-0.98, -1.0, 0.01, 0.5, 0.99, 1.2], dtype=torch.float64).view(1, 6, 1, 1)
    sigma = 0.02
    got = discretized_gaussian_nll(x0, mean, torch.full_like(mean, math.log(sigma))).item()
    hand = 0.0
    for p, m in zip(values.tolist(), mean.flatten().tolist()):
        x = p / 127.5 - 1
        hi = 1.0 if p == 255 else _phi((x + 1 / 255 - m) / sigma)
        lo = 0.0 if p == 0 else _phi((x - 1 / 255 - m) / sigma)
        hand -= math.log(hi - lo)
    assert got == pytest.approx(hand, rel=1e-9)


def test_discretized_gaussian_masses_sum_to_one():
    grid = (torch.arange(256).float() / 127.5 - 1).view(256, 1, 1, 1)
    for m, s in [(0.3, 0.05), (-0.999, 0.3), (1.5, 0.01), (0.0, 1e-3)]:
        nll = discretized_gaussian_nll(grid, torch.full_like(grid, m), torch.full_like(grid, math.log(s)))
        assert torch.exp(-nll).sum().item() == pytest.approx(1.0, abs=1e-9)


def _oracle(x0):
    """A denoiser that knows the data: x0_hat = x0 for every (timestep, sample) row."""
    def denoise(x_t, t):
        assert x_t.shape[0] % x0.shape[0] == 0 and t.shape == (x_t.shape[0],)
        return x0.repeat(x_t.shape[0] // x0.shape[0], 1, 1, 1)
    return denoise


def _schedule_parts(m):
    ab = m.denoiser.alphas_cumprod.double()
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    beta = 1 - ab / ab_prev
    return ab, beta, (1 - ab_prev) / (1 - ab) * beta


def _hand_decoder(x0, sigma):
    """-log P of each x0 (on the grid) under N(x0, sigma^2) integrated over its bin, summed per sample."""
    out = []
    for img in x0:
        nll = 0.0
        for v in img.flatten().tolist():
            half = _phi((1 / 255) / sigma)
            nll -= math.log(half if abs(v) > 0.999 else 2 * half - 1)
        out.append(nll)
    return out


def test_vlb_with_the_true_x0_is_prior_plus_decoder():
    m = _ddpm()
    x0 = _batch(n=3)
    ab, beta, beta_tilde = _schedule_parts(m)
    terms = vlb_terms(_oracle(x0), x0, ab, vlb_variance="beta_tilde", bpd_batch=7,
                      generator=torch.Generator().manual_seed(0))
    assert torch.allclose(terms["diffusion"], torch.zeros(3, dtype=torch.float64), atol=1e-9)
    assert terms["prior"].tolist() == pytest.approx(prior_kl(x0, float(ab[-1])).tolist(), rel=1e-12)
    # decoder variance: beta_tilde at the paper's t = 2 (index 1), beta_tilde_1 being 0
    assert terms["decoder"].tolist() == pytest.approx(_hand_decoder(x0, math.sqrt(beta_tilde[1])), rel=1e-9)


def test_vlb_with_the_true_x0_and_variance_beta_is_analytic():
    # Means agree, so each KL term is the variance mismatch alone: D/2 (log beta - log bt + bt/beta - 1).
    m = _ddpm()
    x0 = _batch(n=2)
    ab, beta, bt = _schedule_parts(m)
    per_t = 0.5 * (torch.log(beta) - torch.log(bt) + bt / beta - 1) * x0[0].numel()   # (T,), index 0 unused
    terms = vlb_terms(_oracle(x0), x0, ab, vlb_variance="beta", bpd_batch=4)
    assert terms["diffusion"].tolist() == pytest.approx([per_t[1:].sum().item()] * 2, rel=1e-9)
    assert terms["decoder"].tolist() == pytest.approx(_hand_decoder(x0, math.sqrt(beta[0])), rel=1e-9)
    # A stride of 3 sums one residue class of t = 1..T-1 times 3; over the 3 classes that averages to the full sum.
    classes = [3 * per_t[1 + o::3].sum().item() for o in range(3)]
    assert sum(classes) / 3 == pytest.approx(per_t[1:].sum().item(), rel=1e-12)
    seen = set()
    for seed in range(12):
        est = vlb_terms(_oracle(x0), x0, ab, vlb_variance="beta", bpd_stride=3,
                        generator=torch.Generator().manual_seed(seed))["diffusion"][0].item()
        o = min(range(3), key=lambda i: abs(classes[i] - est))
        assert est == pytest.approx(classes[o], rel=1e-9)
        seen.add(o)
    assert len(seen) > 1, "the offset is not random"


class _OracleEpsNet(nn.Module):
    """A 'U-Net' predicting the exact noise of x_t for known data x0 (rows ordered (timestep, sample))."""

    def __init__(self, x0, alphas_cumprod):
        super().__init__()
        self.x0, self.ab = x0, alphas_cumprod

    def forward(self, x_t, t, context, context_mask=None):
        assert context.shape == (x_t.shape[0], 1, 1) and not context.any()   # the unconditional context
        x0 = self.x0.repeat(x_t.shape[0] // self.x0.shape[0], 1, 1, 1)
        a = self.ab[t].view(-1, 1, 1, 1)
        return ((x_t.double() - a.sqrt() * x0) / (1 - a).sqrt()).float()


def test_model_bpd_with_an_oracle_net_is_prior_plus_decoder():
    # Through the model's own path: eps -> x0 conversion, clamping, chunking and the bits/dim scale.
    m = _ddpm(bpd_batch=5).eval()
    x0 = _batch(n=2)
    ab, _, bt = _schedule_parts(m)
    m.denoiser.net = _OracleEpsNet(x0.double(), ab)
    terms = m.vlb(x0, generator=torch.Generator().manual_seed(0))
    assert (terms["diffusion"] < 1e-3).all(), terms["diffusion"]     # float32 round trips only
    expected = (prior_kl(x0, float(ab[-1])) + torch.tensor(_hand_decoder(x0, math.sqrt(bt[1])), dtype=torch.float64))
    expected = expected / (192 * math.log(2))
    assert torch.allclose(m.bits_per_dim(x0).double(), expected, rtol=1e-4)


def test_ddpm_sample_is_the_project_sampler_from_the_generators_noise():
    m = _ddpm().eval()
    got = m.sample(2, generator=torch.Generator().manual_seed(4))
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    ts = sampler_timesteps("ddim", 20, 4)
    ref = sample_ddim(m.denoise, x_T, ts, m.denoiser.alphas_cumprod, {"context": torch.zeros(2, 1, 1)})
    assert torch.equal(got, ref.clamp(-1, 1))
    # the stochastic ddpm sampler: reproducible from a seed, different across seeds
    m.config.sampler = "ddpm"
    a = m.sample(2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, m.sample(2, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(a, m.sample(2, generator=torch.Generator().manual_seed(2)))


def test_ddpm_loss_decreases_on_a_fixed_batch():
    m = _ddpm(channel_mult=[1, 2], num_res_blocks=1, attn_max_res=0, dropout=0.0, lr=2e-3)
    x = _batch(n=4)
    opts = m.make_optimizers()
    torch.manual_seed(0)
    losses = [m.train_step(x, opts, s)["loss"] for s in range(30)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8, losses


@pytest.mark.parametrize("bad, match", [({"sampler": "flow_euler"}, "^sampler: expected one of"),
                                        ({"sample_steps": 21}, "^sample_steps: "),
                                        ({"schedule": "linear"}, "^timesteps: schedule 'linear' needs > 20"),
                                        ({"channel_mult": [1, 2, 2, 2]}, "^channel_mult: 4 levels"),
                                        ({"objective": "score"}, "^objective: expected one of"),
                                        ({"vlb_variance": "learned"}, "^vlb_variance: "),
                                        ({"bpd_stride": 20}, "^bpd_stride: ")])
def test_ddpm_config_errors_name_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        _ddpm(**bad)


def test_ddpm_config_from_json_lists_and_linear_schedule():
    m = _ddpm(channel_mult=[1, 2], timesteps=40, schedule="linear", sample_steps=5)
    assert m.config.channel_mult == (1, 2)
    ab = m.denoiser.alphas_cumprod
    # Ho et al.'s 1e-4..0.02 at T = 1000, scaled by 1000 / T = 25
    assert 1 - ab[0].item() == pytest.approx(25e-4, rel=1e-9)
    assert 1 - ab[-1].item() / ab[-2].item() == pytest.approx(0.5, rel=1e-9)
