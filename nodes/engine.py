"""The one place the nodes reach into bitdance_core (shipped inside this pack).

Everything the nodes use from the engine is named here, so an engine change shows up in one file.
"""
from __future__ import annotations

from .. import bitdance_core as bd  # noqa: F401  (the public API)
from ..bitdance_core import demo_models as _demo
from ..bitdance_core import runtime as _runtime  # the memory and speed options
from ..bitdance_core import UNIWETOK_EXTS, find_autoencoder_files, is_uniwetok_checkpoint  # noqa: F401  (tokenizer files)
from ..bitdance_core import class_label, parse_class_label  # noqa: F401  (how classes are listed)

# The demo models shipped inside the engine (bitdance_core/demo_models): the folder, the
# text-to-image model folder and the class-conditional checkpoint (they may not be there yet)
DEMO_DIR = _demo.HERE
DEMO_T2I = _demo.T2I
DEMO_IMAGENET = _demo.IMAGENET

# The model loader's memory options (see bitdance_core/runtime/fitting.py: plan_for)
WEIGHTS_CHOICES = list(_runtime.WEIGHTS_CHOICES)
OFFLOAD_CHOICES = list(_runtime.OFFLOAD_CHOICES)


def find_t2i_files(path: str):
    """Raises BitDanceError unless `path` is a text-to-image model folder (official or diffusers)."""
    return bd.find_t2i_files(path)


def _describe(info) -> dict:
    """What the web extension and the loaders need of a model: the sizes to offer ([height, width], the
    official ones where it makes them all), its block, its largest side, and the size the loader plans
    memory for."""
    rule = info.size_rule
    return {"parallel_num": info.parallel_num, "downsample": info.downsample, "latent_channels": info.latent_channels,
            "layout": info.layout, "block_pixels": rule.block_pixels, "max_side": rule.max_side,
            "sizes": [list(s) for s in rule.sizes], "official_sizes": rule.has_official_sizes,
            "reference_size": list(rule.reference_size), "summary": rule.summary()}


def describe_t2i(path: str) -> dict:
    """_describe of a text-to-image model folder, from its config files and tokenizer (no weights)."""
    return _describe(bd.describe_t2i(path))


def describe_split(main_model: str, text_encoder: str, vae: str, qwen_vocab: str, parallel_num: int | None) -> dict:
    """_describe of the split files (their headers; the tokenizer is built to check it)."""
    return _describe(bd.describe_split(read_split(main_model, text_encoder, vae, qwen_vocab, parallel_num)))


def read_t2i(path: str):
    """A model folder's configs, each file read once; the loader describes, plans and loads with them."""
    return bd.read_t2i_configs(path)


def describe_loaded(source) -> dict:
    """_describe of what a loader has read: a model folder's configs (read_t2i) or the split files' (read_split)."""
    if isinstance(source, bd.SplitConfigs):
        return _describe(bd.describe_split(source))
    return _describe(bd.describe_t2i(source))


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names, in index order, as the engine ships them."""
    return bd.imagenet_class_names()


def read_split(main_model: str, text_encoder: str, vae: str, qwen_vocab: str, parallel_num: int | None):
    """The ComfyUI split files' configs, tokenizer and parallel_num (headers only, no weights);
    qwen_vocab: ComfyUI's Qwen vocabulary folder (the tokenizer unless one sits beside the text
    encoder); parallel_num None: from the weights."""
    return bd.read_split_configs(main_model, text_encoder, vae, qwen_vocab=qwen_vocab, parallel_num=parallel_num)


def imagenet_classes(checkpoint: str) -> list[str]:
    """A class-conditional checkpoint's classes as the sampler lists them ('207: golden retriever';
    '7' for the digits demo), from its tensor shapes (no model built)."""
    return bd.describe_imagenet(checkpoint).class_labels


def plan_t2i(source, free_bytes: int, device, dtype, weights: str, offload: str, height: int, width: int):
    """The engine's decision (weights, offload mode, why) for a text-to-image model folder or the
    split files (read_split) and one image of height x width, from its configs and the free device
    memory; raises BitDanceError when nothing asked for fits."""
    return _runtime.plan_for(source, free_bytes, device=device, dtype=dtype, weights=weights, offload=offload,
                             height=height, width=width)


def load_t2i_planned(source, decision, device, dtype, attention: str, pin: bool | None = None):
    """(pipeline, Offload or None), loaded as the decision says (a model folder or read_split's configs);
    pin: page-lock an offloaded model's host copies (None: the engine's default, on CUDA)."""
    return _runtime.load_planned(source, decision, device, dtype=dtype, attention=attention, pin=pin)


def check_generation(pipe, decision, height: int, width: int, num_images: int, cfg: float, free_bytes, prompt):
    """Whether one generation fits the model as loaded (its predicted peak, the largest batch that
    fits, and what to change when it does not)."""
    return _runtime.check_generation(pipe, decision, height, width, num_images, cfg, free_bytes, prompt=prompt)


def host_memory_views(tensors) -> list:
    """What ComfyUI's RAM caches should count of these tensors: one byte view per CPU storage held in
    memory (not mapped from a file)."""
    return _runtime.held_host_storages(tensors)


def images_per_decode(ae, height: int, width: int, free_bytes: int) -> int:
    """How many images of this size one decode may take in `free_bytes` of device memory (at least 1)."""
    return _runtime.images_per_decode(ae.config, height, width, ae._param_dtype(), free_bytes)


def enable_cuda_graphs(pipe) -> bool:
    """CUDA graphs for a loaded text-to-image pipeline; False (nothing changed) without CUDA."""
    acc = _runtime.enable_graphs(pipe)
    return acc.backbone is not None or acc.head_net is not None

