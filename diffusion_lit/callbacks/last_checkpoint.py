"""LastCheckpoint: last.ckpt, always the newest state of the run, in a folder that is the run's own."""

import signal
import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from diffusion_lit import files
from diffusion_lit.distributed import StopVote
from diffusion_lit.errors import UserError
from diffusion_lit.runs import RunLock, check_folder_is_ours, describe, new_run_id, owner_of
from diffusion_lit.signals import Interrupted, StopSignals, requeue_slurm_job


class LastCheckpoint(Checkpoint):
    """Keeps `dirpath/last.ckpt` the newest state of the run, however the run ends, and the folder the run's own.

    Written every `every_n_train_steps` optimizer steps; at the end of every run that ends without an error
    (max_steps, max_epochs, max_time, early stopping); when a run stops with a one-line error (the non-finite
    guard) and the weights are finite; and on Ctrl-C or SIGTERM: the first signal stops the run after the
    training step in progress, on every process, saves there and prints the command that resumes it (exit
    status 128 + the signal's number); a second Ctrl-C aborts at once, without saving. SIGUSR1 (the warning
    SLURM sends before the time limit with `--signal=SIGUSR1@90`) stops and saves the same way, and then, under
    SLURM, requeues the job once, from the main process of global rank 0; the requeued job resumes with
    `--ckpt_path last`. Never twice for one step, and always under the same name, however often the run was
    pre-empted and resumed. It is written whole or not at all (`files.AtomicCheckpointIO`: a temporary file in
    the same folder, fsynced, then renamed), so a kill or a full disk during a write leaves the previous one.

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
        self.vote = StopVote()

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
        # Lightning 2.6 broadcasts its own SIGTERM flag on the device and reads it back every step under DDP
        # (Lightning PR 21640 would make that optional). The signals are ours from here and its flag stays
        # down, so that broadcast would only cost a device sync per step: the processes agree through `vote`.
        epoch_loop = trainer.fit_loop.epoch_loop
        if hasattr(epoch_loop, "_broadcast_sigterm_tensor"):
            epoch_loop._broadcast_sigterm_tensor = lambda: None

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
        """The signal that asked for a stop (0: none), on every process: the processes agree on the host, a step
        later (`distributed.StopVote`), so that all stop at the same step, whichever of them was signalled."""
        return self.vote((self.signals.received or 0) if self.signals is not None else 0)

    def _stop(self, trainer: "pl.Trainer", signal_number: int) -> None:
        """Save here (if the weights are finite), say how to resume, and end the run with 128 + the signal."""
        name = StopSignals.NAMES.get(signal_number, f"signal {signal_number}")
        held = False
        try:
            self._save(trainer)
            saved = f"saved {self.path} at step {trainer.global_step}" if self.writes else "a dry run: nothing saved"
            held = self.writes
        except UserError as refused:  # non-finite weights, a full disk: the previous last.ckpt stays
            saved = f"not saved ({refused}); {self.path} keeps its step {self.saved_step}"
        if trainer.is_global_zero:
            resume = f"; resume with:\n  {self.resume_command}" if self.writes and self.path.exists() else ""
            print(f"lit-ddpm: stopped by {name}: {saved}{resume}", file=sys.stderr, flush=True)
            if signal_number == signal.SIGUSR1 and held:  # after the save: requeueing ends this job
                requeued = requeue_slurm_job()
                if requeued:
                    print(f"lit-ddpm: {requeued}", file=sys.stderr, flush=True)
        raise Interrupted(128 + signal_number)

    def _save(self, trainer: "pl.Trainer") -> None:
        """Write last.ckpt; a full disk (or any failed write) stops the run with one line on every process, and
        the previous last.ckpt stays whole (the write is atomic)."""
        if not self.writes or trainer.global_step == self.saved_step:
            return
        failure = files.save_checkpoint(trainer, self.path)
        if failure:
            self.save_failed = True
            _, step = owner_of(self.path)  # said "whole" only of a file that loads
            kept = (f"the previous one (step {step}) is whole" if step is not None
                    else f"{self.path} does not load" if self.path.exists() else "nothing was saved")  # fmt: skip
            raise UserError(f"could not write {self.path} ({failure}); {kept}. Free space, then resume the run")
        self.saved_step = trainer.global_step

    def _let_go(self) -> None:
        self.vote.close()
        if self.signals is not None:
            self.signals.restore()
        self.lock.release()
