"""fp8 weights: float8_e4m3fn linears with one scale per output channel.

`Fp8Linear` stores `weight` as float8_e4m3fn [out, in] and `weight_scale` float32 [out]
(w ≈ weight * weight_scale[:, None]); its state-dict keys are the ComfyUI ones (`<p>.weight`,
`<p>.weight_scale`). Compute happens in the activations' dtype: either the fp8 weight is widened
and the per-channel scale is applied to the output (weight-only fp8, any device), or, on CUDA GPUs
with fp8 tensor cores, `torch._scaled_mm` multiplies fp8 activations (scaled per row) by the fp8
weight (`matmul="auto"`: there only; `matmul="scaled_mm"`: on any device whose PyTorch build has
the kernel, the CPU included, which is how the tests check its arithmetic; any failure falls back
to the first way, once per layer).

Loading: `materialize_fp8` quantises on load from bf16/fp32 files (one tensor at a time on the
CPU, then only the fp8 bytes go to the device); `Fp8Source` reads files that are already fp8
(`.weight_scale` siblings and the other spellings of doc §3.2), dequantising only what is not a
quantised linear. `load_t2i_fp8` loads an official/diffusers folder with fp8 linears;
`load_comfy_split` loads the three ComfyUI split files (main model = head + projector, text
encoder, VAE).
"""
from __future__ import annotations

import os
import re
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import TensorSource, _assign, check_keys, materialize, open_safetensors
from .errors import BitDanceError, require

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu", "float8_e4m3fnuz",
                                                "float8_e5m2fnuz") if hasattr(torch, n))
# Spellings of a weight's dequantisation scale in fp8 files (x ≈ q * scale), for the weight key `<p>.weight`.
SCALE_SUFFIXES = (".weight_scale", ".weight.scale", ".scale_weight", ".weight_scales")
# Keys that carry no weight: activation scales of scaled-mm exports, ComfyUI's quantisation metadata.
AUX_SUFFIXES = (".input_scale", ".comfy_quant")
AUX_KEYS = ("scaled_fp8",)
MATMUL_MODES = ("dequant", "scaled_mm", "auto")


# ---- the arithmetic -------------------------------------------------------------------------

def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (float8_e4m3fn [out, in], float32 scale [out]) with w ≈ q * scale[:, None].

    The scale maps each row's largest magnitude to 448; all-zero rows get scale 1."""
    require(w.dim() == 2, f"fp8 quantisation takes a 2-D weight, got shape {list(w.shape)}")
    w32 = w.to(torch.float32)
    amax = w32.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w32 / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor | None, dtype=torch.float32) -> torch.Tensor:
    """q * scale with the scale broadcast over the leading (output) dimension."""
    out = q.to(torch.float32)
    if scale is not None:
        s = scale.to(torch.float32)
        while s.dim() < out.dim():
            s = s.unsqueeze(-1)
        out = out * s
    return out.to(dtype)


def per_channel_scale(scale: torch.Tensor | None, out_features: int, origin: str) -> torch.Tensor:
    """A scalar, [out] or [out, 1] scale as float32 [out]."""
    if scale is None:
        return torch.ones(out_features, dtype=torch.float32)
    s = scale.to(torch.float32)
    if s.numel() == 1:
        return s.reshape(1).expand(out_features).clone()
    if s.numel() == out_features:
        return s.reshape(out_features).clone()
    raise BitDanceError(f"{origin}: scale of shape {list(scale.shape)} is neither per-tensor nor per-output-channel "
                        f"({out_features} rows); block-wise fp8 scales are not supported")


