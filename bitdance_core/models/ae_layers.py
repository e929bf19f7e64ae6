"""The binary tokenizer's layers and configuration: the conv encoder and the two decoders.

Key names follow the released `ae.safetensors` / `ae_*.safetensors` (bare `encoder.*`, `decoder.*`).
Two decoders exist: the plain one (T2I, d16c32, ImageNet) and the GAN decoder (d32c128, d32c256),
which concatenates a Gaussian noise block to the bits before `conv_in`.

Dtypes follow the official code, which runs the tokenizer with bf16 weights under CUDA's bf16 autocast:
convolutions and linears compute in the weights' dtype (their inputs cast to it), GroupNorm computes
and returns float32 (it is on autocast's float32 list), so swish runs in float32 too, and sums promote.
A level whose ResBlocks keep their width therefore carries a float32 residual stream from its adaptive
norm on. With float32 weights every step is float32, as before.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import REQUIRED, BitDanceError, config_value

_DDCONFIG_KEYS = {"ch", "out_ch", "in_channels", "num_res_blocks", "z_channels", "ch_mult", "resolution", "double_z"}
_AE_KEYS = {"ddconfig", "gan_decoder", "checkpoint", "_class_name", "_diffusers_version"}


@dataclass
class AutoencoderConfig:
    ch: int = 256
    ch_mult: tuple = (1, 1, 2, 2, 4)
    num_res_blocks: int = 4
    z_channels: int = 32
    in_channels: int = 3
    out_ch: int = 3
    gan_decoder: bool = False

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_json(cls, cfg: dict, origin: str = "ae_config.json") -> "AutoencoderConfig":
        unknown = set(cfg) - _AE_KEYS
        if unknown:
            raise BitDanceError(f"{origin}: unknown config key(s) {sorted(unknown)}; expected some of {sorted(_AE_KEYS)}")
        if cfg.get("checkpoint") is not None:
            raise BitDanceError(f"{origin}: 'checkpoint' must be null (weights come from the .safetensors beside it)")
        dd = cfg.get("ddconfig")
        if not isinstance(dd, dict):
            raise BitDanceError(f"{origin}: missing 'ddconfig' object")
        unknown = set(dd) - _DDCONFIG_KEYS
        if unknown:
            raise BitDanceError(f"{origin}: unknown ddconfig key(s) {sorted(unknown)}; expected some of {sorted(_DDCONFIG_KEYS)}")
        for k in ("ch", "ch_mult", "num_res_blocks", "z_channels"):
            if k not in dd:
                raise BitDanceError(f"{origin}: ddconfig lacks '{k}'")
        if dd.get("double_z"):
            raise BitDanceError(f"{origin}: double_z must be false for a binary tokenizer")
        mult = dd["ch_mult"]
        if not (isinstance(mult, list) and mult and all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in mult)):
            raise BitDanceError(f"{origin}: ddconfig ch_mult is {mult!r}; expected a list of positive integers, e.g. [1, 1, 2, 2, 4]")

        def get(key, default=REQUIRED):
            return config_value(dd, key, int, f"{origin} ddconfig", default)
        return cls(ch=get("ch"), ch_mult=tuple(mult), num_res_blocks=get("num_res_blocks"), z_channels=get("z_channels"),
                   in_channels=get("in_channels", 3), out_ch=get("out_ch", 3),
                   gan_decoder=config_value(cfg, "gan_decoder", bool, origin, False))

    def to_json(self) -> dict:
        return {"ddconfig": {"double_z": False, "z_channels": self.z_channels, "in_channels": self.in_channels,
                             "out_ch": self.out_ch, "ch": self.ch, "ch_mult": list(self.ch_mult),
                             "num_res_blocks": self.num_res_blocks}, "gan_decoder": self.gan_decoder}


def _f32(t):
    return None if t is None else t.float()


def group_norm_fp32(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` computed and returned in float32, as under the official autocast."""
    return F.group_norm(x.float(), norm.num_groups, _f32(norm.weight), _f32(norm.bias), norm.eps)


