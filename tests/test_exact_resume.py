"""A run interrupted at any step and resumed ends bit for bit where the uninterrupted run does, and last.ckpt
is always its newest state.

Each run is `lit-ddpm fit` in a subprocess on the demo config, shrunk: 20 training digits in batches of 4
(5 steps an epoch, so the runs cross epoch boundaries and stop mid-epoch), validation and a sample grid
every epoch, last.ckpt after every step. Interrupting waits for a seeded random step's checkpoint.
"""

import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, TINY

STEPS = 30
OVERLAY = {
    "trainer": {
        "fast_dev_run": False, "max_steps": STEPS, "max_epochs": -1, "limit_val_batches": 1,
        "check_val_every_n_epoch": 1, "logger": False, "enable_progress_bar": False,
        "callbacks": [
            {"class_path": "diffusion_lit.callbacks.LastCheckpoint",
             "init_args": {"dirpath": "checkpoints/demo", "every_n_train_steps": 1}},
            {"class_path": "diffusion_lit.callbacks.SampleGrid",
             "init_args": {"num_samples": 4, "dirpath": "samples", "sampling": {"sampler": "dpmpp_sde", "steps": 3}}},
        ],
    },
    # a planned learning rate (warm-up over 20% of the run, constant, linear cool-down over its last 40%): a
    # stop anywhere falls in one of the three
    "model": {"warmup_steps": 0.2, "lr_decay": "wsd", "decay_from": 0.6, "optimizer": {"init_args": {"lr": 2e-3}},
              "unet": {"init_args": {"dropout": 0.1}}},  # dropout draws too
    "data": {"init_args": {"batch_size": 4, "val_size": 4980}},
}  # fmt: skip


