"""Which binary tokenizer a path holds, and loading it: a UniWeTok checkpoint (uniwetok_loading.py) or a
BitDance tokenizer (autoencoder.py: model folders, ae_*.safetensors, ae_*.pt)."""
from __future__ import annotations

import torch

from .autoencoder import BinaryAutoencoder, find_autoencoder_files, load_autoencoder
from .uniwetok_loading import find_uniwetok_files, is_uniwetok_checkpoint, load_uniwetok


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
