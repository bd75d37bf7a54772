"""Latent normalisation between an autoencoder and a diffusion model, measured from data.

Diffusion wants latents of roughly unit variance; an autoencoder's latents have whatever scale
training gave them. The autoencoder stage measures it on training latents after training and stores
it beside the weights (config.json "extra"), so every later stage reads it from the artifact:

  * "tensor" (LDM's scale_by_std): one scale = 1 / std over all latent elements, no shift;
        normalize(z) = z * scale                 (== diffusers' scaling_factor, shift_factor None)
    Written also as extra["scale_factor"], which older code and diffusers' scaling_factor read.
  * "channel": per latent channel c, shift_c = mean_c and scale_c = 1 / std_c;
        normalize(z)[:, c] = (z[:, c] - shift_c) * scale_c
    Useful when channels differ in scale or carry an offset (e.g. a VQ model's pre-quant latent).

denormalize is the exact inverse (up to float rounding): z = z_n / scale + shift. Latents are
(B, C, h, w) (or (C, h, w)); shift and scale broadcast over channel dim -3.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from models.checkpoint import CONFIG_NAME, EXTRA_KEY

__all__ = ["LatentNorm", "LatentNormKind", "LATENT_NORM_KINDS", "EXTRA_NAME", "latent_norm_from_moments",
           "load_latent_norm"]

LatentNormKind = Literal["tensor", "channel"]
LATENT_NORM_KINDS: tuple[str, ...] = get_args(LatentNormKind)
EXTRA_NAME = "latent_norm"   # key inside config.json "extra"


@dataclass(frozen=True)
class LatentNorm:
    kind: str = "tensor"                 # "tensor" | "channel", see the module docstring
    shift: tuple[float, ...] = (0.0,)    # (1,) for "tensor" (always 0: LDM does not shift), (C,) for "channel"
    scale: tuple[float, ...] = (1.0,)    # (1,) or (C,); multiplies z - shift

    def __post_init__(self):
        if self.kind not in LATENT_NORM_KINDS:
            raise ValueError(f"kind: expected one of {LATENT_NORM_KINDS}, got {self.kind!r}")
        shift = tuple(float(v) for v in self.shift)
        scale = tuple(float(v) for v in self.scale)
        if len(shift) != len(scale) or not scale:
            raise ValueError(f"shift/scale: expected equal, non-zero lengths, got {len(shift)} and {len(scale)}")
        if self.kind == "tensor" and len(scale) != 1:
            raise ValueError(f"scale: kind 'tensor' has one scale, got {len(scale)}")
        if not all(math.isfinite(s) and s > 0 for s in scale):
            raise ValueError(f"scale: expected finite numbers > 0, got {list(scale)}")
        if not all(math.isfinite(s) for s in shift):
            raise ValueError(f"shift: expected finite numbers, got {list(shift)}")
        object.__setattr__(self, "shift", shift)
        object.__setattr__(self, "scale", scale)

    @property
    def channels(self) -> int | None:
        """Latent channels this norm is for (None: any, per-tensor)."""
        return len(self.scale) if self.kind == "channel" else None

    @property
    def scale_factor(self) -> float:
        """The per-tensor scale; a per-channel norm has none (raises)."""
        if self.kind != "tensor":
            raise ValueError("scale_factor: a per-channel latent norm has no single scale; use normalize()")
        return self.scale[0]

    def _params(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """shift, scale as (C, 1, 1) (or (1, 1, 1)) on z's device, float32 (z's dtype if wider)."""
        if z.ndim < 3:
            raise ValueError(f"z: expected (..., C, h, w), got {tuple(z.shape)}")
        if self.kind == "channel" and z.shape[-3] != len(self.scale):
            raise ValueError(f"z: expected {len(self.scale)} channels (latent norm), got {z.shape[-3]}")
        dtype = torch.promote_types(z.dtype, torch.float32)
        shift = torch.tensor(self.shift, dtype=dtype, device=z.device).view(-1, 1, 1)
        scale = torch.tensor(self.scale, dtype=dtype, device=z.device).view(-1, 1, 1)
        return shift, scale

    def normalize(self, z: Tensor) -> Tensor:
        """Autoencoder latent (B, C, h, w) -> diffusion space, same shape and dtype."""
        shift, scale = self._params(z)
        return ((z - shift) * scale).to(z.dtype)

    def denormalize(self, z: Tensor) -> Tensor:
        """Diffusion sample (B, C, h, w) -> autoencoder latent for decode(), same shape and dtype."""
        shift, scale = self._params(z)
        return (z / scale + shift).to(z.dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "shift": list(self.shift), "scale": list(self.scale)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatentNorm:
        unknown = sorted(set(d) - {"kind", "shift", "scale"})
        if unknown:
            raise ValueError(f"LatentNorm: unknown keys {unknown}")
        return cls(**d)

    def to_extra(self) -> dict[str, Any]:
        """What goes into an autoencoder's config.json "extra": {"latent_norm": ...}, plus
        "scale_factor" for a per-tensor norm (read by code that only knows a single scale)."""
        out: dict[str, Any] = {EXTRA_NAME: self.to_dict()}
        if self.kind == "tensor":
            out["scale_factor"] = self.scale[0]
        return out

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> LatentNorm:
        """From an autoencoder's "extra": its "latent_norm", or for artifacts written before it
        existed a per-tensor norm from "scale_factor". Neither -> ValueError (never a constant)."""
        if EXTRA_NAME in extra:
            norm = cls.from_dict(extra[EXTRA_NAME])
            if norm.kind == "tensor" and "scale_factor" in extra and not math.isclose(
                    float(extra["scale_factor"]), norm.scale[0], rel_tol=1e-9):
                raise ValueError(f"extra: scale_factor {extra['scale_factor']} disagrees with "
                                 f"latent_norm.scale {norm.scale[0]}")
            return norm
        if "scale_factor" in extra:
            return cls("tensor", (0.0,), (float(extra["scale_factor"]),))
        raise ValueError("extra: no latent_norm or scale_factor; this autoencoder's latent scale was never "
                         "measured (train it with the autoencoder stage)")


def latent_norm_from_moments(kind: str, count: Tensor, total: Tensor, total_sq: Tensor) -> LatentNorm:
    """A LatentNorm from per-channel moments of latents: count, sum, sum of squares, each (C,)
    (float64; e.g. summed over data-parallel ranks). "tensor": 1 / std over all elements (the
    mean is not subtracted from z, as LDM, but the std is about it); "channel": mean_c, 1 / std_c."""
    if kind not in LATENT_NORM_KINDS:
        raise ValueError(f"kind: expected one of {LATENT_NORM_KINDS}, got {kind!r}")
    count, total, total_sq = (t.detach().double().cpu() for t in (count, total, total_sq))
    if kind == "tensor":
        count, total, total_sq = count.sum(0, keepdim=True), total.sum(0, keepdim=True), total_sq.sum(0, keepdim=True)
    if bool((count < 2).any()):
        raise ValueError(f"count: need at least 2 latent elements per statistic, got {count.tolist()}")
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0.0)
    std = var.sqrt()
    if bool((std <= 0).any()):
        raise ValueError(f"latents: zero variance (std {std.tolist()}); the autoencoder's latent is constant")
    shift = (0.0,) if kind == "tensor" else tuple(mean.tolist())
    return LatentNorm(kind, shift, tuple((1.0 / std).tolist()))


def load_latent_norm(directory: str | Path) -> LatentNorm:
    """The LatentNorm stored in a saved autoencoder directory's config.json "extra"."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}; not a saved autoencoder")
    return LatentNorm.from_extra(json.loads(path.read_text()).get(EXTRA_KEY, {}))
