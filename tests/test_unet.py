import json
import math

import pytest
import torch

from models.attention import (
    attention,
    attention_backend,
    get_attention_backend,
    resolve_attention_backend,
    set_attention_backend,
)
from models.unet import UNET_PRESETS, UNet, UNetConfig

B, L, CTX = 2, 5, 8  # batch, context tokens, context width


def tiny_config(**overrides) -> UNetConfig:
    kw = dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2, context_dim=CTX)
    return UNetConfig(**{**kw, **overrides})


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, 8, 8, generator=g)
    t = torch.tensor([3, 700])
    context = torch.randn(B, L, CTX, generator=g)
    return x, t, context


def perturbed(model: UNet, seed: int = 0) -> UNet:
    # Move every weight off its init, zero-initialised outputs included, so that
    # every path from the inputs reaches the output.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_output_shape_and_zero_init():
    torch.manual_seed(0)
    model = UNet(tiny_config())
    x, t, context = inputs()
    out = model(x, t, context)
    assert out.shape == x.shape
    # Zero-initialised output conv: the untrained net predicts exactly 0.
    assert torch.equal(out, torch.zeros_like(out))


def test_scalar_t_broadcasts():
    torch.manual_seed(0)
    model = perturbed(UNet(tiny_config()))
    x, _, context = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor(5), context), model(x, torch.tensor([5, 5]), context))


def test_context_mask_respected():
    torch.manual_seed(0)
    model = perturbed(UNet(tiny_config()))
    x, t, context = inputs()
    mask = torch.tensor([[True, True, True, False, False], [True, True, False, False, False]])
    changed_padding = context.clone()
    changed_padding[0, 3:] += 5.0
    changed_padding[1, 2:] -= 5.0
    changed_kept = context.clone()
    changed_kept[:, 0] += 1.0
    with torch.no_grad():
        ref = model(x, t, context, mask)
        assert torch.equal(model(x, t, changed_padding, mask), ref)
        assert not torch.allclose(model(x, t, changed_kept, mask), ref)
        # Without the mask the padding does count.
        assert not torch.allclose(model(x, t, changed_padding), model(x, t, context))


