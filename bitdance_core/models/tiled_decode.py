"""Tiled decoding: the tokenizer's decoder in bounded GPU memory, equal to a whole decode up to rounding.

Almost all of a decode's memory is in its two or three highest-resolution levels. Those run tile by
tile; everything before them (at 1/4 of the output size or less, cheap) runs on the whole image.
Two things make naive tiling wrong, and both are handled:
- GroupNorm statistics are per image. Every GroupNorm of the tiled part is a synchronisation point:
  the tiles are advanced in lockstep to it, their statistics (over each tile's own core, a partition
  of the image) are merged exactly (Chan's parallel mean/variance), and only then normalised.
  The adaptive norms use the style statistics of the whole latent, as always.
- Convolutions near a tile's edge see zero padding. Each tile carries a margin as wide as the tiled
  part's receptive field (computed from its layers), so its core never sees the padding.
Between synchronisation points the tiles' states rest on `store` (the CPU when decoding on a GPU),
so the GPU holds one tile's working set at a time. The price is time: every state crosses to the
GPU and back once per GroupNorm. The GAN decoder's noise enters before the tiled part, so a tiled
decode sees the same noise as a whole one.
"""
from __future__ import annotations

import math

import torch

from .ae_layers import Decoder, conv_as_weights, style_stats


def _program(dec: Decoder, split: int) -> list[tuple]:
    """The ops after `dec.trunk(stop=split)`: ('up', m), ('norm', m, kind), ('conv', m), ('save',), ('add', shortcut)."""
    ops = []
    if split > 0:
        ops.append(("up", dec.up[split].upsample))
    for i in reversed(range(split)):
        ops.append(("norm", dec.adaptive[i], "adaptive"))
        for blk in dec.up[i].block:
            ops += [("save",), ("norm", blk.norm1, "swish"), ("conv", blk.conv1), ("norm", blk.norm2, "swish"),
                    ("conv", blk.conv2), ("add", blk.nin_shortcut)]
        if i > 0:
            ops.append(("up", dec.up[i].upsample))
    ops += [("norm", dec.norm_out, "swish"), ("conv", dec.conv_out)]
    return ops


