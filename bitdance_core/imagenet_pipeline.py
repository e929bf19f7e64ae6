"""Class label -> bits with an ImageNet BitDance model, as the official `model.sample` does.

Guidance rows: [cond x B; null class x B]. Per step i of T, the guidance is 1 + (cfg - 1) * i / T
("linear", the default) or cfg ("constant"); at exactly 1 (step 0 of "linear") the head samples the
doubled batch without guidance, so the cond and null rows get their own noise and their own bits
(both are fed back), as upstream. Noise comes from one explicit generator seeded with `seed` on the
model's device, in the official order, so `seed` means what `torch.manual_seed(seed)` just before the
official `model.sample` means.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .cpu_threads import generation_threads
from .errors import require
from .imagenet import ImageNetModel, KVCache, first_step_mask
from .imagenet_classes import model_class_names, parse_classes
from .positions import blocks_to_raster
from .sampler import euler_maruyama

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

    def guidance(self, cfg: float, schedule: str, step: int) -> float:
        if cfg <= 1.0:
            return 1.0
        if schedule == "constant":
            return cfg
        start = 1.0
        return start + (cfg - start) * step / self.config.steps

    def generate(self, classes: Sequence[int | str] | int | str, steps: int = 100, cfg: float | None = None,
                 cfg_schedule: str = "linear", seed: int = 0, callback: Callback | None = None) -> torch.Tensor:
        """±1 bits [B, 32, 16, 16] (float32) for a batch of class labels (ids or names; id == num_classes
        is the unconditional "null" class)."""
        labels = parse_classes(classes, self.num_classes, allow_null=True)
        eff = self.default_cfg if cfg is None else cfg
        guided = isinstance(eff, (int, float)) and eff > 1.0
        rows = len(labels) * (2 if guided else 1) * self.parallel_num
        with generation_threads(self.device, rows, max(self.config.dim, self.config.diff_dim)):  # small models: fewer threads
            return self._generate(labels, steps, cfg, cfg_schedule, seed, callback)

    @torch.no_grad()
    def _generate(self, labels, steps, cfg, cfg_schedule, seed, callback) -> torch.Tensor:
        cfg = self.default_cfg if cfg is None else cfg
        require(isinstance(steps, int) and steps >= 1, f"steps must be an integer >= 1, got {steps}")
        require(isinstance(cfg, (int, float)) and cfg >= 0, f"cfg (guidance scale) must be a number >= 0, got {cfg}")
        require(cfg_schedule in SCHEDULES, f"cfg_schedule '{cfg_schedule}' unknown; use one of {list(SCHEDULES)}")
        require(isinstance(seed, int), f"seed must be an integer, got {seed!r}")

        m, c, dev = self.model, self.config, self.device
        B, P, T = len(labels), c.parallel_num, c.steps
        y = torch.tensor(labels, dtype=torch.long, device=dev)
        if cfg > 1.0:
            y = torch.cat([y, torch.full_like(y, c.num_classes)])
        R = y.shape[0]
        gen = torch.Generator(device=dev).manual_seed(seed)
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
            pred = euler_maruyama(net, hidden, self.guidance(cfg, cfg_schedule, i), steps, gen,
                                  x_dim=c.token_dim, time_shift=c.time_shift)
            last = torch.sign(pred).reshape(R, P, c.token_dim)
            out.append(last[:B])
            if callback is not None:
                callback(i, T, self._to_grid(out))
        return self._to_grid(out)

    def _to_grid(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """Tokens in generation order (those not generated yet are 0) -> [B, latent_dim, H, W] float32."""
        c = self.config
        done = torch.cat(blocks, dim=1).float()
        b, n, g = done.shape[0], c.grid * c.grid, c.grid
        if done.shape[1] < n:
            done = torch.cat([done, done.new_zeros(b, n - done.shape[1], done.shape[2])], dim=1)
        if c.parallel_mode == "patch" and c.parallel_num > 1:
            return blocks_to_raster(done, g, g, c.block_side)
        p = c.patch_size
        x = done.reshape(b, g, g, c.latent_dim, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c.latent_dim, g * p, g * p)

    @torch.no_grad()
    def decode(self, bits: torch.Tensor, tile: int | None = None, chunk: int | None = None) -> torch.Tensor:
        """Pixels [B, 3, H, W], about [-1, 1]."""
        return self.autoencoder.decode(bits.to(self.device), tile=tile, chunk=chunk)
