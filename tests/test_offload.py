"""Offload on the CPU: device "cpu" with real copies, so residency, slot rotation and results are
checked without a GPU (the side stream, pinned memory and events only exist on CUDA)."""
import warnings

import pytest
import torch

from bitdance_core.runtime.offload import HostEmbedding, StageOffload, apply_offload, lru_order
from bitdance_core.cli.synthetic import build_random_t2i, custom_shape

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*not one of the official BitDance sizes.*")
PROMPT = "a red fox in the snow"
SHAPE = custom_shape("tiny", layers=4)  # 4 backbone layers: 1 resident + 3 streamed through 2 slots
ARGS = dict(height=128, width=128, steps=1, cfg=4.0, seed=11)  # 4 blocks


@pytest.fixture(scope="module")
def reference():
    pipe = build_random_t2i(SHAPE, seed=3)
    bits = pipe.generate(PROMPT, **ARGS)
    return bits, pipe.decode(bits), {k: v.clone() for k, v in pipe.backbone.state_dict().items()}


def test_lru_policy():
    sizes = {"a": 4, "b": 3, "c": 2}
    calls = ["a", "b", "a", "c"]
    assert [r for _, r in lru_order(sizes, None, calls)] == [{"a"}, {"b"}, {"a"}, {"c"}]
    assert [r for _, r in lru_order(sizes, 7, calls)] == [{"a"}, {"a", "b"}, {"a", "b"}, {"a", "c"}]
    assert [r for _, r in lru_order(sizes, 100, calls)][-1] == {"a", "b", "c"}


def test_stage_offload_one_group_at_a_time(reference):
    bits_ref, px_ref, sd_ref = reference
    pipe = build_random_t2i(SHAPE, seed=3)
    off = apply_offload(pipe, "stage", "cpu")
    assert isinstance(pipe.backbone.model.embed_tokens, HostEmbedding)
    assert set(pipe.backbone.state_dict()) == set(sd_ref)  # same keys: the nodes can still save/inspect
    seen = []
    stage = off.stage
    hook = pipe.head.net.register_forward_pre_hook(lambda *_: seen.append(set(stage.resident)))
    hook2 = pipe.backbone.register_forward_hook(lambda *_: seen.append(set(stage.resident)))
    bits = pipe.generate(PROMPT, **ARGS)
    px = pipe.decode(bits)
    hook.remove()
    hook2.remove()
    assert torch.equal(bits, bits_ref) and torch.equal(px, px_ref)
    assert all(len(r) == 1 for r in seen)  # "each on the device only while used"
    assert off.stats.loads == {"backbone": 4, "head": 4, "decoder": 1}  # 4 blocks: prefill + 3 steps
    assert off.stats.peak_resident == max(stage.sizes[g] for g in ("backbone", "head", "decoder"))
    off.remove()
    # evicted parameters point at the CPU masters again
    assert all(home.resident is False for home in stage.homes.values())


def test_stage_offload_with_a_budget_keeps_what_fits(reference):
    bits_ref, _, _ = reference
    pipe = build_random_t2i(SHAPE, seed=3)
    probe = apply_offload(pipe, "stage", "cpu")
    sizes = dict(probe.stage.sizes)
    probe.remove()
    pipe = build_random_t2i(SHAPE, seed=3)
    off = apply_offload(pipe, "stage", "cpu", budget_bytes=sizes["backbone"] + sizes["head"])
    assert torch.equal(pipe.generate(PROMPT, **ARGS), bits_ref)
    assert off.stats.loads == {"backbone": 1, "head": 1}
    pipe.decode(bits_ref)
    assert off.stats.loads["decoder"] == 1 and "decoder" in off.stage.resident
    assert off.stage.resident_bytes() <= sizes["backbone"] + sizes["head"]


def test_device_copies_are_fresh_and_eviction_returns_to_the_master():
    lin = torch.nn.Linear(8, 8)
    master_ptr = lin.weight.data_ptr()
    st = StageOffload({"g": [lin]}, "cpu")
    st.use("g")
    assert lin.weight.data_ptr() != master_ptr  # a real copy, as a GPU would get
    st.evict_all()
    assert lin.weight.data_ptr() == st.homes["g"].entries[0][3].data_ptr()


