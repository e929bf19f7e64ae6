"""Linears that read the same input, fused into one after loading (issue 11's "fused projections"
lever): Qwen3's q, k and v projections become `qkv_proj`, its gate and up projections `gate_up_proj`.

One GEMM reads the input once and fills more of the GPU at the block step's 32 to 128 rows (k and v
alone are 1,024 outputs wide at 14B: a handful of tiles). The fused weight is the parts' rows
concatenated, so each output is the same dot product as before; the kernel that computes it may
differ (another shape), hence the same values up to rounding, not bit for bit.

- Any kind of linear whose every tensor is per output row: nn.Linear (weight, bias), the fp8
  linears (e4m3 weight and one scale per row) and the 4-bit ones (Q4_0 blocks, a row's blocks in its
  row); parts of different kinds, dtypes or devices are left alone, with the reason.
- Memory: fused one group at a time (the new weight is written, then the parts are dropped), so the
  peak is the model plus one group (a layer's gate and up projections), never a second model.
- Keys: the parent's state_dict() still names the parts (the fused tensors split back into views)
  and load_state_dict() takes the parts' keys (concatenated on the way in), so files and loaders
  never see the fused names. Loading by assignment (formats.checkpoints.assign) happens before fusing.
- Offloading keeps its own references to the weights (stage offload per group, layer streaming in
  host copies per layer): fuse before offloading; a backbone with offload hooks is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import BitDanceError
from ..formats.fp8 import FP8_DTYPES, Fp8Linear
from ..formats.q4 import Q4Linear

# Qwen3's groups: (submodule of a decoder layer, the parts in output order, the fused name)
QWEN3_GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
                ("mlp", ("gate_proj", "up_proj"), "gate_up_proj"))


def _new_like(part: nn.Module, out_features: int) -> nn.Module:
    """An empty module of the part's kind with `out_features` rows (meta: no memory)."""
    bias = part.bias is not None
    if type(part) is nn.Linear:
        return nn.Linear(part.in_features, out_features, bias=bias, device="meta")
    if type(part) is Fp8Linear:
        out = Fp8Linear(part.in_features, out_features, bias=bias, device="meta", matmul=part.matmul)
        out.failed = dict(part.failed)  # a mode that failed on a part is not tried on the whole
        return out
    if type(part) is Q4Linear:
        return Q4Linear(part.in_features, out_features, bias=bias, device="meta")
    raise TypeError(type(part).__name__)


