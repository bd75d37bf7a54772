"""Family-specific checks of the autoregressive baselines (pixelcnn, vqvae, imagegpt) beyond the
shared contract in test_baselines.py: causality by brute force, cached vs full decoding, analytic
likelihoods (a uniform model is 8 bits/dim; the discretised logistic sums to 1; the VQ-VAE bound
sits above the exact likelihood on a one-code grid), the two-phase VQ-VAE schedule, and losses that
fall on a fixed tiny batch. Tiny sizes, CPU, one thread."""
from __future__ import annotations

import math

import pytest
import torch

from models.baselines import build_baseline
from models.baselines.base import to_8bit
from models.baselines.imagegpt import pixels_to_tokens, tokens_to_pixels
from models.baselines.pixelcnn import GatedPixelCNNNet, sample_grid
from models.baselines.vqvae import discretized_logistic_log_prob, mean_over_ranks


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # see tests/conftest.py


def _batch(n=4, res=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, res, res), generator=g).float() / 127.5 - 1


def _model(family, **kw):
    torch.manual_seed(0)
    return build_baseline(family, {"in_channels": 3, "resolution": 8, **kw})


PIXELCNN = {"ch": 4, "num_layers": 2}
VQVAE = {"ch": 8, "codebook_size": 16, "code_dim": 4, "prior_ch": 8, "prior_layers": 2, "num_res": 1}
IMAGEGPT = {"width": 16, "depth": 2, "heads": 2, "levels": 8}


