"""The process group of a `torchrun` launch (its RANK / WORLD_SIZE / LOCAL_RANK environment), or a
group of one when the command runs on its own.

NCCL between GPUs (each process on its own GPU: cuda:LOCAL_RANK), gloo on the CPU. Only small Python
objects travel (the work list, the end summary): the images go to a shared folder, not through here.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from ..errors import BitDanceError

# Ranks wait for each other at the start (while rank 0 scans the output folder) and at the end
# (while the slowest rank finishes its last batch): generous, so a long batch is not a failure.
TIMEOUT = datetime.timedelta(hours=2)


@dataclass
class ProcessGroup:
    rank: int
    world: int
    local_rank: int
    joined: bool  # a torch.distributed group was started (more than one process)

    @property
    def tag(self) -> str:
        """The prefix of this process's console lines."""
        return f"[rank {self.rank}/{self.world}]"

    def device(self, requested: str) -> str:
        """The device of this process: its own GPU (cuda:LOCAL_RANK) when several share a node's GPUs,
        else the one asked for."""
        return f"cuda:{self.local_rank}" if self.joined and torch.device(requested).type == "cuda" else requested

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.joined:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (on every rank)."""
        if not self.joined:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.joined:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.joined = False


def join(device_type: str) -> ProcessGroup:
    """Join the launch's process group (torchrun sets the environment; several nodes work alike), or
    return a group of one. device_type: "cuda" (NCCL, one GPU per process) or "cpu" (gloo)."""
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
        torch.cuda.set_device(local_rank)  # before NCCL: each process talks from its own GPU
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=TIMEOUT)
    return ProcessGroup(rank, world, local_rank, True)
