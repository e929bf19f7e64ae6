"""The one place the nodes reach into bitdance_core (shipped inside this pack).

Everything the nodes use from the engine is named here, so an engine change shows up in one file.
"""
from __future__ import annotations

from .. import bitdance_core as bd  # noqa: F401  (the public API: load_t2i, load_tokenizer, load_imagenet, to_uint8)
from ..bitdance_core.autoencoder import find_autoencoder_files  # noqa: F401  (tokenizer file layout)
from ..bitdance_core.t2i import OFFICIAL_SIZES, ModelFiles  # noqa: F401


def find_t2i_files(path: str):
    """Raises BitDanceError unless `path` is a text-to-image model folder (official or diffusers).

    ModelFiles.find accepts any folder with a config.json; the head and tokenizer configs must be
    there too for it to be a BitDance text-to-image model (the weights are checked when loading,
    so a folder with a missing weights file is still listed and its load error names the file)."""
    import os

    files = ModelFiles.find(path)
    for cfg in (files.head_config, files.ae_config):
        if not os.path.isfile(cfg):
            raise bd.BitDanceError(f"{path}: not a BitDance text-to-image model folder ({cfg} is missing)")
    return files


def describe_t2i(path: str) -> dict:
    """What the web extension needs to offer sizes, read from the model's config files only."""
    from ..bitdance_core.autoencoder import AutoencoderConfig
    from ..bitdance_core.checkpoints import read_json
    from ..bitdance_core.head import HeadConfig

    files = ModelFiles.find(path)
    head = HeadConfig.from_json(read_json(files.head_config), files.head_config)
    ae = AutoencoderConfig.from_json(read_json(files.ae_config), files.ae_config)
    return {"parallel_num": head.parallel_num, "downsample": ae.downsample, "latent_channels": ae.z_channels,
            "layout": files.layout, "official_sizes": [list(s) for s in OFFICIAL_SIZES]}



def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names, in index order, as the engine ships them."""
    from ..bitdance_core.imagenet_classes import imagenet_class_names as names

    return names()
