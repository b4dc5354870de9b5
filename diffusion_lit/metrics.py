"""Sample quality: FID and Inception Score on torchmetrics, with offline weights and cached real statistics.

Protocol (as the DDPM/TTUR/torch-fidelity references): images are uint8, gray ones repeated to 3 channels,
resized to 299x299 the way TensorFlow 1.x did (bilinear, no antialiasing) and fed to the TF-ported
Inception v3; FID uses its 2048-d pool features, IS its 1008 logits with 10 splits.
"""

import os
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.error import URLError

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torchmetrics.image import FrechetInceptionDistance, InceptionScore

from diffusion_lit import files
from diffusion_lit.errors import UserError
from diffusion_lit.pixels import to_rgb, to_uint8, to_unit
from diffusion_lit.signals import shield_worker

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
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


class InceptionFeatures(FeatureExtractorInceptionV3):
    """The TF-ported Inception v3 of torch-fidelity (the one torchmetrics uses): uint8 images -> (pool, logits).

    Always in eval mode. Its own forward resizes to 299x299 as TensorFlow 1.x did, the published protocol.

    Args:
        weights_path: a local copy of torch-fidelity's weights file; None: torch's hub cache, downloading
            into it when missing.
        antialias: first resize with antialiasing (torchmetrics' default resize), rounded back to uint8; the
            numbers are then not comparable with published ones.
    """

    num_features = 2048
    num_logits = 1008

    def __init__(self, weights_path: str | None = None, antialias: bool = False) -> None:
        super().__init__("inception-v3-compat", ["2048", "logits_unbiased"], weights_path)
        self.antialias = antialias
        self.name = "inception-v3-tf" + ("-antialias" if antialias else "")
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "InceptionFeatures":
        """Never in train mode (batch-norm statistics stay fixed)."""
        return super().train(False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 (N, 3, H, W) -> pool features (N, 2048) and logits (N, 1008), from one forward pass."""
        if self.antialias:
            size = (self.INPUT_IMAGE_SIZE, self.INPUT_IMAGE_SIZE)
            resized = F.interpolate(images.float(), size, mode="bilinear", align_corners=False, antialias=True)
            images = resized.round().clamp(0, 255).to(torch.uint8)  # then the 299 -> 299 resize is the identity
        pool, logits = super().forward(images)
        return pool.reshape(len(images), -1), logits.reshape(len(images), -1)


def load_inception(weights_path: str | None = None, antialias: bool = False) -> InceptionFeatures:
    """InceptionFeatures from a local file or torch's hub cache; one clear line when neither works."""
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(INCEPTION_URL)
    how_to_fix = (
        f"download {INCEPTION_URL} on a machine with internet access and put it at {hub_file}, "
        f"or set SampleQuality.inception_weights to its path"
    )
    if weights_path is not None:
        if not os.path.isfile(weights_path):
            raise UserError(f"Inception weights file {weights_path!r} does not exist; {how_to_fix}")
        try:  # torch-fidelity loads it with weights_only=False: first make sure it is plain tensors
            torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001  (any unpickling failure means the same to the user)
            raise UserError(f"{weights_path!r} is not a file of saved tensors; {how_to_fix}") from None
    try:
        return InceptionFeatures(weights_path, antialias)
    except (URLError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"the FID/IS Inception weights are not available offline ({reason}); {how_to_fix}") from None


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
        extractor: uint8 images -> (features (N, D), logits (N, K)); `load_inception()` for the real metric.
        splits: Inception Score splits.
    """

    def __init__(self, extractor: nn.Module, splits: int = 10) -> None:
        super().__init__()
        self.extractor = extractor
        self.fid = FrechetInceptionDistance(_Passthrough(extractor.num_features), reset_real_features=False)
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
        self.inception_score.update(logits)

    def reference_statistics(self) -> dict[str, Tensor]:
        """The accumulated reference statistics (sums, so that they can be saved and loaded exactly)."""
        return {name: getattr(self.fid, name).cpu() for name in REFERENCE_STATES}

    def load_reference_statistics(self, statistics: dict[str, Tensor]) -> None:
        """Use saved reference statistics instead of real images."""
        for name in REFERENCE_STATES:
            current = getattr(self.fid, name)
            setattr(self.fid, name, statistics[name].to(device=current.device, dtype=current.dtype))

    def compute(self, seed: int = 0) -> dict[str, float]:
        """FID and IS (mean and std over the splits); the IS split shuffle is seeded, leaving torch's RNG alone."""
        # torchmetrics gathers a list state element by element (rank 0's first batch, rank 1's first, ...):
        # one tensor per process makes the gathered order the global one, whatever the number of processes,
        # and keeps every process in the same collectives even when it generated nothing.
        logits = self.inception_score.features
        device = self.fid.fake_features_sum.device
        empty = torch.empty(0, self.extractor.num_logits, device=device)
        self.inception_score.features = [torch.cat(logits) if logits else empty]
        # torchmetrics' FID learns its output dtype in `update`: a process that drew no batch (fewer batches than
        # processes) and holds no reference images (or loaded them from the cache) has never seen one, and would
        # fail after the sync while the others wait in the next collective. An empty batch changes no sum.
        self.fid.update(torch.empty(0, self.extractor.num_features, device=device), real=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            is_mean, is_std = self.inception_score.compute()
        return {"fid": self.fid.compute().item(), "is": is_mean.item(), "is_std": is_std.item()}

    def reset(self) -> None:
        """Forget the generated images, keep the reference."""
        self.fid.reset()
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
        loader = DataLoader(data.reference_set(split), batch_size=batch_size, **workers)
        for images, *_ in loader:
            yield to_uint8(to_unit(images.to(device)))

    return path, reference_statistics(metrics, path, real_batches(), {"dataset": name, "extractor": extractor})
