"""Reading weights: strict, lazy, in the requested dtype, straight to the target device.

Modules are built on the meta device (no memory), every expected key is checked against the
file's header (name and shape) before a byte of weight is read, and tensors are then read one
at a time from safetensors and assigned in place. `.pt` files are opened with
`torch.load(weights_only=True)` only.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from ..errors import BitDanceError


@dataclass
class TensorSource:
    """Where each key lives: a safetensors file (read lazily) or an in-memory tensor."""

    files: dict[str, str] = field(default_factory=dict)  # key -> safetensors path
    shapes: dict[str, tuple] = field(default_factory=dict)  # key -> shape
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> tensor (from .pt)
    origin: str = ""  # what to name in error messages
    # key -> its name inside its safetensors file, where the two differ (a renamed view: a prefix
    # stripped, or a tokenizer file's `encoder.*` read as an ImageNet model's `vae.encoder.*`)
    stored: dict[str, str] = field(default_factory=dict)

    def keys(self):
        return self.shapes.keys()

    def read(self, key: str, device, dtype) -> torch.Tensor:
        """One tensor, read straight to `device` (safetensors maps the file), then cast there."""
        if key in self.tensors:
            t = self.tensors[key].to(device)
        else:
            path = self.files[key]
            try:
                t = self._handle(path, device).get_tensor(self.stored_name(key))
            except Exception as e:  # truncated data surfaces here
                raise BitDanceError(f"{path}: cannot read tensor '{key}' ({e}); the file is damaged or incomplete, download it again") from e
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t

    def stored_name(self, key: str) -> str:
        """The name `key` has inside its safetensors file."""
        return self.stored.get(key, key)

    def renamed(self, key: str, new: str, into: "TensorSource") -> None:
        """Put this source's `key` into `into` under the name `new` (its file keeps the name it stores)."""
        into.shapes[new] = self.shapes[key]
        into.files.pop(new, None)
        into.tensors.pop(new, None)
        into.stored.pop(new, None)
        if key in self.files:
            into.files[new] = self.files[key]
            if self.stored_name(key) != new:
                into.stored[new] = self.stored_name(key)
        if key in self.tensors:
            into.tensors[new] = self.tensors[key]

    def _handle(self, path: str, device):
        from safetensors import safe_open

        handles = self.__dict__.setdefault("_handles", {})
        key = (path, str(device))
        if key not in handles:
            handles[key] = safe_open(path, framework="pt", device=str(torch.device(device)))
        return handles[key]

    def close(self) -> None:
        self.__dict__.pop("_handles", None)

    def with_prefix_stripped(self, prefix: str) -> "TensorSource":
        """The keys under `prefix`, renamed without it."""
        out = TensorSource(origin=self.origin)
        for k in self.shapes:
            if k.startswith(prefix):
                self.renamed(k, k[len(prefix):], out)
        return out


def open_safetensors(paths: Iterable[str]) -> TensorSource:
    """Index the headers of one or more safetensors files (no tensor data is read)."""
    from safetensors import safe_open

    src = TensorSource()
    paths = list(paths)
    src.origin = paths[0] if len(paths) == 1 else os.path.dirname(paths[0])
    for path in paths:
        if not os.path.isfile(path):
            raise BitDanceError(f"missing file: {path}")
        header = _check_size(path)
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for k in f.keys():
                    src.files[k] = path
                    src.shapes[k] = tuple(f.get_slice(k).get_shape())
        except BitDanceError:
            raise
        except Exception as e:
            import safetensors

            dtypes = sorted({v.get("dtype", "?") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)})
            raise BitDanceError(f"{path}: safetensors {safetensors.__version__} cannot read it ({e}). Its size is what its "
                                f"header says, so it is not truncated; it holds the dtypes {dtypes}: a newer safetensors "
                                "may read it (pip install -U safetensors), else the file is not a valid safetensors file") from e
    return src


