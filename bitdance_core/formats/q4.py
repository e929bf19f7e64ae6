"""4-bit weights: GGUF Q4_0 blocks (the `gguf` package's format and quantiser), dequantised per forward.

A Q4_0 block is 32 consecutive weights of one row: an fp16 scale `d` and 32 4-bit codes `q`, two per
byte (the block's first 16 weights in the low nibbles, its last 16 in the high ones); w = (q - 8) * d.
18 bytes per 32 weights: 4.5 bits, 0.5625 bytes per weight. It is the 4-bit type of the GGUF files that
ComfyUI users manage with ComfyUI-GGUF, and the one the `gguf` package can write (its K-quants are
read-only there).

`Q4Linear` keeps a linear's blocks exactly as a GGUF file stores them (`weight`: uint8
[out, in / 32 * 18]) and, per forward, dequantises them in the activations' dtype (one temporary the
size of the weight) for F.linear: ComfyUI-GGUF's way, on any device. Why not a fused int4 kernel:
docs/quantization.md (PyTorch's tinygemm reads the weight once per 16 rows and loses to this at the
128 rows of a BitDance block; the measurements are there). In float32 the forward equals F.linear
with the `gguf` package's own dequantisation bit for bit; in bf16/fp16 the scale is rounded to that
dtype first (relative error <= 2^-9, against ~10% for the 4-bit codes themselves).

Quantising: `quantize_q4_0` (the `gguf` package, on the CPU, from float32), one tensor at a time in
`materialize_q4`, so only the 4-bit bytes reach the device. Files: formats/gguf_file.py.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BitDanceError, require
from .checkpoints import assign, check_keys

BLOCK = 32  # weights per Q4_0 block
BLOCK_BYTES = 18  # fp16 scale + 16 bytes of codes
# Linears whose weight dtype the engine reads to pick its compute dtype: they stay unquantised (as in fp8.py).
DTYPE_PROBES = ("time_embed.mlp.0",)


def gguf_package():
    """The `gguf` package (requirements.txt), or a clear error."""
    try:
        import gguf
    except ImportError as e:
        raise BitDanceError("4-bit weights need the `gguf` package (GGUF files and their Q4_0 quantiser): "
                            "pip install gguf") from e
    return gguf


def block_bytes_shape(out_features: int, in_features: int) -> tuple[int, int]:
    """The shape of a [out, in] weight's Q4_0 blocks: uint8 [out, in / 32 * 18]."""
    return out_features, in_features // BLOCK * BLOCK_BYTES


# ---- the arithmetic -------------------------------------------------------------------------

QUANTIZE_CHUNK = 1 << 19  # weights per call of the gguf quantiser: its numpy temporaries stay in cache


