"""CPU copies of weights for offloading, packed into page-aligned chunks and pinned in place.

Streaming and stage offload copy weights host -> device while the GPU computes; that copy is only
asynchronous from page-locked ("pinned") memory. `tensor.pin_memory()` goes through PyTorch's
caching host allocator, which rounds every allocation up to a power of two: per-tensor pinning of
BitDance-14B's layers (178 MB MLP matrices -> 256 MB) would lock about 1.4x the weights in host
memory, on machines where host memory is what offloading leans on.

So the copies are packed into chunks of up to `CHUNK_BYTES` (each tensor at a 256-byte offset).
Each chunk is an anonymous memory map (page-aligned, pages of its own) seen as a uint8 tensor, and
is page-locked where it lies with `cudaHostRegister` (what ComfyUI does for its own weights). The
chunk tensor's storage starts where the registration starts: `Tensor.is_pinned()` asks CUDA about
the storage's first byte, so a registered range that began inside a larger allocation (an earlier
version sliced a page-aligned chunk out of a malloc'ed buffer) read as pageable although it was locked.

The registration goes through the CUDA runtime library this process loaded (ctypes, found in
/proc/self/maps), so that a failure is cleared with cudaGetLastError before PyTorch's next error
check sees it; where that library cannot be found (not Linux), through PyTorch's own binding
`torch.cuda.cudart().cudaHostRegister` (a failure's error is then consumed by a tiny kernel launch).
Where registering fails, the chunk is allocated pinned by PyTorch instead (rounded, but per chunk),
and where that fails too it stays pageable (copies still work, synchronously). Every failure's
reason is kept (`registration_status()`, `HostCopies.report()`) for the benchmark and the GPU tests.
Tensors move into the chunks one at a time, so the extra host memory while packing is one chunk.
`release()` unregisters the chunks (also done when the object is collected).
"""
from __future__ import annotations

import bisect
import ctypes
import mmap
import weakref

import torch

CHUNK_BYTES = 256 << 20
PAGE = mmap.PAGESIZE
ALIGN = 256
REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: locked for every CUDA context
# How registration went in this process: the method used, the library, the first failure (then no more tries).
_state = {"looked": False, "lib": None, "library": None, "method": None, "failure": None, "registered": 0}


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _loaded_cudart():
    """(ctypes library, path) of the CUDA runtime this process (torch) loaded, or (None, why)."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "libcudart" in line and "/" in line})
    except OSError as e:
        return None, f"no /proc/self/maps ({e.strerror})"
    if not paths:
        return None, "no libcudart mapped in this process (a CUDA runtime linked statically into torch?)"
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
            for fn in ("cudaHostRegister", "cudaHostUnregister", "cudaGetLastError"):
                getattr(lib, fn).restype = ctypes.c_int
            for fn in ("cudaGetErrorName", "cudaGetErrorString"):
                getattr(lib, fn).restype = ctypes.c_char_p
            return lib, path
        except (OSError, AttributeError) as e:
            last = f"{path}: {e}"
    return None, last


def _method() -> str | None:
    """"ctypes" (the loaded libcudart), "torch" (torch.cuda.cudart()) or None; decided once."""
    if not _state["looked"]:
        _state["looked"] = True
        torch.cuda.init()  # the runtime (and its library) loaded, the context made
        lib, where = _loaded_cudart()
        if lib is not None:
            _state.update(lib=lib, library=where, method="ctypes")
        else:
            try:
                cudart = torch.cuda.cudart()
                if hasattr(cudart, "cudaHostRegister"):
                    _state.update(method="torch", library=f"torch.cuda.cudart() (ctypes: {where})")
            except Exception as e:
                _state["failure"] = f"no way to call cudaHostRegister: {where}; torch.cuda.cudart(): {e}"
            if _state["method"] is None and _state["failure"] is None:
                _state["failure"] = f"no way to call cudaHostRegister: {where}; torch.cuda.cudart() lacks it"
    return _state["method"]


def _error_text(rc: int) -> str:
    try:
        if _state["method"] == "ctypes":
            lib = _state["lib"]
            return f"{lib.cudaGetErrorName(rc).decode()}: {lib.cudaGetErrorString(rc).decode()}"
        return str(torch.cuda.cudart().cudaGetErrorString(rc))
    except Exception:
        return "unknown error"


def _consume_error_through_torch() -> None:
    """A failed runtime call leaves its error for the next cudaGetLastError, which PyTorch's kernel
    launch check calls: let a tiny launch raise it here, where it is expected."""
    try:
        torch.zeros(1, device="cuda").add_(1)
        torch.cuda.synchronize()
    except RuntimeError:
        pass


def _register(buf: torch.Tensor) -> bool:
    """Page-lock buf's memory in place. After one failure, never again (its reason is kept)."""
    if _state["failure"] is not None or not torch.cuda.is_available():
        return False
    method = _method()
    if method is None:
        return False
    ptr, n = buf.data_ptr(), buf.numel() * buf.element_size()
    if method == "ctypes":
        lib = _state["lib"]
        rc = lib.cudaHostRegister(ctypes.c_void_p(ptr), ctypes.c_size_t(n), ctypes.c_uint(REGISTER_PORTABLE))
        if rc != 0:
            lib.cudaGetLastError()  # clear it: it is handled here (the fallback pins another way)
    else:
        rc = int(torch.cuda.cudart().cudaHostRegister(ptr, n, REGISTER_PORTABLE))
        if rc != 0:
            _consume_error_through_torch()
    if rc != 0:
        _state["failure"] = (f"cudaHostRegister of {n / 2**20:.1f} MiB ({_state['method']}, {_state['library']}) returned "
                             f"{rc} ({_error_text(rc)}) after {_state['registered']} successful registrations")
        return False
    _state["registered"] += 1
    return True


