"""Text-to-image model folders: which files make one (official or diffusers layout), what it makes
(from its config files alone), and loading it into a T2IPipeline with its weights as stored, with
the big linears in fp8, or with the backbone's linears in 4 bits (GGUF Q4_0; pipelines/t2i_q4.py).

Each config file is read once per load: `read_t2i_configs` reads the three of them, and a caller that
has them already (the memory planner's decision) passes them on to `load_t2i`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import BitDanceError, require
from ..formats.checkpoints import check_keys, materialize, open_safetensors, open_sharded, read_json
from ..formats.fp8 import as_fp8_source, materialize_fp8
from ..formats.q4 import materialize_q4
from ..models.ae_layers import AutoencoderConfig
from ..models.autoencoder import build_autoencoder
from ..models.head import DiffusionHead, HeadConfig
from ..models.projector import Projector
from ..models.qwen3 import Qwen3Backbone, Qwen3Config
from .prompts import load_prompt_codec
from .sizes import SizeRule, max_res_token
from .t2i import T2IPipeline
from .t2i_q4 import open_q4_backbone

WEIGHTS = ("as-is", "fp8", "4bit")


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
    """What a model folder makes, read from its config files and tokenizer only (no weights)."""

    layout: str
    parallel_num: int
    downsample: int
    latent_channels: int
    hidden_size: int
    size_rule: SizeRule
    name: str = ""

    @property
    def block_pixels(self) -> int:
        return self.size_rule.block_pixels

    @property
    def supported_sizes(self) -> list[tuple[int, int]]:
        return self.size_rule.sizes

    def check_size(self, height: int, width: int) -> None:
        """What the pipeline checks before sampling, without loading it."""
        self.size_rule.check(height, width, self.name or "this model")

    def ar_steps(self, height: int, width: int) -> int:
        return self.size_rule.ar_steps(height, width)


def describe_t2i(source: str | T2IConfigs) -> T2IInfo:
    """A model folder (its configs are read) or configs already read (nothing is read again)."""
    cfg = source if isinstance(source, T2IConfigs) else read_t2i_configs(source)
    codec = load_prompt_codec(cfg.files.tokenizer_folder)
    rule = SizeRule(cfg.ae.downsample, cfg.head.parallel_num, max_res_token(codec))
    return T2IInfo(cfg.files.layout, cfg.head.parallel_num, cfg.ae.downsample, cfg.ae.z_channels, cfg.head.ch_cond,
                   rule, os.path.basename(os.path.normpath(cfg.path)))


def build_t2i_modules(llm: Qwen3Config, head: HeadConfig, ae: AutoencoderConfig):
    """All four modules on the meta device (no memory): for strict loading and key checks."""
    with torch.device("meta"):
        return Qwen3Backbone(llm), DiffusionHead(head), Projector(ae.z_channels, llm.hidden_size), build_autoencoder(ae)


def weights_format(weights: str, role: str | None) -> str:
    """How one part is stored for a `weights` choice: role "backbone", "head" or None (projector,
    autoencoder: always as stored). "4bit" is the backbone in GGUF Q4_0 and the head in fp8: the head
    runs 51 times per block and a 4-bit weight is dequantised on every call (docs/quantization.md)."""
    if role is None or weights == "as-is":
        return "as-is"
    if weights == "4bit":
        return "4bit" if role == "backbone" else "fp8"
    return weights


def materialize_parts(parts, weights: str, device, dtype, include: Callable[[str, nn.Linear], bool] | None = None,
                      matmul: str = "auto") -> None:
    """Fill meta-device modules from their weight sources as `weights` says; shared by model folders
    and the ComfyUI split files (comfy_split.py), so a weights format is added in one place.

    parts: (module, source, name, keys not ours, role: "backbone" | "head" | None) per module, each
    stored as `weights_format` says: "as-is" reads every tensor in `dtype` (fp8 tensors of a source seen
    through the fp8 conventions are widened), "fp8" stores the big linears as fp8 (an e4m3 tensor with
    its scale kept as it is), "4bit" the linears as Q4_0 blocks (a GGUF file's blocks kept as they are)."""
    require(weights in WEIGHTS, f"weights '{weights}' unknown; use one of {list(WEIGHTS)}")
    parts = [(m, src, what, ign, weights_format(weights, role)) for m, src, what, ign, role in parts]
    if weights != "as-is":  # safetensors files may hold fp8 tensors with scale siblings: the fp8 conventions
        parts = [(m, src if how == "4bit" else as_fp8_source(src), what, ign, how) for m, src, what, ign, how in parts]
    # Check every file before reading any weights: a bad shard should fail in a second, not after 30 GB.
    for module, src, what, ignore, _ in parts:
        check_keys(module, src, what, ignore)
    for module, src, what, ignore, how in parts:
        if how == "fp8":
            materialize_fp8(module, src, what, device, dtype, ignore, include, matmul)
        elif how == "4bit":
            materialize_q4(module, src, what, device, dtype, ignore)
        else:
            materialize(module, src, what, device, dtype, ignore)


def load_t2i(path: str, device="cpu", dtype=torch.float32, attention: str = "sdpa", weights: str = "as-is",
             configs: T2IConfigs | None = None, matmul: str = "auto",
             include: Callable[[str, nn.Linear], bool] | None = None) -> T2IPipeline:
    """weights: "as-is" (read in `dtype`), "fp8" (the backbone's and the head's big linears stored as
    float8 e4m3, quantised on load unless the file has them in fp8 already; formats/fp8.py) or "4bit"
    (the backbone's linears as GGUF Q4_0 blocks, formats/q4.py, from the folder's backbone-Q4_0.gguf when
    it is there, otherwise quantised on load; the head's big linears in fp8: weights_format).
    configs: the folder's configs when the caller has read them (see read_t2i_configs).
    matmul, include: the fp8 linears' matmul mode and selection (formats/fp8.py)."""
    require(attention in ("sdpa", "flash"), f"attention '{attention}' unknown; use 'sdpa' or 'flash'")
    require(weights in WEIGHTS, f"weights '{weights}' unknown; use one of {list(WEIGHTS)}")
    cfg = configs if configs is not None else read_t2i_configs(path)
    files = cfg.files
    codec = load_prompt_codec(files.tokenizer_folder)
    backbone, head, projector, ae = build_t2i_modules(*cfg.parts)
    backbone_src = (open_q4_backbone(cfg) if weights == "4bit" else None) or open_sharded(files.llm_folder)
    # (module, weights, name, keys not ours, role)
    materialize_parts([(backbone, backbone_src, "Qwen3 backbone", Qwen3Backbone.IGNORED_KEYS, "backbone"),
                       (head, open_safetensors([files.head_weights]), "diffusion head", (), "head"),
                       (projector, open_safetensors([files.projector_weights]), "projector", (), None),
                       (ae, open_safetensors([files.ae_weights]), "autoencoder", (), None)],
                      weights, device, dtype, include, matmul)
    backbone.set_attention(attention)
    head.set_attention(attention)
    name = os.path.basename(os.path.normpath(path)) + {"as-is": "", "fp8": " (fp8)", "4bit": " (4-bit)"}[weights]
    return T2IPipeline(backbone, head, projector, ae, codec, device, name=name)
