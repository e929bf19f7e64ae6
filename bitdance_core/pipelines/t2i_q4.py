"""A model folder's 4-bit backbone file: where it is, writing it once (`convert`), opening it checked.

The file is `<model folder>/backbone-Q4_0.gguf` (both layouts), next to the released weights, so it stays
in ComfyUI's model folder and the loader finds it without a setting. It is a GGUF file (formats/gguf_file.py)
holding the whole Qwen3 backbone under its own key names: the linears as Q4_0 blocks (formats/q4.py),
everything else as stored (the token embeddings and norms in bf16 for the released models). Its metadata
names what it was made from: the backbone config and a fingerprint of the source weights (the SHA-256 of
the final norm's bytes), so a file made from another model is refused with the reason.

Without the file, weights="4bit" quantises the released backbone on load (one tensor at a time); the
result is the same bytes either way.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Callable

import torch
from torch import nn

from ..errors import BitDanceError
from ..formats.checkpoints import check_keys, open_sharded
from ..formats.gguf_file import GGUFSource, write_gguf
from ..formats.q4 import default_include, quantize_q4_0
from ..models.qwen3 import Qwen3Backbone

Q4_FILE = "backbone-Q4_0.gguf"
ARCH = "bitdance"
FORMAT = "bitdance-backbone-q4_0"
FORMAT_VERSION = 1
FINGERPRINT_KEY = "model.norm.weight"
GGUF_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
MOSTLY_Q4_0 = 2  # GGUF general.file_type (llama.cpp's LlamaFileType.MOSTLY_Q4_0)


def q4_file(folder: str) -> str:
    """Where the loader looks for a model folder's 4-bit backbone."""
    return os.path.join(folder, Q4_FILE)


def convert_command(folder: str) -> str:
    return f"python -m bitdance_core convert --model {folder} --weights 4bit"


def _config_json(cfg) -> str:
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