@pytest.mark.parametrize("resident", [0, 1, 4])
def test_streaming_matches_and_rotates_through_two_slots(reference, resident):
    bits_ref, px_ref, _ = reference
    pipe = build_random_t2i(SHAPE, seed=3)
    off = apply_offload(pipe, "stream", "cpu", resident_layers=resident)
    stream = off.stream
    in_slot = []

    def check(layer_idx):
        def hook(mod, _args):
            ptrs = [p.data_ptr() for p in mod.parameters()]
            ranges = [(s.data_ptr(), s.data_ptr() + s.numel()) for s in stream.slots]
            in_slot.append(all(any(a <= q < b for a, b in ranges) for q in ptrs))
        return hook
    handles = [l.register_forward_pre_hook(check(i)) for i, l in enumerate(pipe.backbone.model.layers[resident:])]
    bits = pipe.generate(PROMPT, **ARGS)
    for h in handles:
        h.remove()
    assert torch.equal(bits, bits_ref)
    assert torch.equal(pipe.decode(bits), px_ref)
    n_streamed = 4 - resident
    assert len(stream.slots) == min(2, n_streamed)
    assert all(in_slot)  # every streamed layer computed from a slot, never from the CPU master
    forwards = 4  # prefill + 3 block steps
    if n_streamed > 2:
        # each forward streams every layer once (plus the prefetch of the first layer for a next
        # forward); all but the very first copy are prefetches, made while the previous layer computes
        assert stream.stats.streamed_loads == forwards * n_streamed + 1
        assert stream.stats.prefetch_hits >= forwards * n_streamed - forwards
    elif n_streamed:
        assert stream.stats.streamed_loads == n_streamed  # they fit the two slots: copied once
    off.remove()


@pytest.mark.parametrize("mode", ["stage", "stream"])
def test_a_dropped_offloaded_model_is_freed_at_once(reference, mode):
    """A model with offload hooks is freed as soon as its last reference goes, without Python's cycle
    collector: ComfyUI drops a model from its cache and loads the next one, and the offloaded model's
    device copies, stream slots and page-locked host memory must not still be held then. (The hooks
    hold the offload weakly; the pipeline holds it.)"""
    import gc
    import weakref

    bits_ref, _, _ = reference
    pipe = build_random_t2i(SHAPE, seed=3)
    off = apply_offload(pipe, mode, "cpu", resident_layers=1)
    assert pipe.offload is off
    assert torch.equal(pipe.generate(PROMPT, **ARGS), bits_ref)  # the hooks work through their weak references
    leaf = pipe.backbone.model.layers[-1].mlp.down_proj  # a module whose weights the offload moves
    watched = [weakref.ref(x) for x in (pipe, off, pipe.head.net, leaf, leaf.weight, off.stats)]
    slots = off.stream.slots if off.stream is not None else []
    watched += [weakref.ref(t) for t in slots]
    del off, slots, leaf
    gc.collect()
    gc.disable()  # from here only reference counting frees anything
    try:
        del pipe
        alive = [w() for w in watched if w() is not None]
    finally:
        gc.enable()
    assert not alive, f"still held after the last reference went: {[type(a).__name__ for a in alive]}"


@pytest.mark.parametrize("mode,resident", [("stage", None), ("stream", 1), ("stream", 0), ("stream", 4)])
def test_a_parked_offload_holds_no_device_memory_and_comes_back(reference, mode, resident):
    """Between generations an offloaded model gives its device memory back (`park`: the ComfyUI nodes
    do it after each use, as ComfyUI cannot unload what it does not see); the next generation brings
    every part back by itself and gives the same bits, and decoding works as well."""
    bits_ref, px_ref, _ = reference
    pipe = build_random_t2i(SHAPE, seed=3)
    off = apply_offload(pipe, mode, "cpu", resident_layers=resident)
    for _ in range(2):
        assert torch.equal(pipe.generate(PROMPT, **ARGS), bits_ref)
        assert off.device_bytes() > 0
        off.park()
        assert off.device_bytes() == 0
        homes = off.homes()
        assert not any(h.resident for h in homes)
        # every offloaded tensor points at its host master again: no device copy is referenced
        assert all(getattr(owner, name).data_ptr() == m.data_ptr() for h in homes for owner, name, _, m in h.entries)
    assert torch.equal(pipe.decode(bits_ref), px_ref)
    off.remove()


