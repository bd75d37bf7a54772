"""Attention shared by the autoencoder and the U-Net.

`attention()` is the one place that picks a kernel: xformers' memory-efficient
attention on CUDA when it is installed, torch's scaled_dot_product_attention
otherwise. The modules above it only shape tensors.

Shapes: B batch, H heads, L sequence length (Lq queries, Lk keys), d head width.
"""

from __future__ import annotations

import functools
import math
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["attention", "norm", "CrossAttention", "SelfAttention2d"]


@functools.cache
def _xformers_ops() -> ModuleType | None:
    # Imported on first CUDA call, not at module import: xformers is an optional
    # CUDA-only extra (pyproject `cuda`) and slow to import. functools.cache makes
    # the attempt happen once per process, hit or miss.
    try:
        import xformers.ops
    except ImportError:
        return None
    return xformers.ops


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v.

    q: (B, H, Lq, d); k, v: (B, H, Lk, d); mask: optional (B, Lk) bool, True = keep
    that key. Returns (B, H, Lq, d).

    A query row whose keys are all masked out has no defined answer; torch's
    kernels currently return zeros there. Callers keep at least one key per sample
    (text encoders always emit a start token).
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k, v: expected (B, heads, L, d) tensors, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if mask is not None:
        if mask.dtype != torch.bool:
            # An int/float mask would be read by SDPA as an additive bias: refuse it.
            raise ValueError(f"mask: expected a bool tensor, got {mask.dtype}")
        if mask.shape != (k.shape[0], k.shape[2]):
            raise ValueError(
                f"mask: expected shape (B, Lk) = {(k.shape[0], k.shape[2])}, got {tuple(mask.shape)}"
            )

    # With a mask we stay on SDPA even when xformers is there: xformers wants the mask
    # as a dense (B, H, Lq, Lk) additive bias with an 8-aligned last dim, which costs
    # the memory the kernel is meant to save, while SDPA takes the (B, 1, 1, Lk) bool
    # mask by broadcast and runs its own memory-efficient CUDA kernel on it.
    if mask is None and q.is_cuda:
        xops = _xformers_ops()
        if xops is not None:
            # xformers layout is (B, L, H, d); the transposes are views, not copies.
            out = xops.memory_efficient_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            )
            return out.transpose(1, 2)

    attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, Lk), True = attend
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups as in LDM, or gcd(32, channels) for narrow or odd widths.

    gcd always divides `channels`, so tiny test models (8 or 12 channels) build
    without a special case; at the usual widths (multiples of 32) it is LDM's norm.
    """
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6, affine=True)


class CrossAttention(nn.Module):
    """Multi-head attention from x to a context; self-attention when context_dim is None.

    x: (B, N, query_dim); context: (B, L, context_dim); mask: (B, L) bool, True = keep.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        # No biases on q/k/v, as in Stable Diffusion.
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)  # (B, N, H*d) -> (B, H, N, d)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        context = x if context is None else context
        q = self._split_heads(self.to_q(x))
        k = self._split_heads(self.to_k(context))
        v = self._split_heads(self.to_v(context))
        out = attention(q, k, v, mask)  # (B, H, N, d)
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))  # (B, N, query_dim)


class SelfAttention2d(nn.Module):
    """Single-head self-attention over the pixels of a conv feature map, with residual.

    LDM's AttnBlock with q, k, v fused into one 1x1 conv. x: (B, C, H, W) -> same.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x))  # (B, 3C, H, W)
        # (B, 3C, H, W) -> 3 x (B, 1, HW, C): permute+reshape is a view for
        # channels_last inputs, so that memory format costs no copy here.
        q, k, v = qkv.permute(0, 2, 3, 1).reshape(b, 1, h * w, 3 * c).chunk(3, dim=-1)
        out = attention(q, k, v)  # (B, 1, HW, C)
        out = out.reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)
        return x + self.proj_out(out)
