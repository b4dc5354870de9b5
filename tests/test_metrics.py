import numpy as np
import pytest
import torch
from scipy import linalg

from diffusion_lit.metrics import feature_statistics, frechet_distance


def scipy_frechet(mu1, s1, mu2, s2) -> float:
    """The reference implementation's formula (pytorch-fid / TTUR), with scipy's sqrtm."""
    root = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


@pytest.mark.parametrize("dim", [2, 16, 64])
def test_matches_scipy_on_random_gaussian_features(dim):
    rng = np.random.default_rng(dim)
    a = rng.normal(size=(500, dim)) @ rng.normal(size=(dim, dim))
    b = rng.normal(0.3, 1.5, size=(400, dim))
    mu1, s1 = feature_statistics(torch.from_numpy(a))
    mu2, s2 = feature_statistics(torch.from_numpy(b))
    expected = scipy_frechet(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_zero_against_itself_and_grows_with_shift():
    features = torch.randn(1000, 8, generator=torch.Generator().manual_seed(0))
    stats = feature_statistics(features)
    assert frechet_distance(*stats, *stats) == pytest.approx(0.0, abs=1e-8)
    distances = [frechet_distance(*stats, *feature_statistics(features + shift)) for shift in (0.1, 0.5, 1.0)]
    # A pure shift leaves the covariances equal: the distance is exactly ||shift||^2 = 8 shift^2.
    assert distances == pytest.approx([8 * 0.01, 8 * 0.25, 8 * 1.0], rel=1e-6)


def test_statistics_need_two_samples():
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(torch.zeros(1, 4))