def _check_size(path: str) -> dict:
    """A safetensors file must be exactly header + the data the header describes; returns the header."""
    refuse_stand_in(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise BitDanceError(f"{path}: truncated safetensors file (no header)")
        n = int.from_bytes(head, "little")
        if n > os.path.getsize(path) - 8:
            raise BitDanceError(f"{path}: truncated safetensors file: its header alone would be {n} bytes; download it again")
        try:
            header = json.loads(fh.read(n))
        except Exception as e:
            raise BitDanceError(f"{path}: truncated safetensors header ({e})") from e
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    expected = 8 + n + end
    actual = os.path.getsize(path)
    if actual < expected:
        raise BitDanceError(f"{path}: truncated safetensors file: {actual} bytes, the header describes {expected}; download it again")
    return header


def open_sharded(folder: str, stem: str = "model") -> TensorSource:
    """`model.safetensors`, or the shards listed by `model.safetensors.index.json`."""
    index = os.path.join(folder, f"{stem}.safetensors.index.json")
    single = os.path.join(folder, f"{stem}.safetensors")
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise BitDanceError(f"{index}: expected {{\"weight_map\": {{tensor name: shard file name}}}}")
        shards = sorted(set(weight_map.values()))
        if not shards:
            raise BitDanceError(f"{index}: empty weight_map")
        outside = [s for s in shards if os.path.basename(s) != s]
        if outside:  # shards are files of this folder (as transformers writes them)
            raise BitDanceError(f"{index}: the weight_map names {outside[0]!r}; shards must be file names in {folder}")
        return open_safetensors(os.path.join(folder, s) for s in shards)
    if os.path.isfile(single):
        return open_safetensors([single])
    raise BitDanceError(f"{folder}: no {stem}.safetensors or {stem}.safetensors.index.json (the Qwen3 backbone weights)")


def expected_shapes(module: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def check_keys(module: nn.Module, src: TensorSource, what: str, ignore: Iterable[str] = ()) -> None:
    """Strict key and shape check against the file headers; names the first problems."""
    want = expected_shapes(module)
    ignore = set(ignore)
    missing = [k for k in want if k not in src.shapes]
    unexpected = [k for k in src.shapes if k not in want and k not in ignore]
    wrong = [(k, src.shapes[k], want[k]) for k in want if k in src.shapes and tuple(src.shapes[k]) != want[k]]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}" + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
    for k, got, exp in wrong[:5]:
        problems.append(f"key '{k}' has shape {list(got)}, expected {list(exp)}")
    if problems:
        raise BitDanceError(f"{src.origin}: does not match the {what} config: " + "; ".join(problems))


def materialize(module: nn.Module, src: TensorSource, what: str, device, dtype, ignore: Iterable[str] = (),
                keep_fp32: Callable[[str], bool] | None = None) -> nn.Module:
    """Check strictly, then read each tensor and assign it in place of the meta tensor."""
    check_keys(module, src, what, ignore)
    for name, _ in list(module.state_dict().items()):
        want_dtype = torch.float32 if keep_fp32 is not None and keep_fp32(name) else dtype
        tensor = src.read(name, device, want_dtype)
        assign(module, name, tensor)
    src.close()
    return module.eval()


def assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    owner = module
    for p in path:
        owner = getattr(owner, p)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


def read_json(path: str) -> dict:
    """A JSON object file (a config, an index)."""
    if not os.path.isfile(path):
        raise BitDanceError(f"missing file: {path}")
    try:
        with open(path) as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BitDanceError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise BitDanceError(f"{path}: expected a JSON object {{\"key\": value, ...}}, found a JSON {type(obj).__name__}")
    return obj


# ---- .pt checkpoints (ImageNet release) -------------------------------------------------------

SAFE_GLOBALS = [argparse.Namespace]


def _torch_load(path: str, mmap: bool):
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _refused(path: str, e: Exception) -> BitDanceError:
    """Name what the pickle asked for (e.g. 'GLOBAL io.open'), without torch's advice to load unsafely."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    found = re.search(r"Unsupported global: (GLOBAL [\w.]+)|Unsupported operand[^\n.]*|(unpickling[^\n]*)", text, re.I)
    what = found.group(0) if found else text.strip().split("\n")[0][:200]
    return BitDanceError(
        f"{path}: refused to open: the pickle asks for something other than tensors and plain data ({what}), and "
        "running it could execute arbitrary code. Only weights are loaded (torch.load weights_only=True); use the "
        "official file, or re-save the checkpoint as a plain state dict or as safetensors")


def stand_in_reason(path: str) -> str | None:
    """What a file that should hold weights is instead, when it is one of the stand-ins a failed
    download leaves (a Git LFS pointer, a saved web page, nothing), else None. Read from its first bytes."""
    with open(path, "rb") as fh:
        head = fh.read(1024)
    if not head:
        return "an empty file (0 bytes): download it again"
    if head.startswith(b"version https://git-lfs"):
        size = re.search(rb"\nsize (\d+)", head)
        of = f" to a {int(size.group(1)):,}-byte file" if size else ""
        return (f"a Git LFS pointer{of} ({os.path.getsize(path)} bytes), not the file itself: fetch the file (git lfs pull "
                "in a git clone, or download it with `hf download` or the file's 'resolve' link)")
    start = head.lstrip().lower()
    if start.startswith((b"<!doctype html", b"<html")):
        return ("a web page, not weights: the download saved an HTML page (on Hugging Face, download the file's "
                "'resolve' link or use `hf download`, not the 'blob' page)")
    return None


def refuse_stand_in(path: str) -> None:
    """BitDanceError naming the file when it is a stand-in (`stand_in_reason`)."""
    why = stand_in_reason(path)
    if why is not None:
        raise BitDanceError(f"{path}: {why}")


def load_pt(path: str) -> dict:
    """Open a torch pickle without running code: weights_only=True plus a small allow-list."""
    if not os.path.isfile(path):
        raise BitDanceError(f"missing file: {path}")
    refuse_stand_in(path)  # else an LFS pointer or a web page would be called a code-execution risk
    try:
        try:
            obj = _torch_load(path, mmap=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            obj = _torch_load(path, mmap=False)  # the legacy (non-zip) format cannot be memory-mapped
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) or "weights only" in str(e).lower():
            raise _refused(path, e) from e
        raise BitDanceError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {str(e)[:300]}); "
                            "it is damaged or not a torch file, download it again") from e
    if not isinstance(obj, Mapping):
        raise BitDanceError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return dict(obj)


def source_from_state_dict(sd: Mapping[str, torch.Tensor], origin: str) -> TensorSource:
    src = TensorSource(origin=origin)
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            src.tensors[k] = v
            src.shapes[k] = tuple(v.shape)
    return src
