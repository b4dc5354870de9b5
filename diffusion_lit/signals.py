"""The signals that stop a run at a step boundary instead of wherever they land (Ctrl-C, SIGTERM, SIGUSR1), the
data-loading workers' shield from them, Ctrl-C outside training steps, and SLURM's requeue."""

import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import signal
import subprocess
import sys
import threading

import torch.distributed as dist
from torch.utils.data import DataLoader


def shield_worker(worker_id: int) -> None:
    """`worker_init_fn` of every loader: a data-loading worker leaves the signals that stop a run to its main
    process, which stops at a step boundary and saves (`StopSignals`).

    A scheduler (SLURM's time limit, `scancel`, pre-emption; torchrun; Ctrl-C in a terminal) signals the whole
    process group, workers included. Torch's workers die on a SIGTERM from anyone but their own loader, and on
    that the main process fails mid-step with "DataLoader worker ... is killed by signal", saving nothing; they
    would also run the main process's SIGUSR1 handler (Lightning's SLURM requeue, from every worker) and exit on
    SIGINT, stranding the loader. So here SIGINT and SIGUSR1 are ignored, and SIGTERM is obeyed only when it
    comes from the loader (the main process ending a worker that would not stop): a thread takes it with
    `sigwaitinfo`, which says who sent it. Where there is no `sigwaitinfo` (not Linux), SIGTERM stays torch's."""
    for number in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(number, signal.SIG_IGN)
    loader = multiprocessing.parent_process()  # forked or from a fork server: the loader's process
    if hasattr(signal, "sigwaitinfo"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads made from here on inherit the mask
        threading.Thread(target=_obey_the_loader_only, args=(loader.pid,), daemon=True).start()
    if os.getppid() != loader.pid:  # from a fork server, which torch's watchdog watches instead of the loader
        threading.Thread(target=_end_with_the_loader, args=(loader.sentinel,), daemon=True).start()


def _end_with_the_loader(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])  # ready when the loader's process has ended, however it ended
    os._exit(0)


def _obey_the_loader_only(loader_pid: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == loader_pid:
            os._exit(0)  # as torch's own handler does for its loader's SIGTERM


def forking_may_hang(python: tuple[int, ...] = sys.version_info[:3]) -> bool:
    """Whether a worker forked here can hang before it runs a line: CPython before 3.12 (gh-112275) on Linux
    (where loaders fork by default) with a process group's threads running.

    Such a Python re-creates its thread states in a forked child under a lock that it takes from the parent as
    it was; the threads of a process group (gloo's, NCCL's) take that lock whenever they let go of a finished
    collective's Python objects, which they do just as the main process goes on to start a loader's workers
    (Lightning's last check of the loader's length is a collective). One resumed 2-process job in eight hung
    so on 2 cores (docs/reliability.md)."""
    return python < (3, 12) and sys.platform == "linux" and dist.is_available() and dist.is_initialized()


def start_fork_server_shielded() -> None:
    """Start multiprocessing's fork server (and its resource tracker) with SIGTERM and SIGUSR1 blocked for good,
    if they are not running: a process inherits its starter's signal mask. Each blocks the signals itself
    only while starting the tracker, and unblocks SIGTERM after, hence the two steps."""
    shield = {signal.SIGTERM, signal.SIGUSR1}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, shield)
    try:
        multiprocessing.resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, shield)
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


class WorkersBornShielded:
    """A DataLoader mixin: its workers are forked with SIGTERM blocked, for `shield_worker` to take over, and
    from a fork server (a process without threads) where forking the main process may hang them
    (`forking_may_hang`).

    Torch sets a worker's own SIGTERM handler before it runs `worker_init_fn`; a group's SIGTERM in between
    (a scheduler stopping the run just as a loader starts its workers) ended the worker, and the run failed.
    A forked process inherits the forking thread's signal mask, so the main process blocks SIGTERM while it
    starts the workers (a SIGTERM meant for it waits those milliseconds) and the worker's shield thread takes
    one that came early. The fork server keeps SIGTERM and SIGUSR1 blocked for good: the group's signals
    cannot end it, which would end its workers too (they stop when their parent does). Only where
    `shield_worker` has `sigwaitinfo`: elsewhere a blocked SIGTERM is never taken."""

    def _get_iterator(self):
        if self.num_workers and self.multiprocessing_context is None and forking_may_hang():
            self.multiprocessing_context = "forkserver"
            start_fork_server_shielded()
        if not self.num_workers or self.worker_init_fn is not shield_worker or not hasattr(signal, "sigwaitinfo"):
            return super()._get_iterator()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            return super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


