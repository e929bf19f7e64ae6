"""fp8 weights: float8_e4m3fn linears with one scale per output channel.

`Fp8Linear` stores `weight` as float8_e4m3fn [out, in] and `weight_scale` float32 [out]
(w ≈ weight * weight_scale[:, None]); its state-dict keys are the ComfyUI ones (`<p>.weight`,
`<p>.weight_scale`). Compute happens in the activations' dtype: either the fp8 weight is widened
and the per-channel scale is applied to the output (weight-only fp8, any device), or, on CUDA GPUs
with fp8 tensor cores, `torch._scaled_mm` multiplies fp8 activations (scaled per row) by the fp8
weight (`matmul="auto"`: there only; `matmul="scaled_mm"`: on any device whose PyTorch build has
the kernel, the CPU included, which is how the tests check its arithmetic; any failure falls back
to the first way, once per layer).

Loading: `materialize_fp8` quantises on load from bf16/fp32 files (one tensor at a time on the
CPU, then only the fp8 bytes go to the device); `Fp8Source` reads files that are already fp8
(`.weight_scale` siblings and the other spellings of doc §3.2), dequantising only what is not a
quantised linear. Whole pipelines with fp8 linears: pipelines/t2i_loading.py (a model folder) and
pipelines/comfy_split.py (the ComfyUI split files).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BitDanceError, require
from .checkpoints import TensorSource, assign, check_keys

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu", "float8_e4m3fnuz",
                                                "float8_e5m2fnuz") if hasattr(torch, n))
# Spellings of a weight's dequantisation scale in fp8 files (x ≈ q * scale), for the weight key `<p>.weight`.
SCALE_SUFFIXES = (".weight_scale", ".weight.scale", ".scale_weight", ".weight_scales")
# Keys that carry no weight: activation scales of scaled-mm exports, ComfyUI's quantisation metadata.
AUX_SUFFIXES = (".input_scale", ".comfy_quant")
AUX_KEYS = ("scaled_fp8",)
MATMUL_MODES = ("dequant", "scaled_mm", "auto")


# ---- the arithmetic -------------------------------------------------------------------------

def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (float8_e4m3fn [out, in], float32 scale [out]) with w ≈ q * scale[:, None].

    The scale maps each row's largest magnitude to 448; all-zero rows get scale 1."""
    require(w.dim() == 2, f"fp8 quantisation takes a 2-D weight, got shape {list(w.shape)}")
    w32 = w.to(torch.float32)
    amax = w32.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w32 / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor | None, dtype=torch.float32) -> torch.Tensor:
    """q * scale with the scale broadcast over the leading (output) dimension."""
    out = q.to(torch.float32)
    if scale is not None:
        s = scale.to(torch.float32)
        while s.dim() < out.dim():
            s = s.unsqueeze(-1)
        out = out * s
    return out.to(dtype)


def per_channel_scale(scale: torch.Tensor | None, out_features: int, origin: str) -> torch.Tensor:
    """A scalar, [out] or [out, 1] scale as float32 [out]."""
    if scale is None:
        return torch.ones(out_features, dtype=torch.float32)
    s = scale.to(torch.float32)
    if s.numel() == 1:
        return s.reshape(1).expand(out_features).clone()
    if s.numel() == out_features:
        return s.reshape(out_features).clone()
    raise BitDanceError(f"{origin}: scale of shape {list(scale.shape)} is neither per-tensor nor per-output-channel "
                        f"({out_features} rows); block-wise fp8 scales are not supported")


