"""What keeps a run's folder safe: one run at a time writes into it, and a fresh run never replaces another
run's checkpoints; the run's identity and seed. The signals that stop a run are in `signals.py`."""

import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path

import torch

from diffusion_lit.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: runs go on unlocked (RunLock says so)
    fcntl = None

STATE_KEY = "LastCheckpoint"  # where a checkpoint keeps its run's identity: checkpoint["callbacks"][STATE_KEY]


def run_seed() -> int:
    """The run's seed: `seed_everything`'s (the configs' `seed_everything: 0`), as Lightning's samplers take it."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def new_run_id() -> str:
    """A fresh run's identity; a resumed run keeps the one its checkpoint holds."""
    return uuid.uuid4().hex


def owner_of(path: Path) -> tuple[str | None, int | None]:
    """The run a checkpoint file belongs to and its step; (None, step) for a checkpoint of an earlier lit-ddpm,
    (None, None) for a file that is no readable checkpoint (memory-mapped: only the index is read)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001  (truncated, foreign: not known to be this run's)
        return None, None
    if not isinstance(checkpoint, dict):
        return None, None
    state = checkpoint.get("callbacks", {}).get(STATE_KEY) or checkpoint  # a post-hoc EMA snapshot: at the top
    return state.get("run_id"), checkpoint.get("global_step")


def check_folder_is_ours(folder: Path, run_id: str, resumed_from: str | None) -> None:
    """Refuse, in one line, to write into a folder holding another run's checkpoints: a fresh run, or one resumed
    from another run's checkpoint, would replace them. A checkpoint of an earlier lit-ddpm (no run identity) is
    taken as this run's only when the run resumes from a file in this folder."""
    resumed_here = resumed_from is not None and Path(resumed_from).resolve().parent == folder.resolve()
    last = folder / "last.ckpt"
    if resumed_from is not None and last.is_file() and not last.samefile(resumed_from):
        (owner, step), (_, resumed_step) = owner_of(last), owner_of(Path(resumed_from))
        if owner == run_id and step is not None and resumed_step is not None and step > resumed_step:
            raise UserError(
                f"{last} is at step {step}, newer than {resumed_from} (step {resumed_step}) of the same run, which "
                f"would replace it; resume from it (--ckpt_path last), or give this run another name (--name NAME)"
            )
    for path in sorted([*folder.glob("*.ckpt"), *folder.glob("ema/step=*.pt")]):  # checkpoints, post-hoc EMA
        if path.name.startswith("."):  # a write that a kill cut short (`files.written_whole`): replaced next time
            continue
        owner, step = owner_of(path)
        if owner == run_id or (owner is None and resumed_here):
            continue
        what = "a fresh run" if resumed_from is None else f"a run resumed from {resumed_from}"
        name = path.relative_to(folder)
        held = f"{name} (step {step})" if step is not None else name
        resume = folder / "last.ckpt" if (folder / "last.ckpt").exists() else path
        raise UserError(
            f"{folder} holds {held} of another run, which {what} would replace; resume that run with "
            f"--ckpt_path {resume}, give this one another name (--name NAME), or move {folder} away"
        )


class RunLock:
    """An exclusive lock on a run's folder (`folder/run.lock`), held while a run writes into it.

    The lock is the kernel's (flock): it is dropped when its process ends, however it ends, so the lock of a
    killed run is taken over by the next one. The file names its holder (host, PID, start time, command) for
    the message a second run gets, and is removed when the run releases it. On a filesystem without locks
    (some network filesystems) the run goes on unlocked, with a warning.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / "run.lock"
        self.fd: int | None = None

    def acquire(self) -> dict | None:
        """Take the lock; returns the note of a holder that ended without releasing it (None if there was none).
        Raises UserError naming the holder if a live process holds it."""
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise UserError(f"{folder} is a file, where the run's folder would be; move it away, or give this run "
                            "another name (--name NAME)") from None  # fmt: skip
        except OSError as error:
            raise UserError(f"cannot make the run's folder {folder} ({error.strerror or error})") from None
        if fcntl is None:
            return _unlocked(self.path, "this system has no flock")
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except IsADirectoryError:
                raise UserError(f"{self.path} is a folder, where the run keeps its lock file; remove it "
                                f"(rmdir {self.path}) and run again") from None  # fmt: skip
            except OSError as error:
                raise UserError(f"cannot write the run's lock {self.path} ({error.strerror or error})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_note(fd)
                os.close(fd)
                raise UserError(
                    f"{self.path.parent} is in use by another run ({describe(holder)}); wait for it to end, or give "
                    f"this run another name (--name NAME)"
                ) from None
            except OSError as error:
                os.close(fd)
                return _unlocked(self.path, error.strerror)
            try:  # the file may have been removed by a holder releasing it while we waited: lock the new one
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        left = _read_note(fd)
        note = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)}  # fmt: skip
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(note).encode(), 0)
        except OSError:  # a full disk: the lock holds all the same, only without its note of who holds it
            pass
        self.fd = fd
        return left

    def release(self) -> None:
        """Remove the lock file and let go (the file first, so that no one locks a file about to vanish)."""
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


def _unlocked(path: Path, reason: str) -> None:
    print(f"lit-ddpm: warning: cannot lock {path} ({reason}); nothing stops a second run from writing into "
          f"{path.parent}", file=sys.stderr)  # fmt: skip


def _read_note(fd: int) -> dict | None:
    try:
        return json.loads(os.pread(fd, 65536, 0).decode()) or None
    except (OSError, ValueError):
        return None


def describe(note: dict | None) -> str:
    """Who holds (or held) a lock: "PID 123 on host, started 2026-12-01 10:00:00"."""
    if not note:
        return "a process that has not yet said which"
    return f"PID {note['pid']} on {note['host']}, started {note['started']}"
