"""BitDance engine: text-to-image, ImageNet class-conditional models and binary tokenizers.

Self-contained (torch, safetensors, tokenizers); never imports ComfyUI. This module is the public API;
the memory and speed options are `bitdance_core.runtime`. The layers (ARCHITECTURE.md): errors and
formats at the bottom, models above them, pipelines above models, runtime wrapping pipelines, and the
command line (cli) and training (train) on top.
"""
from .errors import BitDanceError, OutOfDeviceMemory
from .models.autoencoder import BinaryAutoencoder
from .models.uniwetok import UniWeTok
from .pipelines.continuation import BlockGrid, extend_canvas, keep_from_noise_mask, keep_rows
from .pipelines.imagenet import ImageNetPipeline, load_imagenet
from .pipelines.imagenet_info import ImageNetInfo, describe_imagenet
from .pipelines.imagenet_classes import class_index, class_label, imagenet_class_names, parse_class_label, parse_classes
from .pipelines.comfy_split import SplitConfigs, describe_split, load_split, read_split_configs, split_file_kind
from .pipelines.images import from_unit_hwc, to_uint8, to_uint8_rounded, to_unit_hwc
from .pipelines.prompts import PromptTokens
from .pipelines.t2i import OFFICIAL_SIZES, T2IPipeline
from .pipelines.t2i_loading import ModelFiles, T2IConfigs, T2IInfo, describe_t2i, load_t2i, read_t2i_configs
from .pipelines.tokenizers import find_autoencoder_files, find_tokenizer_files, load_tokenizer
from .pipelines.uniwetok_loading import CHECKPOINT_EXTS as UNIWETOK_EXTS
from .pipelines.uniwetok_loading import find_uniwetok_files, is_uniwetok_checkpoint

find_t2i_files = ModelFiles.find  # raises BitDanceError unless the path is a text-to-image model folder

__all__ = ["BinaryAutoencoder", "BitDanceError", "BlockGrid", "ImageNetInfo", "ImageNetPipeline", "ModelFiles",
           "OFFICIAL_SIZES", "OutOfDeviceMemory", "PromptTokens", "SplitConfigs", "T2IConfigs", "T2IInfo", "T2IPipeline",
           "UNIWETOK_EXTS", "UniWeTok", "class_index", "class_label", "describe_imagenet", "describe_split",
           "describe_t2i", "extend_canvas", "find_autoencoder_files", "find_t2i_files", "find_tokenizer_files",
           "find_uniwetok_files", "from_unit_hwc", "imagenet_class_names", "is_uniwetok_checkpoint", "keep_from_noise_mask",
           "keep_rows", "load_imagenet", "load_split", "load_t2i", "load_tokenizer", "parse_class_label", "parse_classes",
           "read_split_configs", "read_t2i_configs", "split_file_kind", "to_uint8", "to_uint8_rounded", "to_unit_hwc"]
