"""Progress in a log file, and the switches that used to stop a run with a traceback."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import ONE_STEP, ROOT, TINY
from diffusion_lit.cli import main

MSE_ONLY = f"{ROOT}/configs/ablation/mse_only.yaml"


@pytest.mark.slow  # a run in a subprocess, killed
def test_a_run_writing_to_a_file_shows_progress_lines_while_it_runs(tmp_path):
    overlay = {"trainer": {"fast_dev_run": False, "max_steps": -1, "max_epochs": -1, "limit_val_batches": 0,
                           "log_every_n_steps": 5, "logger": False,
                           "callbacks": [{"class_path": "diffusion_lit.callbacks.ProgressBar",
                                          "init_args": {"line_interval": 0}}]}}  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(overlay))
    configs = ["--config", f"{ROOT}/configs/demo.yaml", "--config", TINY, "--config", str(tmp_path / "run.yaml")]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    with open(tmp_path / "log.txt", "w") as log:
        command = [sys.executable, "-m", "diffusion_lit.cli", "fit", *configs, "--trainer.max_time", "00:00:10:00"]
        run = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline, lines = time.time() + 240, []
        while len(lines) < 3 and time.time() < deadline and run.poll() is None:
            time.sleep(0.5)
            lines = [line for line in (tmp_path / "log.txt").read_text().splitlines() if line.startswith("step ")]
        still_running = run.poll() is None
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=120)
    assert still_running and len(lines) >= 3, (tmp_path / "log.txt").read_text()[-3000:]
    first = lines[0].split(" · ")
    assert first[0] == "step 5" and first[1] == "epoch 1" and first[2].startswith("loss ")
    assert first[3].endswith(" img/s") and first[4].startswith("elapsed ") and first[5].startswith("ETA ")
    assert lines[1].startswith("step 10 · ")


def test_progress_bar_off_and_logger_off_do_not_stop_the_run(tmp_path, monkeypatch, mnist_dir):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", f"{ROOT}/configs/mnist.yaml", "--config", TINY, "--config", MSE_ONLY,  # has LR monitor
          *ONE_STEP, "--data.init_args.data_dir", str(mnist_dir), "--trainer.logger", "false",
          "--trainer.enable_progress_bar", "false"])  # fmt: skip
    assert torch.load(tmp_path / "checkpoints" / "mnist" / "last.ckpt", weights_only=True)["global_step"] == 1
