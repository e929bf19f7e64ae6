"""The memory planner against allocations measured on the CPU (torch.profiler's allocator events:
every tensor allocation, internal ones included), within ±15%, and at the real 14B shapes."""
import warnings

import pytest
import torch

from bitdance_core.errors import BitDanceError
from bitdance_core.offload import apply_offload
from bitdance_core.planner import ModelSizes, choose_mode, estimate, estimate_pipeline, measure_peak
from bitdance_core.synthetic import SHAPES, build_random_t2i, custom_shape

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*not one of the official BitDance sizes.*")
GEN = custom_shape("tiny", layers=2, hidden=256, heads=8, kv_heads=2, intermediate=1024, head_width=128, parallel=16)
LONG_PROMPT = " ".join(["fox"] * 150)
SHORT_PROMPT = "a red fox in the snow at dawn"


def _measure(pipe, prompt, h, w, B, cfg, decode=True):
    def job():
        bits = pipe.generate(prompt, h, w, steps=1, cfg=cfg, num_images=B, seed=0)
        return pipe.decode(bits) if decode else bits
    job()  # warm-up: lazily created per-process buffers are not part of a generation
    return measure_peak(job, "cpu")[1]


def test_measure_peak_sees_allocations():
    def f():
        a = torch.empty(1 << 20, dtype=torch.uint8)
        b = torch.empty(3 << 20, dtype=torch.uint8)
        del a
        return b[:1].clone()
    _, peak = measure_peak(f)
    assert (4 << 20) <= peak < (4 << 20) + (1 << 16)


@pytest.mark.parametrize("case", [
    dict(shape=GEN, prompt=LONG_PROMPT, h=128, w=128, B=2, cfg=4.0),  # prefill of a long prompt
    dict(shape=GEN, prompt=SHORT_PROMPT, h=256, w=256, B=1, cfg=4.0),  # block steps over a long cache
    dict(shape=SHAPES["tiny"], prompt=SHORT_PROMPT, h=128, w=192, B=2, cfg=1.0),  # no guidance, two images
])
def test_generation_transients_within_15_percent(case):
    pipe = build_random_t2i(case["shape"], seed=1)
    measured = _measure(pipe, case["prompt"], case["h"], case["w"], case["B"], case["cfg"], decode=False)
    plan = estimate_pipeline(pipe, case["h"], case["w"], case["B"], case["cfg"], prompt=case["prompt"])
    weights = ModelSizes.of_pipeline(pipe).total
    predicted = max(plan.phases[k] for k in ("prefill", "step", "head")) - weights
    assert 0.85 <= predicted / measured <= 1.15, (predicted, measured, plan.phases)


@pytest.mark.parametrize("mode,kw", [("none", {}), ("stage", {}), ("stream", {"resident_layers": 1})])
def test_peak_of_a_whole_image_within_15_percent(mode, kw):
    shape = custom_shape("tiny", layers=3, hidden=256, heads=8, kv_heads=2, intermediate=1024, head_width=128, parallel=16)
    pipe = build_random_t2i(shape, seed=2)
    plan = estimate_pipeline(pipe, 128, 128, 1, 4.0, mode=mode, prompt=SHORT_PROMPT, **kw)
    off = apply_offload(pipe, mode, "cpu", **kw)
    # what is on the "device" before the generation starts: everything (none), nothing (stage),
    # the resident layers and the two slots (stream); the rest is allocated during the run
    before = {"none": ModelSizes.of_pipeline(pipe).total, "stage": 0}.get(mode)
    if mode == "stream":
        before = off.stream.resident_bytes
    _measure(pipe, SHORT_PROMPT, 128, 128, 1, 4.0)  # warm-up, then evict again
    if off.stage is not None:
        off.stage.evict_all()
    peak = _measure(pipe, SHORT_PROMPT, 128, 128, 1, 4.0)
    measured = before + peak
    assert 0.85 <= plan.peak_bytes / measured <= 1.15, (mode, plan.peak_bytes, measured, plan.phases)


def test_weight_bytes_at_the_real_14b_shapes():
    s = SHAPES["14b-64x"]
    sizes = ModelSizes.from_configs(s.llm, s.head, s.ae, torch.bfloat16)
    lm_head = 151988 * 5120
    assert sizes.backbone == 2 * (14_768_839_680 - lm_head)  # doc §1.2 (the LLM less lm_head)
    assert sizes.head == 2 * 1_758_464_032
    assert sizes.projector == 2 * 26_388_480
    assert sizes.decoder + sizes.encoder == 2 * 460_294_179
    fp8 = ModelSizes.from_configs(s.llm, s.head, s.ae, torch.bfloat16, fp8=True)
    assert 0.5 < sum(fp8.layers) / sum(sizes.layers) < 0.51  # 1 byte per weight + a scale per row


def test_choose_mode_at_14b():
    s = SHAPES["14b-64x"]
    GiB = 1 << 30
    args = (s.llm, s.head, s.ae, 1024, 1024)
    assert choose_mode(140 * GiB, *args).mode == "none"
    p24 = choose_mode(24 * GiB, *args)
    assert p24.mode in ("stage", "stream") and p24.peak_bytes <= 24 * GiB * 0.9
    p24f = choose_mode(24 * GiB, *args, fp8=True)
    assert p24f.peak_bytes <= 24 * GiB * 0.9 and p24f.transfer_bytes < p24.transfer_bytes
    for free in (12, 8):
        p = choose_mode(free * GiB, *args)
        assert p.mode == "stream" and p.peak_bytes <= free * GiB * 0.9
    with pytest.raises(BitDanceError, match="no offload mode fits"):
        choose_mode(2 * GiB, *args)
    # the streamed plan of the target: well under 10 GB
    stream = estimate(*args, mode="stream", resident_layers=4)
    assert stream.peak_bytes < 10e9
