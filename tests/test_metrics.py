import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.metrics import (
    EfficientNetLite0PooledFeatures,
    FeatureStats,
    InceptionV3PooledFeatures,
    frechet_distance,
    knn_precision_recall,
    psnr,
    sqrtm_psd,
    ssim,
)


def test_psnr_by_hand():
    x = torch.zeros(2, 3, 4, 4)
    y = x.clone()
    y[0] += 0.1  # MSE 0.01 -> 10 log10(4 / 0.01) = 26.02 dB
    p = psnr(x, y)
    assert p[0].item() == pytest.approx(10 * math.log10(4 / 0.01))
    assert math.isinf(p[1].item())
    assert psnr(x, y, data_range=1.0)[0].item() == pytest.approx(20.0)
    with pytest.raises(ValueError, match="^x, y:"):
        psnr(x, y[:, :2])


def _structured(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
    base = torch.stack([torch.sin(4 * xx), torch.cos(3 * yy), (xx * yy > 0).float() * 2 - 1])
    return (base + 0.3 * torch.randn(3, n, n, generator=g)).clamp(-1, 1)[None]


def test_ssim_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    torch.manual_seed(0)
    x = torch.cat([_structured(seed=0), torch.rand(1, 3, 24, 24) * 2 - 1])
    y = torch.cat([(x[:1] + 0.2 * torch.randn(1, 3, 24, 24)).clamp(-1, 1), x[1:].flip(-1)])
    ours = ssim(x, y)
    for i in range(2):
        ref = metrics.structural_similarity(
            x[i].numpy().astype(np.float64), y[i].numpy().astype(np.float64), channel_axis=0,
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=2.0,
        )
        assert ours[i].item() == pytest.approx(ref, abs=1e-10)


def test_ssim_properties():
    x = _structured()
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    assert ssim(x, x).item() == pytest.approx(1.0)
    assert ssim(x, y).item() == pytest.approx(ssim(y, x).item())
    assert ssim(x, y).item() < ssim(x, (x + 0.05 * torch.randn_like(x)).clamp(-1, 1)).item() < 1.0
    # Hand case: constant images a, b: SSIM = (2ab + C1) / (a^2 + b^2 + C1) (no variance terms).
    a, b, c1 = 0.5, -0.2, (0.01 * 2.0) ** 2
    got = ssim(torch.full((1, 1, 11, 11), a), torch.full((1, 1, 11, 11), b)).item()
    assert got == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))
    with pytest.raises(ValueError, match="window"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_frechet_distance_closed_form_for_diagonal_covariances():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    s1, s2 = (torch.rand(5, generator=g, dtype=torch.float64) + 0.1 for _ in range(2))
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum()
    got = frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2))
    assert got == pytest.approx(expected.item(), rel=1e-10)
    assert frechet_distance(mu1, torch.diag(s1), mu1, torch.diag(s1)) == pytest.approx(0.0, abs=1e-12)


def test_frechet_distance_matches_scipy_sqrtm_for_full_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randn(40, 6, generator=g, dtype=torch.float64)
    s1, s2 = a.T @ a / 40, b.T @ b / 40 + 0.1 * torch.eye(6, dtype=torch.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    covmean = linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    ref = ((mu1 - mu2) ** 2).sum().item() + np.trace(s1.numpy() + s2.numpy() - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)
    r = sqrtm_psd(s1)
    assert torch.allclose(r @ r, s1, atol=1e-10)


def test_feature_stats_match_numpy_and_merge():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(50, 4, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0]) + 1.0
    whole = FeatureStats(4)
    for chunk in feats.split(7):
        whole.update(chunk)
    assert whole.n == 50
    assert np.allclose(whole.mean().numpy(), feats.double().numpy().mean(0))
    assert np.allclose(whole.cov().numpy(), np.cov(feats.double().numpy(), rowvar=False))
    # Two "ranks" summed (merge, or an all-reduce of as_tensor) equal one accumulator.
    a, b = FeatureStats(4), FeatureStats(4)
    a.update(feats[:20])
    b.update(feats[20:])
    summed = FeatureStats.from_tensor(a.as_tensor() + b.as_tensor(), 4)
    assert summed.n == 50 and torch.allclose(summed.cov(), whole.cov())
    assert torch.allclose(a.merge(b).cov(), whole.cov())
    with pytest.raises(ValueError, match="^features:"):
        whole.update(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="covariance"):
        FeatureStats(4).cov()


