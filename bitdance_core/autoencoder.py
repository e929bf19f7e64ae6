"""The binary tokenizer: a conv autoencoder whose latent is the sign of the encoder output.

Key names follow the released `ae.safetensors` / `ae_*.safetensors` (bare `encoder.*`, `decoder.*`).
Two decoders exist: the plain one (T2I, d16c32, ImageNet) and the GAN decoder (d32c128, d32c256),
which concatenates a Gaussian noise block to the bits before `conv_in`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .errors import BitDanceError, require

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
        return cls(ch=int(dd["ch"]), ch_mult=tuple(int(m) for m in dd["ch_mult"]), num_res_blocks=int(dd["num_res_blocks"]),
                   z_channels=int(dd["z_channels"]), in_channels=int(dd.get("in_channels", 3)),
                   out_ch=int(dd.get("out_ch", 3)), gan_decoder=bool(cfg.get("gan_decoder", False)))

    def to_json(self) -> dict:
        return {"ddconfig": {"double_z": False, "z_channels": self.z_channels, "in_channels": self.in_channels,
                             "out_ch": self.out_ch, "ch": self.ch, "ch_mult": list(self.ch_mult),
                             "num_res_blocks": self.num_res_blocks}, "gan_decoder": self.gan_decoder}


def swish(x):
    return x * torch.sigmoid(x)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, cin, eps=1e-6)
        self.norm2 = nn.GroupNorm(32, cout, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else None

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return h + (self.nin_shortcut(x) if self.nin_shortcut is not None else x)


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
        return depth_to_space_dcr(self.conv1(x), 2)


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm without affine, rescaled per channel from the statistics of the decoder's input bits."""

    def __init__(self, z_channels: int, channels: int, eps: float = 1e-6):
        super().__init__()
        self.gn = nn.GroupNorm(32, channels, eps=eps, affine=False)
        self.gamma = nn.Linear(z_channels, channels)
        self.beta = nn.Linear(z_channels, channels)
        self.eps = eps

    def forward(self, x, style_std, style_mean):
        b, c = x.shape[:2]
        scale = self.gamma(style_std).view(b, c, 1, 1)
        bias = self.beta(style_mean).view(b, c, 1, 1)
        return scale * self.gn(x) + bias


def style_stats(z: torch.Tensor, eps: float = 1e-6):
    """Per-channel std (unbiased var, as upstream) and mean of the latent over its whole grid."""
    flat = z.flatten(2)
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
        x = self.conv_in(x)
        for level in self.down:
            for blk in level.block:
                x = blk(x)
            if hasattr(level, "downsample"):
                x = level.downsample(x)
        for blk in self.mid_block:
            x = blk(x)
        return self.conv_out(swish(self.norm_out(x)))


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
        return self.conv_out(swish(self.norm_out(x)))

    def trunk(self, z, generator=None, noise=None, stop: int = 0):
        """conv_in, the mid blocks and the levels down to `stop` (its ResBlocks, not its upsampler)."""
        std, mean = style_stats(z)
        if self.gan:
            if noise is None:
                noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            z = torch.cat([z, noise], dim=1)
        x = self.conv_in(z)
        for blk in self.mid_block:
            x = blk(x)
        for i in reversed(range(stop, len(self.up))):
            x = self.adaptive[i](x, std, mean)
            for blk in self.up[i].block:
                x = blk(x)
            if i > stop:
                x = self.up[i].upsample(x)
        return x


class BinaryAutoencoder(nn.Module):
    """encode: image in [-1, 1] -> ±1 bits [B, z, H/f, W/f]; decode: bits -> image."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def family(self) -> str:
        """A tag naming what decodes these bits (used to refuse bits from another tokenizer)."""
        return f"bitdance-z{self.config.z_channels}-f{self.downsample}"

    def _param_dtype(self):
        return self.decoder.conv_out.weight.dtype

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
        require(chunk is None or (isinstance(chunk, int) and chunk >= 1), f"chunk must be an integer >= 1, got {chunk}")
        require(tile is None or (isinstance(tile, int) and tile >= 1), f"tile must be a positive number of pixels, got {tile}")
        bits = bits.to(self._param_dtype())
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
                from .tiled_decode import decode_tiled

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


def find_autoencoder_files(path: str) -> tuple[str | None, str]:
    """(config json or None, weights) for a model folder, a diffusers folder, a BitDance-Tokenizer
    `ae_*.safetensors` (config `ae_*_config.json` beside it) or an ImageNet `ae_*.pt`.
    Without a config file the ddconfig is read from the tensor shapes."""
    if os.path.isdir(path):
        for cfg, w in (("ae_config.json", "ae.safetensors"),
                       (os.path.join("autoencoder", "config.json"), os.path.join("autoencoder", "diffusion_pytorch_model.safetensors"))):
            if os.path.isfile(os.path.join(path, cfg)):
                return os.path.join(path, cfg), os.path.join(path, w)
        raise BitDanceError(f"{path}: no ae_config.json (official layout) or autoencoder/config.json (diffusers layout)")
    stem, ext = os.path.splitext(path)
    if ext in (".safetensors", ".pt", ".pth", ".ckpt"):
        if not os.path.isfile(path):
            raise BitDanceError(f"missing file: {path}")
        for cfg in (stem + "_config.json", os.path.join(os.path.dirname(path), "ae_config.json")):
            if os.path.isfile(cfg):
                return cfg, path
        return None, path
    raise BitDanceError(f"{path}: expected a folder with ae_config.json, an ae_*.safetensors file or an ae_*.pt file")


def build_autoencoder(cfg: AutoencoderConfig) -> BinaryAutoencoder:
    with torch.device("meta"):
        return BinaryAutoencoder(cfg)


def tokenizer_source(path: str):
    """The bare `encoder.*` / `decoder.*` tensors of a tokenizer file (safetensors or .pt)."""
    from .checkpoints import load_pt, open_safetensors, source_from_state_dict

    if path.endswith(".safetensors"):
        src = open_safetensors([path])
    else:
        obj = load_pt(path)
        sd = next((obj[k] for k in ("state_dict", "ema", "model") if isinstance(obj.get(k), dict)), obj)
        src = source_from_state_dict(sd, path)
    for prefix in ("vae.", "runtime_model.", "autoencoder."):  # a whole ImageNet model, or a diffusers wrapper
        if not any(k.startswith(("encoder.", "decoder.")) for k in src.keys()) and any(k.startswith(prefix) for k in src.keys()):
            src = src.with_prefix_stripped(prefix)
    # .pt: like the official loader (strict=False for ae_*.pt), keys outside encoder/decoder are not
    # ours and are left alone; safetensors files are checked strictly.
    extra = [] if path.endswith(".safetensors") else [k for k in src.keys() if not k.startswith(("encoder.", "decoder."))]
    return src, extra


def load_autoencoder(path: str, device="cpu", dtype=torch.float32) -> BinaryAutoencoder:
    from .checkpoints import materialize, read_json

    cfg_path, weights = find_autoencoder_files(path)
    src, extra = tokenizer_source(weights)
    if cfg_path is not None:
        cfg = AutoencoderConfig.from_json(read_json(cfg_path), cfg_path)
    else:
        cfg = config_from_shapes(src.shapes, weights)
    ae = build_autoencoder(cfg)
    return materialize(ae, src, "autoencoder", device, dtype, ignore=extra)
