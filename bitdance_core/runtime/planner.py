"""Memory planner: the peak device memory of one text-to-image generation, predicted from the
configs, the image size, the batch, the dtype, the weights format (as stored, fp8 or 4-bit) and the
offload mode, and `choose_mode` for "auto".

The prediction adds, per phase, what is alive on the device:
- weights: exact byte counts of the modules built on the meta device (fp8 and Q4_0 linears included), with
  the residency of each offload mode (stage offload replays the policy of `offload.lru_order`;
  streaming counts the resident layers plus the two slots);
- the KV cache [layers, rows, kv_heads, L + (blocks-1)·P, head_dim] x2 and the position table;
- the transient tensors of the largest step of each phase, counted from the engine's code:
  prefill (attention over the prompt with its float mask, or the MLP), one block step (attention
  over the whole cache, repeated for grouped-query heads, or the MLP), one head call, and the
  autoencoder decode (the widest level: group norm, swish and conv outputs, the depth-to-space copy),
  plus, where linears are quantised, the largest one's weight dequantised in the compute dtype (fp8
  and Q4_0 linears widen their weight for each call, one at a time).

`measure_peak` measures the same quantity: CUDA's max_memory_allocated on a GPU, and on the CPU
the allocator's running total from torch.profiler's allocation events (every tensor allocation,
internal ones included), so the planner is checked against the CPU on small models.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import BitDanceError, require
from ..formats import q4
from ..formats.fp8 import Fp8Linear, quantize_linears
from ..models.autoencoder import build_autoencoder
from ..models.head import DiffusionHead
from ..models.projector import Projector
from ..models.qwen3 import Qwen3Backbone
from .offload import MODES, lru_order

GiB = 1 << 30
WEIGHTS = ("as-is", "fp8", "4bit")  # as stored; backbone and head linears fp8; backbone linears Q4_0 + head fp8


def weights_format(weights: str | None, fp8: bool = False) -> str:
    """The weights format from the `weights` name (or the older `fp8` switch)."""
    w = weights or ("fp8" if fp8 else "as-is")
    require(w in WEIGHTS, f"weights '{w}' unknown; choose one of {list(WEIGHTS)}")
    return w


def quantize_meta(backbone: nn.Module, head: nn.Module, weights: str) -> None:
    """Swap the linears of meta modules as the loaders do for `weights` (pipelines/t2i_loading.py)."""
    if weights == "fp8":
        quantize_linears(backbone)
    elif weights == "4bit":
        q4.quantize_linears(backbone)
    if weights in ("fp8", "4bit"):
        quantize_linears(head)


def dequant_elems(module: nn.Module) -> int:
    """Elements of the largest quantised (fp8 or Q4_0) linear weight of `module`: what one call widens."""
    return max((m.in_features * m.out_features for m in module.modules() if isinstance(m, (Fp8Linear, q4.Q4Linear))),
               default=0)


def _esize(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


@dataclass
class ModelSizes:
    """Bytes of each part of a pipeline as stored (dtype, fp8 linears)."""

    embedding: int
    layers: list[int]
    norm: int
    head: int
    projector: int
    decoder: int
    encoder: int
    backbone_dequant: int = 0  # elements of the largest quantised backbone / head weight (0: none)
    head_dequant: int = 0

    @property
    def backbone(self) -> int:
        return self.embedding + sum(self.layers) + self.norm

    @property
    def total(self) -> int:
        return self.backbone + self.head + self.projector + self.decoder + self.encoder

    @classmethod
    def of_pipeline(cls, pipe) -> "ModelSizes":
        m = pipe.backbone.model
        return cls(module_bytes(m.embed_tokens), [module_bytes(l) for l in m.layers], module_bytes(m.norm),
                   module_bytes(pipe.head.net), module_bytes(pipe.projector), module_bytes(pipe.autoencoder.decoder),
                   module_bytes(pipe.autoencoder.encoder), dequant_elems(pipe.backbone), dequant_elems(pipe.head))

    @classmethod
    def from_configs(cls, llm, head, ae, dtype=torch.bfloat16, fp8: bool = False, ae_dtype=None,
                     weights: str | None = None) -> "ModelSizes":
        """Built on the meta device (no memory), with the same fp8 / Q4_0 selection as the loaders
        (weights: "as-is" | "fp8" | "4bit"; fp8=True is weights="fp8")."""
        weights = weights_format(weights, fp8)
        with torch.device("meta"):
            bb, hd, pj = Qwen3Backbone(llm), DiffusionHead(head), Projector(ae.z_channels, llm.hidden_size)
        ae_m = build_autoencoder(ae)
        quantize_meta(bb, hd, weights)

        def nbytes(mod, dt):
            total = 0
            for t in list(mod.parameters()) + list(mod.buffers()):
                if not t.is_floating_point() or t.dtype == torch.float8_e4m3fn or (
                        t.dtype == torch.float32 and _is_scale(mod, t)):
                    total += t.numel() * t.element_size()  # stored as it is: fp8, Q4_0 blocks, fp32 scales
                else:
                    total += t.numel() * _esize(dt)
            return total
        m = bb.model
        return cls(nbytes(m.embed_tokens, dtype), [nbytes(l, dtype) for l in m.layers], nbytes(m.norm, dtype),
                   nbytes(hd.net, dtype), nbytes(pj, dtype), nbytes(ae_m.decoder, ae_dtype or dtype),
                   nbytes(ae_m.encoder, ae_dtype or dtype), dequant_elems(bb), dequant_elems(hd))


def _is_scale(mod, t) -> bool:

    return any(isinstance(m, Fp8Linear) and m.weight_scale is t for m in mod.modules())


@dataclass
class MemoryPlan:
    mode: str
    peak_bytes: int
    phases: dict = field(default_factory=dict)  # phase -> bytes at its peak
    weights_bytes: int = 0  # resident weights at the peak phase
    kv_cache_bytes: int = 0
    resident_layers: int | None = None
    budget_bytes: int | None = None
    fp8: bool = False  # weights == "fp8"
    transfer_bytes: int = 0  # host -> device weight bytes per image (offload cost)
    phase_weights: dict = field(default_factory=dict)  # phase -> resident weight bytes
    weights: str = "as-is"  # "as-is" | "fp8" | "4bit"
    total_layers: int | None = None  # the backbone's layers (resident_layers == total_layers: none streamed)

    def describe(self) -> str:
        ph = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.phases.items())
        extra = f", {self.resident_layers} resident layers" if self.resident_layers is not None else ""
        return (f"{self.mode}{'' if self.weights == 'as-is' else ' ' + self.weights}{extra}: peak {self.peak_bytes / GiB:.2f} GiB "
                f"(weights {self.weights_bytes / GiB:.2f}, KV {self.kv_cache_bytes / GiB:.2f}; phases GiB: {ph}); "
                f"{self.transfer_bytes / GiB:.1f} GiB host->device per generation")


# ---- transient tensors of each phase (counted from the engine's code) -------------------------------

def _rms_peak(n_elems: int, s: int) -> int:
    """RMSNorm of n elements: float32 copy (if not fp32), its square, the normalised float32, the cast, the weighted."""
    return n_elems * (2 * 4 + (4 if s != 4 else 0) + s)


def backbone_forward_peak(llm, rows: int, T: int, S: int, s: int, mask: str, grouped: bool = False) -> int:
    """Largest transient of one backbone forward of T tokens attending to S keys, inputs included.
    mask: 'all' (True), 'bool' (a boolean mask, made float by SDPA: [rows,1,T,S], or [rows,1,1,S]
    when grouped). grouped: a block step (qwen3.grouped_query_attention: the query heads stacked,
    the cache not repeated; q copied once by the reshape).
    Alive throughout: the input embeddings, the boolean mask, cos/sin; in a layer: its input x and
    either the attention tensors (normed h, q, the GQA-repeated k and v over S keys, the float mask,
    the output) or the MLP's (x after attention, normed h, silu(gate), up, their product)."""
    H, I, hd = llm.hidden_size, llm.intermediate_size, llm.head_dim
    nq = llm.num_attention_heads * hd
    rep = llm.num_attention_heads // llm.num_key_value_heads
    x = rows * T * H * s
    q = rows * T * nq * s
    mask_rows = 1 if grouped else T
    outer = x + 2 * rows * T * hd * s + (rows * mask_rows * S if mask == "bool" else 0)
    if grouped and rep > 1:
        kv_rep = q  # the stacked copy of q instead of repeated keys and values
    else:
        kv_rep = 2 * rows * llm.num_attention_heads * S * hd * s if rep > 1 else 0
    mask_f = rows * mask_rows * S * s if mask == "bool" else 0
    attn = x + x + q + kv_rep + mask_f + q
    rope = x + x + q * 3 + q // 2 + rows * T * llm.num_key_value_heads * hd * s
    mlp = 3 * x + 3 * rows * T * I * s
    norm = x + _rms_peak(rows * T * H, s)
    return outer + max(attn, rope, mlp, norm)


