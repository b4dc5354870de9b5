"""The "never lost" probe: the rows of the second review's table run end to end, as a new user runs them (the
installed `lit-ddpm` in a fresh folder, a subprocess each), so that the next review starts from here.

Every row must end in its exit status with one `lit-ddpm:` line last on stderr and no traceback. Run it
alone with `pytest -m slow tests/test_probe.py -v`; `python tests/test_probe.py` prints the table.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import fill

ROOT = Path(__file__).resolve().parents[1]
LIT_DDPM = str(Path(sys.executable).with_name("lit-ddpm"))
TINY = str(ROOT / "tests" / "tiny.yaml")
DEMO = ["--config", str(ROOT / "configs" / "demo.yaml"), "--config", TINY, "--trainer.logger", "false"]
SHORT = ["--trainer.fast_dev_run", "false", "--trainer.max_epochs", "-1", "--trainer.limit_val_batches", "0"]
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
CKPT = "checkpoints/demo/last.ckpt"

# (what was done, the command after `lit-ddpm`, the exit status, what the last line says)
ROWS = [
    ("batch size 0", ["fit", *DEMO, "--data.init_args.batch_size", "0"], 2, "batch_size) must be at least 1"),
    ("batch size -3", ["fit", *DEMO, "--data.init_args.batch_size", "-3"], 2, "must be at least 1, got -3"),
    ("workers -1", ["fit", *DEMO, "--data.init_args.num_workers", "-1"], 2, "num_workers) must be at least 0"),
    ("timesteps 0", ["fit", *DEMO, "--model.timesteps", "0"], 2, "timesteps) must be at least 1"),
    ("lr -1", ["fit", *DEMO, "--model.optimizer.init_args.lr", "-1"], 2, "Invalid learning rate: -1.0"),
    ("precision 64", ["fit", *DEMO, "--trainer.precision", "64"], 2, "--trainer.precision 64 is not supported"),
    ("num_heads 0", ["fit", *DEMO, "--model.unet.init_args.num_heads", "0"], 2, "num_heads) must be at least 1"),
    ("max_steps -5", ["fit", *DEMO, "--trainer.max_steps", "-5"], 2, "`max_steps` must be a non-negative"),
    ("distill steps -3", ["distill", *DEMO, "--teacher", CKPT, "--distill.steps", "-3"], 2, "--distill.steps"),
    ("segments 0", ["distill", *DEMO, "--teacher", CKPT, "--model.loss.init_args.segments", "0"], 2,
     "segments) must be at least 1"),
    ("seed 1e17", ["sample", "--ckpt_path", CKPT, "--seed", "99999999999999999"], 2, "--seed must be between"),
    ("1e8 samples", ["sample", "--ckpt_path", CKPT, "--num_samples", "100000000", "--batch_size", "100000000"], 2,
     "the samples take 78.4 GB of memory"),
    ("ckpt_path best (fit)", ["fit", *DEMO, "--ckpt_path", "best"], 2, "best is for validate and test"),
    ("ckpt_path best (test)", ["test", *DEMO, "--ckpt_path", "best"], 2, "holds no best-fid-epoch=N.ckpt"),
    ("ckpt_path hpc", ["validate", *DEMO, "--ckpt_path", "hpc"], 2, "lit-ddpm writes no hpc_ckpt files"),
    ("ckpt_path registry", ["test", *DEMO, "--ckpt_path", "registry"], 2, "does not read Lightning's model"),
    ("resume from weights alone", ["fit", *DEMO, *SHORT, "--ckpt_path", "weights.ckpt"], 2,
     "is weights alone, with no optimizer state"),
    ("run.lock a folder", ["fit", *DEMO, *SHORT, "--name", "locked"], 2, "run.lock is a folder"),
    ("run folder a file", ["fit", *DEMO, *SHORT, "--name", "afile"], 2, "where the run's folder would be"),
    ("empty name", ["fit", *DEMO, *SHORT, "--name", ""], 2, "names no folder of its own"),
    ("NaN weight, sample", ["sample", "--ckpt_path", "nan.ckpt", "--steps", "2"], 2, "has non-finite values"),
    ("cuda without CUDA", ["sample", "--ckpt_path", CKPT, "--device", "cuda"], 2, "torch sees no CUDA device"),
    ("output a file", ["sample", "--ckpt_path", CKPT, "--output", "afile"], 2, "is a file; name a folder"),
    ("negative guidance", ["sample", "--ckpt_path", CKPT, "--guidance", "-1"], 2, "guidance must be 0 or more"),
]  # fmt: skip


def make_folder(folder: Path) -> Path:
    """`folder` with a trained tiny demo run and the files the rows need."""
    done = subprocess.run([LIT_DDPM, "fit", *DEMO, *SHORT, "--trainer.max_steps", "2"], cwd=folder, env=ENV,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    checkpoint = torch.load(folder / CKPT, weights_only=True)
    kept = ("state_dict", "hyper_parameters", "pytorch-lightning_version", "epoch", "global_step")
    torch.save({key: checkpoint[key] for key in kept}, folder / "weights.ckpt")
    name = next(name for name, value in checkpoint["state_dict"].items() if value.is_floating_point())
    checkpoint["state_dict"][name].view(-1)[0] = float("nan")
    torch.save(checkpoint, folder / "nan.ckpt")
    (folder / "checkpoints" / "locked" / "run.lock").mkdir(parents=True)
    (folder / "checkpoints" / "afile").write_text("a file")
    (folder / "afile").write_text("a file")
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("probe"))


def run(folder: Path, args: list[str], env: dict | None = None) -> tuple[int, list[str]]:
    done = subprocess.run([LIT_DDPM, *args], cwd=folder, env=env or ENV, capture_output=True, text=True, timeout=300)
    return done.returncode, [line for line in done.stderr.splitlines() if line.strip()]


@pytest.mark.slow  # a subprocess per row (about 4 s each)
@pytest.mark.parametrize("what, args, status, says", ROWS, ids=[row[0] for row in ROWS])
def test_each_row_ends_in_one_line(folder, what, args, status, says):
    env = {**ENV, "CUDA_VISIBLE_DEVICES": ""}  # "cuda without CUDA" on any machine
    code, lines = run(folder, args, env)
    assert code == status and lines and says in lines[-1], (what, code, lines[-3:])
    assert lines[-1].startswith("lit-ddpm: error: ") and not any("Traceback" in line for line in lines), lines


def saved(path: Path) -> tuple[int, int] | None:
    """Which file is at `path` (each save renames a new one into place), or None."""
    try:
        found = path.stat()
    except FileNotFoundError:
        return None
    return found.st_ino, found.st_mtime_ns


@pytest.mark.slow  # about 20 fits, each killed at a random moment while it saves every step
def test_sigkills_while_saving_every_step_on_another_filesystem_always_leave_a_last_ckpt_that_loads(
    folder, small_disk, tmp_path
):
    """Checkpoints on a filesystem of their own (a tmpfs), $TMPDIR on another: 20 SIGKILLs at random moments of
    runs that save last.ckpt every step, each resumed with `--ckpt_path last`. Then the disk fills."""
    env = {**ENV, "TMPDIR": str(tmp_path)}
    every_step = tmp_path / "every_step.yaml"  # last.ckpt every step, and no sample grids
    every_step.write_text("trainer:\n  callbacks:\n    - class_path: diffusion_lit.callbacks.LastCheckpoint\n"
                          "      init_args: {dirpath: 'checkpoints/{run}', every_n_train_steps: 1}\n")  # fmt: skip
    args = [LIT_DDPM, "fit", *DEMO, "--config", str(every_step), *SHORT, "--trainer.max_steps", "100000",
            "--ckpt_path", "last"]  # fmt: skip
    generator, steps = random.Random(0), []
    for kill in range(20):
        before = saved(small_disk / CKPT)
        process = subprocess.Popen(args, cwd=small_disk, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120  # the start's length varies with the machine: wait for this run's first save
        while saved(small_disk / CKPT) == before and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None and saved(small_disk / CKPT) != before, f"run {kill} saved nothing in 120 s"
        time.sleep(generator.uniform(0, 2))  # a random moment while it saves every step
        process.send_signal(signal.SIGKILL)
        process.wait()
        steps.append(torch.load(small_disk / CKPT, weights_only=True)["global_step"])  # loads, whatever the moment
    assert steps == sorted(set(steps)), steps  # each run resumed where the last one was killed, and moved on
    fill(small_disk, leave=(small_disk / CKPT).stat().st_size // 2)
    code, lines = run(small_disk, args[1:], env)
    assert code == 2 and "no space left on device" in lines[-1] and f"(step {steps[-1]}) is whole" in lines[-1]
    assert torch.load(small_disk / CKPT, weights_only=True)["global_step"] == steps[-1]


if __name__ == "__main__":  # the table, for a reviewer: python tests/test_probe.py
    probe = Path(sys.argv[1] if len(sys.argv) > 1 else "probe-run")
    shutil.rmtree(probe, ignore_errors=True)
    probe.mkdir()
    made = make_folder(probe)
    for what, args, status, says in ROWS:
        code, lines = run(made, args, {**ENV, "CUDA_VISIBLE_DEVICES": ""})
        mark = "ok" if code == status and lines and says in lines[-1] else "FAIL"
        print(f"{mark:4} {what:28} exit {code}: {lines[-1] if lines else ''}")