def scaled_mm_supported(device: torch.device) -> bool:
    """Row-wise scaled fp8 matmul worth choosing by default: CUDA compute capability 9.0 or newer
    (H100, H200, B200)."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    try:
        return torch.cuda.get_device_capability(device) >= (9, 0)
    except Exception:
        return False


# ---- the layer ------------------------------------------------------------------------------

class Fp8Linear(nn.Module):
    """A Linear whose weight is float8_e4m3fn with a float32 scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, bias_dtype=torch.float32,
                 matmul: str = "dequant"):
        super().__init__()
        require(matmul in MATMUL_MODES, f"fp8 matmul '{matmul}' unknown; choose one of {MATMUL_MODES}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8, device=device), requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.matmul = matmul
        self._scaled_mm_failed = False

    @classmethod
    def from_linear(cls, lin: nn.Linear, matmul: str = "dequant") -> "Fp8Linear":
        """Quantise an existing Linear (or build an empty one on the meta device)."""
        dev = lin.weight.device
        out = cls(lin.in_features, lin.out_features, lin.bias is not None, device=dev,
                  bias_dtype=lin.bias.dtype if lin.bias is not None else torch.float32, matmul=matmul)
        if dev.type != "meta":
            q, s = quantize_fp8(lin.weight.detach())
            out.weight = nn.Parameter(q.to(dev), requires_grad=False)
            out.weight_scale = s.to(dev)
            if lin.bias is not None:
                out.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8 e4m3 per-channel, matmul={self.matmul}"

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.weight_scale, dtype)

    def _want_scaled_mm(self, x: torch.Tensor) -> bool:
        if self.matmul == "dequant" or self._scaled_mm_failed or x.dtype not in (torch.bfloat16, torch.float16):
            return False
        if self.in_features % 16 or self.out_features % 16 or not hasattr(torch, "_scaled_mm"):
            return False
        return self.matmul == "scaled_mm" or scaled_mm_supported(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._want_scaled_mm(x):
            try:
                return self._forward_scaled_mm(x)
            except (RuntimeError, TypeError, ValueError):  # torch raises ValueError for a scale layout it rejects
                self._scaled_mm_failed = True  # unsupported shape/build: weight-only fp8 from now on
        dtype = x.dtype if x.is_floating_point() else torch.float32
        if dtype == torch.float16:
            # fp16 could overflow on the unscaled fp8 products: dequantise the weight instead
            w = self.weight.to(dtype)
            w.mul_(self.weight_scale.to(dtype)[:, None])
            return F.linear(x, w, None if self.bias is None else self.bias.to(dtype))
        y = F.linear(x.to(dtype), self.weight.to(dtype))
        y = y * self.weight_scale.to(dtype)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y

    def _forward_scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        amax = x2.abs().amax(dim=1, keepdim=True).to(torch.float32).clamp_min(1e-12)
        x_scale = amax / FP8_MAX
        xq = (x2.to(torch.float32) / x_scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale.view(1, -1),
                             out_dtype=x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)


# Linears whose weight dtype the engine reads to pick its compute dtype: they stay unquantised.
DTYPE_PROBES = ("time_embed.mlp.0",)


def default_include(name: str, lin: nn.Linear) -> bool:
    """Which linears become fp8 by default: the big ones. The narrow ends of the head
    (`input_proj` from 32 bits, `final_layer.linear` to 32 bits) and the dtype probes stay in the
    compute dtype."""
    return min(lin.in_features, lin.out_features) >= 64 and not name.endswith(DTYPE_PROBES)


def quantize_linears(module: nn.Module, include: Callable[[str, nn.Linear], bool] | None = None,
                     matmul: str = "dequant") -> list[str]:
    """Swap every selected nn.Linear of `module` for an Fp8Linear, in place (meta modules stay empty).
    Returns the qualified names of the swapped linears."""
    include = include or default_include
    swapped = []
    for name, child in list(module.named_modules()):
        if type(child) is nn.Linear and include(name, child):
            parent_name, _, leaf = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, leaf, Fp8Linear.from_linear(child, matmul=matmul))
            swapped.append(name)
    return swapped


def set_matmul(module: nn.Module, matmul: str) -> None:
    require(matmul in MATMUL_MODES, f"fp8 matmul '{matmul}' unknown; choose one of {MATMUL_MODES}")
    for m in module.modules():
        if isinstance(m, Fp8Linear):
            m.matmul = matmul
            m._scaled_mm_failed = False


def fp8_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers())


# ---- reading fp8 files ----------------------------------------------------------------------

