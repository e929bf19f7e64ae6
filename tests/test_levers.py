"""Issue 11's levers on the CPU: what each does to the numerics (fused projections: the same values
within float32 rounding, and how many bits move; the step cache: bit for bit; the SDPA backend and
grouped-query layout: the math backend, within rounding), that switching them off restores the
pipeline exactly, their spelling, and the kernel grouping of the profile."""
import functools
import json
import os
import sys
import warnings

import pytest
import torch

from bitdance_core.cli.kernel_profile import classify, summarize
from bitdance_core.cli.synthetic import SHAPES, build_random_t2i, custom_shape
from bitdance_core.errors import BitDanceError
from bitdance_core.models.attention import sdpa_backends
from bitdance_core.models.fused_linear import fuse_projections, unfuse_projections
from bitdance_core.models.qwen3 import grouped_query_attention
from bitdance_core.runtime import Levers, apply_levers, enable_graphs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*not one of the official BitDance sizes.*")
PROMPT = "a red fox in the snow"
# every backbone linear at least 64 wide: all of them become fp8 (formats.fp8.default_include) or Q4_0
SHAPE = custom_shape("tiny", layers=2, hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=256, head_width=128)
GEN = dict(height=128, width=128, steps=3, cfg=4.0, seed=2)


def _bits(pipe, **kw):
    return pipe.generate(PROMPT, **{**GEN, **kw})


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a, b):
    if a.dtype.itemsize == 1:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("weights", ["as-is", "fp8", "4bit"])
def test_fused_projections_same_values_same_keys_and_undo(weights):
    pipe = build_random_t2i(SHAPE, seed=4, weights=weights)
    bb = pipe.backbone
    before = _state(bb)
    nbytes = sum(t.numel() * t.element_size() for t in bb.state_dict().values())
    x = torch.randn(2, 16, 128, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16)[None].expand(2, 16)
    y0, bits0 = bb(x, pos), _bits(pipe)

    report = fuse_projections(bb)
    layer = bb.model.layers[0]
    assert report.fused == 2 * 2 and report.skipped == {}
    assert layer.self_attn.qkv_proj is not None and not hasattr(layer.self_attn, "q_proj")
    assert type(layer.self_attn.qkv_proj).__name__ == {"as-is": "Linear", "fp8": "Fp8Linear", "4bit": "Q4Linear"}[weights]
    assert layer.mlp.gate_up_proj.out_features == 2 * 256
    # not a second copy: the same bytes, in the same keys as before (the fused tensors split back on save)
    assert sum(t.numel() * t.element_size() for t in bb.state_dict().values()) == nbytes
    after = bb.state_dict()
    assert sorted(after) == sorted(before) and all(_same(after[k], before[k]) for k in before)
    y1 = bb(x, pos)
    assert torch.allclose(y1, y0, rtol=1e-5, atol=1e-5)  # the same dot products (float32 rounding at most)
    bits1 = _bits(pipe)
    differ = int((bits1 != bits0).sum())
    print(f"{weights}: fused projections change {differ} of {bits0.numel()} bits")
    assert differ <= bits0.numel() // 100

    # the released keys still load into the fused model
    bb.load_state_dict(before)
    assert torch.equal(bb(x, pos), y1)
    assert report.fused == unfuse_projections(bb)
    restored = bb.state_dict()
    assert list(restored) == list(before) and all(_same(restored[k], before[k]) for k in before)
    assert torch.equal(bb(x, pos), y0) and torch.equal(_bits(pipe), bits0)


