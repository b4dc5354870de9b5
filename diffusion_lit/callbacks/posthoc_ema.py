"""Post-hoc EMA (Karras et al. 2024, EDM2 section 3): choose the EMA length after training.

`PostHocEMA` keeps two power-function averages of the weights while fitting and saves both every N steps;
`reconstruct` combines the saved ones into the average of any other length, as if it had been kept all along.

The power-function average with exponent gamma, updated after optimizer step t = 1, 2, ... with the training
weights w_t,

    avg_t = beta_t avg_{t-1} + (1 - beta_t) w_t,    beta_t = (1 - 1/t)^(gamma + 1),

is, unrolled, avg_T = sum_{t <= T} p_T(t) w_t with p_T(t) = (t^(gamma+1) - (t-1)^(gamma+1)) / T^(gamma+1): the
profile (gamma+1) tau^gamma / T^(gamma+1) integrated over each step. Its relative width, the standard deviation
of that profile over T, is sigma_rel = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3))), whatever T; so a width says
the EMA length as a fraction of training (EDM2's sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94). Any
average is sum_t q(t) w_t for some profile q; `coefficients` finds the mix x of the saved averages whose
profile sum_i x_i p_i is nearest the wanted one in least squares over the steps, exactly, in float64.
"""

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch import Callback
from torch import Tensor

from diffusion_lit import files
from diffusion_lit.callbacks.ema import averaged_tensors, device_copy, tensors_by_name
from diffusion_lit.errors import UserError

MAX_SIGMA_REL = 0.28  # gamma = 0 (a plain mean over the whole run) is sigma_rel = 12^(-1/2) = 0.2887
FOLDER = "ema"  # the snapshots' folder, inside the run's checkpoint folder
CHUNK = 1 << 16  # steps per block when summing profile products


def sigma_rel_of(gamma: float) -> float:
    """The relative width of the power-function profile with exponent gamma."""
    return ((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) ** 0.5


def gamma_of(sigma_rel: float) -> float:
    """The exponent whose profile has relative width sigma_rel: the real root of
    gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0 (sigma_rel_of squared, multiplied out)."""
    if not 0 < sigma_rel <= MAX_SIGMA_REL:
        raise UserError(f"sigma_rel must lie in (0, {MAX_SIGMA_REL}] (0.05 to 0.2 are usual), got {sigma_rel}")
    inverse = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - inverse, 12.0 - inverse])
    return float(max(root.real for root in roots if abs(root.imag) < 1e-9))


def profile(gamma: float, step: int, steps: Tensor) -> Tensor:
    """p_step(t) at each t in `steps` (1-based optimizer steps, float64): the weight of the training weights after
    step t in the average kept to `step`; 0 after it."""
    t = steps.to(torch.float64)
    weights = (t / step) ** (gamma + 1) - ((t - 1) / step) ** (gamma + 1)
    return torch.where(t <= step, weights, 0.0)


def coefficients(stored: list[tuple[float, int]], wanted: tuple[float, int]) -> Tensor:
    """x minimising sum_t (sum_i x_i p_i(t) - q(t))^2, for the stored (gamma, step) averages p_i and the wanted
    (gamma, step) q: the normal equations, with their products summed exactly over every step."""
    last = max([step for _, step in stored] + [wanted[1]])
    gram = torch.zeros(len(stored), len(stored), dtype=torch.float64)
    right = torch.zeros(len(stored), dtype=torch.float64)
    for start in range(1, last + 1, CHUNK):
        steps = torch.arange(start, min(start + CHUNK, last + 1), dtype=torch.float64)
        basis = torch.stack([profile(gamma, step, steps) for gamma, step in stored])
        gram += basis @ basis.T
        right += basis @ profile(*wanted, steps)
    return torch.linalg.lstsq(gram, right.unsqueeze(1), driver="gelsd").solution.squeeze(1)


