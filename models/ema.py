"""Exponential moving average of a module's weights, the usual diffusion sampling model.

Data parallel: every rank holds identical parameters after the gradient all-reduce, so every rank's
update() computes an identical shadow and no communication is needed (save it from rank 0 only or
from all, they agree). ZeRO-3 partitions parameters, so each rank only holds a shard and
p.data is an empty placeholder outside a gather: such parameters must be gathered
(deepspeed.zero.GatheredParameters) around update()/copy_to(), which this class does not do;
it refuses them instead of averaging placeholders. ZeRO-1/2 keep full parameters and are fine.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


def _check_not_partitioned(module: nn.Module) -> None:
    for name, p in module.named_parameters():
        # DeepSpeed tags ZeRO-3 parameters with ds_id; their local .data is a placeholder.
        if hasattr(p, "ds_id"):
            raise RuntimeError(
                f"EMA: parameter {name!r} is ZeRO-3 partitioned; gather it "
                "(deepspeed.zero.GatheredParameters) around EMA calls or use ZeRO stage <= 2"
            )


class EMA:
    """Shadow copy: fp32 parameters (averaged) and buffers (copied as-is, e.g. BatchNorm statistics).

    update(): shadow = d * shadow + (1 - d) * param, with d = decay, or with warmup
    d = min(decay, (1 + n) / (10 + n)) where n counts updates including this one (n = 1 first;
    CompVis LitEma's convention), so early averages are not dominated by the random init.
    The shadow is fp32 even when the module trains in bf16: with decay 0.9999, a bf16 shadow could
    not represent the 1e-4-sized increments and would stop moving.
    """

    def __init__(self, module: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay: expected a number in [0, 1], got {decay!r}")
        _check_not_partitioned(module)
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        # All parameters, frozen ones included: they never change, so averaging them is a copy,
        # and copy_to() then restores a complete model.
        self.shadow: dict[str, Tensor] = {
            name: p.detach().to(torch.float32, copy=True) for name, p in module.named_parameters()
        }
        self.buffers: dict[str, Tensor] = {name: b.detach().clone() for name, b in module.named_buffers()}

    def current_decay(self) -> float:
        """The d the next update() will use."""
        if not self.warmup:
            return self.decay
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    def _check_names(self, module: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        params = dict(module.named_parameters())
        buffers = dict(module.named_buffers())
        if params.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - params.keys())[:5]
            extra = sorted(params.keys() - self.shadow.keys())[:5]
            raise KeyError(f"EMA: module parameters differ from the shadow's (missing {missing}, unexpected {extra})")
        if buffers.keys() != self.buffers.keys():
            raise KeyError("EMA: module buffers differ from the shadow's")
        return params, buffers

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Fold the module's current weights into the shadow. Call after each optimizer step."""
        _check_not_partitioned(module)
        params, buffers = self._check_names(module)
        d = self.current_decay()
        for name, p in params.items():
            s = self.shadow[name]
            # lerp: s + (1 - d) * (p - s) == d * s + (1 - d) * p, in fp32
            s.lerp_(p.detach().to(device=s.device, dtype=torch.float32), 1.0 - d)
        for name, b in buffers.items():
            self.buffers[name].copy_(b.detach())
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Load the averaged weights into module (cast to each parameter's dtype)."""
        _check_not_partitioned(module)
        params, buffers = self._check_names(module)
        for name, p in params.items():
            p.copy_(self.shadow[name])
        for name, b in buffers.items():
            b.copy_(self.buffers[name])

    def to(self, device: torch.device | str) -> "EMA":
        """Move the shadow (e.g. to CPU to spare accelerator memory; update() then copies across)."""
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        self.buffers = {k: v.to(device) for k, v in self.buffers.items()}
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": dict(self.shadow),
            "buffers": dict(self.buffers),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["shadow"].keys() != self.shadow.keys() or state["buffers"].keys() != self.buffers.keys():
            raise KeyError("EMA.load_state_dict: parameter/buffer names differ from this EMA's module")
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.num_updates = int(state["num_updates"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
        for k, v in state["buffers"].items():
            self.buffers[k].copy_(v)
