"""Sample-quality metrics on plain torch: the Frechet distance between feature statistics."""

import torch
from torch import Tensor


def feature_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {tuple(features.shape)}")
    features = features.double()
    return features.mean(0), torch.cov(features.T)


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)); Heusel et al. 2017, eq. 6.

    Tr((sigma1 sigma2)^(1/2)) is the sum of the square roots of the eigenvalues of sigma1 sigma2, which
    are real and non-negative for covariance matrices; tiny negative round-off is clipped to 0.
    """
    mu1, sigma1, mu2, sigma2 = (x.double() for x in (mu1, sigma1, mu2, sigma2))
    eigenvalues = torch.linalg.eigvals(sigma1 @ sigma2).real.clamp(min=0)
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * eigenvalues.sqrt().sum()
    return distance.item()
