"""Autoencoder objectives of latent diffusion, apart from the networks they train.

LDM (`ldm/modules/losses/contperceptual.py` for KL, taming's `vqperceptual.py` for VQ):

  generator (optimizer_idx 0), with rec = |x - x'| (or squared) + perceptual_weight * P(x, x'):
      nll  = rec / exp(logvar) + logvar                  (logvar: learnable output log-variance)
      loss = nll + kl_weight * KL          (KL family)   or   nll + codebook_weight * vq_loss (VQ)
             + d_weight * disc_factor * g_loss,           g_loss = -mean D(x')
      d_weight = clamp(||dnll/dW|| / (||dg_loss/dW|| + 1e-4), 0, 1e4) * disc_weight,
                 W = the decoder's last layer (calculate_adaptive_weight)
  discriminator (optimizer_idx 1):
      loss = disc_factor * {hinge | vanilla}(D(x), D(sg[x']))
  disc_factor = 0 before `disc_start` steps, so both adversarial terms vanish then.

Normalisation: every term is a mean per input element (N = C*H*W per image), as the repo's
`kl_autoencoder_loss`: taming's VQ loss already is; LDM's KL loss sums over pixels and is here
divided by N (same balance, so LDM's kl_weight 1e-6 means the same; d_weight scales with the nll,
so the adversarial term keeps its relative size too). The perceptual distance P is per image
and broadcast over pixels, as LDM adds it.

Optimisers are the training stage's: `generator_parameters()` (logvar, when learned) belong with
the autoencoder's optimiser, `discriminator_parameters()` with a second one. The generator loss
also puts gradients into the discriminator (through D(x')); the stage must zero them before the
discriminator step (LDM/Lightning does, by optimiser).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.autoencoder import DiagonalGaussian
from models.checkpoint import check_int, config_from_dict, config_to_dict

__all__ = [
    "DiscNorm",
    "DISC_NORMS",
    "ActNorm",
    "NLayerDiscriminator",
    "hinge_d_loss",
    "vanilla_d_loss",
    "DISC_LOSSES",
    "adopt_weight",
    "calculate_adaptive_weight",
    "AutoencoderLossConfig",
    "AutoencoderLoss",
]

DiscNorm = Literal["batch", "act", "group"]
DISC_NORMS: tuple[str, ...] = get_args(DiscNorm)
Family = Literal["kl", "vq"]
RecLoss = Literal["l1", "l2"]
DiscLoss = Literal["hinge", "vanilla"]

# calculate_adaptive_weight: eps keeps the ratio finite when the adversarial gradient vanishes,
# the clamp keeps a collapsed discriminator from blowing the weight up (LDM's values).
ADAPTIVE_EPS = 1e-4
ADAPTIVE_MAX = 1e4
# pix2pix / taming init: N(0, 0.02) convs, N(1, 0.02) norm scales.
_INIT_STD = 0.02
# GroupNorm option: at most this many groups (the width must be divisible; see _group_norm).
_MAX_GROUPS = 32


class ActNorm(nn.Module):
    """Per-channel affine y = scale * (x + bias), initialised from the first batch so that y has
    zero mean and unit variance per channel (Glow; taming's ActNorm). Batch-size independent,
    unlike BatchNorm, which matters for small per-rank batches."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    def forward(self, x: Tensor) -> Tensor:
        if self.training and not self.initialized:
            # Data-dependent init. Under data parallel each rank sees its own first batch; the
            # first optimizer step's gradient all-reduce does not fix that, so init before wrapping
            # or load a checkpoint (ranks start from identical weights in the repo's stages).
            with torch.no_grad():
                mean = x.mean(dim=(0, 2, 3), keepdim=True)
                std = x.std(dim=(0, 2, 3), keepdim=True)
                self.bias.copy_(-mean)
                self.scale.copy_(1.0 / (std + 1e-6))
                self.initialized.fill_(1)
        return self.scale * (x + self.bias)


def _group_norm(channels: int) -> nn.GroupNorm:
    groups = math.gcd(_MAX_GROUPS, channels)
    return nn.GroupNorm(groups, channels)


def _norm(kind: str, channels: int) -> nn.Module:
    return {"batch": nn.BatchNorm2d, "act": ActNorm, "group": _group_norm}[kind](channels)


class NLayerDiscriminator(nn.Module):
    """PatchGAN (pix2pix, Isola et al. 2017; taming/LDM): (B, in_channels, H, W) -> (B, 1, H', W')
    logits, one per overlapping patch (receptive field 70x70 for n_layers=3)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "act"):
        super().__init__()
        check_int("in_channels", in_channels)
        check_int("ndf", ndf)
        check_int("n_layers", n_layers)
        if norm not in DISC_NORMS:
            raise ValueError(f"norm: expected one of {DISC_NORMS}, got {norm!r}")
        kw, pad = 4, 1
        # No bias before a norm layer (it would be cancelled); BatchNorm is the pix2pix choice.
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, kw, 2, pad), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last block keeps the resolution
            layers += [nn.Conv2d(ndf * prev, ndf * mult, kw, stride, pad, bias=False),
                       _norm(norm, ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, kw, 1, pad))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, _INIT_STD)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, _INIT_STD)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x')))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (mean softplus(-D(x)) + mean softplus(D(x'))): the non-saturating GAN's BCE."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


DISC_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def adopt_weight(weight: float, step: int, start: int) -> float:
    """weight from step `start` on, 0 before."""
    return weight if step >= start else 0.0


def calculate_adaptive_weight(nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor,
                              disc_weight: float = 1.0) -> Tensor:
    """clamp(||dnll/dW|| / (||dg/dW|| + 1e-4), 0, 1e4) * disc_weight, detached; W = last_layer.

    Balances the adversarial gradient against the reconstruction gradient where they meet the
    decoder's output. Both graphs are kept (retain_graph) for the caller's backward.
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = torch.linalg.vector_norm(nll_grad) / (torch.linalg.vector_norm(g_grad) + ADAPTIVE_EPS)
    return w.clamp(0.0, ADAPTIVE_MAX).detach() * disc_weight


def _check_weight(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return float(value)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


@dataclass
class AutoencoderLossConfig:
    family: str = "kl"  # "kl": kl_weight * KL; "vq": codebook_weight * the quantiser's loss
    rec_loss: str = "l1"  # pixel term: "l1" |x - x'| (LDM) or "l2" (x - x')^2
    perceptual_weight: float = 1.0  # LDM 1.0; 0 skips the perceptual net entirely
    logvar_init: float = 0.0  # initial output log-variance
    learn_logvar: bool = False  # LDM declares logvar a Parameter but never hands it to an optimiser
    kl_weight: float = 1e-6  # KL family; per element, see the module docstring
    codebook_weight: float = 1.0  # VQ family
    disc_start: int = 50001  # first step with adversarial terms (LDM's KL-f8 config)
    disc_weight: float = 0.5  # multiplies the adaptive weight (LDM KL configs 0.5, VQ 0.75..1.0)
    disc_factor: float = 1.0  # multiplies both adversarial terms once active
    disc_loss: str = "hinge"  # "hinge" | "vanilla"
    disc_in_channels: int = 3
    disc_ndf: int = 64
    disc_num_layers: int = 3
    disc_norm: str = "act"  # "batch" (pix2pix) | "act" (taming's use_actnorm) | "group"
    adaptive_weight: bool = True  # False: d_weight = disc_weight (no gradient balancing)

    def __post_init__(self):
        _check_choice("family", self.family, get_args(Family))
        _check_choice("rec_loss", self.rec_loss, get_args(RecLoss))
        _check_choice("disc_loss", self.disc_loss, get_args(DiscLoss))
        _check_choice("disc_norm", self.disc_norm, DISC_NORMS)
        for name in ("perceptual_weight", "kl_weight", "codebook_weight", "disc_weight", "disc_factor"):
            setattr(self, name, _check_weight(name, getattr(self, name)))
        if isinstance(self.logvar_init, bool) or not isinstance(self.logvar_init, (int, float)) \
                or not math.isfinite(self.logvar_init):
            raise ValueError(f"logvar_init: expected a finite number, got {self.logvar_init!r}")
        self.logvar_init = float(self.logvar_init)
        for name in ("learn_logvar", "adaptive_weight"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        check_int("disc_start", self.disc_start, minimum=0)
        check_int("disc_in_channels", self.disc_in_channels)
        check_int("disc_ndf", self.disc_ndf)
        check_int("disc_num_layers", self.disc_num_layers)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutoencoderLossConfig:
        return config_from_dict(cls, d)


class AutoencoderLoss(nn.Module):
    """The LDM autoencoder objective with its PatchGAN; see the module docstring.

    perceptual: a module (x, y) -> (B,) distances; by default (perceptual_weight > 0) the
    EfficientNet-Lite0 PerceptualLoss of models/perceptual.py. Pass one to share it or, in tests,
    a cheap stand-in.
    """

    def __init__(self, config: AutoencoderLossConfig, perceptual: nn.Module | None = None):
        super().__init__()
        self.config = c = config
        if perceptual is None and c.perceptual_weight > 0:
            from models.perceptual import PerceptualLoss

            perceptual = PerceptualLoss()
        self.perceptual = perceptual if c.perceptual_weight > 0 else None
        self.logvar = nn.Parameter(torch.tensor(c.logvar_init), requires_grad=c.learn_logvar)
        self.discriminator = NLayerDiscriminator(c.disc_in_channels, c.disc_ndf, c.disc_num_layers, c.disc_norm)
        self._d_loss = DISC_LOSSES[c.disc_loss]

    def generator_parameters(self) -> list[nn.Parameter]:
        """For the autoencoder's optimiser: the output log-variance when learned, else nothing."""
        return [self.logvar] if self.config.learn_logvar else []

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters())

    def discriminator_active(self, step: int) -> bool:
        """Whether adversarial terms count at `step`; the stage may skip the discriminator step before."""
        return adopt_weight(self.config.disc_factor, step, self.config.disc_start) > 0

    def _rec(self, x: Tensor, recon: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(rec per element (B, C, H, W), pixel term mean, perceptual mean), float32."""
        diff = x.float() - recon.float()
        pix = diff.abs() if self.config.rec_loss == "l1" else diff.square()
        rec, p_loss = pix, pix.new_zeros(())
        if self.perceptual is not None:
            p = self.perceptual(x.float(), recon.float())  # (B,)
            rec = pix + self.config.perceptual_weight * p.view(-1, 1, 1, 1)
            p_loss = p.mean()
        return rec, pix.mean(), p_loss

    def generator_loss(
        self, x: Tensor, recon: Tensor, *, step: int, last_layer: Tensor | None = None,
        posterior: DiagonalGaussian | None = None, codebook_loss: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """optimizer_idx 0. x, recon: (B, C, H, W) in [-1, 1]. KL family needs `posterior`, VQ
        `codebook_loss` (the quantiser's scalar). `last_layer`: the decoder's output weight
        (e.g. model.decoder.conv_out.weight), needed for the adaptive weight once active.
        Returns (loss, logs); logs are detached () tensors (.item() when logging)."""
        c = self.config
        if x.shape != recon.shape:
            raise ValueError(f"recon: expected the shape of x {tuple(x.shape)}, got {tuple(recon.shape)}")
        rec, pix, p_loss = self._rec(x, recon)
        nll = (rec / torch.exp(self.logvar) + self.logvar).mean()
        if c.family == "kl":
            if posterior is None:
                raise ValueError("posterior: the KL family needs the encoder's posterior")
            reg = posterior.kl().float().mean() / x[0].numel()
            loss = nll + c.kl_weight * reg
        else:
            if codebook_loss is None:
                raise ValueError("codebook_loss: the VQ family needs the quantiser's loss")
            reg = codebook_loss.float().mean()
            loss = nll + c.codebook_weight * reg
        disc_factor = adopt_weight(c.disc_factor, step, c.disc_start)
        zero = loss.new_zeros(())
        g_loss, d_weight = zero, zero
        if disc_factor > 0:
            # Only from disc_start on: before it the term is exactly 0 and D need not run.
            g_loss = -self.discriminator(recon.float()).mean()
            if not c.adaptive_weight:
                d_weight = zero + c.disc_weight
            elif torch.is_grad_enabled():
                if last_layer is None:
                    raise ValueError("last_layer: the adaptive weight needs the decoder's last layer weight")
                d_weight = calculate_adaptive_weight(nll, g_loss, last_layer, c.disc_weight)
            # Under no_grad (validation) there is no gradient to balance: LDM logs d_weight = 0 there.
            loss = loss + d_weight * disc_factor * g_loss
        logs = {
            "total_loss": loss, "logvar": self.logvar, "nll_loss": nll, "rec_loss": pix,
            "p_loss": p_loss, ("kl_loss" if c.family == "kl" else "codebook_loss"): reg,
            "d_weight": d_weight, "disc_factor": zero + disc_factor, "g_loss": g_loss,
        }
        return loss, {k: v.detach().clone() for k, v in logs.items()}

    def discriminator_loss(self, x: Tensor, recon: Tensor, *, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """optimizer_idx 1: disc_factor * d_loss(D(x), D(sg[recon])). Before disc_start it is 0
        times the loss, so backward still works (and leaves zero gradients)."""
        c = self.config
        logits_real = self.discriminator(x.detach().float())
        logits_fake = self.discriminator(recon.detach().float())
        disc_factor = adopt_weight(c.disc_factor, step, c.disc_start)
        loss = disc_factor * self._d_loss(logits_real, logits_fake)
        logs = {"disc_loss": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return loss, {k: v.detach().clone() for k, v in logs.items()}

    def forward(self, x: Tensor, recon: Tensor, optimizer_idx: int, step: int, **kw) -> tuple[Tensor, dict[str, Tensor]]:
        """LDM's single entry point: optimizer_idx 0 -> generator_loss(**kw), 1 -> discriminator_loss."""
        if optimizer_idx == 0:
            return self.generator_loss(x, recon, step=step, **kw)
        if optimizer_idx == 1:
            return self.discriminator_loss(x, recon, step=step)
        raise ValueError(f"optimizer_idx: expected 0 or 1, got {optimizer_idx!r}")
