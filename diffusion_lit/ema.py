"""EMA of the weights on Lightning's WeightAveraging, swapped in for the whole validation loop."""

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor


def ema_with_warmup(decay: float):
    """multi_avg_fn for AveragedModel: decay min(decay, (1 + n) / (10 + n)) after n updates.

    The warm-up (Tan & Le 2019's EfficientNet recipe, also in TF's ExponentialMovingAverage) keeps the
    average from being dominated by the random initial weights in short runs. It stays a tensor so that
    no step synchronises with the host.
    """

    @torch.no_grad()
    def update(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        warm = (1 + num_averaged.float()) / (10 + num_averaged.float())
        weight = 1 - warm.clamp(max=decay)
        torch._foreach_lerp_(averaged, current, weight.to(averaged[0].dtype))

    return update


class EMA(WeightAveraging):
    """Exponential moving average of every parameter and buffer, updated after each optimizer step.

    Lightning's callback swaps the average in at `on_validation_epoch_start`. This one does it one level
    out, at `on_validation_start`/`on_validation_end`, so that every other callback's validation-epoch
    hooks (sample grids, FID) see the EMA weights whatever the order of the callback list.
    """

    def __init__(self, decay: float = 0.9999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        super().__init__(multi_avg_fn=ema_with_warmup(decay))
        self.decay = decay

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
