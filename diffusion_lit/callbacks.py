"""Training callbacks. They reach the model only through DiffusionModule.sample()."""

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torchvision.utils import make_grid, save_image


class SampleGrid(Callback):
    """After every `every_n_epochs`-th validation, sample a grid from the EMA weights, save and log it.

    The same seed is used every time, so successive grids show the same noise turning into images.

    Args:
        num_samples: images in the grid.
        every_n_epochs: sample after every n-th validation epoch.
        dirpath: where the PNG files go (`step=<global step>.png`).
        seed: seed of the initial noise.
    """

    def __init__(self, num_samples: int = 64, every_n_epochs: int = 1, dirpath: str = "samples", seed: int = 0):
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.dirpath = Path(dirpath)
        self.seed = seed

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Sample, write `dirpath/step=N.png` and hand the grid to the logger (rank 0 only)."""
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.state.fn != "fit":
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        generator = torch.Generator(pl_module.device).manual_seed(self.seed)
        images = pl_module.sample(self.num_samples, generator=generator)
        grid = make_grid(images, nrow=int(self.num_samples**0.5), padding=2, pad_value=1.0)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"step={trainer.global_step}.png"
        save_image(grid, path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples", [str(path)], step=trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", grid, trainer.global_step)
