"""Our AutoencoderKL equals diffusers' AutoencoderKL once weights are mapped, both ways."""

import diffusers
import pytest
import torch

from models.autoencoder import AutoencoderConfig, AutoencoderKL, load_pretrained, load_state_checked, save_pretrained
from models.autoencoder_vq import AutoencoderVQ, AutoencoderVQConfig
from models.interop.diffusers_autoencoder import (
    autoencoder_config_from_diffusers,
    autoencoder_kl_from_diffusers,
    autoencoder_kl_state_dict_from_diffusers,
    autoencoder_kl_state_dict_to_diffusers,
    autoencoder_kl_to_diffusers,
    autoencoder_vq_config_from_diffusers,
    autoencoder_vq_from_diffusers,
    autoencoder_vq_state_dict_from_diffusers,
    autoencoder_vq_to_diffusers,
    diffusers_autoencoder_kl_kwargs,
    diffusers_vq_model_kwargs,
    scale_factor_from_diffusers,
)
from models.quantize import QuantizerConfig

# Two tiny LDM layouts: f = 2 with one block per level, f = 4 with two.
CONFIGS = {
    "f2-1block": dict(resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4),
    "f4-2blocks": dict(resolution=16, ch=32, ch_mult=(1, 2, 4), num_res_blocks=2, z_channels=3),
}
ATOL = RTOL = 1e-4


