"""Exponential moving average of a module's weights, the usual diffusion sampling model.

Data parallel (DDP, ZeRO-1/2): every rank holds identical parameters after the gradient
all-reduce, so every rank's update() computes an identical shadow and no communication is needed
(save it from rank 0 only or from all, they agree).

ZeRO-3 partitions every parameter: outside DeepSpeed's forward/backward hooks `p.data` is an empty
placeholder and this rank holds only `p.ds_tensor`, a flat slice (P,) = (ceil(numel / world),) of
the flattened parameter, rank r owning elements [r * P, (r + 1) * P) and the last rank zero-padded.
Gathering the full parameters around every update (deepspeed.zero.GatheredParameters) would
all-gather the whole model each step and hold a full fp32 shadow on every rank. Instead the shadow
here follows the partition: each rank averages its own slice (an elementwise op, so the result is
bit-identical to averaging gathered parameters), costs 1/world of the memory and no communication,
and the slices are all-gathered only when a whole copy is needed (`consolidated_state_dict`, at save).
This module stays pure torch: it recognises ZeRO-3 parameters by their `ds_tensor` attribute.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["EMA", "is_partitioned"]


def is_partitioned(p: Tensor) -> bool:
    """A ZeRO-3 parameter: its values live in `p.ds_tensor` (this rank's flat slice)."""
    return getattr(p, "ds_tensor", None) is not None


def _local(p: Tensor) -> Tensor:
    """What this rank holds of p: the whole parameter, or under ZeRO-3 its flat slice (P,)."""
    return p.ds_tensor if is_partitioned(p) else p


def _gather_flat(part: Tensor, numel: int, shape: tuple[int, ...]) -> Tensor:
    """All-gather every rank's slice (P,) of one flat tensor and return it whole, in `shape`.
    A collective: every rank must call it, in the same order."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world == 1:
        flat = part
    else:
        parts = [torch.empty_like(part) for _ in range(world)]
        dist.all_gather(parts, part.contiguous())
        flat = torch.cat(parts)
    return flat[:numel].reshape(shape).clone()   # drop the last rank's padding


class EMA:
    """Shadow copy: fp32 parameters (averaged) and buffers (copied as-is, e.g. BatchNorm statistics).

    update(): shadow = d * shadow + (1 - d) * param, with d = decay, or with warmup
    d = min(decay, (1 + n) / (10 + n)) where n counts updates including this one (n = 1 first;
    CompVis LitEma's convention), so early averages are not dominated by the random init.
    The shadow is fp32 even when the module trains in bf16: with decay 0.9999, a bf16 shadow could
    not represent the 1e-4-sized increments and would stop moving.

    ZeRO-3 (see the module docstring): `shadow[name]` is this rank's flat slice (P,) of the
    average; `consolidated_state_dict()` gathers whole tensors. state_dict() is per rank then,
    and a resume must use the same world size.
    """

    def __init__(self, module: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay: expected a number in [0, 1], got {decay!r}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        # All parameters, frozen ones included: they never change, so averaging them is a copy,
        # and copy_to() then restores a complete model.
        self.shadow: dict[str, Tensor] = {
            name: _local(p).detach().to(torch.float32, copy=True) for name, p in module.named_parameters()
        }
        # name -> (numel, shape) of the whole parameter, for the ZeRO-3 partitioned ones only.
        self.partitioned: dict[str, tuple[int, tuple[int, ...]]] = {
            name: (int(p.ds_numel), tuple(p.ds_shape)) for name, p in module.named_parameters()
            if is_partitioned(p)
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
        now = {name for name, p in params.items() if is_partitioned(p)}
        if now != self.partitioned.keys():
            raise RuntimeError("EMA: the module's ZeRO-3 partitioning changed since the EMA was made "
                               "(make the EMA after deepspeed.initialize)")
        return params, buffers

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Fold the module's current weights into the shadow. Call after each optimizer step
        (under ZeRO-3 on every rank: each folds in its own slice; no communication)."""
        params, buffers = self._check_names(module)
        d = self.current_decay()
        for name, p in params.items():
            s = self.shadow[name]
            # lerp: s + (1 - d) * (p - s) == d * s + (1 - d) * p, in fp32
            s.lerp_(_local(p).detach().to(device=s.device, dtype=torch.float32), 1.0 - d)
        for name, b in buffers.items():
            self.buffers[name].copy_(b.detach())
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Load the averaged weights into module (cast to each parameter's dtype); for ZeRO-3
        parameters into this rank's slice. To fill a plain, unpartitioned copy of a ZeRO-3 model use
        `module.load_state_dict(ema.consolidated_state_dict())`."""
        params, buffers = self._check_names(module)
        for name, p in params.items():
            _local(p).copy_(self.shadow[name])
        for name, b in buffers.items():
            b.copy_(self.buffers[name])

    @torch.no_grad()
    def consolidated_state_dict(self) -> dict[str, Tensor]:
        """The averaged parameters and buffers as a whole-model state dict (fp32 parameters, CPU).
        With ZeRO-3 slices this all-gathers them: every rank must call it."""
        out: dict[str, Tensor] = {}
        for name, s in self.shadow.items():
            if name in self.partitioned:
                numel, shape = self.partitioned[name]
                s = _gather_flat(s, numel, shape)
            out[name] = s.detach().cpu().clone()
        out.update({name: b.detach().cpu().clone() for name, b in self.buffers.items()})
        return out

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
        for k, v in state["shadow"].items():
            if v.shape != self.shadow[k].shape:
                # e.g. a ZeRO-3 slice saved with another world size, or a ZeRO-2 shadow
                raise ValueError(f"EMA.load_state_dict: shadow[{k!r}] has shape {tuple(v.shape)}, "
                                 f"expected {tuple(self.shadow[k].shape)}")
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.num_updates = int(state["num_updates"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
        for k, v in state["buffers"].items():
            self.buffers[k].copy_(v)
