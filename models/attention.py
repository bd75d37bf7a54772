"""Attention shared by the autoencoder and the U-Net.

`attention()` is the one place that picks a kernel: xformers' memory-efficient
attention on CUDA when it is installed, torch's scaled_dot_product_attention
otherwise, and a plain math implementation where neither is there. One more,
"sdpa_fp32", runs SDPA on float32 copies: auto takes it for bf16/fp16 training on
the CPU, where torch's low-precision flash-attention backward is 2-4x slower than
its float32 one (torch 2.14, measured: benchmarks/unet_speed.py). For bf16/fp16
training on the CPU auto takes the plain math path instead when the score matrix is
small (B*H*Lq*Lk up to MATH_MAX_SCORES, e.g. a 16x16 latent's self-attention): torch's
CPU flash kernels are built for long sequences, and narrow heads waste them, while two
batched bf16 matmuls and a softmax ran the forward + backward 1.6x faster than sdpa_fp32
there and a whole bf16 U-Net training step 7-13% faster (benchmarks/unet_speed.py); above
that size the O(L^2) scores cost memory the flash kernels never allocate. CPU inference
(no grad, any float dtype) takes the math path when the keys are few (Lk up to
MATH_MAX_KEYS: cross-attention to a 77-token caption, or an 8x8 latent's self-attention)
and the scores are small: there the flash kernel's blocking has too little to amortise
(a bf16 batch-16 cross-attention of 256 queries to 77 keys: 2.3 ms SDPA, 2.0 ms math eager,
1.1 ms math under torch.compile), while long self-attention (256 keys) stays on SDPA, 2.4x
faster than math there. All of them
compute the same function; `attention_backend("math")` (a context manager) or
`set_attention_backend` force one, for tests and for debugging a kernel. The
modules above it only shape tensors.

Shapes: B batch, H heads, L sequence length (Lq queries, Lk keys), d head width.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from types import ModuleType
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AttentionBackend",
    "ATTENTION_BACKENDS",
    "attention",
    "attention_backend",
    "set_attention_backend",
    "get_attention_backend",
    "resolve_attention_backend",
    "MATH_MAX_SCORES",
    "MATH_MAX_KEYS",
    "norm",
    "CrossAttention",
    "SelfAttention2d",
]

# "auto" picks per call (see resolve_attention_backend); the others force one kernel.
AttentionBackend = Literal["auto", "xformers", "sdpa", "sdpa_fp32", "math"]
ATTENTION_BACKENDS: tuple[str, ...] = get_args(AttentionBackend)

# Process-wide choice. A module global rather than an argument threaded through
# every model: the kernel is a property of the run (debugging, tests), not of a net.
_backend: str = "auto"


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


def _check_backend(name: str) -> str:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")
    return name


def set_attention_backend(name: AttentionBackend) -> None:
    """Force one attention kernel for the whole process ("auto" restores the default choice)."""
    global _backend
    _backend = _check_backend(name)


def get_attention_backend() -> str:
    """The current setting: "auto" or a forced backend."""
    return _backend


@contextlib.contextmanager
def attention_backend(name: AttentionBackend) -> Iterator[None]:
    """`with attention_backend("math"): ...` forces a kernel inside the block, then restores
    the previous setting (nesting works; not thread-local)."""
    global _backend
    previous, _backend = _backend, _check_backend(name)
    try:
        yield
    finally:
        _backend = previous


_LOW_PRECISION = (torch.bfloat16, torch.float16)
# Largest score matrix (B * heads * Lq * Lk elements) auto gives the math path in low-precision
# CPU training: 2^26 bf16 scores are 128 MiB, kept with the probabilities for the backward.
MATH_MAX_SCORES = 2**26
# Most keys CPU inference runs through the math path (see the module docstring).
MATH_MAX_KEYS = 128


def resolve_attention_backend(
    device: torch.device | str, masked: bool, dtype: torch.dtype | None = None, grad: bool = False,
    scores: int | None = None, keys: int | None = None,
) -> str:
    """The kernel `attention()` uses for tensors on `device` (with a key mask or not),
    of `dtype`, that autograd will differentiate (`grad`) or not, whose score matrix has
    `scores` = B * heads * Lq * Lk elements and `keys` = Lk (None: unknown, taken as large).

    auto: xformers on CUDA when installed and there is no mask; on the CPU, for
    bf16/fp16 with grad, math when the scores are at most MATH_MAX_SCORES, else sdpa_fp32
    (SDPA's low-precision CPU backward is the slow part of a bf16 training step; its forward
    is fine); for CPU inference, math when keys <= MATH_MAX_KEYS and scores <=
    MATH_MAX_SCORES (few keys waste the flash kernel's blocking); SDPA when torch has it;
    math otherwise. A forced
    backend that cannot run there raises ValueError.
    """
    device = torch.device(device)
    has_sdpa = hasattr(F, "scaled_dot_product_attention")
    if _backend == "auto":
        if not masked and device.type == "cuda" and _xformers_ops() is not None:
            return "xformers"
        if not has_sdpa:
            return "math"
        small = scores is not None and scores <= MATH_MAX_SCORES
        if device.type == "cpu" and grad and dtype in _LOW_PRECISION:
            return "math" if small else "sdpa_fp32"
        if device.type == "cpu" and not grad and small and keys is not None and keys <= MATH_MAX_KEYS:
            return "math"
        return "sdpa"
    if _backend == "xformers":
        if device.type != "cuda" or _xformers_ops() is None:
            raise ValueError(f"backend: xformers needs CUDA and the xformers package (tensors on {device})")
        if masked:
            # See attention(): our (B, Lk) mask would have to become a dense bias.
            raise ValueError("backend: the xformers path takes no key mask; use sdpa or math for masked attention")
    if _backend in ("sdpa", "sdpa_fp32") and not has_sdpa:
        raise ValueError("backend: this torch has no scaled_dot_product_attention")
    return _backend


def _math_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v written out: the reference the fused kernels must equal, and
    auto's pick for small low-precision CPU training (see resolve_attention_backend)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, H, Lq, Lk)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    if scores.dtype == torch.float16:
        # Softmax in float32 (half-precision exp overflows and sums lose mass), then back.
        probs = scores.float().softmax(dim=-1)
    else:
        # float32, float64, bf16 (bf16's range is float32's; torch's softmax accumulates it in
        # float32 and rounds once: what .float().softmax().to(bf16) gives, without two copies).
        probs = scores.softmax(dim=-1)
    if mask is not None:
        probs = probs.nan_to_num(0.0)  # a row with every key masked is all -inf -> NaN; zero, as SDPA does
    return probs.to(v.dtype) @ v  # (B, H, Lq, d)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v.

    q: (B, H, Lq, d); k, v: (B, H, Lk, d); mask: optional (B, Lk) bool, True = keep
    that key. Returns (B, H, Lq, d). The kernel is `resolve_attention_backend`'s.

    A query row whose keys are all masked out has no defined answer; torch's
    kernels and the math path return zeros there. Callers keep at least one key
    per sample (text encoders always emit a start token).
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

    # With a mask auto stays on SDPA even when xformers is there: xformers wants the mask
    # as a dense (B, H, Lq, Lk) additive bias with an 8-aligned last dim, which costs
    # the memory the kernel is meant to save, while SDPA takes the (B, 1, 1, Lk) bool
    # mask by broadcast and runs its own memory-efficient CUDA kernel on it.
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    scores = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
    backend = resolve_attention_backend(q.device, mask is not None, q.dtype, grad, scores, k.shape[2])
    if backend == "xformers":
        # xformers layout is (B, L, H, d); the transposes are views, not copies.
        out = _xformers_ops().memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if backend == "math":
        return _math_attention(q, k, v, mask)
    attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, Lk), True = attend
    if backend == "sdpa_fp32" and q.dtype != torch.float32:
        # Autocast would cast SDPA's inputs straight back to bf16: off for this one call.
        with torch.autocast(q.device.type, enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def norm(channels: int, groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with `groups` groups (32 as in LDM), or gcd(groups, channels) for narrow or odd widths.

    gcd always divides `channels`, so tiny test models (8 or 12 channels) build
    without a special case; at the usual widths (multiples of 32) it is LDM's norm.
    """
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=eps, affine=True)


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
