"""Euler–Maruyama (and plain Euler) sampling of the diffusion head, with classifier-free guidance.

The arithmetic and the order of random draws mirror the official `sampling_x.py` exactly, with the
noise taken from an explicit `torch.Generator` instead of the global one:
per call, one `randn([rows, ..., 32])` for x0, then one per step; the final Euler step draws none.
With guidance > 1 the condition batch is [cond; uncond] and both halves share x.

`predraw_noise` makes those draws up front, in the same order and shapes (so the same numbers), and
a sampler given `noise=` takes them from there instead of the generator: that is how a CUDA graph
of the whole loop (runtime/graphs.py) runs without drawing random numbers inside the graph.
`skip_draws` makes them and drops them: a kept block of a continuation (pipelines/continuation.py).

`generator` may also be a list of generators, one per group of equally many rows (several prompts
in one batch): each draw is then each generator's share of the rows, drawn in turn and concatenated,
so a group's noise is what its generator alone would draw and never depends on its batch-mates.
"""
from __future__ import annotations

from typing import Callable

import torch

NetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _time_grid(steps: int, last_step_size: float, time_shift: float, device) -> torch.Tensor:
    t_all = torch.linspace(0, 1 - last_step_size, steps + 1, device=device, dtype=torch.float32)
    # time_shift_func, applied even for shift 1 (it can move a value by one ulp, as upstream)
    return (1 / time_shift) / ((1 / time_shift) + (1 / t_all - 1) ** 1.0)


