"""The matmul paths of the fp8 linears (`Fp8Linear.matmul`), selectable so that one GPU run can
choose between them by measurement (`bench --fp8-matmul a,b,...`; docs/performance.md, "fp8").

Every path computes y = x @ (q * s)^T + b for an e4m3 weight q [out, in] with one float32 scale s
per output channel; they differ in what they read and how many kernels they launch:

- `dequant` (weight-only, eager): q is widened to the activations' dtype, multiplied, and the scale
  applied to the output. Runs everywhere, and is the CPU reference. On a GPU it is the slowest: the
  widened copy is written and read again (5 bytes moved per weight against bf16's 2).
- `scaled_mm`: the activations are quantised to e4m3 with one scale per row (5 small kernels) and
  `torch._scaled_mm` multiplies fp8 by fp8 on the fp8 tensor cores, the bias fused in. 1 byte per weight.
- `scaled_mm_compiled`: the same function through `torch.compile`: the activation quantisation
  becomes one fused kernel (amax, scale and cast in one pass).
- `weight_only_compiled`: the dequantising matmul through `torch.compile` (max-autotune), whose
  Triton GEMM template fuses the widening of q into its loads (prologue fusion): 1 byte per weight,
  bf16 tensor cores, no activation rounding.
- `torchao`: torchao's float8 inference tensor (dynamic per-row activations, per-row weights) built
  around the layer's own q and s (no copy); needs the optional `torchao` package (>= 0.18 for
  torch 2.11).
- `auto`: `AUTO_ON_FP8_GPUS` on CUDA GPUs with fp8 tensor cores (compute capability 8.9, Ada, and
  newer), `dequant` elsewhere: before Ada, fp8 weights save memory, not time.

A path that cannot take an input (float32 activations, a width that is not a multiple of 16, no
torchao) or that fails is replaced by `dequant` for that layer; the layer records why
(`Fp8Linear.last_path`), and `matmul_report` counts it, so no fallback is silent.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
MODES = ("dequant", "scaled_mm", "scaled_mm_compiled", "weight_only_compiled", "torchao")
MATMUL_MODES = MODES + ("auto",)
# What "auto" runs on GPUs with fp8 tensor cores. The eager scaled-mm path until a GPU run of
# benchmarks/gpu_consumer.sh says which path is fastest (docs/performance.md, "fp8").
AUTO_ON_FP8_GPUS = "scaled_mm"
FP8_TENSOR_CORES = (8, 9)  # compute capability of the first GPUs with fp8 matrix instructions (Ada)
# torchao's default for inference: fp8 products accumulated without periodic promotion (faster on Hopper)
FAST_ACCUM = True
_TINY = 1e-12


def gpu_capability(device) -> tuple[int, int] | None:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        return tuple(torch.cuda.get_device_capability(device))
    except Exception:
        return None


def has_fp8_tensor_cores(device=None, capability: tuple[int, int] | None = None) -> bool:
    """Whether a CUDA GPU has fp8 matrix instructions (compute capability >= 8.9)."""
    cap = capability if capability is not None else (gpu_capability(device) if device is not None else None)
    return cap is not None and tuple(cap) >= FP8_TENSOR_CORES


def resolve(mode: str, device) -> str:
    """The concrete path of `mode` on `device` ("auto" resolved)."""
    if mode != "auto":
        return mode
    return AUTO_ON_FP8_GPUS if has_fp8_tensor_cores(device) else "dequant"


NO_CPU_ROW_SCALES = ("this PyTorch's CPU torch._scaled_mm takes one scale per tensor, not one per row "
                     "(torch 2.11 does not, 2.13 does)")


@functools.cache
def cpu_scaled_mm_takes_row_scales() -> bool:
    """Whether torch._scaled_mm on the CPU takes row-wise scales (a newer PyTorch's does). Asked once,
    with a 16x16 product, so that an older one's CPU gives a stated reason rather than a caught
    internal assert. (On CUDA the first call of each layer says: a failure falls back, with its reason.)"""
    if not hasattr(torch, "_scaled_mm"):
        return False
    a = torch.zeros(16, 16, dtype=FP8)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except Exception:
        return False
    return True


def torchao_available() -> bool:
    try:
        import torchao  # noqa: F401
    except Exception:
        return False
    return True


def unsupported(mode: str, x: torch.Tensor, in_features: int, out_features: int) -> str | None:
    """Why `mode` cannot take the input `x` (None: it can)."""
    if mode == "dequant":
        return None
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"{str(x.dtype).replace('torch.', '')} input"
    if x.dtype == torch.float16 and mode != "weight_only_compiled" and x.is_cuda:
        return "float16 input (row-wise scaled-mm writes bfloat16 only)"
    if in_features % 16 or out_features % 16:
        return f"{in_features}x{out_features} is not a multiple of 16"
    if mode != "weight_only_compiled" and not hasattr(torch, "_scaled_mm"):
        return "this PyTorch has no torch._scaled_mm"
    if mode in ("scaled_mm", "scaled_mm_compiled") and x.device.type == "cpu" and not cpu_scaled_mm_takes_row_scales():
        return NO_CPU_ROW_SCALES
    if mode == "torchao" and not torchao_available():
        return "torchao is not installed"
    return None


# ---- the paths ----------------------------------------------------------------------------------

def dequant_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Weight-only fp8, eager: the reference (every device, every dtype)."""
    dtype = x.dtype if x.is_floating_point() else torch.float32
    if dtype == torch.float16:
        # fp16 could overflow on the unscaled fp8 products: dequantise the weight instead
        w = q.to(dtype)
        w.mul_(scale.to(dtype)[:, None])
        return F.linear(x, w, None if bias is None else bias.to(dtype))
    y = F.linear(x.to(dtype), q.to(dtype))
    if bias is None:
        return y * scale.to(dtype)
    # scale and bias in one kernel, rounded once (as a GEMM epilogue would): two bf16 roundings made
    # exact zeros (y == -bias) common enough to leave a 0 "bit" after the sampler's sign()
    return torch.addcmul(bias.to(dtype), y, scale.to(dtype))


def quantize_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (e4m3 [M, K], float32 [M, 1]) with x ≈ q * scale, each row's largest magnitude at 448.
    Five kernels in eager mode (amax in float32, clamp, scale, divide, cast), one when compiled.
    |x / scale| <= 448 up to float32 rounding, which the cast rounds back to 448: no clamp needed."""
    amax = torch.linalg.vector_norm(x2, float("inf"), dim=1, keepdim=True, dtype=torch.float32)
    scale = amax.clamp_min_(_TINY).div_(FP8_MAX)
    return (x2 / scale).to(FP8), scale


def scaled_mm_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp8 x fp8 on the tensor cores: activations quantised per row, the weight's scale per column
    of the product, the bias added by the matmul's epilogue."""
    shape = x.shape
    xq, x_scale = quantize_rows(x.reshape(-1, shape[-1]))
    y = torch._scaled_mm(xq, q.t(), scale_a=x_scale, scale_b=scale.view(1, -1),
                         bias=None if bias is None else bias.to(x.dtype), out_dtype=x.dtype,
                         use_fast_accum=FAST_ACCUM and x.is_cuda)
    return y.reshape(*shape[:-1], q.shape[0])


def fused_dequant_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Weight-only fp8 written for the compiler: the dequantised weight (q * s, rounded to the
    activations' dtype as `dequant` rounds it) is a prologue the GEMM template can fuse into its loads."""
    w = (q.to(torch.float32) * scale[:, None]).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


_compiled: dict = {}


def compiled(mode: str):
    """The torch.compile'd function of a compiled mode (made once; shared by every layer, one
    compilation per shape: the recompile limit is raised to cover a model's distinct linears)."""
    fn = _compiled.get(mode)
    if fn is None:
        import torch._dynamo

        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, name, max(getattr(cfg, name), 64))
        if mode == "scaled_mm_compiled":
            fn = torch.compile(scaled_mm_linear, dynamic=False, fullgraph=True)
        elif mode == "weight_only_compiled":
            fn = torch.compile(fused_dequant_linear, dynamic=False, fullgraph=True, mode="max-autotune-no-cudagraphs")
        else:
            raise ValueError(f"'{mode}' is not a compiled fp8 matmul mode")
        _compiled[mode] = fn
    return fn


def torchao_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
    """torchao's float8 weight tensor around q and s (shared, not copied): per-row weight scales,
    dynamic per-row activation quantisation in F.linear."""
    from torchao.float8.inference import Float8MMConfig
    from torchao.quantization.granularity import PerRow
    from torchao.quantization.quantize_.common import KernelPreference
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor, QuantizeTensorToFloat8Kwargs

    return Float8Tensor(q, scale.reshape(-1, 1), block_size=[1, q.shape[1]], mm_config=Float8MMConfig(use_fast_accum=FAST_ACCUM),
                        act_quant_kwargs=QuantizeTensorToFloat8Kwargs(granularity=PerRow()),
                        kernel_preference=KernelPreference.AUTO, dtype=dtype)


def capturing() -> bool:
    """Whether the current CUDA stream is being captured into a graph (a failure there is the capture's)."""
    try:
        return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    except Exception:
        return False