def quantize_q4_0(w: torch.Tensor) -> torch.Tensor:
    """[out, in] float (in a multiple of 32) -> its GGUF Q4_0 blocks, uint8 [out, in / 32 * 18], on the CPU.
    The `gguf` package's quantiser (numpy, float32): the same bytes as a GGUF file made by its tools.

    Rows are quantised in chunks on torch's CPU threads (numpy releases the GIL in its loops; a block
    is 32 weights of one row, so chunks of rows give the same bytes). Measured at Qwen3-14B's linear
    shapes on 2 cores: 45 s for the 40 layers, against 70 s in one call per weight."""
    require(w.dim() == 2 and w.shape[1] % BLOCK == 0,
            f"Q4_0 quantisation takes a 2-D weight whose rows are a multiple of {BLOCK} long, got shape {list(w.shape)}")
    gguf = gguf_package()
    a = w.detach().to("cpu", torch.float32).contiguous().numpy()
    rows = max(1, QUANTIZE_CHUNK // a.shape[1])
    chunks = [a[i:i + rows] for i in range(0, a.shape[0], rows)]

    def quantize(chunk):
        return gguf.quants.quantize(chunk, gguf.GGMLQuantizationType.Q4_0)

    if len(chunks) == 1:
        return torch.from_numpy(quantize(a))
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        return torch.from_numpy(np.concatenate(list(pool.map(quantize, chunks))))


def dequantize_q4_0(blocks: torch.Tensor, in_features: int, dtype=torch.float32) -> torch.Tensor:
    """Q4_0 blocks uint8 [out, in / 32 * 18] -> [out, in] in `dtype`, on the blocks' device.

    Three elementwise passes: the low and the high nibbles straight into the output's two halves of
    each block (cast on the way), then (q - 8) * d as one fused multiply-add. Exact in float32."""
    out_features = blocks.shape[0]
    b = blocks.reshape(-1, BLOCK_BYTES)
    d = b[:, :2].view(torch.float16).to(dtype).unsqueeze(-1)  # [n_blocks, 1, 1]
    qs = b[:, 2:]
    w = torch.empty(b.shape[0], 2, BLOCK // 2, dtype=dtype, device=blocks.device)
    torch.bitwise_and(qs, 0x0F, out=w[:, 0])
    torch.bitwise_right_shift(qs, 4, out=w[:, 1])
    torch.addcmul(d * -8, w, d, out=w)  # q * d - 8 d = (q - 8) d
    return w.reshape(out_features, in_features)


# ---- the layer ------------------------------------------------------------------------------

class Q4Linear(nn.Module):
    """A Linear whose weight is GGUF Q4_0 blocks (uint8 [out, in / 32 * 18]); computed in the input's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, bias_dtype=torch.float32):
        super().__init__()
        require(in_features % BLOCK == 0, f"a Q4_0 linear needs in_features divisible by {BLOCK}, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(block_bytes_shape(out_features, in_features), dtype=torch.uint8,
                                               device=device), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Q4Linear":
        """Quantise an existing Linear (or build an empty one on the meta device)."""
        dev = lin.weight.device
        out = cls(lin.in_features, lin.out_features, lin.bias is not None, device=dev,
                  bias_dtype=lin.bias.dtype if lin.bias is not None else torch.float32)
        if dev.type != "meta":
            out.weight = nn.Parameter(quantize_q4_0(lin.weight).to(dev), requires_grad=False)
            if lin.bias is not None:
                out.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, GGUF Q4_0"

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_q4_0(self.weight, self.in_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if x.is_floating_point() else torch.float32
        w = dequantize_q4_0(self.weight, self.in_features, dtype)
        return F.linear(x.to(dtype), w, None if self.bias is None else self.bias.to(dtype))


def default_include(name: str, lin: nn.Linear) -> bool:
    """Which linears become Q4_0 by default: the big ones whose rows split into whole blocks (the
    dtype probes stay in the compute dtype)."""
    return (min(lin.in_features, lin.out_features) >= 64 and lin.in_features % BLOCK == 0
            and not name.endswith(DTYPE_PROBES))


def quantize_linears(module: nn.Module, include: Callable[[str, nn.Linear], bool] | None = None) -> list[str]:
    """Swap every selected nn.Linear of `module` for a Q4Linear, in place (meta modules stay empty).
    Returns the qualified names of the swapped linears."""
    include = include or default_include
    swapped = []
    for name, child in list(module.named_modules()):
        if type(child) is nn.Linear and include(name, child):
            parent_name, _, leaf = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, leaf, Q4Linear.from_linear(child))
            swapped.append(name)
    return swapped


def read_blocks(src, key: str, shape: tuple[int, int]) -> torch.Tensor:
    """A linear weight as Q4_0 blocks on the CPU: the file's own blocks where it has them
    (`src.read_q4_0`, formats/gguf_file.py), otherwise read in float32 and quantised here."""
    blocks = src.read_q4_0(key) if hasattr(src, "read_q4_0") else None
    if blocks is None:
        blocks = quantize_q4_0(src.read(key, "cpu", torch.float32))
    want = block_bytes_shape(*shape)
    if tuple(blocks.shape) != want:
        raise BitDanceError(f"{src.origin}: '{key}' has Q4_0 blocks of shape {list(blocks.shape)}, expected {list(want)} "
                            f"for a [{shape[0]}, {shape[1]}] weight")
    return blocks


def materialize_q4(module: nn.Module, src, what: str, device, dtype, ignore: Iterable[str] = (),
                   include: Callable[[str, nn.Linear], bool] | None = None) -> nn.Module:
    """Like checkpoints.materialize, with the selected linears stored as Q4_0 blocks.

    `module` is built on the meta device with plain nn.Linear layers; the file is checked strictly
    against those (the same keys and shapes as a bf16 load). The selected linears are then swapped
    for Q4Linear and filled one tensor at a time (blocks from a GGUF file as they are, any other weight
    quantised on the CPU), so only 4-bit bytes reach the device."""
    check_keys(module, src, what, ignore)
    names = list(module.state_dict().keys())
    shapes = {n: tuple(t.shape) for n, t in module.state_dict().items()}
    swapped = set(quantize_linears(module, include))
    for name in names:
        owner, _, leaf = name.rpartition(".")
        if owner in swapped and leaf == "weight":
            blocks = read_blocks(src, name, shapes[name])
            module.get_submodule(owner).weight = nn.Parameter(blocks.to(device), requires_grad=False)
        else:
            assign(module, name, src.read(name, device, dtype))
    src.close()
    return module.eval()


def is_q4(module: nn.Module) -> bool:
    return any(isinstance(m, Q4Linear) for m in module.modules())