class PostHocEMA(Callback):
    """Two power-function averages of the weights (EDM2's sigma_rel 0.05 and 0.10) kept while fitting, both saved
    every `every_n_train_steps` steps and at the end of the run into the run's folder (LastCheckpoint's), under
    `ema/step=NNNNNNN.pt`; `lit-ddpm ema` reconstructs any other EMA length from them.

    Disk: each snapshot holds len(sigma_rels) float32 copies of the weights; a run of S steps keeps
    S / every_n_train_steps of them, plus the last step's (the demo's 2.5M-parameter UNet, 2,520 steps, every
    500: 6 files of 2 x 10 MB; configs/cifar10.yaml's 40.7M UNet with every_n_train_steps 5,000 over its 78,200
    steps: 16 files of 2 x 163 MB, 5.2 GB). The averages are also in every
    last.ckpt, so a resumed run goes on with them exactly. The model's own EMA (`DiffusionModule.ema_decay`)
    stays what sampling, validation and test use.
    """

    def __init__(self, sigma_rels: tuple[float, ...] = (0.05, 0.10), every_n_train_steps: int = 500) -> None:
        if every_n_train_steps < 1:
            raise UserError(f"PostHocEMA.every_n_train_steps must be at least 1, got {every_n_train_steps}")
        self.sigma_rels = tuple(sigma_rels)
        self.gammas = [gamma_of(sigma_rel) for sigma_rel in self.sigma_rels]
        self.every_n_train_steps = every_n_train_steps
        self.averages: list[list[Tensor]] | None = None
        self.names: list[str] = []
        self.updates = 0
        self.folder: Path | None = None
        self.run_id: str | None = None
        self.saved_step = 0

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """Fresh averages for each fit, in float32 on the device training will use (Lightning has not moved the
        module yet, but its `device` already says where it will be); a resumed fit overwrites them in
        `load_state_dict`."""
        if stage == "fit":
            self.names = [name for name, _ in averaged_tensors(pl_module)]  # parameters and persistent buffers
            weights, device = self._weights(pl_module), pl_module.device
            self.averages = [[device_copy(t, device, torch.float32) for t in weights] for _ in self.gammas]
            self.updates, self.saved_step = 0, 0

    def _weights(self, pl_module: "pl.LightningModule") -> list[Tensor]:
        return [tensor.detach() for tensor in tensors_by_name(pl_module, self.names)]

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """The snapshots go into the run's folder, the one LastCheckpoint has checked and locked."""
        from diffusion_lit.callbacks.last_checkpoint import LastCheckpoint

        keepers = [c for c in trainer.callbacks if isinstance(c, LastCheckpoint)]
        if not keepers:
            raise UserError("PostHocEMA saves into the run's folder: list LastCheckpoint in trainer.callbacks too")
        self.folder = None if trainer.fast_dev_run else keepers[0].dirpath / FOLDER
        self.keeper = keepers[0]

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", *args: Any) -> None:
        """After each optimizer step: both averages updated; a snapshot on schedule and at the last step."""
        step = trainer.global_step
        if step <= self.updates:
            return  # no optimizer step in this batch (gradient accumulation)
        current = [t.float() for t in self._weights(pl_module)]
        with torch.no_grad():
            for gamma, average in zip(self.gammas, self.averages, strict=True):
                torch._foreach_lerp_(average, current, 1 - (1 - 1 / step) ** (gamma + 1))
        self.updates = step
        last = trainer.should_stop or 0 < trainer.max_steps <= step
        if step % self.every_n_train_steps == 0 or last:
            self._save(trainer)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """The end of the run (max_epochs, max_time, a signal): its last step is a snapshot too."""
        self._save(trainer)

    def _save(self, trainer: "pl.Trainer") -> None:
        """ema/step=NNNNNNN.pt, written whole or not at all (a temporary file, then a rename), by the main process."""
        step = self.updates
        if self.folder is None or step == self.saved_step or step == 0:
            return
        path, failure = self.folder / f"step={step:07d}.pt", None
        if trainer.is_global_zero:
            kept = {"run_id": self.keeper.run_id, **snapshot(self.names, self.sigma_rels, self.averages, step)}
            try:
                files.save(kept, path)
            except OSError as error:
                failure = files.why(error, path)
        failure = trainer.strategy.broadcast(failure)
        if failure:
            raise UserError(f"could not write {path} ({failure}); free space, then resume the run")
        self.saved_step = step

    def state_dict(self) -> dict[str, Any]:
        """The averages and their step, in every checkpoint: a resumed run continues them exactly."""
        if self.averages is None:
            return {}
        return {"updates": self.updates, "sigma_rels": list(self.sigma_rels), "averages": self.averages}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the averages (a checkpoint without them, or with other widths, starts them afresh)."""
        if self.averages is None or state_dict.get("sigma_rels") != list(self.sigma_rels):
            return
        for average, saved in zip(self.averages, state_dict["averages"], strict=True):
            torch._foreach_copy_(average, [t.to(average[0].device) for t in saved])
        self.updates = self.saved_step = state_dict["updates"]


def snapshot(names: list[str], sigma_rels: tuple[float, ...], averages: list[list[Tensor]], step: int) -> dict:
    """What a snapshot holds: each width's average of the tensors `names`, kept to optimizer step `step`."""
    by_name = [{n: t.cpu() for n, t in zip(names, average, strict=True)} for average in averages]
    profiles = [{"sigma_rel": s, "gamma": gamma_of(s), "state_dict": state}
                for s, state in zip(sigma_rels, by_name, strict=True)]  # fmt: skip
    return {"global_step": step, "profiles": profiles}


