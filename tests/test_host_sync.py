"""Training steps never wait for the device: between logging steps nothing is read back on the host, copied from
the host, synchronised, or exchanged between processes on the device.

On a GPU each such call stalls the CPU until every queued kernel has run (a read: `.item()`, `bool(tensor)`,
...; a copy: `.cpu()`, `torch.tensor(...)` made each step), or sends a tiny transfer behind them, so it can no
longer launch the next step's kernels while the GPU works. A collective on the default group is a device
collective under NCCL (DDP's own gradient all-reduce is in C++, not counted); the host-side ones of
`diffusion_lit.distributed` run on a gloo group of CPU tensors and are allowed. This CPU test counts the calls
themselves, with the shipped demo config (progress bar, EMA, non-finite guard, clipping) plus the perceptual and
feature-matching terms, on one process and on two (DDP over gloo). Run as a script, it counts in whichever
process it is (Lightning starts DDP's second process by running it again) and writes the counts as JSON.
"""

import collections
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parents[1]
TINY = str(Path(__file__).with_name("tiny.yaml"))
READS = ["item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "new_tensor"]
FACTORIES = ["tensor", "as_tensor"]  # from Python numbers or lists: a host-to-device copy on a GPU
COLLECTIVES = ["all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce", "barrier",
               "broadcast_object_list", "all_gather_object", "gather", "scatter"]  # fmt: skip
HOST_SIDE = "diffusion_lit/distributed.py"  # collectives of CPU tensors on a gloo group


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


def install_counters(setattr_) -> tuple[list, collections.Counter]:
    """Wrap every counted call (with `setattr_`, monkeypatch's or the builtin); returns (the switch, the counts by
    call and the line that made it)."""
    counting, calls = [False], collections.Counter()

    def wrap(owner, name: str, skip: str | None = None):
        original = getattr(owner, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            if counting[0]:
                stack = traceback.extract_stack()[:-1]
                caller = next(f for f in reversed(stack) if "/torch/" not in f.filename)
                where = caller.filename.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
                if not (skip and where.endswith(skip)):
                    calls[f"{_name} at {where}:{caller.lineno}"] += 1
            return _original(*args, **kwargs)

        setattr_(owner, name, counted)

    for name in READS:
        wrap(torch.Tensor, name)
    for name in FACTORIES:
        wrap(torch, name)
    wrap(torch.cuda, "synchronize")
    for name in COLLECTIVES:
        wrap(dist, name, skip=HOST_SIDE)
    return counting, calls


def arguments(*extra: str) -> list[str]:
    """fit on the demo config, 13 steps, the loss with both extra terms (a random VGG from `vgg`)."""
    return ["fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--config", TINY, "--trainer.fast_dev_run",
            "false", "--trainer.max_steps", "13", "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
            "--trainer.log_every_n_steps", "1000", "--model.loss.init_args.perceptual_weight", "0.1",
            "--model.loss.init_args.feature_matching_weight", "0.05", *extra]  # fmt: skip


def count(setattr_, args: list[str]) -> collections.Counter:
    """Run lit-ddpm with the counters on from training step 3 to the end of training."""
    from diffusion_lit.cli import main
    from diffusion_lit.module import DiffusionModule

    counting, calls = install_counters(setattr_)
    setattr_(sys.stdout, "isatty", lambda: True)  # the progress bar as in a terminal: the rich bar
    window, configured = Window(3, counting), DiffusionModule.configure_callbacks
    setattr_(DiffusionModule, "configure_callbacks", lambda self: [*configured(self), window])
    main(args)
    return calls


@pytest.fixture
def vgg(vgg_weights_file) -> str:
    """A random VGG19 up to conv_4, saved like torchvision's (conftest's, made once per session)."""
    return vgg_weights_file


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # checkpoints/, samples/ go here


def test_training_steps_wait_for_nothing_on_the_device(monkeypatch, vgg):
    calls = count(monkeypatch.setattr, arguments("--model.loss.init_args.vgg_weights", vgg))
    assert not calls, f"host reads, copies, syncs or device collectives in 10 training steps: {dict(calls)}"


@pytest.mark.parametrize(
    "change",
    [
        ["--trainer.log_every_n_steps", "2"],  # the progress bar reads the loss on logging steps
        ["--guard.max_nonfinite_steps", "2"],  # the non-finite guard reads its streak every 2 steps
        ["--model.optimizer.init_args.fused", "false"],  # the non-finite guard drops gradients on the host
    ],
)
def test_the_count_sees_a_read(monkeypatch, vgg, change):
    assert count(monkeypatch.setattr, arguments("--model.loss.init_args.vgg_weights", vgg, *change))


def test_the_count_sees_a_copy_from_the_host(monkeypatch, vgg):
    # The perceptual term as it was: ImageNet's mean and std made from Python numbers in every step.
    from diffusion_lit.diffusion import perceptual

    def normalise(self, images):
        images = (images + 1) / 2
        images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        mean = images.new_tensor(perceptual.IMAGENET_MEAN).view(1, 3, 1, 1)
        return (images - mean) / images.new_tensor(perceptual.IMAGENET_STD).view(1, 3, 1, 1)

    monkeypatch.setattr(perceptual.ImageNetInput, "forward", normalise)
    calls = count(monkeypatch.setattr, arguments("--model.loss.init_args.vgg_weights", vgg))
    assert sum(n for call, n in calls.items() if call.startswith("new_tensor")) == 2 * 2 * 10  # 2 calls, 2 sets


@pytest.mark.slow  # two processes (DDP over gloo) in subprocesses
def test_ddp_training_steps_wait_for_nothing_on_the_device(tmp_path, vgg):
    environment = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
                   "HOST_SYNC_COUNTS": str(tmp_path / "counts")}  # fmt: skip
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    args = [sys.executable, __file__, *arguments("--model.loss.init_args.vgg_weights", vgg, *ddp)]
    done = subprocess.run(args, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        calls = json.loads((tmp_path / f"counts-rank{rank}.json").read_text())
        assert not calls, f"rank {rank}: host reads, copies, syncs or device collectives in 10 steps: {calls}"


if __name__ == "__main__":  # one process of the DDP test above
    counts = count(setattr, sys.argv[1:])
    rank = int(os.environ.get("LOCAL_RANK", 0))
    Path(f"{os.environ['HOST_SYNC_COUNTS']}-rank{rank}.json").write_text(json.dumps(dict(counts)))