def _velocity(net: NetFn, x: torch.Tensor, mult: int, t_batch: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    combined = torch.cat([x] * mult, dim=0)
    out = net(combined, t_batch, cond)
    shape = (-1,) + (1,) * (out.dim() - 1)
    return ((out - combined) / (1 - t_batch.view(shape)).clamp_min(0.05)).to(torch.float32)


def _guide(v: torch.Tensor, cfg: float, mult: int) -> torch.Tensor:
    if mult == 2:
        v_c, v_u = torch.chunk(v, 2, dim=0)
        v = v_u + cfg * (v_c - v_u)
    return v


def x_shape_of(cond: torch.Tensor, cfg: float, x_dim: int) -> list[int]:
    """The shape of x (one row per image: the guidance halves share it)."""
    shape = list(cond.shape)
    shape[0] //= 2 if cfg > 1.0 else 1
    shape[-1] = x_dim
    return shape


def randn_rows(shape, generator, device) -> torch.Tensor:
    """randn(shape) in float32 from `generator`, or from a list of generators that each draw their
    equal share of the rows, in order (see the module docstring)."""
    if not isinstance(generator, (list, tuple)):
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    rows, n = shape[0], len(generator)
    if rows % n:
        raise ValueError(f"{rows} rows cannot be shared equally by {n} generators")
    share = [rows // n, *shape[1:]]
    return torch.cat([torch.randn(share, generator=g, device=device, dtype=torch.float32) for g in generator])


def noise_draws(sampler: str, steps: int) -> int:
    """How many randn(x_shape) calls one sampler call makes."""
    return 1 + steps if sampler == "euler_maruyama" else 1


def predraw_noise(sampler: str, cond: torch.Tensor, cfg: float, steps: int, generator, x_dim: int = 32) -> torch.Tensor:
    """[draws, *x_shape]: the sampler's draws, made one by one as it would make them."""
    shape = x_shape_of(cond, cfg, x_dim)
    return torch.stack([randn_rows(shape, generator, cond.device) for _ in range(noise_draws(sampler, steps))])


def skip_draws(sampler: str, cond: torch.Tensor, cfg: float, steps: int, generator, x_dim: int = 32) -> None:
    """Advances `generator` exactly as one sampler call on `cond` would (the same draws, unused): a
    kept block of a continuation, whose head result would be thrown away."""
    shape = x_shape_of(cond, cfg, x_dim)
    for _ in range(noise_draws(sampler, steps)):
        randn_rows(shape, generator, cond.device)  # per-prompt generators (a list) advance as they would


class _Draws:
    """The sampler's source of noise: the generator, or a pre-drawn tensor read in order."""

    def __init__(self, generator, device, noise: torch.Tensor | None):
        self.generator, self.device, self.noise, self.i = generator, device, noise, 0

    def __call__(self, shape) -> torch.Tensor:
        if self.noise is None:
            return randn_rows(shape, self.generator, self.device)
        out = self.noise[self.i]
        self.i += 1
        return out


def per_call(net, cond: torch.Tensor, schedule: tuple):
    """`net` as one sampler call on `cond` uses it: a net that keeps what does not change across the
    call's steps (models/head.py, HeadNet.for_call: the same operations, the same bits), or `net`.
    `schedule` is everything that fixes the call's sequence of times."""
    bind = getattr(net, "for_call", None)
    return net if bind is None else bind(cond, schedule)


def euler_maruyama(net: NetFn, cond: torch.Tensor, cfg: float, steps: int,
                   generator: torch.Generator | list[torch.Generator] | None, x_dim: int = 32,
                   time_shift: float = 1.0, last_step_size: float = 0.05, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Returns cat([x] * mult): the sampled bits (before sign) for every row of `cond`.
    noise: `predraw_noise(...)`, used instead of drawing from `generator`."""
    mult = 2 if cfg > 1.0 else 1
    device = cond.device
    net = per_call(net, cond, ("euler_maruyama", steps, float(time_shift), float(last_step_size)))
    draw = _Draws(generator, device, noise)
    x = draw(x_shape_of(cond, cfg, x_dim))
    t_all = _time_grid(steps, last_step_size, time_shift, device)
    dt = t_all[1:] - t_all[:-1]
    t = torch.zeros((), device=device, dtype=torch.float32)  # not torch.tensor(0.0): no host copy (CUDA graphs)
    t_batch = torch.zeros(cond.shape[0], device=device, dtype=torch.float32)
    for i in range(steps):
        t_batch[:] = t
        v = _guide(_velocity(net, x, mult, t_batch, cond), cfg, mult)
        # score and drift of the reverse SDE, written as upstream writes them (bit-exact)
        alpha_ratio = t / 1
        var = (1 - t) ** 2 - alpha_ratio * -1 * (1 - t)
        score = (alpha_ratio * v - x) / var
        drift = v + (1 - t) * score
        noise_scale = (2.0 * (1.0 - t) * dt[i]) ** 0.5
        x = x + drift * dt[i] + noise_scale * draw(x.shape)
        t += dt[i]
    t_batch[:] = 1 - last_step_size
    v = _guide(_velocity(net, x, mult, t_batch, cond), cfg, mult)
    x = x + v * last_step_size
    return torch.cat([x] * mult, dim=0)


def euler(net: NetFn, cond: torch.Tensor, cfg: float, steps: int,
          generator: torch.Generator | list[torch.Generator] | None, x_dim: int = 32,
          noise: torch.Tensor | None = None) -> torch.Tensor:
    """Deterministic Euler on the velocity (upstream's `euler`): one draw, for x0."""
    mult = 2 if cfg > 1.0 else 1
    device = cond.device
    net = per_call(net, cond, ("euler", steps))
    x = _Draws(generator, device, noise)(x_shape_of(cond, cfg, x_dim))
    dt = 1.0 / steps
    t = 0.0
    t_batch = torch.zeros(cond.shape[0], device=device, dtype=torch.float32)
    for _ in range(steps):
        t_batch[:] = t
        combined = torch.cat([x] * mult, dim=0)
        v = _guide(net(combined, t_batch, cond).to(torch.float32), cfg, mult)
        x = x + v * dt
        t += dt
    return torch.cat([x] * mult, dim=0)


SAMPLERS = {"euler_maruyama": euler_maruyama, "euler": euler}