def test_fusion_leaves_mixed_parts_alone_and_refuses_an_offloaded_backbone():
    from bitdance_core.runtime.offload import apply_offload

    small = custom_shape("tiny", layers=2, hidden=64, heads=4, kv_heads=2)  # k/v 32 wide: left in bf16 by fp8
    pipe = build_random_t2i(small, seed=1, weights="fp8")
    report = fuse_projections(pipe.backbone)
    assert report.fused == 2 and set(report.skipped) == {"layers.0.self_attn", "layers.1.self_attn"}
    assert report.as_dict()["reasons"] == ["parts of different kinds (Fp8Linear, Linear)"]
    for mode, kw in (("stream", {"resident_layers": 1}), ("stage", {})):
        offloaded = build_random_t2i(small, seed=1)
        off = apply_offload(offloaded, mode, "cpu", **kw)
        with pytest.raises(BitDanceError, match="fuse the projections before offloading"):
            fuse_projections(offloaded.backbone)
        off.remove()


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("sampler", ["euler_maruyama", "euler"])
def test_step_cache_is_bit_exact_and_skips_the_repeated_work(sampler):
    pipe = build_random_t2i(SHAPE, seed=5)
    net = pipe.head.net
    cond_calls, time_calls = _count_calls(net.cond_embed), _count_calls(net.time_embed)
    net.step_cache = False
    off = _bits(pipe, sampler=sampler)
    blocks, passes = 4, GEN["steps"] + 1 if sampler == "euler_maruyama" else GEN["steps"]
    assert len(cond_calls) == len(time_calls) == blocks * passes
    cond_calls.clear(), time_calls.clear()
    net.step_cache = True
    on = _bits(pipe, sampler=sampler)
    assert torch.equal(on, off)
    assert len(cond_calls) == blocks and len(time_calls) == passes  # the time grid's embeddings: once, kept
    again = _bits(pipe, sampler=sampler, seed=3)
    assert len(time_calls) == passes and len(cond_calls) == 2 * blocks
    net.step_cache = False
    assert torch.equal(again, _bits(pipe, sampler=sampler, seed=3))


def test_step_cache_follows_the_weights_and_the_static_step():
    """New time-embedding weights (loaded in place) or another fp8 path: the kept embeddings go; the
    static block step (what a CUDA graph captures) gives the same bits with the cache as without."""
    pipe = build_random_t2i(SHAPE, seed=6)
    net = pipe.head.net
    _bits(pipe)
    with torch.no_grad():
        net.time_embed.mlp[2].weight.mul_(1.5)
    net.step_cache = False
    want = _bits(pipe)
    net.step_cache = True
    assert torch.equal(_bits(pipe), want)
    acc = enable_graphs(pipe, static_step_on_cpu=True)
    static_on = _bits(pipe)
    net.step_cache = False
    assert torch.equal(_bits(pipe), static_on)
    acc.remove()


def test_step_cache_with_inference_tensors():
    """ComfyUI builds and runs models under torch.inference_mode: weights without version counters."""
    with torch.inference_mode():
        pipe = build_random_t2i(SHAPE, seed=9)
        on = _bits(pipe)
    pipe.head.net.step_cache = False
    assert torch.equal(_bits(pipe), on)


def test_imagenet_heads_keep_their_bits_with_the_step_cache():
    """The class-conditional models sample through the same sampler (guidance varying per block)."""
    import bitdance_core as bd
    from bitdance_core.demo_models import IMAGENET

    net = bd.load_imagenet(IMAGENET)
    head = net.model.head.net
    calls = _count_calls(head.time_embed)
    head.step_cache = False
    off = net.generate(classes=[1, 7], steps=4, seed=0)
    uncached = len(calls)
    head.step_cache = True
    assert torch.equal(net.generate(classes=[1, 7], steps=4, seed=0), off)
    assert len(calls) - uncached < uncached  # the time grid's embeddings were reused


def test_sdpa_backend_and_grouped_query_layout_on_the_cpu():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 16, generator=g) for h, n in ((8, 5), (2, 40), (2, 40)))
    mask = torch.rand(2, 1, 1, 40, generator=g) > 0.3
    ref = torch.softmax((q @ k.repeat_interleave(4, 1).transpose(-1, -2)) * 0.25 + torch.where(mask, 0.0, -torch.inf), -1) \
        @ v.repeat_interleave(4, 1)
    for backend in ("auto", "math"):
        for native in (False, True):
            out = grouped_query_attention(q, k, v, mask, 0.25, sdpa_backends(backend), native)
            assert torch.allclose(out, ref, atol=1e-5), (backend, native)
    with pytest.raises(BitDanceError, match="SDPA backend 'fast' unknown"):
        sdpa_backends("fast")
    pipe = build_random_t2i(SHAPE, seed=7)
    base = _bits(pipe)
    applied = apply_levers(pipe, Levers.parse("sdpa=math+gqa=native"))
    assert all(layer.self_attn.sdpa_backends is not None for layer in pipe.backbone.model.layers)
    assert int((_bits(pipe) != base).sum()) <= base.numel() // 100
    applied.remove()
    assert all(layer.self_attn.sdpa_backends is None and layer.self_attn.gqa == "stack" for layer in pipe.backbone.model.layers)
    assert torch.equal(_bits(pipe), base)