def test_a_parkable_stream_keeps_the_static_step(reference):
    """Streaming with every layer resident (the 12 GiB plan: only the token embeddings in host memory)
    must keep the static block step (the one CUDA graphs capture and compile): hooks inside the backbone
    send every block step the eager way, so the parked backbone comes back through a hook on its root,
    which the static step runs itself. One eager call per generation: the prefill. Parked and brought
    back twice, the bits stay the reference's."""
    from bitdance_core.runtime.graphs import _has_inner_hooks, enable_graphs

    bits_ref, _, _ = reference
    pipe = build_random_t2i(SHAPE, seed=3)
    off = apply_offload(pipe, "stream", "cpu", resident_layers=4)
    acc = enable_graphs(pipe, static_step_on_cpu=True)
    assert not _has_inner_hooks(pipe.backbone.inner)
    for n in (1, 2):
        assert torch.equal(pipe.generate(PROMPT, **ARGS), bits_ref)
        assert acc.stats.eager_calls == n
        off.park()
        assert off.device_bytes() == 0
    off.remove()


def test_a_return_from_host_memory_that_runs_out_of_memory_holds_nothing(reference, monkeypatch):
    """A parked stream whose resident layers do not fit when it comes back (another model took the
    room) stays parked and holds no slot: the node's park after the failure leaves nothing on the
    device, and the next generation, with room again, gives the reference bits."""
    bits_ref, _, _ = reference
    pipe = build_random_t2i(SHAPE, seed=3)
    off = apply_offload(pipe, "stream", "cpu", resident_layers=1)
    off.park()
    real = off.stream.fixed.load

    def no_room():
        raise torch.OutOfMemoryError("CUDA out of memory (simulated: another model holds the room)")

    monkeypatch.setattr(off.stream.fixed, "load", no_room)
    with pytest.raises(torch.OutOfMemoryError):
        pipe.generate(PROMPT, **ARGS)
    assert off.stream.parked and off.stream.slots == [] and off.device_bytes() == 0
    off.park()
    assert off.device_bytes() == 0
    monkeypatch.setattr(off.stream.fixed, "load", real)
    assert torch.equal(pipe.generate(PROMPT, **ARGS), bits_ref)
    off.remove()


def test_a_group_load_that_runs_out_of_memory_leaves_no_device_copy(monkeypatch):
    """A stage group whose copy to the device fails half-way (out of memory) points every module back
    at its master copy and stays evicted: no device copy is left that nothing counts or frees."""
    from bitdance_core.runtime import offload

    pipe = build_random_t2i(SHAPE, seed=3)
    off = apply_offload(pipe, "stage", "cpu")
    home = off.stage.homes["head"]
    masters = [m for *_, m in home.entries]
    real, calls = torch.empty_like, []

    def empty_like(t, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated on the third tensor)")
        return real(t, **kw)

    monkeypatch.setattr(offload.torch, "empty_like", empty_like)
    with pytest.raises(torch.OutOfMemoryError):
        off.stage.use("head")
    monkeypatch.undo()
    assert not home.resident and "head" not in off.stage.resident
    now = [getattr(owner, name) for owner, name, *_ in home.entries]
    assert all(t is m or t.data_ptr() == m.data_ptr() for t, m in zip(now, masters))
    off.stage.use("head")  # and the next load works
    assert home.resident
    off.remove()


def test_none_mode_is_the_plain_pipeline(reference):
    bits_ref, _, _ = reference
    pipe = build_random_t2i(SHAPE, seed=3)
    off = apply_offload(pipe, "none", "cpu")
    assert off.stage is None and off.stream is None
    assert torch.equal(pipe.generate(PROMPT, **ARGS), bits_ref)


