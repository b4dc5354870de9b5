"""What the processes of a multi-process run exchange on the host, never on the device.

Under NCCL every collective of the default group runs on the GPUs, and reading its result on the host waits for
every kernel queued before it: a stop flag agreed on that way each step would stall each step, and images gathered
that way would all sit in GPU memory at once. These run on a gloo group of their own over CPU tensors (the default
group itself where it is gloo already, as on a CPU), with nothing to wait for on the device.
"""

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

_HOST_GROUPS: dict[object, object] = {}  # the default group -> its gloo twin


def world() -> tuple[int, int]:
    """(rank, number of processes) of the default group; (0, 1) when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def host_group():
    """The gloo group for host collectives. Made the first time it is asked for, which is a collective call:
    every process must ask at the same point (the callers below are reached by all processes together)."""
    if dist.get_backend() == "gloo":
        return None  # the default group
    default = dist.group.WORLD
    if default not in _HOST_GROUPS:
        _HOST_GROUPS[default] = dist.new_group(backend="gloo")
    return _HOST_GROUPS[default]


def gather_rows(rows: Tensor, counts: list[int], everywhere: bool = False) -> Tensor | None:
    """Each process's rows (`counts[rank]` of them, with the same trailing shape everywhere) in rank order, on
    the host: on rank 0 only (None on the others), or on every process. With one process: `rows` on the host."""
    rank, size = world()
    rows = rows.cpu()
    if size == 1:
        return rows
    padded = rows.new_zeros((max(counts), *rows.shape[1:]))  # collectives want equal sizes
    padded[: len(rows)] = rows
    group = host_group()
    if everywhere:
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded, group=group)
    else:
        parts = [torch.empty_like(padded) for _ in counts] if rank == 0 else None
        dist.gather(padded, parts, dst=0, group=group)
        if rank != 0:
            return None
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])


def agree(value: float, op: dist.ReduceOp = dist.ReduceOp.MAX) -> float:
    """`op` (MAX, MIN) of every process's `value`: an all-reduce on the host group, which every process must
    call. `agree(flag)`: whether `flag` is true on any process."""
    if world()[1] == 1:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(tensor, op=op, group=host_group())
    return tensor.item()


class StopVote:
    """Whether any process was asked to stop, agreed on by all of them at the same step, without a device sync.

    Each call starts an all-reduce (max) of this process's request on the host group and returns the result of
    the one started by the previous call, which has long finished by then: every process stops one step after
    the step in which the first of them heard the signal. With one process, the request itself, at once.
    """

    def __init__(self) -> None:
        self.value = np.zeros(1, dtype=np.int64)  # the tensor below shares its memory: read without a tensor op
        self.buffer = torch.from_numpy(self.value)
        self.pending = None

    def __call__(self, request: int) -> int:
        """The agreed request of the previous call (0: none), and this call's request sent to the others."""
        if world()[1] == 1:
            return request
        agreed = 0
        if self.pending is not None:
            self.pending.wait()
            agreed = int(self.value[0])
        if agreed:
            self.pending = None
            return agreed
        self.value[0] = request
        self.pending = dist.all_reduce(self.buffer, op=dist.ReduceOp.MAX, group=host_group(), async_op=True)
        return 0

    def close(self) -> None:
        """Wait for the vote in flight (every process started it), so that no collective outlives the run."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
