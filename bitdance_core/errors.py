"""The one exception type users see.

Every message names the file, key, size or value that is wrong and says what would be right,
so a ComfyUI user can fix the input without reading a traceback.
"""


class BitDanceError(ValueError):
    """A user-facing error: bad file, bad key, bad size, bad argument."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise BitDanceError(message)


try:
    from torch import OutOfMemoryError as _TorchOOM
except ImportError:  # older torch: only the CUDA one
    from torch.cuda import OutOfMemoryError as _TorchOOM


class OutOfDeviceMemory(BitDanceError, _TorchOOM):
    """Ran out of GPU memory; the message says what fits. Still a torch OutOfMemoryError, so callers
    that clean up after one (ComfyUI unloads its models) keep doing so."""

