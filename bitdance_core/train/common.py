"""Small helpers shared by the trainers: threads, seeding, learning-rate schedule, EMA, timing, saving."""
from __future__ import annotations

import copy
import json
import math
import os
import time

import torch
from torch import nn


def setup(seed: int, threads: int = 2) -> torch.Generator:
    """Deterministic CPU training: fixed thread count, global and explicit generators seeded."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def lr_at(step: int, total: int, peak: float, warmup: int, final_ratio: float = 0.05) -> float:
    """Linear warmup, then cosine decay to final_ratio * peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def adamw(model: nn.Module, lr: float, weight_decay: float = 0.0, no_decay: tuple[str, ...] = ()) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (as upstream's create_optimizer)."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (plain if p.dim() < 2 or any(k in name for k in no_decay) else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


class EMA:
    """Exponential moving average of a model's parameters (decay ramps up over the first steps)."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.steps = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


class Log:
    """Prints progress with elapsed wall time; writes a JSON summary at the end."""

    def __init__(self, what: str, total: int, every: int = 100):
        self.what, self.total, self.every = what, total, every
        self.t0 = time.time()
        self.c0 = time.process_time()
        self.acc: dict[str, float] = {}
        self.n = 0

    def step(self, step: int, **values: float) -> None:
        for k, v in values.items():
            self.acc[k] = self.acc.get(k, 0.0) + float(v)
        self.n += 1
        if (step + 1) % self.every == 0 or step + 1 == self.total:
            msg = " ".join(f"{k} {v / self.n:.4f}" for k, v in self.acc.items())
            print(f"[{self.what}] step {step + 1}/{self.total} {msg} ({self.elapsed():.0f} s wall, "
                  f"{self.cpu():.0f} s cpu)", flush=True)
            self.acc, self.n = {}, 0

    def elapsed(self) -> float:
        return time.time() - self.t0

    def cpu(self) -> float:
        """CPU seconds of this process (all threads): with 2 threads, about twice the wall time of an
        uncontended run; a shared machine stretches the wall time, not this."""
        return time.process_time() - self.c0


def save_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def optimize(opt: torch.optim.Optimizer, model: nn.Module, ema: "EMA", loss: torch.Tensor) -> None:
    """One optimiser step (gradients clipped to norm 1), then the EMA update."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    ema.update(model)


def run_summary(log: "Log", **settings) -> dict:
    """What a train_*.json records: the settings, wall and CPU seconds, threads, finish time."""
    return {**settings, "seconds": round(log.elapsed(), 1), "cpu_seconds": round(log.cpu(), 1),
            "threads": torch.get_num_threads(), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