def fingerprint(src) -> str:
    """SHA-256 of the source backbone's final norm weight, as stored (dtype and bytes)."""
    t = src.read(FINGERPRINT_KEY, "cpu", None).contiguous()
    h = hashlib.sha256(str(t.dtype).encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _meta_backbone(llm) -> Qwen3Backbone:
    with torch.device("meta"):
        return Qwen3Backbone(llm)


def quantized_keys(backbone: nn.Module) -> set[str]:
    """The weight keys of the backbone's linears that are stored as Q4_0."""
    return {f"{name}.weight" for name, m in backbone.named_modules()
            if type(m) is nn.Linear and default_include(name, m)}


def _stored_kinds(src, keys) -> dict[str, str]:
    """The GGUF type that keeps each (unquantised) tensor as stored: safetensors header dtypes. An fp8
    tensor (an Fp8Source reads it dequantised) is kept as F32."""
    from safetensors import safe_open

    names = getattr(src, "names", None)  # an Fp8Source: logical key -> key in its file
    base = src.src if names is not None else src
    kinds, handles = {}, {}
    for k in keys:
        file_key = names[k] if names is not None else k
        path = base.files[file_key]
        if path not in handles:
            handles[path] = safe_open(path, framework="pt", device="cpu")
        dt = handles[path].get_slice(base.stored_name(file_key)).get_dtype()
        kinds[k] = {"F32": "F32", "F16": "F16", "BF16": "BF16"}.get(dt, "F32")
    return kinds


def write_q4_gguf(src, llm, name: str, out: str, progress: Callable[[int, int], None] | None = None) -> str:
    """Write the backbone read from `src` (the caller has checked its keys against `llm`'s) as a 4-bit
    GGUF file at `out`. One tensor at a time: the linears quantised to Q4_0 on the
    CPU, the rest copied as stored. Its metadata names `name`, the config and the source's fingerprint."""
    backbone = _meta_backbone(llm)
    shapes = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    q4 = quantized_keys(backbone)
    kinds = _stored_kinds(src, [k for k in shapes if k not in q4])
    entries = [(k, shape, "Q4_0" if k in q4 else kinds[k]) for k, shape in shapes.items()]
    meta = {"general.name": name, "general.file_type": MOSTLY_Q4_0,
            "general.quantization_version": 2, "bitdance.format": FORMAT, "bitdance.format_version": FORMAT_VERSION,
            "bitdance.qwen3_config": _config_json(llm), "bitdance.source_fingerprint": fingerprint(src)}

    def produce(key: str) -> torch.Tensor:
        if key in q4:
            return quantize_q4_0(src.read(key, "cpu", torch.float32))
        return src.read(key, "cpu", None)
    return write_gguf(out, ARCH, meta, entries, produce, progress)


def write_q4_backbone(configs, out: str | None = None, progress: Callable[[int, int], None] | None = None) -> str:
    """Write a model folder's backbone as a 4-bit GGUF file (default: `q4_file(folder)`). Returns the path."""
    src = open_sharded(configs.files.llm_folder)
    check_keys(_meta_backbone(configs.llm), src, "Qwen3 backbone", Qwen3Backbone.IGNORED_KEYS)
    return write_q4_gguf(src, configs.llm, os.path.basename(os.path.normpath(configs.path)),
                         out or q4_file(configs.path), progress)


def check_q4_gguf(path: str, llm, source, here: str, source_what: str, redo: str) -> GGUFSource:
    """The 4-bit backbone file at `path`, checked: its format, that it was made for `llm` (the config of
    `here`: "this folder"), and (when the weights it was made from are at hand: `source`, named
    `source_what`) from those very weights."""
    src = GGUFSource(path)
    redo = f"delete it, or write it again with `{redo}`"
    if src.metadata("bitdance.format") != FORMAT:
        raise BitDanceError(f"{path}: not a BitDance 4-bit backbone file (bitdance.format is "
                            f"{src.metadata('bitdance.format')!r}, expected {FORMAT!r}); {redo}")
    version = src.metadata("bitdance.format_version")
    if version != FORMAT_VERSION:
        raise BitDanceError(f"{path}: format version {version}, this engine reads version {FORMAT_VERSION}; {redo}")
    made_for = src.metadata("bitdance.qwen3_config")
    if made_for != _config_json(llm):
        theirs = json.loads(made_for) if made_for else {}
        ours = dataclasses.asdict(llm)
        diff = [f"{k} {theirs.get(k)} ({here}: {ours[k]})" for k in ours if theirs.get(k) != ours[k]]
        raise BitDanceError(f"{path}: made for another model: {', '.join(diff[:4])}; {redo}")
    if source is not None and FINGERPRINT_KEY in source.shapes:
        if fingerprint(source) != src.metadata("bitdance.source_fingerprint"):
            raise BitDanceError(f"{path}: made from other weights than {source_what}: the fingerprints of "
                                f"'{FINGERPRINT_KEY}' differ; {redo}")
    return src


def open_q4_backbone(configs) -> GGUFSource | None:
    """The folder's 4-bit backbone file, checked against the folder (format, config, the weights it was
    made from when those are on disk); None when there is no such file."""
    path = q4_file(configs.path)
    if not os.path.isfile(path):
        return None
    try:
        folder_src = open_sharded(configs.files.llm_folder)
    except BitDanceError:
        folder_src = None  # only the 4-bit file is left: nothing to compare with
    return check_q4_gguf(path, configs.llm, folder_src, "this folder",
                         f"this folder's backbone ({configs.files.llm_folder})", convert_command(configs.path))


def q4_status(configs) -> str:
    """Where a 4-bit load takes its backbone from, for the loader's decision line."""
    if os.path.isfile(q4_file(configs.path)):
        return f"4-bit backbone from {Q4_FILE}"
    return (f"no {Q4_FILE} yet: the backbone is quantised on load (minutes at 14B); "
            f"`{convert_command(configs.path)}` writes it once")
