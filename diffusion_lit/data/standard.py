"""MNIST and CIFAR-10 from torchvision, optionally kept as uint8 tensors on the training device."""

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets

from diffusion_lit.data.base import PLAIN, ImageDataModule, Split
from diffusion_lit.errors import UserError
from diffusion_lit.pixels import to_signed


def _torchvision_dataset(cls: type, name: str, data_dir: str, train: bool, download: bool, transform) -> Dataset:
    """Open (and download when allowed) a torchvision dataset, turning a failure into one clear line."""
    try:
        return cls(data_dir, train=train, download=download, transform=transform)
    except (OSError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(
            f"{name} is not in {data_dir!r} and could not be {'downloaded' if download else 'found'} ({reason}); "
            f"run once with internet access ({cls.__name__}DataModule.download true) or copy the dataset files into "
            f"{data_dir!r}, or try the offline demo: lit-ddpm fit --config configs/demo.yaml"
        ) from None


class _TorchvisionDataModule(ImageDataModule):
    """A torchvision dataset: train split for training, test split for validation.

    With `on_device`, each split is one uint8 tensor (MNIST 47 MB, CIFAR-10 150 MB) that moves to the
    training device with the first batch and stays there; the data loaders hand out only indices, and
    the images are gathered, converted to [-1, 1] and flipped on the device, so decoding and augmentation
    on the CPU never limit a GPU.
    """

    dataset_class: type
    name: str

    def __init__(self, data_dir: str, download: bool, batch_size: int, num_workers: int, on_device: bool) -> None:
        super().__init__(batch_size, num_workers)
        self.data_dir = data_dir
        self.download = download
        self.on_device = on_device
        self.tensors: dict[str, tuple[Tensor, Tensor]] = {}  # with on_device: split -> (uint8 images, labels)

    def prepare_data(self) -> None:
        """Download once, on one process."""
        for train in (True, False):
            _torchvision_dataset(self.dataset_class, self.name, self.data_dir, train, self.download, None)

    def setup(self, stage: str) -> None:
        """Open the train and test splits from disk (with `on_device`: as uint8 tensors, indexed by the loaders)."""
        cls, name = self.dataset_class, self.name
        self.train_set = _torchvision_dataset(cls, name, self.data_dir, True, False, PLAIN)
        self.val_set = _torchvision_dataset(cls, name, self.data_dir, False, False, PLAIN)
        if self.on_device:
            self.tensors = {"train": _uint8_tensors(self.train_set), "val": _uint8_tensors(self.val_set)}
            self.train_set, self.val_set = _Indices(len(self.train_set)), _Indices(len(self.val_set))
            self.num_workers = 0  # handing out indices needs no worker processes

    def images(self, batch, training: bool) -> list[Tensor]:
        """With `on_device`: the batch of indices becomes images in [-1, 1] and labels, on its device."""
        if not self.on_device:
            return batch
        split = "train" if training else "val"
        images, labels = self.tensors[split]
        if images.device != batch.device:  # the first batch: the whole split moves to the device, once
            images, labels = self.tensors[split] = images.to(batch.device), labels.to(batch.device)
        return [to_signed(images[batch]), labels[batch]]

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
