"""The diffusion heads: per-token flow models that turn a backbone hidden state into 32 bits.

`TransformerHead` is the head of the text-to-image models and of the parallel ImageNet models
(attention across the P tokens of a block); `MlpHead` is the head of the 1x ImageNet models.
Key names follow the released files (`net.*`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .attention import flash_attention
from ..errors import BitDanceError, config_value


@dataclass
class HeadConfig:
    ch_target: int = 32
    ch_cond: int = 5120
    ch_latent: int = 5120
    depth_latent: int = 6
    depth_adanln: int = 2
    use_swiglu: bool = True
    parallel_num: int = 64
    time_shift: float = 1.0
    # Training-only options of the released config (kept so configs round-trip).
    grad_checkpointing: bool = False
    time_schedule: str = "logit_normal"
    P_mean: float = 0.0
    P_std: float = 1.0
    diff_batch_mul: int = 1
    # Not in the T2I config file: the family decides them.
    kind: str = "transformer"  # "transformer" or "mlp"
    head_dim: int = 128  # T2I: 128; ImageNet parallel: 64
    sigmoid_output: bool = True  # T2I returns 2*sigmoid(out)-1; ImageNet returns the raw output

    _JSON_KEYS = ("ch_target", "ch_cond", "ch_latent", "depth_latent", "depth_adanln", "use_swiglu", "parallel_num",
                  "time_shift", "grad_checkpointing", "time_schedule", "P_mean", "P_std", "diff_batch_mul")

    @classmethod
    def from_json(cls, cfg: dict, origin: str = "vision_head_config.json") -> "HeadConfig":
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}  # diffusers adds _class_name etc.
        unknown = set(cfg) - set(cls._JSON_KEYS)
        if unknown:
            raise BitDanceError(f"{origin}: unknown config key(s) {sorted(unknown)}; allowed: {list(cls._JSON_KEYS)}")
        for k in ("ch_target", "ch_cond", "ch_latent", "depth_latent", "depth_adanln"):
            if k not in cfg:
                raise BitDanceError(f"{origin}: missing required key '{k}'")
        kinds = {f.name: {"int": int, "float": float, "bool": bool}.get(f.type) for f in fields(cls)}
        out = cls(**{k: config_value(cfg, k, kinds[k], origin) if kinds[k] else cfg[k] for k in cfg})
        if "parallel_num" not in cfg:
            out.parallel_num = 4  # the DiffHead default
        if "use_swiglu" not in cfg:
            out.use_swiglu = False
        out.validate(origin)
        return out

    def validate(self, origin: str = "head config") -> None:
        if self.depth_adanln < 1 or self.depth_latent % max(1, self.depth_latent // self.depth_adanln):
            raise BitDanceError(f"{origin}: depth_latent {self.depth_latent} must be divisible into depth_adanln {self.depth_adanln} groups")
        if self.kind == "transformer" and self.ch_latent % self.head_dim:
            raise BitDanceError(f"{origin}: ch_latent {self.ch_latent} must be a multiple of the head size {self.head_dim}")
        for k in ("ch_target", "ch_cond", "ch_latent", "depth_latent", "parallel_num"):
            if getattr(self, k) < 1:
                raise BitDanceError(f"{origin}: {k} {getattr(self, k)} must be positive")
        side = int(round(math.sqrt(self.parallel_num)))
        if side * side != self.parallel_num:
            raise BitDanceError(f"{origin}: parallel_num {self.parallel_num} must be a square (4, 16, 64)")


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """cos first, then sin, of 1000*t times geometric frequencies (as upstream)."""
    half = dim // 2
    t = 1000.0 * t.float()
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.freq_dim = freq_dim

    def forward(self, t):
        emb = timestep_embedding(t, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def modulate(norm: nn.LayerNorm, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """norm(x) * (1 + scale) + shift as the official code computes it under its bf16 autocast: the
    layer norm in float32 (autocast runs layer_norm so), the modulation promoted to float32 by it,
    rounded once to x's dtype where the next linear takes it. In float32: the plain formula."""
    w, b = norm.weight, norm.bias
    h = F.layer_norm(x.float(), norm.normalized_shape, None if w is None else w.float(), None if b is None else b.float(),
                     norm.eps)
    return (h * (1 + scale) + shift).to(x.dtype)


