import json
import math

import pytest
import torch

from models.autoencoder import (
    AUTOENCODER_PRESETS,
    AttnBlock,
    AutoencoderConfig,
    AutoencoderKL,
    Decoder,
    DiagonalGaussian,
    Encoder,
    kl_autoencoder_loss,
    load_pretrained,
    save_pretrained,
)
from models.checkpoint import CONFIG_NAME, WEIGHTS_NAME


def tiny_config(**overrides) -> AutoencoderConfig:
    # 8 channels -> GroupNorm with 8 groups (the gcd rule); attention at 8x8 and in the middle.
    kw = dict(resolution=16, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=4)
    return AutoencoderConfig(**{**kw, **overrides})


@pytest.mark.parametrize(
    "ch_mult, f", [((1, 2, 2), 4), ((1, 2, 2, 2), 8)], ids=["f4", "f8"]
)
def test_shapes(ch_mult, f):
    torch.manual_seed(0)
    config = tiny_config(resolution=32, ch_mult=ch_mult, attn_resolutions=())
    assert config.downsample_factor == f
    assert config.latent_shape == (4, 32 // f, 32 // f)
    model = AutoencoderKL(config)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    posterior = model.encode(x)
    assert posterior.mean.shape == (2, *config.latent_shape)
    recon, posterior = model(x)
    assert recon.shape == x.shape
    # Fully convolutional: another size divisible by f works too.
    assert model.decode(model.encode(torch.zeros(1, 3, 2 * f, 3 * f)).mode()).shape == (1, 3, 2 * f, 3 * f)


def test_encode_rejects_bad_size():
    model = AutoencoderKL(tiny_config())
    with pytest.raises(ValueError, match="divisible by 4"):
        model.encode(torch.zeros(1, 3, 18, 16))


def test_diagonal_gaussian():
    params = torch.randn(3, 8, 4, 5)
    post = DiagonalGaussian(params)
    assert post.mean.shape == post.logvar.shape == post.std.shape == (3, 4, 4, 5)
    assert post.sample().shape == (3, 4, 4, 5)
    assert torch.equal(post.mode(), params[:, :4])
    assert post.kl().shape == (3,)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(post.sample(g1), post.sample(g2))
    # Standard normal posterior: KL to N(0, I) is exactly 0.
    assert torch.equal(DiagonalGaussian(torch.zeros(2, 8, 3, 3)).kl(), torch.zeros(2))
    # Clamped as LDM.
    assert DiagonalGaussian(torch.full((1, 2, 1, 1), 100.0)).logvar.item() == 20.0
    # Closed form for one element: mean 1, logvar 0 -> 0.5.
    one = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    assert math.isclose(DiagonalGaussian(one).kl().item(), 0.5)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(ch_mult=()), "ch_mult"),
        (dict(ch_mult=(1, 0)), "ch_mult"),
        (dict(ch=0), "ch"),
        (dict(z_channels=True), "z_channels"),
        (dict(resolution=18), "resolution"),
        (dict(attn_resolutions=(5,)), "attn_resolutions"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(mid_attention=1), "mid_attention"),
    ],
)
def test_config_validation_names_field(overrides, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        tiny_config(**overrides)


def test_config_dict_round_trip():
    config = tiny_config()
    d = config.to_dict()
    assert d["ch_mult"] == [1, 2, 2] and d["attn_resolutions"] == [8]
    assert AutoencoderConfig.from_dict(json.loads(json.dumps(d))) == config
    with pytest.raises(ValueError, match="unknown keys.*bogus"):
        AutoencoderConfig.from_dict({**d, "bogus": 1})


def test_presets_build():
    for name, factory in AUTOENCODER_PRESETS.items():
        assert isinstance(factory(), AutoencoderConfig), name
    assert AUTOENCODER_PRESETS["small-f8"](resolution=256).resolution == 256
    assert AUTOENCODER_PRESETS["small-f8"]().downsample_factor == 8


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = AutoencoderKL(tiny_config()).eval()
    extra = {"step": 7, "scale_factor": 0.5}
    save_pretrained(model, tmp_path / "ae", extra=extra)
    assert {p.name for p in (tmp_path / "ae").iterdir()} == {WEIGHTS_NAME, CONFIG_NAME}
    loaded, loaded_extra = load_pretrained(tmp_path / "ae")
    assert loaded_extra == extra
    assert loaded.config == model.config
    assert not loaded.training
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x, sample_posterior=False)[0], model(x, sample_posterior=False)[0])


def test_save_refuses_non_json_extra(tmp_path):
    with pytest.raises(TypeError):
        save_pretrained(AutoencoderKL(tiny_config()), tmp_path / "ae", extra={"t": torch.zeros(1)})
    assert not (tmp_path / "ae" / WEIGHTS_NAME).exists()


