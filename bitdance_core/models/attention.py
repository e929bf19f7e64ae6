"""Attention kernels: the optional flash-attn package (never required: SDPA is the default), and
PyTorch's SDPA restricted to one of its backends (the backbone step's attention lever, issue 11)."""
import torch.nn.functional as F

from ..errors import BitDanceError, require

# "auto": PyTorch picks per call; the others restrict SDPA to that backend (torch.nn.attention.sdpa_kernel)
SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")


def flash_attention(attention: str):
    """flash_attn_func when `attention` is 'flash' (the optional flash-attn package), else None."""
    if attention != "flash":
        return None
    try:
        from flash_attn import flash_attn_func
    except ImportError as e:
        raise BitDanceError("attention 'flash' asked for, but the flash-attn package is not installed; use 'sdpa'") from e
    return flash_attn_func


def sdpa_backends(name: str):
    """The SDPBackend list for a backend name: None for 'auto' (PyTorch's own choice per call)."""
    require(name in SDPA_BACKENDS, f"SDPA backend '{name}' unknown; choose one of {list(SDPA_BACKENDS)}")
    if name == "auto":
        return None
    from torch.nn.attention import SDPBackend  # imported here: the module is only needed when a backend is forced

    return [{"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]]


def sdpa(q, k, v, backends=None, **kw):
    """F.scaled_dot_product_attention, on `backends` only when given (`sdpa_backends`). A backend
    that cannot take the inputs (flash with a mask, say) raises PyTorch's "No available kernel"."""
    if backends is None:
        return F.scaled_dot_product_attention(q, k, v, **kw)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q, k, v, **kw)
