"""Training steps never wait for the device: no tensor value is read back on the host between logging steps.

On a GPU each such read (`.item()`, `bool(tensor)`, `float(tensor)`, ...) stalls the CPU until every queued
kernel has run, so it can no longer launch the next step's kernels while the GPU works. This CPU test
counts the reads themselves, with the shipped demo config: progress bar, EMA, non-finite guard, clipping.
"""

import collections
import sys
import traceback

import pytest
import torch
from lightning.pytorch import Callback

from conftest import ROOT, TINY
from diffusion_lit.cli import main
from diffusion_lit.module import DiffusionModule

READS = ["item", "tolist", "__bool__", "__float__", "__int__", "__index__"]


class Window(Callback):
    """Counts from the start of training step `start` to the end of the last training step (the progress bar's
    last line after it may read the loss once)."""

    def __init__(self, start: int, counting: list) -> None:
        self.start, self.counting = start, counting

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.start:
            self.counting[0] = True

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= trainer.max_steps:
            self.counting[0] = False


def reads_during_training(monkeypatch, *args: str) -> collections.Counter:
    """Host reads of tensor values in training steps 3 to 12 of the demo config, by the line that made them."""
    counting, reads = [False], collections.Counter()
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **k):
            if counting[0]:
                caller = next(f for f in reversed(traceback.extract_stack()[:-1]) if "/torch/" not in f.filename)
                reads[f"{_name} at {caller.filename.split('site-packages/')[-1]}:{caller.lineno}"] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # the progress bar as in a terminal: the rich bar
    window, configured = Window(3, counting), DiffusionModule.configure_callbacks
    monkeypatch.setattr(DiffusionModule, "configure_callbacks", lambda self: [*configured(self), window])
    main(["fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--config", TINY, "--trainer.fast_dev_run", "false",
          "--trainer.max_steps", "13", "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
          "--trainer.log_every_n_steps", "1000", *args])  # fmt: skip
    return reads


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # checkpoints/, samples/ go here


def test_training_steps_read_nothing_from_the_device(monkeypatch):
    reads = reads_during_training(monkeypatch)
    assert not reads, f"host reads of tensor values in 10 training steps: {dict(reads)}"


@pytest.mark.parametrize(
    "change",
    [
        ["--trainer.log_every_n_steps", "2"],  # the progress bar reads the loss on logging steps
        ["--guard.max_nonfinite_steps", "2"],  # the non-finite guard reads its streak every 2 steps
        ["--model.optimizer.init_args.fused", "false"],  # the non-finite guard drops gradients on the host
    ],
)
def test_the_count_sees_a_read(monkeypatch, change):
    assert reads_during_training(monkeypatch, *change)