def _tensors(m: nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    """name -> (tensor, is a parameter) for the module's own tensors."""
    out = {n: (p, True) for n, p in m._parameters.items() if p is not None}
    out.update({n: (b, False) for n, b in m._buffers.items() if b is not None})
    return out


def _cat_rows(ts: list[torch.Tensor]) -> torch.Tensor:
    if ts[0].dtype in FP8_DTYPES:  # concatenated as bytes (cat of float8 is not on every build)
        return torch.cat([t.view(torch.uint8) for t in ts]).view(ts[0].dtype)
    return torch.cat(ts)


def _why_not(parts: list[nn.Module | None]) -> str | None:
    if any(p is None for p in parts):
        return "a part is missing"
    kinds = {type(p) for p in parts}
    if len(kinds) > 1:
        return f"parts of different kinds ({', '.join(sorted(k.__name__ for k in kinds))})"
    kind = kinds.pop()
    if kind not in (nn.Linear, Fp8Linear, Q4Linear):
        return f"{kind.__name__} is not a linear this fusion knows (nn.Linear, Fp8Linear, Q4Linear)"
    tensors = [_tensors(p) for p in parts]
    if len({tuple(sorted(t)) for t in tensors}) > 1 or len({p.in_features for p in parts}) > 1:
        return "parts with different inputs or tensors"
    for name in tensors[0]:
        if len({(t[name][0].dtype, t[name][0].device) for t in tensors}) > 1:
            return f"parts' {name} of different dtypes or devices"
        if tensors[0][name][0].device.type == "meta":
            return "not loaded (meta tensors)"
    if kind is Fp8Linear and len({p.matmul for p in parts}) > 1:
        return "fp8 parts with different matmul modes"
    return None


def _hooks(parent: nn.Module) -> None:
    """state_dict / load_state_dict of `parent` in the parts' names (installed once per parent)."""
    if getattr(parent, "_fused_hooks", None) is not None:
        return

    def split_on_save(module, state_dict, prefix, local_metadata):
        for fused, (names, sizes, leaves, _order) in module._fused_groups.items():
            for leaf in leaves:
                t = state_dict.pop(prefix + f"{fused}.{leaf}", None)
                if t is None:
                    continue
                for name, piece in zip(names, t.split(sizes, dim=0)):
                    state_dict[prefix + f"{name}.{leaf}"] = piece

    def join_on_load(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for fused, (names, _sizes, leaves, _order) in module._fused_groups.items():
            for leaf in leaves:
                keys = [prefix + f"{name}.{leaf}" for name in names]
                if all(k in state_dict for k in keys):
                    state_dict[prefix + f"{fused}.{leaf}"] = _cat_rows([state_dict.pop(k) for k in keys])

    parent._fused_groups = {}
    parent._fused_hooks = (parent.register_state_dict_post_hook(split_on_save),
                           parent.register_load_state_dict_pre_hook(join_on_load))


def fuse_linears(parent: nn.Module, names: tuple[str, ...], fused_name: str) -> str | None:
    """parent.<names> (linears over the same input) -> parent.<fused_name>, whose output is the
    parts' outputs concatenated in that order; the parts are removed. Returns None when fused, else
    why not (nothing changed)."""
    if getattr(parent, fused_name, None) is not None:
        return "already fused"
    parts = [getattr(parent, n, None) for n in names]
    why = _why_not(parts)
    if why is not None:
        return why
    sizes = [p.out_features for p in parts]
    fused = _new_like(parts[0], sum(sizes))
    tensors = [_tensors(p) for p in parts]
    for leaf, (t0, is_param) in tensors[0].items():
        cat = _cat_rows([t[leaf][0].detach() for t in tensors])
        if is_param:
            fused._parameters[leaf] = nn.Parameter(cat, requires_grad=t0.requires_grad)
        else:
            fused._buffers[leaf] = cat
    _hooks(parent)
    parent._fused_groups[fused_name] = (tuple(names), sizes, tuple(tensors[0]), list(parent._modules))
    del tensors, parts
    for n in names:
        delattr(parent, n)  # the parts' memory goes back before the next group is fused
    setattr(parent, fused_name, fused)
    return None


def unfuse_linears(parent: nn.Module, fused_name: str) -> bool:
    """Undo `fuse_linears`: the parts back, with their own copies of the rows (bit for bit the
    weights they had). Returns whether anything was undone."""
    groups = getattr(parent, "_fused_groups", {})
    fused = getattr(parent, fused_name, None)
    if fused_name not in groups or fused is None:
        return False
    names, sizes, _leaves, order = groups.pop(fused_name)
    tensors = _tensors(fused)
    for i, name in enumerate(names):
        part = _new_like(fused, sizes[i])
        for leaf, (t, is_param) in tensors.items():
            piece = t.detach().split(sizes, dim=0)[i].clone()
            if is_param:
                part._parameters[leaf] = nn.Parameter(piece, requires_grad=t.requires_grad)
            else:
                part._buffers[leaf] = piece
        setattr(parent, name, part)
    delattr(parent, fused_name)
    object.__setattr__(parent, fused_name, None)
    mods = dict(parent._modules)  # the submodules in their order before fusing (state_dict keys too)
    parent._modules.clear()
    parent._modules.update({k: mods.pop(k) for k in order if k in mods})
    parent._modules.update(mods)
    if not groups:
        for h in parent._fused_hooks:
            h.remove()
        parent._fused_hooks = None
    return True


@dataclass
class FuseReport:
    fused: int = 0  # groups fused
    skipped: dict = field(default_factory=dict)  # "layers.N.mlp" -> why not

    def as_dict(self) -> dict:
        reasons = sorted(set(self.skipped.values()))
        return {"fused": self.fused, "skipped": len(self.skipped), "reasons": reasons}


def _check_no_offload(backbone: nn.Module) -> None:
    """Offloading keeps its own references to the weights (stage: per group, streaming: host copies
    per layer) and reaches them from forward hooks: fusing under it would leave it with the old ones."""
    for name, m in backbone.named_modules():
        if m._forward_pre_hooks or m._forward_hooks:
            raise BitDanceError(f"fused projections: backbone module '{name or '(root)'}' has forward hooks (offloading?): "
                                "fuse the projections before offloading")


def fuse_projections(backbone: nn.Module) -> FuseReport:
    """Qwen3's q/k/v and gate/up projections fused in every decoder layer, one layer at a time."""
    _check_no_offload(backbone)
    report = FuseReport()
    for i, layer in enumerate(backbone.model.layers):
        for sub, names, fused_name in QWEN3_GROUPS:
            why = fuse_linears(getattr(layer, sub), names, fused_name)
            if why is None:
                report.fused += 1
            elif why != "already fused":
                report.skipped[f"layers.{i}.{sub}"] = why
    return report


def unfuse_projections(backbone: nn.Module) -> int:
    """Undo `fuse_projections`; returns how many groups were split back."""
    _check_no_offload(backbone)
    n = 0
    for layer in backbone.model.layers:
        for sub, _names, fused_name in QWEN3_GROUPS:
            n += unfuse_linears(getattr(layer, sub), fused_name)
    return n
