"""A folder of the user's own images, any sizes and modes, optionally labelled by class sub-folders."""

import hashlib
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms

from diffusion_lit.data.base import TO_SIGNED, ImageDataModule, Split
from diffusion_lit.errors import UserError, check_range

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


# Images whose pixels are not 8-bit: Pillow's convert() to "L" or "RGB" would clip them to 255 (16-bit images
# come out white) or truncate them (float images in [0, 1] come out black). They are read as floats instead.
SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
HIGH_DEPTH = SIXTEEN_BIT | {"I", "F"}


def high_depth_problem(image: Image.Image, path: Path) -> str | None:
    """Why a 16-bit, 32-bit integer or float image cannot be read as it is (None when it can): integer pixels
    are read as 16-bit values (0 to 65535), float pixels as values in [0, 1]."""
    if image.mode not in HIGH_DEPTH or image.mode in SIXTEEN_BIT:  # any 16-bit value is in 0..65535
        return None
    low, high = image.getextrema()
    if image.mode == "F" and not (0 <= low and high <= 1):
        return f"{path} (mode F) holds float pixels from {low:g} to {high:g}; lit-ddpm reads float images in [0, 1]"
    if image.mode == "I" and not (0 <= low and high <= 65535):
        return f"{path} (mode I) holds integer pixels from {low} to {high}; lit-ddpm reads them as 0 to 65535"
    return None


def as_read(image: Image.Image, mode: str) -> Image.Image:
    """`image` in `mode` ("L" or "RGB") with 8-bit pixels, or, for a 16-bit, 32-bit integer or float one, as a
    single-channel float ("F") image in [0, 1] (16-bit and integer pixels divided by 65535)."""
    if image.mode not in HIGH_DEPTH:
        try:
            return image.convert(mode)
        except ValueError:  # no direct conversion (LAB to L): through RGB
            return image.convert("RGB").convert(mode)
    pixels = np.asarray(image, dtype=np.float32)  # in the byte order the mode says (I;16B: big-endian)
    return Image.fromarray(pixels if image.mode == "F" else pixels / np.float32(65535))  # float32: mode "F"


class ImageFiles(Dataset):
    """Images from a list of files, read as the pictures they are (`as_read`) in one mode ("L" or "RGB"), with
    their labels.

    A file that fails to read while training (one that passed the start-up check but does not decode, or that
    was deleted or replaced since) is skipped with a warning naming it: the next file in the list that reads
    takes its place, so a run goes on, and goes on the same way when resumed. After `max_unreadable` of them
    (in one process) the run stops with one line, saving at its step boundary."""

    def __init__(self, paths: list[Path], labels: list[int], mode: str, transform, max_unreadable: int = 0) -> None:
        self.paths = paths
        self.labels = labels
        self.mode = mode
        self.transform = transform
        self.max_unreadable = max_unreadable
        self.unreadable: set[Path] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        for offset in range(len(self.paths)):
            position = (index + offset) % len(self.paths)
            try:
                with Image.open(self.paths[position]) as image:
                    pixels = self.transform(as_read(image, self.mode))  # (1 or C, H, W)
                return pixels.expand(len(self.mode), -1, -1), self.labels[position]  # gray high-depth into RGB
            except Exception as error:  # noqa: BLE001  (PIL raises many types for broken files)
                self._skip(self.paths[position], error)
        raise UserError(f"no image of {len(self.paths)} reads any more (the folder was moved or deleted?)")

    def _skip(self, path: Path, error: Exception) -> None:
        """Count a file that failed to read, warn once for it, and stop the run past the limit."""
        if path in self.unreadable:
            return
        self.unreadable.add(path)
        reason = " ".join(str(error).split())[:120] or type(error).__name__
        limit = f"ImageFolderDataModule.max_unreadable {self.max_unreadable}"
        if len(self.unreadable) > self.max_unreadable:
            raise UserError(f"{len(self.unreadable)} images failed to read while training, more than {limit} "
                            f"(the last: {path}: {reason}); fix or remove them and resume the run")  # fmt: skip
        print(f"lit-ddpm: warning: skipped {path}, which failed to read ({reason}); the next image takes its place "
              f"({len(self.unreadable)} so far, at most {limit})", file=sys.stderr, flush=True)  # fmt: skip


