"""The fp8 linears' matmul paths (formats/fp8_matmul.py) on the CPU: each mode against the
dequantised reference, the fallbacks and their reasons, "auto" per GPU generation, torchao."""
import pytest
import torch
from torch import nn

from bitdance_core.errors import BitDanceError
from bitdance_core.formats import fp8_matmul
from bitdance_core.formats.fp8 import FP8, Fp8Linear, matmul_report, quantize_linears, set_matmul
from paths import cpu_fp8_path

torch.set_num_threads(1)
# torch 2.13's CPU _scaled_mm takes row-wise scales; torch 2.11's (the GPU machine's) does not, and the
# scaled-mm modes then take the stated fallback on the CPU: both are checked, by what this PyTorch can do
CPU_ROW_SCALES = fp8_matmul.cpu_scaled_mm_takes_row_scales()


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _layer_and_input(seed, bias=True, k=96, n=64):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * torch.logspace(-2, 0, n)[:, None])  # rows of different size
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
    # rows of very different magnitude, fresh values per seed
    x = (torch.randn(3, 5, k, generator=g) * torch.logspace(-2, 1, 5)[None, :, None]).to(torch.bfloat16)
    return lin, x


def _reference(f8: Fp8Linear, x):
    """y = x @ (q * s)^T + b in float32: the function every mode approximates."""
    return nn.functional.linear(x.float(), f8.dequantized_weight(torch.float32), None if f8.bias is None else f8.bias.float())


