"""CPU copies of weights for offloading, packed into page-aligned chunks and pinned in place.

Streaming and stage offload copy weights host -> device while the GPU computes; that copy is only
asynchronous from page-locked ("pinned") memory. `tensor.pin_memory()` goes through PyTorch's
caching host allocator, which rounds every allocation up to a power of two: per-tensor pinning of
BitDance-14B's layers (178 MB MLP matrices -> 256 MB) would lock about 1.4x the weights in host
memory, on machines where host memory is what offloading leans on.

So the copies are packed into chunks of up to `CHUNK_BYTES` (each tensor at a 256-byte offset,
each chunk starting on a page boundary inside an over-allocated buffer, so no other tensor shares
its pages) and each chunk is page-locked where it lies with `cudaHostRegister` (what ComfyUI does
for its own weights; called through ctypes on the runtime torch loaded, so that a failure can be
cleared before PyTorch's next error check sees it). Where that fails, the chunk is allocated pinned by PyTorch instead (rounded,
but per chunk), and where that fails too it stays pageable (copies still work, synchronously).
Tensors move into the chunks one at a time, so the extra host memory while packing is one chunk.
`release()` unregisters the chunks (also done when the object is collected).
"""
from __future__ import annotations

import ctypes
import mmap
import weakref

import torch

CHUNK_BYTES = 256 << 20
PAGE = mmap.PAGESIZE
ALIGN = 256
_state = {"lib": None, "looked": False, "failed": False}


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _cudart():
    """The CUDA runtime library this process (torch) loaded, through ctypes, or None. Calling it
    directly lets a failed registration be followed by cudaGetLastError: the runtime keeps the
    error of a failed call per thread, and PyTorch's next kernel-launch check would raise it."""
    if not _state["looked"]:
        _state["looked"] = True
        try:
            with open("/proc/self/maps") as f:
                paths = {line.split()[-1] for line in f if "libcudart" in line and "/" in line}
            for path in sorted(paths):
                lib = ctypes.CDLL(path)
                for fn in ("cudaHostRegister", "cudaHostUnregister", "cudaGetLastError"):
                    getattr(lib, fn).restype = ctypes.c_int
                _state["lib"] = lib
                break
        except (OSError, AttributeError):  # not Linux, or a runtime without these symbols
            _state["lib"] = None
    return _state["lib"]


def _register(buf: torch.Tensor) -> bool:
    """Page-lock buf's memory in place (cudaHostRegisterPortable). After one failure, never again."""
    if _state["failed"] or not torch.cuda.is_available():
        return False
    torch.cuda.init()  # the runtime (and its library) loaded, the context made
    lib = _cudart()
    if lib is None:
        return False
    rc = lib.cudaHostRegister(ctypes.c_void_p(buf.data_ptr()), ctypes.c_size_t(buf.numel()), ctypes.c_uint(1))
    if rc != 0:
        lib.cudaGetLastError()  # clear it: it is handled here (the fallback pins another way)
        _state["failed"] = True
        return False
    return True


def _unregister(ptrs: list[int]) -> None:
    lib = _state["lib"]
    for p in ptrs:
        if lib is not None and lib.cudaHostUnregister(ctypes.c_void_p(p)) != 0:
            lib.cudaGetLastError()
    ptrs.clear()


def plan_chunks(sizes: list[int], chunk_bytes: int = CHUNK_BYTES) -> list[list[int]]:
    """Indices of consecutive tensors per chunk: a chunk closes before it would pass chunk_bytes
    (a tensor larger than that gets a chunk of its own)."""
    chunks, cur, used = [], [], 0
    for i, n in enumerate(sizes):
        n = _round_up(n, ALIGN)
        if cur and used + n > chunk_bytes:
            chunks.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        chunks.append(cur)
    return chunks


class HostCopies:
    """Packs tensors into pinned (or, with pin=False, plain) page-aligned CPU chunks."""

    def __init__(self, pin: bool, chunk_bytes: int = CHUNK_BYTES):
        self.pin, self.chunk_bytes = pin, chunk_bytes
        self.chunks: list[torch.Tensor] = []
        self.how: list[str] = []  # per chunk: "registered", "pinned" or "pageable"
        self._registered: list[int] = []
        self._finalizer = weakref.finalize(self, _unregister, self._registered)

    def _new_chunk(self, nbytes: int) -> torch.Tensor:
        total = _round_up(max(nbytes, 1), PAGE)
        if self.pin:
            raw = torch.empty(total + PAGE, dtype=torch.uint8)
            start = (-raw.data_ptr()) % PAGE
            buf = raw[start:start + total]
            if _register(buf):
                self._registered.append(buf.data_ptr())
                self.how.append("registered")
                return buf
            try:
                buf = torch.empty(total, dtype=torch.uint8, pin_memory=True)
                self.how.append("pinned")
                return buf
            except RuntimeError:
                pass
        raw = torch.empty(total + PAGE, dtype=torch.uint8)
        start = (-raw.data_ptr()) % PAGE
        self.how.append("pageable")
        return raw[start:start + total]

    def pack(self, get, put, count: int, sizes: list[int]) -> None:
        """For i in range(count): copy get(i) (a tensor) into a chunk and put(i, copy). get/put are
        called in order, one tensor at a time, so the caller can drop each original at once."""
        for idx in plan_chunks(sizes, self.chunk_bytes):
            buf = self._new_chunk(sum(_round_up(sizes[i], ALIGN) for i in idx))
            self.chunks.append(buf)
            off = 0
            for i in idx:
                t = get(i).detach()
                n = t.numel() * t.element_size()
                view = buf[off:off + n].view(t.dtype).view(t.shape) if n else torch.empty(t.shape, dtype=t.dtype)
                view.copy_(t)
                put(i, view)
                off += _round_up(n, ALIGN)

    @property
    def nbytes(self) -> int:
        return sum(c.numel() for c in self.chunks)

    def release(self) -> None:
        """Unregister the chunks (the tensors stay valid, pageable)."""
        _unregister(self._registered)
