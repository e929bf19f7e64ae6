"""BitDance engine: text-to-image, ImageNet class-conditional models and binary tokenizers.

Self-contained (torch, safetensors, tokenizers); never imports ComfyUI.
"""
from .autoencoder import BinaryAutoencoder, find_autoencoder_files
from .errors import BitDanceError, OutOfDeviceMemory
from .imagenet_classes import class_index, imagenet_class_names, parse_classes
from .prompts import PromptTokens
from .images import from_unit_hwc, to_uint8, to_unit_hwc
from .t2i import OFFICIAL_SIZES, T2IInfo, T2IPipeline, describe_t2i, load_t2i
from .tokenizers import find_tokenizer_files, load_tokenizer
from .uniwetok import UniWeTok
from .uniwetok_loading import find_uniwetok_files


def load_imagenet(*args, **kwargs):
    from .imagenet import load_imagenet as _load

    return _load(*args, **kwargs)


__all__ = ["BinaryAutoencoder", "BitDanceError", "class_index", "describe_t2i", "find_autoencoder_files",
           "find_tokenizer_files", "find_uniwetok_files", "from_unit_hwc", "imagenet_class_names", "load_imagenet",
           "load_t2i", "load_tokenizer", "OFFICIAL_SIZES", "OutOfDeviceMemory", "parse_classes", "PromptTokens",
           "T2IInfo", "T2IPipeline", "to_uint8", "to_unit_hwc", "UniWeTok"]
