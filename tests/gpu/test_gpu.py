"""The CUDA paths (skipped without a GPU): scaled-mm fp8, pinned streaming with side-stream
prefetch, CUDA-graph capture, and the planner against torch.cuda.max_memory_allocated."""
import warnings

import pytest
import torch

from bitdance_core.runtime.graphs import enable_graphs
from bitdance_core.runtime.offload import apply_offload
from bitdance_core.runtime.planner import ModelSizes, estimate_pipeline, measure_peak
from bitdance_core.formats.fp8 import Fp8Linear, scaled_mm_supported
from bitdance_core.formats.fp8_matmul import MODES, torchao_available
from bitdance_core.cli.synthetic import build_random_t2i, custom_shape

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
warnings.filterwarnings("ignore", message=".*not one of the official BitDance sizes.*")
PROMPT = "a red fox in the snow"
SHAPE = custom_shape("tiny", layers=4, hidden=256, heads=4, kv_heads=2, intermediate=512, head_width=256, parallel=16)
ARGS = dict(height=256, width=256, steps=4, cfg=4.0, seed=7)


def _cuda_pipe():
    pipe = build_random_t2i(SHAPE, device="cpu", seed=3)  # drawn on the CPU: the same weights every time
    apply_offload(pipe, "none", "cuda")
    return pipe


@pytest.fixture(scope="module")
def reference():
    return _cuda_pipe().generate(PROMPT, **ARGS)


@pytest.mark.skipif(not torch.cuda.is_available() or not scaled_mm_supported(torch.device("cuda")),
                    reason="needs compute capability 9.0 (row-wise scaled fp8 matmul)")
def test_scaled_mm_close_to_dequant():
    lin = torch.nn.Linear(512, 256).cuda()
    f8 = Fp8Linear.from_linear(lin, matmul="scaled_mm")
    x = torch.randn(128, 512, device="cuda", dtype=torch.bfloat16)
    y = f8(x)
    assert f8.last_path == "scaled_mm", f8.last_path
    f8.matmul = "dequant"
    ref = f8(x)
    assert ((y.float() - ref.float()).norm() / ref.float().norm()) < 0.05


@pytest.mark.parametrize("mode,kw", [("stage", {}), ("stream", {"resident_layers": 1})])
def test_offload_on_cuda_matches(reference, mode, kw):
    pipe = build_random_t2i(SHAPE, device="cpu", seed=3)
    off = apply_offload(pipe, mode, "cuda", **kw)
    assert torch.equal(pipe.generate(PROMPT, **ARGS), reference)
    report = off.host_report()
    print(mode, "host copies:", report)  # how they were locked, and why not where they were not
    # page-locked in place (cudaHostRegister), not copied by the power-of-two host allocator
    assert report["how"] == {"registered": report["chunks"]} and not report["failures"], report
    assert report["is_pinned"] == {"registered": True}, report
    if off.stream is not None:
        assert off.stream.cuda and off.stream.stats.prefetch_hits > 0
        assert all(h.entries[0][3].is_pinned() for h in off.stream.homes)
    off.remove()


def test_graphs_capture_and_replay(reference):
    pipe = _cuda_pipe()
    acc = enable_graphs(pipe)
    bits = pipe.generate(PROMPT, **ARGS)
    bits2 = pipe.generate(PROMPT, **ARGS)
    print("graph stats:", acc.stats)
    assert acc.stats.captures > 0 and acc.stats.replays > 0
    assert torch.equal(bits, bits2)  # replays are deterministic
    assert (bits != reference).float().mean() < 0.02  # the static step rounds differently, rarely flipping a bit
    acc.remove()


def test_loop_graph_serves_every_generation(reference):
    """The sampling loop's graph takes its noise as an input: a new generation (a new generator)
    replays it; only the backbone step, bound to each generation's KV cache, is captured again."""
    pipe = _cuda_pipe()
    acc = enable_graphs(pipe)
    pipe.generate(PROMPT, **ARGS)
    first = acc.stats.captures
    other = pipe.generate(PROMPT, **{**ARGS, "seed": ARGS["seed"] + 1})
    assert acc.stats.captures <= first + 1, acc.stats
    again = pipe.generate(PROMPT, **ARGS)
    assert (again != reference).float().mean() < 0.02 and (other != again).float().mean() > 0.2
    assert not acc.stats.failures, acc.stats.failures
    acc.remove()


def test_graphs_with_streaming_offload(reference):
    """Streamed layers come in from their own hooks: the backbone step stays eager, the head is graphed."""
    pipe = build_random_t2i(SHAPE, device="cpu", seed=3)
    off = apply_offload(pipe, "stream", "cuda", resident_layers=1)
    acc = enable_graphs(pipe)
    bits = pipe.generate(PROMPT, **ARGS)
    assert (bits != reference).float().mean() < 0.02
    assert off.stream.stats.streamed_loads > 0 and acc.stats.replays > 0
    acc.remove()
    off.remove()


def test_planner_against_cuda_allocations():
    pipe = _cuda_pipe()
    plan = estimate_pipeline(pipe, 256, 256, 2, 4.0, prompt=PROMPT)
    job = lambda: pipe.decode(pipe.generate(PROMPT, 256, 256, steps=2, cfg=4.0, num_images=2, seed=0))
    job()
    _, peak = measure_peak(job, "cuda")
    measured = ModelSizes.of_pipeline(pipe).total + peak
    assert 0.85 <= plan.peak_bytes / measured <= 1.15, (plan.phases, measured)


def test_memory_cap_limits_allocations_and_the_free_figure():
    """bench --memory-cap-gb: an allocation past the cap fails as on a smaller card, and the planner's
    free figure is the cap less what the allocator holds. The fraction is reset afterwards."""
    from bitdance_core.runtime.fitting import cap_device_memory, free_device_bytes

    GiB = 1 << 30
    torch.cuda.empty_cache()
    try:
        cap_device_memory("cuda", 4 * GiB)
        held = torch.empty(GiB, dtype=torch.uint8, device="cuda")
        free = free_device_bytes("cuda", 4 * GiB)
        assert 0 < free <= 3 * GiB and free == 4 * GiB - torch.cuda.memory_reserved()
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(4 * GiB, dtype=torch.uint8, device="cuda")
        del held
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


@pytest.mark.parametrize("mode", [m for m in MODES if m != "dequant"])
def test_fp8_matmul_modes_on_cuda(mode):
    """Each fp8 path on this GPU against the dequantised float32 reference, on fresh random inputs
    (a mode this GPU or build cannot run says why; torchao only where it is installed). Last in
    this file: the compiled modes take the longest (compilation, autotuning)."""
    if mode == "torchao" and not torchao_available():
        pytest.skip("torchao is not installed")
    g = torch.Generator(device="cuda").manual_seed(11)
    for rows in (128, 1024):  # a batch-1 head pass and a batch-8 one
        lin = torch.nn.Linear(1024, 512, device="cuda")
        f8 = Fp8Linear.from_linear(lin, matmul=mode)
        x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16, generator=g)
        y = f8(x)
        print(mode, rows, f8.last_path)
        ref = x.float() @ f8.dequantized_weight(torch.float32).t() + f8.bias.float()
        err = ((y.float() - ref).norm() / ref.norm()).item()
        if scaled_mm_supported(torch.device("cuda")) or mode == "weight_only_compiled":
            assert f8.last_path == mode, f8.last_path
        assert torch.isfinite(y.float()).all() and err < (0.01 if mode == "weight_only_compiled" else 0.06), err
