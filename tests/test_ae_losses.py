import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.autoencoder import DiagonalGaussian
from models.losses import (
    ActNorm,
    AutoencoderLoss,
    AutoencoderLossConfig,
    NLayerDiscriminator,
    calculate_adaptive_weight,
    hinge_d_loss,
    vanilla_d_loss,
)
from models.perceptual import (
    EFFICIENTNET_LITE0_SHA256_PREFIX,
    EFFICIENTNET_TAP_CHANNELS,
    PerceptualLoss,
    efficientnet_lite0_weights_path,
    load_efficientnet_lite0,
)


# --- discriminator and GAN losses ------------------------------------------------------------


def test_hinge_and_vanilla_on_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # hinge: relu(1 - real) = [0, 0.5, 2] -> mean 2.5/3; relu(1 + fake) = [0, 1, 2] -> mean 1.
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 1.0))
    sp = lambda v: torch.log1p(torch.exp(torch.tensor(v))).item()  # noqa: E731
    expected = 0.5 * ((sp(-2.0) + sp(-0.5) + sp(1.0)) / 3 + (sp(-2.0) + sp(0.0) + sp(1.0)) / 3)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)
    # A perfect discriminator (margins beyond 1) has zero hinge loss.
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0


@pytest.mark.parametrize("norm", ["batch", "act", "group"])
def test_patchgan_shapes(norm):
    d = NLayerDiscriminator(3, ndf=8, n_layers=3, norm=norm)
    # 3 stride-2 convs then two stride-1 4x4 convs: 64 -> 32 -> 16 -> 8 -> 7 -> 6.
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    with pytest.raises(ValueError, match="^norm:"):
        NLayerDiscriminator(norm="instance")


def test_actnorm_initialises_from_first_batch():
    torch.manual_seed(0)
    an = ActNorm(3).train()
    x = torch.randn(8, 3, 5, 5) * torch.tensor([1.0, 4.0, 0.1]).view(1, 3, 1, 1) + 2.0
    y = an(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4)
    scale = an.scale.clone()
    an(x * 10)  # initialised once
    assert torch.equal(an.scale, scale)


# --- the autoencoder objective ---------------------------------------------------------------


class MeanAbsPerceptual(nn.Module):
    """Stand-in perceptual distance (B,): cheap and known."""

    def forward(self, x, y):
        return (x - y).abs().mean(dim=(1, 2, 3)) * 3.0


class ToyDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(2, 4, 3, padding=1)
        self.conv_out = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, z):
        return self.conv_out(F.silu(self.conv_in(z)))


def _loss(**kw):
    defaults = dict(perceptual_weight=0.5, disc_ndf=8, disc_num_layers=2, disc_start=10, disc_weight=0.7)
    return AutoencoderLoss(AutoencoderLossConfig(**{**defaults, **kw}), perceptual=MeanAbsPerceptual())


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(family="vae"), "family"),
        (dict(rec_loss="l3"), "rec_loss"),
        (dict(disc_loss="wgan"), "disc_loss"),
        (dict(disc_norm="layer"), "disc_norm"),
        (dict(kl_weight=-1.0), "kl_weight"),
        (dict(perceptual_weight=float("nan")), "perceptual_weight"),
        (dict(disc_start=-1), "disc_start"),
        (dict(learn_logvar=1), "learn_logvar"),
        (dict(logvar_init="0"), "logvar_init"),
    ],
)
def test_loss_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        AutoencoderLossConfig(**overrides)


def test_adaptive_weight_matches_hand_computation():
    torch.manual_seed(0)
    dec = ToyDecoder()
    disc = NLayerDiscriminator(3, ndf=4, n_layers=1, norm="group")
    recon = dec(torch.randn(2, 2, 16, 16))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    nll = (x - recon).abs().mean()
    g = -disc(recon).mean()
    w = dec.conv_out.weight
    gn = torch.autograd.grad(nll, w, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, w, retain_graph=True)[0].norm()
    expected = (gn / (gg + 1e-4)).clamp(0, 1e4) * 0.7
    got = calculate_adaptive_weight(nll, g, w, 0.7)
    assert torch.allclose(got, expected) and not got.requires_grad
    # The clamp: an adversarial loss with no gradient at the last layer and a large nll gradient
    # (norm ~ 76, / 1e-4) hit the 1e4 ceiling.
    flat = (recon * 0).sum()
    assert gn.item() * 1e3 / 1e-4 > 1e4
    assert calculate_adaptive_weight(nll * 1e3, flat, w, 1.0).item() == pytest.approx(1e4)


