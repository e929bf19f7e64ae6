"""The CUDA paths under ComfyUI's allocator (skipped without a GPU).

ComfyUI starts with PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync on CUDA builds of torch 2
(its cuda_malloc.py; --disable-cuda-malloc turns it off), while `bench` and the other CUDA tests
run PyTorch's native caching allocator. The async backend differs where the engine leans on the
allocator: CUDA-graph captures get graph-owned memory (a shared pool handle is ignored), the peak
statistics come from the CUDA memory pool. The allocator is chosen when CUDA starts, so the graph,
offload, planner and step-cache tests run again in a process started as ComfyUI starts.
"""
import os
import subprocess
import sys

import pytest
import torch

from paths import run_pytest

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
COMFY_ALLOC = {"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}
SELECTED = "(graph and not levers_under) or offload or planner or step_cache"


def test_cuda_paths_under_comfyuis_allocator():
    env = dict(os.environ, **COMFY_ALLOC)
    probe = subprocess.run([sys.executable, "-c", "import torch; torch.zeros(1, device='cuda'); "
                            "print(torch.cuda.get_allocator_backend())"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert probe.returncode == 0 and probe.stdout.strip() == "cudaMallocAsync", probe.stdout + probe.stderr[-2000:]
    r, passed = run_pytest("-s", "-k", SELECTED, "tests/gpu/test_gpu.py", "tests/gpu/test_levers_gpu.py", env=env,
                           timeout=600)
    print(r.stdout[-6000:])  # the graph statistics and host-copy reports of that run, for the log
    tail = r.stdout[-4000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    assert passed >= 7, tail  # 2 offload, 3 graphs, planner, step cache
