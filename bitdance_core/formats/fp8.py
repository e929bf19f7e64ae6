"""fp8 weights: float8_e4m3fn linears with one scale per output channel.

`Fp8Linear` stores `weight` as float8_e4m3fn [out, in] and `weight_scale` float32 [out]
(w ≈ weight * weight_scale[:, None]); its state-dict keys are the ComfyUI ones (`<p>.weight`,
`<p>.weight_scale`). How it multiplies is its `matmul` mode (formats/fp8_matmul.py): weight-only
(the fp8 weight widened: any device, the CPU reference), `torch._scaled_mm` on fp8 activations
scaled per row (eager or compiled), the compiled weight-only GEMM, or torchao's float8 tensor;
"auto" picks the scaled-mm path on GPUs with fp8 tensor cores and the weight-only one elsewhere.
A mode that cannot take an input or fails falls back to weight-only for that layer, which records
why (`last_path`, `matmul_report`).

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
from . import fp8_matmul
from .checkpoints import TensorSource, assign, check_keys
from .fp8_matmul import MATMUL_MODES

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu", "float8_e4m3fnuz",
                                                "float8_e5m2fnuz") if hasattr(torch, n))
# Spellings of a weight's dequantisation scale in fp8 files (x ≈ q * scale), for the weight key `<p>.weight`.
SCALE_SUFFIXES = (".weight_scale", ".weight.scale", ".scale_weight", ".weight_scales")
# Keys that carry no weight: activation scales (of scaled-mm exports, and ComfyUI's older scaled-fp8
# files beside `.scale_weight`), ComfyUI's quantisation metadata.
AUX_SUFFIXES = (".input_scale", ".scale_input", ".comfy_quant")
AUX_KEYS = ("scaled_fp8",)


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
    """Row-wise scaled fp8 matmul on the tensor cores: CUDA compute capability 9.0 or newer
    (H100, H200, B200)."""
    cap = fp8_matmul.gpu_capability(device)
    return hasattr(torch, "_scaled_mm") and cap is not None and cap >= (9, 0)


# ---- the layer ------------------------------------------------------------------------------

class Fp8Linear(nn.Module):
    """A Linear whose weight is float8_e4m3fn with a float32 scale per output channel.

    `matmul` picks the path (formats/fp8_matmul.py: dequant, scaled_mm, scaled_mm_compiled,
    weight_only_compiled, torchao, auto). `last_path` says what the last call ran: the mode, or
    "dequant (why)" when the mode could not take the input or failed (a failed mode is not tried
    again by this layer)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, bias_dtype=torch.float32,
                 matmul: str = "auto"):
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
        self.last_path: str | None = None
        self.failed: dict[str, str] = {}  # mode -> why it failed here
        self._ao = None  # (weight pointer, dtype, torchao tensor): rebuilt when the weight moves (offload)

    @classmethod
    def from_linear(cls, lin: nn.Linear, matmul: str = "auto") -> "Fp8Linear":
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

    def path_for(self, x: torch.Tensor) -> tuple[str, str | None]:
        """(the path this input takes, why not the asked one or None)."""
        mode = fp8_matmul.resolve(self.matmul, x.device)
        why = self.failed.get(mode) or fp8_matmul.unsupported(mode, x, self.in_features, self.out_features)
        return (mode, None) if why is None else ("dequant", why)

    def _run(self, mode: str, x: torch.Tensor) -> torch.Tensor:
        q, s, b = self.weight, self.weight_scale, self.bias
        if mode == "scaled_mm":
            return fp8_matmul.scaled_mm_linear(x, q, s, b)
        if mode in ("scaled_mm_compiled", "weight_only_compiled"):
            return fp8_matmul.compiled(mode)(x, q, s, b)
        if mode == "torchao":
            key = (q.data_ptr(), x.dtype)
            if self._ao is None or self._ao[0] != key:
                self._ao = (key, fp8_matmul.torchao_weight(q, s, x.dtype))
            return F.linear(x, self._ao[1], None if b is None else b.to(x.dtype))
        return fp8_matmul.dequant_linear(x, q, s, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode, why = self.path_for(x)
        if torch.compiler.is_compiling():  # traced into a compiled graph: no bookkeeping, no fallback
            return self._run(mode, x)
        if mode != "dequant":
            try:
                y = self._run(mode, x)
                self.last_path = mode
                return y
            except torch.cuda.OutOfMemoryError:
                raise  # the fallback would need more memory, not less
            except Exception as e:  # an unsupported shape, build or compiler: weight-only fp8 from now on
                if fp8_matmul.capturing():
                    raise  # a failure inside a CUDA-graph capture is the capture's (graphs.py falls back)
                why = f"{mode} failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
                self.failed[mode] = why
        self.last_path = "dequant" if why is None else f"dequant ({why})"
        return fp8_matmul.dequant_linear(x, self.weight, self.weight_scale, self.bias)


# Linears whose weight dtype the engine reads to pick its compute dtype: they stay unquantised.
DTYPE_PROBES = ("time_embed.mlp.0",)


def default_include(name: str, lin: nn.Linear) -> bool:
    """Which linears become fp8 by default: the big ones. The narrow ends of the head
    (`input_proj` from 32 bits, `final_layer.linear` to 32 bits) and the dtype probes stay in the
    compute dtype."""
    return min(lin.in_features, lin.out_features) >= 64 and not name.endswith(DTYPE_PROBES)


def quantize_linears(module: nn.Module, include: Callable[[str, nn.Linear], bool] | None = None,
                     matmul: str = "auto") -> list[str]:
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
    """Switch every Fp8Linear of `module` to `matmul` (and forget earlier failures and paths)."""
    require(matmul in MATMUL_MODES, f"fp8 matmul '{matmul}' unknown; choose one of {list(MATMUL_MODES)}")
    require(matmul != "torchao" or fp8_matmul.torchao_available(),
            "fp8 matmul 'torchao' needs the torchao package (pip install torchao; 0.18 or newer for torch 2.11)")
    for m in module.modules():
        if isinstance(m, Fp8Linear):
            m.matmul = matmul
            m.failed.clear()
            m.last_path = None
            m._ao = None


def matmul_report(*modules: nn.Module) -> dict:
    """What the fp8 linears of `modules` ran on their last call: {"layers": n, "modes": {mode: n},
    "paths": {path: n}} (a path "dequant (why)" is a fallback; "not called" a layer not run yet)."""
    modes, paths, n = {}, {}, 0
    for mod in modules:
        for m in mod.modules():
            if isinstance(m, Fp8Linear):
                n += 1
                modes[m.matmul] = modes.get(m.matmul, 0) + 1
                p = m.last_path or "not called"
                paths[p] = paths.get(p, 0) + 1
    return {"layers": n, "modes": modes, "paths": paths,
            "fallbacks": sum(v for k, v in paths.items() if k.startswith("dequant (")) if n else 0}


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
            if scale is not None and t.dim():  # as read_fp8 reads it: per tensor or per output channel, else refused
                scale = per_channel_scale(scale, t.shape[0], f"{self.origin}: '{self.names[key]}'")
            t = dequantize_fp8(t, scale, torch.float32)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)

    def read_fp8(self, key: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        """A linear weight as (float8_e4m3fn [out, in], float32 [out]); the bytes of an e4m3 file are kept."""
        t = self._raw(self.names[key])
        if t.dtype == FP8:
            scale = self._raw(self.scale_of[key]) if key in self.scale_of else None
            return t.to(device), per_channel_scale(scale, t.shape[0], f"{self.origin}: '{self.names[key]}'").to(device)
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
                    include: Callable[[str, nn.Linear], bool] | None = None, matmul: str = "auto") -> nn.Module:
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
