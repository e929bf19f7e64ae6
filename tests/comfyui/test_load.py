"""Load: 50 queued prompts on the tiny model all complete, and the server's memory stays flat."""
from __future__ import annotations

import gc
import time

from helpers import tiny_t2i


def _run_all(comfy, seeds, timeout=600):
    ids = [comfy.queue_prompt(tiny_t2i(seed=s, width=64, height=64, steps=1)) for s in seeds]
    deadline = time.time() + timeout
    pending = set(ids)
    while pending and time.time() < deadline:
        for pid in list(pending):
            entry = comfy.history(pid)
            if comfy.finished(entry):
                assert entry["status"]["status_str"] == "success", entry["status"]
                pending.discard(pid)
        time.sleep(0.2)
    assert not pending, f"{len(pending)} prompts not finished after {timeout} s"
    return ids


def test_fifty_prompts_memory_stays_flat(comfy):
    gc.collect()
    _run_all(comfy, range(1000, 1005))
    time.sleep(1)
    rss5 = comfy.rss()
    t0 = time.time()
    _run_all(comfy, range(1005, 1050))
    elapsed = time.time() - t0
    time.sleep(1)
    rss50 = comfy.rss()
    print(f"\nRSS after 5 prompts {rss5 / 2**20:.0f} MiB, after 50: {rss50 / 2**20:.0f} MiB "
          f"({100 * (rss50 - rss5) / rss5:+.1f}%); 45 prompts in {elapsed:.1f} s")
    assert abs(rss50 - rss5) <= 0.10 * rss5, (rss5, rss50)
