"""Sample quality: FID and Inception Score on torchmetrics, with offline weights and cached real statistics.

Protocol (as the DDPM/TTUR/torch-fidelity references): images are uint8, gray ones repeated to 3 channels,
resized to 299x299 the way TensorFlow 1.x did (bilinear, no antialiasing) and fed to the TF-ported
Inception v3 (`inception.py`); FID uses its 2048-d pool features, IS its 1008 logits with 10 splits (when the
network has its classifier).
"""

import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchmetrics.image import FrechetInceptionDistance, InceptionScore

from diffusion_lit import files
from diffusion_lit.errors import UserError
from diffusion_lit.pixels import to_rgb, to_uint8, to_unit
from diffusion_lit.signals import ShieldedLoader, shield_worker

REFERENCE_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


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


class _Passthrough(nn.Module):
    """The metrics' "feature extractor": features are extracted once, before, for FID and IS together."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


class QualityMetrics(nn.Module):
    """FID against fixed reference statistics, and Inception Score, over batches of generated images.

    The metric states are torchmetrics', so under DDP they are reduced across processes at `compute`.
    The reference statistics must be loaded on exactly one process (they are summed across processes).

    Args:
        extractor: uint8 images -> (features (N, D), logits (N, K) or None); `load_inception()` for the real
            metric. With `num_logits` 0 (no classifier) there is no Inception Score: `compute` gives None.
        splits: Inception Score splits.
    """

    def __init__(self, extractor: nn.Module, splits: int = 10) -> None:
        super().__init__()
        self.extractor = extractor
        self.fid = FrechetInceptionDistance(_Passthrough(extractor.num_features), reset_real_features=False)
        self.inception_score = None
        if extractor.num_logits:
            with warnings.catch_warnings():  # "will save all extracted features": 4 KB per image, known and fine
                warnings.simplefilter("ignore", UserWarning)
                self.inception_score = InceptionScore(_Passthrough(extractor.num_logits), splits=splits)

    @torch.no_grad()
    def add_reference(self, images: Tensor) -> None:
        """Accumulate real images (uint8, 1 or 3 channels) into the reference statistics."""
        self.fid.update(self.extractor(to_rgb(images))[0], real=True)

    @torch.no_grad()
    def update(self, images: Tensor) -> None:
        """Accumulate generated images (uint8, 1 or 3 channels)."""
        features, logits = self.extractor(to_rgb(images))
        self.fid.update(features, real=False)
        if self.inception_score is not None:
            self.inception_score.update(logits)

    def reference_statistics(self) -> dict[str, Tensor]:
        """The accumulated reference statistics (sums, so that they can be saved and loaded exactly)."""
        return {name: getattr(self.fid, name).cpu() for name in REFERENCE_STATES}

    def load_reference_statistics(self, statistics: dict[str, Tensor]) -> None:
        """Use saved reference statistics instead of real images."""
        for name in REFERENCE_STATES:
            current = getattr(self.fid, name)
            setattr(self.fid, name, statistics[name].to(device=current.device, dtype=current.dtype))

    def compute(self, seed: int = 0) -> dict[str, float | None]:
        """FID and IS (mean and std over the splits; None without a classifier); the IS split shuffle is seeded,
        leaving torch's RNG alone."""
        device = self.fid.fake_features_sum.device
        # torchmetrics' FID learns its output dtype in `update`: a process that drew no batch (fewer batches than
        # processes) and holds no reference images (or loaded them from the cache) has never seen one, and would
        # fail after the sync while the others wait in the next collective. An empty batch changes no sum.
        self.fid.update(torch.empty(0, self.extractor.num_features, device=device), real=False)
        scores = {"fid": self.fid.compute().item(), "is": None, "is_std": None}
        if self.inception_score is None:
            return scores
        # torchmetrics gathers a list state element by element (rank 0's first batch, rank 1's first, ...):
        # one tensor per process makes the gathered order the global one, whatever the number of processes,
        # and keeps every process in the same collectives even when it generated nothing.
        logits = self.inception_score.features
        empty = torch.empty(0, self.extractor.num_logits, device=device)
        self.inception_score.features = [torch.cat(logits) if logits else empty]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            is_mean, is_std = self.inception_score.compute()
        return {**scores, "is": is_mean.item(), "is_std": is_std.item()}

    def reset(self) -> None:
        """Forget the generated images, keep the reference."""
        self.fid.reset()
        if self.inception_score is not None:
            self.inception_score.reset()


def reference_statistics(
    metrics: QualityMetrics, path: Path, real_batches: Iterable[Tensor], description: dict[str, object]
) -> bool:
    """Load the reference statistics cached at `path`, or compute them from uint8 batches and cache them.

    Returns whether they were computed. The file also holds `description` (what they were computed from),
    and loads with weights_only=True.
    """
    if path.is_file():
        try:
            metrics.load_reference_statistics(torch.load(path, map_location="cpu", weights_only=True))
            return False
        except Exception:  # noqa: BLE001  (a truncated or foreign file: either way, recompute)
            raise UserError(
                f"cached FID statistics {str(path)!r} are unreadable; delete it to recompute them"
            ) from None
    for images in real_batches:
        metrics.add_reference(images)
    try:
        files.save({**metrics.reference_statistics(), **description}, path)
    except OSError as error:
        print(f"lit-ddpm: warning: could not cache the FID statistics in {path} ({files.why(error, path)}); "
              "they will be computed again next time", file=sys.stderr)  # fmt: skip
    return True


@runtime_checkable
class ReferenceData(Protocol):
    """What a datamodule provides for FID: its image shape and its real images, named for the cache.

    `reference_set(split)` yields (image in [-1, 1], ...) items: the training images without augmentation
    ("train") or the held-out ones ("test"); `reference_name(split)` changes whenever those images do.
    """

    image_shape: tuple[int, int, int]
    num_workers: int

    def reference_set(self, split: str) -> Dataset: ...

    def reference_name(self, split: str) -> str: ...


def load_reference(
    metrics: QualityMetrics, data: ReferenceData, split: str, cache_dir: Path, batch_size: int
) -> tuple[Path, bool]:
    """Put the statistics of `data`'s real images into `metrics`, from the cache or computed (and cached).

    Returns the cache file, one per dataset, split, image shape and extractor, and whether it was computed.
    """
    name = data.reference_name(split)  # an image folder hashes its files here: once
    extractor = metrics.extractor.name
    path = cache_dir / f"{name}-{'x'.join(map(str, data.image_shape))}-{extractor}.pt"
    device = metrics.fid.real_features_sum.device

    def real_batches() -> Iterable[Tensor]:  # opened only when the cache misses
        workers = {"num_workers": data.num_workers, "worker_init_fn": shield_worker if data.num_workers else None}
        loader = ShieldedLoader(data.reference_set(split), batch_size=batch_size, **workers)
        for images, *_ in loader:
            yield to_uint8(to_unit(images.to(device)))

    description = {"dataset": name, "extractor": extractor, "weights": getattr(metrics.extractor, "source", None)}
    return path, reference_statistics(metrics, path, real_batches(), description)
