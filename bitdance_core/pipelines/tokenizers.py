"""Binary tokenizer files: which files make a tokenizer, and loading it.

A model folder (official `ae_config.json` + `ae.safetensors`, or diffusers `autoencoder/`), a
BitDance-Tokenizer `ae_*.safetensors` (config `ae_*_config.json` beside it), an ImageNet `ae_*.pt`,
or a UniWeTok checkpoint (uniwetok_loading.py). `load_tokenizer` picks the kind.
"""
from __future__ import annotations

import os

import torch

from ..errors import BitDanceError
from ..formats.checkpoints import load_pt, materialize, open_safetensors, read_json, source_from_state_dict
from ..models.ae_layers import AutoencoderConfig
from ..models.autoencoder import BinaryAutoencoder, build_autoencoder, config_from_shapes
from .uniwetok_loading import find_uniwetok_files, is_uniwetok_checkpoint, load_uniwetok


def find_autoencoder_files(path: str) -> tuple[str | None, str]:
    """(config json or None, weights) for a model folder, a diffusers folder, a BitDance-Tokenizer
    `ae_*.safetensors` (config `ae_*_config.json` beside it) or an ImageNet `ae_*.pt`.
    Without a config file the ddconfig is read from the tensor shapes."""
    if os.path.isdir(path):
        for cfg, w in (("ae_config.json", "ae.safetensors"),
                       (os.path.join("autoencoder", "config.json"), os.path.join("autoencoder", "diffusion_pytorch_model.safetensors"))):
            if os.path.isfile(os.path.join(path, cfg)):
                return os.path.join(path, cfg), os.path.join(path, w)
        raise BitDanceError(f"{path}: no ae_config.json (official layout) or autoencoder/config.json (diffusers layout)")
    stem, ext = os.path.splitext(path)
    if ext in (".safetensors", ".pt", ".pth", ".ckpt"):
        if not os.path.isfile(path):
            raise BitDanceError(f"missing file: {path}")
        for cfg in (stem + "_config.json", os.path.join(os.path.dirname(path), "ae_config.json")):
            if os.path.isfile(cfg):
                return cfg, path
        return None, path
    raise BitDanceError(f"{path}: expected a folder with ae_config.json, an ae_*.safetensors file or an ae_*.pt file")


def tokenizer_source(path: str):
    """The bare `encoder.*` / `decoder.*` tensors of a tokenizer file (safetensors or .pt)."""
    if path.endswith(".safetensors"):
        src = open_safetensors([path])
    else:
        obj = load_pt(path)
        sd = next((obj[k] for k in ("state_dict", "ema", "model") if isinstance(obj.get(k), dict)), obj)
        src = source_from_state_dict(sd, path)
    for prefix in ("vae.", "runtime_model.", "autoencoder."):  # a whole ImageNet model, or a diffusers wrapper
        if not any(k.startswith(("encoder.", "decoder.")) for k in src.keys()) and any(k.startswith(prefix) for k in src.keys()):
            src = src.with_prefix_stripped(prefix)
    # .pt: like the official loader (strict=False for ae_*.pt), keys outside encoder/decoder are not
    # ours and are left alone; safetensors files are checked strictly.
    extra = [] if path.endswith(".safetensors") else [k for k in src.keys() if not k.startswith(("encoder.", "decoder."))]
    return src, extra


def load_autoencoder(path: str, device="cpu", dtype=torch.float32) -> BinaryAutoencoder:
    cfg_path, weights = find_autoencoder_files(path)
    src, extra = tokenizer_source(weights)
    if cfg_path is not None:
        cfg = AutoencoderConfig.from_json(read_json(cfg_path), cfg_path)
    else:
        cfg = config_from_shapes(src.shapes, weights)
    ae = build_autoencoder(cfg)
    return materialize(ae, src, "autoencoder", device, dtype, ignore=extra)


def find_tokenizer_files(path: str) -> tuple[str | None, str]:
    """(config json or None, weights) of either kind; BitDanceError when `path` holds no tokenizer."""
    if is_uniwetok_checkpoint(path, open_if_needed=True):
        return find_uniwetok_files(path)
    return find_autoencoder_files(path)


def load_tokenizer(path: str, device="cpu", dtype=torch.float32) -> BinaryAutoencoder:
    """A BinaryAutoencoder (a UniWeTok is one too): encode(images) -> bits, decode(bits, generator) -> images."""
    if is_uniwetok_checkpoint(path, open_if_needed=True):
        return load_uniwetok(path, device=device, dtype=dtype)
    return load_autoencoder(path, device=device, dtype=dtype)
