"""ImageNet class-conditional BitDance: the network (backbone, head, tokenizer) and its KV cache.

Key names follow the released `.pt` files (`ema` state dict, `vae.*` included). The backbone is a
pre-norm transformer (RMSNorm, SwiGLU) over [class tokens | query tokens | image tokens] with 2D RoPE
on interleaved pairs; class and query tokens sit at the origin (no rotation). 1x models predict one
token per step (raster order, MLP head); 4x/16x models predict a p x p block per step (block order,
transformer head), block-causal: each block sees itself and everything before it.
The sampling loop and loading live in pipelines/imagenet.py.

Dtypes follow the official sampler, which runs the float32 model under bf16 autocast: in a bf16
load the linears are bf16 (their inputs cast to them), while the norms, the class and query
embeddings and the head's position table stay float32 (float32_names), so the residual stream is
float32 (a float32 input plus a bf16 branch) and so is the head's condition. With float32 weights
every step is float32, as before.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .autoencoder import BinaryAutoencoder
from .head import DiffusionHead
from .imagenet_config import ImageNetConfig


def float32_names(model: nn.Module) -> set[str]:
    """The parameters a bf16 load keeps in float32, as the official float32 model has them under
    autocast (which casts only what its bf16 ops read): the weights of every norm (the backbone's
    RMSNorms, the head's LayerNorms, the tokenizer's GroupNorms), the class and query embeddings and
    the head's position table."""
    names = {"cls_embedding.weight", "query_token", "pos_for_diff.weight"}
    for owner, module in model.named_modules():
        if isinstance(module, (RMSNorm, nn.LayerNorm, nn.GroupNorm)):
            names |= {f"{owner}.{p}" for p, _ in module.named_parameters(recurse=False)}
    return names


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        """In the weight's dtype: a bf16 input (proj_in's output) to a float32 norm gives float32."""
        return F.rms_norm(x.to(self.weight.dtype), (x.shape[-1],), self.weight, self.eps)


class SwiGLU(nn.Module):
    """w2(silu(a) * b) with (a, b) = w1(x).chunk(2): the feed-forward (no bias) and proj_in (bias)."""

    def __init__(self, cin: int, hidden: int, cout: int, bias: bool):
        super().__init__()
        self.w1 = nn.Linear(cin, 2 * hidden, bias=bias)
        self.w2 = nn.Linear(hidden, cout, bias=bias)

    def forward(self, x):
        a, b = self.w1(x.to(self.w1.weight.dtype)).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)


