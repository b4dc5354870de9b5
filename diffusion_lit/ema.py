"""EMA of the weights on Lightning's WeightAveraging, swapped in for the whole validation loop."""

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import WeightAveraging


def warmup_decay(decay: float, updates: int) -> float:
    """The decay for the update after `updates` earlier ones: min(decay, (1 + n) / (10 + n)).

    The warm-up (Tan & Le 2019's EfficientNet recipe, also in TF's ExponentialMovingAverage) keeps the
    average from being dominated by the random initial weights in short runs.
    """
    return min(decay, (1 + updates) / (10 + updates))


class EMA(WeightAveraging):
    """Exponential moving average of every parameter and buffer, updated after each optimizer step.

    Lightning's callback swaps the average in at `on_validation_epoch_start`. This one does it one level
    out, at `on_validation_start`/`on_validation_end`, so that every other callback's validation-epoch
    hooks (sample grids, FID) see the EMA weights whatever the order of the callback list.
    """

    def __init__(self, decay: float = 0.9999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        super().__init__()
        self.decay = decay
        self._updates: int | None = None  # the average's n_averaged, kept on the host

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """A fresh average for each fit (Lightning's setup builds it)."""
        super().setup(trainer, pl_module, stage)
        self._updates = None

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", *args: Any) -> None:
        """Update the average after every optimizer step.

        This replaces AveragedModel.update_parameters, which compares its device-side update count with 0
        twice per step (two host synchronisations) and regroups every tensor each time. Here the count
        lives on the host and the update is one foreach lerp over parameters and buffers.
        """
        if trainer.global_step <= self._latest_update_step:
            return  # no optimizer step in this batch (gradient accumulation)
        average = self._average_model
        if self._updates is None:
            self._updates = int(average.n_averaged)  # once per run (0, or the count of a resumed average)
        averaged = [*average.module.parameters(), *average.module.buffers()]
        current = [*pl_module.parameters(), *pl_module.buffers()]
        with torch.no_grad():
            if self._updates == 0:
                torch._foreach_copy_(averaged, current)
            else:
                torch._foreach_lerp_(averaged, current, 1 - warmup_decay(self.decay, self._updates))
            average.n_averaged += 1
        self._updates += 1
        self._latest_update_step = trainer.global_step

    def on_validation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Put the EMA weights into the module for the whole validation loop."""
        if self._average_model is not None:
            self._swap_models(pl_module)

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Put the training weights back."""
        if self._average_model is not None:
            self._swap_models(pl_module)

    def on_load_checkpoint(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]
    ) -> None:
        """Restore the average when fitting; elsewhere the checkpoint's state_dict already is the average."""
        if self._average_model is not None:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Not yet: ModelCheckpoint saves last.ckpt at train end after this hook, and that checkpoint must
        still hold the training weights beside the average, or a resumed run would continue from the EMA."""

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """After fitting, leave the EMA weights in the module (what Lightning's callback does at train end)."""
        if stage == "fit" and self._average_model is not None:
            self._copy_average_to_current(pl_module)

    def on_validation_epoch_start(self, *args: Any) -> None:
        """Swapping happens in on_validation_start instead."""

    def on_validation_epoch_end(self, *args: Any) -> None:
        """Swapping happens in on_validation_end instead."""
