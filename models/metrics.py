"""Reconstruction and sample-quality metrics, pure torch.

Images are (B, C, H, W) in [-1, 1] (data range 2) unless a data_range is given.

  * psnr, ssim: per image, (B,). SSIM is Wang et al. 2004 with an 11x11 Gaussian window
    (sigma 1.5), K1 = 0.01, K2 = 0.03, population (co)variances, averaged over the "valid"
    positions (where the window fits) and then over channels: equal to skimage's
    structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=...) with channel_axis, which the tests check.
  * Frechet distance between Gaussian fits of two feature sets, from running FeatureStats
    (float64 sums, so features are never all held in memory; mergeable across ranks).
  * Feature extractors: EfficientNetLite0PooledFeatures (1280-d global-pooled penultimate
    activations of the offline ImageNet EfficientNet-Lite0). Frechet distance on these is
    "FD-EffNetLite0": it is NOT Inception FID and its values are not comparable to published FIDs.
    InceptionV3PooledFeatures (2048-d) needs a user-supplied torchvision inception_v3 weight file;
    even then it is torchvision's Inception, not the TF graph of the FID papers (pytorch-fid's
    pt_inception weights), so numbers are close to, not equal to, published FID.
  * k-NN precision / recall (Kynkaanniemi et al. 2019) on feature sets.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DATA_RANGE",
    "psnr",
    "ssim",
    "gaussian_window",
    "FeatureStats",
    "frechet_distance",
    "sqrtm_psd",
    "EfficientNetLite0PooledFeatures",
    "InceptionV3PooledFeatures",
    "knn_precision_recall",
]

DATA_RANGE = 2.0  # images in [-1, 1]
# Wang et al. 2004: window and stabilising constants.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
# Feature extractor input sizes: the nets' ImageNet training resolutions.
EFFICIENTNET_INPUT_SIZE = 224
INCEPTION_INPUT_SIZE = 299


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"x, y: expected two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def psnr(x: Tensor, y: Tensor, data_range: float = DATA_RANGE) -> Tensor:
    """10 log10(range^2 / MSE) per image: (B,) float64; +inf for identical images."""
    _check_pair(x, y)
    mse = (x.double() - y.double()).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(data_range**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    """Normalised 1-D Gaussian (size,) float64, sampled at integer offsets from the centre."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: Tensor, y: Tensor, data_range: float = DATA_RANGE, *, window: int = SSIM_WINDOW,
         sigma: float = SSIM_SIGMA, k1: float = SSIM_K1, k2: float = SSIM_K2) -> Tensor:
    """Mean SSIM per image, (B,) float64 (see the module docstring). H, W >= window."""
    _check_pair(x, y)
    b, c, h, w = x.shape
    if h < window or w < window:
        raise ValueError(f"x: SSIM needs H, W >= window {window}, got {h}x{w}")
    g = gaussian_window(window, sigma).to(x.device)
    # Separable blur of all five moments at once, per channel: (5*B*C, 1, H, W) -> valid part.
    xd, yd = x.double(), y.double()
    stack = torch.stack([xd, yd, xd * xd, yd * yd, xd * yd]).reshape(-1, 1, h, w)
    blur = F.conv2d(F.conv2d(stack, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))
    mu_x, mu_y, xx, yy, xy = blur.reshape(5, b, c, h - window + 1, w - window + 1)
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=(2, 3)).mean(dim=1)


