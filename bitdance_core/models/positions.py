"""Position tables and token orders shared by the pipelines.

T2I: a fixed 2D sin-cos table added to the backbone's hidden states (before the head) and to the
projected bits (before the backbone). Tokens are generated block by block: blocks of ps x ps
latent tokens in raster order over the block grid, row-major inside each block.
"""
from __future__ import annotations

import torch


def sincos_1d(dim: int, length: int) -> torch.Tensor:
    """[length, dim]: sin half then cos half, frequencies 10000^(-k/(dim/2)) (float32)."""
    omega = torch.arange(dim // 2, dtype=torch.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000 ** omega
    pos = torch.arange(length, dtype=torch.float32)
    out = torch.einsum("m,d->md", pos, omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d_blocks(hidden: int, h: int, w: int, ps: int, table_len: int = 256) -> torch.Tensor:
    """[h*w, hidden] in generation order: column (x) half first, then row (y) half."""
    pe = sincos_1d(hidden // 2, max(table_len, h, w))
    grid_y = pe[:h].view(h, 1, hidden // 2).expand(h, w, hidden // 2)
    grid_x = pe[:w].view(1, w, hidden // 2).expand(h, w, hidden // 2)
    grid = torch.cat([grid_x, grid_y], dim=-1)
    return raster_to_blocks(grid.permute(2, 0, 1).unsqueeze(0), ps)[0]


def raster_to_blocks(x: torch.Tensor, ps: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W, C] in block order '(h w p1 p2) c'."""
    b, c, hh, ww = x.shape
    x = x.reshape(b, c, hh // ps, ps, ww // ps, ps).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, hh * ww, c)


def blocks_to_raster(tokens: torch.Tensor, h: int, w: int, ps: int) -> torch.Tensor:
    """[B, h*w, C] in block order -> [B, C, h, w]."""
    b, n, c = tokens.shape
    x = tokens.reshape(b, h // ps, w // ps, ps, ps, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, h, w)
