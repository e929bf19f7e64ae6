"""The binary tokenizer: a conv autoencoder whose latent is the sign of the encoder output.

encode: image in [-1, 1] -> ±1 bits; decode: bits -> image (whole, in chunks of images, or in tiles:
tiled_decode.py). The layers are in ae_layers.py; reading tokenizer files is pipelines/tokenizers.py.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import BitDanceError, require
from .ae_layers import AutoencoderConfig, Decoder, Encoder
from .linear_preview import LinearPreview, fit_linear_preview
from .tiled_decode import decode_tiled


class BinaryAutoencoder(nn.Module):
    """encode: image in [-1, 1] -> ±1 bits [B, z, H/f, W/f]; decode: bits -> image."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self._linear_preview: LinearPreview | None = None

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def family(self) -> str:
        """A tag naming what decodes these bits (used to refuse bits from another tokenizer)."""
        return f"bitdance-z{self.config.z_channels}-f{self.downsample}"

    def _param_dtype(self):
        return self.decoder.conv_out.weight.dtype

    def linear_preview(self, device=None, between=None) -> LinearPreview:
        """The cheap live preview of these bits (linear_preview.py), fitted from this tokenizer on first
        use (on `device`, default where the decoder's weights are; `between` is called after each of
        the fit's decodes and encodes) and kept."""
        if getattr(self, "_linear_preview", None) is None:  # (a subclass may skip this __init__)
            device = self.decoder.conv_out.weight.device if device is None else device
            self._linear_preview = fit_linear_preview(self.decode, self.config.z_channels, self.downsample, device,
                                                      gan_decoder=self.config.gan_decoder, encode=self.encode,
                                                      between=between)
        return self._linear_preview

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        f = self.downsample
        require(image.dim() == 4 and image.shape[1] == self.config.in_channels,
                f"image must be [B, {self.config.in_channels}, H, W], got {list(image.shape)}")
        require(image.shape[-2] % f == 0 and image.shape[-1] % f == 0,
                f"image size {image.shape[-2]}x{image.shape[-1]} must divide by the tokenizer's factor {f}")
        h = self.encoder(image.to(self._param_dtype()))
        one = torch.ones((), dtype=h.dtype, device=h.device)
        return torch.where(h > 0, one, -one)

    @torch.no_grad()
    def decode(self, bits: torch.Tensor, generator: torch.Generator | None = None, chunk: int | None = None,
               tile: int | None = None) -> torch.Tensor:
        """Decode ±1 bits [B, z, h, w] -> pixels [B, 3, h*f, w*f].

        chunk: decode that many images at a time (the same result, less memory).
        tile: decode the high-resolution levels in tiles of about this many output pixels a side
        (less GPU memory; see tiled_decode.py): equal to the whole decode up to float rounding.
        A GAN decoder draws its noise once for the whole batch from `generator`, so chunked, tiled
        and whole decodes see the same noise.
        """
        require(bits.dim() == 4 and bits.shape[1] == self.config.z_channels,
                f"bits must be [B, {self.config.z_channels}, h, w] for this tokenizer, got {list(bits.shape)}")
        require(bits.numel() > 0, f"bits {list(bits.shape)} hold no tokens: nothing to decode")
        require(chunk is None or (isinstance(chunk, int) and chunk >= 1), f"chunk must be an integer >= 1, got {chunk}")
        require(tile is None or (isinstance(tile, int) and tile >= 1), f"tile must be a positive number of pixels, got {tile}")
        bits = bits.float()  # ±1 in any dtype; float32 as the official decoder gets them (style statistics, noise)
        noise = None
        if self.config.gan_decoder:
            noise = torch.randn(bits.shape, generator=generator, device=bits.device, dtype=bits.dtype)
        step = bits.shape[0] if chunk is None else chunk
        outs = []
        for i in range(0, bits.shape[0], step):
            b = bits[i:i + step]
            n = None if noise is None else noise[i:i + step]
            if tile is None:
                outs.append(self.decoder(b, noise=n))
            else:
                outs.append(decode_tiled(self.decoder, b, n, tile))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def config_from_shapes(shapes: dict, origin: str = "autoencoder") -> AutoencoderConfig:
    """The ddconfig (and GAN flag) a bare `encoder.*` / `decoder.*` state dict was built with."""
    def get(key):
        if key not in shapes:
            raise BitDanceError(f"{origin}: key '{key}' is missing; this is not a BitDance binary tokenizer")
        return tuple(shapes[key])

    levels = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("decoder.up.")})
    require(levels == list(range(len(levels))) and levels, f"{origin}: no decoder.up.<level> keys; not a BitDance tokenizer")
    nrb = len({k.split(".")[4] for k in shapes if k.startswith("decoder.up.0.block.")})
    ch = get("encoder.conv_in.weight")[0] if "encoder.conv_in.weight" in shapes else get("decoder.up.0.block.0.conv1.weight")[0]
    mult = []
    for i in levels:
        cout = get(f"decoder.up.{i}.block.0.conv1.weight")[0]
        require(cout % ch == 0, f"{origin}: decoder level {i} has {cout} channels, not a multiple of ch {ch}")
        mult.append(cout // ch)
    z = get("decoder.adaptive.0.gamma.weight")[1]
    cin = get("decoder.conv_in.weight")[1]
    require(cin in (z, 2 * z), f"{origin}: decoder.conv_in takes {cin} channels, expected {z} (plain) or {2 * z} (GAN)")
    in_ch = get("encoder.conv_in.weight")[1] if "encoder.conv_in.weight" in shapes else 3
    return AutoencoderConfig(ch=ch, ch_mult=tuple(mult), num_res_blocks=nrb, z_channels=z, in_channels=in_ch,
                             out_ch=get("decoder.conv_out.weight")[0], gan_decoder=cin == 2 * z)


def build_autoencoder(cfg: AutoencoderConfig) -> BinaryAutoencoder:
    with torch.device("meta"):
        return BinaryAutoencoder(cfg)
