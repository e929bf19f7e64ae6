"""The process group of a `torchrun` launch (its RANK / WORLD_SIZE / LOCAL_RANK environment), or a
group of one when the command runs on its own.

Each process computes on its own GPU (cuda:LOCAL_RANK); the group itself is gloo, on the CPU, for
GPUs too. Only small JSON-able objects travel (each rank's free memory, the work list, the end
summary), as UTF-8 bytes in uint8 tensors: the images go to a shared folder, not through here. NCCL
would buy nothing for a few bytes, and it turns one rank's failure into a hang of all: its
`destroy_process_group` waits for the ranks still generating (graceful shutdown since torch 2.6), so
the failing rank never exits, torchrun never stops the others, and its error is never printed. With
gloo the failing rank exits at once, with its traceback, and torchrun stops the rest.

Why not `broadcast_object_list` / `all_gather_object`: they pickle, and their tensors are made and
dropped inside them. On the CPU, gloo's worker threads then free those tensors after the collective
returns, which needs the GIL; on torch 2.7 `destroy_process_group` joins those threads while holding
it, and about 4 runs in 10 hung there (rank 1 in ~ProcessGroupGloo, rank 0 already gone). Here the
tensors stay referenced until the group is destroyed, so no worker ever frees one: 0 hangs in 30.
"""
from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass, field

import torch

from ..errors import BitDanceError

# Ranks wait for each other at the start (while rank 0 scans the output folder) and at the end
# (while the slowest rank finishes its share, hours on a slower GPU): generous, so a slow rank is
# not a failure. A rank that fails ends the launch through torchrun, so a long wait is never a hang.
TIMEOUT = datetime.timedelta(hours=24)


@dataclass
class ProcessGroup:
    rank: int
    world: int
    local_rank: int
    joined: bool  # a torch.distributed group was started (more than one process)
    _held: list = field(default_factory=list, repr=False)  # every tensor a collective saw, until close()

    @property
    def tag(self) -> str:
        """The prefix of this process's console lines."""
        return f"[rank {self.rank}/{self.world}]"

    def device(self, requested: str) -> str:
        """The device of this process: its own GPU (cuda:LOCAL_RANK) when several share a node's GPUs,
        else the one asked for."""
        return f"cuda:{self.local_rank}" if self.joined and torch.device(requested).type == "cuda" else requested

    def _encode(self, obj) -> torch.Tensor:
        data = json.dumps(obj).encode()
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    @staticmethod
    def _decode(buf: torch.Tensor, n: int):
        return json.loads(bytes(buf[:n].numpy()).decode())

    def _size(self, n: int) -> torch.Tensor:
        return torch.tensor([n], dtype=torch.long)

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (JSON: tuples arrive as lists, keys as strings)."""
        if not self.joined:
            return obj
        import torch.distributed as dist

        data = self._encode(obj) if self.rank == 0 else None
        size = self._size(0 if data is None else data.numel())
        dist.broadcast(size, src=0)
        n = int(size.item())
        buf = data if data is not None else torch.empty(n, dtype=torch.uint8)
        dist.broadcast(buf, src=0)
        self._held += [size, buf]
        return self._decode(buf, n)

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (on every rank; JSON as in `broadcast`)."""
        if not self.joined:
            return [obj]
        import torch.distributed as dist

        data = self._encode(obj)
        size = self._size(data.numel())
        sizes = [torch.empty_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size)
        ns = [int(s.item()) for s in sizes]
        buf = torch.zeros(max(ns), dtype=torch.uint8)
        buf[:data.numel()] = data
        bufs = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(bufs, buf)
        self._held += [size, *sizes, buf, *bufs]
        return [self._decode(b, n) for b, n in zip(bufs, ns)]

    def smallest(self, value: int | None) -> int | None:
        """The smallest of every rank's `value` (None when any is None): what all ranks plan with, so
        they all make the same choice (e.g. the free GPU memory, which differs between GPUs)."""
        values = self.gather(value)
        return None if any(v is None for v in values) else min(values)

    def close(self) -> None:
        if self.joined:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.joined = False
        self._held.clear()  # only now: see the module's docstring


def join(device_type: str) -> ProcessGroup:
    """Join the launch's process group (torchrun sets the environment; several nodes work alike; gloo,
    whose network interface GLOO_SOCKET_IFNAME names where a node has several), or return a group of
    one. device_type: "cuda" (one GPU per process: cuda:LOCAL_RANK becomes the current device) or "cpu"."""
    if "WORLD_SIZE" not in os.environ:
        return ProcessGroup(0, 1, 0, False)
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError) as e:
        raise BitDanceError(f"WORLD_SIZE is set but RANK/LOCAL_RANK are missing or not numbers ({e}): "
                            "start the processes with torchrun") from e
    if world == 1:
        return ProcessGroup(0, 1, local_rank, False)
    import torch.distributed as dist

    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise BitDanceError(f"LOCAL_RANK {local_rank}, but only {torch.cuda.device_count()} GPUs are visible: "
                                "start at most as many processes per node as it has GPUs (--nproc_per_node)")
        torch.cuda.set_device(local_rank)  # before anything touches CUDA: "cuda" means this process's GPU
    dist.init_process_group("gloo", timeout=TIMEOUT)
    return ProcessGroup(rank, world, local_rank, True)