NORM_CHUNKS = 8  # norm_swish works through a GroupNorm's groups in this many parts


def norm_swish(norm: nn.GroupNorm, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """swish(norm(x)) in float32, rounded once to the dtype of `conv`, which reads it next.

    Without autograd it goes through the groups in parts, each normalised on its own (a group's
    statistics are its own, so the values are the same): the float32 temporaries are a part's, not
    a whole activation's, as they would be at the decode's memory peak."""
    dtype = conv.weight.dtype
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in norm.parameters())):
        y = group_norm_fp32(norm, x)
        return (y * torch.sigmoid(y)).to(dtype)
    out = torch.empty_like(x, dtype=dtype)  # in x's memory format: the ImageNet tokenizer runs channels_last
    c = x.shape[1]
    per_group = c // norm.num_groups
    step = per_group * max(1, norm.num_groups // NORM_CHUNKS)
    parts = [slice(a, min(a + step, c)) for a in range(0, c, step)]
    # PyTorch's CPU elementwise loops compute the last (n mod 2 vector widths) values of a run with the
    # scalar function, whose sigmoid can differ from the vector one by an ulp: parts of a multiple of 64
    # values each keep every value on the vector path, so the parts give exactly the whole's values
    if any(x.numel() // c * (p.stop - p.start) % 64 for p in parts):
        parts = [slice(0, c)]
    for part in parts:
        w, b = (None if t is None else t[part].float() for t in (norm.weight, norm.bias))
        y = F.group_norm(x[:, part].float(), (part.stop - part.start) // per_group, w, b, norm.eps)
        out[:, part] = y.mul_(torch.sigmoid(y))
    return out


def conv_as_weights(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) in the conv's weight dtype, as autocast casts its input."""
    return conv(x.to(conv.weight.dtype))


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, cin, eps=1e-6)
        self.norm2 = nn.GroupNorm(32, cout, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else None

    def forward(self, x):
        h = self.conv1(norm_swish(self.norm1, x, self.conv1))
        h = norm_swish(self.norm2, h, self.conv2)  # the first conv's output goes before the second conv runs
        h = self.conv2(h)
        residual = conv_as_weights(self.nin_shortcut, x) if self.nin_shortcut is not None else x
        # h + residual, promoted: a float32 input (after an adaptive norm) keeps the stream in float32.
        # Added into h (or its float32 copy): a mixed-dtype sum on the CPU makes a float32 copy of h first.
        return h.to(torch.promote_types(h.dtype, residual.dtype)).add_(residual)


def depth_to_space_dcr(x: torch.Tensor, block: int = 2) -> torch.Tensor:
    """DCR order: out[c, 2h+i, 2w+j] = in[(i*2+j)*C/4 + c, h, w]. Not torch.pixel_shuffle (CRD)."""
    b, c, h, w = x.shape
    s = block * block
    x = x.view(b, block, block, c // s, h, w).permute(0, 3, 4, 1, 5, 2)
    return x.contiguous().view(b, c // s, h * block, w * block)


class Upsampler(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim * 4, 3, padding=1)

    def forward(self, x):
        return depth_to_space_dcr(conv_as_weights(self.conv1, x), 2)


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm without affine, rescaled per channel from the statistics of the decoder's input bits."""

    def __init__(self, z_channels: int, channels: int, eps: float = 1e-6):
        super().__init__()
        self.gn = nn.GroupNorm(32, channels, eps=eps, affine=False)
        self.gamma = nn.Linear(z_channels, channels)
        self.beta = nn.Linear(z_channels, channels)
        self.eps = eps

    def forward(self, x, style_std, style_mean):
        """float32 out (the GroupNorm's dtype): the scale and shift come in the linears' dtype."""
        b, c = x.shape[:2]
        scale = self.gamma(style_std.to(self.gamma.weight.dtype)).view(b, c, 1, 1)
        bias = self.beta(style_mean.to(self.beta.weight.dtype)).view(b, c, 1, 1)
        y = group_norm_fp32(self.gn, x)
        return y * scale + bias if torch.is_grad_enabled() and y.requires_grad else y.mul_(scale).add_(bias)


def style_stats(z: torch.Tensor, eps: float = 1e-6):
    """Per-channel std (unbiased var, as upstream) and mean of the latent over its whole grid, in float32
    (the official decoder gets the sampler's float32 tokens)."""
    flat = z.float().flatten(2)
    return (flat.var(dim=-1) + eps).sqrt(), flat.mean(dim=-1)


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, mult, nrb = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1, bias=False)
        in_mult = (1,) + tuple(mult)
        self.down = nn.ModuleList()
        for i, m in enumerate(mult):
            level = nn.Module()
            cin, cout = ch * in_mult[i], ch * m
            level.block = nn.ModuleList([ResBlock(cin if j == 0 else cout, cout) for j in range(nrb)])
            if i < len(mult) - 1:
                level.downsample = nn.Conv2d(cout, cout, 3, stride=2, padding=1)
            self.down.append(level)
        c = ch * mult[-1]
        self.mid_block = nn.ModuleList([ResBlock(c, c) for _ in range(nrb)])
        self.norm_out = nn.GroupNorm(32, c, eps=1e-6)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 1)

    def forward(self, x):
        x = conv_as_weights(self.conv_in, x)
        for level in self.down:
            for blk in level.block:
                x = blk(x)
            if hasattr(level, "downsample"):
                x = conv_as_weights(level.downsample, x)
        for blk in self.mid_block:
            x = blk(x)
        return self.conv_out(norm_swish(self.norm_out, x, self.conv_out))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, mult, nrb, z = cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels
        self.gan = cfg.gan_decoder
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(z * (2 if self.gan else 1), block_in, 3, padding=1)
        self.mid_block = nn.ModuleList([ResBlock(block_in, block_in) for _ in range(nrb)])
        ups, adas = [], []
        for i in reversed(range(len(mult))):
            cout = ch * mult[i]
            adas.insert(0, AdaptiveGroupNorm(z, block_in))
            level = nn.Module()
            level.block = nn.ModuleList([ResBlock(block_in if j == 0 else cout, cout) for j in range(nrb)])
            block_in = cout
            if i > 0:
                level.upsample = Upsampler(block_in)
            ups.insert(0, level)
        self.adaptive = nn.ModuleList(adas)
        self.up = nn.ModuleList(ups)
        self.norm_out = nn.GroupNorm(32, block_in, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z, generator: torch.Generator | None = None, noise: torch.Tensor | None = None):
        """`noise`: the GAN decoder's noise block (default: drawn from `generator` in z's shape)."""
        x = self.trunk(z, generator, noise, stop=0)
        return self.conv_out(norm_swish(self.norm_out, x, self.conv_out))

    def stem(self, z, generator=None, noise=None):
        """conv_in of the bits (the GAN decoder's: of the bits and a noise block, drawn from `generator`
        in the bits' shape and dtype unless given)."""
        if self.gan:
            if noise is None:
                noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            z = torch.cat([z, noise], dim=1)
        return conv_as_weights(self.conv_in, z)

    def trunk(self, z, generator=None, noise=None, stop: int = 0):
        """stem, the mid blocks and the levels down to `stop` (its ResBlocks, not its upsampler)."""
        std, mean = style_stats(z)  # of the bits, before any noise joins them
        x = self.stem(z, generator, noise)
        for blk in self.mid_block:
            x = blk(x)
        for i in reversed(range(stop, len(self.up))):
            x = self.adaptive[i](x, std, mean)
            for blk in self.up[i].block:
                x = blk(x)
            if i > stop:
                x = self.up[i].upsample(x)
        return x
