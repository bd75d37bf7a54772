"""ImageGPT: Chen et al. 2020, "Generative Pretraining from Pixels": a GPT-2 style causal transformer
trained by next-token cross entropy on the image as a sequence of colour tokens.

Choices:
  * Tokens: each sub-pixel is quantised on its own to `levels` values (bins of 256 / levels 8-bit
    values: token = p // (256 / levels)), in raster order over (H, W, C), so a sequence has
    L = H * W * C tokens and the vocabulary is `levels` (+1 start token). The paper instead maps
    whole pixels to a 512-colour k-means palette; per-sub-pixel bins need no clustering and keep
    the likelihood bookkeeping below exact.
  * Transformer: pre-LN blocks (LayerNorm -> causal self-attention -> residual, LayerNorm -> GELU
    MLP of width mlp_ratio * width -> residual), a final LayerNorm, learned position embeddings,
    torch's scaled_dot_product_attention with is_causal=True, GPT-2 init N(0, 0.02). The input at
    position t is token t-1 (a learned start token at t = 0), the output at t predicts token t.
  * Likelihood: exact for the model "coarse tokens from the transformer, then the 8-bit value
    uniform within the token's bin of 256 / levels values", a proper distribution over 8-bit images:
        bpd = (nll_tokens_bits + D * log2(256 / levels)) / D.
    levels = 256 makes it the plain 256-way model.
  * sample(): token by token with torch.multinomial on the caller's generator, with a key/value
    cache (one new token per forward; equal to the full forward, see the tests). An image shows
    each token's bin centre (the posterised image), or with `dither` an 8-bit value drawn
    uniformly within the bin (exactly a draw from the density that bits_per_dim scores).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.baselines.base import Baseline, BaselineConfig, SyncGrads, no_sync, to_8bit
from models.baselines.pixelcnn import check_resolution

__all__ = ["Config", "ImageGPT", "pixels_to_tokens", "tokens_to_pixels"]


@dataclass
class Config(BaselineConfig):
    width: int = 256       # residual stream width
    depth: int = 8         # transformer blocks
    heads: int = 8         # attention heads (divide width)
    mlp_ratio: int = 4     # MLP hidden width / width
    levels: int = 8        # colour levels per sub-pixel: a power of two in [2, 256]
    dither: bool = False   # samples: uniform 8-bit value within the bin instead of the bin centre

    def __post_init__(self):
        super().__post_init__()
        check_resolution(self.resolution)
        for name in ("width", "depth", "heads", "mlp_ratio"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if self.width % self.heads:
            raise ValueError(f"heads: expected a divisor of width {self.width}, got {self.heads}")
        v = self.levels
        if not isinstance(v, int) or isinstance(v, bool) or not 2 <= v <= 256 or v & (v - 1):
            raise ValueError(f"levels: expected a power of two in [2, 256], got {v!r}")
        if not isinstance(self.dither, bool):
            raise ValueError(f"dither: expected a bool, got {self.dither!r}")


def pixels_to_tokens(x: Tensor, levels: int) -> Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, H*W*C) long tokens in [0, levels), raster order over (H, W, C)."""
    t = to_8bit(x) // (256 // levels)
    return t.permute(0, 2, 3, 1).reshape(x.shape[0], -1)


def tokens_to_pixels(tokens: Tensor, levels: int, channels: int, size: int, offset: Tensor | None = None) -> Tensor:
    """(B, L) tokens -> (B, C, H, W) in [-1, 1]. offset (B, L) in [0, 1): position within the bin
    (None: the bin centre)."""
    binw = 256 // levels
    within = (binw - 1) / 2 if offset is None else torch.floor(offset * binw)
    p = tokens.float() * binw + within                                  # 8-bit value, float
    p = p.view(tokens.shape[0], size, size, channels).permute(0, 3, 1, 2)
    return (p / 127.5 - 1.0).clamp(-1, 1)