def test_generator_loss_kl_family_by_hand_and_adversarial_term():
    torch.manual_seed(0)
    loss_fn = _loss(family="kl", kl_weight=1e-3, logvar_init=0.3)
    dec = ToyDecoder()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    post = DiagonalGaussian(torch.randn(2, 4, 16, 16))
    recon = dec(post.sample())
    # Before disc_start: no adversarial term, and nothing runs through the discriminator.
    loss, logs = loss_fn.generator_loss(x, recon, step=9, last_layer=dec.conv_out.weight, posterior=post)
    rec = (x - recon).abs() + 0.5 * MeanAbsPerceptual()(x, recon).view(-1, 1, 1, 1)
    lv = torch.tensor(0.3)
    nll = (rec / lv.exp() + lv).mean()
    kl = post.kl().mean() / x[0].numel()
    assert torch.allclose(loss, nll + 1e-3 * kl)
    assert logs["g_loss"].item() == 0.0 and logs["d_weight"].item() == 0.0 and logs["disc_factor"].item() == 0.0
    loss.backward()
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())
    assert loss_fn.generator_parameters() == []  # logvar not learned by default (as LDM in practice)
    # From disc_start on: + d_weight * g_loss with LDM's adaptive weight.
    recon = dec(post.sample())
    loss, logs = loss_fn.generator_loss(x, recon, step=10, last_layer=dec.conv_out.weight, posterior=post)
    rec = (x - recon).abs() + 0.5 * MeanAbsPerceptual()(x, recon).view(-1, 1, 1, 1)
    nll = (rec / lv.exp() + lv).mean()
    g = -loss_fn.discriminator(recon).mean()
    dw = calculate_adaptive_weight(nll, g, dec.conv_out.weight, 0.7)
    assert torch.allclose(loss, nll + 1e-3 * kl + dw * g, atol=1e-6)
    assert logs["d_weight"].item() == pytest.approx(dw.item(), rel=1e-5)
    assert logs["g_loss"].item() == pytest.approx(g.item(), rel=1e-5)
    with pytest.raises(ValueError, match="^last_layer:"):
        loss_fn.generator_loss(x, recon, step=10, posterior=post)
    # Validation (no grad): no gradient to balance, LDM's d_weight = 0.
    with torch.no_grad():
        _, logs = loss_fn.generator_loss(x, recon, step=10, last_layer=dec.conv_out.weight, posterior=post)
    assert logs["d_weight"].item() == 0.0


def test_generator_loss_vq_family_and_l2_and_learned_logvar():
    loss_fn = _loss(family="vq", rec_loss="l2", codebook_weight=2.0, perceptual_weight=0.0, learn_logvar=True)
    assert loss_fn.perceptual is None and loss_fn.generator_parameters() == [loss_fn.logvar]
    x, recon = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5)
    loss, logs = loss_fn.generator_loss(x, recon, step=0, codebook_loss=torch.tensor(0.1))
    assert loss.item() == pytest.approx(0.25 + 2.0 * 0.1)
    assert set(logs) >= {"codebook_loss", "nll_loss", "rec_loss", "p_loss", "total_loss", "logvar"}
    loss.backward()
    assert loss_fn.logvar.grad.item() == pytest.approx(1 - 0.25)  # d/dlv (r e^-lv + lv) at lv = 0
    with pytest.raises(ValueError, match="^codebook_loss:"):
        loss_fn.generator_loss(x, recon, step=0)


def test_discriminator_loss_vanishes_before_start_and_trains_after():
    torch.manual_seed(0)
    loss_fn = _loss(disc_loss="vanilla")
    x, recon = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16, requires_grad=True)
    assert not loss_fn.discriminator_active(9) and loss_fn.discriminator_active(10)
    loss, logs = loss_fn.discriminator_loss(x, recon, step=9)
    assert loss.item() == 0.0 and logs["disc_loss"].item() == 0.0
    loss.backward()  # still a graph: a stage may call backward unconditionally
    assert all(p.grad is None or not p.grad.any() for p in loss_fn.discriminator_parameters())
    loss, logs = loss_fn(x, recon, optimizer_idx=1, step=10)
    real, fake = loss_fn.discriminator(x), loss_fn.discriminator(recon.detach())
    assert loss.item() == pytest.approx(vanilla_d_loss(real, fake).item(), rel=1e-5)
    loss.backward()
    assert recon.grad is None  # the reconstruction is detached for the discriminator step
    assert any(p.grad.abs().sum() > 0 for p in loss_fn.discriminator_parameters())
    with pytest.raises(ValueError, match="^optimizer_idx:"):
        loss_fn(x, recon, optimizer_idx=2, step=0)


# --- perceptual loss on EfficientNet-Lite0 ---------------------------------------------------


@pytest.fixture(scope="module")
def perceptual():
    return PerceptualLoss()


def _smooth_image(n=32):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, n), torch.linspace(0, 1, n), indexing="ij")
    disc = ((xx - 0.5) ** 2 + (yy - 0.4) ** 2 < 0.08).float()
    return torch.stack([torch.sin(6 * xx + 1) * 0.6, torch.cos(5 * yy) * 0.6, disc - 0.5])[None]


