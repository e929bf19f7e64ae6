"""The one exception type users see.

Every message names the file, key, size or value that is wrong and says what would be right,
so a ComfyUI user can fix the input without reading a traceback.
"""


class BitDanceError(ValueError):
    """A user-facing error: bad file, bad key, bad size, bad argument."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise BitDanceError(message)


REQUIRED = object()
_KIND_WORDS = {int: "an integer", float: "a number", bool: "true or false"}


def config_value(cfg: dict, key: str, kind: type, origin: str, default=REQUIRED):
    """`cfg[key]` of a JSON config as `kind` (int, float or bool); `default` where the key is absent or
    null (required when no default is given). A value of another type is refused naming the file,
    the key and the value, instead of a TypeError from deep inside the model."""
    value = cfg.get(key)
    if value is None:
        if default is REQUIRED:
            raise BitDanceError(f"{origin}: missing required key '{key}'" if key not in cfg
                                else f"{origin}: {key} is null; expected {_KIND_WORDS[kind]}")
        return default
    if kind is bool:
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or float(value).is_integer())
    if not ok:
        raise BitDanceError(f"{origin}: {key} is {value!r}; expected {_KIND_WORDS[kind]}")
    return kind(value)


try:
    from torch import OutOfMemoryError as _TorchOOM
except ImportError:  # older torch: only the CUDA one
    from torch.cuda import OutOfMemoryError as _TorchOOM


class OutOfDeviceMemory(BitDanceError, _TorchOOM):
    """Ran out of GPU memory; the message says what fits. Still a torch OutOfMemoryError, so callers
    that clean up after one (ComfyUI unloads its models) keep doing so."""

