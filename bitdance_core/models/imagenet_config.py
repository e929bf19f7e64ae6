"""What an ImageNet BitDance checkpoint is: read from its tensor shapes, overridden by an explicit config.

The shapes tell everything but the backbone's head count (1x vs 4x/16x, width, depth, class tokens,
classes, head type and size, the grid, the tokenizer); the head count defaults to width/64, true for
every released model. An explicit config wins: a dict, a JSON file in the form of the official
constructor arguments (`{"dim": 768, "n_head": 12, ...}`, or that object under "kwargs"), or a
BiliSakura-style `{"architecture": "BitDance-B", ...}`.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field, fields

from ..errors import BitDanceError, config_value, require
from .ae_layers import AutoencoderConfig
from .autoencoder import config_from_shapes as ae_config_from_shapes
from .head import HeadConfig

# Constructor arguments of upstream BitDance that only matter for training (accepted, unused).
_TRAINING_ONLY = {"diff_batch_mul", "grad_checkpointing", "class_dropout_prob", "trained_vae", "drop_rate",
                  "perturb_schedule", "perturb_rate", "perturb_rate_max", "time_schedule", "P_std", "P_mean"}
_FIELDS = {"dim", "n_layer", "n_head", "diff_layers", "diff_dim", "diff_adanln_layers", "latent_dim", "down_size",
           "patch_size", "resolution", "cls_token_num", "num_classes", "parallel_num", "parallel_mode", "time_shift",
           "head_kind", "ffn_hidden"}
# Released presets (upstream BitDance_B/L/H).
ARCHS = {"B": dict(dim=768, n_layer=24, n_head=12, diff_layers=6, diff_dim=768, diff_adanln_layers=2),
         "L": dict(dim=1024, n_layer=32, n_head=16, diff_layers=8, diff_dim=1024, diff_adanln_layers=2),
         "H": dict(dim=1280, n_layer=40, n_head=20, diff_layers=12, diff_dim=1280, diff_adanln_layers=3)}
# Guidance of the official README commands: (dim, n_layer, parallel_num) -> cfg.
DEFAULT_CFG = {(768, 24, 1): 3.2, (768, 24, 4): 3.9, (768, 24, 16): 6.1, (1024, 32, 1): 4.0, (1280, 40, 1): 4.55}


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


@dataclass
class ImageNetConfig:
    dim: int = 768
    n_layer: int = 24
    n_head: int = 12
    diff_layers: int = 6
    diff_dim: int = 768
    diff_adanln_layers: int = 2
    latent_dim: int = 32
    down_size: int = 16
    patch_size: int = 1
    resolution: int = 256
    cls_token_num: int = 64
    num_classes: int = 1000
    parallel_num: int = 1  # 1: the 1x models (MLP head, raster order); 4 / 16: query tokens, transformer head
    parallel_mode: str = "patch"  # "patch" (released) or "standard" (raster order)
    time_shift: float = 1.0
    head_kind: str = ""  # "mlp" or "transformer"; default: mlp for 1x, transformer otherwise
    ffn_hidden: int = 0  # default: find_multiple(int(8*dim/3), 256), as upstream
    ae: AutoencoderConfig = field(default_factory=AutoencoderConfig)

    def __post_init__(self):
        if not self.head_kind:
            self.head_kind = "mlp" if self.parallel_num == 1 else "transformer"
        if not self.ffn_hidden:
            self.ffn_hidden = find_multiple(int(2 * 4 * self.dim / 3), 256)

    @property
    def grid(self) -> int:
        """Latent tokens per side (16 at 256 px)."""
        return self.resolution // (self.down_size * self.patch_size)

    @property
    def token_dim(self) -> int:
        return self.latent_dim * self.patch_size ** 2

    @property
    def block_side(self) -> int:
        return int(round(math.sqrt(self.parallel_num)))

    @property
    def steps(self) -> int:
        """Autoregressive steps: tokens / parallel_num."""
        return self.grid * self.grid // self.parallel_num

    @property
    def default_cfg(self) -> float:
        """The README guidance for a released shape; else by tokens per step (1x: 4.0, 4x: 3.9, more: 6.1)."""
        known = DEFAULT_CFG.get((self.dim, self.n_layer, self.parallel_num))
        if known is not None:
            return known
        return 4.0 if self.parallel_num == 1 else 3.9 if self.parallel_num <= 4 else 6.1

    @property
    def name(self) -> str:
        arch = next((a for a, v in ARCHS.items() if v["dim"] == self.dim and v["n_layer"] == self.n_layer), None)
        return f"BitDance-{arch}-{self.parallel_num}x" if arch else f"BitDance-d{self.dim}x{self.n_layer}-{self.parallel_num}x"

    def head_config(self) -> HeadConfig:
        return HeadConfig(ch_target=self.token_dim, ch_cond=self.dim, ch_latent=self.diff_dim, depth_latent=self.diff_layers,
                          depth_adanln=self.diff_adanln_layers, use_swiglu=True, parallel_num=self.parallel_num,
                          time_shift=self.time_shift, kind=self.head_kind, head_dim=64, sigmoid_output=False)

    def validate(self, origin: str = "ImageNet config") -> None:
        require(self.dim % self.n_head == 0 and (self.dim // self.n_head) % 4 == 0,
                f"{origin}: width {self.dim} does not split into {self.n_head} heads of a size divisible by 4 (2D RoPE)")
        require(self.head_kind in ("mlp", "transformer"), f"{origin}: head_kind '{self.head_kind}' is not 'mlp' or 'transformer'")
        require(self.parallel_mode in ("patch", "standard"), f"{origin}: parallel_mode '{self.parallel_mode}' is not 'patch' or 'standard'")
        require(self.block_side ** 2 == self.parallel_num, f"{origin}: parallel_num {self.parallel_num} must be a square (1, 4, 16)")
        require(self.grid >= 1 and self.grid % self.block_side == 0,
                f"{origin}: the {self.grid}x{self.grid} token grid does not split into {self.block_side}x{self.block_side} blocks")
        require(self.patch_size == 1 or (self.parallel_num == 1 or self.parallel_mode == "standard"),
                f"{origin}: patch_size {self.patch_size} with parallel_mode 'patch' is not supported (upstream only uses 1)")
        require(self.cls_token_num >= 1, f"{origin}: cls_token_num must be >= 1")
        require(self.latent_dim == self.ae.z_channels,
                f"{origin}: latent_dim {self.latent_dim} differs from the tokenizer's z_channels {self.ae.z_channels}")
        require(self.down_size == self.ae.downsample,
                f"{origin}: down_size {self.down_size} differs from the tokenizer's factor {self.ae.downsample}")
        require(not self.ae.gan_decoder, f"{origin}: the ImageNet models use the plain decoder, this tokenizer has a GAN decoder")
        self.head_config().validate(origin)

    def to_json(self) -> dict:
        d = asdict(self)
        d["ae"] = self.ae.to_json()
        return d


def _count(shapes: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)})


def config_from_shapes(shapes: dict, origin: str = "checkpoint") -> ImageNetConfig:
    """Everything the tensor shapes tell (model keys without any prefix, `vae.*` included)."""
    def get(key):
        if key not in shapes:
            raise BitDanceError(f"{origin}: key '{key}' is missing; this is not a BitDance ImageNet checkpoint")
        return tuple(shapes[key])

    ae = ae_from_shapes({k[4:]: v for k, v in shapes.items() if k.startswith("vae.")}, origin)
    dim = get("emb_norm.weight")[0]
    n_cls = get("cls_embedding.weight")
    require(n_cls[1] % dim == 0, f"{origin}: cls_embedding width {n_cls[1]} is not a multiple of the model width {dim}")
    tokens = get("pos_for_diff.weight")[0]
    grid = int(round(math.sqrt(tokens)))
    require(grid * grid == tokens, f"{origin}: pos_for_diff has {tokens} rows, not a square grid")
    token_dim = get("proj_in.w1.weight")[1]
    patch = int(round(math.sqrt(token_dim // ae.z_channels)))
    require(patch * patch * ae.z_channels == token_dim,
            f"{origin}: proj_in takes {token_dim} channels, not z_channels {ae.z_channels} times a square")
    parallel = get("query_token")[1] + 1 if "query_token" in shapes else 1
    transformer = any(k.startswith("head.net.res_blocks.0.attn.") for k in shapes)
    return ImageNetConfig(
        dim=dim, n_layer=_count(shapes, "layers."), n_head=max(1, dim // 64),
        diff_layers=_count(shapes, "head.net.res_blocks."), diff_dim=get("head.net.input_proj.weight")[0],
        diff_adanln_layers=_count(shapes, "head.net.ada_ln_blocks."), latent_dim=ae.z_channels, down_size=ae.downsample,
        patch_size=patch, resolution=grid * ae.downsample * patch, cls_token_num=n_cls[1] // dim,
        num_classes=n_cls[0] - 1, parallel_num=parallel, head_kind="transformer" if transformer else "mlp",
        ffn_hidden=get("layers.0.feed_forward.w2.weight")[1], ae=ae)


def ae_from_shapes(shapes: dict, origin: str) -> AutoencoderConfig:
    if not shapes:
        raise BitDanceError(f"{origin}: has no vae.* keys (the tokenizer); pass the tokenizer file (ae_d16c32.pt) as vae")
    return ae_config_from_shapes(shapes, origin)


def read_config_file(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise BitDanceError(f"cannot read config {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise BitDanceError(f"{path}: not valid JSON ({e})") from e


def is_imagenet_config(cfg: dict) -> bool:
    body = cfg.get("kwargs", cfg) if isinstance(cfg, dict) else None
    return isinstance(body, dict) and (bool(set(body) & (_FIELDS - {"time_shift"}))
                                       or str(cfg.get("architecture", cfg.get("model", ""))).startswith("BitDance-"))


def config_beside(checkpoint: str) -> str | None:
    """`<name>_config.json`, `<name>.json` or `config.json` beside the checkpoint, when it describes an ImageNet model."""
    stem = os.path.splitext(checkpoint)[0]
    for path in (stem + "_config.json", stem + ".json", os.path.join(os.path.dirname(checkpoint), "config.json")):
        if os.path.isfile(path):
            try:
                cfg = read_config_file(path)
            except BitDanceError as e:
                warnings.warn(f"ignoring {path}: {e}")
                continue
            if is_imagenet_config(cfg):
                return path
    return None


def apply_overrides(base: ImageNetConfig, cfg: dict, origin: str) -> ImageNetConfig:
    """Explicit values win over the inferred ones. Accepts the constructor-argument form, the same under
    "kwargs" (the fixture's form), and {"architecture": "BitDance-B", ...}."""
    if not isinstance(cfg, dict):
        raise BitDanceError(f"{origin}: the config must be a JSON object, got {type(cfg).__name__}")
    body = dict(cfg["kwargs"]) if isinstance(cfg.get("kwargs"), dict) else dict(cfg)
    arch = str(cfg.get("architecture", cfg.get("model", body.pop("model", ""))) or "")
    values = {}
    if arch:
        key = arch.replace("BitDance-", "").split("-")[0].split("_")[0].upper()
        require(key in ARCHS, f"{origin}: architecture '{arch}' unknown; expected BitDance-B, BitDance-L or BitDance-H")
        values.update(ARCHS[key])
    ae = base.ae
    dd = cfg.get("ddconfig") or cfg.get("vae_ddconfig")
    if isinstance(dd, dict):
        ae = AutoencoderConfig.from_json({"ddconfig": dd, "gan_decoder": False}, origin)
    for k in ("architecture", "ddconfig", "vae_ddconfig", "ae"):
        body.pop(k, None)
    unknown = sorted(set(body) - _FIELDS - _TRAINING_ONLY)
    if unknown and "kwargs" not in cfg:  # a flat file may carry descriptive keys (BiliSakura: source_key, ...)
        warnings.warn(f"{origin}: ignoring config key(s) {unknown}")
    elif unknown:
        raise BitDanceError(f"{origin}: unknown config key(s) {unknown}; allowed: {sorted(_FIELDS)} (and the training-only "
                            f"{sorted(_TRAINING_ONLY)})")
    values.update({k: v for k, v in body.items() if k in _FIELDS})
    out = asdict(base)
    out["ae"] = ae
    kinds = {f.name: f.type for f in fields(ImageNetConfig)}
    for k, v in values.items():
        if kinds[k] == "str":
            require(isinstance(v, str), f"{origin}: {k} is {v!r}; expected a string")
            out[k] = v
        else:
            out[k] = config_value(values, k, float if kinds[k] == "float" else int, origin)
    if "parallel_num" in values and "head_kind" not in values and values["parallel_num"] != base.parallel_num:
        out["head_kind"] = ""
    if "dim" in values and "ffn_hidden" not in values and values["dim"] != base.dim:
        out["ffn_hidden"] = 0
    return ImageNetConfig(**out)
