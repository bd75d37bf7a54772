"""Our U-Net against diffusers' UNet2DConditionModel: same function, lossless weight conversion."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency (pyproject extra `test`)")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.embeddings import get_timestep_embedding  # noqa: E402

from models.interop.diffusers_unet import (  # noqa: E402
    diffusers_unet_kwargs,
    unet_config_from_diffusers,
    unet_from_diffusers,
    unet_state_dict_from_diffusers,
    unet_state_dict_to_diffusers,
    unet_to_diffusers,
)
from models.unet import UNET_PRESETS, UNet, UNetConfig, timestep_embedding  # noqa: E402

B, L, CTX = 2, 6, 16

# Tiny configs covering: 2 and 3 levels, attention on some / all / no levels (middle only),
# transformer depth 1 and 2, 1 and 2 ResBlocks per level, heads by count and by width,
# both time conditionings, narrow GroupNorms.
CONFIGS = {
    "two_levels": dict(channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2),
    "deep_head_dim": dict(channels=16, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(0, 2),
                          transformer_depth=2, head_dim=8, time_conditioning="additive", norm_groups=8,
                          norm_eps=1e-5),
    "middle_only": dict(channels=16, channel_mult=(1, 1, 2), num_res_blocks=2, attention_levels=(),
                        transformer_depth=2, num_heads=4, norm_groups=8),
}


def make_config(name: str) -> UNetConfig:
    return UNetConfig(context_dim=CTX, **CONFIGS[name])


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    # Every parameter moved off its init (our zero-initialised outputs included), so
    # every weight reaches the output and a misplaced one shows.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, 8, 8, generator=g)
    t = torch.tensor([7, 811])
    context = torch.randn(B, L, CTX, generator=g)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True, True] + [False] * 4])  # True = real token
    return x, t, context, mask


def diffusers_out(model, x, t, context, mask=None):
    # diffusers' encoder_attention_mask: 1 = keep, 0 = drop (made a -10000 bias inside).
    kw = {} if mask is None else {"encoder_attention_mask": mask.float()}
    return model(x, t, encoder_hidden_states=context, **kw).sample


@pytest.mark.parametrize("dim", [32, 33])
def test_timestep_embedding_matches_diffusers(dim):
    t = torch.tensor([0, 1, 17, 500, 999])
    ours = timestep_embedding(t, dim)
    theirs = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_outputs_match_diffusers(name):
    torch.manual_seed(0)
    ours = randomised(UNet(make_config(name)))
    theirs = unet_to_diffusers(ours)
    assert not theirs.training
    x, t, context, mask = inputs()
    with torch.no_grad():
        for m in (mask, None):
            out = ours(x, t, context, m)
            assert out.abs().mean() > 0.1  # a real signal, not a near-zero net
            torch.testing.assert_close(diffusers_out(theirs, x, t, context, m), out, atol=1e-4, rtol=1e-4)
        # The mask matters (so the comparison above tested it).
        assert not torch.allclose(ours(x, t, context, mask), ours(x, t, context))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_identical_state_dict(name):
    torch.manual_seed(0)
    ours = randomised(UNet(make_config(name)))
    back = unet_from_diffusers(unet_to_diffusers(ours))
    assert back.config == ours.config
    a, b = ours.state_dict(), back.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The pure mappers are each other's inverse on names.
    cfg = ours.config
    assert list(unet_state_dict_from_diffusers(unet_state_dict_to_diffusers(a, cfg), cfg)) == list(a)


def test_sd1_style_diffusers_model_converts():
    # What an SD 1.x checkpoint looks like: additive time conditioning ("default"), 1x1 conv
    # transformer projections, eps 1e-5, heads given per level (here one head width, 16).
    kwargs = dict(
        in_channels=4, out_channels=4, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1, cross_attention_dim=CTX, attention_head_dim=(2, 4), norm_num_groups=8,
    )
    torch.manual_seed(0)
    theirs = randomised(UNet2DConditionModel(**kwargs))
    assert theirs.config.resnet_time_scale_shift == "default" and not theirs.config.use_linear_projection
    ours = unet_from_diffusers(theirs)
    c = ours.config
    assert (c.time_conditioning, c.head_dim, c.norm_eps, c.norm_groups) == ("additive", 16, 1e-5, 8)
    assert (c.channels, c.channel_mult, c.attention_levels) == (32, (1, 2), (0, 1))
    x, t, context, mask = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, context, mask), diffusers_out(theirs, x, t, context, mask),
                                   atol=1e-4, rtol=1e-4)
    # Back to diffusers it comes with linear projections, and still the same function.
    again = unet_to_diffusers(ours)
    assert again.config.use_linear_projection
    with torch.no_grad():
        torch.testing.assert_close(diffusers_out(again, x, t, context, mask), diffusers_out(theirs, x, t, context, mask),
                                   atol=1e-4, rtol=1e-4)


def test_kwargs_for_sd1_layout():
    # Stable Diffusion 1.5's UNet config (its config.json, the fields we set) from our config.
    cfg = UNET_PRESETS["sd1"]()
    kw = diffusers_unet_kwargs(cfg)
    sd15 = dict(
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2, attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32, norm_eps=1e-5,
        resnet_time_scale_shift="default", flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
        transformer_layers_per_block=1, mid_block_type="UNetMidBlock2DCrossAttn",
    )
    assert {k: kw[k] for k in sd15} == sd15
    # And SD 1.5's config.json (without its conv projections flag: the default) reads back as cfg.
    json_like = {**{k: list(v) if isinstance(v, tuple) else v for k, v in sd15.items()},
                 "_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4}
    assert unet_config_from_diffusers(json_like) == cfg


def test_kwargs_head_dim_is_per_level_heads():
    # SD 2: fixed 64-wide heads -> attention_head_dim lists the head count per level.
    cfg = UNET_PRESETS["sd2"]()
    kw = diffusers_unet_kwargs(cfg)
    assert kw["attention_head_dim"] == (5, 10, 20, 20) and kw["use_linear_projection"]
    assert kw["cross_attention_dim"] == 1024 and kw["resnet_time_scale_shift"] == "default"
    assert unet_config_from_diffusers(kw) == cfg


def base_diffusers_config() -> dict:
    return diffusers_unet_kwargs(make_config("two_levels"))


@pytest.mark.parametrize(
    "override, key",
    [
        (dict(resnet_time_scale_shift="spatial"), "resnet_time_scale_shift"),
        (dict(conv_in_kernel=1), "conv_in_kernel"),
        (dict(conv_out_kernel=5), "conv_out_kernel"),
        (dict(class_embed_type="timestep"), "class_embed_type"),
        (dict(num_class_embeds=10), "num_class_embeds"),
        (dict(addition_embed_type="text_time"), "addition_embed_type"),
        (dict(flip_sin_to_cos=False), "flip_sin_to_cos"),
        (dict(freq_shift=1), "freq_shift"),
        (dict(mid_block_type=None), "mid_block_type"),
        (dict(time_embedding_type="fourier"), "time_embedding_type"),
        (dict(block_out_channels=(32, 48)), "block_out_channels"),
        (dict(down_block_types=("AttnDownBlock2D", "CrossAttnDownBlock2D")), "down_block_types"),
        (dict(up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")), "up_block_types"),
        (dict(layers_per_block=(1, 2)), "layers_per_block"),
        (dict(transformer_layers_per_block=(1, 2)), "transformer_layers_per_block"),
        (dict(attention_head_dim=(2, 8), down_block_types=("CrossAttnDownBlock2D",) * 2,
              up_block_types=("CrossAttnUpBlock2D",) * 2), "attention_head_dim"),  # 16- and 8-wide heads
        (dict(only_cross_attention=True), "only_cross_attention"),
        (dict(norm_num_groups=None), "norm_num_groups"),
    ],
)
def test_unrepresentable_diffusers_config_is_refused(override, key):
    with pytest.raises(ValueError, match=f"^{key}:"):
        unet_config_from_diffusers({**base_diffusers_config(), **override})


def test_unrepresentable_ours_is_refused():
    with pytest.raises(ValueError, match="^channel_mult:"):
        diffusers_unet_kwargs(UNetConfig(channels=16, channel_mult=(2, 4), attention_levels=(1,), context_dim=CTX))
    # 16-wide level 0 under 32 requested groups: ours uses gcd = 16 there, diffusers one count.
    with pytest.raises(ValueError, match="^norm_groups:"):
        diffusers_unet_kwargs(UNetConfig(channels=16, channel_mult=(1, 2), attention_levels=(1,), context_dim=CTX,
                                         num_heads=2))


def test_state_dict_mappers_reject_foreign_keys():
    cfg = make_config("two_levels")
    state = UNet(cfg).state_dict()
    with pytest.raises(ValueError, match="^state_dict: 'input_blocks.9.0.in_conv.weight'"):
        unet_state_dict_to_diffusers({**state, "input_blocks.9.0.in_conv.weight": torch.zeros(1)}, cfg)
    theirs = unet_state_dict_to_diffusers(state, cfg)
    with pytest.raises(ValueError, match="^state_dict: 'add_embedding.linear_1.weight'"):
        unet_state_dict_from_diffusers({**theirs, "add_embedding.linear_1.weight": torch.zeros(1)}, cfg)


def test_conversion_keeps_dtype_and_mode():
    ours = UNet(make_config("two_levels")).to(torch.bfloat16).train()
    theirs = unet_to_diffusers(ours)
    assert next(theirs.parameters()).dtype == torch.bfloat16 and theirs.training
    back = unet_from_diffusers(theirs.eval())
    assert next(back.parameters()).dtype == torch.bfloat16 and not back.training
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


@pytest.mark.parametrize("name, params", [("sd1", 859_520_964), ("sd2", 865_910_724)])
def test_sd_presets_have_the_released_shapes(name, params):
    # Built on the meta device (shapes only, no memory): every parameter maps to the
    # diffusers model of the same config with the same shape, and the totals are
    # the released Stable Diffusion 1.x / 2.x U-Nets'.
    cfg = UNET_PRESETS[name]()
    with torch.device("meta"):
        ours = UNet(cfg)
        theirs = UNet2DConditionModel(**diffusers_unet_kwargs(cfg))
    assert sum(p.numel() for p in ours.parameters()) == params
    mapped = {k: v.shape for k, v in unet_state_dict_to_diffusers(ours.state_dict(), cfg).items()}
    assert mapped == {k: v.shape for k, v in theirs.state_dict().items()}
