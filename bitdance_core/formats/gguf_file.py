"""GGUF files through the `gguf` package: a lazy tensor source for reading, and a streamed writer.

`GGUFSource` is duck-compatible with checkpoints.TensorSource (`shapes`, `origin`, `read`, `close`), so
the strict key/shape check and the materialisers work on it unchanged. Its logical shapes are PyTorch's
([out, in]; GGUF lists dimensions innermost first). `read` gives float tensors (F32, F16 and BF16 as
stored, any quantised type through the package's dequantiser); `read_q4_0` gives a Q4_0 tensor's blocks
as they are (formats/q4.py). The file is memory-mapped: nothing is read until a tensor is asked for.

`write_gguf` writes the header first and then one tensor at a time, each computed only when its turn
comes, into `<path>.partial`, renamed to `path` when complete (an interrupted write never leaves a
file that looks finished).
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

import numpy as np
import torch

from ..errors import BitDanceError
from .checkpoints import refuse_stand_in
from .q4 import gguf_package

FLOAT_KINDS = ("F32", "F16", "BF16")
WRITABLE_KINDS = FLOAT_KINDS + ("Q4_0",)


class GGUFSource:
    """The tensors of one .gguf file (read lazily) and its metadata."""

    def __init__(self, path: str):
        gguf = gguf_package()
        if not os.path.isfile(path):
            raise BitDanceError(f"missing file: {path}")
        refuse_stand_in(path)
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as e:  # bad magic, truncated header or tensor data past the end
            raise BitDanceError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); it is damaged or "
                                "incomplete: delete it and write it again") from e
        self.origin = path
        self._types = gguf.GGMLQuantizationType
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.shapes = {name: tuple(int(x) for x in reversed(t.shape.tolist())) for name, t in self.tensors.items()}

    def keys(self):
        return self.shapes.keys()

    def kind(self, key: str) -> str:
        """The tensor's GGML type name: 'BF16', 'F32', 'Q4_0', ..."""
        return self.tensors[key].tensor_type.name

    def metadata(self, key: str, default=None):
        """A scalar or string metadata value (read from the field's parts: the same in every gguf version)."""
        field = self.reader.get_field(key)
        if field is None or not field.data:
            return default
        value = field.parts[field.data[0]]
        if field.types and field.types[0].name == "STRING":
            return bytes(value).decode("utf-8")
        return value.tolist()[0]

    def read(self, key: str, device, dtype) -> torch.Tensor:
        t = self.tensors[key]
        kind = t.tensor_type.name
        shape = self.shapes[key]
        try:
            if kind in ("F32", "F16"):
                out = torch.from_numpy(np.array(t.data)).reshape(shape)
            elif kind == "BF16":
                out = torch.from_numpy(np.array(t.data)).view(torch.bfloat16).reshape(shape)
            else:  # a quantised type: the package's own dequantisation, in float32
                out = torch.from_numpy(gguf_package().quants.dequantize(t.data, t.tensor_type)).reshape(shape)
        except NotImplementedError as e:
            raise BitDanceError(f"{self.origin}: tensor '{key}' is stored as {kind}, which the gguf package cannot "
                                "dequantise") from e
        if dtype is not None and out.dtype != dtype:
            out = out.to(dtype)
        return out.to(device)

    def read_q4_0(self, key: str) -> torch.Tensor | None:
        """A Q4_0 tensor's blocks (uint8 [out, in / 32 * 18], CPU); None for a float tensor (to be quantised)."""
        t = self.tensors[key]
        kind = t.tensor_type.name
        if kind == "Q4_0":
            return torch.from_numpy(np.array(t.data))
        if kind in FLOAT_KINDS:
            return None
        raise BitDanceError(f"{self.origin}: tensor '{key}' is stored as {kind}; the 4-bit weights are GGUF Q4_0 "
                            "(or a float type, quantised on load). Write the file again from the model's own weights")

    def close(self) -> None:
        pass  # the memory map goes with the reader; a source is closed by dropping it


def write_gguf(path: str, arch: str, metadata: dict, tensors: Iterable[tuple[str, tuple, str]],
               produce: Callable[[str], torch.Tensor], progress: Callable[[int, int], None] | None = None) -> str:
    """Write a GGUF file: `metadata` (str, int, float or bool values), then `tensors` in order, each
    (name, PyTorch shape, kind in F32/F16/BF16/Q4_0) with its data from `produce(name)` (a float tensor
    of that dtype, or a Q4_0 tensor's uint8 blocks), asked for one at a time. Returns `path`."""
    gguf = gguf_package()
    types = gguf.GGMLQuantizationType
    tensors = list(tensors)
    tmp = path + ".partial"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    w = gguf.GGUFWriter(tmp, arch)
    try:
        for key, value in metadata.items():
            if isinstance(value, bool):
                w.add_bool(key, value)
            elif isinstance(value, int):
                w.add_uint64(key, value)
            elif isinstance(value, float):
                w.add_float64(key, value)
            else:
                w.add_string(key, str(value))
        for name, shape, kind in tensors:
            if kind not in WRITABLE_KINDS:
                raise BitDanceError(f"cannot write '{name}' as {kind}: one of {list(WRITABLE_KINDS)}")
            qtype = getattr(types, kind)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n = int(np.prod(shape)) if shape else 1
            nbytes = n * type_size // block
            byte_shape = (*shape[:-1], shape[-1] * type_size // block)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, (name, shape, kind) in enumerate(tensors):
            t = produce(name).detach().to("cpu").contiguous()
            want = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "Q4_0": torch.uint8}[kind]
            if t.dtype != want:
                raise BitDanceError(f"'{name}': got {t.dtype} data for a {kind} tensor")
            w.write_tensor_data(t.reshape(-1).view(torch.uint8).numpy())
            if progress is not None:
                progress(i + 1, len(tensors))
        w.close()
        os.replace(tmp, path)  # inside the try: a failed rename (say, onto a folder) leaves no .partial behind
    except BaseException:
        w.close()  # closing twice is harmless (GGUFWriter.close checks)
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