class FeatureStats:
    """Running n, sum and sum of outer products of (N, D) features, in float64.

    mean = sum / n; cov = (S - n mean mean^T) / (n - 1) (unbiased, as numpy.cov in pytorch-fid).
    Data parallel: each rank accumulates its share; `merge` adds another accumulator, or sum
    `as_tensor()` over ranks with any all-reduce and rebuild with `from_tensor`.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected a positive int, got {dim!r}")
        self.dim = dim
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: Tensor) -> None:
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features: expected (N, {self.dim}), got {tuple(features.shape)}")
        f = features.detach().to(self.sum.device, torch.float64)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.t() @ f

    def merge(self, other: FeatureStats) -> FeatureStats:
        if other.dim != self.dim:
            raise ValueError(f"other: feature dims differ ({other.dim} vs {self.dim})")
        self.n += other.n
        self.sum += other.sum.to(self.sum.device)
        self.outer += other.outer.to(self.sum.device)
        return self

    def as_tensor(self) -> Tensor:
        """[n, sum (D), outer (D*D)] flat float64, for an all-reduce sum."""
        return torch.cat([self.sum.new_tensor([self.n]), self.sum, self.outer.flatten()])

    @classmethod
    def from_tensor(cls, t: Tensor, dim: int) -> FeatureStats:
        stats = cls(dim, t.device)
        stats.n = int(round(t[0].item()))
        stats.sum.copy_(t[1: 1 + dim])
        stats.outer.copy_(t[1 + dim:].view(dim, dim))
        return stats

    def mean(self) -> Tensor:
        if self.n < 1:
            raise ValueError("FeatureStats: no features accumulated")
        return self.sum / self.n

    def cov(self) -> Tensor:
        if self.n < 2:
            raise ValueError(f"FeatureStats: a covariance needs >= 2 features, have {self.n}")
        mu = self.mean()
        return (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)


def sqrtm_psd(a: Tensor) -> Tensor:
    """Square root of a symmetric PSD matrix by eigen-decomposition; tiny negative eigenvalues
    (round-off of a rank-deficient covariance) are clipped to 0."""
    a = 0.5 * (a + a.T)
    vals, vecs = torch.linalg.eigh(a)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.

    tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix S1^(1/2) S2 S1^(1/2), which has the same eigenvalues as S1 S2: no non-symmetric
    sqrtm, no complex round-off to discard (pytorch-fid's scipy.linalg.sqrtm path), and singular
    covariances (fewer samples than dimensions) are fine.
    """
    mu1, mu2, s1, s2 = (t.detach().double() for t in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"mu/sigma: shapes disagree: {tuple(mu1.shape)}, {tuple(s1.shape)}, {tuple(mu2.shape)}, {tuple(s2.shape)}")
    r1 = sqrtm_psd(s1)
    m = r1 @ s2 @ r1
    tr_covmean = torch.linalg.eigvalsh(0.5 * (m + m.T)).clamp_min(0).sqrt().sum()
    d = (mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean
    return float(d.clamp_min(0))


class _FrozenExtractor(nn.Module):
    def train(self, mode: bool = True):
        nn.Module.train(self, mode)
        self.net.eval()  # a frozen pretrained net never leaves eval mode
        return self


class EfficientNetLite0PooledFeatures(_FrozenExtractor):
    """(B, 3, H, W) in [-1, 1] -> (B, 1280) float32: global-average-pooled activations of the
    last conv (the classifier's input). Images are resized (bilinear, antialiased) to 224, the
    net's ImageNet resolution, then ImageNet-normalised. For "FD-EffNetLite0", NOT Inception FID.
    """

    dim = 1280
    metric_name = "fd_effnet_lite0"  # log under this name, never "fid"

    def __init__(self, weights_path: str | Path | None = None, resize_to: int | None = EFFICIENTNET_INPUT_SIZE):
        super().__init__()
        from models.perceptual import IMAGENET_MEAN, IMAGENET_STD, load_efficientnet_lite0

        # NHWC: EfficientNet's depthwise convs run ~1.4x faster in it on the CPU (oneDNN; 16 images
        # at 224, 1 thread: 1.16 -> 0.83 s, features equal to 8e-6); the AE stage's rFD evaluation
        # spends most of its time here. The input is made NHWC in forward.
        self.net = load_efficientnet_lite0(weights_path).to(memory_format=torch.channels_last)
        self.resize_to = resize_to
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"x: expected (B, 3, H, W) in [-1, 1], got {tuple(x.shape)}")
        x = x.float()
        if self.resize_to is not None and x.shape[-2:] != (self.resize_to, self.resize_to):
            x = F.interpolate(x, size=(self.resize_to, self.resize_to), mode="bilinear",
                              align_corners=False, antialias=True)
        h = (((x + 1) / 2 - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        return self.net.extract_features(h).mean(dim=(2, 3))  # (B, 1280, h, w) -> (B, 1280)


class InceptionV3PooledFeatures(_FrozenExtractor):
    """torchvision InceptionV3 pool3 features (B, 2048) from a user-supplied state-dict file
    (torchvision's inception_v3_google-*.pth); nothing is downloaded. See the module docstring
    for how this differs from the FID papers' Inception."""

    dim = 2048
    metric_name = "fid_torchvision_inception"

    def __init__(self, weights_path: str | Path | None):
        super().__init__()
        if weights_path is None:
            raise ValueError(
                "weights_path: InceptionV3 features need a torchvision inception_v3 state dict file; "
                "none is shipped or downloaded (use EfficientNetLite0PooledFeatures offline)"
            )
        if not Path(weights_path).is_file():
            raise FileNotFoundError(f"weights_path: no file at {weights_path}")
        import torchvision

        # transform_input=True: torchvision's ImageNet weights expect its re-normalisation of
        # ImageNet-normalised input to the [-1, 1] range the original Inception was trained on.
        self.net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False,
                                                   transform_input=True)
        self.net.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        self.net.fc = nn.Identity()
        self.net.eval().requires_grad_(False)
        from models.perceptual import IMAGENET_MEAN, IMAGENET_STD

        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"x: expected (B, 3, H, W) in [-1, 1], got {tuple(x.shape)}")
        x = F.interpolate(x.float(), size=(INCEPTION_INPUT_SIZE,) * 2, mode="bilinear", align_corners=False)
        return self.net(((x + 1) / 2 - self.mean) / self.std)  # eval: logits of fc=Identity, (B, 2048)


def _kth_nn_radii(f: Tensor, k: int, chunk: int) -> Tensor:
    """Distance from each row of f (N, D) to its k-th nearest other row: (N,)."""
    radii = []
    for i in range(0, f.shape[0], chunk):
        d = torch.cdist(f[i: i + chunk], f)  # (n, N); the row itself is at distance 0, index 0 of topk
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def _coverage(queries: Tensor, support: Tensor, radii: Tensor, chunk: int) -> Tensor:
    """Fraction of queries inside at least one ball (support_j, radii_j)."""
    inside = []
    for i in range(0, queries.shape[0], chunk):
        d = torch.cdist(queries[i: i + chunk], support)  # (n, M)
        inside.append((d <= radii[None]).any(dim=1))
    return torch.cat(inside).double().mean()


def knn_precision_recall(real: Tensor, fake: Tensor, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of fake against real features.

    Each set's manifold is the union of balls around its points with radius = distance to the
    k-th nearest neighbour in the same set (k = 3 in the paper). precision = fraction of fake
    points inside the real manifold; recall = fraction of real points inside the fake manifold.
    real (N, D), fake (M, D); distances in float64, chunked to bound memory at chunk x N.
    """
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"real, fake: expected (N, D) and (M, D), got {tuple(real.shape)} and {tuple(fake.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k >= min(len(real), len(fake)):
        raise ValueError(f"k: expected an int in [1, min(N, M)), got {k!r}")
    r, f = real.detach().double(), fake.detach().double()
    precision = _coverage(f, r, _kth_nn_radii(r, k, chunk), chunk)
    recall = _coverage(r, f, _kth_nn_radii(f, k, chunk), chunk)
    return float(precision), float(recall)
