"""Adam/AdamW with torch's fused kernel wherever torch has one for the parameters' device.

torch's default Adam on the CPU is the per-parameter for-loop implementation (foreach is picked only
for CUDA tensors): about six elementwise passes over every parameter tensor, one small op each.
For a U-Net of a few hundred tensors that was 12% of a bf16 training step on a 2-core AVX-512-bf16
CPU, and `fused=True` (one kernel per tensor, the same update) cut the step by that much
(benchmarks/unet_speed.py, BENCHMARKS.md). Every torch optimizer the project builds comes from here,
so the stages, the baselines and the benchmarks step alike.

The fused kernel computes the same update in another order of operations: equal to the for-loop
one within float32 rounding (tests/test_optim.py), deterministic run to run, so exact resume holds.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["adam", "fused_supported"]


def _params_of(params: list[Any]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for p in params:
        out.extend(p["params"] if isinstance(p, dict) else [p])
    return out


def fused_supported(tensors: Iterable[torch.Tensor]) -> bool:
    """True when torch's fused Adam takes these parameters: floating point, on a device type it has
    the kernel for (CPU since torch 2.4, CUDA, ...), no sparse or complex tensors."""
    tensors = list(tensors)
    if not tensors:
        return False
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:   # an older torch: CUDA only
        devices = {"cuda"}
    return all(t.device.type in devices and t.is_floating_point() and not t.is_sparse and not t.is_complex()
               for t in tensors)


def adam(params: Iterable[Any], *, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
         weight_decay: float = 0.0, decoupled: bool = False) -> torch.optim.Optimizer:
    """torch.optim.Adam (or AdamW with `decoupled`), fused where fused_supported. `params` is what
    torch's optimizers take: tensors or param-group dicts."""
    params = list(params)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    kwargs: dict[str, Any] = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
    if fused_supported(_params_of(params)):
        kwargs["fused"] = True
    return cls(params, **kwargs)
