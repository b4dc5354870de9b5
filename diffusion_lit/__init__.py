"""lit-ddpm: denoising diffusion models on PyTorch Lightning, from Python.

    from diffusion_lit import DiffusionModule, Sampling, UNet, load_checkpoint

    model = load_checkpoint("checkpoints/demo/last.ckpt")       # the EMA weights, safely loaded
    images = model.sample(16, Sampling("dpmpp", steps=20))      # (16, C, H, W) in [0, 1]

The README's "From Python" section has a runnable example; `lit-ddpm` is the command line over the same pieces.
The names are imported when first used, so that `lit-ddpm` starts (and answers Ctrl-C) before torch is loaded.
"""

import importlib

_WHERE = {
    "diffusion_lit.data": ["CIFAR10DataModule", "DemoMNISTDataModule", "ImageFolderDataModule", "MNISTDataModule"],
    "diffusion_lit.diffusion": ["NoiseSchedule", "Sampling"],
    "diffusion_lit.errors": ["UserError"],
    "diffusion_lit.generation": ["generate_all", "save_grid", "write_samples"],
    "diffusion_lit.loading": ["load_checkpoint"],
    "diffusion_lit.module": ["DiffusionModule"],
    "diffusion_lit.nn": ["UNet"],
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'diffusion_lit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
