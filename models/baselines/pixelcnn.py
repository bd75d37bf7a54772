"""Gated PixelCNN: van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders"
(gated layers, vertical + horizontal stacks), on the masks and 256-way softmax of "Pixel Recurrent
Neural Networks" (van den Oord, Kalchbrenner, Kavukcuoglu 2016).

    p(x) = prod_i prod_c p(x[i, c] | x[<i], x[i, <c])

over pixels i in raster order and channels c in R -> G -> B order; each factor is a 256-way softmax
over the 8-bit value, trained by cross entropy. The likelihood is exact: bits/dim = mean -log2 p.

Choices:
  * Sub-pixels enter as learned embeddings, one vector per (channel, value), not as scaled floats.
    The same network (`GatedPixelCNNNet`) then models any grid of discrete symbols: vqvae's prior
    runs it over the grid of code indices (one "channel" with K classes).
  * Hidden features are split into C groups of `ch` (C = channels): group c carries only what
    channel c may see. The centre tap of the horizontal stack and every 1x1 conv are masked over
    groups: mask A (first layer) lets group c see input groups < c, mask B (later layers) <= c.
  * Vertical stack: a (k//2 + 1, k) conv over the k//2 rows above and the current row, causal by
    padding only at the top. It enters the horizontal stack shifted down one row, so the
    horizontal stack sees every row above in the receptive field (no blind spot) and nothing of the
    current row through it. The vertical stack never reads the horizontal one.
  * Horizontal stack: a (1, k//2 + 1) conv over the current row up to the current pixel, plus a 1x1
    conv of the shifted vertical pre-activation; gated tanh(a) * sigmoid(b) with a and b from the
    same group; then a masked 1x1 conv and a residual connection (from the second layer on: the
    first layer's input holds the current sub-pixel itself).
  * The paper's conditioning vector and skip connections are left out (unconditional baseline).
    First layer kernel `first_kernel` (7 in the paper), later layers `kernel`.
  * sample(): pixel by pixel, channel by channel, torch.multinomial on the caller's generator.
    The two stacks make it cheap without a cache of every activation: the vertical stack at rows
    < i is fixed once row i starts, so it runs once per row (on the `reach` rows above only), and
    each draw then runs just the horizontal stack on the current row's `reach` pixels to the left
    (1 x (reach + 1) convs). The result equals the full net's logits (tested); it is ~50x fewer
    FLOPs than rerunning the whole net on rows <= i for every sub-pixel at 32x32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.baselines.base import Baseline, BaselineConfig, SyncGrads, no_sync, to_8bit

__all__ = ["Config", "PixelCNN", "GatedPixelCNNNet", "MaskedConv2d", "group_mask", "feature_groups",
           "sample_grid", "categorical_nll"]


def _check_int(name: str, v, minimum: int = 1) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {v!r}")


def _check_kernel(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 3 or v % 2 == 0:
        raise ValueError(f"{name}: expected an odd int >= 3, got {v!r}")


def check_resolution(resolution: int) -> None:
    """Every autoregressive family takes square power-of-two images of side >= 8."""
    if resolution < 8 or resolution & (resolution - 1):
        raise ValueError(f"resolution: expected a power of two >= 8, got {resolution!r}")


# ---- masked building blocks (shared with vqvae's prior) ------------------------------------------
def feature_groups(num: int, groups: int) -> Tensor:
    """(num,) group of each feature, laid out group-major: [g0 .. g0, g1 .. g1, ...]."""
    if num % groups:
        raise ValueError(f"num: expected a multiple of {groups} groups, got {num}")
    return torch.arange(num) // (num // groups)


def group_mask(out_groups: Tensor, in_groups: Tensor, strict: bool) -> Tensor:
    """(out, in) bool: an output feature of group g may read input features of group < g (strict,
    mask A) or <= g (mask B). Bool, so the stage's buffer averaging leaves it alone."""
    o, i = out_groups[:, None], in_groups[None, :]
    return i < o if strict else i <= o


