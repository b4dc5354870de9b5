"""No run is lost and none destroys another's: one run per folder at a time, no fresh run over a folder's
checkpoints, dry runs write nothing, and a signal stops a run at a step boundary (a second Ctrl-C at once)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from conftest import ROOT, TINY, one_line_error
from diffusion_lit.cli import main
from diffusion_lit.errors import UserError
from diffusion_lit.runs import RunLock
from diffusion_lit.signals import Aborted, StopSignals

DEMO = ["--config", f"{ROOT}/configs/demo.yaml", "--config", TINY]
SHORT = ["--trainer.fast_dev_run", "false", "--trainer.max_steps", "2", "--trainer.max_epochs", "-1",
         "--trainer.limit_val_batches", "1", "--trainer.check_val_every_n_epoch", "1",
         "--trainer.val_check_interval", "2", "--trainer.logger", "false"]  # fmt: skip
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


FOLDER = ["--config", f"{ROOT}/configs/folder.yaml", "--config", TINY, "--name", "demo", "--data.init_args.root",
          "images", "--data.init_args.image_size", "16", "--model.loss.init_args.perceptual_weight", "0",
          "--model.loss.init_args.feature_matching_weight", "0", "--trainer.logger", "false"]  # fmt: skip


@pytest.fixture(autouse=True)
def _images(_in_tmp):
    """An RGB image folder under the run's working directory (for FOLDER)."""
    folder = Path("images")
    folder.mkdir()
    for index in range(6):
        Image.new("RGB", (20, 20), (index * 60, 0, 0)).save(folder / f"{index}.png")