def test_tiled_decode_brings_the_decoder_in(reference):
    """The tiled decode calls the decoder's parts, not the decoder: its group is hooked deep, so it
    still comes to the device (on a GPU its weights would otherwise be left in CPU memory)."""
    bits_ref, _, _ = reference
    plain = build_random_t2i(SHAPE, seed=3)
    px_ref = plain.autoencoder.decode(bits_ref, tile=32)
    pipe = build_random_t2i(SHAPE, seed=3)
    off = apply_offload(pipe, "stage", "cpu")
    px = pipe.autoencoder.decode(bits_ref, tile=32)
    assert off.stats.loads == {"decoder": 1} and list(off.stage.resident) == ["decoder"]
    assert torch.equal(px, px_ref)
    assert off.device_bytes() == off.stage.sizes["decoder"]
    off.remove()
    assert off.device_bytes() == 0


@pytest.mark.parametrize("mode", ["stage", "stream"])
def test_the_linear_preview_is_fitted_through_the_offload(mode):
    """A live preview's map, fitted in the middle of an offloaded sampling, brings the networks in as a
    decode does, once per pass over its random grids (decode, encode, decode), not once a grid, and is
    the map of the plain pipeline."""
    plain = build_random_t2i(SHAPE, seed=3)
    pipe = build_random_t2i(SHAPE, seed=3)
    off = apply_offload(pipe, mode, "cpu", **({"resident_layers": 1} if mode == "stream" else {}))
    preview = pipe.autoencoder.linear_preview(pipe.device)
    assert off.stats.loads == {"decoder": 2, "encoder": 1}
    expected = plain.autoencoder.linear_preview(plain.device)
    assert torch.equal(preview.weight, expected.weight) and torch.equal(preview.bias, expected.bias)
    off.remove()


@pytest.mark.parametrize("mode", ["stage", "stream"])
@pytest.mark.parametrize("pin", [True, False])
def test_pinning_is_what_the_caller_asks(reference, mode, pin):
    """apply_offload(pin=...) reaches every host copy (the ComfyUI nodes pass False under
    --disable-pinned-memory): True packs each home into the page-aligned chunks that get locked on
    CUDA, False keeps plain CPU tensors; the bits are the same either way."""
    bits_ref, _, _ = reference
    pipe = build_random_t2i(SHAPE, seed=3)
    off = apply_offload(pipe, mode, "cpu", resident_layers=1, pin=pin)
    homes = off.homes()
    assert len(homes) == len(off.stage.homes) + (0 if off.stream is None else 1 + len(off.stream.homes))
    assert all((h.host is not None) == pin for h in homes), [h.host for h in homes]
    assert torch.equal(pipe.generate(PROMPT, **ARGS), bits_ref)
    off.remove()


def test_host_copies_packed_into_page_aligned_chunks():
    """With pinning asked for, the CPU masters are packed into page-aligned chunks (one
    cudaHostRegister each on CUDA; on this CPU-only machine they stay pageable): the same values,
    views of a few chunks, about the weights' bytes in all."""
    from bitdance_core.runtime.host_memory import ALIGN, PAGE, plan_chunks
    from bitdance_core.runtime.offload import WeightHome

    assert plan_chunks([100, 200, 300], chunk_bytes=512) == [[0, 1], [2]]
    assert plan_chunks([1000, 10, 10], chunk_bytes=512) == [[0], [1, 2]]  # too big: a chunk of its own

    pipe = build_random_t2i("tiny", seed=2)
    layer = pipe.backbone.model.layers[0]
    x = torch.randn(2, 5, 64)
    cos, sin = torch.ones(2, 5, 16), torch.zeros(2, 5, 16)
    ref = layer(x, cos, sin, None, 0, 0, None)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    home = WeightHome([layer], "cpu", pin=True)
    assert home.host is not None and set(home.host.how) == {"pageable"}  # no CUDA here
    chunk_ptrs = {c.untyped_storage().data_ptr() for c in home.host.chunks}
    assert all(c.data_ptr() % PAGE == 0 for c in home.host.chunks)
    # each chunk's storage starts at its first byte, where a registration starts: Tensor.is_pinned()
    # asks CUDA about the storage's first byte (a chunk sliced out of a bigger buffer read as pageable)
    assert all(c.untyped_storage().data_ptr() == c.data_ptr() for c in home.host.chunks)
    for n, p in layer.named_parameters():
        assert torch.equal(p.detach(), before[n])
        assert p.untyped_storage().data_ptr() in chunk_ptrs and p.data_ptr() % ALIGN == 0
    assert home.nbytes <= home.host.nbytes <= home.nbytes + len(home.entries) * ALIGN + len(home.host.chunks) * PAGE
    home.load()
    assert torch.equal(layer(x, cos, sin, None, 0, 0, None), ref)
    home.release()
    assert torch.equal(layer(x, cos, sin, None, 0, 0, None), ref)  # the packed copies are the weights again


