"""Family-specific checks for the classic baselines (ppca, vae, dcgan, stylegan) beyond the shared
contract in test_baselines.py: analytic and brute-force golden values, tiny sizes, CPU."""
from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from models.baselines import build_baseline
from models.baselines.base import density_nats_to_bpd, dequantize
from models.baselines.ppca import dequantized_moments, ppca_log_prob
from models.baselines.stylegan import ModulatedConv2d, r1_penalty
from models.baselines.vae import gaussian_kl, gaussian_log_prob

GAN_TINY = {"dcgan": {"ch": 8, "z_dim": 8},
            "stylegan": {"ch": 8, "z_dim": 8, "w_dim": 8, "mapping_layers": 2}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # see tests/conftest.py


def _batch(n=8, channels=3, res=8, seed=0, spread=256):
    """8-bit images in [-1, 1]; spread < 256 keeps the pixel values in a narrow band around 128."""
    g = torch.Generator().manual_seed(seed)
    p = 128 - spread // 2 + torch.randint(0, spread, (n, channels, res, res), generator=g)
    return p.float() / 127.5 - 1


def _model(family, **kw):
    torch.manual_seed(0)
    return build_baseline(family, {"in_channels": 3, "resolution": 8, **kw})


# ---- ppca ----------------------------------------------------------------------------------------
def _low_rank_batch(n, seed, d_side=8, q=3):
    """1-channel 8x8 images with a rank-q structure plus pixel noise, quantised to 8 bits."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(q, d_side * d_side, generator=torch.Generator().manual_seed(99)) * 0.1
    x = torch.randn(n, q, generator=g) @ basis + 0.02 * torch.randn(n, d_side * d_side, generator=g)
    p = torch.round((x.clamp(-1, 1) + 1) * 127.5)
    return (p / 127.5 - 1).reshape(n, 1, d_side, d_side)


def _ppca(q=3):
    return build_baseline("ppca", {"in_channels": 1, "resolution": 8, "latent_dim": q})


def test_ppca_log_prob_equals_full_covariance_gaussian():
    g = torch.Generator().manual_seed(0)
    d, q = 12, 3
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    w = torch.randn(d, q, generator=g, dtype=torch.float64)
    s2 = torch.tensor(0.3, dtype=torch.float64)
    x = torch.randn(5, d, generator=g, dtype=torch.float64)
    brute = MultivariateNormal(mean, covariance_matrix=w @ w.T + s2 * torch.eye(d, dtype=torch.float64))
    torch.testing.assert_close(ppca_log_prob(x, mean, w, s2), brute.log_prob(x), rtol=0, atol=1e-10)


def test_ppca_bits_per_dim_is_the_exact_density_of_the_dequantized_data():
    m = _ppca()
    m.fit_closed_form(iter([_low_rank_batch(64, 0)]))
    x = _low_rank_batch(4, 1)
    torch.manual_seed(5)
    bpd = m.bits_per_dim(x)
    torch.manual_seed(5)
    xd = dequantize(x).double().reshape(4, -1)   # the same noise draw
    cov = m.w @ m.w.T + m.s2 * torch.eye(64, dtype=torch.float64)
    nll = -MultivariateNormal(m.mean, covariance_matrix=cov).log_prob(xd)
    torch.testing.assert_close(bpd, density_nats_to_bpd(nll, 64).float(), rtol=1e-6, atol=1e-6)


def test_ppca_fit_is_the_tipping_bishop_maximum_likelihood_solution():
    x = _low_rank_batch(200, 0)
    m = _ppca(q=3)
    logs = m.fit_closed_form(iter([x[:80], x[80:]]))
    flat = x.double().reshape(200, -1)
    mean, s = dequantized_moments(flat.sum(0), flat.T @ flat, 200.0)   # the target statistics
    evals, evecs = torch.linalg.eigh(s)
    evals, evecs = evals.flip(0), evecs.flip(1)
    torch.testing.assert_close(m.mean, mean)
    # s2 is the mean discarded eigenvalue; C = W W^T + s2 I reproduces S on the principal subspace.
    assert m.s2.item() == pytest.approx(evals[3:].mean().item(), rel=1e-10)
    c = m.w @ m.w.T + m.s2 * torch.eye(64, dtype=torch.float64)
    torch.testing.assert_close(c @ evecs[:, :3], s @ evecs[:, :3], rtol=0, atol=1e-10)

    def expected_nll(w, s2):   # brute force: mean NLL of a Gaussian on data with moments (mean, S)
        cc = w @ w.T + s2 * torch.eye(64, dtype=torch.float64)
        return 0.5 * (64 * math.log(2 * math.pi) + torch.logdet(cc) + torch.trace(torch.linalg.solve(cc, s)))

    best = expected_nll(m.w, m.s2)
    assert logs["train_bpd"] == pytest.approx(density_nats_to_bpd(best, 64).item(), rel=1e-9)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):   # any nearby (W, s2) is worse: the fit is the maximum
        dw = 1e-3 * torch.randn(m.w.shape, generator=g, dtype=torch.float64)
        assert expected_nll(m.w + dw, m.s2) > best
    assert expected_nll(m.w, m.s2 * 1.01) > best and expected_nll(m.w, m.s2 * 0.99) > best


def test_ppca_dequantized_moments_match_monte_carlo():
    x = _batch(n=4, channels=1, res=8, seed=3).reshape(4, -1).double()
    mean, cov = dequantized_moments(x.sum(0), x.T @ x, 4.0)
    g = torch.Generator().manual_seed(0)
    xs = dequantize(x.repeat(20000, 1), g)                       # (80000, 64)
    torch.testing.assert_close(mean, xs.mean(0), rtol=0, atol=1e-4)
    torch.testing.assert_close(cov, torch.cov(xs.T, correction=0), rtol=0, atol=2e-3 * cov.abs().max().item())
    # The diagonal's dequantisation term (variance 1/(12 * 128^2)) is what keeps s2 > 0.
    flat_var = x.var(0, correction=0) * (127.5 / 128) ** 2 + 1 / (12 * 128 ** 2)
    torch.testing.assert_close(cov.diagonal(), flat_var)


def test_ppca_fit_sums_statistics_over_ranks():
    a, b = _low_rank_batch(30, 1), _low_rank_batch(40, 2)
    whole = _ppca()
    whole.fit_closed_form(iter([a, b]))
    sent = []                                                      # rank 1's statistics, in call order
    rank1 = _ppca()
    rank1.fit_closed_form(iter([b]), all_reduce=lambda t: sent.append(t.clone()) or t)
    calls = iter(sent)
    rank0 = _ppca()
    logs = rank0.fit_closed_form(iter([a]), all_reduce=lambda t: t + next(calls))
    assert logs["images"] == 70
    for k in ("mean", "w", "s2"):
        # eigenvectors are defined up to sign: compare W W^T
        got, want = getattr(rank0, k), getattr(whole, k)
        if k == "w":
            got, want = got @ got.T, want @ want.T
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_ppca_samples_have_the_model_covariance_and_config_is_checked():
    m = _ppca()
    m.fit_closed_form(iter([_low_rank_batch(100, 0)]))
    s = m.sample(20000, torch.Generator().manual_seed(0)).double().reshape(20000, -1)
    c = m.w @ m.w.T + m.s2 * torch.eye(64, dtype=torch.float64)
    torch.testing.assert_close(s.mean(0), m.mean.to(s.dtype), rtol=0, atol=0.01)
    torch.testing.assert_close(torch.cov(s.T), c, rtol=0, atol=0.05 * c.abs().max().item())
    assert m.make_optimizers() == {}
    with pytest.raises(NotImplementedError, match="^ppca: fitted in closed form"):
        m.train_step(_batch(channels=1), {}, 0)
    with pytest.raises(ValueError, match=r"^latent_dim: expected an int in \[1, 64\)"):
        build_baseline("ppca", {"in_channels": 1, "resolution": 8, "latent_dim": 64})


# ---- vae -----------------------------------------------------------------------------------------
def test_vae_gaussian_helpers_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, logvar, x = (torch.randn(4, 6, generator=g) for _ in range(3))
    want = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), want)
    torch.testing.assert_close(gaussian_log_prob(x, mu, 0.5 * logvar), Normal(mu, torch.exp(0.5 * logvar)).log_prob(x))


def test_vae_loss_decreases_on_a_fixed_batch_and_grads_are_synced():
    m = _model("vae", ch=8, latent_dim=4, lr=1e-3)
    x = _batch()
    opts = m.make_optimizers()
    seen = []

    def sync(params):
        params = list(params)
        assert all(p.grad is not None for p in params)
        seen.append(len(params))

    losses = [m.train_step(x, opts, i, sync)["loss"] for i in range(30)]
    assert seen == [len(list(m.parameters()))] * 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses


def test_vae_importance_weighting_tightens_the_bound():
    m = _model("vae", ch=8, latent_dim=4, lr=1e-3)
    x = _batch()
    opts = m.make_optimizers()
    for i in range(10):
        m.train_step(x, opts, i)
    m.eval()
    xr = x.repeat(8, 1, 1, 1)                                       # 8 estimates per image
    torch.manual_seed(1)
    elbo = m.bits_per_dim(xr).mean()
    m.config.iw_samples = 32
    iwae = m.bits_per_dim(xr).mean()
    assert iwae < elbo   # Burda et al. theorem 1: log p >= L_k >= L_1 (in expectation)
    # The sampled one-sample bound averages to the closed-form-KL ELBO that training minimises.
    torch.manual_seed(2)
    xd = dequantize(x).repeat(400, 1, 1, 1)                        # 400 posterior draws per image
    sampled = m.log_likelihood_bound(xd, 1).view(400, 8).mean(0)
    with torch.no_grad():
        closed = -m.neg_elbo(xd)[0].view(400, 8).mean(0)
    torch.testing.assert_close(sampled, closed, rtol=0, atol=0.5)   # nats (MC standard error ~0.1)


@pytest.mark.parametrize("res", [8, 16, 32])
def test_vae_shapes_follow_the_config(res):
    m = build_baseline("vae", {"in_channels": 1, "resolution": res, "ch": 4, "latent_dim": 3})
    mu, logvar = m.encode(torch.zeros(2, 1, res, res))
    assert mu.shape == logvar.shape == (2, 3)
    assert m.sample(2, torch.Generator().manual_seed(0)).shape == (2, 1, res, res)


def test_vae_config_errors_name_the_field():
    with pytest.raises(ValueError, match="^resolution: expected a power of two >= 8"):
        build_baseline("vae", {"resolution": 12})
    with pytest.raises(ValueError, match="^iw_samples: expected an int >= 1"):
        build_baseline("vae", {"resolution": 8, "iw_samples": 0})


# ---- GANs: dcgan and stylegan --------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(GAN_TINY))
def test_gan_discriminator_learns_with_the_generator_frozen_and_syncs_d_then_g(family):
    kw = {**GAN_TINY[family], "lr": 1e-3}
    if family == "stylegan":
        kw["r1_gamma"] = 0.0
    m = _model(family, **kw)
    x = _batch()
    opts = m.make_optimizers()
    for group in opts["generator"].param_groups:
        group["lr"] = 0.0
    d_ids = {id(p) for p in m.discriminator.parameters()}
    g_ids = {id(p) for p in m.generator.parameters()}
    order = []

    def sync(params):
        params = list(params)
        assert all(p.grad is not None for p in params)
        order.append("d" if {id(p) for p in params} == d_ids else "g" if {id(p) for p in params} == g_ids else "?")

    losses = [m.train_step(x, opts, i, sync)["d_loss"] for i in range(30)]
    assert order == ["d", "g"] * 30
    assert all(p.requires_grad for p in m.parameters())   # D is unfrozen after the G step
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses


@pytest.mark.parametrize("family", sorted(GAN_TINY))
@pytest.mark.parametrize("res", [8, 16, 32])
def test_gan_shapes_follow_the_config(family, res):
    torch.manual_seed(0)
    m = build_baseline(family, {"in_channels": 1, "resolution": res, **GAN_TINY[family]})
    s = m.sample(2, torch.Generator().manual_seed(0))
    assert s.shape == (2, 1, res, res)
    assert m.discriminator(s).shape == (2,)


def test_dcgan_paper_settings_and_sampling_leaves_batchnorm_alone():
    m = _model("dcgan", ch=16, z_dim=8)
    opts = m.make_optimizers()
    for o in opts.values():
        assert o.defaults["lr"] == 2e-4 and o.defaults["betas"] == (0.5, 0.999)
    convs = torch.cat([mod.weight.flatten() for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)])
    assert convs.std().item() == pytest.approx(0.02, rel=0.1)   # N(0, 0.02) init
    m.train_step(_batch(), opts, 0)
    stats = {k: v.clone() for k, v in m.generator.state_dict().items() if "running" in k}
    m.train()
    s_train = m.sample(3, torch.Generator().manual_seed(1))
    assert m.generator.training   # the mode is restored
    assert all(torch.equal(v, m.generator.state_dict()[k]) for k, v in stats.items())
    m.eval()
    assert torch.equal(s_train, m.sample(3, torch.Generator().manual_seed(1)))


def test_stylegan_modulated_conv_equals_per_sample_brute_force():
    torch.manual_seed(0)
    conv = ModulatedConv2d(3, 5, 3, w_dim=4)
    x, w = torch.randn(2, 3, 6, 6), torch.randn(2, 4)
    y = conv(x, w)
    for b in range(2):
        s = conv.affine(w[b:b + 1])[0]                                      # (in,)
        k = conv.weight * conv.gain * s[None, :, None, None]
        k = k / k.pow(2).sum(dim=(1, 2, 3), keepdim=True).sqrt()           # unit-norm filters
        torch.testing.assert_close(y[b:b + 1], torch.nn.functional.conv2d(x[b:b + 1], k, padding=1),
                                   rtol=1e-5, atol=1e-5)
    # Demodulation makes the output independent of the style's overall scale.
    with torch.no_grad():
        conv.affine.weight.mul_(3.0)
        conv.affine.bias.mul_(3.0)
    torch.testing.assert_close(conv(x, w), y, rtol=1e-5, atol=1e-5)


def test_stylegan_noise_comes_from_the_generator_argument():
    m = _model("stylegan", **GAN_TINY["stylegan"])
    g = m.generator
    w = torch.randn(2, 8)
    with torch.no_grad():
        same = g.synthesis(w, torch.Generator().manual_seed(1)), g.synthesis(w, torch.Generator().manual_seed(2))
        assert torch.equal(*same)   # noise strengths start at 0: noise has no effect yet
        for layer in g.layers:
            layer.noise_strength.fill_(0.5)
        a = g.synthesis(w, torch.Generator().manual_seed(1))
        assert torch.equal(a, g.synthesis(w, torch.Generator().manual_seed(1)))
        assert not torch.allclose(a, g.synthesis(w, torch.Generator().manual_seed(2)))
    assert len(g.layers) == 1 + 2 * int(math.log2(8 // 4))   # one at 4x4, two per doubling


def test_stylegan_truncation_and_w_avg():
    m = _model("stylegan", **GAN_TINY["stylegan"], w_avg_beta=0.9)
    x = _batch(n=4)
    torch.manual_seed(5)
    with torch.no_grad():
        w = m.generator.map(torch.randn(4, 8))
    torch.manual_seed(5)
    m.train_step(x, m.make_optimizers(), 0)
    # one EMA step from zero: w_avg = (1 - beta) * mean(w) over the batch, with the step's own z
    torch.testing.assert_close(m.generator.w_avg, 0.1 * w.mean(0), rtol=1e-5, atol=1e-6)
    m.eval()
    s0 = m.sample(3, torch.Generator().manual_seed(0), truncation_psi=0.0)
    with torch.no_grad():
        at_avg = m.generator.synthesis(m.generator.w_avg.expand(3, -1), torch.Generator().manual_seed(1))
    # psi = 0: every sample is the image of w_avg (noise strengths still ~0 after one step: compare
    # up to their effect); psi = 1 is the config default and the untruncated generator.
    torch.testing.assert_close(s0, at_avg.clamp(-1, 1), rtol=0, atol=1e-2)
    assert torch.equal(m.sample(3, torch.Generator().manual_seed(0)),
                       m.sample(3, torch.Generator().manual_seed(0), truncation_psi=1.0))
    with pytest.raises(ValueError, match=r"^truncation_psi: expected a float in \[0, 1\]"):
        build_baseline("stylegan", {"resolution": 8, "truncation_psi": 1.5})


def test_r1_penalty_is_the_squared_input_gradient():
    a = torch.randn(3, 4, 4)
    linear = lambda x: (x * a).flatten(1).sum(1) + 1.0   # noqa: E731  grad_x = a for every sample
    x = torch.randn(5, 3, 4, 4)
    logits, r1 = r1_penalty(linear, x)
    assert logits.shape == (5,)
    assert r1.item() == pytest.approx(a.pow(2).sum().item(), rel=1e-6)
    quad = lambda x: x.pow(2).flatten(1).sum(1)   # noqa: E731  grad_x = 2 x
    _, r1 = r1_penalty(quad, x)
    assert r1.item() == pytest.approx((4 * x.pow(2).flatten(1).sum(1)).mean().item(), rel=1e-6)
    r1.backward()   # differentiable twice (the penalty trains D)
