"""ImageNet class-conditional generation: class label -> bits, as the official `model.sample` does, and loading
the released checkpoints.

Guidance rows: [cond x B; null class x B]. Per step i of T, the guidance is 1 + (cfg - 1) * i / T
("linear", the default) or cfg ("constant"); at exactly 1 (step 0 of "linear") the head samples the
doubled batch without guidance, so the cond and null rows get their own noise and their own bits
(both are fed back), as upstream. Noise comes from one explicit generator seeded with `seed` on the
model's device, in the official order, so `seed` means what `torch.manual_seed(seed)` just before the
official `model.sample` means.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import torch

from ..errors import BitDanceError, require
from ..formats.checkpoints import TensorSource, check_keys, load_pt, materialize, open_safetensors, source_from_state_dict
from ..models.imagenet import ImageNetModel, KVCache, build_imagenet, first_step_mask, float32_names
from ..models.imagenet_config import ImageNetConfig, apply_overrides, config_beside, config_from_shapes, read_config_file
from ..models.positions import blocks_to_raster, raster_to_blocks
from ..models.sampler import euler_maruyama, skip_draws
from . import continuation
from .cpu_threads import generation_threads
from .imagenet_classes import model_class_names, parse_classes
from .tokenizers import find_autoencoder_files, tokenizer_source

Callback = Callable[[int, int, torch.Tensor], None]
SCHEDULES = ("linear", "constant")


class ImageNetPipeline:
    def __init__(self, model: ImageNetModel, device, name: str = ""):
        self.model = model
        self.config = model.config
        self.autoencoder = model.vae
        self.device = torch.device(device)
        self.name = name or self.config.name

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def parallel_num(self) -> int:
        return self.config.parallel_num

    @property
    def default_cfg(self) -> float:
        return self.config.default_cfg

    @property
    def image_size(self) -> int:
        return self.config.resolution

    @property
    def class_names(self) -> list[str]:
        """ImageNet names for a 1000-class model; the class numbers "0", "1", ... otherwise."""
        return model_class_names(self.num_classes)

    def block_grid(self) -> continuation.BlockGrid:
        """The blocks of a generation (what a continuation's keep mask is made of): the latent
        positions one AR step draws are a block (patch order) or a run of a raster row."""
        c = self.config
        lat, p, P = c.grid * c.patch_size, c.patch_size, c.parallel_num
        if c.parallel_mode == "patch" or P == 1:
            bh = bw = c.block_side * p
        else:
            require(c.grid % P == 0, f"{self.name}: its {P} tokens per step do not form rectangles of the "
                                     f"{c.grid}x{c.grid} grid (parallel_mode 'standard'); continuing an image needs them to")
            bh, bw = p, P * p
        return continuation.BlockGrid(lat, lat, bh, bw, c.latent_dim, c.down_size)

    def guidance(self, cfg: float, schedule: str, step: int) -> float:
        if cfg <= 1.0:
            return 1.0
        if schedule == "constant":
            return cfg
        start = 1.0
        return start + (cfg - start) * step / self.config.steps

    def generate(self, classes: Sequence[int | str] | int | str, steps: int = 100, cfg: float | None = None,
                 cfg_schedule: str = "linear", seed: int = 0, callback: Callback | None = None,
                 init_bits: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """±1 bits [B, 32, 16, 16] (float32) for a batch of class labels (ids or names; id == num_classes
        is the unconditional "null" class).

        init_bits (±1 [1 or B, 32, 16, 16]) and keep (bool block mask, see block_grid, True = keep):
        continue an image. Kept blocks are these bits, fed back as if sampled; the random draws are
        those of an unforced run (pipelines/continuation.py). At an unguided step with null rows
        (step 0 of "linear") the null rows keep their own samples, as in the unforced run."""
        labels = parse_classes(classes, self.num_classes, allow_null=True)
        eff = self.default_cfg if cfg is None else cfg
        guided = isinstance(eff, (int, float)) and eff > 1.0
        rows = len(labels) * (2 if guided else 1) * self.parallel_num
        with generation_threads(self.device, rows, max(self.config.dim, self.config.diff_dim)):  # small models: fewer threads
            return self._generate(labels, steps, cfg, cfg_schedule, seed, callback, init_bits, keep)

    @torch.no_grad()
    def _generate(self, labels, steps, cfg, cfg_schedule, seed, callback, init_bits, keep) -> torch.Tensor:
        cfg = self.default_cfg if cfg is None else cfg
        require(isinstance(steps, int) and steps >= 1, f"steps must be an integer >= 1, got {steps}")
        require(isinstance(cfg, (int, float)) and math.isfinite(cfg) and cfg >= 0, f"cfg (guidance scale) must be a finite number >= 0, got {cfg}")
        require(cfg_schedule in SCHEDULES, f"cfg_schedule '{cfg_schedule}' unknown; use one of {list(SCHEDULES)}")
        require(isinstance(seed, int), f"seed must be an integer, got {seed!r}")

        m, c, dev = self.model, self.config, self.device
        B, P, T = len(labels), c.parallel_num, c.steps
        y = torch.tensor(labels, dtype=torch.long, device=dev)
        if cfg > 1.0:
            y = torch.cat([y, torch.full_like(y, c.num_classes)])
        R = y.shape[0]
        gen = torch.Generator(device=dev).manual_seed(seed)
        cont = continuation.prepare(self.block_grid(), init_bits, keep, B, self._to_tokens, dev)
        cache = KVCache(c, R, c.grid * c.grid + c.cls_token_num, m.dtype, dev)
        pos = m.pos_for_diff.weight
        net = m.head.net

        x = m.cls_embedding(y).view(R, c.cls_token_num, c.dim)
        if P > 1:
            x = torch.cat([x, m.query_token.expand(R, -1, -1)], dim=1)
        start, mask = 0, first_step_mask(c, dev)
        out, last = [], None
        for i in range(T):
            if i > 0:
                x = m.proj_in(last.to(m.dtype))
                start, mask = P * (i - 1) + c.cls_token_num + P - 1, None
            hidden = m.forward_tokens(x, cache, start, mask)[:, -P:] + pos[i * P:(i + 1) * P]
            if c.head_kind == "mlp":
                hidden = hidden.reshape(-1, c.dim)
            g = self.guidance(cfg, cfg_schedule, i)
            own_null = R > B and g <= 1.0  # the step-0 quirk: the null rows get samples of their own
            if cont is not None and cont.keeps_all(i) and not own_null:
                # the head's draws without its compute: the seed means the same as without a mask
                skip_draws("euler_maruyama", hidden, g, steps, gen, x_dim=c.token_dim)
                last = torch.cat([cont.tokens[:, i]] * (R // B))
            else:
                pred = euler_maruyama(net, hidden, g, steps, gen, x_dim=c.token_dim, time_shift=c.time_shift)
                last = torch.sign(pred).reshape(R, P, c.token_dim)
                if cont is not None:
                    kept = cont.force(i, last[:B])
                    last = torch.cat([kept, last[B:]]) if own_null else torch.cat([kept] * (R // B))
            out.append(last[:B])
            if callback is not None:
                callback(i, T, self._to_grid(cont.preview(out) if cont is not None else out))
        return self._to_grid(out)

    def _to_grid(self, blocks: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Tokens in generation order (those not generated yet are 0) -> [B, latent_dim, H, W] float32."""
        c = self.config
        done = (blocks if isinstance(blocks, torch.Tensor) else torch.cat(blocks, dim=1)).float()
        b, n, g = done.shape[0], c.grid * c.grid, c.grid
        if done.shape[1] < n:
            done = torch.cat([done, done.new_zeros(b, n - done.shape[1], done.shape[2])], dim=1)
        if c.parallel_mode == "patch" and c.parallel_num > 1:
            return blocks_to_raster(done, g, g, c.block_side)
        p = c.patch_size
        x = done.reshape(b, g, g, c.latent_dim, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c.latent_dim, g * p, g * p)

    def _to_tokens(self, bits: torch.Tensor) -> torch.Tensor:
        """[B, latent_dim, H, W] -> tokens in generation order [B, N, token_dim] (the inverse of _to_grid)."""
        c = self.config
        if c.parallel_mode == "patch" and c.parallel_num > 1:
            return raster_to_blocks(bits, c.block_side)
        b, g, p = bits.shape[0], c.grid, c.patch_size
        x = bits.reshape(b, c.latent_dim, g, p, g, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, g * g, c.token_dim)

    @torch.no_grad()
    def decode(self, bits: torch.Tensor, tile: int | None = None, chunk: int | None = None) -> torch.Tensor:
        """Pixels [B, 3, H, W], about [-1, 1]."""
        return self.autoencoder.decode(bits.to(self.device), tile=tile, chunk=chunk)


# ---- loading ---------------------------------------------------------------------------------------

def checkpoint_source(path: str) -> TensorSource:
    """The model's tensors from a released `.pt` (`ema` preferred, else `model`) or a safetensors re-save."""
    if os.path.isdir(path):
        raise BitDanceError(f"{path}: is a folder; pass the checkpoint file (BitDance_B_1x.pt or a .safetensors re-save)")
    if path.endswith(".safetensors"):
        src = open_safetensors([path])
    else:
        obj = load_pt(path)
        if isinstance(obj.get("ema"), dict):
            sd = obj["ema"]
        elif isinstance(obj.get("model"), dict):
            sd = obj["model"]
        elif isinstance(obj.get("state_dict"), dict):
            sd = obj["state_dict"]
        elif any(isinstance(v, torch.Tensor) for v in obj.values()):
            sd = obj
        else:
            raise BitDanceError(f"{path}: holds no 'ema' or 'model' state dict (keys: {sorted(obj)[:8]})")
        src = source_from_state_dict(sd, path)
    for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
        if src.shapes and all(k.startswith(prefix) for k in src.keys()):
            src = src.with_prefix_stripped(prefix)
    return src


def with_vae(src: TensorSource, vae: str) -> TensorSource:
    """The checkpoint's tensors with the tokenizer file's encoder/decoder in place of `vae.*`
    (as upstream's load_vae_weight: the file wins, keys it lacks stay those of the checkpoint).
    `vae`: an `ae_*.pt` or `ae_*.safetensors` file, or a tokenizer folder."""
    vsrc, _ = tokenizer_source(find_autoencoder_files(vae)[1])
    if not any(k.startswith(("encoder.", "decoder.")) for k in vsrc.keys()):
        raise BitDanceError(f"{vae}: no encoder.* or decoder.* tensors, so it is not a tokenizer file (it holds e.g. "
                            f"{sorted(vsrc.keys())[:3]}); give the tokenizer's ae_*.pt or ae_*.safetensors, or leave "
                            "the tokenizer out to use the one inside the checkpoint")
    out = TensorSource(files=dict(src.files), shapes=dict(src.shapes), tensors=dict(src.tensors), origin=src.origin,
                       stored=dict(src.stored))
    for k in vsrc.keys():
        if k.startswith(("encoder.", "decoder.")):
            vsrc.renamed(k, "vae." + k, out)
    out.origin = f"{src.origin} + {vae}"
    return out


def resolve_config(src: TensorSource, checkpoint: str, config) -> ImageNetConfig:
    """Inferred from the shapes; an explicit config (argument, else a JSON file beside the checkpoint) wins."""
    if isinstance(config, ImageNetConfig):
        return config
    cfg = config_from_shapes(src.shapes, src.origin)
    if isinstance(config, str):
        cfg = apply_overrides(cfg, read_config_file(config), config)
    elif isinstance(config, dict):
        cfg = apply_overrides(cfg, config, "config")
    elif config is None:
        beside = config_beside(checkpoint)
        if beside is not None:
            cfg = apply_overrides(cfg, read_config_file(beside), beside)
    else:
        raise BitDanceError(f"config must be a path, a dict or an ImageNetConfig, got {type(config).__name__}")
    return cfg


def load_imagenet(checkpoint: str, vae: str | None = None, config=None, device="cpu", dtype=torch.float32):
    """The released ImageNet checkpoint (plus optionally the tokenizer file) as an ImageNetPipeline."""
    from ..pipelines.imagenet import ImageNetPipeline

    src = checkpoint_source(checkpoint)
    if vae is not None:
        src = with_vae(src, vae)
    cfg = resolve_config(src, checkpoint, config)
    cfg.validate(checkpoint)
    model = build_imagenet(cfg)
    check_keys(model, src, f"ImageNet {cfg.name}")
    materialize(model, src, f"ImageNet {cfg.name}", device, dtype, keep_fp32=float32_names(model).__contains__)
    # As the official create_model: the whole model is channels_last, which decides the decoder's conv path.
    model.vae.to(memory_format=torch.channels_last)
    require(all(p.device.type != "meta" for p in model.parameters()), f"{checkpoint}: some weights were not loaded")
    return ImageNetPipeline(model, device, name=os.path.splitext(os.path.basename(checkpoint))[0])
