"""LightningDataModules: MNIST, CIFAR-10, a folder of images, and the offline demo digits.

Every datamodule yields (image, label) batches with images in [-1, 1] and exposes `image_shape`
(C, H, W), which the CLI links into the model, and `reference_set(split)`: the images without
augmentation that FID compares samples with, named by `reference_name(split)` for caching.
"""

from diffusion_lit.data.base import PLAIN, ImageDataModule
from diffusion_lit.data.demo import DemoMNISTDataModule
from diffusion_lit.data.folder import ImageFolderDataModule
from diffusion_lit.data.standard import CIFAR10DataModule, MNISTDataModule

__all__ = ["PLAIN", "CIFAR10DataModule", "DemoMNISTDataModule", "ImageDataModule", "ImageFolderDataModule",
           "MNISTDataModule"]  # fmt: skip