def test_perceptual_zero_for_identical_and_ordered_by_distortion(perceptual):
    torch.manual_seed(0)
    x = _smooth_image()
    blur = F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    noise = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1)
    shift = torch.roll(x, 1, dims=3)
    d = {k: perceptual(x, y).item() for k, y in
         {"same": x, "blur": blur, "noise": noise, "shift": shift}.items()}
    assert d["same"] == 0.0
    assert 0 < d["shift"] < d["blur"] < d["noise"], d
    # Symmetric, batched per image.
    both = perceptual(torch.cat([x, x]), torch.cat([blur, noise]))
    assert both.shape == (2,) and torch.allclose(both, torch.tensor([d["blur"], d["noise"]]), rtol=1e-4)
    assert perceptual(blur, x).item() == pytest.approx(d["blur"], rel=1e-4)


def test_perceptual_is_differentiable_and_frozen(perceptual):
    x = _smooth_image()
    y = (x + 0.1).requires_grad_(True)
    perceptual(x, y).sum().backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in perceptual.parameters())
    perceptual.train()  # the frozen backbone stays in eval mode (BatchNorm, drop-connect)
    assert perceptual.training and not perceptual.taps.net.training
    assert all(not m.training for m in perceptual.taps.net.modules())


def test_backbone_is_the_pretrained_file(perceptual):
    path = efficientnet_lite0_weights_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith(EFFICIENTNET_LITE0_SHA256_PREFIX)
    state = torch.load(path, map_location="cpu", weights_only=True)
    mine = perceptual.taps.net.state_dict()
    assert state.keys() == mine.keys()
    assert all(torch.equal(state[k], mine[k]) for k in state)


def test_backbone_classifies_a_photo():
    # An ImageNet-trained net calls Grace Hopper's portrait "military uniform" (class 652), the
    # classic TF example; a randomly initialised one would not.
    cbook = pytest.importorskip("matplotlib.cbook")
    from PIL import Image

    img = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((224, 224), Image.BICUBIC)
    x = torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1)[None] / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    net = load_efficientnet_lite0(check_hash=True)
    with torch.no_grad():
        probs = net((x - mean) / std).softmax(-1)[0]
    assert probs.argmax().item() == 652 and probs[652] > 0.3


def test_lin_weights_file_is_used_and_checked(tmp_path):
    torch.manual_seed(0)
    weights = [torch.rand(1, c, 1, 1) for c in EFFICIENTNET_TAP_CHANNELS]
    path = tmp_path / "lin.pth"
    torch.save({f"lin{l}.model.1.weight": w for l, w in enumerate(weights)}, path)
    uniform, weighted = PerceptualLoss(), PerceptualLoss(lin_weights=path)
    assert weighted.calibrated and not uniform.calibrated
    x = _smooth_image()
    y = x + 0.1 * torch.randn_like(x)
    # By hand from the taps: unit-normalise, weight, sum over channels, mean over space, sum over taps.
    feats = uniform.taps(torch.cat([x, y]))
    expected = sum(
        ((fx / (fx.norm(dim=1, keepdim=True) + 1e-10) - fy / (fy.norm(dim=1, keepdim=True) + 1e-10)) ** 2 * w)
        .sum(1).mean()
        for (fx, fy), w in zip((f.chunk(2) for f in feats), weights)
    )
    assert weighted(x, y).item() == pytest.approx(expected.item(), rel=1e-5)
    torch.save({f"lin{l}.model.1.weight": -w for l, w in enumerate(weights)}, path)
    with pytest.raises(ValueError, match="negative"):
        PerceptualLoss(lin_weights=path)
    torch.save({"lin0.model.1.weight": torch.rand(1, 64, 1, 1)}, path)  # VGG's first tap
    with pytest.raises(ValueError, match="^lin_weights:"):
        PerceptualLoss(lin_weights=path)


def test_vgg_path_needs_user_files():
    with pytest.raises(NotImplementedError, match="vgg16"):
        PerceptualLoss("vgg16")
    with pytest.raises(NotImplementedError, match="backbone_weights"):
        PerceptualLoss("vgg16", lin_weights="vgg.pth")
    with pytest.raises(ValueError, match="^backbone:"):
        PerceptualLoss("alexnet")


def test_efficientnet_taps_and_their_gradient_equal_the_plain_nchw_net():
    """The perceptual taps run NHWC for speed; taps and input gradient are the NCHW net's."""
    from models.perceptual import IMAGENET_MEAN, IMAGENET_STD, EFFICIENTNET_TAP_BLOCKS, EfficientNetLite0Taps
    taps = EfficientNetLite0Taps()
    plain = load_efficientnet_lite0()
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (_smooth_image() * 0.9).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    got = taps(x)
    h = plain._swish(plain._bn0(plain._conv_stem(((x_ref + 1) / 2 - mean) / std)))
    want = [h]
    for i, block in enumerate(plain._blocks[: max(b for b in EFFICIENTNET_TAP_BLOCKS if b is not None) + 1]):
        h = block(h)
        if i in EFFICIENTNET_TAP_BLOCKS:
            want.append(h)
    assert len(got) == len(want) == len(taps.channels)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    sum(g.square().mean() for g in got).backward()
    sum(w.square().mean() for w in want).backward()
    scale = x_ref.grad.abs().max().item()   # summation order differs between the layouts
    torch.testing.assert_close(x.grad, x_ref.grad, atol=5e-5 * scale, rtol=0)