def scaled_mm_supported(device: torch.device) -> bool:
    """Row-wise scaled fp8 matmul worth choosing by default: CUDA compute capability 9.0 or newer
    (H100, H200, B200)."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    try:
        return torch.cuda.get_device_capability(device) >= (9, 0)
    except Exception:
        return False


# ---- the layer ------------------------------------------------------------------------------

class Fp8Linear(nn.Module):
    """A Linear whose weight is float8_e4m3fn with a float32 scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, bias_dtype=torch.float32,
                 matmul: str = "dequant"):
        super().__init__()
        require(matmul in MATMUL_MODES, f"fp8 matmul '{matmul}' unknown; choose one of {MATMUL_MODES}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8, device=device), requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.matmul = matmul
        self._scaled_mm_failed = False

    @classmethod
    def from_linear(cls, lin: nn.Linear, matmul: str = "dequant") -> "Fp8Linear":
        """Quantise an existing Linear (or build an empty one on the meta device)."""
        dev = lin.weight.device
        out = cls(lin.in_features, lin.out_features, lin.bias is not None, device=dev,
                  bias_dtype=lin.bias.dtype if lin.bias is not None else torch.float32, matmul=matmul)
        if dev.type != "meta":
            q, s = quantize_fp8(lin.weight.detach())
            out.weight = nn.Parameter(q.to(dev), requires_grad=False)
            out.weight_scale = s.to(dev)
            if lin.bias is not None:
                out.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8 e4m3 per-channel, matmul={self.matmul}"

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.weight_scale, dtype)

    def _want_scaled_mm(self, x: torch.Tensor) -> bool:
        if self.matmul == "dequant" or self._scaled_mm_failed or x.dtype not in (torch.bfloat16, torch.float16):
            return False
        if self.in_features % 16 or self.out_features % 16 or not hasattr(torch, "_scaled_mm"):
            return False
        return self.matmul == "scaled_mm" or scaled_mm_supported(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._want_scaled_mm(x):
            try:
                return self._forward_scaled_mm(x)
            except (RuntimeError, TypeError, ValueError):  # torch raises ValueError for a scale layout it rejects
                self._scaled_mm_failed = True  # unsupported shape/build: weight-only fp8 from now on
        dtype = x.dtype if x.is_floating_point() else torch.float32
        if dtype == torch.float16:
            # fp16 could overflow on the unscaled fp8 products: dequantise the weight instead
            w = self.weight.to(dtype)
            w.mul_(self.weight_scale.to(dtype)[:, None])
            return F.linear(x, w, None if self.bias is None else self.bias.to(dtype))
        y = F.linear(x.to(dtype), self.weight.to(dtype))
        y = y * self.weight_scale.to(dtype)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y

    def _forward_scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        amax = x2.abs().amax(dim=1, keepdim=True).to(torch.float32).clamp_min(1e-12)
        x_scale = amax / FP8_MAX
        xq = (x2.to(torch.float32) / x_scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale.view(1, -1),
                             out_dtype=x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)


# Linears whose weight dtype the engine reads to pick its compute dtype: they stay unquantised.
DTYPE_PROBES = ("time_embed.mlp.0",)


def default_include(name: str, lin: nn.Linear) -> bool:
    """Which linears become fp8 by default: the big ones. The narrow ends of the head
    (`input_proj` from 32 bits, `final_layer.linear` to 32 bits) and the dtype probes stay in the
    compute dtype."""
    return min(lin.in_features, lin.out_features) >= 64 and not name.endswith(DTYPE_PROBES)


def quantize_linears(module: nn.Module, include: Callable[[str, nn.Linear], bool] | None = None,
                     matmul: str = "dequant") -> list[str]:
    """Swap every selected nn.Linear of `module` for an Fp8Linear, in place (meta modules stay empty).
    Returns the qualified names of the swapped linears."""
    include = include or default_include
    swapped = []
    for name, child in list(module.named_modules()):
        if type(child) is nn.Linear and include(name, child):
            parent_name, _, leaf = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, leaf, Fp8Linear.from_linear(child, matmul=matmul))
            swapped.append(name)
    return swapped


def set_matmul(module: nn.Module, matmul: str) -> None:
    require(matmul in MATMUL_MODES, f"fp8 matmul '{matmul}' unknown; choose one of {MATMUL_MODES}")
    for m in module.modules():
        if isinstance(m, Fp8Linear):
            m.matmul = matmul
            m._scaled_mm_failed = False


def fp8_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers())


# ---- reading fp8 files ----------------------------------------------------------------------