def test_output_depends_on_t_and_context():
    torch.manual_seed(0)
    model = perturbed(UNet(tiny_config()))
    x, t, context = inputs()
    with torch.no_grad():
        ref = model(x, t, context)
        assert not torch.allclose(model(x, t + 100, context), ref)
        assert not torch.allclose(model(x, t.float() + 0.5, context), ref)  # float timesteps work too
        assert not torch.allclose(model(x, t, context.flip(1)), ref)


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = UNet(tiny_config())
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=g)
    noise = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([50, 300, 600, 900])
    alpha_bar = torch.cos(t / 1000 * math.pi / 2).pow(2).view(-1, 1, 1, 1)  # cosine schedule
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    context = torch.randn(4, L, CTX, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x_t, t, context), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_gradient_checkpointing_matches():
    torch.manual_seed(0)
    plain = perturbed(UNet(tiny_config())).train()
    ckpt = UNet(tiny_config(gradient_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t, context = inputs()
    for model in (plain, ckpt):
        model(x, t, context).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_channels_last_matches():
    torch.manual_seed(0)
    model = perturbed(UNet(tiny_config()))
    x, t, context = inputs()
    with torch.no_grad():
        ref = model(x, t, context)
        out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t, context)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_forward_rejects_bad_inputs():
    model = UNet(tiny_config())
    x, t, context = inputs()
    with pytest.raises(ValueError, match="^x:"):
        model(x[..., :7], t, context)
    with pytest.raises(ValueError, match="^context:"):
        model(x, t, context[..., :4])
    with pytest.raises(ValueError, match="^t:"):
        model(x, t[:1], context)
    with pytest.raises(ValueError, match="^mask:"):
        model(x, t, context, torch.ones(B, L))  # not bool


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(channel_mult=()), "channel_mult"),
        (dict(channel_mult=(1, -2)), "channel_mult"),
        (dict(attention_levels=(2,)), "attention_levels"),
        (dict(attention_levels=(1, 1)), "attention_levels"),
        (dict(num_heads=3), "num_heads"),
        (dict(context_dim=0), "context_dim"),
        (dict(transformer_depth=0), "transformer_depth"),
        (dict(dropout=-0.1), "dropout"),
        (dict(in_channels=2.0), "in_channels"),
        (dict(head_dim=12), "head_dim"),  # does not divide 32
        (dict(head_dim=0), "head_dim"),
        (dict(time_conditioning="film"), "time_conditioning"),
        (dict(norm_groups=0), "norm_groups"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(channels_last=1), "channels_last"),
    ],
)
def test_config_validation_names_field(overrides, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        tiny_config(**overrides)


def test_config_dict_round_trip():
    config = tiny_config()
    d = config.to_dict()
    assert d["channel_mult"] == [1, 2]
    assert UNetConfig.from_dict(json.loads(json.dumps(d))) == config
    with pytest.raises(ValueError, match="unknown keys.*chanels"):
        UNetConfig.from_dict({**d, "chanels": 3})


def test_presets_build():
    for name, factory in UNET_PRESETS.items():
        assert isinstance(factory(), UNetConfig), name
    assert UNET_PRESETS["tiny"](context_dim=768).context_dim == 768


# attention(): the kernel choice must not change the math.


def naive_attention(q, k, v, mask=None):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_naive(masked):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 5, 8, generator=g)
    k = torch.randn(2, 3, 7, 8, generator=g)
    v = torch.randn(2, 3, 7, 8, generator=g)
    mask = torch.tensor([[True] * 7, [True, False, True, True, False, False, False]]) if masked else None
    torch.testing.assert_close(attention(q, k, v, mask), naive_attention(q, k, v, mask))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (xformers path when installed, SDPA otherwise)")
@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_naive_cuda(masked):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 32, generator=g, device="cuda", dtype=torch.float16) for n in (64, 77, 77))
    mask = (torch.arange(77, device="cuda") < torch.tensor([[77], [20]], device="cuda")) if masked else None
    expected = naive_attention(q.float(), k.float(), v.float(), mask)
    torch.testing.assert_close(attention(q, k, v, mask).float(), expected, atol=2e-3, rtol=2e-3)


def test_attention_backend_override_and_restore():
    assert get_attention_backend() == "auto"
    assert resolve_attention_backend("cpu", masked=False) == "sdpa"
    with attention_backend("math"):
        assert resolve_attention_backend("cpu", masked=True) == "math"
        with attention_backend("sdpa"):
            assert get_attention_backend() == "sdpa"
        assert get_attention_backend() == "math"
    assert get_attention_backend() == "auto"
    with pytest.raises(ValueError, match="^backend:"):
        set_attention_backend("flash")
    with pytest.raises(ValueError, match="^backend: xformers needs CUDA"), attention_backend("xformers"):
        attention(*(torch.zeros(1, 1, 2, 4) for _ in range(3)))
    assert get_attention_backend() == "auto"  # restored after the error too


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_sdpa_matches_math(masked, dtype, tol):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g).to(dtype) for n in (6, 9, 9))
    mask = torch.rand(2, 9, generator=g) > 0.4 if masked else None
    if mask is not None:
        mask[:, 0] = True  # every sample keeps a key (see attention's docstring)
    with attention_backend("sdpa"):
        fused = attention(q, k, v, mask)
    with attention_backend("math"):
        plain = attention(q, k, v, mask)
    assert fused.dtype == plain.dtype == dtype
    torch.testing.assert_close(plain.float(), fused.float(), atol=tol, rtol=tol)
    # And both equal the float64 textbook formula.
    expected = naive_attention(q.double(), k.double(), v.double(), mask).float()
    torch.testing.assert_close(plain.float(), expected, atol=tol, rtol=tol)


