"""The one place the nodes reach into bitdance_core (shipped inside this pack).

Everything the nodes use from the engine is named here, so an engine change shows up in one file.
"""
from __future__ import annotations

from .. import bitdance_core as bd  # noqa: F401  (the public API)
from ..bitdance_core import find_autoencoder_files  # noqa: F401  (tokenizer file layout)
from ..bitdance_core import demo_models as _demo
from ..bitdance_core import fitting as _fitting
from ..bitdance_core import graphs as _graphs
from ..bitdance_core import imagenet_info as _imagenet_info
from ..bitdance_core.imagenet_classes import class_label, parse_class_label  # noqa: F401  (how classes are listed)
from ..bitdance_core.t2i import ModelFiles

# The demo models shipped inside the engine (bitdance_core/demo_models): the folder, the
# text-to-image model folder and the class-conditional checkpoint (they may not be there yet)
DEMO_DIR = _demo.HERE
DEMO_T2I = _demo.T2I
DEMO_IMAGENET = _demo.IMAGENET

# The model loader's memory options (see bitdance_core/fitting.py: plan_for)
WEIGHTS_CHOICES = list(_fitting.WEIGHTS_CHOICES)
OFFLOAD_CHOICES = list(_fitting.OFFLOAD_CHOICES)


def find_t2i_files(path: str):
    """Raises BitDanceError unless `path` is a text-to-image model folder (official or diffusers)."""
    return ModelFiles.find(path)


def describe_t2i(path: str) -> dict:
    """What a text-to-image model makes, from its config files and tokenizer (no weights): the sizes
    to offer ([height, width], the official ones where it makes them all), its block, its largest
    side, and the size the loader plans memory for."""
    info = bd.describe_t2i(path)
    rule = info.size_rule
    return {"parallel_num": info.parallel_num, "downsample": info.downsample, "latent_channels": info.latent_channels,
            "layout": info.layout, "block_pixels": rule.block_pixels, "max_side": rule.max_side,
            "sizes": [list(s) for s in rule.sizes], "official_sizes": rule.has_official_sizes,
            "reference_size": list(rule.reference_size), "summary": rule.summary()}


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names, in index order, as the engine ships them."""
    return bd.imagenet_class_names()


def imagenet_classes(checkpoint: str) -> list[str]:
    """A class-conditional checkpoint's classes as the sampler lists them ('207: golden retriever';
    '7' for the digits demo), from its tensor shapes (no model built)."""
    return _imagenet_info.describe_imagenet(checkpoint).class_labels


def plan_t2i(path: str, free_bytes: int, device, dtype, weights: str, offload: str, height: int, width: int):
    """The engine's decision (weights, offload mode, why) for a text-to-image model folder and one
    image of height x width, from its config files and the free device memory; raises BitDanceError
    when nothing asked for fits."""
    return _fitting.plan_for(path, free_bytes, device=device, dtype=dtype, weights=weights, offload=offload,
                             height=height, width=width)


def load_t2i_planned(path: str, decision, device, dtype, attention: str):
    """(pipeline, Offload or None), loaded as the decision says."""
    return _fitting.load_planned(path, decision, device, dtype=dtype, attention=attention)


def check_generation(pipe, decision, height: int, width: int, num_images: int, cfg: float, free_bytes, prompt):
    """Whether one generation fits the model as loaded (its predicted peak, the largest batch that
    fits, and what to change when it does not)."""
    return _fitting.check_generation(pipe, decision, height, width, num_images, cfg, free_bytes, prompt=prompt)


def enable_cuda_graphs(pipe) -> bool:
    """CUDA graphs for a loaded text-to-image pipeline; False (nothing changed) without CUDA."""
    acc = _graphs.enable_graphs(pipe)
    return acc.backbone is not None or acc.head_net is not None