def randomise_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter redrawn (norm scales and biases too, so a mis-mapped one shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:  # conv / linear weight: unit-variance outputs, fan_in = p[0].numel()
                p.copy_(noise / p[0].numel() ** 0.5)
            else:  # biases, GroupNorm affine: around 1 with spread, so scale and shift both matter
                p.copy_(1.0 + 0.3 * noise)
    return module.eval()


def assert_same_outputs(ours: AutoencoderKL, theirs: diffusers.AutoencoderKL, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    z = torch.randn(2, ours.config.z_channels, 16 // ours.config.downsample_factor,
                    16 // ours.config.downsample_factor, generator=g)
    with torch.no_grad():
        post, dpost = ours.encode(x), theirs.encode(x).latent_dist
        torch.testing.assert_close(post.mean, dpost.mean, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(post.logvar, dpost.logvar, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, atol=ATOL, rtol=RTOL)
    # Not a trivial match: the posterior is far from zero and varies.
    assert post.mean.std() > 0.1 and post.logvar.std() > 0.1


def assert_state_dicts_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", CONFIGS)
def test_ours_to_diffusers_same_outputs(name):
    ours = randomise_(AutoencoderKL(AutoencoderConfig(**CONFIGS[name])), seed=1)
    theirs = autoencoder_kl_to_diffusers(ours, scale_factor=0.5)
    assert not theirs.training
    assert theirs.config.layers_per_block == ours.config.num_res_blocks
    assert tuple(theirs.config.block_out_channels) == ours.config.widths
    assert_same_outputs(ours, theirs)
    # Round trip: the same tensors under the same names.
    back = autoencoder_kl_from_diffusers(theirs)
    assert back.config == ours.config
    assert_state_dicts_equal(back.state_dict(), ours.state_dict())


@pytest.mark.parametrize("name", CONFIGS)
def test_diffusers_to_ours_same_outputs(name):
    kwargs = diffusers_autoencoder_kl_kwargs(AutoencoderConfig(**CONFIGS[name]), scale_factor=0.25)
    theirs = randomise_(diffusers.AutoencoderKL(**kwargs), seed=2)
    ours = autoencoder_kl_from_diffusers(theirs)
    assert not ours.training
    assert_same_outputs(ours, theirs)
    assert_state_dicts_equal(autoencoder_kl_to_diffusers(ours).state_dict(), theirs.state_dict())
    # The pure mappers alone are inverse to each other as well.
    state = theirs.state_dict()
    assert_state_dicts_equal(autoencoder_kl_state_dict_to_diffusers(autoencoder_kl_state_dict_from_diffusers(state)),
                             state)


def test_kwargs_golden():
    config = AutoencoderConfig(**CONFIGS["f4-2blocks"], mid_attention=False)
    assert diffusers_autoencoder_kl_kwargs(config, scale_factor=0.3) == dict(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 128), layers_per_block=2, act_fn="silu", latent_channels=3,
        norm_num_groups=32, sample_size=16, scaling_factor=0.3,
        use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=False,
    )


def test_state_dict_mapping_names_and_shapes():
    ours = AutoencoderKL(AutoencoderConfig(**CONFIGS["f2-1block"]))
    state = ours.state_dict()
    mapped = autoencoder_kl_state_dict_to_diffusers(state)
    qkv = state["encoder.mid.attn_1.qkv.weight"]  # (3C, C, 1, 1), C = 64
    assert qkv.shape == (192, 64, 1, 1)
    for i, part in enumerate("qkv"):
        torch.testing.assert_close(mapped[f"encoder.mid_block.attentions.0.to_{part}.weight"],
                                   qkv[64 * i: 64 * (i + 1), :, 0, 0], rtol=0, atol=0)
    assert mapped["decoder.mid_block.attentions.0.to_out.0.weight"].shape == (64, 64)
    assert torch.equal(mapped["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"],
                       state["encoder.levels.1.blocks.0.shortcut.weight"])
    assert torch.equal(mapped["decoder.up_blocks.0.upsamplers.0.conv.bias"],
                       state["decoder.levels.0.resample.conv.bias"])
    assert torch.equal(mapped["encoder.down_blocks.0.downsamplers.0.conv.weight"],
                       state["encoder.levels.0.resample.conv.weight"])
    assert set(mapped) == set(diffusers.AutoencoderKL(**diffusers_autoencoder_kl_kwargs(ours.config)).state_dict())


def test_scale_factor_through_our_checkpoint(tmp_path):
    theirs = randomise_(diffusers.AutoencoderKL(
        **diffusers_autoencoder_kl_kwargs(AutoencoderConfig(**CONFIGS["f2-1block"]), scale_factor=0.18)), seed=3)
    assert scale_factor_from_diffusers(theirs) == pytest.approx(0.18)
    save_pretrained(autoencoder_kl_from_diffusers(theirs), tmp_path / "ae",
                    extra={"scale_factor": scale_factor_from_diffusers(theirs)})
    ours, extra = load_pretrained(tmp_path / "ae")
    assert extra["scale_factor"] == pytest.approx(0.18)
    again = autoencoder_kl_to_diffusers(ours, scale_factor=extra["scale_factor"])
    assert again.config.scaling_factor == pytest.approx(0.18)
    assert_state_dicts_equal(again.state_dict(), theirs.state_dict())
    with pytest.raises(ValueError, match="^scale_factor:"):
        autoencoder_kl_to_diffusers(ours, scale_factor=0.0)


def test_diffusers_without_quant_convs_maps_to_identity():
    kwargs = diffusers_autoencoder_kl_kwargs(AutoencoderConfig(**CONFIGS["f2-1block"]))
    theirs = randomise_(diffusers.AutoencoderKL(**{**kwargs, "use_quant_conv": False, "use_post_quant_conv": False}),
                        seed=4)
    ours = autoencoder_kl_from_diffusers(theirs)
    assert torch.equal(ours.quant_conv.weight[:, :, 0, 0], torch.eye(8))
    assert_same_outputs(ours, theirs)


def test_narrow_widths_with_norm_num_groups():
    # ch 8 with norm_num_groups 8: every norm has 8 groups on both sides.
    config = AutoencoderConfig(resolution=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_num_groups=8)
    ours = randomise_(AutoencoderKL(config), seed=5)
    theirs = autoencoder_kl_to_diffusers(ours)
    assert theirs.config.norm_num_groups == 8
    assert_same_outputs(ours, theirs)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(attn_resolutions=(8,)), "attn_resolutions"),
        (dict(ch_mult=(2, 4)), "ch_mult"),
        (dict(dropout=0.1), "dropout"),
        # ch 16: widths 16 and 32 get 16 and 32 groups here; diffusers has one count.
        (dict(ch=16), "norm_num_groups"),
        (dict(double_z=False), "double_z"),
    ],
)
def test_unrepresentable_config_names_field(overrides, field):
    config = AutoencoderConfig(**{**CONFIGS["f2-1block"], **overrides})
    with pytest.raises(ValueError, match=f"^{field}:"):
        diffusers_autoencoder_kl_kwargs(config)


