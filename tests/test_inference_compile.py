"""models.inference.compile_frozen against the eager module it replaces (issue 8; the timing is in
benchmarks/unet_speed.py, and pipelines' compiled sampler is tested whole in
tests/test_sampling_speed_paths.py)."""

import copy

import pytest
import torch
from torch import nn

from models.inference import compile_frozen


def conv_net() -> nn.Module:
    # A conv + bias + SiLU and a linear: what freezing pre-packs and fuses on the CPU; small, so
    # compiling takes seconds.
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 5)).eval()


def test_frozen_compile_matches_eager_and_freezes_weights():
    eager = conv_net()
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = eager(x)
    fast = compile_frozen(copy.deepcopy(eager))
    assert not any(p.requires_grad for p in fast.parameters())
    assert list(fast.state_dict()) == list(eager.state_dict())   # checkpoints load either way
    with torch.no_grad():
        out = fast(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), ref, rtol=1e-5, atol=1e-5)
    if torch.backends.mkldnn.is_available():
        # The freezing took effect: the convolutions run as oneDNN's pre-packed fused kernels, not
        # as the plain aten convolution eager (or compiling without freezing) calls.
        from torch.profiler import profile
        with torch.no_grad(), profile() as prof:
            fast(x)
        ops = {e.key for e in prof.key_averages()}
        assert any(op.startswith("mkldnn::_convolution_pointwise") for op in ops), sorted(ops)
        assert "aten::mkldnn_convolution" not in ops and "aten::convolution" not in ops


def test_frozen_compile_refuses_grad_and_a_second_compile():
    fast = compile_frozen(conv_net())
    with pytest.raises(RuntimeError, match="compiled for inference.*no_grad"):
        fast(torch.randn(1, 3, 6, 6))
    with pytest.raises(ValueError, match="^module: already compiled"):
        compile_frozen(fast)
    with pytest.raises(TypeError, match="^module: expected a torch.nn.Module"):
        compile_frozen(lambda x: x)
