"""The feature space of the CPU-scale quality benchmarks: a small CNN trained on the offline MNIST digits
(or on benchmarks/photo_patches.py's RGB patches, labelled by their photo).

"Classifier FID" is the Frechet distance between Gaussians fitted to its 64-d penultimate features.
It is not Inception FID, so its numbers compare only with each other at the same sample count.
"""

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_lit.metrics import feature_statistics


def classifier(channels: int = 1, size: int = 28, classes: int = 10) -> nn.Sequential:
    """A small CNN for CxSxS images (1x28x28 digits); its 64-d penultimate layer is the feature space."""
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * (size // 4) ** 2, 64), nn.ReLU(), nn.Linear(64, classes),
    )  # fmt: skip


def train_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 3) -> nn.Sequential:
    """Adam, batch 64, a few epochs: ~98% on held-out digits. images (N, C, S, S) in [-1, 1], labels (N,)."""
    torch.manual_seed(0)
    net = classifier(images.shape[1], images.shape[-1], int(labels.max()) + 1)
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(epochs):
        for index in torch.randperm(len(images)).split(64):
            loss = F.cross_entropy(net(images[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


@torch.no_grad()
def features(net: nn.Sequential, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of the penultimate activations (64-d) of images in [-1, 1]."""
    return feature_statistics(net[:-1](images))