def test_levers_spelling():
    lv = Levers.parse("fuse+compile=head+compile-mode=autotune+sdpa=efficient+step-cache=off")
    assert (lv.fuse, lv.compile, lv.compile_mode, lv.sdpa, lv.step_cache) == (True, "head", "max-autotune-no-cudagraphs",
                                                                               "efficient", False)
    assert Levers.parse(lv.spec()) == lv and Levers.parse("compile").compile == "all" and Levers().spec() == ""
    assert Levers.parse("baseline") == Levers() and Levers.parse("compile+compile-mode=default").spec() == "compile+compile-mode=default"
    for bad, msg in (("fast", "lever 'fast' unknown"), ("gemm=cutlass", "lever gemm=cutlass: choose one of"),
                     ("fuse=maybe", "write fuse=on or fuse=off"), ("sdpa", "needs a value")):
        with pytest.raises(BitDanceError, match=msg):
            Levers.parse(bad)


def test_apply_levers_reports_and_restores():
    pipe = build_random_t2i(SHAPE, seed=8)
    base = _bits(pipe)
    applied = apply_levers(pipe, Levers.parse("fuse+gemm=cublaslt+compile=head+step-cache=off"))
    rep = applied.report
    assert rep["fuse"]["fused"] == 4 and rep["gemm"] == "cublaslt: no effect on the CPU"
    assert rep["compiled"] == [] and "not compiled on the CPU" in rep["compile"]  # force_compile only
    assert pipe.head.net.step_cache is False and "forward" not in pipe.head.net.__dict__
    applied.remove()
    assert pipe.head.net.step_cache is True and hasattr(pipe.backbone.model.layers[0].mlp, "gate_proj")
    assert torch.equal(_bits(pipe), base)


def test_kernel_groups():
    names = {
        "nvjet_tst_128x128_64x6_4x1_v_bz_bias_TNT": "GEMM",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": "GEMM",
        "triton_tem_fused_addmm_0": "GEMM",
        "aten::addmm": "GEMM",
        "fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>)": "attention",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>": "attention",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3": "attention",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>": "norm",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float>>>": "norm",
        "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0": "norm",
        "void at::native::elementwise_kernel<128, 2, at::native::direct_copy_kernel_cuda(...)>": "copies",
        "void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>": "copies",
        "Memcpy DtoD (Device -> Device)": "copies",
        "aten::index_copy_": "copies",
        "void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<float, float, float, MulFunctor<float>>>": "elementwise",
        "triton_poi_fused_add_mul_silu_0": "elementwise",
        "aten::mul": "elementwise",
        "aten::view": "other",
    }
    for name, group in names.items():
        assert classify(name) == group, name
    s = summarize([("aten::addmm", 300.0, 3), ("aten::mul", 100.0, 4), ("aten::view", 0.0, 9)], units=2)
    assert s["kernel_ms"] == pytest.approx(0.2) and s["groups"]["GEMM"]["ms"] == pytest.approx(0.15)
    assert s["groups"]["GEMM"]["share"] == pytest.approx(0.75) and s["groups"]["elementwise"]["kernels"] == 2
    assert [t["name"] for t in s["top"]] == ["aten::addmm", "aten::mul", "aten::view"]


