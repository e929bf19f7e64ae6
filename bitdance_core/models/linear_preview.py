"""A cheap live preview: bits -> approximate pixels by a linear map fitted from the tokenizer's decoder.

ComfyUI previews other models with "latent2rgb", a fixed linear map from latent channels to RGB. A
BitDance decode is expensive (the released decoder runs 256 channels at full resolution: ~20 TFLOP
per 1024x1024 image), and under an offload mode it must also bring the decoder's weights in and
decode in tiles through CPU memory, eight times a run. This is the latent2rgb of the binary tokens.

Each token's f x f x 3 pixel patch is a linear function of the bits of that token and its 8
neighbours (a 3x3 convolution over the token grid, then depth-to-space). It is fitted once per
tokenizer by least squares on the decoder's own output for uniformly random bits. For ±1 inputs
drawn uniformly, that fit is the decoder's first-order (Walsh) part over the 3x3 window, so no image
data is needed, and on the digits demo it is as close to the decoder as a fit on real tokens.
Applying it costs ~1 GFLOP for a 1024x1024 image, on the CPU, with no GPU memory.
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
    """bits [B, z, h, w] (±1) -> pixels [B, 3, h*f, w*f] in [-1, 1], float32 on the CPU."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, downsample: int):
        self.weight, self.bias, self.downsample = weight, bias, downsample  # conv [3*f*f, z, k, k], [3*f*f]

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
    """[B, 3, h*f, w*f] -> [B*h*w, 3*f*f], in pixel_shuffle's channel order (colour, row, column)."""
    b, c, hh, ww = pixels.shape
    h, w = hh // f, ww // f
    return pixels.reshape(b, c, h, f, w, f).permute(0, 2, 4, 1, 3, 5).reshape(b * h * w, c * f * f)


@torch.no_grad()
def fit_linear_preview(decode, z_channels: int, downsample: int, device="cpu", seed: int = 0) -> LinearPreview:
    """Fit the preview of a tokenizer whose `decode(bits, generator=...)` maps ±1 bits [B, z, h, w] on
    `device` to pixels [B, 3, h*f, w*f]. Decodes one random grid at a time (the memory of a 256x256
    decode at f = 16) and accumulates the normal equations in float64. The same seed gives the same map."""
    n_features = z_channels * KERNEL * KERNEL + 1
    grids = -(-SAMPLES_PER_FEATURE * n_features // GRID_SIDE ** 2)
    grids = max(1, min(grids, MAX_FIT_PIXELS // (GRID_SIDE * downsample) ** 2))  # z=128, f=32: fewer, ridge-held
    cpu = torch.Generator().manual_seed(seed)
    noise = torch.Generator(device=device).manual_seed(seed)  # a GAN decoder's noise: averaged over by the fit
    xtx = torch.zeros(n_features, n_features, dtype=torch.float64)
    xty = torch.zeros(n_features, 3 * downsample * downsample, dtype=torch.float64)
    for _ in range(grids):
        bits = torch.randint(0, 2, (1, z_channels, GRID_SIDE, GRID_SIDE), generator=cpu).float().mul_(2).sub_(1)
        pixels = decode(bits.to(device), generator=noise).to("cpu", torch.float64)
        x, y = _features(bits.double()), _patches(pixels, downsample)
        xtx += x.T @ x
        xty += x.T @ y
    xtx += torch.eye(n_features, dtype=torch.float64) * (RIDGE * grids * GRID_SIDE ** 2)
    solution = torch.linalg.solve(xtx, xty)  # [z*k*k + 1, 3*f*f]
    weight = solution[:-1].T.reshape(-1, z_channels, KERNEL, KERNEL)
    return LinearPreview(weight.float().contiguous(), solution[-1].float().contiguous(), downsample)
