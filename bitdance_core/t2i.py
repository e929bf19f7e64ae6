"""The text-to-image pipeline: prompt -> bits, block by block.

Both guidance branches run in ONE batched forward: rows [cond x B; uncond x B], prompts left-padded
to a common length, each row with its own RoPE positions and key mask. The KV cache is allocated
once; the backbone pass after the last block is skipped (its output would be unused).
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .autoencoder import AutoencoderConfig, BinaryAutoencoder, build_autoencoder
from .checkpoints import materialize, open_safetensors, open_sharded, read_json
from .cpu_threads import generation_threads
from .errors import BitDanceError, require
from .head import DiffusionHead, HeadConfig
from .positions import blocks_to_raster, sincos_2d_blocks
from .projector import Projector
from .prompts import PromptCodec, PromptTokens, load_prompt_codec
from .qwen3 import KVCache, Qwen3Backbone, Qwen3Config
from .sampler import SAMPLERS
from .sizes import OFFICIAL_SIZES, SizeRule, max_res_token

Callback = Callable[[int, int, torch.Tensor], None]


@dataclass
class ModelFiles:
    """Where each part of a text-to-image model lives (official or diffusers layout)."""

    layout: str
    llm_config: str
    llm_folder: str
    tokenizer_folder: str
    ae_config: str
    ae_weights: str
    head_config: str
    head_weights: str
    projector_weights: str

    @classmethod
    def find(cls, path: str) -> "ModelFiles":
        if not os.path.isdir(path):
            raise BitDanceError(f"model folder not found: {path}")
        j = lambda *p: os.path.join(path, *p)
        if os.path.isfile(j("text_encoder", "config.json")):
            d = "diffusion_pytorch_model.safetensors"
            found = cls("diffusers", j("text_encoder", "config.json"), j("text_encoder"), j("tokenizer"),
                        j("autoencoder", "config.json"), j("autoencoder", d), j("diffusion_head", "config.json"),
                        j("diffusion_head", d), j("projector", d))
        elif os.path.isfile(j("config.json")):
            found = cls("official", j("config.json"), path, path, j("ae_config.json"), j("ae.safetensors"),
                        j("vision_head_config.json"), j("vision_head.safetensors"), j("projector.safetensors"))
        else:
            found = None
        if found is not None:
            # The configs decide what the folder is; missing weights are named when loading.
            for cfg in (found.head_config, found.ae_config):
                if not os.path.isfile(cfg):
                    raise BitDanceError(f"{path}: not a BitDance text-to-image model folder: {cfg} is missing")
            return found
        raise BitDanceError(f"{path}: not a BitDance model folder: expected config.json (official layout) "
                            "or text_encoder/config.json (diffusers layout)")


class T2IPipeline:
    def __init__(self, backbone: Qwen3Backbone, head: DiffusionHead, projector: Projector,
                 autoencoder: BinaryAutoencoder, codec: PromptCodec, device, name: str = ""):
        self.backbone, self.head, self.projector, self.autoencoder, self.codec = backbone, head, projector, autoencoder, codec
        self.device = torch.device(device)
        self.name = name
        self.parallel_num = head.config.parallel_num
        self.block_side = int(round(math.sqrt(self.parallel_num)))
        self.latent_channels = autoencoder.config.z_channels
        self.downsample = autoencoder.downsample
        self.samplers = dict(SAMPLERS)  # per pipeline, so accelerations (graphs.py) can wrap them
        self.size_rule = SizeRule(self.downsample, self.parallel_num, max_res_token(codec.has_token))

    @property
    def block_pixels(self) -> int:
        return self.block_side * self.downsample

    @property
    def supported_sizes(self) -> list[tuple[int, int]]:
        """The sizes this model offers (sizes.py): the official ones first where it makes them all."""
        return self.size_rule.sizes

    def encode_prompt(self, prompt: str, negative_prompt: str | None = None) -> PromptTokens:
        return self.codec.encode_prompt(prompt, negative_prompt)

    def check_size(self, height: int, width: int) -> None:
        self.size_rule.check(height, width, self.name or "this model")
        self.codec.image_prefix(height // self.downsample, width // self.downsample, self.parallel_num)
        if self.size_rule.has_official_sizes and (height, width) not in OFFICIAL_SIZES:
            warnings.warn(f"{width}x{height} is not one of the official BitDance sizes; it runs, "
                          "but quality is not guaranteed")

    def generate(self, prompt: PromptTokens | str, height: int = 1024, width: int = 1024, steps: int = 50,
                 cfg: float = 7.5, num_images: int = 1, seed: int = 0, negative_prompt: str | None = None,
                 sampler: str = "euler_maruyama", callback: Callback | None = None,
                 batched_cfg: bool = True) -> torch.Tensor:
        """Returns the ±1 bit-tensor [num_images, C, H/16, W/16] (float32)."""
        guided = isinstance(cfg, (int, float)) and cfg > 1.0
        rows = self.parallel_num * (num_images if isinstance(num_images, int) else 1) * (2 if guided else 1)
        width_of_ops = max(self.backbone.config.hidden_size, self.head.config.ch_latent)
        with generation_threads(self.device, rows, width_of_ops):  # small models: fewer CPU threads
            return self._generate(prompt, height, width, steps, cfg, num_images, seed, negative_prompt, sampler,
                                  callback, batched_cfg)

    @torch.no_grad()
    def _generate(self, prompt, height, width, steps, cfg, num_images, seed, negative_prompt, sampler, callback,
                  batched_cfg) -> torch.Tensor:
        if isinstance(prompt, str):
            prompt = self.encode_prompt(prompt, negative_prompt)
        require(isinstance(steps, int) and steps >= 1, f"steps must be an integer >= 1, got {steps}")
        require(isinstance(cfg, (int, float)) and cfg >= 0, f"cfg (guidance scale) must be >= 0, got {cfg}")
        require(isinstance(num_images, int) and num_images >= 1, f"num_images must be an integer >= 1, got {num_images}")
        require(sampler in self.samplers, f"sampler '{sampler}' unknown; choose one of {sorted(self.samplers)}")
        self.check_size(height, width)

        dev, P, B = self.device, self.parallel_num, num_images
        lat_h, lat_w = height // self.downsample, width // self.downsample
        n_blocks = lat_h * lat_w // P
        guided = cfg > 1.0
        gen = torch.Generator(device=dev).manual_seed(int(seed))

        prefix = self.codec.image_prefix(lat_h, lat_w, P)
        branches = [list(prompt.cond_ids) + prefix] + ([list(prompt.uncond_ids) + prefix] if guided else [])
        rows = [seq for seq in branches for _ in range(B)]
        # Batched guidance: one backbone pass over [cond; uncond]. Otherwise (the official way,
        # kept as the benchmark baseline) one pass per branch.
        groups = [rows] if batched_cfg else [rows[i:i + B] for i in range(0, len(rows), B)]
        runs = [BackboneRun(self.backbone, g, P, n_blocks, dev) for g in groups]
        hidden = torch.cat([r.prefill() for r in runs])

        pos_table = sincos_2d_blocks(self.backbone.config.hidden_size, lat_h, lat_w, self.block_side).to(dev)
        sample = self.samplers[sampler]
        extra = {"time_shift": self.head.config.time_shift} if sampler == "euler_maruyama" else {}
        out_blocks = []
        for s in range(n_blocks):
            pe = pos_table[s * P:(s + 1) * P]
            pred = sample(self.head.net, hidden.to(torch.float32) + pe, cfg, steps, gen, x_dim=self.latent_channels, **extra)
            bits = torch.sign(pred)
            out_blocks.append(bits[:B])
            if callback is not None:
                callback(s, n_blocks, self._partial(out_blocks, lat_h, lat_w))
            if s == n_blocks - 1:
                break  # the backbone pass after the last block would be unused
            inp = self.projector(bits).to(torch.float32) + pe
            hidden, i = [], 0
            for r in runs:
                hidden.append(r.step(inp[i:i + r.rows]))
                i += r.rows
            hidden = torch.cat(hidden)
        tokens = torch.cat(out_blocks, dim=1)
        return blocks_to_raster(tokens, lat_h, lat_w, self.block_side).float()

    def _partial(self, blocks, lat_h, lat_w) -> torch.Tensor:
        done = torch.cat(blocks, dim=1)
        full = torch.zeros(done.shape[0], lat_h * lat_w, done.shape[2], dtype=torch.float32, device=done.device)
        full[:, :done.shape[1]] = done
        return blocks_to_raster(full, lat_h, lat_w, self.block_side)

    @torch.no_grad()
    def decode(self, bits: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(bits.to(self.device))


class BackboneRun:
    """The backbone state of a group of rows: one KV cache, per-row left padding and positions."""

    def __init__(self, backbone: Qwen3Backbone, rows: list[list[int]], P: int, n_blocks: int, dev):
        self.backbone, self.P, self.rows = backbone, P, len(rows)
        pads = [max(map(len, rows)) - len(r) for r in rows]
        self.L = L = len(rows[0]) + pads[0]  # common prefix length
        self.padded = any(pads)
        self.cache = KVCache(backbone.config, len(rows), L + (n_blocks - 1) * P, backbone.dtype, dev)
        pad_t = torch.tensor(pads, device=dev)
        ar = torch.arange(L, device=dev)
        self.valid = ar[None, :] >= pad_t[:, None]  # [rows, L] real (non-padding) cache slots
        self.ids = torch.tensor([[0] * p + r for p, r in zip(pads, rows)], device=dev)
        self.pos = (ar[None, :] - pad_t[:, None]).clamp_min(0)
        self.next_pos = self.pos[:, -1:] + 1  # per row: the RoPE position of the next image token
        self.filled = L

    def prefill(self) -> torch.Tensor:
        """Causal over the prompt, vision_start and res_h; the last P tokens (res_w and the queries)
        form block 0: bidirectional among themselves, seeing the whole prefix. Returns its hidden."""
        L, P, dev = self.L, self.P, self.ids.device
        ar = torch.arange(L, device=dev)
        causal = ar[:, None] >= ar[None, :]
        causal[L - P:, L - P:] = True
        mask = causal[None] & self.valid[:, None, :]
        mask |= torch.eye(L, dtype=torch.bool, device=dev)[None]  # padding rows see themselves (finite, unused)
        return self.backbone(self.backbone.embed(self.ids), self.pos, self.cache, 0, mask[:, None])[:, -P:]

    def step(self, inp: torch.Tensor) -> torch.Tensor:
        """One block of P image tokens: sees the whole cache and itself."""
        P, start = self.P, self.filled
        mask = True
        if self.padded:
            ones = torch.ones(self.rows, start - self.L + P, dtype=torch.bool, device=inp.device)
            mask = torch.cat([self.valid, ones], dim=1)[:, None, None, :]
        pos = self.next_pos + torch.arange(P, device=inp.device)[None]
        hidden = self.backbone(inp, pos, self.cache, start, mask)
        self.next_pos = self.next_pos + P
        self.filled += P
        return hidden


@dataclass
class T2IInfo:
    """What a model folder makes, read from its config files and tokenizer only (no weights)."""

    layout: str
    parallel_num: int
    downsample: int
    latent_channels: int
    hidden_size: int
    size_rule: SizeRule
    name: str = ""

    @property
    def block_pixels(self) -> int:
        return self.size_rule.block_pixels

    @property
    def supported_sizes(self) -> list[tuple[int, int]]:
        return self.size_rule.sizes

    def check_size(self, height: int, width: int) -> None:
        """What the pipeline checks before sampling, without loading it."""
        self.size_rule.check(height, width, self.name or "this model")

    def ar_steps(self, height: int, width: int) -> int:
        return self.size_rule.ar_steps(height, width)


def describe_t2i(path: str) -> T2IInfo:
    files = ModelFiles.find(path)
    head = HeadConfig.from_json(read_json(files.head_config), files.head_config)
    ae = AutoencoderConfig.from_json(read_json(files.ae_config), files.ae_config)
    codec = load_prompt_codec(files.tokenizer_folder)
    rule = SizeRule(ae.downsample, head.parallel_num, max_res_token(codec.has_token))
    return T2IInfo(files.layout, head.parallel_num, ae.downsample, ae.z_channels, head.ch_cond, rule,
                   os.path.basename(os.path.normpath(path)))


def build_t2i_modules(llm: Qwen3Config, head: HeadConfig, ae: AutoencoderConfig):
    """All four modules on the meta device (no memory): for strict loading and key checks."""
    with torch.device("meta"):
        return Qwen3Backbone(llm), DiffusionHead(head), Projector(ae.z_channels, llm.hidden_size), build_autoencoder(ae)


def load_t2i(path: str, device="cpu", dtype=torch.float32, attention: str = "sdpa", weights: str = "as-is") -> T2IPipeline:
    """weights: "as-is" (read in `dtype`) or "fp8" (big linears stored as float8 e4m3, see quant.py)."""
    require(attention in ("sdpa", "flash"), f"attention '{attention}' unknown; use 'sdpa' or 'flash'")
    require(weights in ("as-is", "fp8"), f"weights '{weights}' unknown; use 'as-is' or 'fp8'")
    if weights == "fp8":
        from .quant import load_t2i_fp8

        return load_t2i_fp8(path, device=device, dtype=dtype, attention=attention)
    files = ModelFiles.find(path)
    llm_cfg = Qwen3Config.from_json(read_json(files.llm_config), files.llm_config)
    head_cfg = HeadConfig.from_json(read_json(files.head_config), files.head_config)
    ae_cfg = AutoencoderConfig.from_json(read_json(files.ae_config), files.ae_config)
    require(head_cfg.ch_cond == llm_cfg.hidden_size,
            f"{files.head_config}: ch_cond {head_cfg.ch_cond} must equal the backbone hidden_size {llm_cfg.hidden_size}")
    require(head_cfg.ch_target == ae_cfg.z_channels,
            f"{files.head_config}: ch_target {head_cfg.ch_target} must equal the tokenizer's z_channels {ae_cfg.z_channels}")
    codec = load_prompt_codec(files.tokenizer_folder)
    backbone, head, projector, ae = build_t2i_modules(llm_cfg, head_cfg, ae_cfg)
    # Check every file before reading any weights: a bad shard should fail in a second, not after 30 GB.
    from .checkpoints import check_keys
    sources = [(backbone, open_sharded(files.llm_folder), "Qwen3 backbone", Qwen3Backbone.IGNORED_KEYS),
               (head, open_safetensors([files.head_weights]), "diffusion head", ()),
               (projector, open_safetensors([files.projector_weights]), "projector", ()),
               (ae, open_safetensors([files.ae_weights]), "autoencoder", ())]
    for module, src, what, ignore in sources:
        check_keys(module, src, what, ignore)
    for module, src, what, ignore in sources:
        materialize(module, src, what, device, dtype, ignore)
    backbone.set_attention(attention)
    head.set_attention(attention)
    return T2IPipeline(backbone, head, projector, ae, codec, device, name=os.path.basename(os.path.normpath(path)))