class ShieldedLoader(WorkersBornShielded, DataLoader):
    """torch's DataLoader whose workers are born shielded (`WorkersBornShielded`)."""


class Interrupted(SystemExit):
    """A run stopped by a signal, its state saved: the process exits with 128 + the signal's number, as a
    shell reports a process that the signal ended."""


class Aborted(Interrupted):
    """Ctrl-C where no step boundary is near (loading, setup, `test`, `sample`, a second Ctrl-C while fitting):
    what is being written is left whole or absent, and the command exits with 130. Raised instead of
    KeyboardInterrupt, which Lightning turns into exit status 1."""


def abort_on_ctrl_c(signal_number: int, frame) -> None:
    """The SIGINT handler of every command outside a run's training steps (`StopSignals` takes over there)."""
    raise Aborted(130)


class StopSignals:
    """While installed, SIGINT (Ctrl-C), SIGTERM (a scheduler's pre-emption or time limit, `kill`) and SIGUSR1
    (SLURM's warning before the time limit) ask the run to stop at the next step boundary (`received` is set;
    the training loop looks at it); a second Ctrl-C aborts at once (`Aborted`), without saving. Any
    other repeated signal changes nothing. Data-loading workers ignore all three (`shield_worker`).

    Args:
        checkpoint: what will be saved, for the message.
        announce: print the message (the main process only).
    """

    NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGUSR1: "SIGUSR1"}
    requested = False  # whether the installed one has received a signal: what long evaluations look at

    def __init__(self, checkpoint: str, announce: bool) -> None:
        self.checkpoint = checkpoint
        self.announce = announce
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Take over SIGINT and SIGTERM (only the main thread can; elsewhere the handlers stay as they are)."""
        try:
            for signal_number in self.NAMES:
                self._previous[signal_number] = signal.signal(signal_number, self._handle)
        except ValueError:
            self.restore()

    def restore(self) -> None:
        """Give the signals back to the handlers they had."""
        for signal_number, handler in self._previous.items():
            signal.signal(signal_number, handler)
        self._previous = {}
        StopSignals.requested = False

    def _handle(self, signal_number: int, frame) -> None:
        if self.received is not None:
            if signal_number == signal.SIGINT:
                self.restore()
                raise Aborted(130)
            return
        self.received = signal_number
        StopSignals.requested = True
        if self.announce:
            name, checkpoint = self.NAMES[signal_number], self.checkpoint
            message = f"stopping after this training step to save {checkpoint} (Ctrl-C again to abort, without saving)"
            print(f"\nlit-ddpm: {name}: {message}", file=sys.stderr, flush=True)


def requeue_slurm_job() -> str:
    """Under SLURM, put this job back in the queue (`scontrol requeue JOB`, as Lightning's own requeue does) and
    say so in a line; outside SLURM, nothing and "". SLURM then ends this job, and the requeued one resumes
    with `--ckpt_path last`."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array_job else os.environ.get("SLURM_JOB_ID")
    if not job:
        return ""
    command = ["scontrol", "requeue", job]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        failure = (done.stderr or done.stdout).strip().splitlines()[-1:] if done.returncode else None
    except (OSError, subprocess.TimeoutExpired) as error:
        failure = [str(error)]
    if failure is not None:
        reason = failure[0] if failure else "no reason given"
        return f"could not requeue SLURM job {job} ({reason}); requeue it with: {' '.join(command)}"
    return f"requeued SLURM job {job}"
