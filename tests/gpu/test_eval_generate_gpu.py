"""eval-generate on CUDA (skipped without a GPU): several prompts per batch with CUDA graphs (one
generator per prompt, drawn before each graph replay), a rerun after a deleted image identical, and
with two GPUs, two processes identical to one."""
import json
import os
import subprocess
import sys

import pytest
import torch

from paths import REPO, fixture_dirs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FIXTURES = fixture_dirs("t2i-tiny")
PROMPTS = {"0": "a red fox in the snow", "1": "a blue car", "2": "three small boats on a lake", "x": "a tree"}


def run(fx, out, prompts, procs=1):
    from bitdance_core import describe_t2i

    s = str(describe_t2i(os.path.join(fx, "model")).block_pixels)
    head = [sys.executable, "-m", "bitdance_core"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m", "bitdance_core"]
    cmd = head + ["eval-generate", "--model", os.path.join(fx, "model"), "--benchmark", "dpg", "--prompts", str(prompts),
                  "--out", str(out), "--height", s, "--width", s, "--steps", "3", "--cfg", "4", "--device", "cuda",
                  "--dtype", "float32", "--prompts-per-batch", "2", "--graphs"]
    r = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return {f: (out / f).read_bytes() for f in os.listdir(out) if f.endswith(".png")}


@pytest.mark.skipif(not FIXTURES, reason="no t2i-tiny fixture")
@pytest.mark.parametrize("fx", FIXTURES, ids=[os.path.basename(f) for f in FIXTURES])
def test_eval_generate_cuda_resume_identical(fx, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    first = run(fx, tmp_path / "out", prompts)
    assert sorted(first) == sorted(f"{k}.png" for k in PROMPTS)
    os.remove(tmp_path / "out" / "2.png")
    assert run(fx, tmp_path / "out", prompts) == first
    if torch.cuda.device_count() >= 2:
        assert run(fx, tmp_path / "two", prompts, procs=2) == first
