"""NonFiniteGuard: skip optimizer steps whose gradients are not finite, and stop a run that does not recover."""

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from diffusion_lit.errors import UserError


class NonFiniteGuard(Callback):
    """Skip every optimizer step whose gradients are not all finite, and stop a run that does not recover.

    A skipped step moves neither the weights nor Adam's moments or step count. Skips are counted and logged
    as train/skipped_steps. Every `max_nonfinite_steps` steps the streak is read; if that many steps or
    more in a row were skipped, the run stops with one line (and LastCheckpoint saves `last.ckpt`, still
    the weights of the last good step). fp16 loss scaling alone skips a handful in a row while it calibrates.

    With fused Adam the flag goes to the optimizer as `found_inf` (the input GradScaler uses), so nothing is
    read back from the GPU between checks; otherwise the gradients are dropped, which reads one flag per
    step and keeps the CPU from queueing the next step early. Gradients are already reduced across
    processes here, so every process takes the same decision.

    Args:
        max_nonfinite_steps: how often the streak is checked, and how long a streak stops the run; None: no
            guard (non-finite steps are taken as they come).
    """

    def __init__(self, max_nonfinite_steps: int | None = 50) -> None:
        if max_nonfinite_steps is not None and max_nonfinite_steps < 1:
            raise UserError("NonFiniteGuard.max_nonfinite_steps must be at least 1, or None to turn the guard off")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.skipped: Tensor | None = None  # device counters: skipped steps in this run, and in a row
        self.streak: Tensor | None = None

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped in this run (reads the count from the device)."""
        return 0 if self.skipped is None else int(self.skipped)

    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: torch.optim.Optimizer
    ) -> None:
        """Flag (or drop) this step's gradients if any is not finite; check the streak every N steps."""
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if self.max_nonfinite_steps is None or not grads:
            return
        bad = torch.nn.utils.get_total_norm(grads).isfinite().logical_not().long()
        if self.skipped is None:
            self.skipped, self.streak = torch.zeros_like(bad), torch.zeros_like(bad)
        self.skipped += bad
        self.streak = (self.streak + 1) * bad
        pl_module.log("train/skipped_steps", self.skipped.float())
        if optimizer.defaults.get("fused"):  # fp16's GradScaler sets its own found_inf over this one
            optimizer.found_inf = bad.float()
        elif bad.item():
            for parameter in pl_module.parameters():
                parameter.grad = None
        limit = self.max_nonfinite_steps
        if (trainer.global_step + 1) % limit == 0 and int(self.streak) >= limit:
            folder = getattr(trainer.checkpoint_callback, "dirpath", None)  # LastCheckpoint saves it on the way out
            raise UserError(
                f"training stopped: the last {int(self.streak)} optimizer steps had non-finite gradients "
                f"(step {trainer.global_step}); the last good state is in {Path(folder or '.') / 'last.ckpt'}. "
                f"Lower optimizer.lr, or set Trainer.precision bf16-mixed or 32-true instead of 16-mixed"
            )
