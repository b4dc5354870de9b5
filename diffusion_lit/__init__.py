"""lit-ddpm: denoising diffusion models on PyTorch Lightning, from Python.

    from diffusion_lit import DiffusionModule, Sampling, UNet, load_checkpoint

    model = load_checkpoint("checkpoints/demo/last.ckpt")       # the EMA weights, safely loaded
    images = model.sample(16, Sampling("dpmpp", steps=20))      # (16, C, H, W) in [0, 1]

The README's "From Python" section has a runnable example; `lit-ddpm` is the command line over the same pieces.
"""

from diffusion_lit.data import CIFAR10DataModule, DemoMNISTDataModule, ImageFolderDataModule, MNISTDataModule
from diffusion_lit.diffusion import NoiseSchedule, Sampling
from diffusion_lit.errors import UserError
from diffusion_lit.generation import generate_all, save_grid, write_samples
from diffusion_lit.loading import load_checkpoint
from diffusion_lit.module import DiffusionModule
from diffusion_lit.nn import UNet

__all__ = ["CIFAR10DataModule", "DemoMNISTDataModule", "DiffusionModule", "ImageFolderDataModule",
           "MNISTDataModule", "NoiseSchedule", "Sampling", "UNet", "UserError", "generate_all", "load_checkpoint",
           "save_grid", "write_samples"]  # fmt: skip