def snapshot(*folders: str) -> dict[str, bytes]:
    """Every file under the folders, by path, with its bytes."""
    return {str(p): p.read_bytes() for folder in folders for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# A fresh run never replaces a folder's checkpoints.


def test_running_a_finished_run_again_is_refused_and_its_checkpoint_kept(capsys):
    main(["fit", *DEMO, *SHORT])
    before = snapshot("checkpoints", "samples")
    assert "checkpoints/demo/last.ckpt" in before and any(name.startswith("samples/demo/") for name in before)
    error = one_line_error(capsys, "fit", *DEMO, *SHORT)
    assert "checkpoints/demo" in error and "--ckpt_path checkpoints/demo/last.ckpt" in error and "--name" in error
    # The same refusal for a run with other data settings (a 3-channel model over a 1-channel one).
    one_line_error(capsys, "fit", *FOLDER, *SHORT)
    assert snapshot("checkpoints", "samples") == before


def test_a_dry_run_writes_nothing_into_the_run_folders(capsys):
    main(["fit", *DEMO, *SHORT])
    before = snapshot("checkpoints", "samples")
    main(["fit", *DEMO, "--trainer.fast_dev_run", "true", "--trainer.logger", "false"])  # the same config, dry
    main(["fit", *FOLDER])  # a dry run of other data settings
    assert snapshot("checkpoints", "samples") == before
    main(["fit", *DEMO, "--name", "smoke"])  # a dry run of a new name leaves no folder either
    assert not Path("checkpoints/smoke").exists() and not Path("samples/smoke").exists()


def test_resuming_another_runs_checkpoint_into_an_occupied_folder_is_refused(capsys):
    main(["fit", *DEMO, *SHORT])
    main(["fit", *DEMO, *SHORT, "--name", "other"])
    before = snapshot("checkpoints")
    error = one_line_error(capsys, "fit", *DEMO, *SHORT, "--trainer.max_steps", "3",
                           "--ckpt_path", "checkpoints/other/last.ckpt")  # fmt: skip
    assert "checkpoints/demo" in error and "another run" in error
    assert snapshot("checkpoints") == before


def test_resuming_a_copy_of_the_runs_own_checkpoint_is_allowed(tmp_path):
    # As SLURM's requeue does (it resumes from an hpc_ckpt_N.ckpt in another folder): the same run goes on.
    main(["fit", *DEMO, *SHORT])
    Path("elsewhere").mkdir()
    (Path("elsewhere") / "copy.ckpt").write_bytes(Path("checkpoints/demo/last.ckpt").read_bytes())
    main(["fit", *DEMO, *SHORT, "--trainer.max_steps", "3", "--ckpt_path", "elsewhere/copy.ckpt"])
    assert torch.load("checkpoints/demo/last.ckpt", weights_only=True)["global_step"] == 3


def test_ckpt_path_last_starts_afresh_then_resumes_the_runs_own_last_ckpt(capsys):
    # One command line for a job's first start and every requeued start (scripts/slurm.sh).
    error = one_line_error(capsys, "validate", *DEMO, "--ckpt_path", "last")
    assert "the run has no checkpoints/demo/last.ckpt yet" in error
    main(["fit", *DEMO, *SHORT, "--ckpt_path", "last"])
    assert "no checkpoints/demo/last.ckpt yet, so a fresh run" in capsys.readouterr().err
    main(["fit", *DEMO, *SHORT, "--trainer.max_steps", "3", "--ckpt_path", "last"])
    assert "--ckpt_path last: checkpoints/demo/last.ckpt" in capsys.readouterr().err
    assert torch.load("checkpoints/demo/last.ckpt", weights_only=True)["global_step"] == 3


# One run per folder at a time.

HOLDER = """
import sys, time
from pathlib import Path
from diffusion_lit.runs import RunLock
RunLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def hold_lock(folder: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, env=ENV)
    assert process.stdout.readline().strip() == b"locked"
    return process


@pytest.mark.slow  # a lock holder in a subprocess, killed
def test_a_second_process_cannot_take_the_lock_and_a_dead_ones_lock_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    holder = hold_lock(folder)
    try:
        with pytest.raises(UserError) as error:
            RunLock(folder).acquire()
        assert f"PID {holder.pid} on " in str(error.value) and "started" in str(error.value)
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(folder)
    left = lock.acquire()  # the kernel dropped the dead process's lock; its note is still in the file
    assert left is not None and left["pid"] == holder.pid
    lock.release()
    assert not (folder / "run.lock").exists()
    again = RunLock(folder)
    assert again.acquire() is None  # released cleanly: nothing left to report
    again.release()


@pytest.mark.slow  # a run in a subprocess, killed
def test_two_fits_into_one_folder_at_once_the_second_stops_and_names_the_first(capsys, tmp_path):
    overlay = {"trainer": {"fast_dev_run": False, "max_steps": 100_000, "max_epochs": -1, "limit_val_batches": 0,
                           "logger": False, "callbacks": [{"class_path": "diffusion_lit.callbacks.LastCheckpoint",
                           "init_args": {"dirpath": "checkpoints/demo", "every_n_train_steps": 1}}]}}  # fmt: skip
    (tmp_path / "long.yaml").write_text(yaml.safe_dump(overlay))
    command = [sys.executable, "-m", "diffusion_lit.cli", "fit", *DEMO, "--config", str(tmp_path / "long.yaml")]
    first = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = tmp_path / "checkpoints" / "demo" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.1)
    try:
        assert first.poll() is None, first.stderr.read().decode()[-3000:]
        error = one_line_error(capsys, "fit", *DEMO, *SHORT)
        assert f"PID {first.pid}" in error and "checkpoints/demo" in error
    finally:
        first.kill()  # SIGKILL: its lock is left behind
        first.wait()
    step = torch.load(last, weights_only=True)["global_step"]
    main(["fit", *DEMO, *SHORT, "--trainer.max_steps", str(step + 1), "--ckpt_path", str(last)])
    assert f"PID {first.pid}" in capsys.readouterr().err  # it says whose lock it took over
    assert torch.load(last, weights_only=True)["global_step"] == step + 1


# Signals: the first asks for a stop at the next step boundary, a second Ctrl-C aborts at once.


def test_the_first_signal_asks_for_a_stop_and_a_second_ctrl_c_aborts(capsys):
    signals = StopSignals("last.ckpt", announce=True)
    previous = signal.getsignal(signal.SIGINT)
    signals.install()
    try:
        assert signals.received is None
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received == signal.SIGINT
        assert "Ctrl-C again to abort" in capsys.readouterr().err
        with pytest.raises(Aborted) as aborted:  # not KeyboardInterrupt, which Lightning turns into exit 1
            os.kill(os.getpid(), signal.SIGINT)
        assert aborted.value.code == 130
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGINT) is previous


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_sigterm_and_sigusr1_ask_for_a_stop_and_a_repeat_changes_nothing(number):
    signals = StopSignals("last.ckpt", announce=False)
    signals.install()
    try:
        os.kill(os.getpid(), number)
        os.kill(os.getpid(), number)
        assert signals.received == number
    finally:
        signals.restore()


def ctrl_c_then_wait(*args, **kwargs) -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)  # the handler raises here
    raise AssertionError("Ctrl-C was not answered")


@pytest.mark.parametrize("where", ["setup", "test"])
def test_ctrl_c_before_training_or_while_testing_is_one_line_and_exit_130(capsys, monkeypatch, where, request):
    """Lightning turns a KeyboardInterrupt into exit status 1 with a line of its own; outside the training steps
    Ctrl-C raises `Aborted` instead."""
    if where == "setup":
        monkeypatch.setattr("diffusion_lit.module.DiffusionModule.setup", ctrl_c_then_wait)
        command = ["fit", *DEMO, *SHORT]
    else:
        request.getfixturevalue("demo_checkpoint")  # checkpoints/demo/last.ckpt
        monkeypatch.setattr("diffusion_lit.callbacks.quality.SampleQuality.on_test_epoch_end", ctrl_c_then_wait)
        command = ["test", *DEMO, "--ckpt_path", "checkpoints/demo/last.ckpt", "--trainer.logger", "false"]
    capsys.readouterr()
    before = signal.getsignal(signal.SIGINT)  # Python's default; SIG_IGN in a job started in the background
    with pytest.raises(SystemExit) as exit_info:
        main(command)
    err = capsys.readouterr().err
    assert exit_info.value.code == 130
    # (pytest's capture can add a "Logging error" of its own, for a handler left on an earlier test's stream)
    assert err.strip().splitlines()[-1] == "lit-ddpm: interrupted (Ctrl-C)" and "KeyboardInterrupt" not in err
    assert signal.getsignal(signal.SIGINT) is before  # given back


@pytest.mark.slow  # starts lit-ddpm 4 times (about 20 s)
def test_ctrl_c_at_any_moment_of_a_starting_command_is_one_line_and_exit_130():
    lit_ddpm = Path(sys.executable).with_name("lit-ddpm")
    for delay in (0.05, 0.3, 1.0, 2.0):  # in Python's start, importing torch, Lightning, parsing, setting up
        process = subprocess.Popen([lit_ddpm, "fit", *DEMO, *SHORT], env=ENV, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        err = process.communicate(timeout=120)[1]
        one_line = "Traceback" not in err and err.strip().splitlines()[-1].startswith("lit-ddpm:")
        if process.returncode != 130 or not one_line:  # the whole stderr: where the signal landed is in it
            pytest.fail(f"Ctrl-C after {delay} s: exit {process.returncode}, stderr:\n{err}", pytrace=False)


CTRL_C_IN_AN_IMPORT = """
import atexit, importlib.abc, os, signal, sys, time
class Interrupting(importlib.abc.MetaPathFinder):  # Ctrl-C in the middle of importing Lightning
    def find_spec(self, name, path=None, target=None):
        if name == "lightning":
            atexit.register(print, "Traceback: a half-imported library's exit handler ran", file=sys.stderr)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
sys.meta_path.insert(0, Interrupting())
from diffusion_lit.cli import main
main(["fit", "--help"])
"""


def test_ctrl_c_while_the_libraries_load_exits_at_once_without_running_their_exit_handlers():
    """A KeyboardInterrupt that unwinds through a library's import leaves it half set up, and its exit handlers
    can then fail with a traceback of their own (seen once in CI): while the modules load, Ctrl-C exits at once."""
    process = subprocess.run([sys.executable, "-c", CTRL_C_IN_AN_IMPORT], env=ENV, capture_output=True, text=True)
    assert process.returncode == 130 and process.stderr.strip() == "lit-ddpm: interrupted (Ctrl-C)", process.stderr


def test_a_sigterm_while_a_grid_is_drawn_stops_it_within_one_network_evaluation(monkeypatch):
    from diffusion_lit.callbacks import grids

    calls, real = [], grids.generate_all

    def signalled_during(module, *args, **kwargs):  # SIGTERM arrives during the 3rd network evaluation
        def count(*_):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGTERM)

        hook = module.unet.register_forward_pre_hook(count)
        try:
            return real(module, *args, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(grids, "generate_all", signalled_during)
    with pytest.raises(SystemExit) as exit_info:  # a grid after step 2, of a 4-step run
        main(["fit", *DEMO, *SHORT, "--trainer.max_steps", "4"])
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert len(calls) == 3  # the grid's sampler has more steps: it stopped at the next evaluation
    assert not list(Path("samples").rglob("*.png"))  # no grid of a stopped sampling
    assert torch.load("checkpoints/demo/last.ckpt", weights_only=True)["global_step"] == 3  # saved a step later
