"""What fits: how to load a text-to-image model (`plan_for`, the model loader's "auto") and whether
one generation fits the loaded model (`check_generation`, the sampler's check before it starts).

Both ask `planner.estimate` for the peak device memory of the candidate settings and compare it
with the free memory less a safety margin and a fixed reserve.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import BitDanceError, require
from ..formats.fp8_matmul import FP8_TENSOR_CORES, gpu_capability, has_fp8_tensor_cores
from ..pipelines.comfy_split import SplitConfigs, load_split, split_q4_status
from ..pipelines.t2i_loading import T2IConfigs, load_t2i, read_t2i_configs
from ..pipelines.t2i_q4 import q4_status
from .offload import apply_offload
from .planner import (WEIGHTS, GiB, MemoryPlan, _candidate_plans, _esize, _fastest, decoder_peak, estimate,
                      estimate_pipeline, usable_bytes)

WEIGHTS_CHOICES = ("auto",) + WEIGHTS  # auto, as-is, fp8, 4bit
OFFLOAD_CHOICES = ("auto", "none", "stage", "stream")
# "auto" weights, in order of preference: the most precise format that fits without offloading; only
# then the smallest one with offloading (an offload moves weights over the bus every image or every block).
PREFERENCE = ("as-is", "fp8", "4bit")
PREFERENCE_NOTE = ("preference: as stored, then fp8, then 4-bit, each without offloading, then 4-bit with the "
                   "least offloading: moving weights over the bus costs more than the precision")
WEIGHTS_WORDS = {"as-is": "as-is weights", "fp8": "fp8 weights", "4bit": "4-bit weights (backbone GGUF Q4_0, head fp8)"}


@dataclass
class LoadDecision:
    """How to load a text-to-image model: weights ("as-is" | "fp8" | "4bit"), offload ("none" | "stage" |
    "stream") with its parameters, the predicted peak for the planned image, and why."""

    weights: str
    offload: str
    plan: MemoryPlan
    reason: str
    device: str  # device type the model computes on
    free_bytes: int | None
    usable_bytes: int | None  # free less the safety margin and reserve (None on the CPU)
    height: int
    width: int
    num_images: int
    cfg: float
    requested: tuple[str, str] = ("auto", "auto")  # (weights, offload) as asked
    configs: T2IConfigs | SplitConfigs | None = None  # the model's configs, read once and handed on to the load

    @property
    def resident_layers(self) -> int | None:
        return self.plan.resident_layers if self.offload == "stream" else None

    @property
    def budget_bytes(self) -> int | None:
        return self.plan.budget_bytes if self.offload != "none" else None

    def summary(self) -> str:
        """One line for the console."""
        mode = self.offload
        if self.offload == "stream" and self.resident_layers == self.plan.total_layers:
            mode += (f" (all {self.resident_layers} layers resident, token embeddings in CPU memory; the head and the "
                     "autoencoder take turns)")
        elif self.offload == "stream":
            mode += f" ({self.resident_layers} resident layer{'s' if self.resident_layers != 1 else ''})"
        elif self.offload == "stage":
            mode += " (one part at a time)" if self.budget_bytes is None else f" (budget {self.budget_bytes / GiB:.1f} GiB)"
        mem = (f"peak ~{self.plan.peak_bytes / GiB:.1f} GiB of {self.free_bytes / GiB:.1f} GiB free"
               if self.free_bytes is not None else f"peak ~{self.plan.peak_bytes / GiB:.2f} GiB")
        imgs = f"{self.num_images} image{'s' if self.num_images != 1 else ''}"
        return (f"weights {self.weights}, offload {mode}; {mem} on {self.device} (planned for {self.width}x{self.height}, "
                f"{imgs}, cfg {self.cfg:g}): {self.reason}")

    def as_dict(self) -> dict:
        return {"weights": self.weights, "offload": self.offload, "resident_layers": self.resident_layers,
                "budget_bytes": self.budget_bytes, "peak_bytes": self.plan.peak_bytes, "free_bytes": self.free_bytes,
                "usable_bytes": self.usable_bytes, "device": self.device, "height": self.height, "width": self.width,
                "num_images": self.num_images, "cfg": self.cfg, "requested": list(self.requested),
                "reason": self.reason, "summary": self.summary()}


def cap_device_memory(device, cap_bytes: int) -> float:
    """Cap this process's PyTorch allocations on a CUDA device at `cap_bytes`
    (torch.cuda.set_per_process_memory_fraction; an allocation past it raises out-of-memory), to
    play a smaller card on a large one. Returns the fraction set."""
    dev = torch.device(device)
    require(dev.type == "cuda" and torch.cuda.is_available(), "a memory cap needs a CUDA device")
    # set_per_process_memory_fraction takes an index or an indexed device, never a bare "cuda"
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    require(0 < cap_bytes <= total, f"memory cap {cap_bytes / GiB:.1f} GiB: must be above 0 and at most the "
                                    f"device's {total / GiB:.1f} GiB")
    fraction = float(cap_bytes / total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return fraction


def free_device_bytes(device, cap_bytes: int | None = None) -> int:
    """What this process may still allocate on a CUDA device, for `plan_for`: the driver's free
    memory and, under a cap (`cap_device_memory`), at most the cap less what PyTorch's allocator
    already holds (the cap counts reserved memory)."""
    dev = torch.device(device)
    free = torch.cuda.mem_get_info(dev)[0]
    if cap_bytes is not None:
        free = min(free, cap_bytes - torch.cuda.memory_reserved(dev))
    return max(0, int(free))


def fp8_speed_note(capability: tuple[int, int] | None) -> str:
    """Said in the decision line when fp8 weights are chosen on a GPU without fp8 tensor cores."""
    if capability is None or has_fp8_tensor_cores(capability=capability):
        return ""
    cc = f"{capability[0]}.{capability[1]}"
    first = f"{FP8_TENSOR_CORES[0]}.{FP8_TENSOR_CORES[1]}"
    return (f"; this GPU (compute capability {cc}) has no fp8 tensor cores (Ada, {first}, and newer have them): "
            "fp8 weights save memory here, not time (each matmul widens them to 16 bits)")


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def _with(mode: str) -> str:
    return "without offloading" if mode == "none" else f"with {mode} offload"


def plan_for(source, free_bytes: int | None, device="cuda", height: int = 1024, width: int = 1024, num_images: int = 1,
             cfg: float = 7.5, dtype=torch.bfloat16, weights: str = "auto", offload: str = "auto",
             margin: float = 0.10, reserve_bytes: int = 512 << 20, capability: tuple[int, int] | None = None,
             **kw) -> LoadDecision:
    """Decide how to load a text-to-image model so that one generation of `height`x`width`,
    `num_images`, `cfg` fits `free_bytes` of device memory (less `margin` and `reserve_bytes`).

    source: a model folder (only its config files are read, once: the decision carries them on to
    `load_planned`), its T2IConfigs, the ComfyUI split files' SplitConfigs (comfy_split.read_split_configs),
    or (llm, head, ae) configs.
    weights: "auto" | "as-is" | "fp8" | "4bit"; offload: "auto" | "none" | "stage" | "stream".
    capability: the GPU's compute capability (default: asked of the device when it is a CUDA GPU
    here); with fp8 weights on a GPU older than Ada (no fp8 tensor cores), the reason says that fp8
    saves memory there, not time.

    On a GPU, "auto" weights are the first of as-is, fp8, 4-bit that fits without offloading (with
    offload "auto"; an explicit offload mode: with that mode), since a smaller format is faster than
    moving weights over the bus every block; when none does, 4-bit with the fastest offload that fits
    (`choose_mode`'s candidates: the least host-to-device traffic). Explicit choices are kept; raises
    BitDanceError naming what would fit when they (or nothing) fit. On the CPU there is no separate
    device memory: "auto" is as-is weights and no offload (explicit fp8, 4-bit and offload modes still
    work there), and nothing is refused."""
    require(weights in WEIGHTS_CHOICES, f"weights '{weights}' unknown; choose one of {list(WEIGHTS_CHOICES)}")
    require(offload in OFFLOAD_CHOICES, f"offload '{offload}' unknown; choose one of {list(OFFLOAD_CHOICES)}")
    require(isinstance(num_images, int) and num_images >= 1, f"num_images must be an integer >= 1, got {num_images}")
    configs = None
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        name = os.path.basename(os.path.normpath(str(source)))
        configs = read_t2i_configs(str(source))
        llm, head, ae = configs.parts
    elif isinstance(source, T2IConfigs):
        name, configs = os.path.basename(os.path.normpath(source.path)), source
        llm, head, ae = configs.parts
    elif isinstance(source, SplitConfigs):
        name, configs = source.name, source
        llm, head, ae = configs.parts
    else:
        name = "the model"
        llm, head, ae = source
    dev = torch.device(device).type
    args = (llm, head, ae, height, width)
    common = dict(num_images=num_images, cfg=cfg, dtype=dtype, **kw)
    info = dict(device=dev, height=height, width=width, num_images=num_images, cfg=cfg, requested=(weights, offload),
                configs=configs)

    def q4_note(w: str) -> str:
        return _q4_note(w, configs)

    if dev == "cpu":
        w = "as-is" if weights == "auto" else weights
        mode = "none" if offload == "auto" else offload
        plan = estimate(*args, weights=w, mode=mode, device_type="cpu", **common)
        why = ("on the CPU the model runs in system memory: as-is weights, no offload" if (weights, offload) == ("auto", "auto")
               else "as chosen" + (" (auto on the CPU: as-is weights)" if weights == "auto" else "")
               + (" (auto on the CPU: no offload)" if offload == "auto" else "")) + q4_note(w)
        return LoadDecision(w, mode, plan, why, free_bytes=free_bytes, usable_bytes=None, **info)

    require(free_bytes is not None, "free_bytes is needed to plan for a GPU")
    cap = capability if capability is not None else gpu_capability(device)
    decision = _plan_gpu(name, device, llm, head, ae, args, common, info, free_bytes, weights, offload, margin,
                         reserve_bytes, kw)
    if decision.weights == "fp8":
        decision.reason += fp8_speed_note(cap)
    return decision


def _q4_note(w: str, configs) -> str:
    """Where a 4-bit load takes its backbone from, for the decision line."""
    if w != "4bit" or configs is None:
        return ""
    if isinstance(configs, T2IConfigs):
        return f" ({q4_status(configs)})"
    return f" ({split_q4_status(configs.text_encoder)})" if isinstance(configs, SplitConfigs) else ""


def _plan_gpu(name, device, llm, head, ae, args, common, info, free_bytes, weights, offload, margin, reserve_bytes, kw):
    """plan_for on a GPU: the weights/offload choice against `free_bytes` (see plan_for)."""

    def q4_note(w: str) -> str:
        return _q4_note(w, info["configs"])
    height, width = args[3], args[4]
    num_images, cfg, dtype = common["num_images"], common["cfg"], common["dtype"]
    cands = {}  # weights -> (usable, plans)
    for w in (PREFERENCE if weights == "auto" else [weights]):
        cands[w] = _candidate_plans(free_bytes, *args, weights=w, margin=margin, reserve_bytes=reserve_bytes, **common)
    usable = next(iter(cands.values()))[0]

    def best(w, mode):
        """The fastest fitting plan of these weights (and mode, unless 'auto'), or None."""
        plans = [p for p in cands[w][1] if p.peak_bytes <= usable and (mode == "auto" or p.mode == mode)]
        return _fastest(plans) if plans else None

    def smallest(w, mode):
        plans = [p for p in cands[w][1] if mode == "auto" or p.mode == mode]
        return min(plans, key=lambda p: p.peak_bytes)

    fits = f"{_gib(usable)} usable"
    if weights == "auto":
        first_mode = "none" if offload == "auto" else offload
        tried = []
        for w in PREFERENCE:  # the most precise format that fits without offloading (or with the mode asked)
            got = best(w, first_mode)
            if got is not None:
                why = (f"{'; '.join(tried) + ', more than the ' + fits + '; ' if tried else ''}"
                       f"{WEIGHTS_WORDS[w]} fit {_with(first_mode)}" + ("" if tried else f" ({fits})"))
                if tried:
                    why += f" ({PREFERENCE_NOTE})"
                return LoadDecision(w, got.mode, got, why + q4_note(w), free_bytes=free_bytes, usable_bytes=usable,
                                    **info)
            tried.append(f"{WEIGHTS_WORDS[w].split(' (')[0]} need {_gib(smallest(w, first_mode).peak_bytes)} "
                         f"{_with(first_mode)}")
        if offload == "auto":
            for w in reversed(PREFERENCE):  # then the smallest format, with the least offloading that fits
                got = best(w, "auto")
                if got is not None:
                    why = (f"{'; '.join(tried)}, more than the {fits}; {WEIGHTS_WORDS[w]} with {got.mode} offload "
                           f"move the least over the bus ({PREFERENCE_NOTE})")
                    return LoadDecision(w, got.mode, got, why + q4_note(w), free_bytes=free_bytes, usable_bytes=usable,
                                        **info)
    else:
        got = best(weights, offload)
        if got is not None:
            if offload != "auto":
                why = f"as chosen ({fits})"
            elif got.mode == "none":
                why = f"{weights} weights fit without offloading ({fits})"
            else:
                why = (f"{weights} weights need {_gib(smallest(weights, 'none').peak_bytes)} without offloading, more than "
                       f"the {fits}; {got.mode} is the fastest offload that fits")
            return LoadDecision(weights, got.mode, got, why + q4_note(weights), free_bytes=free_bytes,
                                usable_bytes=usable, **info)

    # nothing fits what was asked: say what was needed, and what would fit
    tried = [(w, smallest(w, offload)) for w in cands]
    w_min, p_min = min(tried, key=lambda t: t[1].peak_bytes)
    what = f"one {width}x{height} image" if num_images == 1 else f"{num_images} images of {width}x{height}"
    asked = "" if (weights, offload) == ("auto", "auto") else f" with weights={weights} and offload={offload}"
    msg = (f"{name} does not fit the GPU: {_gib(free_bytes)} free (less a {margin:.0%} margin and "
           f"{reserve_bytes >> 20} MiB reserve: {fits}) for {what} at cfg {cfg:g}; the smallest plan{asked} "
           f"({w_min} weights, {_with(p_min.mode)}) needs {_gib(p_min.peak_bytes)}")
    if (weights, offload) != ("auto", "auto"):
        try:
            alt = plan_for((llm, head, ae), free_bytes, device, height, width, num_images, cfg, dtype, "auto", "auto",
                           margin, reserve_bytes, **kw)
            msg += f". weights={alt.weights} with offload={alt.offload} would fit (or leave both on auto)"
        except BitDanceError:
            msg += ". No setting fits: free GPU memory (close other programs or models)"
    else:
        msg += ". No setting fits: free GPU memory (close other programs or models)"
    raise BitDanceError(msg)


def load_planned(source, decision: LoadDecision, device, dtype=torch.bfloat16, attention: str = "sdpa",
                 pin: bool | None = None):
    """Load a text-to-image model as `decision` says: (pipeline, Offload or None). source: a model
    folder, its T2IConfigs (nothing is read again), or the split files' SplitConfigs. Offloaded models
    are read into CPU memory and get `offload.apply_offload` hooks that bring parts to `device`
    (pin: whether their host copies are page-locked, as apply_offload takes it)."""
    if isinstance(source, T2IConfigs):
        source, decision_configs = source.path, source
    else:
        decision_configs = decision.configs
    if isinstance(source, SplitConfigs):
        def load(dev):
            return load_split(source, device=dev, dtype=dtype, weights=decision.weights, attention=attention)
    else:
        configs = (decision_configs if isinstance(decision_configs, T2IConfigs) and _same_folder(decision_configs, source)
                   else None)

        def load(dev):
            return load_t2i(source, device=dev, dtype=dtype, attention=attention, weights=decision.weights, configs=configs)
    if decision.offload == "none":
        return load(device), None
    pipe = load("cpu")
    off = apply_offload(pipe, decision.offload, device, budget_bytes=decision.budget_bytes,
                        resident_layers=decision.resident_layers, pin=pin)
    return pipe, off


def _same_folder(configs: T2IConfigs, path: str) -> bool:
    """Whether `configs` were read from the model folder `path` (a decision may be reused for another)."""
    return os.path.realpath(configs.path) == os.path.realpath(path)


# ---- before a generation: does it fit the model as loaded? ----------------------------------------------

@dataclass
class GenerationCheck:
    """The loaded model's predicted peak for one generation, against the usable device memory."""

    plan: MemoryPlan
    usable_bytes: int | None  # None on the CPU (nothing is checked there)
    max_images: int | None  # the largest batch of this size that fits as loaded (None on the CPU)
    message: str  # why it does not fit and what would; "" when it fits

    @property
    def fits(self) -> bool:
        return self.usable_bytes is None or self.plan.peak_bytes <= self.usable_bytes

    def whole_preview_fits(self, ae_config, height: int, width: int, dtype) -> bool:
        """Whether a live preview (one image decoded whole in the middle of sampling, the KV cache and
        the head's state alive) fits the usable memory next to the sampling. Not under an offload
        mode: the memory is tight there by choice, and the decoder's weights come in too. When it
        does not fit, a caller shows the tokenizer's linear preview (no GPU memory) or decodes in
        tiles (bounded memory, the same image up to rounding)."""
        if self.usable_bytes is None:
            return True
        if self.plan.mode != "none":
            return False
        one = decoder_peak(ae_config, 1, height, width, _esize(dtype))
        return self.plan.phases["head"] + one <= self.usable_bytes


def images_per_decode(ae_config, height: int, width: int, dtype, free_bytes: int, margin: float = 0.10,
                      reserve_bytes: int = 512 << 20) -> int:
    """How many images of `height`x`width` one autoencoder decode may take in `free_bytes` of device
    memory: the planner's decoder peak per image, against what a plan may use of it (its margin and
    reserve); at least 1. Decoding in chunks changes no pixel (BinaryAutoencoder.decode)."""
    one = decoder_peak(ae_config, 1, height, width, _esize(dtype))
    return max(1, usable_bytes(free_bytes, margin, reserve_bytes) // max(1, one))


def check_generation(pipe, decision: LoadDecision, height: int, width: int, num_images: int, cfg: float,
                     free_bytes: int | None, prompt=None, margin: float = 0.10,
                     reserve_bytes: int = 512 << 20) -> GenerationCheck:
    """Predict the peak of generating `num_images` of `height`x`width` at `cfg` with `pipe` loaded
    as `decision` says (its weights, offload mode, resident layers and budget), and compare it with
    `free_bytes`: the device memory this generation may have, the model's own resident weights
    included. The model loader plans for one 1024x1024 image; this catches a batch or a size that
    the load does not fit, before it runs out of memory half-way. prompt: its PromptTokens (or
    text), for the exact sequence length."""
    on_gpu = decision.device != "cpu"
    kw = dict(mode=decision.offload, resident_layers=decision.resident_layers, budget_bytes=decision.budget_bytes,
              device_type=decision.device)

    def plan(n: int) -> MemoryPlan:
        return estimate_pipeline(pipe, height, width, n, cfg, prompt=prompt, **kw)

    got = plan(num_images)
    if not on_gpu:
        return GenerationCheck(got, None, None, "")
    require(free_bytes is not None, "free_bytes is needed to check a generation on a GPU")
    usable = usable_bytes(free_bytes, margin, reserve_bytes)
    if got.peak_bytes <= usable:
        return GenerationCheck(got, usable, _largest_batch(plan, usable, num_images), "")
    most = _largest_batch(plan, usable, 0)
    what = f"one {width}x{height} image" if num_images == 1 else f"{num_images} images of {width}x{height}"
    mode = decision.offload + (f" ({decision.resident_layers} resident layers)" if decision.offload == "stream" else "")
    msg = (f"{what} at cfg {cfg:g} needs ~{_gib(got.peak_bytes)} of GPU memory with the model as loaded "
           f"({decision.weights} weights, offload {mode}), more than the {_gib(usable)} usable "
           f"({_gib(free_bytes)} free less the margin); ")
    msg += (f"at most {most} image{'s' if most != 1 else ''} of this size fit per batch" if most
            else "not even one image of this size fits as loaded")
    try:
        llm, head, ae = pipe.backbone.config, pipe.head.config, pipe.autoencoder.config
        alt = plan_for((llm, head, ae), free_bytes, decision.device, height, width, num_images, cfg,
                       dtype=pipe.backbone.dtype, margin=margin, reserve_bytes=reserve_bytes)
        msg += (f"; reloading with weights={alt.weights} and offload={alt.offload} would fit "
                "(set the loader's weights/offload; auto plans for one 1024x1024 image)")
    except BitDanceError:
        msg += "; no weights/offload setting fits it: use a smaller size or batch, or free GPU memory"
    return GenerationCheck(got, usable, most, msg)


def _largest_batch(plan, usable: int, at_least: int, limit: int = 64) -> int:
    """The largest batch (up to `limit`) whose plan fits `usable`, knowing `at_least` fits."""
    lo, hi = at_least, limit + 1  # lo fits (or is 0), hi does not (or is past the limit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if plan(mid).peak_bytes <= usable:
            lo = mid
        else:
            hi = mid
    return lo

