"""Data-loading workers under a scheduler's signals, and where they are started from: forked from the main
process, or from a fork server where forking the main process can hang them (`forking_may_hang`)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from diffusion_lit import signals
from diffusion_lit.signals import ShieldedLoader, shield_worker

SIGWAITINFO = pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="the SIGTERM shield needs sigwaitinfo")


class Pids(torch.utils.data.Dataset):
    """Each item is the PID of the worker that read it."""

    def __len__(self):
        return 1000

    def __getitem__(self, index):
        return os.getpid()


@SIGWAITINFO
def test_a_loader_worker_outlives_a_groups_signals_and_still_ends_with_its_loader():
    # A scheduler signals the whole process group; here a separate `kill` process stands in for it (a signal
    # from anyone but the worker's own loader). The workers must go on serving batches, then end when the
    # loader lets them go (its SIGTERM, when one would not stop, is obeyed).
    loader = torch.utils.data.DataLoader(Pids(), batch_size=2, num_workers=2, worker_init_fn=shield_worker)
    batches = iter(loader)
    workers = {int(pid) for _ in range(4) for pid in next(batches)}
    assert len(workers) == 2
    outlive_the_groups_signals(batches, workers)
    end_with_the_loader(batches)


def outlive_the_groups_signals(batches, workers: set[int], others: frozenset[int] = frozenset()) -> None:
    """TERM, INT and USR1 from a `kill` process to `workers` (and `others`): the workers go on serving."""
    for number in ("TERM", "INT", "USR1"):
        subprocess.run(["kill", f"-{number}", *map(str, workers | others)], check=True)
    time.sleep(0.5)
    assert {int(pid) for _ in range(4) for pid in next(batches)} == workers  # alive and serving


def end_with_the_loader(batches) -> None:
    """The loader's own SIGTERM ends a worker (exit 0), and the loader's shutdown the rest."""
    processes = list(batches._workers)
    os.kill(processes[0].pid, signal.SIGTERM)  # from the loader's own process: the worker ends
    processes[0].join(timeout=10)
    assert processes[0].exitcode == 0
    batches._shutdown_workers()
    assert not any(process.is_alive() for process in processes)


@SIGWAITINFO
def test_a_groups_sigterm_while_the_workers_start_is_left_to_the_main_process(monkeypatch):
    # Between torch's own worker signal handlers and `shield_worker` a worker obeys any SIGTERM; a scheduler's
    # SIGTERM to the group then (a validation loader starting) failed the run with "DataLoader worker ... is
    # killed by signal" (CI's soak test, once). Here the workers pause in that window while a `kill` process
    # signals them: they must be born with SIGTERM blocked, leave it to their shield and serve every batch.
    monkeypatch.setattr("torch.multiprocessing._set_thread_name", lambda name: time.sleep(0.8))
    loader = ShieldedLoader(Pids(), batch_size=2, num_workers=2, worker_init_fn=shield_worker)
    batches = iter(loader)
    workers = [process.pid for process in batches._workers]
    time.sleep(0.3)  # forked, paused before their shield
    subprocess.run(["kill", "-TERM", *map(str, workers)], check=True)
    assert {int(pid) for batch in batches for pid in batch} == set(workers)


@SIGWAITINFO
def test_under_a_process_group_before_python_3_12_workers_start_from_a_fork_server_that_outlives_the_group(
    monkeypatch,
):
    # CPython before 3.12 (gh-112275) can hang a worker forked while a process group's thread takes the lock
    # that the child re-creates its thread states under: there the workers start from a fork server. The group's
    # signals reach the server too, and a server that died would end its workers (they stop when their parent
    # does): it must outlive TERM, INT and USR1, its workers must be shielded as forked ones are, and obey
    # their loader's own SIGTERM.
    monkeypatch.setattr(signals, "forking_may_hang", lambda: True)
    loader = ShieldedLoader(Pids(), batch_size=2, num_workers=2, worker_init_fn=shield_worker)
    batches = iter(loader)
    workers = {int(pid) for _ in range(4) for pid in next(batches)}
    servers = {parent_of(pid) for pid in workers}
    assert len(workers) == 2 and servers.isdisjoint({os.getpid()}) and len(servers) == 1
    outlive_the_groups_signals(batches, workers, others=servers)
    assert all(parent_of(pid) in servers for pid in workers)
    end_with_the_loader(batches)


def parent_of(pid: int) -> int:
    status = open(f"/proc/{pid}/status").read()  # noqa: SIM115
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))


@pytest.mark.parametrize("python,group,hangs", [((3, 11, 7), True, True), ((3, 10, 12), True, True),
                                                 ((3, 12, 1), True, False), ((3, 11, 7), False, False)])  # fmt: skip
def test_forking_may_hang_before_python_3_12_with_a_process_group_only(monkeypatch, python, group, hangs):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: group)
    assert signals.forking_may_hang(python) is hangs


@pytest.mark.parametrize("hangs", [True, False])
def test_a_loader_starts_its_workers_from_a_fork_server_only_where_forking_may_hang(monkeypatch, hangs):
    monkeypatch.setattr(signals, "forking_may_hang", lambda: hangs)
    loader = ShieldedLoader(list(range(8)), batch_size=2, num_workers=1, worker_init_fn=shield_worker)
    assert [batch.tolist() for batch in loader] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    context = loader.multiprocessing_context
    assert (context and context.get_start_method()) == ("forkserver" if hangs else None)


KILLED_LOADER = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from diffusion_lit import signals
from test_workers import Pids
signals.forking_may_hang = lambda: True
batches = iter(signals.ShieldedLoader(Pids(), batch_size=2, num_workers=2, worker_init_fn=signals.shield_worker))
print(*{int(pid) for _ in range(4) for pid in next(batches)}, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@SIGWAITINFO
def test_workers_from_the_fork_server_end_with_a_loader_that_was_killed():
    # torch's workers end when their parent does; a fork server's workers have the server for a parent, which
    # lives as long as they do: they must watch the loader's process instead, or a SIGKILLed run leaves them.
    tests = os.path.dirname(__file__)
    done = subprocess.run([sys.executable, "-c", KILLED_LOADER, tests], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(tests))  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    workers = [int(pid) for pid in done.stdout.split()]
    deadline = time.time() + 20
    while any(os.path.exists(f"/proc/{pid}") for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)