class Embedding(nn.Module):
    """nn.Embedding's keys and lookup without its random init (normal_ on the meta device imports
    torch._dynamo, which costs seconds)."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim))

    def forward(self, ids):
        return F.embedding(ids, self.weight)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2j, 2j+1) of x [B, T, H, D] by table [T, D/2, (cos, sin)], in float32."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    t = table.view(1, xs.shape[1], 1, xs.shape[3], 2)
    cos, sin = t[..., 0], t[..., 1]
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], dim=-1)
    return out.flatten(3).type_as(x)


class KVCache:
    """Preallocated keys and values [layers, B, heads, tokens, head_dim]."""

    def __init__(self, cfg: ImageNetConfig, batch: int, length: int, dtype, device):
        shape = (cfg.n_layer, batch, cfg.n_head, length, cfg.dim // cfg.n_head)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int):
        super().__init__()
        self.n_head, self.head_dim, self.dim = n_head, dim // n_head, dim
        self.scale = self.head_dim ** -0.5
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x, rope, cache: KVCache, layer: int, start: int, mask):
        b, n, _ = x.shape
        qkv = self.wqkv(x.to(self.wqkv.weight.dtype))
        q, k, v = (t.view(b, n, self.n_head, self.head_dim) for t in qkv.chunk(3, dim=-1))
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cache.k[layer, :, :, start:start + n] = k
        cache.v[layer, :, :, start:start + n] = v
        keys, values = cache.k[layer, :, :, :start + n], cache.v[layer, :, :, :start + n]
        # Explicit softmax attention, as upstream (its numerics decide the signs of the bits).
        attn = (q * self.scale) @ keys.transpose(-1, -2)
        if mask is not None:
            attn = attn.masked_fill(~mask, float("-inf"))
        out = (torch.softmax(attn, dim=-1) @ values).transpose(1, 2).contiguous()
        return self.wo(out.view(b, n, self.dim))


class Block(nn.Module):
    def __init__(self, cfg: ImageNetConfig):
        super().__init__()
        self.attention = Attention(cfg.dim, cfg.n_head)
        self.feed_forward = SwiGLU(cfg.dim, cfg.ffn_hidden, cfg.dim, bias=False)
        self.attention_norm = RMSNorm(cfg.dim)
        self.ffn_norm = RMSNorm(cfg.dim)

    def forward(self, x, rope, cache, layer, start, mask):
        # the sums promote: a float32 stream stays float32 beside the bf16 branches
        h = x + self.attention(self.attention_norm(x), rope, cache, layer, start, mask)
        return h + self.feed_forward(self.ffn_norm(h))


def rope_table(cfg: ImageNetConfig, device=None) -> torch.Tensor:
    """[cls + P - 1 + tokens - P, head_dim/2, 2] in sequence order: zeros (identity) for the class and
    query tokens, then image tokens at (column + 1.5, row + 1.5), x angles first, then y angles."""
    g, half = cfg.grid, (cfg.dim // cfg.n_head) // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    centers = torch.arange(g, dtype=torch.float32) + 0.5
    gy, gx = torch.meshgrid(centers, centers, indexing="ij")
    t = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1) + 1.0
    t = torch.cat([torch.zeros(cfg.cls_token_num + cfg.parallel_num - 1, 2), t])
    ang = torch.outer(t.flatten(), freqs).view(t.shape[0], -1)
    table = torch.stack([torch.cos(ang), torch.sin(ang)], dim=-1)
    if cfg.parallel_mode == "patch" and cfg.parallel_num > 1:
        table[-g * g:] = raster_to_block_rows(table[-g * g:], g, cfg.block_side)
    return table[:-cfg.parallel_num].to(device)


def raster_to_block_rows(x: torch.Tensor, g: int, p: int) -> torch.Tensor:
    """Rows of a g x g raster grid reordered block by block (p x p blocks, row-major inside)."""
    rest = x.shape[1:]
    return x.reshape(g // p, p, g // p, p, -1).permute(0, 2, 1, 3, 4).reshape(g * g, *rest)


def first_step_mask(cfg: ImageNetConfig, device) -> torch.Tensor:
    """[1, 1, L, L] bool for the class tokens and queries: causal, except that the last class token and
    the P-1 queries (the first block) see each other."""
    n, c = cfg.cls_token_num + cfg.parallel_num - 1, cfg.cls_token_num - 1
    i = torch.arange(n, device=device)
    ok = (i[None, :] <= i[:, None]) | ((i[:, None] >= c) & (i[None, :] >= c))
    return ok[None, None]


class ImageNetModel(nn.Module):
    def __init__(self, cfg: ImageNetConfig):
        super().__init__()
        self.config = cfg
        if cfg.parallel_num > 1:
            self.query_token = nn.Parameter(torch.zeros(1, cfg.parallel_num - 1, cfg.dim))
        self.vae = BinaryAutoencoder(cfg.ae)
        self.cls_embedding = Embedding(cfg.num_classes + 1, cfg.dim * cfg.cls_token_num)
        self.proj_in = SwiGLU(cfg.token_dim, int(1.5 * cfg.dim), cfg.dim, bias=True)
        self.emb_norm = RMSNorm(cfg.dim)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.dim)
        self.pos_for_diff = Embedding(cfg.grid * cfg.grid, cfg.dim)
        self.head = DiffusionHead(cfg.head_config())
        self._rope = None

    @property
    def dtype(self):
        """The compute dtype: the linears' (the norms may be float32 beside bf16 linears)."""
        return self.proj_in.w1.weight.dtype

    def rope(self, device) -> torch.Tensor:
        if self._rope is None or self._rope.device != torch.device(device):
            self._rope = rope_table(self.config, device)
        return self._rope

    def forward_tokens(self, x, cache: KVCache, start: int, mask=None) -> torch.Tensor:
        """Run tokens x [B, n, dim] at sequence positions start..start+n-1; final-normed hidden states."""
        rope = self.rope(x.device)[start:start + x.shape[1]]
        x = self.emb_norm(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, cache, i, start, mask)
        return self.norm(x)


def build_imagenet(cfg: ImageNetConfig) -> ImageNetModel:
    with torch.device("meta"):
        return ImageNetModel(cfg)
