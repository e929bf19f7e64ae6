"""Offload: run a pipeline whose weights live in (pinned) CPU memory on a smaller GPU.

Two modes, both attached from outside with forward pre-hooks (no change to the pipeline code):

- **stage** (`StageOffload`): the modules are grouped (backbone; head + projector; AE decoder;
  AE encoder) and a group is copied to the device when one of its modules is called. Groups stay
  resident, least recently used first out, while they fit `budget_bytes`; with no budget only the
  group in use is resident ("each on the GPU only while used").
- **stream** (`StreamingBackbone`): the first N backbone layers stay on the device; the others live
  in pinned CPU memory and are copied, one layer ahead, into two device slots on a side CUDA stream
  while the current layer computes (events order copy after the slot's last use, compute after the
  copy). The head, projector and AE are then stage-offloaded.

In both modes the token-embedding table stays in CPU memory (`HostEmbedding`: a lookup on the CPU,
only the looked-up rows go to the device): it is 1.5 GB at 14B and only used by the prefill.

Device copies are always fresh allocations filled from the CPU master, and eviction points the
parameters back at the master, so nothing is ever copied back. On CUDA the masters are packed into
page-locked chunks (host_memory.py: pinned in place, about the weights' size, not 1.4x of it). On a CPU-only machine the same code
runs with device "cpu" (real copies, synchronous, no streams): residency, slot rotation and results
are testable there; the side stream, pinned memory and events only exist on CUDA.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BitDanceError, require
from .host_memory import HostCopies, registration_status

MODES = ("none", "stage", "stream")
_ALIGN = 256


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


class HostEmbedding(nn.Module):
    """An embedding lookup whose table stays in CPU memory; the looked-up rows go to the ids' device.
    Same state-dict key (`weight`) and same `weight.dtype` as the embedding it replaces."""

    def __init__(self, emb: nn.Module):
        super().__init__()
        self.weight = nn.Parameter(emb.weight.detach().to("cpu"), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids.to("cpu"), self.weight).to(ids.device, non_blocking=True)


def host_embeddings(backbone: nn.Module) -> None:
    emb = backbone.model.embed_tokens
    if not isinstance(emb, HostEmbedding):
        backbone.model.embed_tokens = HostEmbedding(emb)


def _tensor_slots(modules, skip=()) -> list[tuple[nn.Module, str, bool]]:
    """(owner, name, is_parameter) for every parameter and buffer under `modules`, once each."""
    out, seen = [], set()
    skip_ids = {id(m) for s in skip for m in s.modules()}
    for root in modules:
        for mod in root.modules():
            if id(mod) in skip_ids or id(mod) in seen:
                continue
            seen.add(id(mod))
            for name, p in mod._parameters.items():
                if p is not None:
                    out.append((mod, name, True))
            for name, b in mod._buffers.items():
                if b is not None:
                    out.append((mod, name, False))
    return out


def _get(owner, name, is_param):
    return owner._parameters[name] if is_param else owner._buffers[name]


def _set(owner, name, is_param, t):
    if is_param:
        owner._parameters[name].data = t
    else:
        owner._buffers[name] = t


class WeightHome:
    """CPU master copies of some modules' tensors; `load` gives the modules fresh device copies,
    `evict` points them back at the masters."""

    def __init__(self, modules, device, skip=(), pin: bool | None = None):
        self.device = torch.device(device)
        pin = _is_cuda(device) and torch.cuda.is_available() if pin is None else pin
        slots = _tensor_slots(modules, skip)
        masters = [None] * len(slots)

        def put(i, t):
            _set(*slots[i], t)
            masters[i] = t
        self.host = None
        if pin:  # packed into page-locked chunks (host_memory.py), one tensor at a time
            self.host = HostCopies(pin=True)
            sizes = [_get(*s).numel() * _get(*s).element_size() for s in slots]
            # copied from wherever it is (a model drawn on the GPU goes straight into the locked pages)
            self.host.pack(lambda i: _get(*slots[i]), put, len(slots), sizes)
        else:
            for i, s in enumerate(slots):
                put(i, _get(*s).detach().to("cpu"))
        self.entries = [(owner, name, is_param, m) for (owner, name, is_param), m in zip(slots, masters)]
        self.nbytes = sum(m.numel() * m.element_size() for m in masters)
        self.resident = False

    def load(self) -> None:
        if self.resident:
            return
        try:
            for owner, name, is_param, master in self.entries:
                dev = torch.empty_like(master, device=self.device)
                dev.copy_(master, non_blocking=True)
                _set(owner, name, is_param, dev)
        except BaseException:  # out of memory half-way: no device copy may outlive the failed load unseen
            for owner, name, is_param, master in self.entries:
                _set(owner, name, is_param, master)
            raise
        self.resident = True

    def evict(self) -> None:
        if not self.resident:
            return
        for owner, name, is_param, master in self.entries:
            _set(owner, name, is_param, master)
        self.resident = False

    def release(self) -> None:
        """Evict, and unlock the host copies' pages (they stay the modules' CPU weights)."""
        self.evict()
        if self.host is not None:
            self.host.release()


@dataclass
class OffloadStats:
    loads: dict = field(default_factory=dict)  # group -> times copied to the device
    bytes_moved: int = 0  # host -> device bytes
    peak_resident: int = 0  # largest sum of resident group bytes (stage part)
    streamed_loads: int = 0  # streamed layer copies
    prefetch_hits: int = 0  # streamed layers that were already in their slot when needed


def lru_order(sizes: dict[str, int], budget: int | None, calls: list[str]) -> list[tuple[str, set[str]]]:
    """The residency after each call of the stage policy (shared with the planner):
    a called group is loaded; least recently used groups leave until it fits the budget
    (no budget: every other group leaves)."""
    resident: OrderedDict[str, None] = OrderedDict()
    out = []
    for g in calls:
        if g in resident:
            resident.move_to_end(g)
        else:
            if budget is None:
                resident.clear()
            else:
                while resident and sum(sizes[r] for r in resident) + sizes[g] > budget:
                    resident.popitem(last=False)
            resident[g] = None
        out.append((g, set(resident)))
    return out


def _weak_hook(owner, method: str, arg):
    """A forward (pre-)hook calling owner.method(arg) through a weak reference. A hook holding its
    offload strongly makes a cycle (module -> hook -> offload -> master copies -> module) that only
    Python's cycle collector frees: the device copies, stream slots and page-locked host memory of a
    model ComfyUI has dropped would stay until some later collection. The pipeline holds its offload
    (`pipe.offload`), so the modules live no longer than it does."""
    ref = weakref.ref(owner)

    def hook(*_):
        target = ref()
        if target is None:
            raise BitDanceError("this model's offload was dropped while its modules are still in use; keep the "
                                "Offload that apply_offload returned (pipe.offload) as long as the model")
        getattr(target, method)(arg)
    return hook


class StageOffload:
    """Groups of modules, each on the device only while used (or while they fit `budget_bytes`)."""

    def __init__(self, groups: dict[str, list[nn.Module]], device, budget_bytes: int | None = None, skip=(),
                 stats: OffloadStats | None = None, deep: tuple[str, ...] = (), pin: bool | None = None):
        """deep: groups whose every submodule is hooked, not only their roots: for modules whose
        parts are called directly (the tiled AE decode runs the decoder's levels one by one)."""
        self.device = torch.device(device)
        self.budget = budget_bytes
        self.homes = {g: WeightHome(mods, device, skip, pin) for g, mods in groups.items()}
        self.sizes = {g: h.nbytes for g, h in self.homes.items()}
        self.resident: OrderedDict[str, None] = OrderedDict()
        self.stats = stats or OffloadStats()
        self.handles = []
        for g, mods in groups.items():
            for root in mods:
                for m in (root.modules() if g in deep else [root]):
                    self.handles.append(m.register_forward_pre_hook(_weak_hook(self, "use", g)))

    def use(self, group: str) -> None:
        if group in self.resident:
            self.resident.move_to_end(group)
            return
        if self.budget is None:
            for r in list(self.resident):
                self._evict(r)
        else:
            while self.resident and self.resident_bytes() + self.sizes[group] > self.budget:
                self._evict(next(iter(self.resident)))
        self.homes[group].load()
        self.resident[group] = None
        self.stats.loads[group] = self.stats.loads.get(group, 0) + 1
        self.stats.bytes_moved += self.sizes[group]
        self.stats.peak_resident = max(self.stats.peak_resident, self.resident_bytes())

    def _evict(self, group: str) -> None:
        self.homes[group].evict()
        self.resident.pop(group, None)

    def resident_bytes(self) -> int:
        return sum(self.sizes[g] for g in self.resident)

    def evict_all(self) -> None:
        for g in list(self.resident):
            self._evict(g)

    def remove(self) -> None:
        self.evict_all()
        if _is_cuda(self.device) and torch.cuda.is_available():
            torch.cuda.current_stream(self.device).synchronize()  # copies from the pages being unlocked
        for home in self.homes.values():
            home.release()
        for h in self.handles:
            h.remove()
        self.handles = []


class StreamingBackbone:
    """Keep `resident_layers` backbone layers on the device, stream the others through two slots."""

    def __init__(self, backbone: nn.Module, device, resident_layers: int, slots: int = 2,
                 stats: OffloadStats | None = None, pin: bool | None = None):
        layers = list(backbone.model.layers)
        require(0 <= resident_layers <= len(layers),
                f"resident_layers must be between 0 and {len(layers)} (the backbone's layers), got {resident_layers}")
        require(slots >= 2, "streaming needs at least 2 slots (one computing, one being filled)")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.stats = stats or OffloadStats()
        # fixed part: resident layers + the final norm (+ anything else but the host embedding)
        fixed = layers[:resident_layers] + [backbone.model.norm]
        self.fixed = WeightHome(fixed, device, pin=pin)
        self.fixed.load()
        self.streamed = layers[resident_layers:]
        self.homes = [WeightHome([l], device, pin=pin) for l in self.streamed]
        self.layout = []  # per streamed layer: [(offset, nbytes)] inside a slot
        for h in self.homes:
            off, lay = 0, []
            for *_, m in h.entries:
                n = m.numel() * m.element_size()
                lay.append((off, n))
                off += -(-n // _ALIGN) * _ALIGN
            self.layout.append((lay, off))
        self.slot_bytes = max((size for _, size in self.layout), default=0)
        n_slots = min(slots, len(self.streamed))
        self.slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(n_slots)]
        self.owner = [None] * n_slots  # streamed index held by each slot
        self.where = {}  # streamed index -> slot
        self.last_slot = None  # slot of the layer computing most recently
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.ready = [torch.cuda.Event() for _ in self.slots]
            self.free = [torch.cuda.Event() for _ in self.slots]
        self.parked = False
        self.handles = []
        for j, layer in enumerate(self.streamed):
            self.handles.append(layer.register_forward_pre_hook(_weak_hook(self, "_before", j)))
            self.handles.append(layer.register_forward_hook(_weak_hook(self, "_after", j)))
        # a parked backbone comes back at its next forward: a hook on the root, which the graphed static
        # step runs itself (hooks inside the backbone would send every block step the eager way), and in
        # _before for a streamed layer called on its own
        self.handles.append(backbone.register_forward_pre_hook(_weak_hook(self, "_unpark", None)))

    @property
    def resident_bytes(self) -> int:
        return (self.fixed.nbytes if self.fixed.resident else 0) + len(self.slots) * self.slot_bytes

    def park(self) -> None:
        """Give the device memory back between generations (the resident layers and the slots): ComfyUI
        cannot unload what it does not see, so another model gets the room. The next forward of the
        backbone brings them back (one copy of the resident layers)."""
        # not skipped when already parked: a return that failed half-way may have left something behind
        if self.cuda:  # the last prefetch may still be writing a slot
            torch.cuda.current_stream(self.device).synchronize()
            self.copy_stream.synchronize()
        for j in list(self.where):
            self.homes[j].evict()
        self.where.clear()
        self.owner = [None] * len(self.owner)
        self.last_slot = None
        self.fixed.evict()
        self.slots = []
        self.parked = True

    def _unpark(self, _=None) -> None:
        if not self.parked:
            return
        self.fixed.load()  # out of memory here: rolled back, still parked, nothing held
        slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device) for _ in self.owner]
        if self.cuda:  # the new slots may be memory the compute stream's queued work still reads
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        self.slots = slots
        self.parked = False

    def _fill(self, j: int, k: int) -> None:
        """Copy streamed layer j into slot k and point its parameters there."""
        old = self.owner[k]
        if old is not None:
            self.homes[old].evict()
            self.where.pop(old, None)
        buf = self.slots[k]
        lay, _ = self.layout[j]
        home = self.homes[j]
        if self.cuda:
            self.copy_stream.wait_event(self.free[k])  # the slot's previous layer has finished computing
            ctx = torch.cuda.stream(self.copy_stream)
        else:
            ctx = _nullcontext()
        with ctx:
            for (owner, name, is_param, master), (off, n) in zip(home.entries, lay):
                view = buf[off:off + n].view(master.dtype).view(master.shape)
                view.copy_(master, non_blocking=True)
                _set(owner, name, is_param, view)
            if self.cuda:
                self.ready[k].record(self.copy_stream)
        home.resident = True
        self.owner[k], self.where[j] = j, k
        self.stats.streamed_loads += 1
        self.stats.bytes_moved += home.nbytes

    def _other_slot(self) -> int:
        if self.last_slot is None:
            return 0
        return (self.last_slot + 1) % len(self.slots)

    def _before(self, j: int) -> None:
        self._unpark()
        if j in self.where:
            self.stats.prefetch_hits += 1
        else:
            self._fill(j, self._other_slot())
        k = self.where[j]
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[k])
        self.last_slot = k
        nxt = (j + 1) % len(self.streamed)
        if nxt not in self.where and len(self.streamed) > 1:
            self._fill(nxt, self._other_slot())  # prefetch, overlapping this layer's compute

    def _after(self, j: int) -> None:
        if self.cuda:
            self.free[self.where[j]].record(torch.cuda.current_stream(self.device))

    def remove(self) -> None:
        if self.cuda:
            # the last layer's wrap-around prefetch may still be writing a slot on the copy stream
            torch.cuda.current_stream(self.device).synchronize()
            self.copy_stream.synchronize()
        for h in self.handles:
            h.remove()
        for home in self.homes:
            home.release()
        self.fixed.release()
        self.handles, self.slots = [], []


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@dataclass
class Offload:
    """What `apply_offload` attached; `remove()` detaches it (weights back in CPU memory)."""

    mode: str
    stage: StageOffload | None
    stream: StreamingBackbone | None
    stats: OffloadStats

    def device_bytes(self) -> int:
        """Weight bytes held on the device right now (resident groups, resident layers and slots)."""
        n = self.stage.resident_bytes() if self.stage is not None else 0
        return n + (self.stream.resident_bytes if self.stream is not None else 0)

    def homes(self) -> list[WeightHome]:
        out = list(self.stage.homes.values()) if self.stage is not None else []
        if self.stream is not None:
            out += [self.stream.fixed] + self.stream.homes
        return out

    def host_tensors(self) -> list[torch.Tensor]:
        """The CPU master copies of every offloaded weight (views into page-locked chunks when pinned)."""
        return [master for home in self.homes() for *_, master in home.entries]

    def host_report(self) -> dict:
        """The host copies' chunks: how many, their bytes, how each was locked ("registered" by
        cudaHostRegister, "pinned" by PyTorch, "pageable"), the reasons for any that are not
        registered, what `is_pinned()` says of each kind, and the process's registration status."""
        out = {"chunks": 0, "bytes": 0, "how": {}, "failures": [], "is_pinned": {}}
        for home in self.homes():
            if home.host is None:
                continue
            r = home.host.report()
            out["chunks"] += r["chunks"]
            out["bytes"] += r["bytes"]
            for k, v in r["how"].items():
                out["how"][k] = out["how"].get(k, 0) + v
            out["failures"] += [f for f in r["failures"] if f not in out["failures"]]
            if isinstance(r.get("is_pinned"), dict):
                out["is_pinned"].update(r["is_pinned"])
            elif "is_pinned" in r:
                out["failures"].append(r["is_pinned"])
        out["registration"] = registration_status()
        return out

    def park(self) -> None:
        """Every part back in host memory until it is used again (see StreamingBackbone.park)."""
        if self.stream is not None:
            self.stream.park()
        if self.stage is not None:
            self.stage.evict_all()  # each group comes back when used

    def remove(self) -> None:
        if self.stream is not None:
            self.stream.remove()
        if self.stage is not None:
            self.stage.remove()


