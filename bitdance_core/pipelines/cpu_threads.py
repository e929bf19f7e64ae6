"""How many CPU threads a generation uses: fewer for small models.

A small model's AR loop is thousands of tiny operations (the digits demo: 4 tokens per step, width
128, 50 head steps per block). Split over several threads, each one ends in a barrier where the
threads wait for each other; on a machine whose cores are busy with something else (a browser,
another process, ComfyUI's own threads) a waiting thread loses its core, and the run becomes 10 to
30 times slower than on one thread (measured: benchmarks/bench_comfyui_demo.py --busy). One thread
is as fast on an idle machine for such sizes.

The rule follows PyTorch's own: ATen does not split an operation of fewer than GRAIN_SIZE elements
(at::internal::GRAIN_SIZE) over threads. A generation's typical operation has rows x width elements
(rows: tokens per step x images x guidance branches; width: the widest of the backbone and the
head), so it gets one thread per GRAIN_SIZE elements, at least one and at most what torch has.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

GRAIN_SIZE = 32768  # at::internal::GRAIN_SIZE


def threads_for(rows: int, width: int, available: int | None = None) -> int:
    """Threads for operations of about `rows` x `width` elements (at most `available`, default torch's)."""
    available = torch.get_num_threads() if available is None else available
    return max(1, min(available, (rows * width) // GRAIN_SIZE))


@contextmanager
def generation_threads(device, rows: int, width: int):
    """Within the block: torch's intra-op threads as `threads_for` says, on the CPU only; the count
    before is restored after (the process may run other models, e.g. in ComfyUI)."""
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    wanted = threads_for(rows, width, before)
    if wanted != before:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        if wanted != before:
            torch.set_num_threads(before)
