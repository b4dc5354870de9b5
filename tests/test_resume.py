"""A run killed with SIGKILL mid-epoch resumes from last.ckpt and ends where an uninterrupted run would."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, TINY

OVERLAY = {
    "trainer": {
        "fast_dev_run": False,
        "max_steps": 60,
        "max_epochs": -1,
        "limit_val_batches": 0,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "logs"}},
        "callbacks": [
            {"class_path": "diffusion_lit.callbacks.LastCheckpoint",
             "init_args": {"dirpath": "checkpoints/demo", "every_n_train_steps": 5}},
        ],
    },
    "model": {"warmup_steps": 0, "lr": 2e-3},
    "data": {"init_args": {"batch_size": 8}},
}  # fmt: skip


def losses(folder: Path) -> dict[int, float]:
    """step -> train/loss from the CSV logger's file in `folder`."""
    with open(next(folder.rglob("metrics.csv"))) as f:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")}


def fit_command(tmp_path: Path, *extra: str) -> list[str]:
    (tmp_path / "kill.yaml").write_text(yaml.safe_dump(OVERLAY))
    configs = ["--config", f"{ROOT}/configs/demo.yaml", "--config", TINY, "--config", str(tmp_path / "kill.yaml")]
    return [sys.executable, "-m", "diffusion_lit.cli", "fit", *configs, *extra]


@pytest.mark.slow  # test_exact_resume kills at a random step and compares every tensor
def test_sigkill_mid_epoch_then_resume_ends_at_the_same_step(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    last = tmp_path / "checkpoints" / "demo" / "last.ckpt"
    run = subprocess.Popen(
        fit_command(tmp_path), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 240
    step = 0
    while step < 25 and time.time() < deadline and run.poll() is None:
        time.sleep(0.2)
        if last.is_file():
            step = torch.load(last, weights_only=True, map_location="cpu")["global_step"]
    run.kill()  # SIGKILL: no handler runs, whatever was being written stays half-written
    run.wait()
    assert 25 <= step < 60, f"the run should be killed mid-way (got step {step}): {run.stderr.read().decode()[-2000:]}"
    killed = torch.load(last, weights_only=True, map_location="cpu")  # last.ckpt is whole: it is written atomically
    before = losses(tmp_path / "logs")
    (tmp_path / "logs").rename(tmp_path / "logs-killed")

    resumed = subprocess.run(fit_command(tmp_path, "--ckpt_path", str(last)), cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = torch.load(last, weights_only=True, map_location="cpu")
    assert final["global_step"] == 60
    assert final["optimizer_states"][0]["state"][0]["step"].item() == 60  # Adam carried on from the checkpoint
    after = losses(tmp_path / "logs")
    resumed_from = killed["global_step"]
    assert min(after) == resumed_from  # logging continues at the checkpoint's step (0-based step index)
    # No jump back to an untrained model: the losses right after the resume are like those before the kill.
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    just_before = mean([before[s] for s in range(resumed_from - 5, resumed_from)])
    just_after = mean([after[s] for s in range(resumed_from, resumed_from + 5)])
    at_start = mean([before[s] for s in range(5)])
    assert abs(just_after - just_before) < 0.5 * (at_start - just_before), (at_start, just_before, just_after)


def test_sigterm_saves_last_ckpt_at_the_current_step(tmp_path):
    # Checkpoints every 1,000 steps only: the one written after SIGTERM must come from the signal handler.
    overlay = {**OVERLAY, "trainer": {**OVERLAY["trainer"], "max_steps": 100_000}}
    overlay["trainer"]["callbacks"] = [
        {"class_path": "diffusion_lit.callbacks.LastCheckpoint",
         "init_args": {"dirpath": "checkpoints/demo", "every_n_train_steps": 1000}},
    ]  # fmt: skip
    command = fit_command(tmp_path)
    (tmp_path / "kill.yaml").write_text(yaml.safe_dump(overlay))
    env = {**os.environ, "WANDB_MODE": "disabled"}
    run = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and run.poll() is None:  # wait until it is training
        time.sleep(0.5)
        metrics = list((tmp_path / "logs").rglob("metrics.csv"))
        if metrics and len(metrics[0].read_text().splitlines()) > 10:
            break
    run.send_signal(signal.SIGTERM)
    stderr = run.communicate(timeout=120)[1].decode()
    last = tmp_path / "checkpoints" / "demo" / "last.ckpt"
    assert last.is_file(), stderr[-2000:]
    step = torch.load(last, weights_only=True, map_location="cpu")["global_step"]
    assert 5 < step < 1000  # saved where the signal arrived, not at a scheduled save
