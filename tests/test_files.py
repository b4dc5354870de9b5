"""files.py: saves whole or not at all on another filesystem than $TMPDIR, on a full disk and under SIGKILL."""

import errno
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from lightning.fabric.plugins import TorchCheckpointIO

from conftest import ROOT, TINY, fill, one_line_error
from diffusion_lit import files
from diffusion_lit.cli import main


def checkpoint(step: int, megabytes: float) -> dict:
    return {"global_step": step, "weights": torch.full((int(megabytes * 2**18),), float(step))}


def loads(path) -> int:
    """The step a checkpoint file holds (it must load)."""
    return torch.load(path, weights_only=True)["global_step"]


@pytest.mark.parametrize(
    "writer",
    [files.AtomicCheckpointIO, pytest.param(TorchCheckpointIO, marks=pytest.mark.xfail(strict=True,
     reason="Lightning's writer moves a temporary file from $TMPDIR: across filesystems a copy, cut short"))],
)  # fmt: skip
def test_a_disk_that_fills_during_a_save_keeps_the_previous_checkpoint(small_disk, tmp_path, monkeypatch, writer):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # on another filesystem than the checkpoints
    monkeypatch.setattr("tempfile.tempdir", None)
    path = small_disk / "run" / "last.ckpt"
    writer().save_checkpoint(checkpoint(20, 1), path)
    fill(small_disk, leave=512 * 1024)
    with pytest.raises(OSError) as error:
        writer().save_checkpoint(checkpoint(40, 1.5), path)
    assert loads(path) == 20
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left
    assert error.value.errno == errno.ENOSPC
    assert files.why(error.value, path) == f"no space left on device: {small_disk}, the filesystem of {path.parent}"


def test_the_first_save_on_a_full_disk_leaves_no_file(small_disk):
    fill(small_disk, leave=256 * 1024)
    path = small_disk / "last.ckpt"
    with pytest.raises(OSError):
        files.save(checkpoint(1, 1), path)
    assert not list(small_disk.glob("*.ckpt")) and not list(small_disk.glob(".*"))


def test_twenty_sigkills_during_saves_always_leave_a_checkpoint_that_loads(small_disk, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    path = small_disk / "last.ckpt"
    files.save(checkpoint(0, 1), path)
    generator = random.Random(0)
    weights = checkpoint(0, 1)["weights"]  # made here: torch's thread pool would hang in a forked child
    steps = set()
    for kill in range(20):
        child = os.fork()
        if child == 0:  # save, save, save, until killed
            try:
                for step in range(1, 10**6):
                    saved = {"global_step": 100 * kill + step, "weights": weights}
                    files.AtomicCheckpointIO().save_checkpoint(saved, path)
            finally:
                os._exit(1)
        time.sleep(generator.uniform(0.005, 0.1))
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        steps.add(loads(path))  # always whole, whatever the moment
    assert len(steps) > 10  # the kills fell between saves and during them, at many points of the run


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "report.json"
    files.write_text(path, "old")
    with pytest.raises(RuntimeError), files.written_whole(path) as partial:
        partial.write_text("half")
        raise RuntimeError("cut short")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_the_mount_point_of_a_folder_not_yet_made(small_disk):
    assert files.mount_point(small_disk / "a" / "b") == small_disk


DEMO = ["--config", f"{ROOT}/configs/demo.yaml", "--config", TINY, "--trainer.logger", "false",
        "--trainer.fast_dev_run", "false", "--trainer.max_epochs", "-1",
        "--trainer.limit_val_batches", "0"]  # fmt: skip


@pytest.fixture
def checkpoints_elsewhere(small_disk, tmp_path, monkeypatch):
    """The working folder (so checkpoints/) on the small disk, $TMPDIR on another filesystem."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    monkeypatch.chdir(small_disk)
    return small_disk / "checkpoints" / "demo"


def test_a_resumed_run_whose_disk_fills_keeps_its_checkpoint_and_says_which_disk(capsys, demo_checkpoint,
                                                                                  checkpoints_elsewhere):  # fmt: skip
    path = checkpoints_elsewhere / "last.ckpt"
    path.parent.mkdir(parents=True)
    shutil.copyfile(demo_checkpoint, path)
    before = path.read_bytes()
    fill(path.parent, leave=len(before) // 2)
    error = one_line_error(capsys, "fit", *DEMO, "--trainer.max_steps", "3", "--ckpt_path", "last")
    disk = checkpoints_elsewhere.parents[1]
    assert f"(no space left on device: {disk}, the filesystem of checkpoints/demo)" in error, error
    assert "the previous one (step 2) is whole" in error
    assert path.read_bytes() == before and not list(path.parent.glob(".*"))


def test_a_fresh_run_on_a_full_disk_says_nothing_was_saved(capsys, checkpoints_elsewhere):
    fill(checkpoints_elsewhere.parents[1], leave=4096)  # a page: the lock, not the config
    with pytest.warns(UserWarning, match=r"could not write checkpoints/demo/config.yaml \(no space left on device"):
        error = one_line_error(capsys, "fit", *DEMO, "--trainer.max_steps", "1")  # the config: a warning
    assert error.endswith("nothing was saved. Free space, then resume the run"), error
    assert not list(checkpoints_elsewhere.glob("*.ckpt"))


def test_without_a_logger_the_config_is_kept_beside_the_checkpoints_not_in_the_working_folder(tmp_path,
                                                                                              monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    main(["fit", *DEMO, "--trainer.max_steps", "1"])
    assert not Path("config.yaml").exists()
    assert "name: demo" in Path("checkpoints/demo/config.yaml").read_text()


def test_the_checkpoint_tool_on_a_full_disk_leaves_the_file_as_it_was(capsys, demo_checkpoint, small_disk):
    from diffusion_lit.checkpoints import main as checkpoint_tool

    path = small_disk / "last.ckpt"
    shutil.copyfile(demo_checkpoint, path)
    before = path.read_bytes()
    fill(small_disk, leave=4096)
    with pytest.raises(SystemExit) as exit_info:
        checkpoint_tool(["--drop", "label_dropout", str(path)])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and error.count("\n") == 0, error
    assert f"(no space left on device: {small_disk}, the filesystem of {small_disk}); it is unchanged" in error
    assert path.read_bytes() == before and sorted(p.name for p in small_disk.iterdir()) == ["filler", "last.ckpt"]