def at_checkpoint(found: list[dict], checkpoint: str | Path) -> tuple[list[dict], int]:
    """The snapshots `found` from before a checkpoint's step, then the averages that the checkpoint itself holds
    (its PostHocEMA state, which a checkpoint saved during a step may hold one update short of its global_step),
    and their step: what `reconstruct` rebuilds any width from, exactly at that checkpoint."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get("callbacks", {})
    kept = [value for key, value in state.items() if key.startswith("PostHocEMA") and value]
    if len(kept) != 1:
        raise UserError(f"{checkpoint} holds no post-hoc EMA averages: its run was trained without PostHocEMA")
    names = list(found[0]["profiles"][0]["state_dict"])
    own = snapshot(names, tuple(kept[0]["sigma_rels"]), kept[0]["averages"], kept[0]["updates"])
    return [s for s in found if s["global_step"] < own["global_step"]] + [own], own["global_step"]


def snapshots(run: Path) -> list[dict]:
    """The snapshots of the run in folder `run` (checkpoints/NAME), oldest first, memory-mapped."""
    paths = sorted((Path(run) / FOLDER).glob("step=*.pt"))
    if not paths:
        raise UserError(
            f"{run / FOLDER} holds no post-hoc EMA snapshots: train with the PostHocEMA callback in "
            "trainer.callbacks (docs/training.md 'Post-hoc EMA'), or give the run's folder (checkpoints/NAME)"
        )
    found = []
    for path in paths:
        try:
            found.append(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        except Exception as error:  # noqa: BLE001  (truncated, foreign)
            raise UserError(f"{path} is not a readable snapshot ({str(error).splitlines()[0][:120]})") from None
    return found


def reconstruct(found: list[dict], sigma_rel: float, step: int | None = None) -> tuple[dict[str, Tensor], Tensor]:
    """The state_dict of the average with relative width sigma_rel at `step` (default: the last snapshot's),
    from the snapshots `found` up to that step, and the coefficients used."""
    step = step or max(s["global_step"] for s in found)
    used = [(s, p) for s in found for p in s["profiles"] if s["global_step"] <= step]
    if not used or max(s["global_step"] for s, _ in used) < step:
        kept = ", ".join(str(s["global_step"]) for s in found)
        raise UserError(f"no snapshot at step {step}: the run's snapshots are at steps {kept}")
    x = coefficients([(p["gamma"], s["global_step"]) for s, p in used], (gamma_of(sigma_rel), step))
    names = used[0][1]["state_dict"].keys()
    state = {}
    for name in names:
        total = sum(float(c) * p["state_dict"][name].double() for c, (_, p) in zip(x, used, strict=True))
        state[name] = total.to(used[0][1]["state_dict"][name].dtype)
    return state, x