@pytest.fixture(scope="module")
def effnet():
    return EfficientNetLite0PooledFeatures()


def test_efficientnet_features(effnet):
    torch.manual_seed(0)
    x = torch.cat([_structured(32, seed=s) for s in range(3)])
    both = effnet(torch.cat([x, (x * 0.5 + 0.4).clamp(-1, 1)]))  # one pass: these and a colour cast
    f, f_cast = both[:3], both[3:]
    assert f.shape == (3, 1280) and f.dtype == torch.float32
    assert torch.allclose(effnet(x[:1]), f[:1], atol=1e-4)  # per-image (eval BatchNorm)
    assert not torch.allclose(f[0], f[1])
    assert effnet.metric_name != "fid" and "effnet" in effnet.metric_name
    effnet.train()
    assert not effnet.net.training
    # Frechet distance of a set against itself is 0; against a shifted colour cast it is not.
    stats_a, stats_b = FeatureStats(1280), FeatureStats(1280)
    stats_a.update(f)
    stats_b.update(f_cast)
    fd_same = frechet_distance(stats_a.mean(), stats_a.cov(), stats_a.mean(), stats_a.cov())
    assert fd_same == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(stats_a.mean(), stats_a.cov(), stats_b.mean(), stats_b.cov()) > 1.0


def test_inception_needs_a_weights_file(tmp_path):
    with pytest.raises(ValueError, match="^weights_path:"):
        InceptionV3PooledFeatures(None)
    with pytest.raises(FileNotFoundError, match="^weights_path:"):
        InceptionV3PooledFeatures(tmp_path / "missing.pth")


def test_knn_precision_recall():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 2, generator=g)
    p, r = knn_precision_recall(real, real.clone(), k=3)
    assert p == 1.0 and r == 1.0
    p, r = knn_precision_recall(real, real + 100.0, k=3)
    assert p == 0.0 and r == 0.0
    # Mode collapse: fakes all near one real point are precise but cover little of the real set.
    fake = real[0] + 0.01 * torch.randn(200, 2, generator=g)
    p, r = knn_precision_recall(real, fake, k=3)
    assert p == 1.0 and r < 0.05
    # Hand case on a line: real {0, 1, 2, 10}, k=1 radii {1, 1, 1, 8}; fakes 0.5 (inside) and
    # 20 (outside: 10 + 8 < 20) -> precision 1/2. Fake radius (k=1) is 19.5 for both, so every
    # real point is covered -> recall 1.
    real = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    fake = torch.tensor([[0.5], [20.0]])
    assert knn_precision_recall(real, fake, k=1) == (0.5, 1.0)
    with pytest.raises(ValueError, match="^k:"):
        knn_precision_recall(real, fake, k=2)


def test_efficientnet_features_equal_the_plain_nchw_net(effnet):
    """The extractor runs NHWC for speed; the features are those of the net as loaded (NCHW)."""
    import torch.nn.functional as F
    from models.perceptual import IMAGENET_MEAN, IMAGENET_STD, load_efficientnet_lite0
    assert effnet.net._conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    plain = load_efficientnet_lite0()
    x = torch.cat([_structured(32, seed=s) for s in range(2)])
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        h = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
        want = plain.extract_features(((h + 1) / 2 - mean) / std).mean(dim=(2, 3))
    got = effnet(x)
    assert got.is_contiguous() and got.shape == (2, 1280)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
