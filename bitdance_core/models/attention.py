"""The optional flash-attn kernels (never required: SDPA is the default)."""
from ..errors import BitDanceError


def flash_attention(attention: str):
    """flash_attn_func when `attention` is 'flash' (the optional flash-attn package), else None."""
    if attention != "flash":
        return None
    try:
        from flash_attn import flash_attn_func
    except ImportError as e:
        raise BitDanceError("attention 'flash' asked for, but the flash-attn package is not installed; use 'sdpa'") from e
    return flash_attn_func