class ImageFolderDataModule(ImageDataModule):
    """Every image under a folder (recursively), resized and centre-cropped to a square.

    Args:
        root: the folder of images.
        image_size: side of the square images the model sees.
        channels: 1 (grayscale) or 3 (RGB); every image is converted (alpha is dropped; 16-bit images are
            divided by 65535, float images are read in [0, 1]; others of those modes are refused by name).
        hflip: randomly flip training images horizontally.
        bad_files: what to do with files that have an image extension but do not open as images:
            "skip" them (their number is reported) or "error" (list the first few and stop).
        max_unreadable: images that may fail to read while training (a file that passed the start-up check but
            does not decode, or was deleted since), each skipped with a warning naming it; one more stops the
            run with one line, saving it (counted in each data-loading process).
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
        max_unreadable: int = 100,
        class_folders: bool = False,
        val_fraction: float = 0.05,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 4,
    ) -> None:
        super().__init__(batch_size, num_workers)
        if channels not in (1, 3):
            raise UserError(f"ImageFolderDataModule.channels must be 1 or 3, got {channels}")
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
        check_range("ImageFolderDataModule", 0, max_unreadable=max_unreadable)
        self.max_unreadable = max_unreadable
        self.val_fraction = val_fraction
        self.seed = seed

    def setup(self, stage: str) -> None:
        """Find the images and split them."""
        if self.root.is_file():
            raise UserError(f"image folder {str(self.root)!r} is a file, not a folder; set ImageFolderDataModule.root "
                            f"to the folder that holds the images")  # fmt: skip
        if not self.root.is_dir():
            raise UserError(f"image folder {str(self.root)!r} does not exist; set ImageFolderDataModule.root")
        paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        paths = self._readable(paths)
        if len(paths) < 2:
            raise UserError(
                f"image folder {str(self.root)!r} has {len(paths)} images; it needs at least 2 files "
                f"with one of the extensions {sorted(IMAGE_EXTENSIONS)}"
            )
        size = self.image_shape[-1]
        resize = [transforms.Resize(size), transforms.CenterCrop(size)]
        mode = "L" if self.image_shape[0] == 1 else "RGB"
        plain = transforms.Compose([*resize, transforms.ToTensor(), TO_SIGNED])  # flips: on the device
        num_val = min(max(1, round(self.val_fraction * len(paths))), len(paths) - 1)
        order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(self.seed)).tolist()
        labels = [self._label(path) for path in paths]
        val, kept = order[:num_val], order[num_val:]
        files = {"mode": mode, "transform": plain, "max_unreadable": self.max_unreadable}
        self.val_set = ImageFiles([paths[i] for i in val], [labels[i] for i in val], **files)
        self.train_set = ImageFiles([paths[i] for i in kept], [labels[i] for i in kept], **files)

    def _readable(self, paths: list[Path]) -> list[Path]:
        """The paths that open as images (header and checksum where the format has one)."""
        good, bad = [], []
        for path in paths:
            try:
                with Image.open(path) as image:
                    image.verify()
                with Image.open(path) as image:  # verify() leaves the image unusable: open it again
                    problem = high_depth_problem(image, path)
                good.append(path)
            except Exception:  # noqa: BLE001  (PIL raises many types for broken files)
                bad.append(path)
                continue
            if problem:
                raise UserError(f"{problem}: rescale it, or save it as an 8- or 16-bit image")
        if bad and self.bad_files == "error":
            shown = ", ".join(str(p) for p in bad[:3]) + (", ..." if len(bad) > 3 else "")
            raise UserError(
                f"{len(bad)} files in {str(self.root)!r} are not readable images ({shown}); remove them, "
                f"or set ImageFolderDataModule.bad_files skip"
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
        return self.val_set if split == "test" else self.train_set

    def reference_name(self, split: Split) -> str:
        """folder-<hash of the folder, its files' names, sizes and times, and the split>-<split>."""
        dataset = self.val_set if split == "test" else self.train_set
        digest = hashlib.sha1(str(self.root.resolve()).encode())
        for path in dataset.paths:
            stat = path.stat()
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return f"folder-{digest.hexdigest()[:12]}-{split}"
