"""EMA of the weights: updated after every optimizer step, swapped in for the whole validation loop.

This is a plain Callback rather than Lightning's WeightAveraging because that callback cannot do three
things this project needs: its update (torch's AveragedModel.update_parameters) compares a device-side
count with 0 twice per step, two host synchronisations; it swaps the weights at validation-*epoch* start,
so callbacks listed before it see the training weights in their validation-epoch hooks; and it copies
the average into the model at train end, before the final last.ckpt is written, which then
lacks the training weights a resumed run needs. Checkpoints keep WeightAveraging's layout, so either
reads the other's: `state_dict` holds the average, `current_model_state` the training weights, and
`averaging_state` the update count (`n_averaged`).
"""

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch import Callback
from torch import Tensor

from diffusion_lit.errors import UserError


def warmup_decay(decay: float, updates: int) -> float:
    """The decay for the update after `updates` earlier ones: min(decay, (1 + n) / (10 + n)).

    The warm-up (Tan & Le 2019's EfficientNet recipe, also in TF's ExponentialMovingAverage) keeps the
    average from being dominated by the random initial weights in short runs.
    """
    return min(decay, (1 + updates) / (10 + updates))


def update_weight(updates: int, decay: float, gamma: float | None = None) -> float:
    """The share of the current weights in the update after `updates` earlier ones: 1 - the decay, with
    `warmup_decay`; or, with gamma, 1 - (1 - 1/t)^(gamma + 1) at the t-th update (EDM2's power function, whose
    average over the run so far has relative width sigma_rel; the post-hoc EMA's profiles are the same)."""
    if gamma is not None:
        return 1 - (1 - 1 / (updates + 1)) ** (gamma + 1)
    return 1 - warmup_decay(decay, updates)


class EMA(Callback):
    """Exponential moving average of every parameter and buffer, updated after each optimizer step.

    While fitting, `average` maps each parameter and buffer name to its average. The average is swapped
    into the module from `on_validation_start` to `on_validation_end`, one level out of the validation-epoch
    hooks, so every other callback's validation-epoch hooks (sample grids, FID) see the EMA weights whatever
    the order of the callback list. After fitting, the module keeps the EMA weights.
    """

    def __init__(self, decay: float = 0.9999, sigma_rel: float | None = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise UserError(f"DiffusionModule.ema_decay must lie in [0, 1) or be None, got {decay}")
        from diffusion_lit.callbacks.posthoc_ema import gamma_of

        self.decay = decay
        self.gamma = None if sigma_rel is None else gamma_of(sigma_rel)  # EDM2's power-function EMA
        self.average: dict[str, Tensor] | None = None
        self.updates = 0
        self.swapped = False  # whether the module holds the average (and `average` the training weights)
        self.latest_update_step = 0

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """A fresh average (a copy of the weights, on the device training will use) for each fit; none for
        validate/test, whose checkpoint state_dict already is the average."""
        if stage == "fit":
            self.average = {name: device_copy(tensor, pl_module.device) for name, tensor in averaged_tensors(pl_module)}
            self.updates, self.swapped = 0, False

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", *args: Any) -> None:
        """Update the average after every optimizer step: one foreach lerp, the count kept on the host."""
        if trainer.global_step <= self.latest_update_step:
            return  # no optimizer step in this batch (gradient accumulation)
        averaged, current = list(self.average.values()), tensors_by_name(pl_module, self.average)
        with torch.no_grad():
            # torch._foreach_*: one kernel per group instead of one per tensor; the public per-tensor
            # ops would launch hundreds. tests/test_module.py checks the result against AveragedModel.
            if self.updates == 0:
                torch._foreach_copy_(averaged, current)
            else:
                torch._foreach_lerp_(averaged, current, self.weight())
        self.updates += 1
        self.latest_update_step = trainer.global_step

    def weight(self) -> float:
        """The share of the current weights in the next update (`update_weight`)."""
        return update_weight(self.updates, self.decay, self.gamma)

    def on_validation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Put the EMA weights into the module for the whole validation loop."""
        if self.average is not None:
            self._swap(pl_module)

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Put the training weights back."""
        if self.average is not None and self.swapped:
            self._swap(pl_module)

    def _swap(self, pl_module: "pl.LightningModule") -> None:
        with torch.no_grad():
            for current, averaged in zip(tensors_by_name(pl_module, self.average), self.average.values(), strict=True):
                swap = current.clone()
                current.copy_(averaged)
                averaged.copy_(swap)
        self.swapped = not self.swapped

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """After fitting (and after the final last.ckpt), leave the EMA weights in the module."""
        if stage == "fit" and self.average is not None:
            if not self.swapped:
                self._swap(pl_module)
            self.average = None

    def state_dict(self) -> dict[str, Any]:
        """The callback's own state in a checkpoint."""
        return {"latest_update_step": self.latest_update_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step of the last update."""
        self.latest_update_step = state_dict["latest_update_step"]

    def on_save_checkpoint(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]
    ) -> None:
        """state_dict <- the average; the training weights go to current_model_state."""
        if self.average is None:
            return
        module_state = checkpoint["state_dict"]  # what the module holds now
        kept = {name: self.average[name] for name in module_state}
        average, training = (module_state, kept) if self.swapped else (kept, module_state)
        checkpoint["state_dict"] = {name: tensor.clone() for name, tensor in average.items()}
        checkpoint["current_model_state"] = {name: tensor.clone() for name, tensor in training.items()}
        checkpoint["averaging_state"] = {"n_averaged": torch.tensor(self.updates)}

    def on_load_checkpoint(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]
    ) -> None:
        """When resuming a fit: the average from state_dict, the training weights from current_model_state (a
        checkpoint without them starts both from its state_dict)."""
        if self.average is None:
            return
        for name, tensor in checkpoint["state_dict"].items():
            self.average[name].copy_(tensor)
        if "current_model_state" in checkpoint:
            pl_module.load_state_dict(checkpoint["current_model_state"])
            self.updates = int(checkpoint["averaging_state"]["n_averaged"])


def averaged_tensors(pl_module: "pl.LightningModule") -> list[tuple[str, Tensor]]:
    """What a checkpoint holds of the module (its parameters and persistent buffers), named, in a fixed order.

    The noise schedule's float64 tables are non-persistent constants: averaging them would be a no-op, and one
    float64 tensor among the float32 weights sends torch's foreach ops down their slow path (a kernel a tensor)."""
    constant = {f"{prefix}.{name}" if prefix else name for prefix, module in pl_module.named_modules()
                for name in module._non_persistent_buffers_set}  # fmt: skip
    buffers = [(name, tensor) for name, tensor in pl_module.named_buffers() if name not in constant]
    return [*pl_module.named_parameters(), *buffers]


def tensors_by_name(pl_module: "pl.LightningModule", names) -> list[Tensor]:
    """The module's tensors of these names (chosen once by `averaged_tensors`), in their order: each step looks
    them up among its parameters and buffers rather than walking every submodule for the persistent ones."""
    named = {**dict(pl_module.named_parameters()), **dict(pl_module.named_buffers())}
    return [named[name] for name in names]


def device_copy(tensor: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """A detached copy on `device` with `tensor`'s strides (channels-last stays channels-last), so that the
    average and the weights meet torch's foreach fast path, which needs equal dtypes and strides."""
    copy = torch.empty_like(tensor, device=device, dtype=dtype, memory_format=torch.preserve_format)
    return copy.copy_(tensor.detach())