def head_forward_peak(head, rows: int, P: int, s: int) -> int:
    """Largest transient of one head call on [rows, P] tokens (condition and noisy input included)."""
    C = head.ch_latent
    tok = rows * P
    base = tok * head.ch_cond * 4 + tok * head.ch_cond * s + 2 * tok * head.ch_target * 4  # cond (fp32 + cast), x, combined
    mods = tok * 6 * C * s  # adaLN modulation of the current group
    y = tok * C * s
    xs = tok * C * s
    hid = int(1.5 * C)
    attn = tok * 3 * C * s + rows * (C // head.head_dim) * P * P * s * 2 + 3 * tok * C * s
    mlp = tok * 2 * hid * s + 2 * tok * hid * s + tok * C * s
    return base + mods + y + 2 * xs + max(attn, mlp)


def decoder_peak(ae, batch: int, height: int, width: int, s: int) -> int:
    """Largest transient of the autoencoder decode, with the dtypes of ae_layers.py: convs in the
    weights' `s` bytes a value, the residual stream in float32 from a level's adaptive norm on (4
    bytes), GroupNorm + swish in float32 a few groups at a time (small). Per level (widest first): a
    ResBlock holds its input and, around a conv, the conv's input, its output and a copy of its input
    (CPU convolutions make one; on a GPU the workspace takes its place): 4 + 3s bytes a value. An
    upsample holds its input, the conv output (4c channels) and the depth-to-space copy. The final
    norm + swish hold the input and the conv's input and its copy at full resolution."""
    f = ae.downsample
    h, w = height // f, width // f
    n = len(ae.ch_mult)
    best = 0
    block_in = ae.ch * ae.ch_mult[-1]
    for i in reversed(range(n)):
        px = batch * (h * 2 ** (n - 1 - i)) * (w * 2 ** (n - 1 - i))
        c = ae.ch * ae.ch_mult[i]
        best = max(best, px * max(block_in, c) * (4 + 3 * s))
        block_in = c
        if i > 0:
            best = max(best, px * c * (4 + 2 * 4 * s))
    top = batch * height * width * ae.ch * ae.ch_mult[0]
    best = max(best, top * (4 + 2 * s))
    return best + batch * height * width * ae.out_ch * s


def kv_cache_bytes(llm, rows: int, max_len: int, s: int) -> int:
    return 2 * llm.num_hidden_layers * rows * llm.num_key_value_heads * max_len * llm.head_dim * s


# ---- the plan -------------------------------------------------------------------------------------------

def estimate(llm, head, ae, height: int, width: int, num_images: int = 1, cfg: float = 7.5, dtype=torch.bfloat16,
             fp8: bool = False, mode: str = "none", resident_layers: int | None = None, budget_bytes: int | None = None,
             prompt_tokens: int = 32, uncond_tokens: int = 3, ae_dtype=None, sizes: ModelSizes | None = None,
             batched_cfg: bool = True, device_type: str = "cuda", weights: str | None = None) -> MemoryPlan:
    """Peak device bytes of `generate` + `decode` for these settings (prompt_tokens: the templated
    cond prompt's length; the official unconditional prompt is 3 tokens; weights: "as-is" | "fp8" |
    "4bit", fp8=True meaning "fp8")."""

    require(mode in MODES, f"offload mode '{mode}' unknown; choose one of {MODES}")
    weights = weights_format(weights, fp8)
    sizes = sizes or ModelSizes.from_configs(llm, head, ae, dtype, ae_dtype=ae_dtype, weights=weights)
    s = _esize(dtype)
    s_ae = _esize(ae_dtype or dtype)
    P = head.parallel_num
    f = ae.downsample
    lat_h, lat_w = height // f, width // f
    n_blocks = lat_h * lat_w // P
    guided = cfg > 1.0
    B = num_images
    R = B * (2 if guided else 1)
    L = max(prompt_tokens, uncond_tokens if guided else 0) + P + 2
    max_len = L + (n_blocks - 1) * P
    groups = [R] if batched_cfg else [B] * (R // B)
    kv = sum(kv_cache_bytes(llm, g, max_len, s) for g in groups)
    H = llm.hidden_size
    pos_table = lat_h * lat_w * H * 4
    hidden = R * P * H * s
    bits = B * lat_h * lat_w * ae.z_channels * 4
    padded = guided and prompt_tokens != uncond_tokens and batched_cfg
    g = max(groups)
    bb_dq, head_dq = sizes.backbone_dequant * s, sizes.head_dequant * s  # a quantised weight widened for its call
    act = {
        "prefill": backbone_forward_peak(llm, g, L, L, s, "bool") + R * L * 8 * 3 + bb_dq,
        "step": hidden + pos_table + backbone_forward_peak(llm, g, P, max_len, s, "bool" if padded else "all", grouped=True)
                + (R * P * H * 4 if s != 4 else 0) + bb_dq,
        "head": hidden + pos_table + head_forward_peak(head, R, P, s) + bits + head_dq,
        "decode": bits + decoder_peak(ae, B, height, width, s_ae),
    }
    if device_type == "cpu":
        # the position table is built in place: the concatenated grid and its block-order copy coexist
        act["head"] = max(act["head"], hidden + 3 * pos_table)

    emb_resident = mode == "none"
    bb = sizes.backbone - (0 if emb_resident else sizes.embedding)
    head_group = sizes.head + sizes.projector
    phase_weights = {}
    transfer = 0
    if mode == "none":
        w = sizes.total
        phase_weights = {k: w for k in act}
    else:
        if mode == "stage":
            gsizes = {"backbone": bb, "head": head_group, "decoder": sizes.decoder}
            calls = ["backbone", "head"] + ["backbone", "head"] * (n_blocks - 1) + ["decoder"]
            fixed = 0
        else:
            n = len(sizes.layers)
            k = n // 2 if resident_layers is None else resident_layers
            resident_layers = k
            slot = max((_aligned(x) for x in sizes.layers[k:]), default=0)
            fixed = sum(sizes.layers[:k]) + sizes.norm + min(2, n - k) * slot
            transfer += sum(sizes.layers[k:]) * (n_blocks if n - k > 2 else 1)
            gsizes = {"head": head_group, "decoder": sizes.decoder}
            calls = ["head"] * n_blocks + ["decoder"]
        order = lru_order(gsizes, budget_bytes, calls)
        loaded, prev = 0, set()
        for gname, res in order:
            if gname not in prev:
                loaded += gsizes[gname]
            prev = res
        transfer += loaded
        phase_of = {"backbone": ["prefill", "step"], "head": ["head"], "decoder": ["decode"]}
        for k in act:
            worst = 0
            for gname, res in order:
                if k in phase_of[gname]:
                    worst = max(worst, sum(gsizes[r] for r in res))
            phase_weights[k] = fixed + worst
    kv_phase = {"prefill": kv, "step": kv, "head": kv, "decode": 0}
    phases = {k: phase_weights[k] + kv_phase[k] + act[k] for k in act}
    peak_phase = max(phases, key=phases.get)
    return MemoryPlan(mode, phases[peak_phase], phases, phase_weights[peak_phase], kv, resident_layers, budget_bytes,
                      weights == "fp8", transfer, phase_weights, weights, len(sizes.layers))


def _aligned(n: int, align: int = 256 * 16) -> int:
    return n + align  # per-tensor 256-byte alignment inside a slot (a few tensors per layer)


def estimate_pipeline(pipe, height: int, width: int, num_images: int = 1, cfg: float = 7.5, mode: str = "none",
                      prompt=None, negative_prompt: str | None = None, **kw) -> MemoryPlan:
    """`estimate` for a loaded pipeline (its configs, its exact weight bytes and the prompt's length;
    prompt: its text or its PromptTokens)."""
    prompt_tokens, uncond = 32, 3
    if prompt is not None:
        pt = prompt if hasattr(prompt, "cond_ids") else pipe.encode_prompt(prompt, negative_prompt)
        prompt_tokens, uncond = len(pt.cond_ids), len(pt.uncond_ids)

    weights = ("4bit" if q4.is_q4(pipe.backbone) else
               "fp8" if any(isinstance(m, Fp8Linear) for m in pipe.backbone.modules()) else "as-is")
    return estimate(pipe.backbone.config, pipe.head.config, pipe.autoencoder.config, height, width, num_images, cfg,
                    dtype=pipe.backbone.dtype, weights=weights, mode=mode, prompt_tokens=prompt_tokens, uncond_tokens=uncond,
                    ae_dtype=pipe.autoencoder.decoder.conv_out.weight.dtype, sizes=ModelSizes.of_pipeline(pipe),
                    device_type=kw.pop("device_type", torch.device(pipe.device).type), **kw)


def usable_bytes(free_bytes: int, margin: float = 0.10, reserve_bytes: int = 512 << 20) -> int:
    """What a plan may use of `free_bytes`: less a safety margin (the prediction is within about
    15%) and a fixed reserve (CUDA context, allocator fragmentation)."""
    return int(free_bytes * (1 - margin)) - reserve_bytes


def _candidate_plans(free_bytes: int, llm, head, ae, height: int, width: int, num_images: int = 1, cfg: float = 7.5,
                     dtype=torch.bfloat16, fp8: bool = False, margin: float = 0.10, reserve_bytes: int = 512 << 20,
                     weights: str | None = None, **kw) -> tuple[int, list[MemoryPlan]]:
    """(usable bytes, the best plan of each kind): no offload; stage offload keeping as many groups
    resident as fit a budget; stage offload keeping the backbone and the head for the whole sampling
    (the autoencoder comes in for the decode only, in place of the backbone); streaming with as many
    resident layers as fit (if none fits: 0 resident layers, for the error message); stage offload
    with one group at a time."""
    usable = usable_bytes(free_bytes, margin, reserve_bytes)
    weights = weights_format(weights, fp8)
    sizes = ModelSizes.from_configs(llm, head, ae, dtype, ae_dtype=kw.get("ae_dtype"), weights=weights)
    common = dict(num_images=num_images, cfg=cfg, dtype=dtype, weights=weights, sizes=sizes, **kw)
    plans = [estimate(llm, head, ae, height, width, mode="none", **common)]
    strict = estimate(llm, head, ae, height, width, mode="stage", budget_bytes=None, **common)
    # stage offload with a budget: the weights may use what the largest transient leaves
    transient = max(strict.phases[k] - strict.phase_weights[k] for k in strict.phases)
    budget = max(0, usable - transient)
    plans.append(estimate(llm, head, ae, height, width, mode="stage", budget_bytes=budget, **common))
    # the sampling's weights exactly: the decoder's load evicts the backbone (least recently used),
    # which comes back for the next image; the token embeddings stay in CPU memory (HostEmbedding)
    sampling = sizes.backbone - sizes.embedding + sizes.head + sizes.projector
    if sampling != budget:
        plans.append(estimate(llm, head, ae, height, width, mode="stage", budget_bytes=sampling, **common))
    n = len(sizes.layers)
    stream = None
    for k in range(n, -1, -1):  # as many resident layers as fit; the head and AE share `budget`, or take turns
        fits = [p for p in (estimate(llm, head, ae, height, width, mode="stream", resident_layers=k, budget_bytes=b, **common)
                            for b in (budget, None)) if p.peak_bytes <= usable]
        if fits:
            stream = fits[0]
            break
    if stream is None:
        stream = estimate(llm, head, ae, height, width, mode="stream", resident_layers=0, budget_bytes=None, **common)
    plans.append(stream)
    plans.append(strict)
    return usable, plans


def choose_mode(free_bytes: int, llm, head, ae, height: int, width: int, num_images: int = 1, cfg: float = 7.5,
                dtype=torch.bfloat16, fp8: bool = False, margin: float = 0.10, reserve_bytes: int = 512 << 20,
                **kw) -> MemoryPlan:
    """The fastest offload plan whose predicted peak fits `free_bytes` less a safety margin:
    no offload; stage offload keeping as many groups resident as fit (the AE comes in only for the
    decode); streaming with as many resident layers as fit; finally one group at a time. Returns
    the plan (plan.mode, plan.resident_layers, plan.budget_bytes); raises if nothing fits."""

    usable, plans = _candidate_plans(free_bytes, llm, head, ae, height, width, num_images, cfg, dtype, fp8, margin,
                                     reserve_bytes, **kw)
    fitting = [p for p in plans if p.peak_bytes <= usable]
    if not fitting:
        best = min(plans, key=lambda p: p.peak_bytes)
        smaller = {"as-is": "fp8 or 4-bit weights, ", "fp8": "4-bit weights, "}.get(best.weights, "")
        raise BitDanceError(f"no offload mode fits {free_bytes / GiB:.1f} GiB free (with a {margin:.0%} margin): the smallest "
                            f"plan needs {best.peak_bytes / GiB:.1f} GiB ({best.describe()}); use {smaller}a smaller "
                            "size or fewer images")
    return _fastest(fitting)


def _fastest(plans: list[MemoryPlan]) -> MemoryPlan:
    return min(plans, key=lambda p: (p.transfer_bytes, p.peak_bytes))


# ---- measuring -----------------------------------------------------------------------------------------

def measure_peak(fn, device="cpu"):
    """(result of fn(), peak bytes allocated on `device` above the level at the start).

    CUDA: torch.cuda.max_memory_allocated. CPU: torch.profiler with profile_memory records every
    allocation and free of the CPU allocator with its running total; the peak of that total."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - start
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    marker_bytes = 7 * 4099  # an allocation of an odd size names the calling thread in the trace
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        marker = torch.empty(marker_bytes, dtype=torch.uint8)
        del marker
        out = fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.start_tid, e.extra_fields.alloc_size, e.extra_fields.ptr))
        stack.extend(e.children)
    events.sort()
    # Only this thread's allocations made inside the window count: the allocator's running total also
    # moves with other threads and with frees of older tensors (garbage from earlier work), which
    # made the figure depend on what ran before.
    tid = next((t for _, t, size, _ in events if size == marker_bytes), None)
    live, total, peak = {}, 0, 0
    for _, t, size, ptr in events:
        if t != tid or abs(size) == marker_bytes:
            continue
        if size > 0:
            live[ptr] = size
            total += size
            peak = max(peak, total)
        elif ptr in live:
            total -= live.pop(ptr)
    return out, peak
