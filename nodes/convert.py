"""Type conversions between the engine's tensors and ComfyUI's (the engine does the arithmetic)."""
from __future__ import annotations

import torch
from PIL import Image

from .engine import bd


def pixels_to_image(pixels: torch.Tensor) -> torch.Tensor:
    """Engine pixels [B,3,H,W] -> ComfyUI IMAGE [B,H,W,3] 0..1 (through the official uint8 conversion,
    so a saved PNG equals the engine CLI's output byte for byte)."""
    return bd.to_unit_hwc(pixels)


def image_to_pixels(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,C] 0..1 -> engine pixels [B,C,H,W] in [-1,1]."""
    return bd.from_unit_hwc(image)


def pixels_to_pil(pixels: torch.Tensor) -> Image.Image:
    """The first image of an engine pixel batch as a PIL image (for previews)."""
    return Image.fromarray(bd.to_uint8(pixels[:1])[0].numpy())