class _Block(nn.Module):
    """Pre-LN transformer block; `cache` (a dict) holds this block's keys/values when sampling:
    buffers of the whole sequence ("max_len" positions), written in place, so a step costs O(t)
    and not a copy of everything cached so far."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: Tensor, cache: dict | None = None) -> Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:                                   # (B, heads, T, hd) each
            if "k" not in cache:
                size = (b, self.heads, cache.get("max_len", t), w // self.heads)
                cache["k"], cache["v"], cache["len"] = k.new_empty(size), v.new_empty(size), 0
            s, e = cache["len"], cache["len"] + t
            if e > cache["k"].shape[2]:
                raise ValueError(f"cache: {e} positions exceed max_len {cache['k'].shape[2]}")
            cache["k"][:, :, s:e], cache["v"][:, :, s:e] = k, v
            cache["len"] = e
            k, v = cache["k"][:, :, :e], cache["v"][:, :, :e]
        # is_causal masks top-left aligned, right only when queries and keys start together;
        # one cached query attends to every key before it anyway.
        causal = q.shape[2] == k.shape[2] and t > 1
        a = F.scaled_dot_product_attention(q, k, v, is_causal=causal)   # (B, heads, T, hd)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, w))
        return x + self.mlp(self.ln2(x))


class ImageGPT(Baseline):
    family = "imagegpt"
    Config = Config
    has_likelihood = True
    likelihood_kind = "exact"

    def __init__(self, config: Config):
        super().__init__(config)
        c = config
        self.seq_len = c.in_channels * c.resolution ** 2
        self.tok = nn.Embedding(c.levels + 1, c.width)        # index `levels` is the start token
        self.pos = nn.Parameter(torch.zeros(self.seq_len, c.width))
        self.blocks = nn.ModuleList(_Block(c.width, c.heads, c.mlp_ratio) for _ in range(c.depth))
        self.ln_f = nn.LayerNorm(c.width)
        self.head = nn.Linear(c.width, c.levels)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear):
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos, std=0.02)

    def logits(self, tokens: Tensor) -> Tensor:
        """(B, L) tokens -> (B, L, levels): the output at t predicts token t from tokens < t."""
        start = torch.full_like(tokens[:, :1], self.config.levels)
        inp = torch.cat([start, tokens[:, :-1]], 1)                    # (B, L) shifted right
        h = self.tok(inp) + self.pos[:inp.shape[1]]
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln_f(h))

    def step_logits(self, tok: Tensor, t: int, caches: list[dict]) -> Tensor:
        """Input token (n, 1) at position t (token t-1, or the start token at t = 0), with the
        blocks' key/value caches of positions < t (filled in place) -> (n, levels) logits of token t."""
        h = self.tok(tok) + self.pos[t]                                       # (n, 1, width)
        for blk, cache in zip(self.blocks, caches):
            h = blk(h, cache)
        return self.head(self.ln_f(h[:, 0]))

    def token_nll(self, x: Tensor) -> Tensor:
        """(B,) -log p of x's tokens in nats."""
        tokens = pixels_to_tokens(x, self.config.levels)
        return F.cross_entropy(self.logits(tokens).float().transpose(1, 2), tokens, reduction="none").sum(1)

    def train_step(self, x: Tensor, opts: dict[str, torch.optim.Optimizer], step: int,
                   sync_grads: SyncGrads = no_sync) -> dict[str, float]:
        opt = opts["model"]
        opt.zero_grad(set_to_none=True)
        loss = self.token_nll(x).mean() / self.seq_len        # nats per token
        loss.backward()
        sync_grads(self.parameters())
        opt.step()
        loss = float(loss.detach())
        return {"loss": loss, "bits_per_dim": (loss / math.log(2.0)) + math.log2(256 // self.config.levels)}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        c, device = self.config, self.pos.device
        caches = [{"max_len": self.seq_len} for _ in self.blocks]
        tok = torch.full((n, 1), c.levels, dtype=torch.long, device=device)   # the start token
        out = torch.empty(n, self.seq_len, dtype=torch.long, device=device)
        for t in range(self.seq_len):
            probs = torch.softmax(self.step_logits(tok, t, caches).float(), dim=-1)   # (n, levels)
            tok = torch.multinomial(probs, 1, generator=generator)            # (n, 1)
            out[:, t] = tok[:, 0]
        offset = None
        if c.dither:
            offset = torch.rand(out.shape, generator=generator, device=device)
        return tokens_to_pixels(out, c.levels, c.in_channels, c.resolution, offset)

    def bits_per_dim(self, x: Tensor) -> Tensor:
        d = self.seq_len
        return (self.token_nll(x) / math.log(2.0) + d * math.log2(256 // self.config.levels)) / d
