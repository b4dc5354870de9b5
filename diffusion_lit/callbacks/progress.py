"""ProgressBar: Lightning's rich bar in a terminal, plain progress lines in a log file."""

import sys
import time
from datetime import timedelta

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar, Timer


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar in a terminal; with stdout not a terminal (SLURM, nohup, CI: where the
    rich bar prints nothing until the run ends), one plain line at a time instead:

        step 500/2520 · epoch 4/18 · loss 0.0512 · 118 img/s · elapsed 0:01:12 · ETA 0:05:12

    Lines come on logging steps (`trainer.log_every_n_steps`), at most one every `line_interval` seconds,
    and once at the end; the ETA is to whichever of max_steps, max_epochs and max_time comes first.

    Logged values are read only on logging steps. Lightning turns every value logged with `prog_bar=True`
    into a Python number after every training batch: a host synchronisation per step, which keeps the CPU
    from queueing the next step while the GPU works. The module therefore logs `train/loss` without
    `prog_bar`, and this bar shows it (and any other `metrics`) from the values Lightning keeps on the
    device, read every `trainer.log_every_n_steps` optimizer steps, when the logger reads them anyway.

    Args:
        metrics: logged training values to show beside the ones logged with `prog_bar=True`.
        line_interval: the least number of seconds between two plain lines.
    """

    def __init__(self, metrics: tuple[str, ...] = ("train/loss",), line_interval: float = 30.0) -> None:
        super().__init__()
        self.metrics = metrics
        self.line_interval = line_interval
        self.plain = not sys.stdout.isatty()
        self._read: dict[str, float] = {}
        self._read_at = -1
        self._start: tuple[float, int] | None = None  # (time, step) when training started
        self._last_line: tuple[float, int] | None = None  # (time, images) at the last plain line
        self._images = 0

    def get_metrics(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> dict:
        """The bar's numbers: the prog_bar ones, and the training values last read."""
        step = trainer.global_step
        every = max(trainer.log_every_n_steps, 1)
        if trainer.training and self._read_at != step and (step % every == 0 or self._read_at < 0):
            logged = trainer.callback_metrics
            self._read = {name: float(logged[name]) for name in self.metrics if name in logged}
            self._read_at = step
        return {**super().get_metrics(trainer, pl_module), **self._read}

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """In a log file the rich bar stays silent; the clock for the lines starts."""
        if self.plain:
            self.disable()
        super().on_train_start(trainer, pl_module)
        self._start = self._last_line = (time.perf_counter(), trainer.global_step)
        self._images = 0

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs, batch, *args) -> None:
        """A plain line on logging steps, at most every `line_interval` seconds."""
        super().on_train_batch_end(trainer, pl_module, outputs, batch, *args)
        if not self.plain:
            return
        self._images += len(batch[0]) * trainer.world_size
        due = time.perf_counter() - self._last_line[0] >= self.line_interval
        if due and trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            self._line(trainer, pl_module)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """The last line."""
        super().on_train_end(trainer, pl_module)
        if self.plain:
            self._line(trainer, pl_module, final=True)

    def _line(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", final: bool = False) -> None:
        now, step = time.perf_counter(), trainer.global_step
        values = self.get_metrics(trainer, pl_module)
        rate = self._images / max(now - self._last_line[0], 1e-9)
        self._images, self._last_line = 0, (now, step)
        parts = [f"step {step}" + (f"/{trainer.max_steps}" if trainer.max_steps > 0 else "")]
        max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        # current_epoch is the 0-based epoch in progress; when a run ends, Lightning has counted its last one done.
        epoch = max(trainer.current_epoch, 1) if final else trainer.current_epoch + 1
        parts.append(f"epoch {epoch}" + (f"/{max_epochs}" if max_epochs else ""))
        parts += [f"{name.split('/')[-1]} {value:.4g}" for name, value in values.items() if name in self.metrics]
        parts += [f"{rate:,.0f} img/s", f"elapsed {_clock(now - self._start[0])}"]
        eta = self._eta(trainer, now, step)
        parts += [f"ETA {_clock(eta)}"] if eta is not None else []
        if trainer.is_global_zero:
            print(" · ".join(parts), flush=True)

    def _eta(self, trainer: "pl.Trainer", now: float, step: int) -> float | None:
        """Seconds to the nearest of max_steps, max_epochs and max_time, at the rate since the start."""
        done = step - self._start[1]
        seconds_per_step = (now - self._start[0]) / done if done > 0 else None
        left = []
        if seconds_per_step is not None and trainer.max_steps > 0:
            left.append((trainer.max_steps - step) * seconds_per_step)
        batches = trainer.num_training_batches
        if seconds_per_step is not None and trainer.max_epochs and trainer.max_epochs > 0 and batches != float("inf"):
            steps_per_epoch = batches // trainer.accumulate_grad_batches
            left.append((trainer.max_epochs * steps_per_epoch - step) * seconds_per_step)
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        if timer is not None and timer.time_remaining("train") is not None:
            left.append(timer.time_remaining("train"))
        return max(min(left), 0.0) if left else None


def _clock(seconds: float) -> str:
    """h:mm:ss."""
    return str(timedelta(seconds=round(seconds)))