class Fp8Source:
    """A TensorSource seen through the fp8 conventions: the logical keys are the weights (scale and
    auxiliary keys hidden, prefixes stripped); `read` dequantises fp8 tensors, `read_fp8` gives
    (e4m3 weight, [out] scale). Duck-compatible with `checkpoints.check_keys` / `materialize`
    (`shapes`, `origin`, `read`, `close`)."""

    def __init__(self, src: TensorSource, names: dict[str, str] | None = None):
        self.src, self.origin = src, src.origin
        self.all_names = dict(names) if names is not None else {k: k for k in src.shapes}  # logical -> key in file
        self.scale_of: dict[str, str] = {}  # logical weight key -> scale key in file
        hidden = set()
        for k in self.all_names:
            if k in AUX_KEYS or k.endswith(AUX_SUFFIXES):
                hidden.add(k)
                continue
            for suf in SCALE_SUFFIXES:
                if k.endswith(suf):
                    wkey = k[: -len(suf)] + ".weight"
                    if wkey in self.all_names:
                        self.scale_of[wkey] = self.all_names[k]
                        hidden.add(k)
                    break
        self.names = {k: v for k, v in self.all_names.items() if k not in hidden}
        self.shapes = {k: src.shapes[v] for k, v in self.names.items()}

    def keys(self):
        return self.shapes.keys()

    def _raw(self, file_key: str) -> torch.Tensor:
        return self.src.read(file_key, "cpu", None)

    def read(self, key: str, device, dtype) -> torch.Tensor:
        t = self._raw(self.names[key])
        if t.dtype in FP8_DTYPES:
            scale = self._raw(self.scale_of[key]) if key in self.scale_of else None
            t = dequantize_fp8(t, scale, torch.float32)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)

    def read_fp8(self, key: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        """A linear weight as (float8_e4m3fn [out, in], float32 [out]); the bytes of an e4m3 file are kept."""
        t = self._raw(self.names[key])
        if t.dtype == FP8:
            scale = self._raw(self.scale_of[key]) if key in self.scale_of else None
            return t.to(device), per_channel_scale(scale, t.shape[0], f"{self.origin}: '{key}'").to(device)
        q, s = quantize_fp8(self.read(key, "cpu", torch.float32))
        return q.to(device), s.to(device)

    def with_prefix_stripped(self, prefix: str) -> "Fp8Source":
        n = len(prefix)
        return Fp8Source(self.src, {k[n:]: v for k, v in self.all_names.items() if k.startswith(prefix)})

    def subset(self, keep: Callable[[str], bool]) -> "Fp8Source":
        """The weights for which keep(logical key) is true, with their scale siblings."""
        wanted = {k for k in self.names if keep(k)}
        scales = {self.scale_of[k] for k in wanted if k in self.scale_of}
        return Fp8Source(self.src, {k: v for k, v in self.all_names.items() if k in wanted or v in scales})

    def close(self) -> None:
        if hasattr(self.src, "close"):
            self.src.close()


def as_fp8_source(src) -> Fp8Source:
    return src if isinstance(src, Fp8Source) else Fp8Source(src)


def materialize_fp8(module: nn.Module, src, what: str, device, dtype, ignore: Iterable[str] = (),
                    include: Callable[[str, nn.Linear], bool] | None = None, matmul: str = "dequant") -> nn.Module:
    """Like checkpoints.materialize, with the selected linears stored as fp8.

    `module` is built on the meta device with plain nn.Linear layers. The file is checked strictly
    against those (the same keys and shapes as a bf16 load); the selected linears are then swapped for
    Fp8Linear and filled one tensor at a time: an e4m3 tensor with its scale is taken as it is, any other
    is read on the CPU in float32 and quantised there, so only fp8 bytes reach the device."""
    src = as_fp8_source(src)
    check_keys(module, src, what, ignore)
    names = list(module.state_dict().keys())
    swapped = set(quantize_linears(module, include, matmul=matmul))
    for name in names:
        owner, _, leaf = name.rpartition(".")
        if owner in swapped and leaf == "weight":
            q, s = src.read_fp8(name, device)
            lin = module.get_submodule(owner)
            lin.weight = nn.Parameter(q, requires_grad=False)
            lin.weight_scale = s
        else:
            assign(module, name, src.read(name, device, dtype))
    src.close()
    return module.eval()