class FinalLayer(nn.Module):
    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(channels, eps=1e-6, elementwise_affine=False)
        self.ada_ln_modulation = nn.Linear(channels, channels * 2)
        self.linear = nn.Linear(channels, out_channels)

    def forward(self, x, y):
        scale, shift = self.ada_ln_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final, x, scale, shift))


class BlockAttention(nn.Module):
    """Plain softmax attention across the tokens of one block (no positions, not causal)."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.n_head, self.head_dim, self.dim = dim // head_dim, head_dim, dim
        self.scale = head_dim ** -0.5
        self.wqkv = nn.Linear(dim, 3 * dim)
        self.wo = nn.Linear(dim, dim)
        self.fused = False  # T2I with more than 32 tokens: upstream calls flash-attn (we use SDPA or flash)
        self.flash = None

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, self.n_head, self.head_dim) for t in self.wqkv(x).chunk(3, dim=-1))
        if self.fused and n > 32:
            if self.flash is not None:
                out = self.flash(q, k, v, causal=False)
            else:
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            attn = F.softmax((q * self.scale) @ k.transpose(-1, -2), dim=-1)
            out = (attn @ v).transpose(1, 2)
        return self.wo(out.contiguous().view(b, n, self.dim))


class TransBlock(nn.Module):
    def __init__(self, channels: int, head_dim: int, use_swiglu: bool):
        super().__init__()
        hidden = int(channels * 1.5)
        self.norm1 = nn.LayerNorm(channels, eps=1e-6)
        self.attn = BlockAttention(channels, head_dim)
        self.norm2 = nn.LayerNorm(channels, eps=1e-6)
        self.use_swiglu = use_swiglu
        if use_swiglu:
            self.w1 = nn.Linear(channels, hidden * 2)
            self.w2 = nn.Linear(hidden, channels)
        else:
            self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, channels))

    def forward(self, x, scale1, shift1, gate1, scale2, shift2, gate2):
        x = x + self.attn(modulate(self.norm1, x, scale1, shift1)) * gate1
        h = modulate(self.norm2, x, scale2, shift2)
        if self.use_swiglu:
            a, b = self.w1(h).chunk(2, dim=-1)
            h = self.w2(F.silu(a) * b)
        else:
            h = self.mlp(h)
        return x + h * gate2


class MlpBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        hidden = int(channels * 1.5)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.w1 = nn.Linear(channels, hidden * 2)
        self.w2 = nn.Linear(hidden, channels)

    def forward(self, x, scale, shift, gate):
        a, b = self.w1(modulate(self.norm, x, scale, shift)).chunk(2, dim=-1)
        return x + self.w2(F.silu(a) * b) * gate


class HeadNet(nn.Module):
    """x (noisy bits), t (per row), c (backbone hidden state) -> predicted clean bits.

    Of one sampler call's steps, only x and t change: `for_call` returns the net as that call uses
    it, with the condition's embedding made once per call and the time embeddings once per time
    grid (the step cache, on by default: the same operations on the same inputs, so the same bits)."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        C = cfg.ch_latent
        self.cfg = cfg
        self.time_embed = TimestepEmbedder(C)
        self.cond_embed = nn.Linear(cfg.ch_cond, C)
        self.input_proj = nn.Linear(cfg.ch_target, C)
        n_mod = 6 if cfg.kind == "transformer" else 3
        if cfg.kind == "transformer":
            self.res_blocks = nn.ModuleList([TransBlock(C, cfg.head_dim, cfg.use_swiglu) for _ in range(cfg.depth_latent)])
        else:
            self.res_blocks = nn.ModuleList([MlpBlock(C) for _ in range(cfg.depth_latent)])
        self.ada_ln_blocks = nn.ModuleList([nn.Linear(C, C * n_mod) for _ in range(cfg.depth_adanln)])
        self.switch = max(1, cfg.depth_latent // cfg.depth_adanln)
        self.final_layer = FinalLayer(C, cfg.ch_target)
        self.step_cache = True
        self._time_cache = StepTimeCache()

    def embed_time(self, t):
        return self.time_embed(t)

    def embed_cond(self, c):
        return self.cond_embed(c.to(self.input_proj.weight.dtype))

    def forward(self, x, t, c, temb=None, cemb=None):
        """temb, cemb: `embed_time(t)` and `embed_cond(c)` when already made (the step cache)."""
        return self.forward_embedded(x, self.embed_time(t) if temb is None else temb,
                                     self.embed_cond(c) if cemb is None else cemb)

    def forward_embedded(self, x, temb, cemb):
        """The forward from the time and condition embeddings (`embed_time`, `embed_cond`)."""
        x = self.input_proj(x.to(self.input_proj.weight.dtype))
        if x.dim() == 3:
            temb = temb.unsqueeze(1)
        y = F.silu(temb + cemb)
        for i, block in enumerate(self.res_blocks):
            if i % self.switch == 0:
                mods = self.ada_ln_blocks[i // self.switch](y).chunk(6 if self.cfg.kind == "transformer" else 3, dim=-1)
            x = block(x, *mods)
        out = self.final_layer(x, y)
        return 2 * torch.sigmoid(out) - 1 if self.cfg.sigmoid_output else out

    def for_call(self, cond, schedule: tuple):
        """This net as one sampler call on `cond` uses it (models/sampler.py): `schedule` names what
        fixes the call's sequence of times (the sampler, its steps and time parameters)."""
        return CachedCall(self, cond, schedule) if self.step_cache else self


class StepTimeCache:
    """The time embeddings of each time grid, by call index: kept across sampler calls (every block
    of every generation with that grid), for the weights they were made with. A CUDA graph of a
    sampling loop reads them at fixed addresses, so an entry is never replaced while its weights
    stay; when the weights change (moved, loaded, quantised) all entries go, and any graph that read
    them is recaptured anyway (runtime/graphs.py compares the weights' addresses before a replay)."""

    def __init__(self):
        self.weights = None
        self.grids: dict = {}

    def entries(self, net: "HeadNet", key) -> list:
        # what the embedding is made with: the weights (where, what, changed in place: inference tensors,
        # as ComfyUI makes them, keep no version counter) and how each module computes (its kind, an fp8
        # linear's matmul path, a forward replaced by a compiled one)
        weights = tuple((p.data_ptr(), p.dtype, None if p.is_inference() else p._version)
                        for p in net.time_embed.parameters()) + tuple(
            (type(m).__name__, getattr(m, "matmul", None), id(m.__dict__.get("forward"))) for m in net.time_embed.modules())
        if weights != self.weights:
            self.weights, self.grids = weights, {}
        return self.grids.setdefault(key, [])


def _capturing(device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class CachedCall:
    """A HeadNet for the steps of one sampler call: cond_embed(cond) made once; the time embedding
    of the i-th call taken from the net's StepTimeCache (made and kept at its first use, never while
    a CUDA graph is being captured: a captured kernel has not run yet). Every step still goes
    through the net's __call__ (its hooks run as before: stage offload brings the weights in from
    the net's forward pre-hook), which are also run once before the condition is embedded. Calls
    with another condition than the one given run the whole net."""

    def __init__(self, net: HeadNet, cond, schedule: tuple):
        self.net, self.cond, self.i = net, cond, 0
        for key, hook in list(net._forward_pre_hooks.items()):  # the weights where the net's first call would find them
            hook(net, (cond,), {}) if key in net._forward_pre_hooks_with_kwargs else hook(net, (cond,))
        self.cond_emb = net.embed_cond(cond)
        key = (schedule, cond.shape[0], str(cond.device))
        self.times = net._time_cache.entries(net, key)

    def __call__(self, x, t, c):
        if c is not self.cond:
            return self.net(x, t, c)
        if self.i < len(self.times):
            temb = self.times[self.i]
        else:
            temb = self.net.embed_time(t)
            if self.i == len(self.times) and not _capturing(t.device):
                self.times.append(temb)
        self.i += 1
        return self.net(x, t, c, temb=temb, cemb=self.cond_emb)


class DiffusionHead(nn.Module):
    """Holds `net` so the state-dict keys read `net.*` as in the released files."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.config = cfg
        self.net = HeadNet(cfg)

    def set_attention(self, attention: str) -> None:
        """'sdpa' or 'flash' for blocks over 32 tokens (the T2I 64x head), as upstream does."""
        flash = flash_attention(attention)
        for m in self.modules():
            if isinstance(m, BlockAttention):
                m.fused = self.config.sigmoid_output  # ImageNet heads always use the explicit softmax
                m.flash = flash
