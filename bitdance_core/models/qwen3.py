"""A Qwen3 decoder of our own, with HF key names and a preallocated KV cache.

Written for BitDance's access pattern: one prefill over the prompt and image prefix, then one
forward per block of P image tokens that attends to the whole cache and bidirectionally inside
the block. The caller passes positions and a boolean mask per row, so rows of one batch may
have different prompt lengths (left padding) and different RoPE offsets.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import flash_attention, sdpa
from ..errors import REQUIRED, BitDanceError, config_value, require

@dataclass
class Qwen3Config:
    vocab_size: int = 151988
    hidden_size: int = 5120
    intermediate_size: int = 17408
    num_hidden_layers: int = 40
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960

    @classmethod
    def from_json(cls, cfg: dict, origin: str = "config.json") -> "Qwen3Config":
        # HF config files carry many generic keys (id2label, return_dict, ...): only the ones that
        # change the architecture are checked; the strict unknown-key check is for the BitDance configs.
        if cfg.get("model_type", "qwen3") != "qwen3":
            raise BitDanceError(f"{origin}: model_type is '{cfg.get('model_type')}', expected 'qwen3'")
        if cfg.get("attention_bias"):
            raise BitDanceError(f"{origin}: attention_bias true is not a BitDance backbone (expected false)")
        if cfg.get("rope_scaling") not in (None, {}):
            raise BitDanceError(f"{origin}: rope_scaling {cfg['rope_scaling']} is not supported (BitDance uses null)")
        if cfg.get("use_sliding_window"):
            raise BitDanceError(f"{origin}: use_sliding_window must be false")

        def get(key, kind, default=REQUIRED):
            return config_value(cfg, key, kind, origin, default)
        rope = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
        theta = get("rope_theta", float, config_value(rope, "rope_theta", float, origin, 1_000_000.0))
        heads, hidden = get("num_attention_heads", int), get("hidden_size", int)
        require(heads >= 1 and hidden >= 1, f"{origin}: hidden_size {hidden} and num_attention_heads {heads} must be positive")
        return cls(vocab_size=get("vocab_size", int), hidden_size=hidden, intermediate_size=get("intermediate_size", int),
                   num_hidden_layers=get("num_hidden_layers", int), num_attention_heads=heads,
                   num_key_value_heads=get("num_key_value_heads", int, heads), head_dim=get("head_dim", int, hidden // heads),
                   rms_norm_eps=get("rms_norm_eps", float, 1e-6), rope_theta=theta,
                   max_position_embeddings=get("max_position_embeddings", int, 40960))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(cfg: Qwen3Config, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, head_dim] for integer positions [B, T] (HF default RoPE, computed in fp32)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(positions.device, torch.float) / dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def grouped_query_attention(q, k, v, key_mask, scale: float, backends=None, native: bool = False):
    """SDPA of q [b, heads, n, d] over k, v [b, kv_heads, S, d] where the `heads // kv_heads` query
    heads sharing a kv head (consecutive, as HF's repeat_kv pairs them) are stacked along the query
    axis instead of repeating the keys and values: the same products, without writing and reading a
    copy of the cache per layer. key_mask: None or [b, 1, 1, S] (the same keys for every query).
    backends: SDPA restricted to these (`attention.sdpa_backends`); native: SDPA's own grouped-query
    support (`enable_gqa`, the same pairing) instead of the stacking."""
    b, h, n, d = q.shape
    kvh = k.shape[1]
    if native:
        return sdpa(q, k, v, backends, attn_mask=key_mask, scale=scale, enable_gqa=h != kvh)
    out = sdpa(q.reshape(b, kvh, (h // kvh) * n, d), k, v, backends, attn_mask=key_mask, scale=scale)
    return out.reshape(b, h, n, d)


class KVCache:
    """Preallocated keys and values [layers, B, kv_heads, max_len, head_dim]."""

    def __init__(self, cfg: Qwen3Config, batch: int, max_len: int, dtype, device):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.flash = None  # flash_attn_func, used only where no mask is needed
        # the block step's attention (issue 11's levers, runtime/levers.py): SDPA backends (None: PyTorch's
        # choice) and the grouped-query layout ("stack": grouped_query_attention's stacking; "native": enable_gqa)
        self.sdpa_backends = None
        self.gqa = "stack"
        self.qkv_proj = None  # q, k and v as one linear (models/fused_linear.py), when fused after loading

    def project(self, x):
        """The q, k and v projections of x (one GEMM when fused: the same rows, concatenated)."""
        if self.qkv_proj is not None:
            c = self.cfg
            return self.qkv_proj(x).split([c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim,
                                           c.num_key_value_heads * c.head_dim], dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def qkv(self, x, cos, sin):
        """q [b, heads, n, hd], k and v [b, kv_heads, n, hd]: projected, normalised, rotated."""
        b, n, _ = x.shape
        hd = self.cfg.head_dim
        q, k, v = self.project(x)
        q = self.q_norm(q.view(b, n, -1, hd)).transpose(1, 2)
        k = self.k_norm(k.view(b, n, -1, hd)).transpose(1, 2)
        v = v.view(b, n, -1, hd).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        # float32 tables (an image step's) rotate in float32, rounded once to the attention's dtype:
        # what SDPA under the official bf16 autocast does with HF Qwen3's float32 rotation
        return (q * c + _rotate_half(q) * s).to(v.dtype), (k * c + _rotate_half(k) * s).to(v.dtype), v

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int, start: int, mask):
        b, n, _ = x.shape
        hd = self.cfg.head_dim
        q, k, v = self.qkv(x, cos, sin)
        if cache is not None:
            cache.k[layer, :, :, start:start + n] = k
            cache.v[layer, :, :, start:start + n] = v
            k = cache.k[layer, :, :, :start + n]
            v = cache.v[layer, :, :, :start + n]
        rep = self.cfg.num_attention_heads // self.cfg.num_key_value_heads
        if self.flash is not None and (mask is None or mask is True):
            out = self.flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=mask is None)
        elif rep > 1 and (mask is True or (mask is not None and mask.shape[-2] == 1)):
            # a block step (every query sees the same keys): grouped, without repeating the cache
            out = grouped_query_attention(q, k, v, None if mask is True else mask, hd ** -0.5, self.sdpa_backends,
                                          self.gqa == "native").transpose(1, 2)
        else:
            if rep > 1:
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
            if mask is None:  # causal over a fresh sequence
                out = F.scaled_dot_product_attention(q, k, v, is_causal=n > 1, scale=hd ** -0.5)
            elif mask is True:  # everything visible
                out = F.scaled_dot_product_attention(q, k, v, scale=hd ** -0.5)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=hd ** -0.5)
            out = out.transpose(1, 2)
        return self.o_proj(out.reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj = None  # gate and up as one linear (models/fused_linear.py), when fused after loading

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache, layer, start, mask):
        dt = self.input_layernorm.weight.dtype  # the compute dtype, where autocast casts a linear's input
        x = x + self.self_attn(self.input_layernorm(x).to(dt), cos, sin, cache, layer, start, mask)
        return x + self.mlp(self.post_attention_layernorm(x).to(dt))


class Embedding(nn.Module):
    """A lookup table. Not nn.Embedding: its init imports torch._dynamo (seconds) even on meta."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim))

    def forward(self, ids):
        return F.embedding(ids, self.weight)


class Qwen3Model(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def residual_dtype(inputs_dtype, model_dtype):
    """The residual stream's dtype: float32 inputs stay float32 (see Qwen3Backbone.forward), any other
    is the model's dtype."""
    return torch.float32 if inputs_dtype == torch.float32 else model_dtype


def residual_input(inputs_embeds: torch.Tensor, model_dtype) -> torch.Tensor:
    return inputs_embeds.to(residual_dtype(inputs_embeds.dtype, model_dtype))


class Qwen3Backbone(nn.Module):
    """Root module so keys read `model.*` as in the released shards (`lm_head` is never loaded)."""

    IGNORED_KEYS = ("lm_head.weight",)

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.config = cfg
        self.model = Qwen3Model(cfg)

    @property
    def dtype(self):
        return self.model.embed_tokens.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def forward(self, inputs_embeds, positions, cache: KVCache | None = None, start: int = 0, mask=None):
        """Hidden states after the final norm. mask: None (causal), True (all visible) or bool [B,1,T,S].
        Float32 inputs (an image step's: projected bits + the float32 position table) keep a float32
        residual stream, RoPE tables and final norm, the linears and attention computing in the
        model's dtype: the official pipeline's dtypes (HF Qwen3 under bf16 autocast); the prompt's
        embeddings run in the model's dtype. With float32 weights nothing changes."""
        x = residual_input(inputs_embeds, self.dtype)
        cos, sin = rope_tables(self.config, positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, cache, i, start, mask)
        return self.model.norm(x)

    def set_attention(self, attention: str) -> None:
        flash = flash_attention(attention)
        for layer in self.model.layers:
            layer.self_attn.flash = flash
