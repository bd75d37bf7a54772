import json
import math

import pytest
import torch

from models.attention import attention
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
