"""The ComfyUI split files of a text-to-image model (doc §3.2): the main model (diffusion head +
projector), the text encoder (Qwen3, fp8 linears with scale siblings) and the VAE, each one
safetensors file in ComfyUI's own folders, plus a tokenizer folder. Configs come from the tensor
shapes (a `<stem>_config.json` beside a file wins); parallel_num from the tokenizer's query tokens.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import BitDanceError, require
from ..formats.checkpoints import check_keys, materialize, open_safetensors, read_json
from ..formats.fp8 import Fp8Linear, Fp8Source, materialize_fp8, quantize_fp8
from ..models.ae_layers import AutoencoderConfig
from ..models.autoencoder import build_autoencoder
from ..models.head import DiffusionHead, HeadConfig
from ..models.projector import Projector
from ..models.qwen3 import Qwen3Backbone, Qwen3Config
from .prompts import load_prompt_codec
from .t2i import T2IPipeline

# The prefixes each part may carry inside its file.
HEAD_PREFIXES = ("diffusion_head.", "model.diffusion_head.", "main_model.diffusion_head.", "vision_head.")
PROJECTOR_PREFIXES = ("projector.", "model.projector.", "main_model.projector.")
TEXT_ENCODER_PREFIXES = ("text_encoder.", "model.text_encoder.")
VAE_PREFIXES = ("autoencoder.", "vae.", "model.autoencoder.")


def _pick_prefix(src: Fp8Source, prefixes: Iterable[str], probe: str) -> str:
    for p in prefixes:
        if p + probe in src.shapes:
            return p
    return ""


def split_main_model(src: Fp8Source) -> tuple[Fp8Source, Fp8Source]:
    """(head, projector) sources from the ComfyUI main-model file; nothing else may be in it."""
    hp = _pick_prefix(src, HEAD_PREFIXES, "net.input_proj.weight")
    pp = _pick_prefix(src, PROJECTOR_PREFIXES, "fc1.weight")
    head = src.subset(lambda k: k.startswith(hp + "net.")).with_prefix_stripped(hp)
    proj = src.subset(lambda k: k.startswith(pp + "fc1.") or k.startswith(pp + "fc2.")).with_prefix_stripped(pp)
    require("net.input_proj.weight" in head.shapes,
            f"{src.origin}: no diffusion-head keys (expected net.* under one of {list(HEAD_PREFIXES)} or bare)")
    require("fc1.weight" in proj.shapes,
            f"{src.origin}: no projector keys (expected fc1.*/fc2.* under one of {list(PROJECTOR_PREFIXES)} or bare)")
    claimed = {hp + k for k in head.shapes} | {pp + k for k in proj.shapes}
    extra = sorted(set(src.shapes) - claimed)
    require(not extra, f"{src.origin}: unexpected keys in the main-model file {extra[:5]}"
                       + (f" and {len(extra) - 5} more" if len(extra) > 5 else "") + " (expected only the head and the projector)")
    return head, proj


def _strip_first(src: Fp8Source, prefixes: Iterable[str]) -> Fp8Source:
    for p in prefixes:
        if any(k.startswith(p) for k in src.shapes):
            rest = [k for k in src.shapes if not k.startswith(p)]
            require(not rest, f"{src.origin}: keys both with and without the '{p}' prefix, e.g. {rest[:3]}")
            return src.with_prefix_stripped(p)
    return src


def infer_qwen3_config(src: Fp8Source, origin: str):
    s = src.shapes
    need = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.q_norm.weight", "model.layers.0.mlp.gate_proj.weight"]
    miss = [k for k in need if k not in s]
    require(not miss, f"{origin}: not a Qwen3 text encoder: missing {miss}")
    layers = 1 + max(int(m.group(1)) for k in s if (m := re.match(r"model\.layers\.(\d+)\.", k)))
    vocab, hidden = s["model.embed_tokens.weight"]
    hd = s["model.layers.0.self_attn.q_norm.weight"][0]
    return Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=s["model.layers.0.mlp.gate_proj.weight"][0],
                       num_hidden_layers=layers, num_attention_heads=s["model.layers.0.self_attn.q_proj.weight"][0] // hd,
                       num_key_value_heads=s["model.layers.0.self_attn.k_proj.weight"][0] // hd, head_dim=hd)


def infer_head_config(src: Fp8Source, parallel_num: int, origin: str):
    s = src.shapes
    depth = 1 + max(int(m.group(1)) for k in s if (m := re.match(r"net\.res_blocks\.(\d+)\.", k)))
    ada = 1 + max(int(m.group(1)) for k in s if (m := re.match(r"net\.ada_ln_blocks\.(\d+)\.", k)))
    c_lat, c_tgt = s["net.input_proj.weight"]
    cfg = HeadConfig(ch_target=c_tgt, ch_cond=s["net.cond_embed.weight"][1], ch_latent=c_lat, depth_latent=depth,
                     depth_adanln=ada, use_swiglu="net.res_blocks.0.w1.weight" in s, parallel_num=parallel_num)
    cfg.validate(origin)
    return cfg


def infer_ae_config(src: Fp8Source, origin: str):
    s = src.shapes
    require("encoder.conv_in.weight" in s and "decoder.conv_in.weight" in s,
            f"{origin}: not a BitDance VAE (no encoder.conv_in / decoder.conv_in; keys may carry {list(VAE_PREFIXES)})")
    ch = s["encoder.conv_in.weight"][0]
    levels = 1 + max(int(m.group(1)) for k in s if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
    mult = tuple(s[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels))
    nrb = 1 + max(int(m.group(1)) for k in s if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
    z = s["encoder.conv_out.weight"][0]
    return AutoencoderConfig(ch=ch, ch_mult=mult, num_res_blocks=nrb, z_channels=z, in_channels=s["encoder.conv_in.weight"][1],
                             out_ch=s["decoder.conv_out.weight"][0], gan_decoder=s["decoder.conv_in.weight"][1] == 2 * z)


def parallel_num_from_codec(codec) -> int:
    """P = 1 + the number of <|query_i|> tokens the tokenizer has (64x: 63, 16x: 15)."""
    n = 0
    while n < 1024:
        try:
            codec.token_id(f"<|query_{n + 1}|>", "probe")
        except BitDanceError:
            break
        n += 1
    require(n > 0, f"{codec.origin}: the tokenizer has no <|query_i|> tokens; give parallel_num")
    return n + 1


def _config_beside(path: str) -> str | None:
    """`<stem>_config.json` or `<stem>.json` next to a weights file (a shared folder such as
    models/vae may hold other models' config.json, so a bare config.json is not taken)."""
    stem = path[: -len(".safetensors")] if path.endswith(".safetensors") else path
    for cand in (stem + "_config.json", stem + ".json"):
        if os.path.isfile(cand):
            return cand
    return None


def load_comfy_split(main_model: str, text_encoder: str, vae: str, tokenizer: str, device="cpu", dtype=torch.bfloat16,
                     weights: str = "fp8", parallel_num: int | None = None, llm_config: dict | str | None = None,
                     attention: str = "sdpa", matmul: str = "auto",
                     include: Callable[[str, nn.Linear], bool] | None = None):
    """A T2IPipeline from the ComfyUI split files (doc §3.2): `main_model` (head + projector),
    `text_encoder` (Qwen3, fp8 with scale siblings), `vae`, and a tokenizer folder.

    weights="fp8" keeps/creates fp8 linears in the backbone and head; "dequant" widens everything
    to `dtype`. Configs come from the tensor shapes (a `<stem>_config.json` beside the text-encoder
    or VAE file, or `llm_config`, overrides); parallel_num from the tokenizer's query tokens."""
    require(weights in ("fp8", "dequant"), f"weights '{weights}' unknown; use 'fp8' or 'dequant'")
    require(attention in ("sdpa", "flash"), f"attention '{attention}' unknown; use 'sdpa' or 'flash'")
    codec = load_prompt_codec(tokenizer)
    P = parallel_num or parallel_num_from_codec(codec)

    head_src, proj_src = split_main_model(Fp8Source(open_safetensors([main_model])))
    te_src = _strip_first(Fp8Source(open_safetensors([text_encoder])), TEXT_ENCODER_PREFIXES)
    vae_src = _strip_first(Fp8Source(open_safetensors([vae])), VAE_PREFIXES)

    if llm_config is None:
        llm_config = _config_beside(text_encoder)
    if isinstance(llm_config, str):
        llm_cfg = Qwen3Config.from_json(read_json(llm_config), llm_config)
    elif isinstance(llm_config, dict):
        llm_cfg = Qwen3Config.from_json(llm_config, "llm_config")
    else:
        llm_cfg = infer_qwen3_config(te_src, text_encoder)
    head_cfg = infer_head_config(head_src, P, main_model)
    ae_json = _config_beside(vae)
    ae_cfg = AutoencoderConfig.from_json(read_json(ae_json), ae_json) if ae_json else infer_ae_config(vae_src, vae)
    require(head_cfg.ch_cond == llm_cfg.hidden_size,
            f"{main_model}: the head's cond width {head_cfg.ch_cond} must equal the text encoder's hidden size {llm_cfg.hidden_size}")
    require(head_cfg.ch_target == ae_cfg.z_channels,
            f"{main_model}: the head's ch_target {head_cfg.ch_target} must equal the VAE's z_channels {ae_cfg.z_channels}")

    with torch.device("meta"):
        backbone, head, projector = Qwen3Backbone(llm_cfg), DiffusionHead(head_cfg), Projector(ae_cfg.z_channels, llm_cfg.hidden_size)
    ae = build_autoencoder(ae_cfg)
    parts = [(backbone, te_src, "Qwen3 text encoder", Qwen3Backbone.IGNORED_KEYS, True),
             (head, head_src, "diffusion head", (), True), (projector, proj_src, "projector", (), False),
             (ae, vae_src, "VAE", (), False)]
    for module, src, what, ignore, _ in parts:
        check_keys(module, src, what, ignore)
    for module, src, what, ignore, quant in parts:
        if quant and weights == "fp8":
            materialize_fp8(module, src, what, device, dtype, ignore, include, matmul)
        else:
            materialize(module, src, what, device, dtype, ignore)
    backbone.set_attention(attention)
    head.set_attention(attention)
    return T2IPipeline(backbone, head, projector, ae, codec, device, name=os.path.basename(main_model))


def save_comfy_split(pipe, folder: str, head_prefix: str = "diffusion_head.", projector_prefix: str = "projector.",
                     te_prefix: str = "", vae_prefix: str = "", vae_dtype=torch.float16,
                     scale_suffix: str = ".weight_scale") -> dict[str, str]:
    """Write a pipeline as the three ComfyUI split files (fp8 e4m3 linears + scale siblings in the
    main model and text encoder; fp16 VAE). Used by the tests and to convert a folder once."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)

    def fp8_dict(module, prefix):
        out = {}
        sd = module.state_dict()
        lin_names = {n for n, m in module.named_modules() if isinstance(m, (nn.Linear, Fp8Linear)) and n}
        for k, v in sd.items():
            owner, _, leaf = k.rpartition(".")
            if owner in lin_names and leaf == "weight_scale":
                continue
            if owner in lin_names and leaf == "weight" and min(v.shape) >= 64:
                m = module.get_submodule(owner)
                if isinstance(m, Fp8Linear):
                    q, s = m.weight.detach().cpu(), m.weight_scale.detach().cpu()
                else:
                    q, s = quantize_fp8(v.detach().cpu())
                out[prefix + k] = q.contiguous()
                out[prefix + owner + scale_suffix] = s.contiguous()
            else:
                t = v.detach().cpu()
                out[prefix + k] = (t.to(torch.bfloat16) if t.is_floating_point() else t).contiguous()
        return out

    main = fp8_dict(pipe.head, head_prefix)
    main.update(fp8_dict(pipe.projector, projector_prefix))
    te = fp8_dict(pipe.backbone, te_prefix)
    ae = {vae_prefix + k: v.detach().cpu().to(vae_dtype).contiguous() for k, v in pipe.autoencoder.state_dict().items()}
    paths = {"main_model": os.path.join(folder, "BitDance_MainModel_FP8.safetensors"),
             "text_encoder": os.path.join(folder, "BitDance_TextEncoder_FP8.safetensors"),
             "vae": os.path.join(folder, "BitDance_VAE_FP16.safetensors")}
    save_file(main, paths["main_model"])
    save_file(te, paths["text_encoder"])
    save_file(ae, paths["vae"])
    return paths
