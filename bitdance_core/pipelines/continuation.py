"""Continuing an image: which blocks to keep, and their bits, checked and put in generation order.

BitDance draws a latent block by block, in raster order over the block grid, each block seeing
every block before it. A continuation keeps some blocks -- their bits are given (`init_bits`, ±1
[B, C, h, w]) and fed to the backbone exactly as if they had been sampled -- and samples the others.
The head's random draws of a kept block are still made (and thrown away), so a seed means the same
with and without a mask: keeping a run's own bits reproduces that run, for any mask.

A regenerated block sees only the blocks before it in generation order (above it, and left of it in
its block row), never those after it: outpainting down and to the right continues the image; a hole
in the middle is drawn without seeing what lies below it.

The blocks to keep are a bool block mask [rows, cols] or [B, rows, cols] (True = keep), made from
  - latent rows kept from the top (`keep_rows`);
  - a ComfyUI noise mask (`keep_from_noise_mask`: SetLatentNoiseMask's convention, 1 = regenerate, at
    any resolution with the image's aspect; a block regenerates if any of its pixels is masked);
and `extend_canvas` pads bits to a larger canvas with the noise mask of the new area.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import BitDanceError, require

SIDES = ("bottom", "right")  # the sides a canvas grows on: the new blocks come after the image in generation order


@dataclass(frozen=True)
class BlockGrid:
    """The blocks of one generation: a lat_h x lat_w latent of `channels` bits cut into block_h x block_w
    blocks (latent positions), drawn in raster order over the [rows, cols] block grid."""

    lat_h: int
    lat_w: int
    block_h: int
    block_w: int
    channels: int
    downsample: int  # pixels per latent position (for messages in pixels)

    @property
    def rows(self) -> int:
        return self.lat_h // self.block_h

    @property
    def cols(self) -> int:
        return self.lat_w // self.block_w

    @property
    def steps(self) -> int:
        return self.rows * self.cols

    def describe(self) -> str:
        f = self.downsample
        return (f"{self.lat_w * f}x{self.lat_h * f} px (width x height; {self.lat_w}x{self.lat_h} latent, "
                f"{self.cols}x{self.rows} blocks of {self.block_w * f}x{self.block_h * f} px)")


def keep_rows(grid: BlockGrid, rows: int) -> torch.Tensor:
    """Block mask [rows, cols] keeping the top `rows` latent rows (a multiple of the block height)."""
    require(isinstance(rows, int) and 0 <= rows <= grid.lat_h,
            f"keep rows {rows}: must be a number of latent rows from 0 to {grid.lat_h} for {grid.describe()}")
    require(rows % grid.block_h == 0,
            f"keep rows {rows}: must be a multiple of the block height, {grid.block_h} latent rows "
            f"({grid.block_h * grid.downsample} px), for {grid.describe()}")
    keep = torch.zeros(grid.rows, grid.cols, dtype=torch.bool)
    keep[: rows // grid.block_h] = True
    return keep


def _as_tensor(value, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        import numpy as np

        if isinstance(value, np.ndarray):
            return torch.from_numpy(value)
    except ImportError:  # numpy is optional to the engine
        pass
    raise BitDanceError(f"{what}: expected a tensor or array, got {type(value).__name__}")


def check_keep(grid: BlockGrid, keep, num_images: int) -> torch.Tensor:
    """The block mask as bool [num_images, rows, cols]; [rows, cols] or a batch of 1 is broadcast."""
    keep = _as_tensor(keep, "keep mask").cpu()
    want = f"[{grid.rows}, {grid.cols}] (block rows x block columns, True = keep) for {grid.describe()}"
    if keep.dtype != torch.bool:
        require(not keep.is_floating_point() or bool(torch.isfinite(keep).all()), f"keep mask: must be bool, shape {want}")
        require(bool(((keep == 0) | (keep == 1)).all()),
                f"keep mask: must be bool (or 0/1), shape {want}; got values other than 0 and 1")
        keep = keep != 0
    shape = list(keep.shape)
    if keep.dim() == 2:
        keep = keep[None]
    require(keep.dim() == 3 and tuple(keep.shape[1:]) == (grid.rows, grid.cols),
            f"keep mask: shape {shape} does not fit: expected {want}, or [{num_images}, {grid.rows}, {grid.cols}] "
            f"with one mask per image")
    require(keep.shape[0] in (1, num_images),
            f"keep mask: {keep.shape[0]} masks for {num_images} images; give one mask, or one per image")
    return keep.expand(num_images, -1, -1).clone()


def keep_from_noise_mask(grid: BlockGrid, mask, num_images: int) -> torch.Tensor:
    """A ComfyUI noise mask (SetLatentNoiseMask: values > 0 regenerate; [H, W], [B, H, W] or [B, 1, H, W],
    at the image's pixel resolution, the latent's, or any other with the same aspect) -> the block
    mask bool [num_images, rows, cols] of the blocks to keep: a block regenerates if any pixel of it
    is masked."""
    mask = _as_tensor(mask, "noise mask").to("cpu", torch.float32)
    shape = list(mask.shape)
    if mask.dim() == 4:
        require(mask.shape[1] == 1, f"noise mask: shape {shape}: expected one channel [B, 1, H, W]")
        mask = mask[:, 0]
    elif mask.dim() == 2:
        mask = mask[None]
    require(mask.dim() == 3 and mask.shape[-1] > 0 and mask.shape[-2] > 0,
            f"noise mask: shape {shape}: expected [H, W], [B, H, W] or [B, 1, H, W]")
    h, w = mask.shape[-2:]
    f = grid.downsample
    require(h * grid.lat_w == w * grid.lat_h,
            f"noise mask: {w}x{h} does not fit the image, {grid.lat_w * f}x{grid.lat_h * f} px: a mask must have the "
            f"image's aspect (its pixel size, e.g. from LoadImage of that image, or the latent's {grid.lat_w}x{grid.lat_h})")
    require(mask.shape[0] in (1, num_images),
            f"noise mask: {mask.shape[0]} masks for {num_images} images; give one mask, or one per image")
    masked = torch.nan_to_num(mask, nan=1.0) > 0
    # any masked pixel within a block's area (adaptive pooling: the block's share of the mask's pixels)
    regen = F.adaptive_max_pool2d(masked[:, None].to(torch.float32), (grid.rows, grid.cols))[:, 0] > 0
    return (~regen).expand(num_images, -1, -1).clone()


def extend_canvas(bits: torch.Tensor, noise_mask, side: str, amount: int):
    """Bits [B, C, h, w] padded by `amount` latent positions on `side` ("bottom" or "right"), and
    the noise mask of the result, float [B, 1, h', w'] at latent resolution, 1 = regenerate: the new
    area, plus what `noise_mask` (any resolution with the image's aspect, as keep_from_noise_mask
    reads it) already marked. The new area's bits are 0 (they are never read: it is regenerated)."""
    bits = _as_tensor(bits, "bits")
    require(bits.dim() == 4, f"bits: expected [B, C, h, w], got {list(bits.shape)}")
    require(side in SIDES, f"side '{side}': choose one of {list(SIDES)} (a region drawn before the image in generation "
                           f"order could not see it)")
    require(isinstance(amount, int) and amount >= 1, f"extend by {amount}: must be at least one latent position")
    b, _, h, w = bits.shape
    regen = torch.zeros(b, 1, h, w, dtype=torch.float32, device=bits.device)
    if noise_mask is not None:
        old = keep_from_noise_mask(BlockGrid(h, w, 1, 1, bits.shape[1], 1), noise_mask, b)
        regen = (~old).to(bits.device, torch.float32)[:, None]
    pad = (0, 0, 0, amount) if side == "bottom" else (0, amount, 0, 0)
    return F.pad(bits, pad), F.pad(regen, pad, value=1.0)


