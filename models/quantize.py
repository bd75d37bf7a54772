"""Vector quantisation of latents (VQ-VAE, van den Oord et al. 2017; VQGAN / LDM's VQModel).

z: (B, D, h, w) continuous encoder output; each of the B*h*w vectors of width D is replaced by its
nearest code e_k of a learned codebook (K, D). Gradients pass straight through
(z_q = z + sg[e - z]), and the loss pulls codes and encoder outputs together:

    loss = ||sg[z] - e||^2 + beta * ||z - sg[e]||^2      (means over elements)

Options (QuantizerConfig):
  * ema: the codebook follows exponential moving averages of the encoder outputs assigned to each
    code (VQ-VAE-2 / Sonnet's VectorQuantizerEMA) instead of gradients; the loss is then only the
    commitment term beta * ||z - sg[e]||^2 and the codebook is a buffer, not a parameter.
  * l2_normalize: codes and inputs live on the unit sphere and the lookup is by cosine similarity
    (ViT-VQGAN, Yu et al. 2021; "improved VQGAN"): it keeps the codebook from collapsing onto a
    few large-norm codes.
  * dead_code_steps > 0: a code that no vector (on any rank) picked for that many consecutive
    training steps is restarted at a random encoder output of the current batch (Jukebox-style
    restarts).

Data parallel: pass `all_reduce`, a callable that returns the sum of a tensor over all ranks
(e.g. `torch_all_reduce_sum` below, or a wrapper around any other collective; models/ stays free
of Ray). Code counts, EMA statistics and the dead-code clock are then computed from the global
batch, so every rank updates its codebook buffers identically. Restart candidates are drawn on
rank 0 only and spread with the same all_reduce (every other rank contributes zeros), so the
replacement is the same everywhere; pass `rank` for that. Without all_reduce each rank updates
from its own batch and the codebooks drift apart: do not use ema / restarts under data parallel
without it (gradient-trained codebooks are fine, the gradient all-reduce keeps them equal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.checkpoint import check_int, config_from_dict, config_to_dict

__all__ = ["QuantizerConfig", "VectorQuantizer", "QuantizerOutput", "AllReduce", "torch_all_reduce_sum"]

# Sum of a tensor over all data-parallel ranks; returns the summed tensor (may be the same object).
AllReduce = Callable[[Tensor], Tensor]

# Keeps F.normalize away from 0/0 for an all-zero vector.
_NORM_EPS = 1e-6


def _check_float(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
                 high_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lb, rb = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name}: expected a number in {lb}{low}, {high}{rb}, got {value!r}")
    return float(value)


@dataclass
class QuantizerConfig:
    codebook_size: int = 512  # K, number of codes
    code_dim: int = 4  # D, width of a code = channels of the quantised latent
    beta: float = 0.25  # commitment weight (VQ-VAE's beta; LDM/taming use 0.25)
    ema: bool = False  # codebook by EMA of assigned encoder outputs instead of gradients
    ema_decay: float = 0.99  # EMA decay of cluster sizes and code sums
    ema_epsilon: float = 1e-5  # Laplace smoothing of cluster sizes, so an empty code does not divide by 0
    l2_normalize: bool = False  # unit-norm codes and inputs, cosine-similarity lookup
    dead_code_steps: int = 0  # restart codes unused for this many training steps; 0 = never

    def __post_init__(self):
        check_int("codebook_size", self.codebook_size)
        check_int("code_dim", self.code_dim)
        self.beta = _check_float("beta", self.beta, 0.0, math.inf)
        for name in ("ema", "l2_normalize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        self.ema_decay = _check_float("ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)
        self.ema_epsilon = _check_float("ema_epsilon", self.ema_epsilon, 0.0, math.inf, low_open=True)
        check_int("dead_code_steps", self.dead_code_steps, minimum=0)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantizerConfig:
        return config_from_dict(cls, d)


@dataclass
class QuantizerOutput:
    z_q: Tensor  # (B, D, h, w) quantised latent; straight-through gradient to the input
    loss: Tensor  # () codebook + commitment loss (commitment only with ema)
    indices: Tensor  # (B, h, w) long, chosen code per position
    # Detached () tensors for logging (no device sync until the caller calls .item()):
    # perplexity = exp(entropy of the batch's code histogram), in [1, K];
    # usage = fraction of codes used by this batch; dead = codes past dead_code_steps before the
    # restart; restarted = codes restarted this step. Global over ranks when all_reduce is given.
    stats: dict[str, Tensor]


def torch_all_reduce_sum(t: Tensor) -> Tensor:
    """Sum over the default torch.distributed process group (what Ray Train's DDP sets up)."""
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


class VectorQuantizer(nn.Module):
    """(B, D, h, w) -> QuantizerOutput; see the module docstring for the loss and options.

    Buffers (all in the state dict, so a resume continues the EMA and the dead-code clock):
    `codebook` (K, D) is a Parameter without ema and a buffer with it; `cluster_size` (K,) and
    `embed_sum` (K, D) hold the EMA statistics; `steps_unused` (K,) counts training steps since
    each code was last picked.
    """

    def __init__(self, config: QuantizerConfig):
        super().__init__()
        self.config = config
        k, d = config.codebook_size, config.code_dim
        # taming's init: uniform in +-1/K, small against typical encoder outputs so that early
        # assignments spread by direction. Unit-norm codes start as random directions.
        init = torch.randn(k, d) if config.l2_normalize else torch.empty(k, d).uniform_(-1.0 / k, 1.0 / k)
        if config.l2_normalize:
            init = F.normalize(init, dim=1)
        if config.ema:
            self.register_buffer("codebook", init)
            # Start the averages at the init with unit mass each, so the first updates blend with it.
            self.register_buffer("cluster_size", torch.ones(k))
            self.register_buffer("embed_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("steps_unused", torch.zeros(k, dtype=torch.long))

    def _lookup_space(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(N, D) inputs and (K, D) codes in the space where distances are taken (float32)."""
        flat, codes = z.float(), self.codebook.float()
        if self.config.l2_normalize:
            flat, codes = F.normalize(flat, dim=1, eps=_NORM_EPS), F.normalize(codes, dim=1, eps=_NORM_EPS)
        return flat, codes

    def nearest(self, flat: Tensor, codes: Tensor) -> Tensor:
        """Index of the nearest code for each row of flat (N, D) -> (N,) long."""
        if self.config.l2_normalize:
            return (flat @ codes.t()).argmax(dim=1)  # max cosine similarity == min distance on the sphere
        # ||z||^2 - 2 z.e + ||e||^2 without materialising (N, K, D) differences.
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)[None]
        return dist.argmin(dim=1)

    def codes_from_indices(self, indices: Tensor) -> Tensor:
        """(B, h, w) long -> (B, D, h, w) codes (unit-norm with l2_normalize), e.g. for a prior's samples."""
        codes = self.codebook
        if self.config.l2_normalize:
            codes = F.normalize(codes, dim=1, eps=_NORM_EPS)
        return codes[indices].permute(0, 3, 1, 2).contiguous()

    def forward(self, z: Tensor, *, all_reduce: AllReduce | None = None, rank: int = 0,
                update: bool | None = None) -> QuantizerOutput:
        """update: run the EMA / dead-code step (default: in training mode). Decoding a sample
        passes False so that it never moves the codebook."""
        c = self.config
        if z.ndim != 4 or z.shape[1] != c.code_dim:
            raise ValueError(f"z: expected (B, {c.code_dim}, h, w), got {tuple(z.shape)}")
        b, d, h, w = z.shape
        flat_in = z.permute(0, 2, 3, 1).reshape(-1, d)  # (N, D), N = B*h*w
        flat, codes = self._lookup_space(flat_in)
        with torch.no_grad():
            idx = self.nearest(flat, codes)  # (N,)
        e = codes[idx]  # (N, D) float32; carries the codebook gradient unless ema
        if c.ema:
            loss = c.beta * F.mse_loss(flat, e.detach())
        else:
            loss = F.mse_loss(e, flat.detach()) + c.beta * F.mse_loss(flat, e.detach())
        # Straight-through: forward value e, gradient of the identity to the (normalised) input.
        q = flat + (e - flat).detach()
        z_q = q.to(z.dtype).view(b, h, w, d).permute(0, 3, 1, 2).contiguous()

        counts = torch.bincount(idx, minlength=c.codebook_size).float()  # (K,)
        if all_reduce is not None:
            counts = all_reduce(counts)
        stats = {}
        if self.training if update is None else update:
            stats = self._train_step(flat.detach(), idx, counts, all_reduce, rank)
        p = counts / counts.sum().clamp_min(1.0)
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
        stats = {"perplexity": entropy.exp(), "usage": (counts > 0).float().mean(), **stats}
        return QuantizerOutput(z_q, loss, idx.view(b, h, w), {k: v.detach() for k, v in stats.items()})

    @torch.no_grad()
    def _train_step(self, flat: Tensor, idx: Tensor, counts: Tensor, all_reduce: AllReduce | None,
                    rank: int) -> dict[str, Tensor]:
        """EMA update and dead-code restarts; counts (K,) are already global."""
        c = self.config
        if c.ema:
            # Sums of the assigned inputs per code: (K, D).
            embed_sum = torch.zeros(c.codebook_size, c.code_dim, device=flat.device).index_add_(0, idx, flat)
            if all_reduce is not None:
                embed_sum = all_reduce(embed_sum)
            self.cluster_size.mul_(c.ema_decay).add_(counts, alpha=1 - c.ema_decay)
            self.embed_sum.mul_(c.ema_decay).add_(embed_sum, alpha=1 - c.ema_decay)
            # Laplace smoothing: (n_k + eps) / (n + K eps) * n keeps the total mass n but no n_k is 0.
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + c.ema_epsilon) / (n + c.codebook_size * c.ema_epsilon) * n
            self.codebook.copy_(self.embed_sum / smoothed[:, None])
        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        stats: dict[str, Tensor] = {}
        if c.dead_code_steps:
            dead = self.steps_unused >= c.dead_code_steps  # (K,) bool, identical on all ranks
            stats["dead"] = dead.sum().float()
            stats["restarted"] = self._restart(flat, dead, all_reduce, rank)
        return stats

    def _restart(self, flat: Tensor, dead: Tensor, all_reduce: AllReduce | None, rank: int) -> Tensor:
        """Replace dead codes by random rows of this batch's flat (N, D) inputs; returns how many.

        The number of dead codes is known on every rank without communication (dead is global), so
        every rank joins the same collective or none: no rank can hang in an all_reduce alone.
        """
        num = int(dead.sum())  # one sync per training step, only when restarts are on
        if num == 0:
            return torch.zeros((), device=flat.device)
        n = flat.shape[0]
        # Without replacement when the batch has enough vectors, so restarted codes differ.
        pick = torch.randperm(n, device=flat.device)[:num] if n >= num else torch.randint(n, (num,), device=flat.device)
        candidates = flat[pick]  # (num, D)
        if all_reduce is not None:
            # A broadcast from rank 0 made of a sum: the others add zeros.
            if rank != 0:
                candidates = torch.zeros_like(candidates)
            candidates = all_reduce(candidates)
        if self.config.ema:
            # Unit mass at the new position, so the next EMA update starts from it.
            self.cluster_size[dead] = 1.0
            self.embed_sum[dead] = candidates
        self.codebook.data[dead] = candidates.to(self.codebook.dtype)
        self.steps_unused[dead] = 0
        return torch.tensor(float(num), device=flat.device)
