"""The run's plan: how many optimizer steps it will take, known before the first one, and the learning-rate
schedule drawn over it, so that one recipe (warm-up, cool-down, EMA width) serves a run of any length.

The length comes from the trainer: `max_steps`, or `max_epochs` times the steps of an epoch (Lightning's
`estimated_stepping_batches`), or, with `max_time`, the steps the measured pace fits into the time left,
re-estimated every 20 steps, so that the schedule ends when the time does.
"""

import math
import sys
import time
from typing import Literal

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import Timer

from diffusion_lit.distributed import agree
from diffusion_lit.errors import UserError, check_range

Decay = Literal["constant", "cosine", "wsd", "inv_sqrt"]
DECAYS = ("constant", "cosine", "wsd", "inv_sqrt")


def warmup_length(warmup: float, total: int) -> int:
    """Warm-up steps: `warmup` steps (1 or more), or that share of a run of `total` steps (below 1)."""
    return round(warmup * total) if isinstance(warmup, float) and warmup < 1 else int(warmup)


def depends_on_length(warmup: float, decay: str) -> bool:
    """Whether the rate at a step depends on the run's length: a warm-up given as a share of it, or a decay."""
    return decay != "constant" or 0 < warmup < 1


def lr_factor(step: int, total: int, warmup: int, decay: Decay = "constant", decay_from: float = 0.8) -> float:
    """The learning rate at optimizer step `step` (0-based) of a run of `total`, as a share of the base rate.

    A linear warm-up over the first `warmup` steps ((step + 1) / warmup), then: "constant"; "cosine", half a
    cosine from 1 at `decay_from` of the run to 0 at its end; "wsd" (warmup-stable-decay, Hägele et al. 2024),
    constant, then linear from 1 at `decay_from` to 0 at the end; "inv_sqrt" (EDM2, Karras et al. 2024),
    1 / sqrt(step / start) after start = `decay_from` of the run. The decay counts from the end of the
    warm-up when it starts before it.
    """
    ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    start = max(decay_from * total, warmup)
    if decay == "constant" or step < start:
        return ramp
    if decay == "inv_sqrt":
        return ramp / math.sqrt((step + 1) / max(start, 1))
    progress = min(1.0, (step - start) / max(total - start, 1))
    return ramp * (0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress)


class RunPlan(Callback):
    """The planned length of the run (`total`, optimizer steps) and the learning-rate factor over it.

    Fixed at the start of training from `max_steps` or `max_epochs`. With `max_time`, every `every` steps the
    steps that the pace so far (every step since this process began training, validation, grids and FID
    included) fits into the time left, added to the steps done; the processes agree on the smallest. The
    warm-up's length is fixed once the run has passed it, or at the first plan: a run resumed with a larger
    budget keeps it (no second warm-up) and its decay moves later; one line says so.

    Args:
        warmup: optimizer steps of linear warm-up (1 or more), or a share of the run (below 1; 0: none).
        decay: what follows the warm-up: "constant", "cosine", "wsd" or "inv_sqrt" (`lr_factor`).
        decay_from: the share of the run where the decay begins.
        every: with a time budget, the steps between estimates.
    """

    def __init__(self, warmup: float = 0, decay: Decay = "constant", decay_from: float = 0.8, every: int = 20) -> None:
        check_range("DiffusionModule", 0, warmup_steps=warmup)
        check_range("DiffusionModule", 0, 1, decay_from=decay_from)
        if decay not in DECAYS:
            raise UserError(f"DiffusionModule.lr_decay must be one of {', '.join(DECAYS)}, got {decay!r}")
        self.warmup, self.decay, self.decay_from, self.every = warmup, decay, decay_from, every
        self.total: int | None = None  # planned optimizer steps; None until known
        self.warmup_steps: int | None = None  # fixed once known for good
        self.timer: Timer | None = None  # Lightning's, with max_time
        self._started: tuple[float, int] = (0.0, 0)  # (monotonic time, step) when this process began training

    def factor(self, step: int) -> float:
        """LambdaLR's function: the rate at `step`, as a share of the base rate (0 before the first estimate of
        a run whose warm-up is a share of a length not yet known)."""
        warmup = self.warmup_steps
        if warmup is None and self.total is None and self.warmup:
            return 0.0 if self.warmup < 1 else min(1.0, (step + 1) / self.warmup)
        warmup = warmup if warmup is not None else warmup_length(self.warmup, self.total or 1)
        return lr_factor(step, self.total or step + 1, warmup, self.decay, self.decay_from)

    def state_dict(self) -> dict:
        return {"total": self.total, "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        self.total, self.warmup_steps = state_dict.get("total"), state_dict.get("warmup_steps")

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Plan the run (or re-plan a resumed one) and say so."""
        self.timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        self._started = (time.monotonic(), trainer.global_step)
        steps = trainer.estimated_stepping_batches
        if self.timer is None and not math.isfinite(steps):
            if depends_on_length(self.warmup, self.decay):
                raise UserError("the learning rate is planned over the run, which has no length: set "
                                "trainer.max_steps, max_epochs or max_time")  # fmt: skip
            return  # a constant rate after a warm-up in steps needs no plan
        previous, self.total = self.total, (int(steps) if self.timer is None else None)
        if self.total is not None:
            self._fix_warmup(trainer.global_step, final=True)
            self._say(trainer, previous)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", *args) -> None:
        """With a time budget, every `every` steps: the steps the pace so far fits into the budget."""
        done = trainer.global_step - self._started[1]
        if self.timer is None or done < 1 or (self.total is not None and done % self.every):
            return
        pace = (time.monotonic() - self._started[0]) / done
        left = self.timer.time_remaining("train") or 0.0
        estimate = min(trainer.global_step + int(left / pace), trainer.estimated_stepping_batches)
        self.total = int(agree(estimate, dist.ReduceOp.MIN))
        self._fix_warmup(trainer.global_step, final=False)
        if done == self.every:  # the first estimate of a steadier pace than the first step's
            self._say(trainer, None)

    def _fix_warmup(self, step: int, final: bool) -> None:
        """Keep the warm-up's length from here on: at the first plan of a run of known length, or, with a time
        budget, once the run has passed it."""
        if self.warmup_steps is None:
            length = warmup_length(self.warmup, self.total)
            if final or step >= length:
                self.warmup_steps = length

    def _say(self, trainer: "pl.Trainer", previous: int | None) -> None:
        if not trainer.is_global_zero:
            return
        if previous is not None and previous != self.total:
            print(f"lit-ddpm: re-planned: {previous:,} -> {self.total:,} optimizer steps; the warm-up stays "
                  f"{self.warmup_steps:,} steps and the decay moves", file=sys.stderr)  # fmt: skip
            return
        budget = f" in {self.timer._duration / 60:g} min (re-estimated as the run goes)" if self.timer else ""
        print(f"lit-ddpm: planned: {self.total:,} optimizer steps{budget}", file=sys.stderr)