def _dependencies(fn, idx, classes, order):
    """Brute force: {(input position, output position)} such that changing the input symbol changes
    the output logits. idx (1, C, H, W); fn -> (1, C, K, H, W); order(c, i, j) -> raster index."""
    base = fn(idx)
    _, c_, h_, w_ = idx.shape
    dep = set()
    for i in range(h_):
        for j in range(w_):
            for c in range(c_):
                idx2 = idx.clone()
                idx2[0, c, i, j] = (idx2[0, c, i, j] + 1 + classes // 3) % classes
                changed = (fn(idx2) - base).abs().amax(dim=2)[0] > 0       # (C, H, W)
                dep |= {(order(c, i, j), order(*p)) for p in changed.nonzero().tolist()}
    return dep


# ---- PixelCNN ----------------------------------------------------------------------------------
def test_pixelcnn_is_causal_over_pixels_and_channels_without_blind_spot():
    torch.manual_seed(0)
    C, H, W = 3, 5, 5
    net = GatedPixelCNNNet(C, 256, ch=3, num_layers=3, first_kernel=5, kernel=3).double()
    idx = torch.randint(0, 256, (1, C, H, W))
    order = lambda c, i, j: (i * W + j) * C + c      # noqa: E731  raster over (H, W), then R, G, B
    dep = _dependencies(net, idx, 256, order)
    assert dep and all(src < dst for src, dst in dep), "an output reads its own or a later sub-pixel"
    # Within a pixel: G reads R, B reads R and G.
    assert {(order(0, 2, 2), order(1, 2, 2)), (order(0, 2, 2), order(2, 2, 2)), (order(1, 2, 2), order(2, 2, 2))} <= dep
    # The original PixelCNN's blind spot: the pixel up and to the right is seen (vertical stack).
    assert (order(2, 1, 3), order(0, 2, 2)) in dep
    # The row above further right, two layers deep, and the pixel to the left.
    assert (order(0, 1, 4), order(0, 2, 2)) in dep and (order(2, 2, 1), order(0, 2, 2)) in dep


def test_pixelcnn_single_channel_grid_is_causal():
    """The vqvae prior's use: one channel of K classes, mask A hides the current symbol entirely."""
    torch.manual_seed(1)
    net = GatedPixelCNNNet(1, 7, ch=4, num_layers=2).double()
    idx = torch.randint(0, 7, (1, 1, 4, 4))
    dep = _dependencies(net, idx, 7, lambda c, i, j: i * 4 + j)
    assert dep and all(src < dst for src, dst in dep)
    assert (3, 4) in dep and (2, 5) in dep      # left neighbour; up-right across the row boundary


def test_pixelcnn_rows_below_do_not_change_rows_above():
    """sample_grid reruns the net on rows <= i only: that must give the full net's logits."""
    torch.manual_seed(0)
    net = GatedPixelCNNNet(3, 256, ch=3, num_layers=3).double()
    idx = torch.randint(0, 256, (2, 3, 6, 6))
    full = net(idx)
    for i in range(6):
        assert torch.allclose(net(idx[:, :, :i + 1])[..., i, :], full[..., i, :], atol=1e-12)


@pytest.mark.parametrize("channels, classes, layers, first_kernel", [(3, 256, 3, 5), (1, 7, 4, 7), (3, 16, 1, 3)])
def test_pixelcnn_row_logits_equal_the_full_net_everywhere(channels, classes, layers, first_kernel):
    """The sampler's incremental path (vertical stack once per row on reach + 1 rows above, the
    horizontal stack on reach + 1 pixels) gives the full net's logits at every pixel, including
    where both crops cut into the image (grid wider and taller than the receptive field)."""
    torch.manual_seed(0)
    net = GatedPixelCNNNet(channels, classes, ch=3, num_layers=layers, first_kernel=first_kernel).double()
    for p in net.parameters():                 # non-zero biases too, so zero padding would show
        p.data.normal_(0, 0.5)
    H, W = net.reach + 5, 2 * net.reach + 6
    idx = torch.randint(0, classes, (2, channels, H, W))
    full = net(idx)                                                    # (2, C, K, H, W)
    r = net.reach
    for i in range(H):
        ctx = net.row_context(idx[:, :, max(0, i - r - 1):i])
        for j in range(W):
            j0 = max(0, j - r)
            got = net.row_logits(idx[:, :, i:i + 1, j0:j + 1], [t[..., j0:j + 1] for t in ctx])
            assert torch.allclose(got, full[..., i, j], atol=1e-10), (i, j)


def test_pixelcnn_sample_grid_equals_rerunning_the_full_net():
    """The same draws as the plain sampler that reruns the whole net for every sub-pixel."""
    torch.manual_seed(2)
    net = GatedPixelCNNNet(3, 11, ch=2, num_layers=2, first_kernel=3).double()
    n, H, W = 3, 5, 7
    g = torch.Generator().manual_seed(5)
    ref = torch.zeros(n, 3, H, W, dtype=torch.long)
    with torch.no_grad():
        for i in range(H):
            for j in range(W):
                for c in range(3):
                    probs = torch.softmax(net(ref)[:, c, :, i, j].float(), dim=-1)
                    ref[:, c, i, j] = torch.multinomial(probs, 1, generator=g).squeeze(1)
    got = sample_grid(net, n, H, W, torch.Generator().manual_seed(5), torch.device("cpu"))
    assert torch.equal(got, ref)


def test_pixelcnn_uniform_output_is_exactly_8_bits_and_bpd_is_the_cross_entropy():
    m = _model("pixelcnn", **PIXELCNN)
    x = _batch()
    logits = m.net(to_8bit(x))                                           # (B, C, 256, H, W)
    logp = torch.log_softmax(logits, dim=2).gather(2, to_8bit(x)[:, :, None]).squeeze(2)
    expected = -logp.flatten(1).sum(1) / (3 * 8 * 8 * math.log(2))
    assert torch.allclose(m.bits_per_dim(x), expected, atol=1e-5)
    with torch.no_grad():
        m.net.head2.weight.zero_()
        m.net.head2.bias.zero_()
    assert torch.allclose(m.bits_per_dim(x), torch.full((4,), 8.0), atol=1e-5)


def test_pixelcnn_sample_puts_each_channel_where_its_logits_say():
    """A net whose head ignores its input and puts all mass on R=10, G=200, B=77 samples exactly that."""
    m = _model("pixelcnn", **PIXELCNN).eval()
    with torch.no_grad():
        m.net.head2.weight.zero_()
        m.net.head2.bias.fill_(-1e4)
        for c, v in enumerate((10, 200, 77)):
            m.net.head2.bias[c * 256 + v] = 0.0
    s = m.sample(2, torch.Generator().manual_seed(0))
    assert torch.equal(to_8bit(s), torch.tensor([10, 200, 77])[None, :, None, None].expand(2, 3, 8, 8))


def test_pixelcnn_sample_grid_draws_from_the_generator():
    net = GatedPixelCNNNet(1, 5, ch=2, num_layers=1)
    a = sample_grid(net, 4, 3, 3, torch.Generator().manual_seed(0), torch.device("cpu"))
    b = sample_grid(net, 4, 3, 3, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert a.shape == (4, 1, 3, 3) and a.min() >= 0 and a.max() < 5 and not torch.equal(a, b)


def test_pixelcnn_loss_falls_on_a_fixed_batch():
    m = _model("pixelcnn", **PIXELCNN, lr=1e-2)
    x = _batch()
    opts = m.make_optimizers()
    losses = [m.train_step(x, opts, s)["loss"] for s in range(30)]
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("field, value", [("ch", 0), ("num_layers", 0), ("kernel", 4), ("first_kernel", 1),
                                          ("resolution", 12)])
def test_pixelcnn_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        _model("pixelcnn", **{**PIXELCNN, field: value})


# ---- ImageGPT ----------------------------------------------------------------------------------
def test_imagegpt_tokens_are_raster_hwc_and_round_trip():
    x = _batch(n=2)
    p = to_8bit(x)
    tok = pixels_to_tokens(x, 8)                                     # (2, 192)
    assert tok.shape == (2, 192) and tok.max() < 8
    i, j, c = 3, 5, 2
    assert torch.equal(tok[:, (i * 8 + j) * 3 + c], p[:, c, i, j] // 32)
    centre = tokens_to_pixels(tok, 8, 3, 8)
    assert torch.equal(pixels_to_tokens(centre, 8), tok)
    assert ((to_8bit(centre) % 32 - 15.5).abs() == 0.5).all()           # the bin centre, 15.5 rounded
    dith = tokens_to_pixels(tok, 8, 3, 8, torch.rand(tok.shape, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(pixels_to_tokens(dith, 8), tok)
    assert torch.equal(tokens_to_pixels(pixels_to_tokens(x, 256), 256, 3, 8), x)   # 256 levels: lossless


def test_imagegpt_is_causal():
    m = _model("imagegpt", **IMAGEGPT).double()
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, 8, (1, 192), generator=g)
    base = m.logits(tok)
    for k in (0, 1, 50, 191):
        tok2 = tok.clone()
        tok2[:, k:] = torch.randint(0, 8, (1, 192 - k), generator=g)
        tok2[:, k] = (tok[:, k] + 1) % 8
        out = m.logits(tok2)
        assert torch.equal(out[:, :k + 1], base[:, :k + 1])          # outputs <= k read tokens < k only
        if k < 191:
            assert not torch.allclose(out[:, k + 1], base[:, k + 1])   # the next output reads token k


def test_imagegpt_kv_cache_decoding_equals_the_full_forward():
    m = _model("imagegpt", **IMAGEGPT).eval()
    tok = torch.randint(0, 8, (2, 192), generator=torch.Generator().manual_seed(1))
    full = m.logits(tok)
    caches = [{"max_len": 192} for _ in m.blocks]     # buffers written in place, one position a step
    prev = torch.full((2, 1), 8, dtype=torch.long)
    with torch.no_grad():
        for t in range(192):
            assert torch.allclose(m.step_logits(prev, t, caches), full[:, t], atol=1e-5), t
            prev = tok[:, t:t + 1]
        assert all(c["len"] == 192 and c["k"].shape[2] == 192 for c in caches)
        with pytest.raises(ValueError, match="^cache: 193 positions exceed max_len 192"):
            m.step_logits(prev, 191, caches)


@pytest.mark.parametrize("levels", [4, 256])
def test_imagegpt_uniform_tokens_are_exactly_8_bits(levels):
    m = _model("imagegpt", **{**IMAGEGPT, "levels": levels})
    with torch.no_grad():
        m.head.weight.zero_()
        m.head.bias.zero_()
    assert torch.allclose(m.bits_per_dim(_batch()), torch.full((4,), 8.0), atol=1e-5)


def test_imagegpt_bpd_is_token_bits_plus_the_uniform_bin():
    m = _model("imagegpt", **IMAGEGPT)
    x = _batch()
    tok = pixels_to_tokens(x, 8)
    logp = torch.log_softmax(m.logits(tok), -1).gather(2, tok[..., None]).squeeze(2)   # (B, L)
    expected = (-logp.sum(1) / math.log(2) + 192 * math.log2(32)) / 192
    assert torch.allclose(m.bits_per_dim(x), expected, atol=1e-5)


@pytest.mark.parametrize("dither", [False, True])
def test_imagegpt_sample_follows_a_delta_model(dither):
    m = _model("imagegpt", **IMAGEGPT, dither=dither).eval()
    with torch.no_grad():
        m.head.weight.zero_()
        m.head.bias.fill_(-1e4)
        m.head.bias[5] = 0.0
    p = to_8bit(m.sample(2, torch.Generator().manual_seed(0)))
    assert ((p // 32) == 5).all()                                    # every token is 5: values 160..191
    if not dither:
        assert ((p - 160 - 15.5).abs() == 0.5).all()                 # the bin centre, 15.5 rounded
    else:
        assert p.unique().numel() > 4                                # spread inside the bin


def test_imagegpt_loss_falls_on_a_fixed_batch():
    m = _model("imagegpt", **IMAGEGPT, lr=3e-3)
    x = _batch()
    opts = m.make_optimizers()
    losses = [m.train_step(x, opts, s)["loss"] for s in range(30)]
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("field, value", [("levels", 6), ("levels", 512), ("heads", 3), ("width", 0),
                                          ("dither", 1), ("resolution", 24)])
def test_imagegpt_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        _model("imagegpt", **{**IMAGEGPT, field: value})


# ---- VQ-VAE + PixelCNN prior -------------------------------------------------------------------
def test_vqvae_discretized_logistic_is_a_distribution_over_the_256_values():
    g = torch.Generator().manual_seed(0)
    p = torch.arange(256).double()
    x = (p / 127.5 - 1).view(256, 1)                                  # every value, 6 (mean, scale) pairs
    mean = torch.tensor([-1.3, -0.5, 0.0, 0.2, 0.99, 1.5]).double().expand(256, 6)
    log_scale = (torch.rand(6, generator=g).double() * 6 - 6).expand(256, 6)   # scales e^-6 .. 1
    lp = discretized_logistic_log_prob(x.expand(256, 6), mean, log_scale)
    assert torch.allclose(lp.exp().sum(0), torch.ones(6, dtype=torch.float64), atol=1e-9)
    # Golden: the naive difference of sigmoids where it is well conditioned.
    s = log_scale.exp()
    naive = torch.sigmoid((x + 1 / 255 - mean) / s) - torch.sigmoid((x - 1 / 255 - mean) / s)
    naive[0] = torch.sigmoid((x[0] + 1 / 255 - mean[0]) / s[0])
    naive[255] = 1 - torch.sigmoid((x[255] - 1 / 255 - mean[255]) / s[255])
    ok = naive > 1e-6
    assert torch.allclose(lp[ok], naive[ok].log(), atol=1e-8)
    # Far in the tail the stable form stays finite where the naive one is log 0.
    tail = discretized_logistic_log_prob(torch.ones(1), torch.full((1,), -1.0), torch.full((1,), -7.0))
    assert torch.isfinite(tail).all()


def test_vqvae_bound_is_above_the_exact_likelihood_on_a_one_code_grid():
    """8x8 with 3 stride-2 stages: a 1x1 code grid, so p(x) = sum_k p(k) p(x|k) is computable."""
    m = _model("vqvae", **{**VQVAE, "downsample": 3, "codebook_size": 8}).eval()
    with torch.no_grad():
        m.prior.head2.bias.normal_(generator=torch.Generator().manual_seed(0))   # a non-uniform prior
        m.quantizer.codebook.normal_(generator=torch.Generator().manual_seed(1))
    x = _batch()
    K = 8
    codes = torch.arange(K).view(K, 1, 1)
    log_pk = -m.prior_nll(codes)                                          # (K,): the 1x1 prior ignores its input
    assert torch.allclose(log_pk.exp().sum(), torch.tensor(1.0), atol=1e-5)
    zq = m.quantizer.codes_from_indices(codes)                            # (K, code_dim, 1, 1)
    log_px_k = torch.stack([-m.recon_nll(x, zq[k:k + 1].expand(4, -1, -1, -1)) for k in range(K)], 1)  # (B, K)
    exact_bpd = -torch.logsumexp(log_pk[None] + log_px_k, 1) / (192 * math.log(2))
    bound = m.bits_per_dim(x)
    assert (bound >= exact_bpd - 1e-5).all()
    # The bound is exactly the encoder's code's joint term.
    k_star = m.encode(x).view(4)
    joint = -(log_pk[k_star] + log_px_k[torch.arange(4), k_star]) / (192 * math.log(2))
    assert torch.allclose(bound, joint, atol=1e-5)


def test_vqvae_two_phase_schedule():
    m = _model("vqvae", **VQVAE, prior_start=3)
    x = _batch()
    opts = m.make_optimizers()
    assert set(opts) == {"autoencoder", "prior"}
    ae = lambda: [p.detach().clone() for p in [*m.autoencoder_parameters(), m.quantizer.codebook]]   # noqa: E731
    prior = lambda: [p.detach().clone() for p in m.prior.parameters()]      # noqa: E731
    changed = lambda a, b: any(not torch.equal(u, v) for u, v in zip(a, b))   # noqa: E731
    a0, p0 = ae(), prior()
    logs = m.train_step(x, opts, 2)
    assert "recon_bpd" in logs and changed(a0, ae()) and not changed(p0, prior())
    a1, p1 = ae(), prior()
    logs = m.train_step(x, opts, 3)
    assert "prior_loss" in logs and changed(p1, prior()) and not changed(a1, ae())


def test_vqvae_autoencoder_then_prior_losses_fall_on_a_fixed_batch():
    m = _model("vqvae", **VQVAE, prior_start=30, lr=1e-2)
    x = _batch()
    opts = m.make_optimizers()
    logs = [m.train_step(x, opts, s) for s in range(30)]
    mse, recon = [l["mse"] for l in logs], [l["recon_bpd"] for l in logs]
    assert mse[-1] < 0.9 * mse[0], mse
    assert recon[-1] < recon[0] - 0.5, recon          # bits/dim; random pixels start near 9
    prior = [m.train_step(x, opts, 30 + s)["prior_loss"] for s in range(30)]
    assert prior[-1] < 0.9 * prior[0], prior


def test_vqvae_codebook_stays_in_use_with_restarts():
    """EMA codebook with dead-code restarts: on a fixed random batch a tiny run uses several codes."""
    m = _model("vqvae", **VQVAE, dead_code_steps=5, lr=3e-3)
    x = _batch(n=8)
    opts = m.make_optimizers()
    logs = [m.train_step(x, opts, s) for s in range(20)]
    assert logs[-1]["usage"] * 16 >= 4, logs[-1]
    assert any(l["restarted"] > 0 for l in logs)


def test_vqvae_mean_over_ranks_goes_through_sync_grads():
    t = torch.tensor([1.0, 2.0, 6.0])
    assert torch.equal(mean_over_ranks(lambda ps: None)(t), t)     # one process: the identity
    other_rank = torch.tensor([3.0, 0.0, 2.0])
    seen = []

    def two_ranks(params):                                         # what average_gradients does, 2 ranks
        params = list(params)
        seen.append(len(params))
        for p in params:
            p.grad.copy_((p.grad + other_rank) / 2)
    assert torch.equal(mean_over_ranks(two_ranks)(t), torch.tensor([2.0, 1.0, 4.0])) and seen == [1]
    assert torch.equal(t, torch.tensor([1.0, 2.0, 6.0]))           # the input is not modified


def test_vqvae_sample_decodes_the_prior_codes():
    """A prior with all its mass on code 3 samples the decoder's mean of code 3 everywhere."""
    m = _model("vqvae", **VQVAE).eval()
    with torch.no_grad():
        m.prior.head2.weight.zero_()
        m.prior.head2.bias.fill_(-1e4)
        m.prior.head2.bias[3] = 0.0
        s = m.sample(2, torch.Generator().manual_seed(0))
        mean, _ = m.decode(m.quantizer.codes_from_indices(torch.full((2, 2, 2), 3)))
    assert torch.equal(s, mean.clamp(-1, 1))


@pytest.mark.parametrize("field, value", [("prior_start", 0), ("downsample", 4), ("beta", -1.0),
                                          ("codebook_size", 1), ("num_res", -1), ("resolution", 48),
                                          ("dead_code_steps", -1)])
def test_vqvae_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        _model("vqvae", **{**VQVAE, field: value})