class Continuation:
    """The kept blocks of one generation, in generation order: tokens [B, steps, P, D], keep [B, steps]."""

    def __init__(self, tokens: torch.Tensor, keep: torch.Tensor):
        self.tokens, self.keep = tokens, keep
        self._all = keep.all(dim=0).tolist()

    def keeps_all(self, step: int) -> bool:
        """Every image keeps this block: the head's result would be unused."""
        return self._all[step]

    def force(self, step: int, sampled: torch.Tensor) -> torch.Tensor:
        """The block's bits [B, P, D]: the init bits where kept, the sampled ones elsewhere."""
        return torch.where(self.keep[:, step, None, None], self.tokens[:, step].to(sampled.dtype), sampled)

    def preview(self, done: list[torch.Tensor]) -> torch.Tensor:
        """Tokens [B, steps * P, D] for a live preview: the blocks done so far, every other kept block
        already there (so the preview shows what is kept), the rest 0."""
        b, s, p, d = self.tokens.shape
        full = (self.tokens * self.keep[:, :, None, None]).reshape(b, s * p, d).clone()
        if done:
            cat = torch.cat(done, dim=1)
            full[:, : cat.shape[1]] = cat.to(full)
        return full


def prepare(grid: BlockGrid, init_bits, keep, num_images: int, to_tokens, device) -> Continuation | None:
    """Checks init bits and keep mask against the generation and puts them in generation order
    (`to_tokens`: the pipeline's raster -> generation-order token map, [B, C, h, w] -> [B, h*w/..., D]).
    None for an unforced run."""
    if init_bits is None:
        require(keep is None, "a keep mask was given without init bits: give the bits to keep (init_bits)")
        return None
    require(keep is not None, "init bits were given without a keep mask: say which blocks to keep (True = keep)")
    bits = _as_tensor(init_bits, "init bits")
    f = grid.downsample
    require(bits.dim() == 4, f"init bits: expected ±1 [B, {grid.channels}, {grid.lat_h}, {grid.lat_w}], got shape {list(bits.shape)}")
    require(bits.shape[1] == grid.channels,
            f"init bits have {bits.shape[1]} channels, but this model's tokenizer makes {grid.channels}: bits from "
            f"another tokenizer; encode the image with this model's tokenizer")
    require(tuple(bits.shape[2:]) == (grid.lat_h, grid.lat_w),
            f"init bits are {bits.shape[3]}x{bits.shape[2]} latent ({bits.shape[3] * f}x{bits.shape[2] * f} px), but the "
            f"generation is {grid.describe()}")
    require(bits.shape[0] in (1, num_images),
            f"init bits hold {bits.shape[0]} images for {num_images} to generate; give one (broadcast) or {num_images}")
    keep = check_keep(grid, keep, num_images)
    require(not bool(keep.all()), f"nothing to regenerate: every block of {grid.describe()} is kept (the keep mask "
                                  f"keeps them all, or the noise mask marks no pixel); mark some blocks to regenerate")
    bits = bits.to(device, torch.float32).expand(num_images, -1, -1, -1)
    tokens = to_tokens(bits)
    tokens = tokens.reshape(num_images, grid.steps, -1, tokens.shape[-1])
    keep_steps = keep.reshape(num_images, grid.steps).to(tokens.device)
    bad = keep_steps & ~((tokens == 1) | (tokens == -1)).flatten(2).all(-1)
    if bool(bad.any()):
        img, step = bad.nonzero()[0].tolist()
        raise BitDanceError(f"init bits: kept block (row {step // grid.cols}, column {step % grid.cols}) of image {img} "
                            f"holds values other than ±1 (a kept block outside the image, or not bits from a BitDance "
                            f"sampler or encoder)")
    return Continuation(tokens, keep_steps)
