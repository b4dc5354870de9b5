"""Writing a file a user would miss: whole or not at all, on any filesystem, with one line when it fails.

Every such file (last.ckpt, best-FID checkpoints, post-hoc EMA snapshots, `ema-*.ckpt`, the checkpoint tool's
output, reports, cached statistics, images) is written to a temporary file in its own folder, flushed and
fsynced, then renamed over the old one. A rename within one folder is atomic on every POSIX filesystem
(local, NFS, Lustre, GPFS), where a temporary file elsewhere (Lightning's own `_atomic_save` writes in `$TMPDIR`
and moves the file) is copied across filesystems into the destination, truncating it in place when the copy
fails or is killed.
"""

import errno
import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

FULL = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def written_whole(path: Path | str) -> Iterator[Path]:
    """A temporary name beside `path` (with its suffix, so writers pick the format from it) to write to, made
    durable and renamed to `path` when the block ends, removed if it raises: a file at `path` is always a
    complete one, whatever stops the write (a full disk, a signal, a kill, a power cut)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield partial
        _fsync(partial)
        os.replace(partial, path)
        _fsync(path.parent)
    finally:
        partial.unlink(missing_ok=True)


def save(obj: Any, path: Path | str) -> None:
    """`torch.save(obj, path)`, whole or not at all. The bytes are made in memory first (as Lightning's own
    save does): written through torch's zip writer, a full disk is a RuntimeError that names no errno."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with written_whole(path) as partial, open(partial, "wb") as file:
        file.write(buffer.getbuffer())


def write_text(path: Path | str, text: str) -> None:
    """A text file, whole or not at all."""
    with written_whole(path) as partial:
        partial.write_text(text)


def why(error: OSError, path: Path | str) -> str:
    """Why a write to `path` failed, naming the filesystem when it is full: "no space left on device: /scratch,
    the filesystem of checkpoints/demo"."""
    reason = error.strerror or str(error)
    if error.errno not in FULL:
        return reason
    folder = Path(path).parent
    return f"{reason.lower()}: {mount_point(folder)}, the filesystem of {folder}"


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem that holds `path` (or would, for one not yet made)."""
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, saving through `save` (a temporary file beside the checkpoint, fsynced,
    renamed) instead of through `$TMPDIR`. `LastCheckpoint` puts it in place of Lightning's plain one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        """Whole or not at all; a remote path (`s3://...`) goes to Lightning's own writer."""
        if "://" in str(path) or storage_options is not None:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        save(checkpoint, path)


def use_atomic_saves(trainer) -> None:
    """Make the trainer's checkpoints saves through `AtomicCheckpointIO`, where it uses Lightning's plain writer
    (a writer the user gave as a plugin, or a strategy's own, stays)."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


def save_checkpoint(trainer, path: Path) -> str | None:
    """`trainer.save_checkpoint(path)` (the main process writes), whole or not at all; every process returns the
    same: None, or why the write failed."""
    use_atomic_saves(trainer)
    failure = None
    try:
        trainer.save_checkpoint(path, weights_only=False)
    except OSError as error:  # only the main process writes: it alone fails, before Lightning's barrier
        trainer.strategy.barrier("Trainer.save_checkpoint")
        failure = why(error, path)
    return trainer.strategy.broadcast(failure)


def _fsync(path: Path) -> None:
    """Flush a file or a folder to the disk (a folder: its new entry); where a filesystem cannot, nothing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.EBADF, errno.EROFS):  # folders on some filesystems
            raise
    finally:
        os.close(fd)
