"""Text-to-image model folders: which files make one (official or diffusers layout), what it makes
(from its config files alone), and loading it into a T2IPipeline with its weights as stored or with
the big linears in fp8.

Each config file is read once per load: `read_t2i_configs` reads the three of them, and a caller that
has them already (the memory planner's decision) passes them on to `load_t2i`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import BitDanceError, require
from ..formats.checkpoints import check_keys, materialize, open_safetensors, open_sharded, read_json
from ..formats.fp8 import as_fp8_source, materialize_fp8
from ..models.ae_layers import AutoencoderConfig
from ..models.autoencoder import build_autoencoder
from ..models.head import DiffusionHead, HeadConfig
from ..models.projector import Projector
from ..models.qwen3 import Qwen3Backbone, Qwen3Config
from .prompts import load_prompt_codec
from .t2i import OFFICIAL_SIZES, T2IPipeline

WEIGHTS = ("as-is", "fp8")


@dataclass
class ModelFiles:
    """Where each part of a text-to-image model lives (official or diffusers layout)."""

    layout: str
    llm_config: str
    llm_folder: str
    tokenizer_folder: str
    ae_config: str
    ae_weights: str
    head_config: str
    head_weights: str
    projector_weights: str

    @classmethod
    def find(cls, path: str) -> "ModelFiles":
        if not os.path.isdir(path):
            raise BitDanceError(f"model folder not found: {path}")
        j = lambda *p: os.path.join(path, *p)
        if os.path.isfile(j("text_encoder", "config.json")):
            d = "diffusion_pytorch_model.safetensors"
            found = cls("diffusers", j("text_encoder", "config.json"), j("text_encoder"), j("tokenizer"),
                        j("autoencoder", "config.json"), j("autoencoder", d), j("diffusion_head", "config.json"),
                        j("diffusion_head", d), j("projector", d))
        elif os.path.isfile(j("config.json")):
            found = cls("official", j("config.json"), path, path, j("ae_config.json"), j("ae.safetensors"),
                        j("vision_head_config.json"), j("vision_head.safetensors"), j("projector.safetensors"))
        else:
            found = None
        if found is not None:
            # The configs decide what the folder is; missing weights are named when loading.
            for cfg in (found.head_config, found.ae_config):
                if not os.path.isfile(cfg):
                    raise BitDanceError(f"{path}: not a BitDance text-to-image model folder: {cfg} is missing")
            return found
        raise BitDanceError(f"{path}: not a BitDance model folder: expected config.json (official layout) "
                            "or text_encoder/config.json (diffusers layout)")


@dataclass(frozen=True)
class T2IConfigs:
    """A text-to-image model folder's files and its three configs, each file read once."""

    path: str  # the model folder
    files: ModelFiles
    llm: Qwen3Config
    head: HeadConfig
    ae: AutoencoderConfig

    @property
    def parts(self) -> tuple[Qwen3Config, HeadConfig, AutoencoderConfig]:
        return self.llm, self.head, self.ae


def read_t2i_configs(path: str) -> T2IConfigs:
    files = ModelFiles.find(path)
    llm = Qwen3Config.from_json(read_json(files.llm_config), files.llm_config)
    head = HeadConfig.from_json(read_json(files.head_config), files.head_config)
    ae = AutoencoderConfig.from_json(read_json(files.ae_config), files.ae_config)
    require(head.ch_cond == llm.hidden_size,
            f"{files.head_config}: ch_cond {head.ch_cond} must equal the backbone hidden_size {llm.hidden_size}")
    require(head.ch_target == ae.z_channels,
            f"{files.head_config}: ch_target {head.ch_target} must equal the tokenizer's z_channels {ae.z_channels}")
    return T2IConfigs(path, files, llm, head, ae)


@dataclass
class T2IInfo:
    """What a model folder makes, read from its config files only (no weights)."""

    layout: str
    parallel_num: int
    downsample: int
    latent_channels: int
    hidden_size: int

    @property
    def block_pixels(self) -> int:
        return int(round(math.sqrt(self.parallel_num))) * self.downsample

    @property
    def supported_sizes(self) -> list[tuple[int, int]]:
        bp = self.block_pixels
        return [s for s in OFFICIAL_SIZES if s[0] % bp == 0 and s[1] % bp == 0]

    def ar_steps(self, height: int, width: int) -> int:
        return (height // self.downsample) * (width // self.downsample) // self.parallel_num


def describe_t2i(path: str) -> T2IInfo:
    files = ModelFiles.find(path)
    head = HeadConfig.from_json(read_json(files.head_config), files.head_config)
    ae = AutoencoderConfig.from_json(read_json(files.ae_config), files.ae_config)
    return T2IInfo(files.layout, head.parallel_num, ae.downsample, ae.z_channels, head.ch_cond)


def build_t2i_modules(llm: Qwen3Config, head: HeadConfig, ae: AutoencoderConfig):
    """All four modules on the meta device (no memory): for strict loading and key checks."""
    with torch.device("meta"):
        return Qwen3Backbone(llm), DiffusionHead(head), Projector(ae.z_channels, llm.hidden_size), build_autoencoder(ae)


def load_t2i(path: str, device="cpu", dtype=torch.float32, attention: str = "sdpa", weights: str = "as-is",
             configs: T2IConfigs | None = None, matmul: str = "auto",
             include: Callable[[str, nn.Linear], bool] | None = None) -> T2IPipeline:
    """weights: "as-is" (read in `dtype`) or "fp8" (the backbone's and the head's big linears stored as
    float8 e4m3, quantised on load unless the file has them in fp8 already; formats/fp8.py).
    configs: the folder's configs when the caller has read them (see read_t2i_configs).
    matmul, include: the fp8 linears' matmul mode and selection (formats/fp8.py)."""
    require(attention in ("sdpa", "flash"), f"attention '{attention}' unknown; use 'sdpa' or 'flash'")
    require(weights in WEIGHTS, f"weights '{weights}' unknown; use one of {list(WEIGHTS)}")
    cfg = configs if configs is not None else read_t2i_configs(path)
    files = cfg.files
    codec = load_prompt_codec(files.tokenizer_folder)
    backbone, head, projector, ae = build_t2i_modules(*cfg.parts)
    fp8 = weights == "fp8"
    # (module, weights, name, keys not ours, quantised)
    sources = [(backbone, open_sharded(files.llm_folder), "Qwen3 backbone", Qwen3Backbone.IGNORED_KEYS, fp8),
               (head, open_safetensors([files.head_weights]), "diffusion head", (), fp8),
               (projector, open_safetensors([files.projector_weights]), "projector", (), False),
               (ae, open_safetensors([files.ae_weights]), "autoencoder", (), False)]
    if fp8:  # files may hold fp8 tensors with scale siblings: seen through the fp8 conventions
        sources = [(m, as_fp8_source(src), what, ign, q) for m, src, what, ign, q in sources]
    # Check every file before reading any weights: a bad shard should fail in a second, not after 30 GB.
    for module, src, what, ignore, _ in sources:
        check_keys(module, src, what, ignore)
    for module, src, what, ignore, quantised in sources:
        if quantised:
            materialize_fp8(module, src, what, device, dtype, ignore, include, matmul)
        else:
            materialize(module, src, what, device, dtype, ignore)
    backbone.set_attention(attention)
    head.set_attention(attention)
    name = os.path.basename(os.path.normpath(path)) + (" (fp8)" if fp8 else "")
    return T2IPipeline(backbone, head, projector, ae, codec, device, name=name)
