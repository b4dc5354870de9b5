"""SLURM's requeue, simulated on a CPU: Lightning's SLURM environment variables, a fake `scontrol` on PATH that
writes down who called it, the ranks started as `srun` starts them (one process each, in one process group),
data-loading workers, and SIGUSR1 sent to the whole group as `--signal=SIGUSR1@90` does. The job must save at a
step boundary, requeue once from rank 0's main process, and the requeued job (the same command, `--ckpt_path
last`) must end bit-identical to a run that was never stopped."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_exact_resume import ENV, OVERLAY, STEPS, WORKERS, assert_identical, command, run

JOB = "4242"
FAKE_SCONTROL = '#!/bin/sh\necho "$PPID $*" >> "$SCONTROL_LOG"\n'  # $PPID: the process that ran it
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


def slurm_environment(folder: Path, rank: int, tasks: int) -> dict[str, str]:
    """What srun gives task `rank` of a one-node job of `tasks` tasks, and the fake scontrol first on PATH."""
    bin_folder = folder / "bin"
    bin_folder.mkdir(exist_ok=True)
    (bin_folder / "scontrol").write_text(FAKE_SCONTROL)
    (bin_folder / "scontrol").chmod(0o755)
    return {**ENV, "PATH": f"{bin_folder}:{os.environ['PATH']}", "SCONTROL_LOG": str(folder / "scontrol.log"),
            "SLURM_JOB_ID": JOB, "SLURM_JOB_NAME": "lit-ddpm", "SLURM_NTASKS": str(tasks),
            "SLURM_NTASKS_PER_NODE": str(tasks), "SLURM_NNODES": "1", "SLURM_NODEID": "0",
            "SLURM_NODELIST": "127.0.0.1", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
            "MASTER_PORT": str(29600 + tasks)}  # fmt: skip


def job_command(folder: Path, *extra: str) -> list[str]:
    """The job's command line: the tiny demo run with plain progress lines, last.ckpt only when a signal stops
    it or it ends, two loader workers, and `--ckpt_path last` (as scripts/slurm.sh)."""
    overlay = {**OVERLAY, "trainer": {**OVERLAY["trainer"], "enable_progress_bar": True, "log_every_n_steps": 1}}
    overlay["trainer"]["callbacks"] = [
        {"class_path": "diffusion_lit.callbacks.ProgressBar", "init_args": {"line_interval": 0}},
        {"class_path": "diffusion_lit.callbacks.LastCheckpoint", "init_args": {"dirpath": "checkpoints/demo",
                                                                              "every_n_train_steps": 0}},
    ]  # fmt: skip
    (folder / "slurm.yaml").write_text(yaml.safe_dump(overlay))
    return command(folder, "--config", str(folder / "slurm.yaml"), "--ckpt_path", "last", *WORKERS, *extra)


def start_job(folder: Path, tasks: int, *extra: str) -> list[subprocess.Popen]:
    """The job's tasks, as srun starts them: rank 0 leads a new process group, the others join it."""
    args, started = job_command(folder, *extra), []
    for rank in range(tasks):
        log = open(folder / f"task{rank}.txt", "a")  # noqa: SIM115  (the process writes it; closed with it)
        group = started[0].pid if started else 0
        started.append(subprocess.Popen(args, cwd=folder, env=slurm_environment(folder, rank, tasks), stdout=log,
                                        stderr=subprocess.STDOUT, process_group=group))  # fmt: skip
    return started


def wait_for(ranks: list[subprocess.Popen], folder: Path, timeout: float) -> list[int]:
    """The ranks' exit codes; if one is still running after `timeout` seconds, the job's processes are killed
    and the test fails with every task's last lines (a hung rank otherwise shows nothing)."""
    try:
        return [rank.wait(timeout=timeout) for rank in ranks]
    except subprocess.TimeoutExpired:
        os.killpg(ranks[0].pid, signal.SIGKILL)
        tails = [f"task{n}: " + (folder / f"task{n}.txt").read_text()[-1500:] for n in range(len(ranks))]
        raise AssertionError(f"a rank still ran after {timeout} s\n" + "\n".join(tails)) from None


def reported_step(folder: Path) -> int:
    lines = (folder / "task0.txt").read_text().splitlines()
    return max((int(line.split()[1].split("/")[0]) for line in lines if line.startswith("step ")), default=-1)


@pytest.mark.slow  # SLURM jobs of 1 and 2 processes in subprocesses, signalled, then requeued
@pytest.mark.parametrize("tasks", [1, 2])
def test_sigusr1_saves_requeues_once_from_rank_zero_and_the_requeued_job_resumes_exactly(tmp_path, tasks):
    ddp = DDP if tasks == 2 else []
    whole = tmp_path / "whole"
    run(whole, *ddp)  # the same run, never stopped (no SLURM: Lightning starts the second process itself)
    job = tmp_path / "job"
    job.mkdir()
    ranks = start_job(job, tasks, *ddp)
    deadline = time.time() + 300
    while reported_step(job) < 6 and time.time() < deadline and ranks[0].poll() is None:
        time.sleep(0.02)
    os.killpg(ranks[0].pid, signal.SIGUSR1)  # the whole step: every rank and its loader workers
    codes = wait_for(ranks, job, 120)
    output = (job / "task0.txt").read_text()
    assert codes == [128 + signal.SIGUSR1] * tasks, output[-3000:]
    saved = torch.load(job / "checkpoints" / "demo" / "last.ckpt", weights_only=True)["global_step"]
    assert 6 <= saved < STEPS and f"saved checkpoints/demo/last.ckpt at step {saved}" in output
    calls = (job / "scontrol.log").read_text().splitlines()
    assert calls == [f"{ranks[0].pid} requeue {JOB}"], calls  # once, from rank 0's main process
    assert f"requeued SLURM job {JOB}" in output

    requeued = start_job(job, tasks, *ddp)  # SLURM starts the same command again
    codes = wait_for(requeued, job, 300)
    assert codes == [0] * tasks, (job / "task0.txt").read_text()[-3000:]
    assert f"--ckpt_path last: {Path('checkpoints/demo/last.ckpt')}" in (job / "task0.txt").read_text()
    assert_identical(whole, job)
    assert len((job / "scontrol.log").read_text().splitlines()) == 1  # finishing requeues nothing


@pytest.mark.slow  # a run in a subprocess
def test_without_slurm_sigusr1_saves_and_requeues_nothing(tmp_path):
    # The same signal outside SLURM (no SLURM_* variables): a stop at a step boundary, and no scontrol.
    environment = {key: value for key, value in slurm_environment(tmp_path, 0, 1).items() if "SLURM_" not in key}
    with open(tmp_path / "task0.txt", "w") as log:
        process = subprocess.Popen(job_command(tmp_path), cwd=tmp_path, env=environment, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        deadline = time.time() + 300
        while reported_step(tmp_path) < 4 and time.time() < deadline and process.poll() is None:
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGUSR1)
        assert process.wait(timeout=120) == 128 + signal.SIGUSR1
    assert "stopped by SIGUSR1: saved checkpoints/demo/last.ckpt" in (tmp_path / "task0.txt").read_text()
    assert not (tmp_path / "scontrol.log").exists()
