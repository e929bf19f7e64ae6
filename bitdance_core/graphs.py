"""CUDA graphs and torch.compile for the generation loop (both off on the CPU).

Three captures, each replayed with its inputs copied into static buffers and each falling back to
eager execution (for good, for that shape) when capture fails:

- `GraphedModule` around the diffusion head's network: one graph per input shape, replacing the
  ~100 kernel launches of a head call by one launch. Works with the engine as it is.
- `graphed_sampler`: the whole Euler–Maruyama loop of one block (steps+1 head calls, the
  guidance arithmetic and the noise draws from the pipeline's generator, registered with the graph
  so replays continue its Philox stream). The engine's samplers create a scalar with
  `torch.tensor(0.0, device=...)`, a host-to-device copy that capture forbids (sampler.py now uses
  torch.zeros); if that ever comes back
  `torch.zeros((), device=...)`, this capture fails once and the head-level graph is used.
- `GraphedBackbone` for the per-block backbone step: the step is rewritten with static shapes
  (new keys written with index_copy_ at a position tensor; attention over the whole preallocated
  cache with a key mask), so one graph per generation serves every block. The rewrite is plain
  PyTorch and runs on the CPU too (`static_step=True`), where the tests compare it to the step.

Hooks cannot run inside a replay: root forward pre-hooks (stage offload) are called by hand before
each replay and a graph is recaptured when the weights moved; modules with hooks below the root
(streaming offload) are never captured.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def cuda_graphs_available(device) -> bool:
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and hasattr(torch.cuda, "CUDAGraph")


@dataclass
class GraphStats:
    captures: int = 0
    replays: int = 0
    eager_calls: int = 0
    failures: dict = field(default_factory=dict)  # key -> reason


def _fingerprint(module: nn.Module) -> tuple:
    return tuple(t.data_ptr() for t in list(module.parameters()) + list(module.buffers()))


def _has_inner_hooks(module: nn.Module) -> bool:
    return any(m._forward_pre_hooks or m._forward_hooks for m in module.modules() if m is not module)


class _Capture:
    """One captured graph with its static inputs and outputs."""

    def __init__(self, fn, args, warmup: int, pool, generator=None):
        self.static_in = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            state = generator.get_state() if generator is not None else None
            for _ in range(warmup):
                fn(*self.static_in)
            if generator is not None:
                generator.set_state(state)  # warm-up draws must not advance the stream
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        if generator is not None:
            self.graph.register_generator_state(generator)
        with torch.cuda.graph(self.graph, pool=pool):
            self.static_out = fn(*self.static_in)

    def replay(self, args):
        for dst, src in zip(self.static_in, args):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
        self.graph.replay()
        return self.static_out


class GraphedModule(nn.Module):
    """Calls `inner` through a CUDA graph per distinct input signature (tensors only as inputs)."""

    def __init__(self, inner: nn.Module, warmup: int = 2, stats: GraphStats | None = None):
        super().__init__()
        self.inner = inner
        self.warmup = warmup
        self.stats = stats or GraphStats()
        self._graphs: dict = {}
        self._pool = None

    def forward(self, *args):
        if not all(isinstance(a, torch.Tensor) for a in args) or not args[0].is_cuda or _has_inner_hooks(self.inner):
            self.stats.eager_calls += 1
            return self.inner(*args)
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        if key in self.stats.failures:
            self.stats.eager_calls += 1
            return self.inner(*args)
        for hook in list(self.inner._forward_pre_hooks.values()):
            hook(self.inner, args)  # e.g. stage offload bringing the weights in
        fp = _fingerprint(self.inner)
        cap = self._graphs.get(key)
        if cap is None or cap[1] != fp:
            try:
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                cap = (_Capture(self.inner, args, self.warmup, self._pool), fp)
                self._graphs[key] = cap
                self.stats.captures += 1
            except Exception as e:  # capture impossible: eager from now on for this shape
                torch.cuda.synchronize()
                self.stats.failures[key] = f"{type(e).__name__}: {e}"
                self.stats.eager_calls += 1
                return self.inner(*args)
        self.stats.replays += 1
        return cap[0].replay(args).clone()


# ---- the whole sampling loop ----------------------------------------------------------------------

_GRAPHED_NETS: "weakref.WeakKeyDictionary[nn.Module, GraphStats]" = weakref.WeakKeyDictionary()
_LOOP_GRAPHS: "OrderedDict" = OrderedDict()  # newest last; a few kept (a generator per generation)
_LOOP_GRAPHS_KEPT = 4


def graphed_sampler(fn):
    """A sampler with the signature of `sampler.euler_maruyama` that captures its whole loop for
    the nets registered by `enable_graphs` (others run eagerly)."""

    def run(net, cond, cfg, steps, generator, **kw):
        stats = _GRAPHED_NETS.get(net)
        inner = net.inner if isinstance(net, GraphedModule) else net
        if stats is None or not cond.is_cuda or generator is None or _has_inner_hooks(inner):
            return fn(net, cond, cfg, steps, generator, **kw)
        # the generator object itself (not its id): the graph draws from the state registered at capture
        key = (id(net), tuple(cond.shape), cond.dtype, float(cfg), int(steps), tuple(sorted(kw.items())), generator)
        if key[:-1] in stats.failures:  # failures are remembered per shape, across generators
            return fn(net, cond, cfg, steps, generator, **kw)
        for hook in list(inner._forward_pre_hooks.values()):
            hook(inner, (cond,))
        fp = _fingerprint(inner)
        cap = _LOOP_GRAPHS.get(key)
        if cap is None or cap[1] != fp:
            try:
                # the loop calls the bare network: no nested capture of the head-level graph
                cap = (_Capture(lambda c: fn(inner, c, cfg, steps, generator, **kw), [cond], 1,
                                torch.cuda.graph_pool_handle(), generator=generator), fp)
                _LOOP_GRAPHS[key] = cap
                while len(_LOOP_GRAPHS) > _LOOP_GRAPHS_KEPT:
                    _LOOP_GRAPHS.popitem(last=False)
                stats.captures += 1
            except Exception as e:
                torch.cuda.synchronize()
                stats.failures[key[:-1]] = f"{type(e).__name__}: {e}"
                return fn(net, cond, cfg, steps, generator, **kw)
        stats.replays += 1
        return cap[0].replay([cond]).clone()

    run.__wrapped__ = fn
    return run


# ---- the static backbone step ---------------------------------------------------------------------

def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def static_attention(attn, x, cos, sin, k_cache, v_cache, slots, key_mask):
    """Attention of one block whose new keys go to cache positions `slots` (a tensor), attending to
    the whole cache [rows, kv_heads, max_len, head_dim] under `key_mask` [rows, 1, 1, max_len]."""
    b, n, _ = x.shape
    hd = attn.cfg.head_dim
    q = attn.q_norm(attn.q_proj(x).view(b, n, -1, hd)).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(x).view(b, n, -1, hd)).transpose(1, 2)
    v = attn.v_proj(x).view(b, n, -1, hd).transpose(1, 2)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    k_cache.index_copy_(2, slots, k.to(k_cache.dtype))
    v_cache.index_copy_(2, slots, v.to(v_cache.dtype))
    K, V = k_cache, v_cache
    rep = attn.cfg.num_attention_heads // attn.cfg.num_key_value_heads
    if rep > 1:  # repeat_interleave over heads, written as expand (no host sync under capture)
        r, h, L, d = K.shape
        K = K[:, :, None].expand(r, h, rep, L, d).reshape(r, h * rep, L, d)
        V = V[:, :, None].expand(r, h, rep, L, d).reshape(r, h * rep, L, d)
    out = F.scaled_dot_product_attention(q, K, V, attn_mask=key_mask, scale=hd ** -0.5)
    return attn.o_proj(out.transpose(1, 2).reshape(b, n, -1))


def static_step(backbone, x, cos, sin, cache, slots, key_mask):
    """The backbone forward of one block with static shapes (see `static_attention`); cos/sin are
    the RoPE tables of the block's positions (`qwen3.rope_tables`, made outside a capture: it
    builds its frequencies on the host)."""
    x = x.to(backbone.dtype)
    for i, layer in enumerate(backbone.model.layers):
        x = x + static_attention(layer.self_attn, layer.input_layernorm(x), cos, sin, cache.k[i], cache.v[i], slots, key_mask)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return backbone.model.norm(x)


class GraphedBackbone(nn.Module):
    """Wraps a Qwen3Backbone: prefill runs eagerly; block steps (start > 0) run the static step,
    captured in one CUDA graph per KV cache (i.e. per generation) on a GPU. `static_step=True`
    also uses the static step where no graph can be made (CPU), for testing."""

    def __init__(self, backbone: nn.Module, graphs: bool = True, static_step: bool = False, warmup: int = 1,
                 stats: GraphStats | None = None):
        super().__init__()
        self.inner = backbone
        self.graphs, self.use_static = graphs, static_step
        self.warmup = warmup
        self.stats = stats or GraphStats()
        self._cap = None  # (key, _Capture, fingerprint)
        self._pool = None

    # the attributes the pipeline reads from a backbone
    @property
    def config(self):
        return self.inner.config

    @property
    def dtype(self):
        return self.inner.dtype

    @property
    def model(self):
        return self.inner.model

    def embed(self, ids):
        return self.inner.embed(ids)

    def set_attention(self, attention):
        self.inner.set_attention(attention)

    def forward(self, inputs_embeds, positions, cache=None, start: int = 0, mask=None):
        graphable = (cache is not None and start > 0 and inputs_embeds.is_cuda and self.graphs
                     and not _has_inner_hooks(self.inner))
        if not graphable and not (self.use_static and cache is not None and start > 0):
            self.stats.eager_calls += 1
            return self.inner(inputs_embeds, positions, cache, start, mask)
        rows, n = inputs_embeds.shape[:2]
        max_len = cache.k.shape[3]
        dev = inputs_embeds.device
        slots = torch.arange(start, start + n, device=dev)
        ar = torch.arange(max_len, device=dev)
        key_mask = (ar < start + n)[None].expand(rows, max_len)
        if mask is not True and mask is not None:
            m = mask.reshape(rows, -1)  # [rows, start+n] boolean key mask of the eager step
            key_mask = key_mask.clone()
            key_mask[:, :m.shape[1]] &= m
        key_mask = key_mask[:, None, None, :]
        from .qwen3 import rope_tables

        cos, sin = rope_tables(self.inner.config, positions, self.inner.dtype)
        for hook in list(self.inner._forward_pre_hooks.values()):
            hook(self.inner, (inputs_embeds, positions, cache, start, mask))  # e.g. stage offload
        if not graphable:
            return static_step(self.inner, inputs_embeds, cos, sin, cache, slots, key_mask)
        # the graph bakes in the cache's addresses: same addresses and shapes -> the same graph is valid
        key = (cache.k.data_ptr(), cache.v.data_ptr(), tuple(cache.k.shape), tuple(inputs_embeds.shape), inputs_embeds.dtype)
        fp = _fingerprint(self.inner)
        args = [inputs_embeds, cos, sin, slots, key_mask]
        if self._cap is None or self._cap[0] != key or self._cap[2] != fp:
            if key[2:] in self.stats.failures:  # remembered per shape, across caches
                self.stats.eager_calls += 1
                return self.inner(inputs_embeds, positions, cache, start, mask)
            try:
                self._cap = None
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                fn = lambda x, c, sn, sl, km: static_step(self.inner, x, c, sn, cache, sl, km)
                self._cap = (key, _Capture(fn, args, self.warmup, self._pool), fp)
                self.stats.captures += 1
            except Exception as e:
                torch.cuda.synchronize()
                self.stats.failures[key[2:]] = f"{type(e).__name__}: {e}"
                self.stats.eager_calls += 1
                return self.inner(inputs_embeds, positions, cache, start, mask)
        self.stats.replays += 1
        return self._cap[1].replay(args).clone()


# ---- switching them on --------------------------------------------------------------------------

@dataclass
class Acceleration:
    """What `enable_graphs` / `enable_compile` changed; `remove()` restores the pipeline."""

    pipe: object
    head_net: nn.Module | None = None
    backbone: nn.Module | None = None
    sampler_patched: bool = False
    stats: GraphStats = field(default_factory=GraphStats)

    def suspend(self) -> None:
        """Plain modules back in the pipeline, the captured graphs kept (see resume)."""
        self._wrappers = (self.pipe.head.net, self.pipe.backbone)
        if self.head_net is not None:
            self.pipe.head.net = self.head_net
        if self.backbone is not None:
            self.pipe.backbone = self.backbone

    def resume(self) -> None:
        if getattr(self, "_wrappers", None) is not None:
            self.pipe.head.net, self.pipe.backbone = self._wrappers
            self._wrappers = None

    def remove(self) -> None:
        self.resume()
        if self.head_net is not None:
            graphed = self.pipe.head.net
            _GRAPHED_NETS.pop(graphed, None)
            for key in [k for k in _LOOP_GRAPHS if k[0] == id(graphed)]:
                del _LOOP_GRAPHS[key]
            self.pipe.head.net = self.head_net
        if self.backbone is not None:
            self.pipe.backbone = self.backbone


def enable_graphs(pipe, head: bool = True, sampler: bool = True, backbone: bool = True,
                  static_step_on_cpu: bool = False) -> Acceleration:
    """CUDA graphs for a T2IPipeline on a GPU (no-op on the CPU unless static_step_on_cpu, which
    only swaps in the static backbone step, for tests). Apply after any offload."""
    acc = Acceleration(pipe)
    on_gpu = cuda_graphs_available(pipe.device)
    if not on_gpu and not static_step_on_cpu:
        return acc
    if backbone:
        acc.backbone = pipe.backbone
        pipe.backbone = GraphedBackbone(pipe.backbone, graphs=on_gpu, static_step=True, stats=acc.stats)
    if on_gpu and sampler:
        for name, fn in list(pipe.samplers.items()):  # this pipeline's own table, not the module's
            if not hasattr(fn, "__wrapped__"):
                pipe.samplers[name] = graphed_sampler(fn)
        acc.sampler_patched = True
    if on_gpu and head:
        acc.head_net = pipe.head.net
        graphed = GraphedModule(pipe.head.net, stats=acc.stats)
        pipe.head.net = graphed
        _GRAPHED_NETS[graphed] = acc.stats
    return acc


def enable_compile(pipe, mode: str = "max-autotune-no-cudagraphs", force: bool = False) -> bool:
    """torch.compile the head network and each backbone layer (GPU only unless force=True).
    Returns whether anything was compiled."""
    if torch.device(pipe.device).type != "cuda" and not force:
        return False
    net = pipe.head.net.inner if isinstance(pipe.head.net, GraphedModule) else pipe.head.net
    net.forward = torch.compile(net.forward, mode=mode, dynamic=False)
    for layer in pipe.backbone.model.layers:
        layer.forward = torch.compile(layer.forward, mode=mode, dynamic=True)
    return True