def test_host_registration_failure_is_recorded(monkeypatch):
    """What the GPU tests and the benchmark print when page-locking fails: the call, the library, the
    CUDA error's name and text; the chunk falls back (pinned by PyTorch, else pageable) and says why.
    Played here with a stand-in CUDA runtime whose cudaHostRegister fails."""
    from bitdance_core.runtime import host_memory as hm

    class FakeCudart:
        calls = []

        def cudaHostRegister(self, ptr, n, flags):
            self.calls.append((ptr.value, n.value, flags.value))
            return 2

        def cudaGetLastError(self):
            self.calls.append("cleared")
            return 2

        def cudaGetErrorName(self, rc):
            return b"cudaErrorMemoryAllocation"

        def cudaGetErrorString(self, rc):
            return b"out of memory"

    lib = FakeCudart()
    monkeypatch.setattr(hm, "_state", {"looked": True, "lib": lib, "library": "/x/libcudart.so.13", "method": "ctypes",
                                       "failure": None, "registered": 0})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    host = hm.HostCopies(pin=True, chunk_bytes=8192)
    src = [torch.arange(1000, dtype=torch.float32), torch.ones(3000, dtype=torch.float32)]
    got = {}
    host.pack(lambda i: src[i], got.__setitem__, 2, [t.numel() * 4 for t in src])
    assert torch.equal(got[0], src[0]) and torch.equal(got[1], src[1])
    assert lib.calls[0][2] == 1 and lib.calls[0][1] % hm.PAGE == 0 and lib.calls[1] == "cleared"
    assert len([c for c in lib.calls if c != "cleared"]) == 1  # one failure: never tried again
    want = ("cudaHostRegister of 0.0 MiB (ctypes, /x/libcudart.so.13) returned 2 (cudaErrorMemoryAllocation: out of memory) "
            "after 0 successful registrations")
    assert hm.registration_status()["failure"] == want
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rep = host.report()
    assert rep["chunks"] == 2 and rep["failures"][0] == want
    # the CPU-only PyTorch here cannot pin either: pageable, with both reasons
    assert rep["how"] == {"pageable": 2} and len(rep["failures"]) == 2 and rep["failures"][1].startswith("pin_memory failed")


@pytest.mark.parametrize("mode", ["stage", "stream"])
@pytest.mark.parametrize("pin", [True, False])
def test_host_tensors_are_every_offloaded_weight_once(reference, mode, pin):
    """Offload.host_tensors: the CPU master copies ComfyUI's RAM caches size a loaded model by. Each
    offloaded weight appears once, on the CPU, and their bytes are the homes' own count."""
    pipe = build_random_t2i(SHAPE, seed=3)
    off = apply_offload(pipe, mode, "cpu", resident_layers=1, pin=pin)
    host = off.host_tensors()
    assert host and all(t.device.type == "cpu" for t in host)
    assert len({(t.data_ptr(), t.numel()) for t in host}) == len(host)
    assert sum(t.numel() * t.element_size() for t in host) == sum(h.nbytes for h in off.homes())
    off.remove()
