"""Cooperation with comfy.model_management.

Each loaded BitDance model is handed to ComfyUI as a ModelPatcher over its torch modules, so
ComfyUI can move it to the offload device when another model needs the room, and load_models_gpu
brings it back (whole: the engine expects every module on one device) before we sample. Before a
model is read from disk, ComfyUI frees about its size on the target device (for a text-to-image
model: the peak the engine's planner predicts).

A text-to-image model loaded with an engine offload mode (stage / stream) is the exception: it
manages its own GPU residency, and gives it back after each node that used it (see Managed).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

import comfy.model_management as mm
import comfy.model_patcher

from .engine import bd, host_memory_views

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_CHOICES = ["auto", "bf16", "fp16", "fp32"]


def pick_device() -> torch.device:
    return mm.get_torch_device()


def pick_tokenizer_device() -> torch.device:
    """Where a tokenizer loaded on its own runs: ComfyUI's VAE device (the CPU under --cpu-vae)."""
    return mm.vae_device()


def pick_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "auto":
        # bf16 where the GPU has it (the official dtype), else float32: never fp16, in which the official
        # code never runs and Qwen3's activations can overflow (ComfyUI's Qwen-Image is bf16/fp32 only too)
        if device.type != "cpu" and mm.should_use_bf16(device):
            return torch.bfloat16
        return torch.float32
    if choice not in DTYPES:
        raise bd.BitDanceError(f"dtype '{choice}' unknown; choose one of {DTYPE_CHOICES}")
    if device.type == "cpu" and choice == "fp16":
        raise bd.BitDanceError("dtype fp16 is not supported on the CPU; use fp32 or bf16 (or auto)")
    return DTYPES[choice]


def pin_host_copies() -> bool | None:
    """Whether an offloaded model's host copies may be page-locked: not where ComfyUI's own pinning is
    off (--disable-pinned-memory, or a platform it does not pin on: its MAX_PINNED_MEMORY <= 0, e.g.
    a GPU that is not NVIDIA's or AMD's, or an integrated one in newer ComfyUI); otherwise the
    engine's default."""
    from comfy.cli_args import args

    if getattr(args, "disable_pinned_memory", False) or getattr(mm, "MAX_PINNED_MEMORY", 1) <= 0:
        return False
    return None


def size_on_disk(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for d, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(d, f)) for f in files)
    return total


def make_room(path: str, device: torch.device, dtype: torch.dtype, need: int | None = None) -> None:
    """Ask ComfyUI to unload other models until `need` bytes (default: about this model's size) are
    free on `device`."""
    if device.type == "cpu":
        return
    if need is None:
        need = size_on_disk(path)
        if dtype == torch.float32:
            need *= 2  # released weights are bf16 on disk; fp32 doubles them
    mm.free_memory(need, device)
    mm.soft_empty_cache()