def test_gemm_shapes_of_the_14b_model():
    from bitdance_core.cli.bench_gemm import linear_shapes

    got = {(e["part"], e["in"], e["out"], e["bias"]): (sorted(e["names"]), e["per_call"]) for e in linear_shapes(SHAPES["14b-64x"])}
    assert got[("backbone", 5120, 5120, False)] == (["self_attn.o_proj", "self_attn.q_proj"], 80)
    assert got[("backbone", 5120, 1024, False)] == (["self_attn.k_proj", "self_attn.v_proj"], 80)
    assert got[("backbone", 5120, 17408, False)] == (["mlp.gate_proj", "mlp.up_proj"], 80)
    assert got[("backbone", 17408, 5120, False)] == (["mlp.down_proj"], 40)
    assert got[("backbone (fused)", 5120, 7168, False)][1] == got[("backbone (fused)", 5120, 34816, False)][1] == 40
    wide = got[("head", 5120, 15360, True)]  # each of the 6 blocks: wqkv and the SwiGLU w1
    assert wide[1] == 12 and got[("head", 7680, 5120, True)][1] == 6 and got[("head", 5120, 30720, True)][1] == 2


@functools.lru_cache(maxsize=1)
def _summary_module():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import kernels_summary

    return kernels_summary


def test_best_combination_from_a_sweep(tmp_path):
    def rec(variant, s):
        return {"variant": variant, "images": 1, "height": 512, "width": 512, "s_per_image": s,
                "backbone_per_block_s": 0.02, "head_per_block_s": 0.08}
    lines = [rec("reference (eager)", 3.0), rec("as-is", 2.0), rec("as-is+step-cache=off", 2.05), rec("as-is+fuse", 1.9),
             rec("as-is+sdpa=efficient", 1.99), rec("as-is+sdpa=cudnn", 1.8), rec("as-is+sdpa=math", 1.85),
             rec("as-is+gemm=autotune", 1.7), rec("as-is+compile=head+compile-mode=default", 1.5),
             rec("as-is+compile=step+compile-mode=default", 1.6), rec("as-is+compile=head", 1.4),
             {"variant": "as-is+compile=step", "error": "timed out after 80 s"}]
    (tmp_path / "levers.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    best = _summary_module().best_levers(str(tmp_path))
    # compile head (fastest in its mode) and step merged; fuse; the fastest SDPA; no GEMM autotune under compile
    assert best == "compile=loop+fuse+sdpa=cudnn"
    lv = Levers.parse(best)
    assert (lv.compile, lv.compile_mode, lv.fuse, lv.sdpa, lv.gemm) == ("loop", "max-autotune-no-cudagraphs", True, "cudnn", "default")
    (tmp_path / "levers.jsonl").write_text(json.dumps(rec("as-is", 2.0)) + "\n" + json.dumps(rec("as-is+fuse", 1.99)) + "\n")
    assert _summary_module().best_levers(str(tmp_path)) == ""


def test_bench_flags_and_profile(tmp_path):
    """bench's lever flags (on top of --levers) reach the run; --profile-out writes the kernel profile."""
    from bitdance_core.cli.bench import BenchConfig, config_from_args, format_report, run_bench
    from bitdance_core.cli.main import build_parser

    a = build_parser().parse_args(["bench", "--shape", "tiny", "--levers", "sdpa=math+gemm=cublaslt", "--fuse-projections",
                                   "--compile", "head", "--compile-mode", "default", "--step-cache", "off",
                                   "--profile-out", str(tmp_path / "p.json"), "--profile-only"])
    cfg = config_from_args(a)
    assert cfg.levers == Levers(compile="head", compile_mode="default", fuse=True, gemm="cublaslt", sdpa="math",
                                step_cache=False) and cfg.compile and cfg.profile_only
    assert config_from_args(build_parser().parse_args(["bench", "--compile"])).levers.compile == "all"
    shape = custom_shape("tiny", layers=2, hidden=64, heads=4, kv_heads=2, height=128, width=128, steps=2)
    r = run_bench(BenchConfig(shape=shape, levers=Levers.parse("fuse+sdpa=math"), naive=False, warmup=0,
                              profile_out=str(tmp_path / "p.json"), extra={"shape_name": "custom"}))
    assert r["levers"] == "fuse+sdpa=math" and r["levers_report"]["fuse"]["fused"] == 4 and r["fast"]["s_per_image"] > 0
    p = json.loads((tmp_path / "p.json").read_text())
    assert p["levers"] == "fuse+sdpa=math" and p["head_passes"] == 3
    assert set(p["modes"]["eager"]) >= {"head_pass", "backbone_step"}
    assert "eager head pass" in format_report(r) and "profile written to" in format_report(r)
