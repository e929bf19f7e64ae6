"""CUDA graphs and torch.compile for the generation loop (both off on the CPU).

Three captures, each replayed with its inputs copied into static buffers and each falling back to
eager execution (for good, for that shape) when capture fails:

- `GraphedModule` around the diffusion head's network: one graph per input shape, replacing the
  ~100 kernel launches of a head call by one launch. Works with the engine as it is.
- `graphed_sampler`: the whole Euler–Maruyama loop of one block (steps+1 head calls and the
  guidance arithmetic). Its noise is drawn before each replay from the pipeline's generator
  (`sampler.predraw_noise`: the same draws in the same order as the eager loop) and copied in
  like the condition, so the graph draws no random numbers, no generator is registered with it,
  and one graph serves every generation of that shape.
- `GraphedBackbone` for the per-block backbone step: the step is rewritten with static shapes
  (new keys written with index_copy_ at a position tensor; attention over the whole preallocated
  cache with a key mask), so one graph per generation serves every block. The rewrite is plain
  PyTorch and runs on the CPU too (`use_static=True`), where the tests compare it to the step.

Hooks cannot run inside a replay: root forward pre-hooks (stage offload) are called by hand before
each replay and a graph is recaptured when the weights moved, once: weights that move again (an
offload that cannot keep them) would cost a capture per call, so that graph gives up for eager.
Modules with hooks below the root (streaming offload) are never captured, nor given the static step.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.qwen3 import grouped_query_attention, residual_dtype, residual_input, rope_tables
from ..models.sampler import predraw_noise


def cuda_graphs_available(device) -> bool:
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and hasattr(torch.cuda, "CUDAGraph")


@dataclass
class GraphStats:
    captures: int = 0
    replays: int = 0
    eager_calls: int = 0
    failures: dict = field(default_factory=dict)  # key -> reason
    recaptures: dict = field(default_factory=dict)  # key -> captures made because the weights had moved


def _fingerprint(module: nn.Module) -> tuple:
    """Where the weights are (a graph bakes in their addresses), and what they are."""
    return tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in list(module.parameters()) + list(module.buffers()))


def _has_inner_hooks(module: nn.Module) -> bool:
    return any(m._forward_pre_hooks or m._forward_hooks for m in module.modules() if m is not module)


class _Capture:
    """One captured graph with its static inputs and outputs."""

    def __init__(self, fn, args, warmup: int, pool):
        self.static_in = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*self.static_in)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.static_out = fn(*self.static_in)

    def replay(self, args):
        for dst, src in zip(self.static_in, args):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
        self.graph.replay()
        return self.static_out


def _weights_moved_again(stats: GraphStats, key, had_capture: bool) -> bool:
    """Count a recapture caused by moved weights; True (and recorded as a failure) at the second in
    a row: an offload that moves the weights every call would make every call a capture. A replay
    of an unchanged graph in between (`_replayed`) resets the count: weights that move now and then
    (ComfyUI unloading and reloading the model) cost one capture each time."""
    if not had_capture:
        return False
    stats.recaptures[key] = stats.recaptures.get(key, 0) + 1
    if stats.recaptures[key] > 1:
        stats.failures[key] = "the weights move between calls (offload): eager"
        return True
    return False


def _replayed(stats: GraphStats, key, unchanged: bool) -> None:
    stats.replays += 1
    if unchanged:
        stats.recaptures.pop(key, None)


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
        unchanged = cap is not None and cap[1] == fp
        if not unchanged:
            if _weights_moved_again(self.stats, key, cap is not None):
                self._graphs.pop(key, None)
                self.stats.eager_calls += 1
                return self.inner(*args)
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
        _replayed(self.stats, key, unchanged)
        return cap[0].replay(args).clone()


# ---- the whole sampling loop ----------------------------------------------------------------------

_GRAPHED_NETS: "weakref.WeakKeyDictionary[nn.Module, GraphStats]" = weakref.WeakKeyDictionary()
# per net, newest last, a few kept (one per shape and settings); they go with their net (an id() key
# could be taken by a later net whose weights land at the same addresses, and replay a stale graph)
_LOOP_GRAPHS: "weakref.WeakKeyDictionary[nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()
_LOOP_GRAPHS_KEPT = 4


def graphed_sampler(fn):
    """A sampler with the signature of `sampler.euler_maruyama` that captures its whole loop for
    the nets registered by `enable_graphs` (others run eagerly). The graph's inputs are the
    condition and the noise, drawn here first (`predraw_noise`) from `generator`."""
    name = fn.__name__

    def run(net, cond, cfg, steps, generator, **kw):
        stats = _GRAPHED_NETS.get(net)
        inner = net.inner if isinstance(net, GraphedModule) else net
        if stats is None or not cond.is_cuda or _has_inner_hooks(inner):
            return fn(net, cond, cfg, steps, generator, **kw)
        noise = predraw_noise(name, cond, cfg, steps, generator, kw.get("x_dim", 32))
        key = (name, tuple(cond.shape), cond.dtype, float(cfg), int(steps), tuple(sorted(kw.items())),
               getattr(inner, "step_cache", None))  # the step cache changes what the loop launches, not its result
        graphs = _LOOP_GRAPHS.setdefault(net, OrderedDict())
        if key in stats.failures:
            return fn(net, cond, cfg, steps, None, noise=noise, **kw)
        for hook in list(inner._forward_pre_hooks.values()):
            hook(inner, (cond,))
        fp = _fingerprint(inner)
        cap = graphs.get(key)
        unchanged = cap is not None and cap[1] == fp
        if not unchanged:
            if _weights_moved_again(stats, key, cap is not None):
                graphs.pop(key, None)
                return fn(net, cond, cfg, steps, None, noise=noise, **kw)
            try:
                # the loop calls the bare network: no nested capture of the head-level graph
                body = lambda c, z: fn(inner, c, cfg, steps, None, noise=z, **kw)  # noqa: E731
                cap = (_Capture(body, [cond, noise], 1, torch.cuda.graph_pool_handle()), fp)
                graphs[key] = cap
                while len(graphs) > _LOOP_GRAPHS_KEPT:
                    graphs.popitem(last=False)
                stats.captures += 1
            except Exception as e:
                torch.cuda.synchronize()
                stats.failures[key] = f"{type(e).__name__}: {e}"
                return fn(net, cond, cfg, steps, None, noise=noise, **kw)
        _replayed(stats, key, unchanged)
        return cap[0].replay([cond, noise]).clone()

    run.__wrapped__ = fn
    run.__name__ = name
    return run


# ---- the static backbone step ---------------------------------------------------------------------

def static_attention(attn, x, cos, sin, k_cache, v_cache, slots, key_mask):
    """Attention of one block whose new keys go to cache positions `slots` (a tensor), attending to
    the whole cache [rows, kv_heads, max_len, head_dim] under `key_mask` [rows, 1, 1, max_len]
    (grouped-query heads stacked along the query axis: the cache is never repeated per head)."""
    b, n, _ = x.shape
    q, k, v = attn.qkv(x, cos, sin)
    k_cache.index_copy_(2, slots, k.to(k_cache.dtype))
    v_cache.index_copy_(2, slots, v.to(v_cache.dtype))
    out = grouped_query_attention(q, k_cache, v_cache, key_mask, attn.cfg.head_dim ** -0.5, attn.sdpa_backends,
                                  attn.gqa == "native")
    return attn.o_proj(out.transpose(1, 2).reshape(b, n, -1))


def static_layer(layer, x, cos, sin, k_cache, v_cache, slots, key_mask):
    """One decoder layer of the static block step (the dtypes of qwen3.DecoderLayer.forward)."""
    dt = layer.input_layernorm.weight.dtype
    x = x + static_attention(layer.self_attn, layer.input_layernorm(x).to(dt), cos, sin, k_cache, v_cache, slots,
                             key_mask)
    return x + layer.mlp(layer.post_attention_layernorm(x).to(dt))


def static_step(backbone, x, cos, sin, cache, slots, key_mask, layer_step=static_layer):
    """The backbone forward of one block with static shapes (see `static_attention`); cos/sin are
    the RoPE tables of the block's positions (`qwen3.rope_tables`, made outside a capture: it
    builds its frequencies on the host). layer_step: `static_layer` or a compiled one."""
    x = residual_input(x, backbone.dtype)
    for i, layer in enumerate(backbone.model.layers):
        x = layer_step(layer, x, cos, sin, cache.k[i], cache.v[i], slots, key_mask)
    return backbone.model.norm(x)


class CompiledStep:
    """The static step with `static_layer` compiled once for every layer (regional compilation:
    the layers are alike, so one compilation serves all 40; the layer's weights are its inputs).
    The cache length is marked dynamic, so one compilation also serves every image size; a new
    batch size (rows) compiles again."""

    def __init__(self, mode: str):
        self.mode = mode
        self.layer = torch.compile(static_layer, mode=mode, dynamic=False)

    def _layer(self, layer, x, cos, sin, k_cache, v_cache, slots, key_mask):
        import torch._dynamo

        for t, dim in ((k_cache, 2), (v_cache, 2), (key_mask, 3)):
            torch._dynamo.maybe_mark_dynamic(t, dim)
        return self.layer(layer, x, cos, sin, k_cache, v_cache, slots, key_mask)

    def __call__(self, backbone, x, cos, sin, cache, slots, key_mask):
        return static_step(backbone, x, cos, sin, cache, slots, key_mask, layer_step=self._layer)


class GraphedBackbone(nn.Module):
    """Wraps a Qwen3Backbone: prefill runs eagerly; block steps (start > 0) run the static step,
    captured in one CUDA graph per KV cache (i.e. per generation) on a GPU. `use_static=True`
    also uses the static step where no graph can be made (CPU), for testing."""

    def __init__(self, backbone: nn.Module, graphs: bool = True, use_static: bool = False, warmup: int = 1,
                 stats: GraphStats | None = None):
        super().__init__()
        self.inner = backbone
        self.graphs, self.use_static = graphs, use_static
        self.warmup = warmup
        self.stats = stats or GraphStats()
        self._caps: OrderedDict = OrderedDict()  # cache key -> (_Capture, fingerprint), newest last
        self.step_fn = static_step  # enable_compile swaps in a compiled one
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
        # the static step calls the layers' parts directly: hooks on the layers (streaming offload
        # brings each streamed layer in from its pre-hook) would not run, so such a backbone stays eager
        stepping = cache is not None and start > 0 and not _has_inner_hooks(self.inner)
        graphable = stepping and inputs_embeds.is_cuda and self.graphs
        if not graphable and not (self.use_static and stepping):
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
        cos, sin = rope_tables(self.inner.config, positions, residual_dtype(inputs_embeds.dtype, self.inner.dtype))
        for hook in list(self.inner._forward_pre_hooks.values()):
            hook(self.inner, (inputs_embeds, positions, cache, start, mask))  # e.g. stage offload
        if not graphable:
            return self.step_fn(self.inner, inputs_embeds, cos, sin, cache, slots, key_mask)
        # the graph bakes in the cache's addresses: same addresses and shapes -> the same graph is valid.
        # Two kept: the naive mode's two guidance passes use two caches in turn.
        key = (cache.k.data_ptr(), cache.v.data_ptr(), tuple(cache.k.shape), tuple(inputs_embeds.shape), inputs_embeds.dtype)
        shape_key = key[2:]
        fp = _fingerprint(self.inner)
        args = [inputs_embeds, cos, sin, slots, key_mask]
        cap = self._caps.get(key)
        if shape_key in self.stats.failures:
            self.stats.eager_calls += 1
            return self.inner(inputs_embeds, positions, cache, start, mask)
        unchanged = cap is not None and cap[1] == fp
        if not unchanged:
            if _weights_moved_again(self.stats, shape_key, cap is not None):
                self._caps.clear()
                self.stats.eager_calls += 1
                return self.inner(inputs_embeds, positions, cache, start, mask)
            try:
                self._caps.pop(key, None)
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                fn = lambda x, c, sn, sl, km: self.step_fn(self.inner, x, c, sn, cache, sl, km)  # noqa: E731
                cap = (_Capture(fn, args, self.warmup, self._pool), fp)
                self._caps[key] = cap
                while len(self._caps) > 2:
                    self._caps.popitem(last=False)
                self.stats.captures += 1
            except Exception as e:
                torch.cuda.synchronize()
                self.stats.failures[shape_key] = f"{type(e).__name__}: {e}"
                self.stats.eager_calls += 1
                return self.inner(inputs_embeds, positions, cache, start, mask)
        _replayed(self.stats, shape_key, unchanged)
        return cap[0].replay(args).clone()


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
            _LOOP_GRAPHS.pop(graphed, None)
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
        pipe.backbone = GraphedBackbone(pipe.backbone, graphs=on_gpu, use_static=True, stats=acc.stats)
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


COMPILE_PARTS = ("head", "layers", "step")
HEAD_FORWARDS = ("forward",)  # the head network's entry (a whole call, or one from the step cache's embeddings)


def compile_parts(pipe, mode: str = "max-autotune-no-cudagraphs", parts=COMPILE_PARTS) -> list[str]:
    """torch.compile the given parts: "head" (the head network's forwards, static shapes), "layers"
    (each backbone layer's forward, dynamic shapes: the prefill and eager block steps) and "step"
    (the static block step of a GraphedBackbone, one layer compiled for all: `CompiledStep`; without
    one the block steps go through the layers, which are compiled instead). Returns what was compiled."""
    done = []
    if "head" in parts:
        net = pipe.head.net.inner if isinstance(pipe.head.net, GraphedModule) else pipe.head.net
        for name in HEAD_FORWARDS:
            if hasattr(type(net), name):
                setattr(net, name, torch.compile(getattr(net, name), mode=mode, dynamic=False))
        done.append("head")
    static = isinstance(pipe.backbone, GraphedBackbone)
    if "layers" in parts or ("step" in parts and not static):
        for layer in pipe.backbone.model.layers:
            layer.forward = torch.compile(layer.forward, mode=mode, dynamic=True)
        done.append("layers")
    if "step" in parts and static:  # its block step does not go through layer.forward
        pipe.backbone.step_fn = CompiledStep(mode)
        done.append("step")
    return done


def enable_compile(pipe, mode: str = "max-autotune-no-cudagraphs", force: bool = False, parts=COMPILE_PARTS) -> bool:
    """torch.compile the head network and each backbone layer (GPU only unless force=True); see
    `compile_parts`. Returns whether anything was compiled."""
    if torch.device(pipe.device).type != "cuda" and not force:
        return False
    return bool(compile_parts(pipe, mode, parts))


def disable_compile(pipe) -> None:
    """Undo `enable_compile`: the plain forwards back (the static block step goes with its graphs)."""
    net = pipe.head.net.inner if isinstance(pipe.head.net, GraphedModule) else pipe.head.net
    for name in HEAD_FORWARDS:
        net.__dict__.pop(name, None)
    for layer in pipe.backbone.model.layers:
        layer.__dict__.pop("forward", None)
    if isinstance(pipe.backbone, GraphedBackbone):
        pipe.backbone.step_fn = static_step
