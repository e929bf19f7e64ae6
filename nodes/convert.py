"""Type conversions between the engine's tensors and ComfyUI's (layout and value range only)."""
from __future__ import annotations

import torch
from PIL import Image

from .engine import bd


def pixels_to_image(pixels: torch.Tensor) -> torch.Tensor:
    """Engine pixels [B,3,H,W] about [-1,1] -> ComfyUI IMAGE [B,H,W,3] float 0..1, through the
    official uint8 conversion (so a saved PNG equals the engine CLI's output byte for byte)."""
    return bd.to_uint8(pixels).to(torch.float32) / 255.0


def image_to_pixels(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,C] float 0..1 -> engine pixels [B,C,H,W] in [-1,1]."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4:
        raise bd.BitDanceError(f"image: expected an IMAGE [batch, height, width, channels], got "
                               f"{list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    return image.movedim(-1, 1).to(torch.float32) * 2.0 - 1.0


def pixels_to_pil(pixels: torch.Tensor) -> Image.Image:
    """The first image of an engine pixel batch as a PIL image (for previews)."""
    return Image.fromarray(bd.to_uint8(pixels[:1])[0].numpy())
