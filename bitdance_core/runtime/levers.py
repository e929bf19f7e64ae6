"""Issue 11's speed levers, each a switch that can be measured alone against the same weights
(`bench --fuse-projections ...`, `bench-sweep --variants as-is,as-is+fuse,...`; docs/performance.md,
"Issue 11"). Apply after `graphs.enable_graphs` (and after any stage offload); `remove()` restores.

| lever | what changes | numerics |
|---|---|---|
| `compile=head|step|loop|backbone|all` | torch.compile of the head network, the static block step, both ("loop": what runs every block), the backbone layers (+ prefill), everything | fused elementwise kernels: rounding may differ |
| `compile-mode=default|max-autotune-no-cudagraphs` | Inductor's mode (max-autotune: Triton GEMM templates benchmarked against cuBLAS per shape) | as above |
| `fuse` | the backbone's q/k/v and gate/up projections as one GEMM each (models/fused_linear.py) | the same dot products, maybe another kernel |
| `gemm=cublaslt` | PyTorch's preferred BLAS library: cuBLASLt's heuristics for every matmul | another kernel choice |
| `gemm=autotune` | each linear of the backbone and head compiled alone with max-autotune (its GEMM chosen by benchmarking) | another kernel |
| `gemm=autotune-splitk` | the same, Inductor also offering split-K ("decompose-K") GEMMs for every shape whose K is at least M and N | split sums |
| `sdpa=flash|efficient|cudnn|math` | the backbone step's SDPA restricted to one backend (a masked step cannot use flash: it says so) | another kernel |
| `gqa=native` | SDPA's own grouped-query heads (`enable_gqa`) instead of stacking the shared heads along the queries | another kernel |
| `step-cache=off` | the head's per-call cache off (the condition's and the time grid's embeddings made every step) | none: the cache is exact, so it is on by default |

A CUDA-graph capture runs whatever the levers left in place, so compiled code is captured too
(compilation happens in the warm-up before the capture). Nothing here runs a kernel of our own.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BitDanceError, require
from ..models.attention import SDPA_BACKENDS, sdpa_backends
from ..models.fused_linear import fuse_projections, unfuse_projections
from .graphs import GraphedModule, compile_parts, disable_compile

COMPILE_TARGETS = {"off": (), "head": ("head",), "step": ("step",), "loop": ("head", "step"),
                   "backbone": ("layers", "step"), "all": ("head", "layers", "step")}
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
GEMM_CHOICES = ("default", "cublaslt", "autotune", "autotune-splitk")
GQA_LAYOUTS = ("stack", "native")
_ALIASES = {"compile_mode": {"autotune": "max-autotune-no-cudagraphs"}}
_BOOLS = {"on": True, "off": False, "true": True, "false": False, "1": True, "0": False}
# what Inductor's "decompose-K" needs: K >= threshold * M and K >= threshold * N (its default, 32,
# leaves out every linear here); 1 offers it wherever K is at least M and N
SPLITK_THRESHOLD = 1


@dataclass(frozen=True)
class Levers:
    compile: str = "off"
    compile_mode: str = "max-autotune-no-cudagraphs"  # the mode the --compile switch has always used
    fuse: bool = False
    gemm: str = "default"
    sdpa: str = "auto"
    gqa: str = "stack"
    step_cache: bool = True

    def __post_init__(self):
        for name, choices in (("compile", tuple(COMPILE_TARGETS)), ("compile_mode", COMPILE_MODES), ("gemm", GEMM_CHOICES),
                              ("sdpa", SDPA_BACKENDS), ("gqa", GQA_LAYOUTS)):
            value = getattr(self, name)
            require(value in choices, f"lever {name.replace('_', '-')}={value}: choose one of {list(choices)}")

    @classmethod
    def parse(cls, text: str | None, base: "Levers | None" = None) -> "Levers":
        """"fuse+compile=head+compile-mode=default" -> Levers (the rest from `base` or the defaults).
        A flag alone means on ("fuse"); "compile" alone means compile=all; "baseline" or "" changes nothing."""
        names = {f.name for f in dataclasses.fields(cls)}
        out = {}
        for item in [t.strip() for t in (text or "").split("+") if t.strip() and t.strip() != "baseline"]:
            raw, eq, value = item.partition("=")
            name = raw.strip().replace("-", "_")
            if name not in names:
                raise BitDanceError(f"lever '{raw}' unknown; the levers are {sorted(n.replace('_', '-') for n in names)}")
            value = value.strip()
            if name in ("fuse", "step_cache"):
                if eq and value.lower() not in _BOOLS:
                    raise BitDanceError(f"lever {raw}={value}: write {raw}=on or {raw}=off")
                out[name] = _BOOLS[value.lower()] if eq else True
            elif name == "compile" and not eq:
                out[name] = "all"
            else:
                require(eq and value, f"lever '{raw}' needs a value: {raw}=VALUE")
                out[name] = _ALIASES.get(name, {}).get(value, value)
        return replace(base or cls(), **out)

    def spec(self) -> str:
        """The levers that differ from the defaults, as `parse` reads them ("" when none)."""
        d = Levers()
        items = []
        if self.compile != "off":
            items.append("compile" if self.compile == "all" else f"compile={self.compile}")
            if self.compile_mode != d.compile_mode:
                items.append(f"compile-mode={self.compile_mode}")
        if self.fuse:
            items.append("fuse")
        for name in ("gemm", "sdpa", "gqa"):
            if getattr(self, name) != getattr(d, name):
                items.append(f"{name}={getattr(self, name)}")
        if not self.step_cache:
            items.append("step-cache=off")
        return "+".join(items)


@dataclass
class AppliedLevers:
    """What `apply_levers` changed (report) and how to undo it (remove)."""

    levers: Levers
    report: dict = field(default_factory=dict)
    _undo: list = field(default_factory=list)

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()


def _bare(module):
    return module.inner if hasattr(module, "inner") else module


def _set_attr(applied: AppliedLevers, obj, name: str, value) -> None:
    old = getattr(obj, name)
    setattr(obj, name, value)
    applied._undo.append(lambda: setattr(obj, name, old))


def _linear(x, weight, bias):
    return F.linear(x, weight, bias)


def _compile_linears(applied: AppliedLevers, modules, mode: str) -> dict:
    """Every plain nn.Linear of `modules` through one compiled F.linear (one compilation and autotune
    per distinct shape; the quantised linears keep their own paths)."""
    import torch._dynamo

    fn = torch.compile(_linear, mode=mode, dynamic=False)
    done, skipped = 0, {}
    for root in modules:
        for m in root.modules():
            if type(m) is nn.Linear:
                m.forward = (lambda x, m=m: fn(x, m.weight, m.bias))
                applied._undo.append(lambda m=m: m.__dict__.pop("forward", None))
                done += 1
            elif "Linear" in type(m).__name__:
                skipped[type(m).__name__] = skipped.get(type(m).__name__, 0) + 1
    # one code object serves every shape: let it hold them all (the default would fall back to eager after 8)
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            _set_attr(applied, cfg, name, max(getattr(cfg, name), 256))
    return {"compiled_linears": done, "skipped": skipped}


def _splitk(applied: AppliedLevers) -> str:
    import torch._inductor.config as inductor

    try:
        _set_attr(applied, inductor.triton, "decompose_k_threshold", SPLITK_THRESHOLD)
    except AttributeError:
        return f"this torch ({torch.__version__}) has no Inductor decompose-K (triton.decompose_k_threshold): plain autotune"
    return f"Inductor decompose-K offered where K >= {SPLITK_THRESHOLD} x max(M, N)"


def apply_levers(pipe, levers: Levers, force_compile: bool = False) -> AppliedLevers:
    """Switch `levers` on for a T2IPipeline (after enable_graphs). Compilation happens on a GPU only
    unless force_compile (the CPU's Inductor, for tests). Returns the handle with its report."""
    applied = AppliedLevers(levers)
    rep = applied.report
    rep["levers"] = levers.spec() or "baseline"
    on_gpu = torch.device(pipe.device).type == "cuda"
    try:
        backbone = _bare(pipe.backbone)
        net = pipe.head.net.inner if isinstance(pipe.head.net, GraphedModule) else pipe.head.net
        if levers.fuse:
            rep["fuse"] = fuse_projections(backbone).as_dict()
            applied._undo.append(lambda: unfuse_projections(backbone))
        if hasattr(net, "step_cache"):
            _set_attr(applied, net, "step_cache", levers.step_cache)
        backends = sdpa_backends(levers.sdpa)
        for layer in backbone.model.layers:
            _set_attr(applied, layer.self_attn, "sdpa_backends", backends)
            _set_attr(applied, layer.self_attn, "gqa", levers.gqa)
        if levers.gemm == "cublaslt":
            if on_gpu:
                prefer = torch.backends.cuda.preferred_blas_library
                old = prefer()
                prefer("cublaslt")
                applied._undo.append(lambda: prefer(old))
                rep["gemm"] = f"preferred BLAS library {prefer()} (was {old})"
            else:
                rep["gemm"] = "cublaslt: no effect on the CPU"
        elif levers.gemm.startswith("autotune"):
            if on_gpu or force_compile:
                note = _splitk(applied) if levers.gemm == "autotune-splitk" else "max-autotune"
                rep["gemm"] = {**_compile_linears(applied, [backbone.model.layers, net], "max-autotune-no-cudagraphs"),
                               "note": note}
                applied._undo.append(_dynamo_reset)
            else:
                rep["gemm"] = f"{levers.gemm}: not compiled on the CPU"
        parts = COMPILE_TARGETS[levers.compile]
        if parts:
            if on_gpu or force_compile:
                rep["compiled"] = compile_parts(pipe, levers.compile_mode, parts)
                applied._undo.append(lambda: (disable_compile(pipe), _dynamo_reset()))
            else:
                rep["compiled"] = []
                rep["compile"] = "not compiled on the CPU"
    except BaseException:
        applied.remove()
        raise
    return applied


def _dynamo_reset() -> None:
    """Compiled code of a lever that is switched off goes with it (no stale guards or recompile counts)."""
    import torch._dynamo

    torch._dynamo.reset()


__all__ = ["AppliedLevers", "COMPILE_MODES", "COMPILE_TARGETS", "GEMM_CHOICES", "GQA_LAYOUTS", "Levers", "apply_levers"]