def _unregister(ptrs: list[int]) -> None:
    for p in ptrs:
        if _state["method"] == "ctypes":
            lib = _state["lib"]
            if lib.cudaHostUnregister(ctypes.c_void_p(p)) != 0:
                lib.cudaGetLastError()
        elif _state["method"] == "torch":
            try:
                if int(torch.cuda.cudart().cudaHostUnregister(p)) != 0:
                    _consume_error_through_torch()
            except Exception:
                pass
    ptrs.clear()


def registration_status() -> dict:
    """How page-locking went in this process: {"method", "library", "registered", "failure"}."""
    return {k: _state[k] for k in ("method", "library", "registered", "failure")}


def file_mapped_ranges() -> list[tuple[int, int]]:
    """The address ranges [start, end) this process has mapped from files on disk, sorted (Linux:
    /proc/self/maps; elsewhere none are known). A tensor read from a .safetensors file in its own
    dtype lies in one: its pages are the file's cache, which the system reclaims by itself, not
    memory the process holds (tmpfs under /dev, e.g. /dev/shm, is memory, and is not listed)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(None, 5)
        if len(fields) == 6 and fields[5].startswith("/") and not fields[5].startswith("/dev/"):
            start, end = fields[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return sorted(ranges)


def in_ranges(address: int, ranges: list[tuple[int, int]]) -> bool:
    """Whether `address` lies in one of the sorted, disjoint [start, end) `ranges`."""
    i = bisect.bisect_right(ranges, (address, float("inf"))) - 1
    return i >= 0 and ranges[i][0] <= address < ranges[i][1]


def held_host_storages(tensors) -> list[torch.Tensor]:
    """One flat uint8 view per distinct CPU storage among `tensors` (a packed chunk of host copies counts
    once, in full), leaving out storages mapped from files: the memory these tensors hold, as a RAM cache
    should count it (evicting a file's mapped pages frees nothing the system does not already count as
    available)."""
    from_files = file_mapped_ranges()
    seen, out = set(), []
    for t in tensors:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if t.device.type == "cpu" and ptr not in seen and not in_ranges(ptr, from_files):
            seen.add(ptr)
            out.append(torch.empty(0, dtype=torch.uint8).set_(storage))
    return out


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


def _mapped(nbytes: int) -> torch.Tensor:
    """A uint8 tensor over fresh anonymous pages: page-aligned, its storage starting at its first byte
    (the tensor keeps the map alive)."""
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)


class HostCopies:
    """Packs tensors into pinned (or, with pin=False, plain) page-aligned CPU chunks."""

    def __init__(self, pin: bool, chunk_bytes: int = CHUNK_BYTES):
        self.pin, self.chunk_bytes = pin, chunk_bytes
        self.chunks: list[torch.Tensor] = []
        self.how: list[str] = []  # per chunk: "registered", "pinned" or "pageable"
        self.failures: list[str] = []  # why a chunk is not "registered" (first of each kind)
        self._registered: list[int] = []
        self._finalizer = weakref.finalize(self, _unregister, self._registered)

    def _note(self, why: str) -> None:
        if why not in self.failures:
            self.failures.append(why)

    def _new_chunk(self, nbytes: int) -> torch.Tensor:
        total = _round_up(max(nbytes, 1), PAGE)
        buf = _mapped(total)
        if self.pin:
            if _register(buf):
                self._registered.append(buf.data_ptr())
                self.how.append("registered")
                return buf
            self._note(_state["failure"] or "cudaHostRegister not available (no CUDA)")
            try:
                pinned = torch.empty(total, dtype=torch.uint8, pin_memory=True)
                self.how.append("pinned")
                return pinned
            except RuntimeError as e:
                self._note(f"pin_memory failed: {str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}")
        self.how.append("pageable")
        return buf

    def pack(self, get, put, count: int, sizes: list[int]) -> None:
        """For i in range(count): copy get(i) (a tensor, on any device) into a chunk and put(i, copy).
        get/put are called in order, one tensor at a time, so the caller can drop each original at once."""
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

    def report(self) -> dict:
        """{"chunks", "bytes", "how": {kind: count}, "failures": [...], "is_pinned": [...]} (is_pinned:
        what PyTorch says of each kind's first chunk, where CUDA is available)."""
        how = {}
        for h in self.how:
            how[h] = how.get(h, 0) + 1
        out = {"chunks": len(self.chunks), "bytes": self.nbytes, "how": how, "failures": list(self.failures)}
        if torch.cuda.is_available() and self.chunks:
            try:
                out["is_pinned"] = {h: self.chunks[self.how.index(h)].is_pinned() for h in how}
            except RuntimeError as e:
                out["is_pinned"] = f"is_pinned() failed: {e}"
        return out

    def release(self) -> None:
        """Unregister the chunks (the tensors stay valid, pageable)."""
        _unregister(self._registered)
