"""Cooperation with comfy.model_management.

Each loaded BitDance model is handed to ComfyUI as a ModelPatcher over its torch modules, so
ComfyUI can move it to the offload device when another model needs the room, and load_models_gpu
brings it back (whole: the engine expects every module on one device) before we sample. Before a
model is read from disk, ComfyUI frees about its size on the target device.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

import comfy.model_management as mm
import comfy.model_patcher

from .engine import bd

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_CHOICES = ["auto", "bf16", "fp16", "fp32"]


def pick_device() -> torch.device:
    return mm.get_torch_device()


def pick_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "auto":
        if device.type == "cpu":
            return torch.float32
        if mm.should_use_bf16(device):
            return torch.bfloat16
        if mm.should_use_fp16(device):
            return torch.float16
        return torch.float32
    if choice not in DTYPES:
        raise bd.BitDanceError(f"dtype '{choice}' unknown; choose one of {DTYPE_CHOICES}")
    if device.type == "cpu" and choice == "fp16":
        raise bd.BitDanceError("dtype fp16 is not supported on the CPU; use fp32 or bf16 (or auto)")
    return DTYPES[choice]


def size_on_disk(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for d, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(d, f)) for f in files)
    return total


def make_room(path: str, device: torch.device, dtype: torch.dtype) -> None:
    """Ask ComfyUI to unload other models until about this model's size is free on `device`."""
    if device.type == "cpu":
        return
    need = size_on_disk(path)
    if dtype == torch.float32:
        need *= 2  # released weights are bf16 on disk; fp32 doubles them
    mm.free_memory(need, device)
    mm.soft_empty_cache()


@dataclass(eq=False)
class Managed:
    """A loaded engine object plus the ModelPatcher ComfyUI manages it through."""

    obj: object  # T2IPipeline, ImageNet pipeline or BinaryAutoencoder
    modules: dict
    device: torch.device
    key: str  # the resolved path: what a conditioning or latent must match
    name: str
    patcher: comfy.model_patcher.ModelPatcher = field(init=False)

    def __post_init__(self):
        container = torch.nn.ModuleDict({k: m for k, m in self.modules.items() if isinstance(m, torch.nn.Module)})
        self.patcher = comfy.model_patcher.ModelPatcher(container, load_device=self.device,
                                                        offload_device=mm.unet_offload_device())

    def ensure_loaded(self) -> None:
        """Bring the model (whole) onto its device, unloading others if needed."""
        mm.load_models_gpu([self.patcher], force_full_load=True)
