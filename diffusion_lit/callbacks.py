"""Training callbacks. They reach the model only through DiffusionModule.sample()."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from diffusion_lit.diffusion.sampling import Sampling
from diffusion_lit.errors import UserError
from diffusion_lit.generation import generate_all, save_grid
from diffusion_lit.runs import Interrupted, RunLock, StopSignals, check_folder_is_ours, describe, new_run_id


class SampleGrid(Callback):
    """After every `every_n_epochs`-th validation, sample a grid from the EMA weights, save and log it.

    The same seed is used every time, so successive grids show the same noise turning into images.

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
        self.sampling.check(pl_module.hparams.timesteps, prefix="SampleGrid's sampling.", conditional=conditional)

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Sample, write `dirpath/step=N.png` and hand the grid to the logger (rank 0 only)."""
        if trainer.sanity_checking or trainer.fast_dev_run or not trainer.is_global_zero or trainer.state.fn != "fit":
            return  # a dry run (fast_dev_run) writes nothing
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        options = {"settings": self.sampling, "seed": self.seed, "batch_size": self.num_samples}
        images, _ = generate_all(pl_module, self.num_samples, **options)  # a conditional model: classes in turn
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


class LastCheckpoint(Checkpoint):
    """Keeps `dirpath/last.ckpt` the newest state of the run, however the run ends, and the folder the run's own.

    Written every `every_n_train_steps` optimizer steps; at the end of every run that ends without an error
    (max_steps, max_epochs, max_time, early stopping); when a run stops with a one-line error (the non-finite
    guard) and the weights are finite; and on Ctrl-C or SIGTERM: the first signal stops the run after the
    training step in progress, on every process, saves there and prints the command that resumes it (exit
    status 128 + the signal's number); a second Ctrl-C aborts at once, without saving. Never twice for one
    step, and always under the same name, however often the run was pre-empted and resumed. Lightning writes
    it atomically (a temporary file, then a rename), so a kill during a write leaves the previous one.

    The folder is the run's: a lock (`runs.RunLock`) stops a second run from writing into it at the same time,
    and a fresh run (or one resumed from another run's checkpoint) is refused where the folder holds another
    run's checkpoints, which it would replace. Each checkpoint carries its run's identity for this. A dry run
    (`fast_dev_run`) writes nothing.

    Args:
        dirpath: the run's checkpoint folder.
        every_n_train_steps: the interval of the scheduled saves (0: none, only the end and the signals).
    """

    def __init__(self, dirpath: str = "checkpoints", every_n_train_steps: int = 500) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_train_steps = every_n_train_steps
        self.resume_command = f"--ckpt_path {self.path}"  # the CLI puts its whole command line here
        self.run_id: str | None = None  # this run's identity: new, or the resumed checkpoint's
        self.saved_step: int | None = None  # the step of the newest state on disk; None before training starts
        self.writes = False  # whether this run may write into dirpath (not a dry run, the folder checked)
        self.save_failed = False
        self.save_due = False  # a scheduled save that fell after an epoch's last batch, for the next step
        self.lock = RunLock(self.dirpath)
        self.signals: StopSignals | None = None

    @property
    def path(self) -> Path:
        """dirpath/last.ckpt."""
        return self.dirpath / "last.ckpt"

    def state_dict(self) -> dict:
        """The run's identity, kept in every checkpoint of the run."""
        return {"run_id": self.run_id}

    def load_state_dict(self, state_dict: dict) -> None:
        """Resuming: the run goes on under its identity."""
        self.run_id = state_dict.get("run_id")

    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict) -> None:
        """Resuming from the end of an epoch (a run that ended by max_epochs, or by max_steps on an epoch's last
        batch): Lightning 2.6 restores the finished epoch's batch count with it and so runs an empty epoch
        first, one epoch ahead of the uninterrupted run from then on. The next epoch starts at batch 0."""
        loop = checkpoint.get("loops", {}).get("fit_loop", {})
        epochs, batches = loop.get("epoch_progress"), loop.get("epoch_loop.batch_progress")
        if not epochs or not batches or not batches.get("is_last_batch"):
            return
        finished = len({epochs["total"][key] for key in ("ready", "started", "processed", "completed")}) == 1
        if finished and batches["current"]["completed"] == batches["current"]["ready"]:
            batches["current"] = dict.fromkeys(batches["current"], 0)
            batches["is_last_batch"] = False

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Take the folder (lock, then check that it holds no other run's checkpoints), once per run, on the main
        process; every process stops with the same line if that fails. A dry run takes nothing."""
        if trainer.fast_dev_run:
            return
        refusal, left = None, None
        if trainer.is_global_zero:
            self.run_id = self.run_id or new_run_id()
            try:
                left = self.lock.acquire()
                check_folder_is_ours(self.dirpath, self.run_id, trainer.ckpt_path)
            except UserError as error:
                self.lock.release()
                refusal = str(error)
        refusal, self.run_id = trainer.strategy.broadcast((refusal, self.run_id))
        if refusal:
            raise UserError(refusal)
        if left:  # the main process only
            print(f"lit-ddpm: took over {self.lock.path}, left by a run that ended without releasing it "
                  f"({describe(left)})", file=sys.stderr)  # fmt: skip
        self.writes = True

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """The state a run starts from is on disk already (a resumed checkpoint) or is nothing (step 0); from
        here Ctrl-C and SIGTERM stop the run at a step boundary."""
        self.saved_step = trainer.global_step
        self.signals = StopSignals(str(self.path), announce=trainer.is_global_zero)
        self.signals.install()

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", *args) -> None:
        """The scheduled saves, the save of a run's last step, and the stop a signal asked for.

        The last step is saved here, not when the run has ended (where Lightning 2.6 has already counted a
        stopped epoch as done, and a resume would start the next one). An epoch's last batch is no place for a
        save: Lightning resumes a checkpoint written there, but then counts one epoch too few in the resumed
        run's checkpoints, so a second resume would repeat an epoch (found by `test_exact_resume`'s soak test);
        a save due there waits for the next step, or for the end of the run (`on_load_checkpoint`)."""
        due = self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0
        last = trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step  # max_time stops set should_stop
        self.save_due = self.save_due or bool(due) or last
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        if self.save_due:
            self._save(trainer)
            self.save_due = False
        signal_number = self._stop_requested(trainer)
        if signal_number:
            self._stop(trainer, signal_number)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """The true end of the run, whatever stopped it."""
        self._save(trainer)
        self._let_go()

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        """A one-line stop (UserError) or Lightning's own SIGTERM stop (before training starts): save the state at
        this step boundary, if it is finite. Then let go of the signals and the folder."""
        retry = not self.save_failed and self.saved_step is not None
        if isinstance(exception, SIGTERMException | UserError) and retry:
            try:
                self._save(trainer)
            except UserError as refused:  # non-finite weights: the previous last.ckpt stays
                rank_zero_warn(str(refused))
        self._let_go()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """However the run ended."""
        self._let_go()

    def _stop_requested(self, trainer: "pl.Trainer") -> int:
        """The signal that asked for a stop (0: none), on every process: the processes agree (one all-reduce a
        step; Lightning already synchronises once a step for its own SIGTERM flag), so that all stop at the
        same step, whichever of them was signalled."""
        received = (self.signals.received or 0) if self.signals is not None else 0
        if trainer.world_size > 1:
            flag = torch.tensor(received, device=trainer.strategy.root_device)
            received = int(trainer.strategy.reduce(flag, reduce_op="max"))
        return received

    def _stop(self, trainer: "pl.Trainer", signal_number: int) -> None:
        """Save here (if the weights are finite), say how to resume, and end the run with 128 + the signal."""
        name = StopSignals.NAMES.get(signal_number, f"signal {signal_number}")
        try:
            self._save(trainer)
            saved = f"saved {self.path} at step {trainer.global_step}" if self.writes else "a dry run: nothing saved"
        except UserError as refused:  # non-finite weights, a full disk: the previous last.ckpt stays
            saved = f"not saved ({refused}); {self.path} keeps its step {self.saved_step}"
        if trainer.is_global_zero:
            resume = f"; resume with:\n  {self.resume_command}" if self.writes and self.path.exists() else ""
            print(f"lit-ddpm: stopped by {name}: {saved}{resume}", file=sys.stderr, flush=True)
        raise Interrupted(128 + signal_number)

    def _save(self, trainer: "pl.Trainer") -> None:
        """Write last.ckpt; a full disk (or any failed write) stops the run with one line on every process, and
        the previous last.ckpt stays whole (the write is atomic)."""
        if not self.writes or trainer.global_step == self.saved_step:
            return
        failure = None
        try:
            trainer.save_checkpoint(self.path, weights_only=False)
        except OSError as error:  # only the main process writes: it alone fails, before Lightning's barrier
            trainer.strategy.barrier("Trainer.save_checkpoint")
            failure = error.strerror or str(error)
        failure = trainer.strategy.broadcast(failure)
        if failure:
            self.save_failed = True
            kept = f"the previous one (step {self.saved_step}) is whole" if self.path.exists() else "nothing was saved"
            raise UserError(f"could not write {self.path} ({failure}); {kept}. Free space, then resume the run")
        self.saved_step = trainer.global_step

    def _let_go(self) -> None:
        if self.signals is not None:
            self.signals.restore()
        self.lock.release()


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
        max_nonfinite_steps: how often the streak is checked, and how long a streak stops the run.
    """

    def __init__(self, max_nonfinite_steps: int = 50) -> None:
        if max_nonfinite_steps < 1:
            raise UserError(
                "NonFiniteGuard's max_nonfinite_steps must be at least 1 (remove the callback to turn it off)"
            )
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
                f"Lower model.lr, or use --trainer.precision bf16-mixed or 32-true instead of 16-mixed"
            )
