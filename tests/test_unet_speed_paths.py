"""The U-Net's fast paths against their plain versions (issue 8; timings in benchmarks/unet_speed.py).

- sdpa_fp32: attention() on float32 copies, which auto picks for bf16/fp16 training on the CPU
  (torch's low-precision SDPA backward there is the slow part of a bf16 step). Forcing "sdpa" is the
  plain path. float32: identical to SDPA; bf16: closer to the float32 answer than bf16 SDPA is.
- A bf16 copy of the U-Net for sampling: it takes the float32 latents and text states samplers pass;
  outputs within a bf16 tolerance of the float32 net, and so are whole guided DDIM runs.

Tolerances: float32 1e-5. bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 2e-3 per op); through
a few layers of a tiny net that grows to ~1e-2 of the output's scale, so bf16 comparisons use
3e-2 x max|reference|, and 5e-2 for gradients (they pass every layer twice; for a whole net's
gradient, 5e-2 relative L2 error).
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import models.attention as attention_module
from models.attention import attention, attention_backend, resolve_attention_backend
from models.denoiser import Denoiser
from models.samplers import cfg_model, sample_ddim, sample_dpmpp_2m, sampler_timesteps
from models.schedules import ScheduleConfig
from models.unet import UNet, UNetConfig

B, L, CTX = 2, 5, 8


def tiny_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    model = UNet(UNetConfig(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                            num_heads=2, context_dim=CTX))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every weight off its init (zero-initialised outputs too), so all of them matter
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def unet_inputs(seed: int = 0, batch: int = B):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    context = torch.randn(batch, L, CTX, generator=g)
    return x, t, context


def close_to(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """|actual - expected| <= rel * max|expected| everywhere (bf16 error scales with the values)."""
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel} x {scale:.3g}"


def qkv(dtype, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g).to(dtype) for n in (10, 7, 7))
    return [a.requires_grad_(requires_grad) for a in (q, k, v)]


# ------------------------------------------------------------------ sdpa_fp32


def test_auto_picks_sdpa_fp32_only_for_low_precision_cpu_training():
    assert resolve_attention_backend("cpu", masked=False) == "sdpa"  # the fp32 default is unchanged
    assert resolve_attention_backend("cpu", False, torch.float32, grad=True) == "sdpa"
    assert resolve_attention_backend("cpu", False, torch.bfloat16, grad=False) == "sdpa"  # inference: bf16 SDPA
    assert resolve_attention_backend("cpu", True, torch.bfloat16, grad=True) == "sdpa_fp32"
    assert resolve_attention_backend("cpu", False, torch.float16, grad=True) == "sdpa_fp32"
    # Scores too big for the math path (or of unknown size) stay on sdpa_fp32.
    big = attention_module.MATH_MAX_SCORES + 1
    assert resolve_attention_backend("cpu", False, torch.bfloat16, grad=True, scores=big) == "sdpa_fp32"


def test_auto_picks_math_for_small_low_precision_cpu_training():
    """A 16x16 latent's self-attention at batch 16, 4 heads (the benchmark's U-Net): the math path,
    masked or not; not for float32 training, nor for inference over 256 keys."""
    small = 16 * 4 * 256 * 256
    for masked in (False, True):
        for dtype in (torch.bfloat16, torch.float16):
            assert resolve_attention_backend("cpu", masked, dtype, grad=True, scores=small) == "math"
    assert resolve_attention_backend("cpu", False, torch.bfloat16, grad=False, scores=small) == "sdpa"
    assert resolve_attention_backend("cpu", False, torch.bfloat16, grad=False, scores=small, keys=256) == "sdpa"
    assert resolve_attention_backend("cpu", False, torch.float32, grad=True, scores=small) == "sdpa"
    limit = attention_module.MATH_MAX_SCORES
    assert resolve_attention_backend("cpu", False, torch.bfloat16, grad=True, scores=limit) == "math"


def test_auto_picks_math_for_cpu_inference_with_few_keys():
    """Inference over at most MATH_MAX_KEYS keys (cross-attention to a 77-token caption, an 8x8
    latent's self-attention) with small scores: math, any float dtype, masked or not. More keys,
    unknown sizes, big scores or training in float32 keep SDPA."""
    cross = 16 * 4 * 256 * 77   # batch 16, 4 heads, a 16x16 latent attending to 77 tokens
    for masked in (False, True):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert resolve_attention_backend("cpu", masked, dtype, grad=False, scores=cross, keys=77) == "math"
    limit = attention_module.MATH_MAX_KEYS
    assert resolve_attention_backend("cpu", False, torch.float32, scores=cross, keys=limit) == "math"
    assert resolve_attention_backend("cpu", False, torch.float32, scores=cross, keys=limit + 1) == "sdpa"
    assert resolve_attention_backend("cpu", False, torch.float32, scores=cross) == "sdpa"          # keys unknown
    assert resolve_attention_backend("cpu", False, torch.float32, keys=77) == "sdpa"              # scores unknown
    big = attention_module.MATH_MAX_SCORES + 1
    assert resolve_attention_backend("cpu", False, torch.bfloat16, scores=big, keys=77) == "sdpa"
    assert resolve_attention_backend("cpu", False, torch.float32, grad=True, scores=cross, keys=77) == "sdpa"


def test_attention_call_passes_its_score_size_and_keys(monkeypatch):
    seen = []
    real = attention_module.resolve_attention_backend

    def spy(*args, **kw):
        seen.append((args[4] if len(args) > 4 else kw.get("scores"), args[5] if len(args) > 5 else kw.get("keys")))
        return real(*args, **kw)

    monkeypatch.setattr(attention_module, "resolve_attention_backend", spy)
    q, k, v = qkv(torch.bfloat16, requires_grad=True)   # q (2, 3, 10, 16), k/v (2, 3, 7, 16)
    attention(q, k, v)
    assert seen == [(2 * 3 * 10 * 7, 7)]


@pytest.mark.parametrize("masked", [False, True])
def test_inference_math_path_matches_sdpa(masked):
    """What auto now runs for CPU inference with few keys (math) against forced SDPA: float32 to
    1e-5, bf16 within bf16 rounding of the float32 answer, a fully masked row zeros in both."""
    q, k, v = qkv(torch.float32)
    mask = torch.tensor([[True] * 7, [False] * 7]) if masked else None
    assert resolve_attention_backend("cpu", masked, torch.float32, False, q.numel() // 16 * 7, 7) == "math"
    with torch.no_grad():
        out = attention(q, k, v, mask)
        out16 = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
        with attention_backend("sdpa"):
            ref = attention(q, k, v, mask)
    close_to(out, ref, 1e-5)
    close_to(out16, ref, 3e-2)


def test_unet_inference_with_auto_attention_matches_sdpa(monkeypatch):
    """A whole U-Net forward without grad (auto: math for its few-key attention) against every
    attention forced to SDPA."""
    picked = []
    real = attention_module.resolve_attention_backend

    def spy(*args, **kw):
        picked.append(real(*args, **kw))
        return picked[-1]

    monkeypatch.setattr(attention_module, "resolve_attention_backend", spy)
    model = tiny_unet().eval()
    x, t, context = unet_inputs()
    with torch.no_grad():
        out = model(x, t, context)
        assert picked and set(picked) == {"math"}   # every attention of this small net took math
        with attention_backend("sdpa"):
            ref = model(x, t, context)
    assert picked[-1] == "sdpa"
    close_to(out, ref, 1e-5)


def test_math_bf16_softmax_is_the_float32_softmax_rounded_once():
    """The math path's bf16 softmax (no float32 copy) equals the float32 softmax rounded to bf16,
    and with a mask a fully masked row is zeros, as SDPA gives."""
    g = torch.Generator().manual_seed(0)
    scores = (4 * torch.randn(3, 2, 9, 11, generator=g)).bfloat16()
    assert torch.equal(scores.softmax(-1), scores.float().softmax(-1).bfloat16())
    q, k, v = qkv(torch.bfloat16)
    mask = torch.tensor([[False] * 7, [True, False] * 3 + [True]])
    with attention_backend("math"):
        out = attention(q, k, v, mask)
    with attention_backend("sdpa"):
        ref = attention(q.float(), k.float(), v.float(), mask)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    close_to(out[1], ref[1], 3e-2)
    with attention_backend("sdpa"):  # forcing sdpa is the plain path
        assert resolve_attention_backend("cpu", False, torch.bfloat16, grad=True) == "sdpa"
    with attention_backend("sdpa_fp32"):
        assert resolve_attention_backend("cpu", False, torch.float32) == "sdpa_fp32"


def _sdpa_dtypes(monkeypatch) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        out = real(q, k, v, **kw)
        seen.append(out.dtype)  # the dtype SDPA actually computed in (after any autocast cast)
        return out

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", spy)
    return seen


def test_sdpa_fp32_runs_in_float32_under_autocast(monkeypatch):
    seen = _sdpa_dtypes(monkeypatch)
    q, k, v = qkv(torch.bfloat16, requires_grad=True)
    # auto would take the math path for scores this small: ask for sdpa_fp32 by name
    with attention_backend("sdpa_fp32"), torch.autocast("cpu", torch.bfloat16):
        out = attention(q, k, v)
    assert seen == [torch.float32] and out.dtype == torch.bfloat16  # fp32 inside, caller's dtype out
    seen.clear()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        attention(q, k, v)
        assert seen == []   # no grad, 7 keys: the math path
        long_k, long_v = (torch.randn(2, 3, 200, 16, dtype=torch.bfloat16) for _ in range(2))
        attention(q, long_k, long_v)
    assert seen == [torch.bfloat16]  # no grad, 200 keys: plain bf16 SDPA, whose forward is fast


@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_fp32_equals_sdpa_in_float32(masked):
    q, k, v = qkv(torch.float32, requires_grad=True)
    mask = torch.tensor([[True] * 4 + [False] * 3, [True, False] * 3 + [True]]) if masked else None
    grads = []
    for backend in ("sdpa", "sdpa_fp32"):
        with attention_backend(backend):
            out = attention(q, k, v, mask)
        grads.append((out, *torch.autograd.grad(out.pow(2).sum(), (q, k, v))))
    for plain, fast in zip(*grads):
        torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)


def test_sdpa_fp32_bf16_grads_match_float32_reference():
    q, k, v = qkv(torch.bfloat16, requires_grad=True)
    q32, k32, v32 = (a.detach().float().requires_grad_() for a in (q, k, v))
    with attention_backend("math"):
        ref = attention(q32, k32, v32)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), (q32, k32, v32))
    errors = {}
    for backend in ("sdpa", "sdpa_fp32"):
        with attention_backend(backend):
            out = attention(q, k, v)
        grads = torch.autograd.grad(out.float().pow(2).sum(), (q, k, v))
        assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
        close_to(out, ref, 3e-2)
        for g, r in zip(grads, ref_grads):
            close_to(g, r, 5e-2)
        errors[backend] = (out.float() - ref).abs().max().item()
    # Only the output's final rounding to bf16 is left: no worse than bf16 SDPA.
    assert errors["sdpa_fp32"] <= errors["sdpa"] + 1e-6


def test_unet_bf16_training_step_fast_attention_matches_plain():
    """A bf16-autocast forward + backward through the whole net: auto (here math: small scores),
    forced math, sdpa_fp32 and plain sdpa, each against the float32 step."""
    model = tiny_unet().train()
    x, t, context = unet_inputs()
    target = torch.randn_like(x)

    def step(backend: str, bf16: bool):
        m = copy.deepcopy(model)
        with attention_backend(backend), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            out = m(x, t, context)
        F.mse_loss(out.float(), target).backward()
        return out.float(), [p.grad.clone() for p in m.parameters()]

    out32, grads32 = step("auto", bf16=False)
    flat32 = torch.cat([g.flatten() for g in grads32])
    errors = {}
    for backend in ("auto", "math", "sdpa_fp32", "sdpa"):
        out, grads = step(backend, bf16=True)
        close_to(out, out32, 3e-2)
        # Gradients of every parameter as one vector: relative L2 error (single small entries of a
        # bf16 backward can be off by more; the direction of the step is what training sees).
        flat = torch.cat([g.flatten() for g in grads])
        errors[backend] = ((flat - flat32).norm() / flat32.norm()).item()
        assert errors[backend] <= 5e-2, (backend, errors[backend])
    assert errors["auto"] == errors["math"]   # auto took the math path for these small scores
    # float32 attention, and bf16 matmuls with a float32-accumulated softmax: no less accurate than bf16 SDPA
    assert errors["sdpa_fp32"] <= 1.25 * errors["sdpa"]
    assert errors["math"] <= 1.25 * errors["sdpa"]


# ------------------------------------------------------------------ bf16 inference copy


def test_bf16_copy_takes_float32_inputs_and_matches():
    model = tiny_unet().eval()
    fast = copy.deepcopy(model).to(torch.bfloat16)
    x, t, context = unet_inputs()
    mask = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    with torch.no_grad():
        ref = model(x, t, context, mask)
        out = fast(x, t, context, mask)  # float32 latents and states, as samplers pass them
    assert out.dtype == torch.bfloat16 and ref.dtype == torch.float32
    close_to(out, ref, 3e-2)


def test_float32_net_output_unchanged_by_input_cast():
    # The cast is a no-op for a float32 net: same bits as calling it on float32 inputs under autocast off.
    model = tiny_unet().eval()
    x, t, context = unet_inputs()
    with torch.no_grad():
        a = model(x, t, context)
        b = model(x.clone(), t, context.clone())
    assert torch.equal(a, b) and a.dtype == torch.float32


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_guided_sampling_with_bf16_copy_matches_float32(sampler):
    model = tiny_unet().eval()
    abar = ScheduleConfig().alphas_cumprod()
    fn = {"ddim": sample_ddim, "dpmpp_2m": sample_dpmpp_2m}[sampler]
    ts = sampler_timesteps(sampler, abar.numel(), 5)
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(B, 4, 8, 8, generator=g)
    cond = torch.randn(B, L, CTX, generator=g)
    null = torch.randn(L, CTX, generator=g)
    extra = {"context": cond, "null_context": null}
    ref = fn(cfg_model(Denoiser(model, abar, "v"), 3.0), noise, ts, abar, extra)
    out = fn(cfg_model(Denoiser(copy.deepcopy(model).to(torch.bfloat16), abar, "v"), 3.0), noise, ts, abar, extra)
    assert out.dtype == torch.float32  # the sampler's state stays float32; only the net is bf16
    # Guidance g = 3 scales the net's error by up to |1 - g| + g = 5 at every evaluation, and DPM++
    # 2M extrapolates from two of them: a whole run gets 5e-2 (3.5e-2 measured for dpmpp_2m on an
    # AVX2 CPU, whose bf16 kernels round differently from AMX/AVX-512-bf16 ones).
    close_to(out, ref, 5e-2)