class MaskedConv2d(nn.Conv2d):
    """Conv2d without padding (callers pad causally) whose weight is multiplied by a fixed mask
    (out, in, kh, kw); the mask is rebuilt from the config, so it is not saved."""

    def __init__(self, in_ch: int, out_ch: int, kernel: tuple[int, int], mask: Tensor):
        super().__init__(in_ch, out_ch, kernel)
        if mask.shape != self.weight.shape:
            raise ValueError(f"mask: expected shape {tuple(self.weight.shape)}, got {tuple(mask.shape)}")
        self.register_buffer("mask", mask.bool(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias)


def _gate(t: Tensor) -> Tensor:
    """(B, 2p, H, W) laid out [a | b], each half group-major -> tanh(a) * sigmoid(b) (B, p, H, W)."""
    a, b = t.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One gated layer (Fig. 2 of the paper): vertical stack (rows <= i) and horizontal stack
    (row i up to pixel j, centre tap masked over channel groups)."""

    def __init__(self, features: int, groups: int, kernel: int, first: bool):
        super().__init__()
        p, k = features, kernel
        self.k, self.residual = k, not first
        g = feature_groups(p, groups)               # (p,) group of each hidden feature
        g2 = g.repeat(2)                            # (2p,) the [a | b] pre-activation
        self.v_conv = nn.Conv2d(p, 2 * p, (k // 2 + 1, k))
        self.v_to_h = nn.Conv2d(2 * p, 2 * p, 1)    # reads rows above only (after the shift): unmasked
        h_mask = torch.ones(2 * p, p, 1, k // 2 + 1, dtype=torch.bool)
        h_mask[:, :, 0, -1] = group_mask(g2, g, strict=first)   # the current pixel's own channels
        self.h_conv = MaskedConv2d(p, 2 * p, (1, k // 2 + 1), h_mask)
        self.h_out = MaskedConv2d(p, p, (1, 1), group_mask(g, g, strict=False)[:, :, None, None])

    def forward(self, v: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        k = self.k
        v_pre = self.v_conv(F.pad(v, (k // 2, k // 2, k // 2, 0)))    # (B, 2p, H, W): rows <= i
        v_shift = F.pad(v_pre, (0, 0, 1, 0))[:, :, :-1]               # rows < i
        h_pre = self.h_conv(F.pad(h, (k // 2, 0, 0, 0))) + self.v_to_h(v_shift)
        h_new = self.h_out(_gate(h_pre))
        return _gate(v_pre), (h + h_new if self.residual else h_new)


class GatedPixelCNNNet(nn.Module):
    """(B, C, H, W) long symbols in [0, classes) -> (B, C, classes, H, W) logits, where the logits at
    (c, i, j) depend only on symbols before (i, j) in raster order and channels < c at (i, j)."""

    def __init__(self, channels: int, classes: int, ch: int, num_layers: int, first_kernel: int = 7,
                 kernel: int = 3):
        super().__init__()
        self.channels, self.classes, self.ch = channels, classes, ch
        p = channels * ch
        self.embed = nn.Embedding(channels * classes, ch)   # one table, channel c at offset c * classes
        self.layers = nn.ModuleList(
            GatedLayer(p, channels, first_kernel if i == 0 else kernel, first=i == 0) for i in range(num_layers))
        g = feature_groups(p, channels)
        out_g = torch.arange(channels * classes) // classes   # logits of channel c come from group c
        self.head1 = MaskedConv2d(p, p, (1, 1), group_mask(g, g, strict=False)[:, :, None, None])
        self.head2 = MaskedConv2d(p, channels * classes, (1, 1), group_mask(out_g, g, strict=False)[:, :, None, None])

    @property
    def reach(self) -> int:
        """How far the receptive field extends: a pixel's logits read at most `reach` columns to
        either side in the rows above, `reach` pixels to its left, and `reach + 1` rows up."""
        return sum(layer.k // 2 for layer in self.layers)

    def _embed(self, idx: Tensor) -> Tensor:
        b, c, h, w = idx.shape
        if c != self.channels:
            raise ValueError(f"idx: expected {self.channels} channels, got shape {tuple(idx.shape)}")
        offset = torch.arange(c, device=idx.device)[None, :, None, None] * self.classes
        e = self.embed(idx + offset)                                   # (B, C, H, W, ch)
        return e.permute(0, 1, 4, 2, 3).reshape(b, c * self.ch, h, w)  # (B, C*ch, H, W) group-major

    def _head(self, hs: Tensor) -> Tensor:
        b, _, h, w = hs.shape
        out = self.head2(F.relu(self.head1(F.relu(hs))))               # (B, C*classes, H, W)
        return out.view(b, self.channels, self.classes, h, w)

    def forward(self, idx: Tensor) -> Tensor:
        v = hs = self._embed(idx)
        for layer in self.layers:
            v, hs = layer(v, hs)
        return self._head(hs)

    def row_context(self, above: Tensor) -> list[Tensor]:
        """(B, C, r, W) symbols of the rows just above row i (r >= reach + 1, or all rows when
        fewer exist; r = 0 at the top) -> per layer the shifted vertical pre-activation that the
        horizontal stack reads at row i, each (B, 2p, 1, W) (zeros at the top row)."""
        b, _, r, w = above.shape
        if r == 0:
            zero = self.embed.weight.new_zeros(b, 2 * self.channels * self.ch, 1, w)
            return [zero] * len(self.layers)
        v, ctx = self._embed(above), []
        for layer in self.layers:
            k = layer.k
            v_pre = layer.v_conv(F.pad(v, (k // 2, k // 2, k // 2, 0)))   # (B, 2p, r, W)
            ctx.append(v_pre[:, :, -1:])
            v = _gate(v_pre)
        return ctx

    def row_logits(self, row: Tensor, ctx: list[Tensor]) -> Tensor:
        """(B, C, 1, w) symbols of row i up to and including pixel j (the last column), and
        row_context() cropped to the same w columns -> (B, C, classes) logits at pixel j. Columns
        further left than `reach` do not change the result."""
        hs = self._embed(row)
        for layer, vc in zip(self.layers, ctx):
            k = layer.k
            h_pre = layer.h_conv(F.pad(hs, (k // 2, 0, 0, 0))) + layer.v_to_h(vc)
            h_new = layer.h_out(_gate(h_pre))
            hs = hs + h_new if layer.residual else h_new
        return self._head(hs[..., -1:])[..., 0, 0]                     # (B, C, classes)


def categorical_nll(logits: Tensor, idx: Tensor) -> Tensor:
    """(B, C, K, H, W) logits, (B, C, H, W) targets -> (B,) summed -log p in nats."""
    return F.cross_entropy(logits.float().transpose(1, 2), idx, reduction="none").flatten(1).sum(1)


@torch.no_grad()
def sample_grid(net: GatedPixelCNNNet, n: int, height: int, width: int,
                generator: torch.Generator | None, device: torch.device) -> Tensor:
    """(n, C, height, width) long symbols drawn in raster order, channel by channel. The vertical
    stack runs once per row on the rows above (within reach); each draw runs the horizontal stack
    on the current row's last reach + 1 pixels (see row_context / row_logits)."""
    idx = torch.zeros(n, net.channels, height, width, dtype=torch.long, device=device)
    r = net.reach
    for i in range(height):
        ctx = net.row_context(idx[:, :, max(0, i - r - 1):i])             # per layer (n, 2p, 1, W)
        for j in range(width):
            j0 = max(0, j - r)
            crop = [t[..., j0:j + 1] for t in ctx]
            for c in range(net.channels):
                logits = net.row_logits(idx[:, :, i:i + 1, j0:j + 1], crop)[:, c]   # (n, classes)
                probs = torch.softmax(logits.float(), dim=-1)
                idx[:, c, i, j] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return idx


# ---- the family --------------------------------------------------------------------------------
@dataclass
class Config(BaselineConfig):
    ch: int = 32            # hidden features per colour channel group (the net has ch * in_channels)
    num_layers: int = 12    # gated layers, the first with mask A
    first_kernel: int = 7   # kernel of the first layer (odd; the paper's 7x7)
    kernel: int = 3         # kernel of the later layers (odd)

    def __post_init__(self):
        super().__post_init__()
        check_resolution(self.resolution)
        _check_int("ch", self.ch)
        _check_int("num_layers", self.num_layers)
        _check_kernel("first_kernel", self.first_kernel)
        _check_kernel("kernel", self.kernel)


class PixelCNN(Baseline):
    family = "pixelcnn"
    Config = Config
    has_likelihood = True
    likelihood_kind = "exact"

    def __init__(self, config: Config):
        super().__init__(config)
        c = config
        self.net = GatedPixelCNNNet(c.in_channels, 256, c.ch, c.num_layers, c.first_kernel, c.kernel)

    def nll(self, x: Tensor) -> Tensor:
        """(B,) -log p of the 8-bit image in nats."""
        idx = to_8bit(x)
        return categorical_nll(self.net(idx), idx)

    def train_step(self, x: Tensor, opts: dict[str, torch.optim.Optimizer], step: int,
                   sync_grads: SyncGrads = no_sync) -> dict[str, float]:
        opt = opts["model"]
        opt.zero_grad(set_to_none=True)
        loss = self.nll(x).mean() / x[0].numel()      # nats per sub-pixel
        loss.backward()
        sync_grads(self.parameters())
        opt.step()
        loss = float(loss.detach())
        return {"loss": loss, "bits_per_dim": loss / math.log(2.0)}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        r = self.config.resolution
        idx = sample_grid(self.net, n, r, r, generator, self.net.embed.weight.device)
        return (idx.float() / 127.5 - 1.0).clamp(-1, 1)

    def bits_per_dim(self, x: Tensor) -> Tensor:
        return self.nll(x) / (x[0].numel() * math.log(2.0))