def free_memory_for_planning(device: torch.device) -> int:
    """Bytes a model could use on `device`: what is free now, plus what ComfyUI would free by
    unloading the models it holds there, less ComfyUI's reserve for other applications.
    On the CPU: the available system memory (the planner does not offload there)."""
    free = int(mm.get_free_memory(device))
    if device.type == "cpu":
        return free
    freeable = 0
    for loaded in list(getattr(mm, "current_loaded_models", [])):
        try:  # a model whose offload device is this one (--highvram, --gpu-only) frees nothing when unloaded
            if loaded.device == device and loaded.model is not None and loaded.model.offload_device != device:
                freeable += int(loaded.model_loaded_memory())
        except Exception:  # a model being collected, or another ComfyUI's bookkeeping: not counted
            continue
    reserve = int(mm.extra_reserved_memory()) if hasattr(mm, "extra_reserved_memory") else 0
    return max(0, free + freeable - reserve)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:0 are one device when 0 is the current one."""
    if a.type != b.type:
        return False
    if a.index == b.index or a.type == "cpu":
        return True
    current = torch.cuda.current_device() if a.type == "cuda" else 0
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


@dataclass(eq=False)
class Managed:
    """A loaded engine object plus the ModelPatcher ComfyUI manages it through."""

    obj: object  # T2IPipeline, ImageNet pipeline or BinaryAutoencoder
    modules: dict
    device: torch.device  # where it computes
    key: str  # the resolved path: what a conditioning or latent must match
    name: str
    offload: object = None  # the engine's Offload (stage / stream hooks), or None: the model is whole on `device`
    memory: object = None  # the engine's LoadDecision (weights, offload, predicted peak, why), for T2I models
    patcher: comfy.model_patcher.ModelPatcher = field(init=False)

    def __post_init__(self):
        container = torch.nn.ModuleDict({k: m for k, m in self.modules.items() if isinstance(m, torch.nn.Module)})
        # An offloaded model keeps its weights in CPU memory and the engine's hooks copy parts of it
        # to `device` while they compute (stream: some layers stay there). ComfyUI must not move it
        # wholesale: load_models_gpu would .to() every module, i.e. put the whole model on the GPU
        # (what offloading avoids), or pull the hooks' resident parts back to the CPU under them.
        # So its patcher's load_device is the offload device: to ComfyUI it is a model that lives in
        # CPU memory, never loaded onto nor counted against the GPU, and ensure_loaded only makes room
        # for its planned peak. What the hooks hold on the device is given back after each node that
        # used the model (park), so it never blocks another model between runs. (The alternative, a
        # ModelPatcher subclass reporting the hooks' residency, would tie us to ModelPatcher internals
        # that change between ComfyUI versions.)
        load_device = self.device if self.offload is None else mm.unet_offload_device()
        self.patcher = comfy.model_patcher.ModelPatcher(container, load_device=load_device,
                                                        offload_device=mm.unet_offload_device())
        # The engine loaded the weights onto the device itself: registered now, ComfyUI counts them (its
        # free memory, the sampler's fit check) and can unload them before the first generation.
        self.ensure_loaded()

    def host_tensors(self) -> list[torch.Tensor]:
        """The model's tensors in CPU memory, one flat byte view per storage (a packed chunk of host
        copies counts once, in full): an offloaded model's host copies, or a whole model ComfyUI has
        moved to the CPU. Not those still mapped from their file (read in the file's dtype and not
        copied): evicting them frees no memory the system does not already count as available."""
        tensors = list(self.patcher.model.state_dict().values())
        if self.offload is not None:
            tensors += self.offload.host_tensors()
        return host_memory_views(tensors)

    # ComfyUI's RAM caches size a cached output by these (0.3.x --cache-ram: get_ram_usage; newer
    # RAM-pressure caches: _comfy_cache_tensors). Counted as nothing, a 14B model's ~30 GB of host
    # copies would be the last thing evicted under memory pressure.
    def get_ram_usage(self) -> int:
        return sum(t.numel() for t in self.host_tensors())

    def _comfy_cache_tensors(self) -> list[torch.Tensor]:
        return self.host_tensors()

    def free_bytes_for_generation(self) -> int | None:
        """Device bytes a generation may use: what free_memory_for_planning counts, plus what the
        engine's offload hooks hold on the device (ComfyUI does not see those). None on the CPU."""
        if self.device.type == "cpu":
            return None
        held = self.offload.device_bytes() if self.offload is not None else 0
        return free_memory_for_planning(self.device) + held

    def park(self) -> None:
        """After a node has used an offloaded model: the parts its hooks hold on the device go back to
        host memory (ComfyUI cannot unload what it does not see, so another model gets the room); they
        come back by themselves when next used. A whole model is ComfyUI's to unload: nothing here."""
        if self.offload is not None:
            self.offload.park()

    def ensure_loaded(self, plan=None) -> None:
        """Bring the model (whole) onto its device, unloading other models until the generation's
        working memory (plan: its predicted peak; default: the peak planned at load) is free too.
        An offloaded model is not moved: other models are unloaded until the predicted peak, less
        the weights it already holds on the device, is free."""
        plan = plan or (self.memory.plan if self.memory is not None else None)
        if self.offload is None:
            extra = max(0, plan.peak_bytes - plan.weights_bytes) if plan is not None and self.device.type != "cpu" else 0
            mm.load_models_gpu([self.patcher], memory_required=extra, force_full_load=True)
            # Under --novram ComfyUI "loads" a model without moving it; the engine computes with every
            # module on one device, so what ComfyUI left elsewhere comes back here
            if any(not _same_device(t.device, self.device) for t in self.patcher.model.state_dict().values()):
                self.patcher.model.to(self.device)
        elif self.device.type != "cpu" and plan is not None:
            need = max(0, plan.peak_bytes - self.offload.device_bytes())
            mm.free_memory(need + mm.extra_reserved_memory(), self.device)
