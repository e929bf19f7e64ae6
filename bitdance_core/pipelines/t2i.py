"""The text-to-image pipeline: prompt -> bits, block by block.

Both guidance branches run in ONE batched forward: rows [cond x B; uncond x B], prompts left-padded
to a common length, each row with its own RoPE positions and key mask. The KV cache is allocated
once; the backbone pass after the last block is skipped (its output would be unused).
Loading a model folder into a pipeline is t2i_loading.py.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch

from ..errors import require
from ..models.autoencoder import BinaryAutoencoder
from ..models.head import DiffusionHead
from ..models.positions import blocks_to_raster, raster_to_blocks, sincos_2d_blocks
from ..models.projector import Projector
from ..models.qwen3 import KVCache, Qwen3Backbone
from ..models.sampler import SAMPLERS, skip_draws
from . import continuation
from .cpu_threads import generation_threads
from .prompts import PromptCodec, PromptTokens
from .sizes import OFFICIAL_SIZES, SizeRule, max_res_token

Callback = Callable[[int, int, torch.Tensor], None]


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
        self.samplers = dict(SAMPLERS)  # per pipeline, so accelerations (runtime/graphs.py) can wrap them
        self.offload = None  # the Offload attached by runtime/offload.apply_offload, which this pipeline owns
        self.size_rule = SizeRule(self.downsample, self.parallel_num, max_res_token(codec))

    @property
    def block_pixels(self) -> int:
        return self.block_side * self.downsample

    @property
    def supported_sizes(self) -> list[tuple[int, int]]:
        """The sizes this model offers (sizes.py): the official ones first where it makes them all."""
        return self.size_rule.sizes

    def block_grid(self, height: int, width: int) -> continuation.BlockGrid:
        """The blocks of a height x width generation (what a continuation's keep mask is made of)."""
        self.check_size(height, width)
        return self._grid(height // self.downsample, width // self.downsample)

    def _grid(self, lat_h: int, lat_w: int) -> continuation.BlockGrid:
        bs = self.block_side
        return continuation.BlockGrid(lat_h, lat_w, bs, bs, self.latent_channels, self.downsample)

    def encode_prompt(self, prompt: str, negative_prompt: str | None = None) -> PromptTokens:
        return self.codec.encode_prompt(prompt, negative_prompt)

    def check_size(self, height: int, width: int) -> None:
        self.size_rule.check(height, width, self.name or "this model")
        self.codec.image_prefix(height // self.downsample, width // self.downsample, self.parallel_num)
        if self.size_rule.has_official_sizes and (height, width) not in OFFICIAL_SIZES:
            warnings.warn(f"{width}x{height} is not one of the official BitDance sizes; it runs, "
                          "but quality is not guaranteed")

    def generate(self, prompt: PromptTokens | str | list, height: int = 1024, width: int = 1024, steps: int = 50,
                 cfg: float = 7.5, num_images: int = 1, seed: int | list[int] = 0, negative_prompt: str | None = None,
                 sampler: str = "euler_maruyama", callback: Callback | None = None,
                 batched_cfg: bool = True, init_bits: torch.Tensor | None = None,
                 keep: torch.Tensor | None = None) -> torch.Tensor:
        """Returns the ±1 bit-tensor [num_images, C, H/16, W/16] (float32).

        Several prompts in one batch: `prompt` a list and `seed` a list of as many seeds; returns
        [len(prompts) * num_images, ...], prompt by prompt. Each prompt draws its noise from its own
        generator, exactly as it would alone (sampler.randn_rows); its rows share the backbone and
        head passes with the others, which can round differently from a batch of its own.

        init_bits (±1 [1 or num_images, C, H/16, W/16]) and keep (bool block mask [H/16/bs, W/16/bs] or
        one per image, True = keep; see block_grid): continue an image (one prompt). Kept blocks are
        these bits, fed to the backbone as if sampled; the others are sampled; the random draws are
        those of an unforced run (pipelines/continuation.py)."""
        guided = isinstance(cfg, (int, float)) and cfg > 1.0
        n_prompts = len(prompt) if isinstance(prompt, (list, tuple)) else 1
        rows = self.parallel_num * (num_images if isinstance(num_images, int) else 1) * n_prompts * (2 if guided else 1)
        width_of_ops = max(self.backbone.config.hidden_size, self.head.config.ch_latent)
        with generation_threads(self.device, rows, width_of_ops):  # small models: fewer CPU threads
            return self._generate(prompt, height, width, steps, cfg, num_images, seed, negative_prompt, sampler,
                                  callback, batched_cfg, init_bits, keep)

    @torch.no_grad()
    def _generate(self, prompt, height, width, steps, cfg, num_images, seed, negative_prompt, sampler, callback,
                  batched_cfg, init_bits, keep) -> torch.Tensor:
        prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt]
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed]
        require(len(prompts) >= 1 and len(seeds) == len(prompts),
                f"{len(prompts)} prompts need as many seeds (one per prompt), got {len(seeds)}")
        prompts = [self.encode_prompt(p, negative_prompt) if isinstance(p, str) else p for p in prompts]
        require(isinstance(steps, int) and steps >= 1, f"steps must be an integer >= 1, got {steps}")
        require(isinstance(cfg, (int, float)) and math.isfinite(cfg) and cfg >= 0, f"cfg (guidance scale) must be a finite number >= 0, got {cfg}")
        require(isinstance(num_images, int) and num_images >= 1, f"num_images must be an integer >= 1, got {num_images}")
        require(sampler in self.samplers, f"sampler '{sampler}' unknown; choose one of {sorted(self.samplers)}")
        self.check_size(height, width)

        dev, P, B = self.device, self.parallel_num, num_images
        lat_h, lat_w = height // self.downsample, width // self.downsample
        n_blocks = lat_h * lat_w // P
        guided = cfg > 1.0
        gens = [torch.Generator(device=dev).manual_seed(int(s)) for s in seeds]
        gen = gens[0] if len(gens) == 1 else gens
        require((init_bits is None and keep is None) or len(prompts) == 1,
                "continuing an image (init_bits, keep) takes one prompt")
        cont = continuation.prepare(self._grid(lat_h, lat_w), init_bits, keep, B,
                                    lambda bits: raster_to_blocks(bits, self.block_side), dev)

        prefix = self.codec.image_prefix(lat_h, lat_w, P)
        cond_rows = [list(p.cond_ids) + prefix for p in prompts for _ in range(B)]
        uncond_rows = [list(p.uncond_ids) + prefix for p in prompts for _ in range(B)] if guided else []
        n_out = len(cond_rows)  # images made: B per prompt
        # Batched guidance: one backbone pass over [cond; uncond]. Otherwise (the official way,
        # kept as the benchmark baseline) one pass per branch.
        groups = [cond_rows + uncond_rows] if batched_cfg else [g for g in (cond_rows, uncond_rows) if g]
        runs = [BackboneRun(self.backbone, g, P, n_blocks, dev) for g in groups]
        hidden = torch.cat([r.prefill() for r in runs])

        pos_table = sincos_2d_blocks(self.backbone.config.hidden_size, lat_h, lat_w, self.block_side).to(dev)
        sample = self.samplers[sampler]
        extra = {"time_shift": self.head.config.time_shift} if sampler == "euler_maruyama" else {}
        out_blocks = []
        for s in range(n_blocks):
            pe = pos_table[s * P:(s + 1) * P]
            cond = hidden.to(torch.float32) + pe
            if cont is not None and cont.keeps_all(s):
                # the head's draws without its compute: the seed means the same as without a mask
                skip_draws(sampler, cond, cfg, steps, gen, x_dim=self.latent_channels)
                bits = torch.cat([cont.tokens[:, s]] * (2 if guided else 1))
            else:
                pred = sample(self.head.net, cond, cfg, steps, gen, x_dim=self.latent_channels, **extra)
                bits = torch.sign(pred)  # with guidance [cond; uncond] rows, the same bits twice
                if cont is not None:
                    bits = torch.cat([cont.force(s, bits[:n_out])] * (2 if guided else 1))
            out_blocks.append(bits[:n_out])
            if callback is not None:
                callback(s, n_blocks, self._partial(out_blocks, lat_h, lat_w, cont))
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

    def _partial(self, blocks, lat_h, lat_w, cont=None) -> torch.Tensor:
        """The bits so far [B, C, h, w]: blocks not drawn yet are 0, except kept ones (already known)."""
        if cont is not None:
            return blocks_to_raster(cont.preview(blocks), lat_h, lat_w, self.block_side)
        done = torch.cat(blocks, dim=1)
        full = torch.zeros(done.shape[0], lat_h * lat_w, done.shape[2], dtype=torch.float32, device=done.device)
        full[:, :done.shape[1]] = done
        return blocks_to_raster(full, lat_h, lat_w, self.block_side)

    @torch.no_grad()
    def decode(self, bits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """generator: the noise of a GAN decoder (unused by the plain decoders of the T2I models)."""
        return self.autoencoder.decode(bits.to(self.device), generator=generator)


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
