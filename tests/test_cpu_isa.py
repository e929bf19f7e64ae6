"""The official fixtures do not depend on the CPU's vector instructions.

CI machines differ: some have AVX512, some only AVX2, and PyTorch picks its kernels (matmuls, reductions,
random numbers) by what the CPU has. This runs the fixture tests once more with PyTorch, oneDNN and MKL
held to AVX2, so a machine with AVX512 also checks what an AVX2 machine computes (on an AVX2 machine it
repeats the native run). Below AVX2 (no SIMD at all) torch.randn itself draws other floats than the
official noise, so that level is not a target.
"""
import os
import subprocess
import sys

from paths import run_pytest

# The tests that compare with the official outputs through the CLI (each spawns its own process, which
# inherits this environment): text-to-image tokens, ImageNet tokens, the UniWeTok and ae tokenizers.
FIXTURE_TESTS = [
    "tests/test_t2i_fixtures.py::test_t2i_fixture_through_cli",
    "tests/test_imagenet.py::test_imagenet_fixture_through_cli",
    "tests/test_uniwetok.py::test_cli_encode_and_decode_match_the_official_outputs",
    "tests/test_tokenizer_cli.py::test_encode_decode_through_cli",
]
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def test_official_fixtures_with_avx2_kernels(tmp_path):
    # Inductor's on-disk cache is not keyed by ATEN_CPU_CAPABILITY: a kernel compiled for AVX512 in
    # another run would be reused here, so this run gets its own cache.
    env = dict(os.environ, **AVX2, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    isa = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert isa.returncode == 0, isa.stderr[-2000:]
    assert isa.stdout.strip() != "AVX512", "ATEN_CPU_CAPABILITY=avx2 did not take effect"
    r, passed = run_pytest(*FIXTURE_TESTS, env=env, timeout=1800)
    tail = r.stdout[-4000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    assert passed >= len(FIXTURE_TESTS), tail  # every test ran, at least once, and none failed
