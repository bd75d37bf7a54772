"""models.optim.adam: the fused kernel where torch has one, the same update as torch's for-loop Adam."""
from __future__ import annotations

import copy

import pytest
import torch

from models.optim import adam, fused_supported


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


def _train(net, opt, steps: int, seed: int = 1) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(32, 8, generator=g)
        loss = net(x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_cpu_float_parameters_get_the_fused_kernel():
    net = _net()
    assert fused_supported(net.parameters())
    assert adam(net.parameters(), lr=1e-3).defaults["fused"] is True
    assert not fused_supported([])
    assert not fused_supported([torch.zeros(3, dtype=torch.int64)])


@pytest.mark.parametrize("decoupled", [False, True])
def test_fused_update_equals_the_for_loop_one(decoupled):
    """Same optimizer, hyperparameters and gradients: torch's default (for-loop) Adam/AdamW and ours
    agree after 20 steps to float32 rounding, on param groups with their own weight decay."""
    a, b = _net(), _net()

    def groups(net):
        return [{"params": [net[0].weight, net[2].weight], "weight_decay": 0.1},
                {"params": [net[0].bias, net[2].bias], "weight_decay": 0.0}]

    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    ref = cls(groups(a), lr=3e-3, betas=(0.9, 0.98), eps=1e-6, foreach=False)
    ours = adam(groups(b), lr=3e-3, betas=(0.9, 0.98), eps=1e-6, decoupled=decoupled)
    assert ours.defaults.get("fused") is True and type(ours) is cls
    la, lb = _train(a, ref, 20), _train(b, ours, 20)
    assert la == pytest.approx(lb, rel=1e-5)
    init = _net()
    for pa, pb, p0 in zip(a.parameters(), b.parameters(), init.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)
        assert (pa - p0).abs().max() > 1e-3   # the steps moved every tensor: the comparison means something


def test_fused_optimizer_resumes_bit_for_bit():
    """State saved after 5 steps and loaded into a fresh optimizer continues exactly as the
    uninterrupted run (what the stages' exact-resume checkpoints rely on)."""
    whole = _net()
    opt = adam(whole.parameters(), lr=1e-3)
    _train(whole, opt, 5)
    mid_net, mid_opt = copy.deepcopy(whole.state_dict()), copy.deepcopy(opt.state_dict())
    _train(whole, opt, 5, seed=2)

    resumed = _net()
    resumed.load_state_dict(mid_net)
    opt2 = adam(resumed.parameters(), lr=1e-3)
    opt2.load_state_dict(mid_opt)
    _train(resumed, opt2, 5, seed=2)
    for pa, pb in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(pa, pb)


def test_deepspeed_config_asks_for_torch_s_fused_adamw_on_cpu_only():
    """DeepSpeed passes unknown optimizer params through to torch.optim.AdamW (torch_adam): on the
    CPU the fused kernel; on GPU DeepSpeed's own FusedAdam, so neither key."""
    from cluster.train import deepspeed_config
    kw = dict(batch_size=4, lr=1e-3, weight_decay=0.0, warmup_steps=10, grad_clip=1.0, zero_stage=2,
              precision="fp32")
    cpu = deepspeed_config(on_gpu=False, **kw)["optimizer"]["params"]
    assert cpu["torch_adam"] is True and cpu["fused"] is True
    gpu = deepspeed_config(on_gpu=True, **kw)["optimizer"]["params"]
    assert "torch_adam" not in gpu and "fused" not in gpu