def test_level_attention_weights_refused_by_mapper():
    state = AutoencoderKL(AutoencoderConfig(**{**CONFIGS["f2-1block"], "attn_resolutions": (8,)})).state_dict()
    with pytest.raises(ValueError, match="^attn_resolutions:.*encoder.levels.1.attns.0"):
        autoencoder_kl_state_dict_to_diffusers(state)


BASE_DIFFUSERS = diffusers_autoencoder_kl_kwargs(AutoencoderConfig(**CONFIGS["f2-1block"]))


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D")), "down_block_types"),
        (dict(up_block_types=("UpDecoderBlock2D",)), "up_block_types"),
        (dict(act_fn="gelu"), "act_fn"),
        (dict(block_out_channels=(32, 48)), "block_out_channels"),
        (dict(norm_num_groups=24), "norm_num_groups"),
        (dict(out_channels=1), "out_channels"),
        (dict(sample_size=15), "sample_size"),
        (dict(sample_size=[16, 32]), "sample_size"),
        (dict(shift_factor=0.1), "shift_factor"),
        (dict(latents_mean=[0.0] * 4), "latents_mean"),
        (dict(some_new_setting=1), "diffusers config"),
    ],
)
def test_unrepresentable_diffusers_config_names_setting(overrides, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        autoencoder_config_from_diffusers({**BASE_DIFFUSERS, **overrides})


def test_diffusers_model_with_another_block_layout_is_refused():
    # A real model whose encoder has attention in its first level: the network itself differs.
    kwargs = {**BASE_DIFFUSERS, "down_block_types": ("AttnDownEncoderBlock2D", "DownEncoderBlock2D")}
    theirs = diffusers.AutoencoderKL(**kwargs)
    with pytest.raises(ValueError, match="^down_block_types:.*AttnDownEncoderBlock2D"):
        autoencoder_kl_from_diffusers(theirs)
    # Its state dict, mapped by the pure function alone, names the key it cannot place.
    with pytest.raises(ValueError, match="encoder.down_blocks.0.attentions.0"):
        autoencoder_kl_state_dict_from_diffusers(theirs.state_dict())


def test_weights_of_another_architecture_name_the_mismatch():
    theirs = diffusers.AutoencoderKL(**{**BASE_DIFFUSERS, "layers_per_block": 2})
    state = autoencoder_kl_state_dict_from_diffusers(theirs.state_dict())
    ours = AutoencoderKL(AutoencoderConfig(**CONFIGS["f2-1block"]))  # num_res_blocks 1
    with pytest.raises(ValueError, match=r"unexpected keys \(e\.g\. encoder\.levels\.0\.blocks\.1\."):
        load_state_checked(ours, state, "AutoencoderKL")


# --------------------------------------------------------------------------- VQModel

def vq_config(name: str, **quantizer) -> AutoencoderVQConfig:
    # LDM's VQ layout: the encoder emits z_channels (double_z=False); codes of width 3.
    return AutoencoderVQConfig(AutoencoderConfig(**CONFIGS[name], double_z=False),
                               QuantizerConfig(**{"codebook_size": 16, "code_dim": 3, **quantizer}))


def assert_same_vq_outputs(ours: AutoencoderVQ, theirs: diffusers.VQModel, seed: int = 0) -> None:
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.no_grad():
        h = ours.encode(x)  # (B, code_dim, h, w), pre-quantisation
        torch.testing.assert_close(h, theirs.encode(x).latents, atol=ATOL, rtol=RTOL)
        # The same codes are picked (both nearest in Euclidean distance)...
        idx = ours.quantize(h, update=False).indices.flatten()
        _, _, (_, _, their_idx) = theirs.quantize(h)
        assert torch.equal(idx, their_idx.flatten()) and idx.unique().numel() > 1
        # ...and both decoders agree with and without the codebook.
        torch.testing.assert_close(ours.decode(h), theirs.decode(h).sample, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(ours.decode(h, quantize=False), theirs.decode(h, force_not_quantize=True).sample,
                                   atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", CONFIGS)
def test_vq_both_ways_same_outputs(name):
    ours = randomise_(AutoencoderVQ(vq_config(name)), seed=6)
    theirs = autoencoder_vq_to_diffusers(ours, scale_factor=0.4)
    assert theirs.config.num_vq_embeddings == 16 and theirs.config.vq_embed_dim == 3
    assert scale_factor_from_diffusers(theirs) == pytest.approx(0.4)
    assert_same_vq_outputs(ours, theirs)
    back = autoencoder_vq_from_diffusers(theirs)
    assert back.config == ours.config
    assert_state_dicts_equal(back.state_dict(), ours.state_dict())

    theirs = randomise_(diffusers.VQModel(**diffusers_vq_model_kwargs(vq_config(name))), seed=7)
    ours = autoencoder_vq_from_diffusers(theirs)
    assert_same_vq_outputs(ours, theirs, seed=1)
    assert_state_dicts_equal(autoencoder_vq_to_diffusers(ours).state_dict(), theirs.state_dict())


def test_vq_default_embed_dim_and_training_state():
    kwargs = {**diffusers_vq_model_kwargs(vq_config("f2-1block")), "vq_embed_dim": None}
    config = autoencoder_vq_config_from_diffusers(kwargs)
    assert config.quantizer.code_dim == config.autoencoder.z_channels == 4  # None -> latent_channels
    # EMA statistics and the dead-code clock are ours alone: dropped on export.
    ours = AutoencoderVQ(vq_config("f2-1block", ema=True))
    theirs = autoencoder_vq_to_diffusers(ours)
    assert torch.equal(theirs.quantize.embedding.weight, ours.quantize.codebook)
    assert not any(k.startswith("quantize.") and k != "quantize.codebook"
                   for k in autoencoder_vq_state_dict_from_diffusers(theirs.state_dict()))


@pytest.mark.parametrize(
    "config, field",
    [
        (AutoencoderVQConfig(AutoencoderConfig(**CONFIGS["f2-1block"]), QuantizerConfig(code_dim=3)), "double_z"),
        (vq_config("f2-1block", l2_normalize=True), "l2_normalize"),
        (AutoencoderVQConfig(AutoencoderConfig(**CONFIGS["f2-1block"], attn_resolutions=(8,), double_z=False)),
         "attn_resolutions"),
    ],
)
def test_vq_unrepresentable_config_names_field(config, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        diffusers_vq_model_kwargs(config)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(norm_type="spatial"), "norm_type"),
        (dict(lookup_from_codebook=True), "lookup_from_codebook"),
        (dict(down_block_types=("AttnDownEncoderBlock2D", "DownEncoderBlock2D")), "down_block_types"),
        (dict(shift_factor=0.0), "diffusers config"),  # an AutoencoderKL key: not a VQModel config
    ],
)
def test_vq_unrepresentable_diffusers_config_names_setting(overrides, field):
    base = diffusers_vq_model_kwargs(vq_config("f2-1block"))
    with pytest.raises(ValueError, match=f"^{field}:"):
        autoencoder_vq_config_from_diffusers({**base, **overrides})


# --------------------------------------------------------------------------- starting a stage from saved weights

def test_init_weights_from_a_diffusers_directory_kl(tmp_path):
    """A diffusers `save_pretrained` directory (safetensors, no quant convs) starts our model: same
    outputs as the diffusers model, its scaling_factor reported; diffusers is not needed to read it."""
    from models.autoencoders import load_init_weights
    kwargs = {**diffusers_autoencoder_kl_kwargs(AutoencoderConfig(**CONFIGS["f4-2blocks"]), scale_factor=0.3),
              "use_quant_conv": False}
    theirs = randomise_(diffusers.AutoencoderKL(**kwargs), seed=7)
    theirs.save_pretrained(tmp_path / "vae")
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    ours = AutoencoderKL(AutoencoderConfig(**CONFIGS["f4-2blocks"], dropout=0.1))   # dropout is not a weight
    info = load_init_weights(ours, "kl", tmp_path / "vae")
    assert info == {"format": "diffusers AutoencoderKL", "family": "kl", "scale_factor": pytest.approx(0.3)}
    ours.eval()
    assert_same_outputs(ours, theirs)


def test_init_weights_from_a_diffusers_directory_vq(tmp_path):
    from models.autoencoders import load_init_weights
    config = vq_config("f2-1block", ema=True)     # our training settings; the EMA statistics start fresh
    theirs = randomise_(diffusers.VQModel(**diffusers_vq_model_kwargs(config)), seed=8)
    theirs.save_pretrained(tmp_path / "vq")
    ours = AutoencoderVQ(config)
    fresh = {k: v.clone() for k, v in ours.state_dict().items()}
    assert load_init_weights(ours, "vq", tmp_path / "vq")["format"] == "diffusers VQModel"
    assert torch.equal(ours.quantize.codebook, theirs.quantize.embedding.weight)
    assert torch.equal(ours.state_dict()["quantize.cluster_size"], fresh["quantize.cluster_size"])
    assert_same_vq_outputs(ours.eval(), theirs)


def test_init_weights_from_our_directory_and_mismatches_named(tmp_path):
    from models.autoencoders import load_init_weights
    src = randomise_(AutoencoderKL(AutoencoderConfig(**CONFIGS["f2-1block"])), seed=9)
    save_pretrained(src, tmp_path / "ours", extra={"scale_factor": 0.7})
    dst = AutoencoderKL(AutoencoderConfig(**{**CONFIGS["f2-1block"], "resolution": 32}))  # another image size is fine
    assert load_init_weights(dst, "kl", tmp_path / "ours") == {"format": "ldmflow", "family": "kl", "scale_factor": 0.7}
    assert_state_dicts_equal(dst.state_dict(), src.state_dict())
    # Another architecture: every differing field named, before any weight is copied.
    other = AutoencoderKL(AutoencoderConfig(**{**CONFIGS["f2-1block"], "ch": 16, "z_channels": 3}))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"^init_weights: .*\(ldmflow\) is another architecture: model\.ch "
                                         r"\(weights 32, config 16\); model\.z_channels \(weights 4, config 3\)$"):
        load_init_weights(other, "kl", tmp_path / "ours")
    assert_state_dicts_equal(other.state_dict(), before)
    # Attention placement is not a field that differs by name here: the keys say it.
    attn = AutoencoderKL(AutoencoderConfig(**{**CONFIGS["f2-1block"], "attn_resolutions": (8,)}))
    with pytest.raises(ValueError, match=r"^init_weights: .*missing keys \(e\.g\. encoder\.levels\.1\.attns\.0\."):
        load_init_weights(attn, "kl", tmp_path / "ours")
    # Another family, and a directory that is not a saved model.
    with pytest.raises(ValueError, match=r"^init_weights: .* holds a KL autoencoder \(ldmflow\); this stage trains "
                                         r"family 'vq'"):
        load_init_weights(AutoencoderVQ(vq_config("f2-1block")), "vq", tmp_path / "ours")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_init_weights(dst, "kl", tmp_path)
    theirs = diffusers.VQModel(**diffusers_vq_model_kwargs(vq_config("f2-1block", codebook_size=8)))
    theirs.save_pretrained(tmp_path / "vq8")
    with pytest.raises(ValueError, match=r"diffusers VQModel\) is another architecture: quantizer\.codebook_size "
                                         r"\(weights 8, config 16\)$"):
        load_init_weights(AutoencoderVQ(vq_config("f2-1block")), "vq", tmp_path / "vq8")