AE_GROUPS = ("decoder", "encoder")  # called once per image, and in parts by the tiled decode: hooked deep


def pipeline_groups(pipe, include_backbone: bool = True) -> dict[str, list[nn.Module]]:
    groups = {}
    if include_backbone:
        groups["backbone"] = [pipe.backbone]
    groups["head"] = [pipe.head.net, pipe.projector]
    groups["decoder"] = [pipe.autoencoder.decoder]
    groups["encoder"] = [pipe.autoencoder.encoder]
    return groups


def apply_offload(pipe, mode: str, device, budget_bytes: int | None = None, resident_layers: int | None = None,
                  pin: bool | None = None) -> Offload:
    """Attach an offload mode to a T2IPipeline whose weights are in CPU memory, computing on `device`.

    none: everything moved to the device. stage: see StageOffload (budget_bytes=None: one group at
    a time). stream: `resident_layers` backbone layers on the device (default: half), the rest
    streamed; head/projector and AE stage-offloaded within `budget_bytes`. pin: page-lock the host
    copies (None: on CUDA; False: an application that manages pinned memory itself said not to)."""
    require(mode in MODES, f"offload mode '{mode}' unknown; choose one of {MODES}")
    device = torch.device(device)
    stats = OffloadStats()
    pipe.device = device
    if mode == "none":
        for m in (pipe.backbone, pipe.head, pipe.projector, pipe.autoencoder):
            m.to(device)
        off = Offload(mode, None, None, stats)
    elif mode == "stage":
        host_embeddings(pipe.backbone)
        stage = StageOffload(pipeline_groups(pipe), device, budget_bytes, skip=[pipe.backbone.model.embed_tokens],
                             stats=stats, deep=AE_GROUPS, pin=pin)
        off = Offload(mode, stage, None, stats)
    else:
        host_embeddings(pipe.backbone)
        n = len(pipe.backbone.model.layers)
        resident = n // 2 if resident_layers is None else resident_layers
        stream = StreamingBackbone(pipe.backbone, device, resident, stats=stats, pin=pin)
        stage = StageOffload(pipeline_groups(pipe, include_backbone=False), device, budget_bytes, stats=stats,
                             deep=AE_GROUPS, pin=pin)
        off = Offload(mode, stage, stream, stats)
    pipe.offload = off  # the pipeline owns its offload: the hooks hold it weakly
    return off
