"""SampleGrid: a grid of samples from the EMA weights after every n-th validation, saved and logged."""

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from diffusion_lit.diffusion.sampling import Sampling
from diffusion_lit.generation import Stopped, generate_all, run_precision, save_grid, stop_on_request


class SampleGrid(Callback):
    """After every `every_n_epochs`-th validation, sample a grid from the EMA weights, save and log it.

    The same seed is used every time, so successive grids show the same noise turning into images. The network
    samples in the run's precision (an autocast under 16-mixed and bf16-mixed), as training steps run.

    Args:
        num_samples: images in the grid.
        every_n_epochs: sample after every n-th validation epoch.
        dirpath: where the PNG files go (`step=<global step>.png`).
        seed: seed of the noise.
        sampling: the sampler and its settings (default: those of `lit-ddpm sample`).
    """

    def __init__(
        self,
        num_samples: int = 64,
        every_n_epochs: int = 1,
        dirpath: str = "samples",
        seed: int = 0,
        sampling: Sampling = Sampling(),
    ) -> None:
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.dirpath = Path(dirpath)
        self.seed = seed
        self.sampling = sampling

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """Settings the model cannot sample with stop the run before training, not at the first grid."""
        conditional = pl_module.num_classes is not None
        self.sampling.check(pl_module.hparams.timesteps, prefix="SampleGrid.sampling.", conditional=conditional)

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Sample, write `dirpath/step=N.png` and hand the grid to the logger (rank 0 only)."""
        if trainer.sanity_checking or trainer.fast_dev_run or not trainer.is_global_zero or trainer.state.fn != "fit":
            return  # a dry run (fast_dev_run) writes nothing
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        options = {"settings": self.sampling, "seed": self.seed, "batch_size": self.num_samples,
                   "precision": lambda: run_precision(trainer)}  # the run's, as FID while fitting  # fmt: skip
        try:
            with stop_on_request(pl_module.unet):
                images, _ = generate_all(pl_module, self.num_samples, **options)  # conditional: classes in turn
        except Stopped:
            return  # the run is stopping: it saves at its next step
        path = self.dirpath / f"step={trainer.global_step}.png"
        try:
            grid = save_grid(images, path)
        except OSError as error:  # a full disk must not end the training run: the grid is expendable
            rank_zero_warn(f"could not write the sample grid {path} ({error.strerror or error}); training goes on")
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples", [str(path)], step=trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", grid, trainer.global_step)