def _activation_rounded_reference(f8: Fp8Linear, x):
    """What the scaled-mm paths compute: the activations rounded to e4m3 with one scale per row."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    xs = x2.abs().amax(1, keepdim=True).clamp_min(1e-12) / 448
    xq = ((x2 / xs).to(FP8).float() * xs).reshape(x.shape)
    return nn.functional.linear(xq, f8.dequantized_weight(torch.float32), None if f8.bias is None else f8.bias.float())


@pytest.mark.parametrize("bias", [True, False])
def test_eager_modes_against_the_dequantised_reference(bias):
    for seed in (1, 2):  # fresh inputs each time
        lin, x = _layer_and_input(seed, bias)
        dq = Fp8Linear.from_linear(lin, matmul="dequant")
        y = dq(x)
        assert dq.last_path == "dequant" and y.dtype == torch.bfloat16
        assert _rel_err(y, _reference(dq, x)) < 0.01  # bf16 rounding of the product only
        sm = Fp8Linear.from_linear(lin, matmul="scaled_mm")
        y = sm(x)
        assert sm.last_path == cpu_fp8_path("scaled_mm") and y.shape == (3, 5, 64) and torch.isfinite(y.float()).all()
        if CPU_ROW_SCALES:
            assert _rel_err(y, _activation_rounded_reference(sm, x)) < 0.01
            # the activation rounding is the only extra error: e4m3 keeps 3 mantissa bits
            assert 1e-4 < _rel_err(y, _reference(sm, x)) < 0.08
        else:
            assert torch.equal(y, dq(x))  # the fallback is the dequantising path itself


def test_zero_rows_and_the_largest_activation_stay_finite():
    lin, x = _layer_and_input(3)
    x = x.clone()
    x[0, 0] = 0  # an all-zero row: scale clamped, no 0/0
    x[1, 2, 7] = 3e4  # a row dominated by one element: it maps to 448 exactly, not past it
    q, scale = fp8_matmul.quantize_rows(x.reshape(-1, 96))
    assert torch.isfinite(q.float()).all() and q.float().abs().max() == 448
    assert torch.all(q[0].float() == 0)
    y = Fp8Linear.from_linear(lin, matmul="scaled_mm")(x)
    assert torch.isfinite(y.float()).all()


def test_compiled_modes_against_the_dequantised_reference():
    """The torch.compile'd paths on the CPU (inductor's C++ backend): the same functions as their
    eager twins, so the same numerics up to rounding; recorded as taken, not fallen back."""
    for seed in (4, 5):
        lin, x = _layer_and_input(seed)
        eager = Fp8Linear.from_linear(lin, matmul="scaled_mm")
        comp = Fp8Linear.from_linear(lin, matmul="scaled_mm_compiled")
        y = comp(x)
        assert comp.last_path == cpu_fp8_path("scaled_mm_compiled"), comp.last_path
        assert _rel_err(y, _activation_rounded_reference(comp, x) if CPU_ROW_SCALES else _reference(comp, x)) < 0.01
        assert _rel_err(y, eager(x)) < 0.01
        wo = Fp8Linear.from_linear(lin, matmul="weight_only_compiled")
        y = wo(x)
        assert wo.last_path == "weight_only_compiled", wo.last_path
        assert _rel_err(y, _reference(wo, x)) < 0.01  # no activation rounding: as close as dequant
    # a mode the CPU cannot take is refused before anything is compiled
    assert set(fp8_matmul._compiled) == {"scaled_mm_compiled", "weight_only_compiled"} - (set() if CPU_ROW_SCALES else {"scaled_mm_compiled"})


def test_a_failing_mode_falls_back_once_and_says_why(monkeypatch):
    lin, x = _layer_and_input(6)
    f8 = Fp8Linear.from_linear(lin, matmul="scaled_mm")
    calls = []

    def broken(*a):
        calls.append(1)
        raise RuntimeError("no kernel for this layout\nsecond line")
    monkeypatch.setattr(fp8_matmul, "scaled_mm_linear", broken)
    monkeypatch.setattr(fp8_matmul, "cpu_scaled_mm_takes_row_scales", lambda: True)  # the mode is tried, on any torch
    y = f8(x)
    assert f8.last_path == "dequant (scaled_mm failed: RuntimeError: no kernel for this layout)"
    assert torch.equal(y, Fp8Linear.from_linear(lin, matmul="dequant")(x))
    f8(x)
    assert len(calls) == 1  # not tried again by this layer
    set_matmul(f8, "scaled_mm")  # switching modes forgets the failure
    assert f8.failed == {} and f8.last_path is None

    def oom(*a):
        raise torch.cuda.OutOfMemoryError("out of memory")
    monkeypatch.setattr(fp8_matmul, "scaled_mm_linear", oom)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # never answered by the path that needs more memory
        f8(x)


def test_matmul_report_counts_paths_and_fallbacks():
    net = nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 48), nn.Linear(48, 40))
    quantize_linears(net, include=lambda n, l: True, matmul="scaled_mm")
    rep = matmul_report(net)
    assert rep == {"layers": 3, "modes": {"scaled_mm": 3}, "paths": {"not called": 3}, "fallbacks": 0}
    x = torch.randn(4, 96).to(torch.bfloat16)
    net(x)  # 48x40: 40 is no multiple of 16
    rep = matmul_report(net)
    assert rep["paths"] == {cpu_fp8_path("scaled_mm"): 2, "dequant (48x40 is not a multiple of 16)": 1}
    assert rep["fallbacks"] == (1 if CPU_ROW_SCALES else 3)
    net.float()(torch.randn(4, 96))  # float32 activations never take a scaled-mm path
    assert matmul_report(net)["paths"] == {"dequant (float32 input)": 3}


def test_auto_per_gpu_generation():
    assert not fp8_matmul.has_fp8_tensor_cores(capability=(8, 6))  # Ampere (RTX 30xx, A100): no fp8 tensor cores
    assert fp8_matmul.has_fp8_tensor_cores(capability=(8, 9))  # Ada (RTX 40xx, L40)
    assert fp8_matmul.has_fp8_tensor_cores(capability=(9, 0))  # Hopper
    assert fp8_matmul.resolve("auto", torch.device("cpu")) == "dequant"
    assert fp8_matmul.resolve("scaled_mm", torch.device("cpu")) == "scaled_mm"
    lin, x = _layer_and_input(7)
    auto = Fp8Linear.from_linear(lin)  # the default mode
    assert auto.matmul == "auto" and torch.equal(auto(x), Fp8Linear.from_linear(lin, matmul="dequant")(x))
    assert auto.last_path == "dequant"
    with pytest.raises(BitDanceError, match="fp8 matmul 'fast' unknown"):
        set_matmul(auto, "fast")


def test_torchao_mode():
    """torchao is optional: with it, its float8 tensor around the layer's own weight computes the
    scaled-mm function; without it, asking for it says what to install and a layer set to it falls back."""
    lin, x = _layer_and_input(8)
    f8 = Fp8Linear.from_linear(lin, matmul="torchao")
    y = f8(x)
    if fp8_matmul.torchao_available():
        assert f8.last_path == "torchao"
        assert f8._ao[1].qdata.data_ptr() == f8.weight.data_ptr()  # no copy of the weight
        assert _rel_err(y, _reference(f8, x)) < 0.08 and _rel_err(y, _activation_rounded_reference(f8, x)) < 0.03
        set_matmul(f8, "torchao")
    else:
        assert f8.last_path == "dequant (torchao is not installed)"
        with pytest.raises(BitDanceError, match="needs the torchao package"):
            set_matmul(f8, "torchao")


def test_the_cpu_row_scale_probe_says_what_the_kernel_does():
    """cpu_scaled_mm_takes_row_scales against torch._scaled_mm itself, at another shape: where it says yes,
    row-wise scales give x_q @ w_q^T scaled per row and column; where it says no, the kernel refuses them."""
    g = torch.Generator().manual_seed(8)
    a, b = (torch.randn(32, 48, generator=g) * 4).to(FP8), (torch.randn(64, 48, generator=g) * 4).to(FP8)
    sa, sb = torch.rand(32, 1, generator=g) + 0.5, torch.rand(1, 64, generator=g) + 0.5
    if CPU_ROW_SCALES:
        y = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
        assert _rel_err(y, (a.float() @ b.float().t()) * sa * sb) < 0.01
    else:
        with pytest.raises(Exception):
            torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
        assert "per tensor" in fp8_matmul.NO_CPU_ROW_SCALES


def test_dequant_rounds_scale_and_bias_once():
    """In bf16, y * s + b rounded twice cancels to exactly 0 about once in 1,500 outputs (y * s == -b),
    and the sampler's sign() then leaves a 0 where a bit must be -1 or +1. The dequantising path scales
    and adds the bias in one rounding, as a bf16 linear's epilogue does: no more zeros than that."""
    g = torch.Generator().manual_seed(9)
    lin = nn.Linear(256, 32)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 256, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(32, generator=g) * 0.5)
    f8 = Fp8Linear.from_linear(lin, matmul="dequant")
    x = torch.randn(20000, 256, generator=g).to(torch.bfloat16)
    y = f8(x)
    w = f8.dequantized_weight(torch.bfloat16)
    twice = nn.functional.linear(x, f8.weight.to(torch.bfloat16)) * f8.weight_scale.to(torch.bfloat16) + f8.bias.to(torch.bfloat16)
    once = nn.functional.linear(x, w, f8.bias.to(torch.bfloat16))
    assert int((twice == 0).sum()) > 100  # what two roundings do at this size
    assert int((y == 0).sum()) <= int((once == 0).sum()) + 2, (int((y == 0).sum()), int((once == 0).sum()))
    assert _rel_err(y, _reference(f8, x)) < 0.01
