"""Pixel conversions between the engine ([B, 3, H, W] about [-1, 1]) and the outside world, and the
file names of a batch of output images."""
from __future__ import annotations

import os

import torch

from ..errors import BitDanceError


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """The official conversion: clamp(127.5*x + 128, 0, 255), truncated; [B,3,H,W] -> [B,H,W,3] uint8."""
    return torch.clamp(127.5 * pixels + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8)


def to_uint8_rounded(pixels: torch.Tensor) -> torch.Tensor:
    """The official evaluation scripts' conversion (torchvision's save_image of clamp(x, -1, 1) * 0.5 + 0.5):
    255 * that + 0.5, clamped, truncated; [B,3,H,W] -> [B,H,W,3] uint8. It rounds where `to_uint8`
    truncates, so the two can differ by one level."""
    unit = pixels.to(torch.float32).clamp(-1, 1) * 0.5 + 0.5
    return unit.mul(255).add_(0.5).clamp_(0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8)


def to_unit_hwc(pixels: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] -> [B,H,W,3] float in 0..1, through the official uint8 conversion (so a saved
    8-bit PNG equals the official output byte for byte)."""
    return to_uint8(pixels).to(torch.float32) / 255.0


def from_unit_hwc(image: torch.Tensor) -> torch.Tensor:
    """[B,H,W,C] float in 0..1 -> [B,C,H,W] in [-1, 1] (what the tokenizer's encoder takes)."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4:
        got = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise BitDanceError(f"image: expected [batch, height, width, channels] in 0..1, got {got}")
    return image.movedim(-1, 1).to(torch.float32) * 2.0 - 1.0


def output_paths(out: str, count: int) -> list[str]:
    """Where `count` images asked for as `out` go: `out` itself for one; OUT_0.png, OUT_1.png, ... for
    several (the CLI and scripts/run_workflow.py both name them so)."""
    if count == 1:
        return [out]
    stem, ext = os.path.splitext(out)
    return [f"{stem}_{i}{ext or '.png'}" for i in range(count)]
