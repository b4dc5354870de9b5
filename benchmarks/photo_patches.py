"""A small real RGB dataset built offline: 32x32 patches of ten photographs shipped inside Python packages.

    python benchmarks/photo_patches.py data/photo_patches      # train/<photo>/NNNN.png and held_out/<photo>/...

The photographs are the two of scikit-learn (`sklearn/datasets/images`: china.jpg, flower.jpg) and eight of
scikit-image (`skimage/data`: astronaut, chelsea, coffee, hubble_deep_field, ihc, motorcycle_left, retina,
rocket), so nothing is downloaded. Each is scaled to 96 pixels on its short side, and 32x32 patches are cut
at seeded random places: --per-photo for training, a quarter as many for a held-out set at other places.
One sub-folder per photo, so the patches are labelled by their photo: `data.init_args.class_folders` and
the classifier of the quality measure (digits_classifier.classifier) use that.
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

SKLEARN_PHOTOS = ["china.jpg", "flower.jpg"]
SKIMAGE_PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
                  "motorcycle_left.png", "retina.jpg", "rocket.jpg"]  # fmt: skip
SHORT_SIDE = 96
PATCH = 32


def photo_paths() -> list[Path]:
    """The ten photographs, from the installed scikit-learn and scikit-image (`pip install -e '.[bench]'`)."""
    import skimage.data
    import sklearn.datasets

    sklearn_dir = Path(sklearn.datasets.__file__).parent / "images"
    skimage_dir = Path(skimage.data.__file__).parent
    return [sklearn_dir / name for name in SKLEARN_PHOTOS] + [skimage_dir / name for name in SKIMAGE_PHOTOS]


def write_patches(root: Path, per_photo: int = 500, seed: int = 0) -> tuple[Path, Path]:
    """Write root/train/<photo>/*.png and root/held_out/<photo>/*.png (once); returns both folders."""
    train, held_out = root / "train", root / "held_out"
    if train.is_dir() and held_out.is_dir():
        return train, held_out
    rng = np.random.default_rng(seed)
    for path in photo_paths():
        with Image.open(path) as photo:
            photo = photo.convert("RGB")
            scale = SHORT_SIDE / min(photo.size)
            photo = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.BICUBIC)
        pixels = np.asarray(photo)
        for folder, count in ((train, per_photo), (held_out, per_photo // 4)):
            (folder / path.stem).mkdir(parents=True, exist_ok=True)
            tops = rng.integers(0, pixels.shape[0] - PATCH + 1, count)
            lefts = rng.integers(0, pixels.shape[1] - PATCH + 1, count)
            for index, (top, left) in enumerate(zip(tops, lefts, strict=True)):
                patch = pixels[top : top + PATCH, left : left + PATCH]
                Image.fromarray(patch).save(folder / path.stem / f"{index:04d}.png")
    return train, held_out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--per-photo", type=int, default=500)
    args = parser.parse_args()
    print(write_patches(args.root, args.per_photo))
