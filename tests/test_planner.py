"""The memory planner against allocations measured on the CPU (torch.profiler's allocator events:
every tensor allocation, internal ones included), within ±15%, and at the real 14B shapes."""
import warnings

import pytest
import torch

from bitdance_core.errors import BitDanceError
from bitdance_core.runtime.offload import apply_offload
from bitdance_core.runtime.planner import ModelSizes, choose_mode, estimate, estimate_pipeline, measure_peak
from bitdance_core.cli.synthetic import SHAPES, build_random_t2i, custom_shape

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


@pytest.mark.parametrize("mode,kw,weights", [("none", {}, "as-is"), ("stage", {}, "as-is"),
                                             ("stream", {"resident_layers": 1}, "as-is"), ("none", {}, "4bit"),
                                             ("stream", {"resident_layers": 1}, "4bit")])
def test_peak_of_a_whole_image_within_15_percent(mode, kw, weights):
    shape = custom_shape("tiny", layers=3, hidden=256, heads=8, kv_heads=2, intermediate=1024, head_width=128, parallel=16)
    pipe = build_random_t2i(shape, seed=2, weights=weights)
    plan = estimate_pipeline(pipe, 128, 128, 1, 4.0, mode=mode, prompt=SHORT_PROMPT, **kw)
    assert plan.weights == weights
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
    # 4bit: the backbone's linears in GGUF Q4_0 (18 bytes per 32 weights), norms in bf16; the head as fp8
    c = s.llm
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    linear = c.hidden_size * (q + 2 * kv) + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    norms = 2 * c.hidden_size + 2 * c.head_dim
    q4 = ModelSizes.from_configs(s.llm, s.head, s.ae, torch.bfloat16, weights="4bit")
    assert q4.layers == [linear * 18 // 32 + 2 * norms] * c.num_hidden_layers
    assert q4.head == fp8.head and q4.embedding == sizes.embedding and q4.norm == sizes.norm
    assert q4.backbone_dequant == c.hidden_size * c.intermediate_size  # the widest weight, widened per call


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


# ---- plan_for: what the model loader does with weights/offload on "auto" ------------------------------

from paths import FIXTURES, assert_sampled_tokens  # noqa: E402

from bitdance_core.runtime.fitting import check_generation, load_planned, plan_for  # noqa: E402
from bitdance_core.pipelines.t2i_loading import read_t2i_configs  # noqa: E402
from bitdance_core.formats.q4 import Q4Linear  # noqa: E402
from bitdance_core.formats.fp8 import Fp8Linear  # noqa: E402
from bitdance_core.cli.synthetic import save_configs  # noqa: E402

GiB = 1 << 30
TINY_T2I = f"{FIXTURES}/t2i-tiny-p16/model"


@pytest.fixture(scope="module", params=["14b-64x", "14b-16x"])
def folder_14b(request, tmp_path_factory):
    """A 14B model folder with its three config files only (no weights): the planner reads nothing else."""
    s = SHAPES[request.param]
    return save_configs(s.llm, s.head, s.ae, str(tmp_path_factory.mktemp("cfg") / f"BitDance-{request.param}"))


def test_plan_for_14b_plenty_of_memory(folder_14b):
    d = plan_for(folder_14b, 140 * GiB)
    assert (d.weights, d.offload) == ("as-is", "none") and d.resident_layers is None and d.budget_bytes is None
    assert "fit without offloading" in d.reason and "weights as-is, offload none" in d.summary()
    assert d.plan.peak_bytes <= d.usable_bytes < 140 * GiB


def test_plan_for_14b_24_gib(folder_14b):
    s = SHAPES["14b-64x"]
    d = plan_for(folder_14b, 24 * GiB)
    # as-is does not fit without offloading: fp8 weights (which fit without offloading)
    assert (d.weights, d.offload) == ("fp8", "none") and d.plan.fp8
    assert d.plan.peak_bytes <= d.usable_bytes and "as-is weights need" in d.reason
    # as-is kept when asked: the fastest offload that fits, the same as choose_mode's
    d = plan_for(folder_14b, 24 * GiB, weights="as-is")
    assert (d.weights, d.offload) == ("as-is", "stream") and d.plan.peak_bytes <= d.usable_bytes
    assert d.resident_layers == choose_mode(24 * GiB, s.llm, s.head, s.ae, 1024, 1024).resident_layers
    # an explicit offload mode is kept; auto weights stay as-is when they fit with it
    d = plan_for(folder_14b, 24 * GiB, offload="stream")
    assert (d.weights, d.offload) == ("as-is", "stream") and d.plan.peak_bytes <= d.usable_bytes
    # stage offload holds the whole backbone while it runs: 27 GiB as-is, so fp8
    d = plan_for(folder_14b, 24 * GiB, offload="stage")
    assert (d.weights, d.offload) == ("fp8", "stage") and d.plan.peak_bytes <= d.usable_bytes
    assert "with stage offload" in d.reason
    # as-is without offloading does not fit: a clear error that says what would
    with pytest.raises(BitDanceError, match=r"does not fit the GPU: 24.0 GiB free.*needs 3\d.\d GiB\. "
                                            r"weights=fp8 with offload=none would fit"):
        plan_for(folder_14b, 24 * GiB, weights="as-is", offload="none")


def test_plan_for_14b_small_cards(folder_14b):
    for free in (12, 8):
        d = plan_for(folder_14b, free * GiB)
        assert (d.weights, d.offload) == ("4bit", "stream") and d.plan.peak_bytes <= d.usable_bytes
        assert 0 < d.resident_layers <= 40 and d.budget_bytes == d.plan.budget_bytes
    with pytest.raises(BitDanceError, match="would fit"):
        plan_for(folder_14b, 12 * GiB, offload="none")
    with pytest.raises(BitDanceError, match=r"does not fit the GPU: 2.0 GiB free.*the smallest plan \(4bit weights, with "
                                            r"stream offload\) needs \d.\d GiB\. No setting fits"):
        plan_for(folder_14b, 2 * GiB)


def test_plan_for_14b_at_24_16_and_12_gib(folder_14b):
    """What auto picks on the cards people own, and that each fits: the most precise weights that fit
    without offloading (fp8 at 24 GiB, 4-bit at 16), then 4-bit with the least offloading (12)."""
    d24, d16, d12 = (plan_for(folder_14b, free * GiB) for free in (24, 16, 12))
    for d in (d24, d16, d12):
        assert d.plan.peak_bytes <= d.usable_bytes and d.plan.weights == d.weights
    assert (d24.weights, d24.offload) == ("fp8", "none")
    assert (d16.weights, d16.offload) == ("4bit", "none")
    assert "fp8 weights need 18.8 GiB without offloading" in d16.reason
    assert "preference: as stored, then fp8, then 4-bit" in d16.summary()
    assert "quantised on load" in d16.reason and "convert --model" in d16.reason  # no backbone-Q4_0.gguf there
    # 12 GiB: every backbone layer on the GPU in 4 bits, the token embeddings in CPU memory, the head
    # and the autoencoder taking turns (the autoencoder on the GPU only while decoding)
    assert (d12.weights, d12.offload, d12.resident_layers) == ("4bit", "stream", 40)
    assert "all 40 layers resident" in d12.summary() and "least" in d12.reason
    assert d12.plan.peak_bytes <= 11 * GiB
    pw = d12.plan.phase_weights
    assert pw["head"] - pw["step"] > 1.5 * GiB and pw["decode"] - pw["step"] < 0.5 * GiB  # head out, decoder in
    pipe_bytes = ModelSizes.from_configs(*read_t2i_configs(folder_14b).parts, weights="4bit")
    assert pw["step"] == sum(pipe_bytes.layers) + pipe_bytes.norm  # the embedding table stays on the CPU


def test_4bit_peak_at_14b_64x_with_the_autoencoder_staged_for_the_decode():
    """The issue's target: 14B-64x, 1024x1024, one image, 4-bit weights, <= 11 GiB planned."""
    s = SHAPES["14b-64x"]
    sizes = ModelSizes.from_configs(s.llm, s.head, s.ae, torch.bfloat16, weights="4bit")
    sampling = sizes.backbone - sizes.embedding + sizes.head + sizes.projector
    plan = estimate(s.llm, s.head, s.ae, 1024, 1024, weights="4bit", mode="stage", budget_bytes=sampling)
    print(f"\n14B-64x 1024x1024, 4-bit, autoencoder staged for the decode: {plan.describe()}")
    assert plan.peak_bytes <= 11 * GiB
    assert plan.phase_weights["step"] == sampling and plan.phase_weights["head"] == sampling
    assert plan.phase_weights["decode"] == sizes.head + sizes.projector + sizes.decoder  # the backbone made room
    none = estimate(s.llm, s.head, s.ae, 1024, 1024, weights="4bit")
    assert none.peak_bytes > 12 * GiB  # everything resident (embeddings and autoencoder too) would not fit 12 GiB


def test_plan_for_the_tiny_fixture():
    d = plan_for(TINY_T2I, 8 * GiB, dtype=torch.float32)
    assert (d.weights, d.offload) == ("as-is", "none")
    assert d.as_dict()["summary"] == d.summary() and d.as_dict()["peak_bytes"] == d.plan.peak_bytes
    with pytest.raises(BitDanceError, match="does not fit the GPU.*No setting fits"):
        plan_for(TINY_T2I, 256 << 20, dtype=torch.float32)  # less than the reserve


def test_plan_for_on_the_cpu_never_offloads_on_auto():
    d = plan_for(TINY_T2I, 1 << 20, device="cpu", dtype=torch.float32)  # the free figure does not matter there
    assert (d.weights, d.offload) == ("as-is", "none") and "CPU" in d.reason
    d = plan_for(TINY_T2I, None, device="cpu", dtype=torch.float32, weights="fp8")
    assert (d.weights, d.offload) == ("fp8", "none") and d.plan.fp8
    d = plan_for(TINY_T2I, None, device="cpu", dtype=torch.float32, offload="stream")
    assert (d.weights, d.offload) == ("as-is", "stream") and d.resident_layers == 1  # half of 2 layers
    with pytest.raises(BitDanceError, match="weights 'bf8' unknown"):
        plan_for(TINY_T2I, None, device="cpu", weights="bf8")
    with pytest.raises(BitDanceError, match="offload 'swap' unknown"):
        plan_for(TINY_T2I, None, device="cpu", offload="swap")


def test_load_planned_on_the_cpu():
    """What the loader node does: auto = the plain float32 pipeline; fp8 and offload modes work on the CPU."""
    kw = dict(height=128, width=128, steps=2, cfg=4.0, seed=5)
    from bitdance_core import load_t2i

    ref = load_t2i(TINY_T2I, device="cpu", dtype=torch.float32)
    bits_ref = ref.generate("a red fox", **kw)
    for weights, offload in (("auto", "auto"), ("auto", "stage"), ("auto", "stream")):
        d = plan_for(TINY_T2I, None, device="cpu", dtype=torch.float32, weights=weights, offload=offload)
        pipe, off = load_planned(TINY_T2I, d, "cpu", torch.float32)
        assert (off is None) == (d.offload == "none")
        assert torch.equal(pipe.generate("a red fox", **kw), bits_ref), (weights, offload)
        if off is not None:
            assert off.mode == offload and off.device_bytes() >= 0
    d = plan_for(TINY_T2I, None, device="cpu", dtype=torch.float32, weights="fp8")
    pipe, off = load_planned(TINY_T2I, d, "cpu", torch.float32)
    assert off is None and any(isinstance(m, Fp8Linear) for m in pipe.backbone.modules())
    bits = pipe.generate("a red fox", **kw)
    assert bits.shape == bits_ref.shape
    assert_sampled_tokens(bits)
    d = plan_for(TINY_T2I, None, device="cpu", dtype=torch.float32, weights="4bit", offload="stream")
    assert (d.weights, d.offload) == ("4bit", "stream") and d.plan.weights == "4bit" and "quantised on load" in d.reason
    pipe, off = load_planned(TINY_T2I, d, "cpu", torch.float32)
    assert off is not None and any(isinstance(m, Q4Linear) for m in pipe.backbone.modules())
    assert torch.equal(pipe.generate("a red fox", **kw), load_t2i(TINY_T2I, weights="4bit").generate("a red fox", **kw))


# ---- check_generation: what the sampler node checks before it starts -----------------------------------

def test_check_generation_catches_a_batch_the_load_does_not_fit():
    from bitdance_core import load_t2i
    from bitdance_core.errors import OutOfDeviceMemory
    from bitdance_core.runtime.planner import estimate_pipeline, usable_bytes

    pipe = load_t2i(TINY_T2I, device="cpu", dtype=torch.float32)
    tokens = pipe.encode_prompt("a red fox")
    d = plan_for(TINY_T2I, 8 * GiB, device="cuda", dtype=torch.float32)  # as if it ran on a GPU
    assert (d.weights, d.offload) == ("as-is", "none")
    ok = check_generation(pipe, d, 128, 128, 1, 4.0, 8 * GiB, prompt=tokens)
    assert ok.fits and ok.message == "" and ok.usable_bytes == usable_bytes(8 * GiB) and ok.max_images == 64

    def peak(n):
        return estimate_pipeline(pipe, 128, 128, n, 4.0, prompt=tokens, device_type="cuda").peak_bytes

    # free memory for which one image fits and eight do not
    free = int((((peak(1) + peak(8)) // 2) + (512 << 20)) / 0.9)
    chk = check_generation(pipe, d, 128, 128, 8, 4.0, free, prompt=tokens)
    assert not chk.fits and chk.plan.peak_bytes == peak(8) > chk.usable_bytes
    k = chk.max_images
    assert 1 <= k < 8 and peak(k) <= chk.usable_bytes < peak(k + 1)
    assert "8 images of 128x128 at cfg 4 needs" in chk.message and f"at most {k} image" in chk.message
    assert "as-is weights, offload none" in chk.message
    assert "no weights/offload setting fits it" in chk.message  # the tiny model's weights are not what fills it
    assert check_generation(pipe, d, 128, 128, k, 4.0, free, prompt=tokens).fits
    # cfg 1: no guidance, half the rows in the head (the decode, the peak here, is the same)
    unguided = check_generation(pipe, d, 128, 128, 8, 1.0, free, prompt=tokens).plan
    assert unguided.phases["head"] < chk.plan.phases["head"] and unguided.phases["decode"] == chk.plan.phases["decode"]

    none = check_generation(pipe, d, 128, 128, 1, 4.0, 520 << 20, prompt=tokens)  # 90% of it is less than the reserve
    assert not none.fits and none.max_images == 0
    assert "not even one image" in none.message and "no weights/offload setting fits" in none.message

    # the plan is the load's: streamed with its resident layers
    ds = plan_for(TINY_T2I, 8 * GiB, device="cuda", dtype=torch.float32, offload="stream")
    s = check_generation(pipe, ds, 128, 128, 2, 4.0, 8 * GiB, prompt=tokens)
    assert s.plan.mode == "stream" and s.plan.resident_layers == ds.resident_layers and s.fits

    # on the CPU nothing is checked
    dc = plan_for(TINY_T2I, None, device="cpu", dtype=torch.float32)
    c = check_generation(pipe, dc, 128, 128, 64, 4.0, None, prompt=tokens)
    assert c.fits and c.usable_bytes is None and c.max_images is None

    # a model whose weights matter: a reload with fp8 or an offload mode would fit the batch
    from bitdance_core.cli.synthetic import build_random_t2i

    mid = build_random_t2i("mid")
    cfgs = (mid.backbone.config, mid.head.config, mid.autoencoder.config)
    dm = plan_for(cfgs, 8 * GiB, device="cuda", dtype=torch.float32)
    four = estimate_pipeline(mid, 256, 256, 4, 4.0, device_type="cuda").peak_bytes
    free = int((four - (24 << 20) + (512 << 20)) / 0.9)
    m = check_generation(mid, dm, 256, 256, 4, 4.0, free)
    assert not m.fits and 1 <= m.max_images < 4
    assert "reloading with weights=" in m.message and "would fit" in m.message, m.message
    w, o = m.message.split("reloading with weights=")[1].split(" would fit")[0].split(" and offload=")
    alt = plan_for(cfgs, free, device="cuda", dtype=torch.float32, weights=w, offload=o, height=256, width=256,
                   num_images=4, cfg=4.0)
    assert (w, o) != ("as-is", "none") and alt.plan.peak_bytes <= usable_bytes(free)

    # what the sampler node raises on an out-of-memory error: ours, and still torch's
    err = OutOfDeviceMemory(chk.message)
    assert isinstance(err, BitDanceError) and isinstance(err, torch.OutOfMemoryError)


# ---- memory caps: what `bench --memory-cap-gb` and the planner do for a smaller card ---------------------

def test_free_memory_under_a_cap(monkeypatch):
    """The planner's free figure under a cap: the driver's free memory, at most the cap less what
    PyTorch's allocator already holds (the cap counts reserved memory)."""
    from bitdance_core.runtime.fitting import cap_device_memory, free_device_bytes

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (130 * GiB, 141 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: 3 * GiB)
    assert free_device_bytes("cuda") == 130 * GiB
    assert free_device_bytes("cuda", 16 * GiB) == 13 * GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (10 * GiB, 141 * GiB))  # a busy GPU
    assert free_device_bytes("cuda", 16 * GiB) == 10 * GiB
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: 20 * GiB)  # already past the cap
    assert free_device_bytes("cuda", 16 * GiB) == 0
    with pytest.raises(BitDanceError, match="a memory cap needs a CUDA device"):
        cap_device_memory("cpu", 12 * GiB)


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_cap_on_a_device_named_without_an_index(monkeypatch, device):
    """`bench` caps torch.device("cuda"); torch's set_per_process_memory_fraction refuses a device
    without an index (its own _get_device_index check, run here as torch runs it), so the cap must
    pass the current device's index, or the index given."""
    from torch.cuda._utils import _get_device_index

    from bitdance_core.runtime.fitting import cap_device_memory

    got = {}

    def set_fraction(fraction, device=None):  # torch's checks, without a driver
        got["index"] = _get_device_index(device)
        assert isinstance(fraction, float) and 0 <= fraction <= 1

    with pytest.raises(ValueError, match="specified index"):
        set_fraction(0.5, torch.device("cuda"))  # the check this test relies on is torch's
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: type("Props", (), {"total_memory": 140 * GiB})() if isinstance(d, int) else None)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    assert cap_device_memory(torch.device(device), 14 * GiB) == pytest.approx(0.1)
    assert got["index"] == (0 if device == "cuda" else 1)


def test_images_per_decode_follows_the_measured_decode():
    """The Decode node's "all at once" on a GPU: as many images per decode call as the free memory
    takes. The count comes from the decoder's predicted peak, which is checked here against a measured
    decode (within 15%, as the planner's phases are), and every count fits what a plan may use."""
    from bitdance_core.runtime.fitting import images_per_decode
    from bitdance_core.runtime.planner import decoder_peak, usable_bytes

    pipe = build_random_t2i(SHAPES["tiny"], seed=1)
    ae, h, w = pipe.autoencoder, 128, 128
    bits = torch.randint(0, 2, (2, ae.config.z_channels, h // ae.downsample, w // ae.downsample)).float() * 2 - 1
    # float32 only: a bf16 convolution on a CPU without native bf16 (AVX2) takes a slower path with
    # large unfold buffers, unlike a GPU's (the bf16 figure is checked on CUDA: tests/gpu)
    _, measured = measure_peak(lambda: ae.decode(bits), "cpu")
    one = decoder_peak(ae.config, 1, h, w, 4)
    assert 0.85 <= decoder_peak(ae.config, 2, h, w, 4) / measured <= 1.15, (one, measured)
    for n in (1, 3, 8):
        free = int((n * one + (512 << 20)) / 0.9) + 1024  # what a plan may use of it: n images exactly
        got = images_per_decode(ae.config, h, w, torch.float32, free)
        assert got == n and got * one <= usable_bytes(free), (n, got)
    assert images_per_decode(ae.config, h, w, torch.float32, 0) == 1  # never 0: one image is still tried
    bf16 = images_per_decode(ae.config, h, w, torch.bfloat16, free)
    assert 8 < bf16 < 16 and bf16 == usable_bytes(free) // decoder_peak(ae.config, 1, h, w, 2)  # fewer bytes, not half


def test_a_whole_preview_is_decoded_only_where_it_fits():
    """The sampler's live preview decodes one image while the KV cache is alive: whole where the
    head phase plus one image's decoder peak fits the usable memory (14B-64x, 1024x1024, fp8 on a
    24 GiB card), else in tiles (the same card with less usable memory; any offload mode); on the
    CPU nothing is checked."""
    from bitdance_core.runtime.fitting import GenerationCheck
    from bitdance_core.runtime.planner import decoder_peak, usable_bytes

    s = SHAPES["14b-64x"]
    plan = estimate(s.llm, s.head, s.ae, 1024, 1024, 1, 7.5, dtype=torch.bfloat16, weights="fp8")
    one = decoder_peak(s.ae, 1, 1024, 1024, 2)
    need = plan.phases["head"] + one
    assert need > plan.peak_bytes  # the preview is not in the plan's own phases: what this check adds

    def fits(usable, p=plan):
        return GenerationCheck(p, usable, 1, "").whole_preview_fits(s.ae, 1024, 1024, torch.bfloat16)

    assert fits(usable_bytes(24 << 30)) and fits(need) and not fits(need - 1)
    assert fits(None)
    streamed = estimate(s.llm, s.head, s.ae, 1024, 1024, 1, 7.5, dtype=torch.bfloat16, weights="4bit", mode="stream",
                        resident_layers=40)
    assert not fits(1 << 50, streamed)


@pytest.mark.parametrize("shape", ["14b-64x", "14b-16x"])
def test_bench_plans_the_14b_model_under_caps(shape):
    """`bench --weights auto --offload auto --memory-cap-gb N` at the released shapes, 1024x1024, one
    image, cfg 7.5, bf16 (the cap simulated: planned as for a GPU with N GiB free): every cap gets a
    plan that fits it, smaller caps stream more."""
    from bitdance_core.cli.bench import BenchConfig, plan_bench
    from bitdance_core.runtime.planner import usable_bytes

    decisions = {}
    for cap in (24, 16, 12):
        cfg = BenchConfig(shape=SHAPES[shape], device="cpu", dtype=torch.bfloat16, weights="auto", offload="auto",
                          memory_cap_bytes=cap * GiB)
        d = plan_bench(cfg)
        decisions[cap] = d
        assert d.free_bytes == cap * GiB and d.usable_bytes == usable_bytes(cap * GiB)
        assert d.plan.peak_bytes <= d.usable_bytes, (cap, d.summary())
        assert d.weights != "as-is"  # 32.7 GiB in bf16 without offloading fits none of these
        assert (cfg.weights, cfg.offload, cfg.resident_layers, cfg.budget_bytes) == (
            d.weights, d.offload, d.resident_layers, d.budget_bytes)  # what the bench then builds
        assert f"of {cap}.0 GiB free" in d.summary()
    assert (decisions[24].weights, decisions[24].offload) == ("fp8", "none")
    assert decisions[24].plan.peak_bytes < 20 * GiB  # the figure: ~18 GiB with fp8 weights
    for cap in (16, 12):  # fp8 weights do not fit without offloading: some layers stream
        d = decisions[cap]
        if d.weights == "fp8":
            assert d.offload == "stream" and 0 < d.resident_layers < SHAPES[shape].llm.num_hidden_layers
    if decisions[16].weights == decisions[12].weights == "fp8":
        assert decisions[12].resident_layers < decisions[16].resident_layers
        assert decisions[12].plan.transfer_bytes > decisions[16].plan.transfer_bytes > 0


def test_the_decision_says_when_fp8_saves_memory_not_time(folder_14b):
    older = plan_for(folder_14b, 24 * GiB, capability=(8, 6))  # an RTX 3090: 24 GB, no fp8 tensor cores
    assert older.weights == "fp8" and "has no fp8 tensor cores" in older.reason and "save memory here, not time" in older.summary()
    newer = plan_for(folder_14b, 24 * GiB, capability=(8, 9))  # an RTX 4090
    assert newer.weights == "fp8" and "tensor cores" not in newer.reason
    plenty = plan_for(folder_14b, 140 * GiB, capability=(8, 6))  # as-is weights: nothing to say
    assert plenty.weights == "as-is" and "tensor cores" not in plenty.reason