class Fp8Source:
    """A TensorSource seen through the fp8 conventions: the logical keys are the weights (scale and
    auxiliary keys hidden, prefixes stripped); `read` dequantises fp8 tensors, `read_fp8` gives
    (e4m3 weight, [out] scale). Duck-compatible with `checkpoints.check_keys` / `materialize`
    (`shapes`, `origin`, `read`, `close`)."""

    def __init__(self, src: TensorSource, names: dict[str, str] | None = None):
        self.src, self.origin = src, src.origin
        self.all_names = dict(names) if names is not None else {k: k for k in src.shapes}  # logical -> key in file
        self.scale_of: dict[str, str] = {}  # logical weight key -> scale key in file
        hidden = set()
        for k in self.all_names:
            if k in AUX_KEYS or k.endswith(AUX_SUFFIXES):
                hidden.add(k)
                continue
            for suf in SCALE_SUFFIXES:
                if k.endswith(suf):
                    wkey = k[: -len(suf)] + ".weight"
                    if wkey in self.all_names:
                        self.scale_of[wkey] = self.all_names[k]
                        hidden.add(k)
                    break
        self.names = {k: v for k, v in self.all_names.items() if k not in hidden}
        self.shapes = {k: src.shapes[v] for k, v in self.names.items()}

    def keys(self):
        return self.shapes.keys()

    def _raw(self, file_key: str) -> torch.Tensor:
        return self.src.read(file_key, "cpu", None)

    def read(self, key: str, device, dtype) -> torch.Tensor:
        t = self._raw(self.names[key])
        if t.dtype in FP8_DTYPES:
            scale = self._raw(self.scale_of[key]) if key in self.scale_of else None
            t = dequantize_fp8(t, scale, torch.float32)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)

    def read_fp8(self, key: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        """A linear weight as (float8_e4m3fn [out, in], float32 [out]); the bytes of an e4m3 file are kept."""
        t = self._raw(self.names[key])
        if t.dtype == FP8:
            scale = self._raw(self.scale_of[key]) if key in self.scale_of else None
            return t.to(device), per_channel_scale(scale, t.shape[0], f"{self.origin}: '{key}'").to(device)
        q, s = quantize_fp8(self.read(key, "cpu", torch.float32))
        return q.to(device), s.to(device)

    def with_prefix_stripped(self, prefix: str) -> "Fp8Source":
        n = len(prefix)
        return Fp8Source(self.src, {k[n:]: v for k, v in self.all_names.items() if k.startswith(prefix)})

    def subset(self, keep: Callable[[str], bool]) -> "Fp8Source":
        """The weights for which keep(logical key) is true, with their scale siblings."""
        wanted = {k for k in self.names if keep(k)}
        scales = {self.scale_of[k] for k in wanted if k in self.scale_of}
        return Fp8Source(self.src, {k: v for k, v in self.all_names.items() if k in wanted or v in scales})

    def close(self) -> None:
        if hasattr(self.src, "close"):
            self.src.close()


def as_fp8_source(src) -> Fp8Source:
    return src if isinstance(src, Fp8Source) else Fp8Source(src)


def materialize_fp8(module: nn.Module, src, what: str, device, dtype, ignore: Iterable[str] = (),
                    include: Callable[[str, nn.Linear], bool] | None = None, matmul: str = "dequant") -> nn.Module:
    """Like checkpoints.materialize, with the selected linears stored as fp8.

    `module` is built on the meta device with plain nn.Linear layers. The file is checked strictly
    against those (the same keys and shapes as a bf16 load); the selected linears are then swapped for
    Fp8Linear and filled one tensor at a time: an e4m3 tensor with its scale is taken as it is, any other
    is read on the CPU in float32 and quantised there, so only fp8 bytes reach the device."""
    src = as_fp8_source(src)
    check_keys(module, src, what, ignore)
    names = list(module.state_dict().keys())
    swapped = set(quantize_linears(module, include, matmul=matmul))
    for name in names:
        owner, _, leaf = name.rpartition(".")
        if owner in swapped and leaf == "weight":
            q, s = src.read_fp8(name, device)
            lin = module.get_submodule(owner)
            lin.weight = nn.Parameter(q, requires_grad=False)
            lin.weight_scale = s
        else:
            _assign(module, name, src.read(name, device, dtype))
    src.close()
    return module.eval()


# ---- whole pipelines ------------------------------------------------------------------------

def load_t2i_fp8(path: str, device="cpu", dtype=torch.bfloat16, attention: str = "sdpa", matmul: str = "dequant",
                 include: Callable[[str, nn.Linear], bool] | None = None):
    """`t2i.load_t2i` with the backbone's and the head's big linears quantised to fp8 on load."""
    from .autoencoder import AutoencoderConfig
    from .checkpoints import open_sharded, read_json
    from .head import HeadConfig
    from .prompts import load_prompt_codec
    from .qwen3 import Qwen3Backbone, Qwen3Config
    from .t2i import ModelFiles, T2IPipeline, build_t2i_modules

    require(attention in ("sdpa", "flash"), f"attention '{attention}' unknown; use 'sdpa' or 'flash'")
    files = ModelFiles.find(path)
    llm_cfg = Qwen3Config.from_json(read_json(files.llm_config), files.llm_config)
    head_cfg = HeadConfig.from_json(read_json(files.head_config), files.head_config)
    ae_cfg = AutoencoderConfig.from_json(read_json(files.ae_config), files.ae_config)
    codec = load_prompt_codec(files.tokenizer_folder)
    backbone, head, projector, ae = build_t2i_modules(llm_cfg, head_cfg, ae_cfg)
    sources = [(backbone, open_sharded(files.llm_folder), "Qwen3 backbone", Qwen3Backbone.IGNORED_KEYS, True),
               (head, open_safetensors([files.head_weights]), "diffusion head", (), True),
               (projector, open_safetensors([files.projector_weights]), "projector", (), False),
               (ae, open_safetensors([files.ae_weights]), "autoencoder", (), False)]
    for module, src, what, ignore, _ in sources:
        check_keys(module, as_fp8_source(src), what, ignore)
    for module, src, what, ignore, quant in sources:
        if quant:
            materialize_fp8(module, src, what, device, dtype, ignore, include, matmul)
        else:
            materialize(module, as_fp8_source(src), what, device, dtype, ignore)
    backbone.set_attention(attention)
    head.set_attention(attention)
    return T2IPipeline(backbone, head, projector, ae, codec, device, name=os.path.basename(os.path.normpath(path)) + " (fp8)")


# ComfyUI split files (doc §3.2): the prefixes each part may carry inside its file.
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
    from .qwen3 import Qwen3Config

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
    from .head import HeadConfig

    s = src.shapes
    depth = 1 + max(int(m.group(1)) for k in s if (m := re.match(r"net\.res_blocks\.(\d+)\.", k)))
    ada = 1 + max(int(m.group(1)) for k in s if (m := re.match(r"net\.ada_ln_blocks\.(\d+)\.", k)))
    c_lat, c_tgt = s["net.input_proj.weight"]
    cfg = HeadConfig(ch_target=c_tgt, ch_cond=s["net.cond_embed.weight"][1], ch_latent=c_lat, depth_latent=depth,
                     depth_adanln=ada, use_swiglu="net.res_blocks.0.w1.weight" in s, parallel_num=parallel_num)
    cfg.validate(origin)
    return cfg


def infer_ae_config(src: Fp8Source, origin: str):
    from .autoencoder import AutoencoderConfig

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
                     attention: str = "sdpa", matmul: str = "dequant",
                     include: Callable[[str, nn.Linear], bool] | None = None):
    """A T2IPipeline from the ComfyUI split files (doc §3.2): `main_model` (head + projector),
    `text_encoder` (Qwen3, fp8 with scale siblings), `vae`, and a tokenizer folder.

    weights="fp8" keeps/creates fp8 linears in the backbone and head; "dequant" widens everything
    to `dtype`. Configs come from the tensor shapes (a `<stem>_config.json` beside the text-encoder
    or VAE file, or `llm_config`, overrides); parallel_num from the tokenizer's query tokens."""
    from .autoencoder import AutoencoderConfig
    from .checkpoints import read_json
    from .head import DiffusionHead
    from .projector import Projector
    from .prompts import load_prompt_codec
    from .qwen3 import Qwen3Backbone, Qwen3Config
    from .autoencoder import build_autoencoder
    from .t2i import T2IPipeline

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
