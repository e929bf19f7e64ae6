"""UniWeTok: the 32x binary tokenizer with a 2^128 codebook (upstream `autoencoder_uni.py`, VQModel).

A conv + attention hybrid. The encoder's conv levels change width in their stride-2 convs (not in
the first ResBlock of a level, as in the BitDance tokenizer), then transformer blocks run over the
whole latent grid with 4 learned register tokens in front, and `2*sigmoid(conv_out(norm_out(x)))-1`
is the pre-sign output (no swish). The GAN decoder concatenates a Gaussian noise block to the bits,
runs its own register-token transformer blocks right after `conv_in`, then the ResBlock / adaptive
GroupNorm / DCR-upsampling levels of the BitDance GAN decoder (reused from ae_layers.py).

Official quirks kept on purpose (each changes the numbers):
- 2D RoPE positions differ: the encoder spreads the grid over 0.5..7.5 (`arange(n) * (7/(n-1)) + 0.5`),
  the decoder over ..7.5 (`(arange(n) + 0.5) * (7.5/(n-0.5))`); register tokens sit at position 0;
  x and y each rotate half of a head's pairs (adjacent pairs, computed in float32).
- the sign maps 0 to -1; the adaptive GroupNorm uses the unbiased variance of the bits;
- the decoder draws one noise block per decode in the bits' shape, in float32 like the bits it is given
  (see BinaryAutoencoder.decode); conv_in rounds both to the weights' dtype.
Two sizes go through NaN inside the official code, so they are refused by name: an encoder latent side
of 1 (its position spread divides by n-1: NaN positions, and what comes out depends on how the attention
kernel treats NaN) and a 1x1 token grid to decode (the unbiased variance of one value).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BitDanceError, require
from .ae_layers import AutoencoderConfig, Decoder, ResBlock, conv_as_weights
from .autoencoder import BinaryAutoencoder

REGISTER_TOKENS = 4
ROPE_BASE = 10000.0
DEFAULT_N_HEADS = 16  # the official Encoder / GANDecoder default; not readable from the weights
GROUPS = 32  # every GroupNorm of the official model has 32 groups


@dataclass(frozen=True)
class UniWeTokConfig:
    """The official ddconfig (Encoder(**ddconfig) and GANDecoder(**ddconfig) share it)."""

    ch: int = 128
    ch_mult: tuple = (1, 1, 2, 2, 4, 8)
    num_res_blocks: int = 2
    z_channels: int = 128
    in_channels: int = 3
    out_ch: int = 3
    attn_blocks: int = 2
    n_heads: int = DEFAULT_N_HEADS
    gan_decoder: bool = True  # always: what BinaryAutoencoder.decode reads to draw the noise block

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def width(self) -> int:
        """Channels of the latent grid the transformer blocks run over."""
        return self.ch * self.ch_mult[-1]

    def check(self, origin: str) -> "UniWeTokConfig":
        """The constraints the official constructor and forward assume (they fail obscurely otherwise)."""
        require(len(self.ch_mult) >= 2, f"{origin}: ch_mult {list(self.ch_mult)} needs at least 2 levels "
                                        "(the official Encoder takes norm_out's width from its last downsample)")
        require(self.ch_mult[0] == 1, f"{origin}: ch_mult must start with 1 (conv_in makes ch channels and the first "
                                      f"level keeps them), got {list(self.ch_mult)}")
        for m in self.ch_mult:
            require(self.ch * m % GROUPS == 0, f"{origin}: level width ch*{m} = {self.ch * m} is not a multiple of "
                                               f"{GROUPS} (GroupNorm groups)")
        require(self.n_heads >= 1 and self.width % self.n_heads == 0,
                f"{origin}: n_heads {self.n_heads} does not divide the attention width {self.width}")
        require(self.width // self.n_heads % 4 == 0,
                f"{origin}: the head width (attention width / n_heads) {self.width}/{self.n_heads} = "
                f"{self.width // self.n_heads} must be a multiple of 4 (the 2D RoPE turns half of each head's pairs "
                "with x and half with y)")
        return self

    def decoder_config(self) -> AutoencoderConfig:
        """The BitDance GAN decoder with the same levels (UniWeTok adds its transformer blocks to it)."""
        return AutoencoderConfig(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                                 z_channels=self.z_channels, in_channels=self.in_channels, out_ch=self.out_ch,
                                 gan_decoder=True)

    def to_json(self) -> dict:
        return {"ddconfig": {"double_z": False, "z_channels": self.z_channels, "in_channels": self.in_channels,
                             "out_ch": self.out_ch, "ch": self.ch, "ch_mult": list(self.ch_mult),
                             "num_res_blocks": self.num_res_blocks, "attn_blocks": self.attn_blocks,
                             "n_heads": self.n_heads}}


# ---- 2D RoPE --------------------------------------------------------------------------------------------

def encoder_centers(n: int, device, dtype) -> torch.Tensor:
    """The encoder's grid coordinates: arange(n) * (7 / (n-1)) + 0.5, in the activations' dtype."""
    c = torch.arange(n, device=device, dtype=dtype)
    return c * (7.0 / c[-1]) + 0.5


def decoder_centers(n: int, device, dtype) -> torch.Tensor:
    """The decoder's grid coordinates: (arange(n) + 0.5) * (7.5 / (n - 0.5)), in the activations' dtype."""
    c = torch.arange(n, device=device, dtype=dtype) + 0.5
    return c * (7.5 / c[-1])


def rope_table(ys: torch.Tensor, xs: torch.Tensor, head_dim: int) -> torch.Tensor:
    """cos / sin per token and rotated pair: [REGISTER_TOKENS + h*w, head_dim/2, 2], register tokens first
    (position 0), then the grid row by row; the first half of the pairs turn with x, the second with y."""
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pos = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)  # [h*w, 2]: (x, y)
    half = head_dim // 2
    freqs = 1.0 / (ROPE_BASE ** (torch.arange(0, half, 2, device=pos.device, dtype=pos.dtype)[: half // 2] / half))
    t = torch.cat([torch.zeros(REGISTER_TOKENS, 2, device=pos.device, dtype=pos.dtype), pos + 1.0])
    angles = torch.outer(t.flatten(), freqs).view(t.shape[0], -1)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x [B, L, heads, head_dim], adjacent element pairs rotated, in float32, back in x's dtype."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    t = table.view(1, pairs.shape[1], 1, pairs.shape[3], 2)
    out = torch.stack([pairs[..., 0] * t[..., 0] - pairs[..., 1] * t[..., 1],
                       pairs[..., 1] * t[..., 0] + pairs[..., 0] * t[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)


# ---- transformer blocks ---------------------------------------------------------------------------------

def ffn_hidden(dim: int) -> int:
    """The official FeedForward width: int(2 * 4*dim / 3) rounded up to a multiple of 256."""
    hidden = int(2 * (4.0 * dim) / 3)
    return hidden if hidden % 256 == 0 else hidden + 256 - hidden % 256


class Attention(nn.Module):
    """Bidirectional multi-head attention, fused qkv, no biases (every token sees every token)."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x, rope):
        b, n, dim = x.shape
        q, k, v = (t.view(b, n, self.n_heads, self.head_dim) for t in self.wqkv(x).chunk(3, dim=-1))
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.wo(out.transpose(1, 2).contiguous().view(b, n, dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        hidden = ffn_hidden(dim)
        self.w1 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = self.w1(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.attention = Attention(dim, n_heads)
        self.feed_forward = FeedForward(dim)
        self.attention_norm = nn.RMSNorm(dim, eps=1e-6)
        self.ffn_norm = nn.RMSNorm(dim, eps=1e-6)

    def forward(self, x, rope):
        h = x + self.attention(self.attention_norm(x), rope)
        return h + self.feed_forward(self.ffn_norm(h))


class RegisterAttention(nn.Module):
    """Transformer blocks over a feature map's whole grid with the register tokens in front; mixed into
    the encoder and the decoder, whose keys `register_token` and `mid_attn_blocks.<i>` these are.
    Subclasses set `centers` (their grid coordinates: the encoder's and the decoder's differ)."""

    def _init_attention(self, dim: int, n_heads: int, blocks: int):
        self.n_heads = n_heads
        self.register_token = nn.Embedding(REGISTER_TOKENS, dim)
        self.mid_attn_blocks = nn.ModuleList([TransformerBlock(dim, n_heads) for _ in range(blocks)])

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.mid_attn_blocks) == 0:
            return x
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2).contiguous()
        registers = self.register_token.weight.view(1, REGISTER_TOKENS, c).expand(b, -1, -1)
        tokens = torch.cat([registers, tokens], dim=1)
        rope = rope_table(self.centers(h, x.device, x.dtype), self.centers(w, x.device, x.dtype), c // self.n_heads)
        for block in self.mid_attn_blocks:
            tokens = block(tokens, rope)
        return tokens[:, REGISTER_TOKENS:].transpose(1, 2).contiguous().view(b, c, h, w)


class Encoder(RegisterAttention):
    centers = staticmethod(encoder_centers)

    def __init__(self, cfg: UniWeTokConfig):
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1, bias=False)
        self.down = nn.ModuleList()
        for i, m in enumerate(mult):
            level = nn.Module()
            level.block = nn.ModuleList([ResBlock(ch * m, ch * m) for _ in range(cfg.num_res_blocks)])
            if i < len(mult) - 1:
                level.downsample = nn.Conv2d(ch * m, ch * mult[i + 1], 3, stride=2, padding=1)
            self.down.append(level)
        self._init_attention(cfg.width, cfg.n_heads, cfg.attn_blocks)
        self.norm_out = nn.GroupNorm(GROUPS, cfg.width, eps=1e-6)
        self.conv_out = nn.Conv2d(cfg.width, cfg.z_channels, 1)

    def forward(self, x):
        """Image [B, C, H, W] -> the pre-sign map in (-1, 1), [B, z, H/f, W/f]."""
        x = self.conv_in(x)
        for level in self.down:
            for blk in level.block:
                x = blk(x)
            if hasattr(level, "downsample"):
                x = level.downsample(x)
        x = self.attend(x)
        return 2 * torch.sigmoid(self.conv_out(self.norm_out(x))) - 1


class GANDecoder(Decoder, RegisterAttention):
    """The BitDance GAN decoder with register-token transformer blocks after conv_in. `trunk` keeps
    Decoder's contract, so tiled_decode.decode_tiled runs it: the attention is at the latent grid,
    inside the trunk that always runs whole, and the tiled levels are convolutions and GroupNorms."""

    centers = staticmethod(decoder_centers)

    def __init__(self, cfg: UniWeTokConfig):
        super().__init__(cfg.decoder_config())
        self._init_attention(cfg.width, cfg.n_heads, cfg.attn_blocks)

    def stem(self, z, generator=None, noise=None):
        """The GAN decoder's conv_in of the bits and their noise block, then UniWeTok's attention blocks."""
        if noise is None:
            noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        return self.attend(conv_as_weights(self.conv_in, torch.cat([z, noise], dim=1)))


def nearest_size(side: int, factor: int, minimum: int) -> int:
    return max(minimum, int(math.floor(side / factor + 0.5)) * factor)


class UniWeTok(BinaryAutoencoder):
    """encode: image in [-1, 1] -> ±1 bits [B, z, H/32, W/32]; decode: bits -> image (noise from `generator`).

    Decoding (noise, chunks, tiles) is BinaryAutoencoder's; tiles are exact up to rounding because the
    attention runs over the whole token grid before the tiled levels. Encoding runs whole (its attention
    is at the end of the encoder, over the whole grid: tiles would change the result)."""

    def __init__(self, cfg: UniWeTokConfig):
        nn.Module.__init__(self)  # not BinaryAutoencoder's: it would build the BitDance encoder and decoder
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = GANDecoder(cfg)

    @property
    def family(self) -> str:
        return f"uniwetok-z{self.config.z_channels}-f{self.downsample}"

    @property
    def min_side(self) -> int:
        """Smallest image side the official encoder gives numbers for (a latent side of 1 makes NaN positions)."""
        return 2 * self.downsample if self.config.attn_blocks > 0 else self.downsample

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        f, lo = self.downsample, self.min_side
        require(image.dim() == 4 and image.shape[1] == self.config.in_channels,
                f"image must be [B, {self.config.in_channels}, H, W], got {list(image.shape)}")
        h, w = image.shape[-2:]
        if h % f or w % f or h < lo or w < lo:
            raise BitDanceError(
                f"image size {h}x{w} (height x width) does not fit UniWeTok: both sides must be multiples of {f} "
                f"and at least {lo}; the nearest valid size is {nearest_size(h, f, lo)}x{nearest_size(w, f, lo)}")
        return super().encode(image)

    @torch.no_grad()
    def decode(self, bits: torch.Tensor, generator: torch.Generator | None = None, chunk: int | None = None,
               tile: int | None = None) -> torch.Tensor:
        if bits.dim() == 4 and bits.shape[-2] * bits.shape[-1] < 2:
            raise BitDanceError(
                f"bits of {bits.shape[-2]}x{bits.shape[-1]} tokens: UniWeTok decodes at least 2 tokens (e.g. 1x2); its "
                "adaptive GroupNorm takes the unbiased variance over the token grid, undefined (NaN) for one token")
        return super().decode(bits, generator=generator, chunk=chunk, tile=tile)
