"""InitFromTeacher: a student starts from its teacher's weights (`lit-ddpm distill`)."""

import copy

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from diffusion_lit.checkpoints import check_weights_fit, upgraded


class InitFromTeacher(Callback):
    """Before fitting, load a teacher checkpoint's EMA weights into the model, so that the student (and its EMA,
    which copies the weights next) starts where the teacher is (Geng et al. 2024), and give a loss that asks for
    one (`ConsistencyLoss(target="teacher")`) a frozen copy of that network. A resumed run then restores its
    own state over the student's weights, not the copy's. Every checkpoint of the run names the teacher.

    Args:
        teacher: the teacher's checkpoint (`lit-ddpm fit` writes them).
    """

    def __init__(self, teacher: str) -> None:
        self.teacher = teacher

    def state_dict(self) -> dict:
        """What the student was distilled from."""
        return {"teacher": self.teacher}

    def load_state_dict(self, state_dict: dict) -> None:
        """A resumed student keeps naming its first teacher."""
        self.teacher = state_dict.get("teacher", self.teacher)

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """The teacher's EMA weights into the model (safely: weights only; one line for another architecture)."""
        if stage != "fit":
            return
        weights = torch.load(upgraded(self.teacher), map_location="cpu", weights_only=True)["state_dict"]
        check_weights_fit(pl_module.state_dict(), weights)
        pl_module.load_state_dict(weights)
        if hasattr(pl_module.criterion, "teacher"):
            pl_module.criterion.teacher = copy.deepcopy(pl_module.unet).eval().requires_grad_(False)

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """The teacher's copy to the device the strategy has just put the student on (once, not every step)."""
        if getattr(pl_module.criterion, "teacher", None) is not None:
            pl_module.criterion.teacher.to(pl_module.device)