def _margin(ops) -> int:
    """Receptive-field radius of the program, in pixels of its input (3x3 convs; upsamplers double the scale)."""
    r, scale = 0.0, 1
    for op in ops:
        if op[0] in ("conv", "up"):
            r += (op[1].kernel_size[0] // 2 if op[0] == "conv" else 1) / scale
        if op[0] == "up":
            scale *= 2
    return math.ceil(r)


class _Tile:
    def __init__(self, core, window, state):
        self.core, self.window, self.state = core, window, state  # (y0, y1, x0, x1) in program-input pixels


def _spans(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _core_view(x, tile: _Tile, scale: int):
    cy0, cy1, cx0, cx1 = tile.core
    wy0, _, wx0, _ = tile.window
    return x[:, :, (cy0 - wy0) * scale:(cy1 - wy0) * scale, (cx0 - wx0) * scale:(cx1 - wx0) * scale]


def _partial_stats(x, groups: int):
    """(count, mean, M2) per (batch, group) of a core region, in float64."""
    b = x.shape[0]
    v = x.float().reshape(b, groups, -1)
    mean = v.mean(-1, keepdim=True)
    m2 = ((v - mean) ** 2).sum(-1)
    return v.shape[-1], mean[..., 0].double(), m2.double()


def _merge(acc, part):
    if acc is None:
        return part
    (na, ma, m2a), (nb, mb, m2b) = acc, part
    n = na + nb
    d = mb - ma
    return n, ma + d * (nb / n), m2a + m2b + d * d * (na * nb / n)


def _normalize(x, module, kind: str, stats, style):
    """GroupNorm with the whole image's statistics, then the affine (or adaptive) scale and shift and,
    for the ResBlock / output norms, swish: y = x * a + b per channel, in float32, returned in float32
    as the whole decode's norms return it (ae_layers.py); the next conv rounds it to its dtype."""
    n, mean, m2 = stats
    gn = module.gn if kind == "adaptive" else module
    b, c = x.shape[:2]
    rstd = torch.rsqrt(m2 / n + gn.eps).float().repeat_interleave(c // gn.num_groups, dim=1)  # [B, C]
    mu = mean.float().repeat_interleave(c // gn.num_groups, dim=1)
    if kind == "adaptive":
        std, smean = style
        scale = module.gamma(std.to(module.gamma.weight.dtype)).float().view(b, c)
        shift = module.beta(smean.to(module.beta.weight.dtype)).float().view(b, c)
    else:
        scale, shift = gn.weight.float().view(1, c), gn.bias.float().view(1, c)
    a = rstd * scale
    y = x.to(torch.float32, copy=True)  # never in place: x may be a ResBlock's saved input
    y.mul_(a.view(-1, c, 1, 1)).add_((shift - mu * a).view(-1, c, 1, 1))
    if kind != "adaptive":
        y.mul_(torch.sigmoid(y))
    return y


@torch.no_grad()
def decode_tiled(dec: Decoder, z: torch.Tensor, noise: torch.Tensor | None, tile: int, store=None,
                 split: int | None = None) -> torch.Tensor:
    """Decode z [B, zc, h, w] in tiles of about `tile` output pixels a side (see the module doc)."""
    levels = len(dec.up)
    split = min(2, levels - 1) if split is None else split
    f_out = 2 ** split  # output pixels per pixel of the tiled part's input
    H, W = (n * 2 ** (levels - 1 - split) for n in z.shape[-2:])
    core = max(1, tile // f_out)
    if core >= H and core >= W:  # one tile: the plain path
        return dec(z, noise=noise)
    x = dec.trunk(z, noise=noise, stop=split)
    device = x.device
    store = store if store is not None else ("cpu" if device.type == "cuda" else device)
    ops = _program(dec, split)
    m = _margin(ops)
    style = style_stats(z)
    tiles = []
    for y0, y1 in _spans(H, core):
        for x0, x1 in _spans(W, core):
            win = (max(0, y0 - m), min(H, y1 + m), max(0, x0 - m), min(W, x1 + m))
            tiles.append(_Tile((y0, y1, x0, x1), win, {"x": x[:, :, win[0]:win[1], win[2]:win[3]].to(store)}))
    del x
    out = None
    pos, scale, stats = 0, 1, None
    if ops[0][0] == "norm":  # no upsampler first (a one-level decoder): statistics of the input itself
        gn = ops[0][1].gn if ops[0][2] == "adaptive" else ops[0][1]
        for t in tiles:
            stats = _merge(stats, _partial_stats(_core_view(t.state["x"].to(device), t, 1), gn.num_groups))
    while pos < len(ops):
        end = next((k for k in range(pos + 1, len(ops)) if ops[k][0] == "norm"), len(ops))
        seg_scale = scale
        new_stats = None
        for t in tiles:
            st = {k: v.to(device) for k, v in t.state.items()}
            xt, s = st.pop("x"), seg_scale
            for op in ops[pos:end]:
                kind = op[0]
                if kind == "norm":
                    xt = _normalize(xt, op[1], op[2], stats, style)
                elif kind == "conv":
                    xt = conv_as_weights(op[1], xt)
                elif kind == "up":
                    xt = op[1](xt)
                    s *= 2
                elif kind == "save":
                    st["skip"] = xt
                elif kind == "add":
                    skip = st.pop("skip")
                    xt = xt + (conv_as_weights(op[1], skip) if op[1] is not None else skip)
            if end < len(ops):  # the next GroupNorm's statistics, from this tile's core
                gn = ops[end][1].gn if ops[end][2] == "adaptive" else ops[end][1]
                new_stats = _merge(new_stats, _partial_stats(_core_view(xt, t, s), gn.num_groups))
                st["x"] = xt
                t.state = {k: v.to(store) for k, v in st.items()}
            else:  # the output: paste the core
                if out is None:
                    out = torch.empty(z.shape[0], xt.shape[1], H * s, W * s, dtype=xt.dtype, device=device)
                cy0, cy1, cx0, cx1 = t.core
                out[:, :, cy0 * s:cy1 * s, cx0 * s:cx1 * s] = _core_view(xt, t, s)
                t.state = {}
        scale = s
        stats, pos = new_stats, end
    return out