def command(folder: Path, *extra: str) -> list[str]:
    (folder / "run.yaml").write_text(yaml.safe_dump(OVERLAY))
    configs = ["--config", f"{ROOT}/configs/demo.yaml", "--config", TINY, "--config", str(folder / "run.yaml")]
    return [sys.executable, "-m", "diffusion_lit.cli", "fit", *configs, *extra]


ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def run(folder: Path, *extra: str) -> None:
    folder.mkdir(exist_ok=True)
    done = subprocess.run(command(folder, *extra), cwd=folder, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def interrupt(folder: Path, signal_number: int, at_step: int, *extra: str) -> int:
    """Start a run, send the signal once last.ckpt is at `at_step` or later; the step last.ckpt then holds."""
    folder.mkdir(exist_ok=True)
    last = folder / "checkpoints" / "demo" / "last.ckpt"
    process = subprocess.Popen(command(folder, *extra), cwd=folder, env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    deadline, step = time.time() + 300, -1
    while step < at_step and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
        try:
            step = torch.load(last, weights_only=True, map_location="cpu")["global_step"]
        except (FileNotFoundError, RuntimeError, EOFError):
            continue
    os.killpg(process.pid, signal_number)  # the whole group: DDP's second process too
    stderr = process.communicate(timeout=120)[1].decode()
    saved = torch.load(last, weights_only=True, map_location="cpu")["global_step"]
    assert at_step <= saved < STEPS, f"interrupted too late or too early ({saved}): {stderr[-3000:]}"
    return saved


def assert_identical(a: Path, b: Path, steps: int = STEPS) -> None:
    """The two runs' final last.ckpt hold the same weights, EMA, optimizer and scheduler state, bit for bit."""
    first, second = (torch.load(p / "checkpoints" / "demo" / "last.ckpt", weights_only=True) for p in (a, b))
    assert first["global_step"] == second["global_step"] == steps
    for key in ("state_dict", "current_model_state"):  # the EMA weights, and the training weights
        for name, value in first[key].items():
            assert torch.equal(value, second[key][name]), f"{key}.{name} differs"
    assert torch.equal(first["averaging_state"]["n_averaged"], second["averaging_state"]["n_averaged"])
    adam, adam_again = first["optimizer_states"][0]["state"], second["optimizer_states"][0]["state"]
    for index, state in adam.items():
        for name, value in state.items():
            assert torch.equal(value, adam_again[index][name]), f"Adam {name} of parameter {index} differs"
    assert first["lr_schedulers"] == second["lr_schedulers"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("uninterrupted")
    run(folder)
    return folder


@pytest.mark.slow  # the fast tier stops runs with Ctrl-C (the path SIGTERM takes too); the soak test mixes all three
@pytest.mark.parametrize("signal_number", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_interrupted_and_resumed_equals_uninterrupted(uninterrupted, tmp_path, signal_number):
    at_step = random.Random(signal_number).randint(3, STEPS - 5)
    saved = interrupt(tmp_path, signal_number, at_step)
    run(tmp_path, "--ckpt_path", "checkpoints/demo/last.ckpt")
    assert_identical(uninterrupted, tmp_path)
    print(f"interrupted after step {saved} by {signal.Signals(signal_number).name}")


@pytest.mark.slow  # the soak test below pre-empts a run 20 times
def test_last_ckpt_is_the_newest_state_through_repeated_preemption(tmp_path):
    last = tmp_path / "checkpoints" / "demo" / "last.ckpt"

    def step() -> int:
        return torch.load(last, weights_only=True)["global_step"]

    first = interrupt(tmp_path, signal.SIGTERM, 4, "--trainer.max_steps", "12")
    run(tmp_path, "--ckpt_path", str(last), "--trainer.max_steps", "12")  # resumed, and finished
    assert first < 12 and step() == 12
    interrupt(tmp_path, signal.SIGTERM, 15, "--ckpt_path", str(last))  # a longer run, pre-empted again
    second = step()
    assert 15 <= second < STEPS
    run(tmp_path, "--ckpt_path", str(last))
    assert step() == STEPS
    assert sorted(p.name for p in last.parent.iterdir()) == ["config.yaml", "last.ckpt"]  # never a last-v1.ckpt


@pytest.mark.slow  # subprocess runs; the fast tier keeps Ctrl-C
@pytest.mark.parametrize("ending", ["max_steps", "max_epochs", "max_time", "early_stopping"])
def test_every_way_of_ending_leaves_last_ckpt_at_the_final_step(tmp_path, ending):
    # Scheduled saves every 4 steps; each ending falls between two of them.
    overlay = {**OVERLAY, "trainer": {**OVERLAY["trainer"], "max_steps": -1, "max_epochs": -1}}
    overlay["trainer"]["callbacks"] = [
        {
            "class_path": "diffusion_lit.callbacks.LastCheckpoint",
            "init_args": {"dirpath": "checkpoints/demo", "every_n_train_steps": 4},
        }
    ]
    extra = {
        "max_steps": ["--trainer.max_steps", "7"],
        "max_epochs": ["--trainer.max_epochs", "3"],  # 15 steps
        "max_time": ["--trainer.max_time", "00:00:00:04"],
        "early_stopping": ["--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor", "val/loss",
                           "--trainer.callbacks.patience", "0", "--trainer.callbacks.divergence_threshold", "-1",
                           "--trainer.max_epochs", "10"],  # stops at the first validation: 5 steps
    }[ending]  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(overlay))
    configs = ["--config", f"{ROOT}/configs/demo.yaml", "--config", TINY, "--config", str(tmp_path / "run.yaml")]
    done = subprocess.run([sys.executable, "-m", "diffusion_lit.cli", "fit", *configs, *extra], cwd=tmp_path,
                          env=ENV, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "checkpoints" / "demo" / "last.ckpt", weights_only=True)
    expected = {"max_steps": 7, "max_epochs": 15, "early_stopping": 5}.get(ending)
    if expected is None:  # max_time: wherever the clock stopped it, and not at a scheduled save
        assert checkpoint["global_step"] > 0
    else:
        assert checkpoint["global_step"] == expected and expected % 4


def signal_at(
    folder: Path, signal_number: int, at_step: int, *extra: str, every: int = 0, group: bool = False
) -> tuple[int, str]:
    """Run with plain progress lines and scheduled saves every `every` steps (0: none), and send the signal to
    its main process (rank 0), or to its whole process group (data-loading workers and all, as a scheduler or
    a terminal's Ctrl-C does), once it reports step `at_step`; returns its exit status and output."""
    overlay = {**OVERLAY, "trainer": {**OVERLAY["trainer"], "enable_progress_bar": True, "log_every_n_steps": 1}}
    overlay["trainer"]["callbacks"] = [
        {"class_path": "diffusion_lit.callbacks.ProgressBar", "init_args": {"line_interval": 0}},
        {"class_path": "diffusion_lit.callbacks.LastCheckpoint",
         "init_args": {"dirpath": "checkpoints/demo", "every_n_train_steps": every}},
    ]  # fmt: skip
    folder.mkdir(exist_ok=True)
    (folder / "signal.yaml").write_text(yaml.safe_dump(overlay))
    log = folder / "output.txt"
    with open(log, "w") as output:
        args = command(folder, "--config", str(folder / "signal.yaml"), *extra)
        process = subprocess.Popen(args, cwd=folder, env=ENV, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        deadline, step = time.time() + 300, -1
        while step < at_step and time.time() < deadline and process.poll() is None:
            time.sleep(0.02)
            lines = log.read_text().splitlines()
            step = max((int(line.split()[1].split("/")[0]) for line in lines if line.startswith("step ")), default=-1)
        if group:
            os.killpg(process.pid, signal_number)
        else:
            process.send_signal(signal_number)  # rank 0 only: under DDP the others hear of it from rank 0
        code = process.wait(timeout=120)
    return code, log.read_text()


def stop(folder: Path, signal_number: int, at_step: int, *extra: str, group: bool = False) -> tuple[int, list[str]]:
    """SIGINT, SIGTERM or SIGUSR1 once the run reports `at_step`, with no scheduled saves: the step last.ckpt then
    holds, and the resume command the run printed."""
    code, text = signal_at(folder, signal_number, at_step, *extra, group=group)
    assert code == 128 + signal_number, text[-3000:]  # as a shell reports a process the signal ended
    last = folder / "checkpoints" / "demo" / "last.ckpt"
    assert last.is_file(), text[-3000:]
    saved = torch.load(last, weights_only=True, map_location="cpu")["global_step"]
    resume = next(line for line in text.splitlines() if "--ckpt_path" in line and "lit-ddpm fit" in line)
    return saved, shlex.split(resume[resume.index("lit-ddpm fit") :])


def run_printed(folder: Path, resume: list[str]) -> None:
    assert resume[:2] == ["lit-ddpm", "fit"] and resume[-2:] == ["--ckpt_path", "checkpoints/demo/last.ckpt"]
    done = subprocess.run([sys.executable, "-m", "diffusion_lit.cli", *resume[1:]], cwd=folder, env=ENV,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow  # a run in a subprocess, stopped by a signal
@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_the_step_it_stopped_at_and_the_printed_command_resumes_exactly(
    uninterrupted, tmp_path, signal_number
):
    at_step = random.Random(signal_number).randint(3, STEPS - 8)
    saved, resume = stop(tmp_path, signal_number, at_step)
    assert at_step <= saved <= at_step + 2  # no scheduled saves: this one is the signal's
    run_printed(tmp_path, resume)
    assert_identical(uninterrupted, tmp_path)


WORKERS = ["--data.init_args.num_workers", "2"]


@pytest.mark.slow  # a run in a subprocess with data-loading workers, stopped by a signal to its process group
@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1], ids=lambda n: n.name)
def test_a_signal_to_the_whole_process_group_with_loader_workers_saves_and_resumes_exactly(
    uninterrupted, tmp_path, signal_number
):
    # As SLURM (scancel, the time limit, --signal), torchrun and a terminal's Ctrl-C do: the workers get it too.
    at_step = random.Random(signal_number + 1).randint(3, STEPS - 8)
    saved, resume = stop(tmp_path, signal_number, at_step, *WORKERS, group=True)
    assert at_step <= saved <= at_step + 2
    run_printed(tmp_path, resume)
    assert_identical(uninterrupted, tmp_path)  # and loader workers change nothing: the baseline has none


@pytest.mark.slow  # two-process DDP in subprocesses
def test_ctrl_c_to_rank_zero_stops_every_rank_under_ddp_and_resumes_exactly(tmp_path):
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run(whole, *ddp)
    saved, resume = stop(resumed, signal.SIGINT, random.Random(3).randint(3, STEPS - 8), *ddp)
    assert 3 <= saved < STEPS
    run_printed(resumed, resume)
    assert_identical(whole, resumed)


@pytest.mark.slow
def test_interrupted_and_resumed_equals_uninterrupted_under_two_process_ddp(tmp_path):
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run(whole, *ddp)
    interrupt(resumed, signal.SIGKILL, random.Random(2).randint(3, STEPS - 5), *ddp)
    run(resumed, *ddp, "--ckpt_path", "checkpoints/demo/last.ckpt")
    assert_identical(whole, resumed)


@pytest.mark.slow  # five subprocess runs
def test_a_run_ended_and_resumed_again_and_again_equals_uninterrupted(tmp_path):
    # No scheduled saves: each last.ckpt is the one a run writes as it ends, at the end of epoch 2 (step 10),
    # in the middle of epoch 4 (17), at the end of epoch 5 (25). After an epoch's end the resumed run must start
    # the next epoch, not an empty one, and its own checkpoints must count its epochs right for the next resume.
    # A run whose budget grows is re-planned (its cool-down moves later): here the rate is constant after a
    # warm-up in steps, as the uninterrupted run's is.
    constant = {**OVERLAY["model"], "warmup_steps": 3, "lr_decay": "constant"}
    overlay = {**OVERLAY, "trainer": {**OVERLAY["trainer"]}, "model": constant}
    last = {"class_path": "diffusion_lit.callbacks.LastCheckpoint",
            "init_args": {"dirpath": "checkpoints/demo", "every_n_train_steps": 0}}  # fmt: skip
    overlay["trainer"]["callbacks"] = [last]
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "ends.yaml").write_text(yaml.safe_dump(overlay))
    ends = ["--config", str(tmp_path / "ends.yaml")]
    for index, steps in enumerate(["10", "17", "25", str(STEPS)]):
        resume = ["--ckpt_path", "checkpoints/demo/last.ckpt"] if index else []
        run(tmp_path, *ends, "--trainer.max_steps", steps, *resume)
    run(tmp_path / "whole", *ends)
    assert_identical(tmp_path / "whole", tmp_path)


@pytest.mark.slow
def test_soak_twenty_kills_of_every_kind_and_resumes_end_bit_identical(tmp_path):
    """A run stopped 20 times at random steps by a seeded mix of SIGINT, SIGTERM and SIGKILL (scheduled saves
    every 4 steps, so a SIGKILL loses work that is then redone), sent to its whole process group with two
    data-loading workers in it, resumed each time, ends as the run that was never interrupted."""
    steps = ["--trainer.max_steps", "60"]
    whole, soaked = tmp_path / "whole", tmp_path / "soaked"
    run(whole, *steps)
    rng = random.Random(18)
    last = soaked / "checkpoints" / "demo" / "last.ckpt"
    survived = {"SIGINT": 0, "SIGTERM": 0, "SIGKILL": 0}
    for _ in range(20):
        saved = torch.load(last, weights_only=True)["global_step"] if last.exists() else 0
        kind = rng.choice([signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
        resume = ["--ckpt_path", "checkpoints/demo/last.ckpt"] if last.exists() else []
        at_step = min(saved + rng.randint(1, 5), 54)
        code, text = signal_at(soaked, kind, at_step, *steps, *WORKERS, *resume, every=4, group=True)
        assert code == {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -9}[kind], text[-3000:]
        after = torch.load(last, weights_only=True)["global_step"] if last.exists() else 0
        assert after >= saved and (kind == signal.SIGKILL or after > saved), text[-3000:]
        survived[kind.name] += 1
    run(soaked, *steps, *WORKERS, "--ckpt_path", "checkpoints/demo/last.ckpt")
    assert_identical(whole, soaked, steps=60)
    print(f"survived {survived}")
    assert all(survived.values())


@pytest.mark.slow  # runs in subprocesses, one stopped by Ctrl-C
def test_a_distillation_stopped_by_ctrl_c_resumes_exactly(tmp_path):
    """`lit-ddpm distill` has fit's exact resume: a student stopped by Ctrl-C and resumed with the command it
    printed ends as the one that was never stopped."""
    teacher = tmp_path / "teacher"
    run(teacher, "--trainer.max_steps", "6")
    student = ["--teacher", str(teacher / "checkpoints" / "demo" / "last.ckpt"), "--distill.steps", "20",
               "--model.loss.init_args.steps_per_stage", "4"]  # fmt: skip
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    overlay = {**OVERLAY, "trainer": {**OVERLAY["trainer"]}}
    last_checkpoint = {"class_path": "diffusion_lit.callbacks.LastCheckpoint",
                       "init_args": {"dirpath": "checkpoints/{run}", "every_n_train_steps": 1}}  # fmt: skip
    overlay["trainer"]["callbacks"] = [last_checkpoint]
    for folder in (whole, stopped):
        folder.mkdir()
        (folder / "run.yaml").write_text(yaml.safe_dump(overlay))
    distill = [sys.executable, "-m", "diffusion_lit.cli", "distill", "--config", f"{ROOT}/configs/demo.yaml",
               "--config", TINY, "--config", "run.yaml", *student]  # fmt: skip
    done = subprocess.run(distill, cwd=whole, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    process = subprocess.Popen(distill, cwd=stopped, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)  # fmt: skip
    last = stopped / "checkpoints" / "demo_distill" / "last.ckpt"  # OVERLAY saves every step: wait for step 7
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
        try:
            if torch.load(last, weights_only=True, map_location="cpu")["global_step"] >= 7:
                break
        except (FileNotFoundError, RuntimeError, EOFError):
            continue
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1].decode()
    assert process.returncode == 130, stderr[-3000:]
    resume = shlex.split(next(line for line in stderr.splitlines() if "lit-ddpm distill" in line).strip())
    assert resume[:2] == ["lit-ddpm", "distill"] and "--teacher" in resume
    done = subprocess.run([sys.executable, "-m", "diffusion_lit.cli", *resume[1:]], cwd=stopped, env=ENV,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = (torch.load(f / "checkpoints" / "demo_distill" / "last.ckpt", weights_only=True)
                     for f in (whole, stopped))  # fmt: skip
    assert first["global_step"] == second["global_step"] == 20
    for key in ("state_dict", "current_model_state"):
        for name, value in first[key].items():
            assert torch.equal(value, second[key][name]), f"{key}.{name} differs"
