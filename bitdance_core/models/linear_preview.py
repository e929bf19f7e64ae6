"""A cheap live preview: bits -> approximate pixels by a linear map fitted from the tokenizer's decoder.

ComfyUI previews other models with "latent2rgb", a fixed linear map from latent channels to RGB. A
BitDance decode is expensive (the released decoder runs 256 channels at full resolution: ~20 TFLOP
per 1024x1024 image), and under an offload mode it must also bring the decoder's weights in and
decode in tiles through CPU memory, eight times a run. This is the latent2rgb of the binary tokens.

Each token's f x f x 3 pixel patch is a linear function of the bits of that token and its 8
neighbours (a 3x3 convolution over the token grid, then depth-to-space). It is fitted once per
tokenizer by least squares on the decoder's own output, no image data needed: random bits are
decoded and encoded once, which gives tokens more like the ones images have (on the digits demo, each
bit leans one way as much as in real digits' tokens, where uniform random bits do not), and the fit
decodes those. On the digits demo the map fitted so is 2 dB
nearer the decode than one fitted on the random bits themselves, and 4 dB short of one fitted on real
digits' tokens (tests/test_linear_preview.py). Applying it costs ~2 GFLOP for a 1024x1024 image
(0.9 G multiply-adds), on the CPU, with no GPU memory; fitting it, about three 1024x1024 decodes' work.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import require

KERNEL = 3  # each patch sees its token and the 8 around it
SAMPLES_PER_FEATURE = 16  # tokens decoded per fitted input (the fit stops improving past ~14 on the demo tokenizer)
GRID_SIDE = 16  # tokens a side of each random grid decoded for the fit
RIDGE = 1e-3  # relative to the tokens fitted: keeps the solve well-posed when a bit barely moves the pixels
MAX_FIT_PIXELS = 1 << 22  # decoded for a fit at most (four 1024x1024 images): bounds a wide tokenizer's first preview


class LinearPreview:
    """bits [B, z, h, w] (±1) -> pixels [B, c, h*f, w*f] in [-1, 1], float32 on the CPU."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, downsample: int):
        self.weight, self.bias, self.downsample = weight, bias, downsample  # conv [c*f*f, z, k, k], [c*f*f]

    @property
    def z_channels(self) -> int:
        return self.weight.shape[1]

    @torch.no_grad()
    def __call__(self, bits: torch.Tensor) -> torch.Tensor:
        require(bits.dim() == 4 and bits.shape[1] == self.z_channels,
                f"bits must be [B, {self.z_channels}, h, w] for this preview, got {list(bits.shape)}")
        patches = F.conv2d(bits.detach().to("cpu", torch.float32), self.weight, self.bias, padding=KERNEL // 2)
        return F.pixel_shuffle(patches, self.downsample).clamp_(-1, 1)


def _features(bits: torch.Tensor) -> torch.Tensor:
    """[B*h*w, z*k*k + 1]: each token's window of bits (zeros past the grid's edge, as conv2d pads), then 1."""
    b, z, h, w = bits.shape
    windows = F.unfold(bits, KERNEL, padding=KERNEL // 2)  # [B, z*k*k, h*w], ordered as a conv weight
    x = windows.transpose(1, 2).reshape(b * h * w, z * KERNEL * KERNEL)
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)


def _patches(pixels: torch.Tensor, f: int) -> torch.Tensor:
    """[B, c, h*f, w*f] -> [B*h*w, c*f*f], in pixel_shuffle's channel order (colour, row, column)."""
    b, c, hh, ww = pixels.shape
    h, w = hh // f, ww // f
    return pixels.reshape(b, c, h, f, w, f).permute(0, 2, 4, 1, 3, 5).reshape(b * h * w, c * f * f)


@torch.no_grad()
def fit_linear_preview(decode, z_channels: int, downsample: int, device="cpu", seed: int = 0,
                       gan_decoder: bool = False, encode=None, between=None) -> LinearPreview:
    """Fit the preview of a tokenizer whose `decode(bits, generator=...)` maps ±1 bits [B, z, h, w] on
    `device` to pixels [B, c, h*f, w*f]. Decodes one random grid at a time (the memory of a 256x256
    decode at f = 16) and accumulates the normal equations in float64. The same seed gives the same map.
    encode: the tokenizer's encoder (pixels -> bits); given, each random grid is decoded and encoded
    once before the fit decodes it, so the map is fitted on tokens like the ones images have.
    gan_decoder: the decoder draws noise from the generator it is given (one on `device`, seeded).
    between: called after each grid's decode or encode (e.g. to raise a user's interrupt)."""
    n_features = z_channels * KERNEL * KERNEL + 1
    grids = -(-SAMPLES_PER_FEATURE * n_features // GRID_SIDE ** 2)
    grids = max(1, min(grids, MAX_FIT_PIXELS // (GRID_SIDE * downsample) ** 2))  # z=128, f=32: fewer, ridge-held
    cpu = torch.Generator().manual_seed(seed)
    # a GAN decoder's noise is averaged over by the fit; other decoders take no generator (some devices have none)
    noise = torch.Generator(device=device).manual_seed(seed) if gan_decoder else None
    between = between or (lambda: None)

    def each(network, inputs):  # all grids through one network before the next: under an offload mode
        outs = []               # each network's weights come in once per pass, not once a grid
        for one in inputs:
            outs.append(network(one))
            between()
        return outs

    def decoded(b):
        return decode(b, generator=noise)

    bits = torch.randint(0, 2, (grids, z_channels, GRID_SIDE, GRID_SIDE), generator=cpu).float().mul_(2).sub_(1)
    bits = bits.to(device).split(1)  # [1, z, side, side] each
    if encode is not None:
        bits = [b.float() for b in each(encode, each(decoded, bits))]
    pixels = each(decoded, bits)
    xtx = torch.zeros(n_features, n_features, dtype=torch.float64)
    xty = None
    for grid, image in zip(bits, pixels):
        x, y = _features(grid.to("cpu", torch.float64)), _patches(image.to("cpu", torch.float64), downsample)
        xtx += x.T @ x
        xty = x.T @ y if xty is None else xty.add_(x.T @ y)
    xtx += torch.eye(n_features, dtype=torch.float64) * (RIDGE * grids * GRID_SIDE ** 2)
    solution = torch.linalg.solve(xtx, xty)  # [z*k*k + 1, c*f*f]
    weight = solution[:-1].T.reshape(-1, z_channels, KERNEL, KERNEL)
    return LinearPreview(weight.float().contiguous(), solution[-1].float().contiguous(), downsample)