def test_attention_math_fully_masked_row_is_zero_like_sdpa():
    q, k, v = (torch.randn(2, 1, 3, 4) for _ in range(3))
    mask = torch.tensor([[True, False, True], [False, False, False]])
    with attention_backend("math"):
        out = attention(q, k, v, mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out, attention(q, k, v, mask))


def test_unet_same_under_every_cpu_backend():
    torch.manual_seed(0)
    model = perturbed(UNet(tiny_config()))
    x, t, context = inputs()
    mask = torch.tensor([[True, True, True, False, False], [True, True, False, False, False]])
    with torch.no_grad():
        ref = model(x, t, context, mask)
        with attention_backend("math"):
            torch.testing.assert_close(model(x, t, context, mask), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers runs only on CUDA")
def test_attention_xformers_matches_math_cuda():
    pytest.importorskip("xformers.ops", reason="xformers is not installed (pyproject extra `cuda`)")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 32, generator=g, device="cuda", dtype=torch.float16) for n in (64, 77, 77))
    assert resolve_attention_backend("cuda", masked=False) == "xformers"
    with attention_backend("xformers"):
        fused = attention(q, k, v)
    with attention_backend("math"):
        plain = attention(q, k, v)
    torch.testing.assert_close(fused.float(), plain.float(), atol=2e-3, rtol=2e-3)


def test_head_dim_sets_heads_per_level():
    config = tiny_config(head_dim=8)  # widths 16 and 32 -> 2 and 4 heads of width 8
    model = UNet(config)
    assert config.heads(16) == 2 and config.heads(32) == 4
    attn = model.middle_block[1].blocks[0].attn1
    assert attn.heads == 4 and attn.to_q.out_features == 32
    out = perturbed(model)(*inputs())
    assert out.shape == (B, 4, 8, 8)


def test_additive_time_conditioning():
    torch.manual_seed(0)
    model = UNet(tiny_config(time_conditioning="additive"))
    x, t, context = inputs()
    # One embedding projection per output channel (not a scale and a shift), outputs still start at zero.
    assert model.middle_block[0].emb_proj.out_features == 32
    assert torch.equal(model(x, t, context), torch.zeros_like(x))
    perturbed(model)
    with torch.no_grad():
        assert not torch.allclose(model(x, t + 100, context), model(x, t, context))


def test_default_config_keeps_old_layout():
    # Saved configs from before head_dim/time_conditioning/norm_* existed load with the old net:
    # same parameter shapes, GroupNorm gcd(32, width) with eps 1e-6.
    old_keys = dict(channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], num_heads=2,
                    context_dim=CTX, transformer_depth=1, dropout=0.0, gradient_checkpointing=False,
                    in_channels=4, out_channels=4)
    config = UNetConfig.from_dict(old_keys)
    assert config == tiny_config()
    model = UNet(config)
    assert model.input_blocks[1][0].emb_proj.out_features == 2 * 16  # scale and shift
    assert model.input_blocks[1][0].in_norm.num_groups == 16 and model.out_norm.eps == 1e-6


def test_gradient_checkpointing_matches_deeper():
    # Two ResBlocks per level and two transformer blocks per transformer: every kind
    # of stage is recomputed, and the outputs are checked too, not only the gradients.
    overrides = dict(num_res_blocks=2, transformer_depth=2, head_dim=8)
    torch.manual_seed(0)
    plain = perturbed(UNet(tiny_config(**overrides))).train()
    ckpt = UNet(tiny_config(gradient_checkpointing=True, **overrides)).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t, context = inputs()
    outs = [model(x, t, context) for model in (plain, ckpt)]
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)  # same kernels, same order: bitwise
    for out in outs:
        out.square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_channels_last_option_matches():
    torch.manual_seed(0)
    ref_model = perturbed(UNet(tiny_config()))
    model = UNet(tiny_config(channels_last=True)).eval()
    model.load_state_dict(ref_model.state_dict())
    assert model.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    x, t, context = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, context), ref_model(x, t, context), atol=1e-5, rtol=1e-5)