def test_loss_terms():
    x = torch.zeros(2, 3, 4, 4)
    recon = torch.full_like(x, 0.5)
    post = DiagonalGaussian(torch.cat([torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)], dim=1))
    loss, logs = kl_autoencoder_loss(x, recon, post, kl_weight=0.1)
    # KL per sample = 4 latents * 0.5 = 2 nats, per input element 2 / 48.
    assert logs["rec_loss"] == pytest.approx(0.5)
    assert logs["kl_loss"] == pytest.approx(2 / 48)
    assert loss.item() == pytest.approx(0.5 + 0.1 * 2 / 48)
    assert logs["loss"] == pytest.approx(loss.item())


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = AutoencoderKL(tiny_config(ch=16, attn_resolutions=()))
    # Smooth images (sums of low-frequency sinusoids) so a 4x4x4 latent can hold them.
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 16), torch.linspace(0, 1, 16), indexing="ij")
    phase = torch.rand(4, 3, 2, 1, 1) * 6.28
    x = 0.8 * torch.sin(2 * math.pi * xx + phase[:, :, 0]) * torch.cos(math.pi * yy + phase[:, :, 1])  # (4, 3, 16, 16)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        recon, posterior = model(x, generator=gen)
        loss, logs = kl_autoencoder_loss(x, recon, posterior, kl_weight=1e-6)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(logs["loss"])
    assert losses[-1] < 0.5 * losses[0], losses


def test_l2_weight_adds_mse():
    torch.manual_seed(0)
    x, r = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    post = DiagonalGaussian(torch.zeros(2, 8, 2, 2))
    base, _ = kl_autoencoder_loss(x, r, post, 0.0)
    with_l2, logs = kl_autoencoder_loss(x, r, post, 0.0, l2_weight=3.0)
    torch.testing.assert_close(with_l2, base + 3.0 * ((x - r) ** 2).mean())
    with pytest.raises(ValueError, match="l2_weight"):
        kl_autoencoder_loss(x, r, post, 0.0, l2_weight=-1.0)


def test_new_config_fields_validated_and_defaulted():
    with pytest.raises(ValueError, match="^norm_num_groups:"):
        tiny_config(norm_num_groups=0)
    with pytest.raises(ValueError, match="^double_z:"):
        tiny_config(double_z=1)
    # A config.json written before these fields existed still loads, with LDM's values.
    old = {k: v for k, v in tiny_config().to_dict().items() if k not in ("norm_num_groups", "double_z")}
    config = AutoencoderConfig.from_dict(old)
    assert config.norm_num_groups == 32 and config.double_z


def test_architecture_layout():
    config = tiny_config(ch=32, ch_mult=(1, 2), resolution=16, attn_resolutions=(8,), num_res_blocks=2)
    model = AutoencoderKL(config)
    attn = [name for name, m in model.named_modules() if isinstance(m, AttnBlock)]
    # Encoder: 2 blocks at the 8x8 level; decoder: 3 (num_res_blocks + 1); one per mid block.
    assert sorted(attn) == sorted(
        ["encoder.levels.1.attns.0", "encoder.levels.1.attns.1", "encoder.mid.attn_1"]
        + ["decoder.levels.0.attns.0", "decoder.levels.0.attns.1", "decoder.levels.0.attns.2", "decoder.mid.attn_1"]
    )
    assert [len(level.blocks) for level in model.decoder.levels] == [3, 3]
    # Every norm: LDM's eps, norm_num_groups groups where it divides the width (32, 64).
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 and m.eps == 1e-6 for m in norms)
    assert {m.num_groups for m in AutoencoderKL(tiny_config(norm_num_groups=4)).modules()
            if isinstance(m, torch.nn.GroupNorm)} == {4}
    # The adaptive GAN weight reads the decoder's last conv.
    assert isinstance(model.decoder.conv_out, torch.nn.Conv2d) and model.decoder.conv_out.out_channels == 3
    # Downsampling halves exactly with LDM's asymmetric pad: 16 -> 8.
    assert model.encoder.levels[0].resample(torch.zeros(1, 32, 16, 16)).shape == (1, 32, 8, 8)


def test_double_z_false_is_the_vq_encoder():
    config = tiny_config(double_z=False)
    assert Encoder(config)(torch.zeros(1, 3, 16, 16)).shape == (1, 4, 4, 4)
    assert Decoder(config)(torch.zeros(1, 4, 4, 4)).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="^double_z:"):
        AutoencoderKL(config)


def test_load_pretrained_rejects_weights_of_another_architecture(tmp_path):
    save_pretrained(AutoencoderKL(tiny_config()), tmp_path / "ae")
    # config.json edited (or copied from another run): the weights no longer fit.
    config_path = tmp_path / "ae" / CONFIG_NAME
    saved = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**saved, "num_res_blocks": 2}))
    with pytest.raises(ValueError, match=r"missing keys \(e\.g\. encoder\.levels\.0\.blocks\.1\."):
        load_pretrained(tmp_path / "ae")
    config_path.write_text(json.dumps({**saved, "ch": 16}))
    with pytest.raises(ValueError, match=r"shape mismatches \(e\.g\. encoder\.conv_in\.weight: weights \(8, 3, 3, 3\), "
                                         r"model \(16, 3, 3, 3\)"):
        load_pretrained(tmp_path / "ae")
    config_path.write_text(json.dumps({**saved, "attn_resolutions": []}))
    with pytest.raises(ValueError, match=r"unexpected keys \(e\.g\. decoder\.levels\.1\.attns\.0\."):
        load_pretrained(tmp_path / "ae")
