"""Random-weight text-to-image pipelines at named shapes (no download): for the benchmark, the
memory planner's checks and the tests.

Modules are built on the meta device, optionally given fp8 linears, then materialised directly on
the target device with random values (scaled like a trained model: fan_in^-1/2 for matrices, norms
near 1, small biases), one tensor at a time. `SyntheticCodec` stands in for the tokenizer: it maps
words to ids and places the res/query/vision tokens at the top of the vocabulary.
"""
from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from ..models.ae_layers import AutoencoderConfig
from ..models.autoencoder import build_autoencoder
from ..errors import BitDanceError, require
from ..models.head import DiffusionHead, HeadConfig
from ..models.projector import Projector
from ..pipelines.prompts import PromptCodec
from ..models.qwen3 import Qwen3Backbone, Qwen3Config

AE_T2I = AutoencoderConfig()  # ch 256, [1,1,2,2,4], 4 res blocks, z 32: the released T2I tokenizer
AE_SMALL = AutoencoderConfig(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1)


@dataclass
class Shape:
    """Everything a random pipeline and a benchmark run need."""

    llm: Qwen3Config
    head: HeadConfig
    ae: AutoencoderConfig
    height: int = 1024
    width: int = 1024
    steps: int = 50
    cfg: float = 7.5
    note: str = ""


def _head(c, cond, P, depth=6, ada=2, head_dim=128):
    return HeadConfig(ch_target=32, ch_cond=cond, ch_latent=c, depth_latent=depth, depth_adanln=ada, use_swiglu=True,
                      parallel_num=P, head_dim=head_dim)


SHAPES = {
    "14b-64x": Shape(Qwen3Config(), _head(5120, 5120, 64), AE_T2I, 1024, 1024, 50, 7.5, "BitDance-14B-64x"),
    "14b-16x": Shape(Qwen3Config(vocab_size=151940), _head(5120, 5120, 16), AE_T2I, 1024, 1024, 50, 7.5, "BitDance-14B-16x"),
    # BitDance-B's widths (24 x 768, 12 heads of 64; head 6 x 768, 2 adaLN) on the text-to-image engine,
    # 256 px, 16 tokens per step: the ImageNet-B scale of work, not the ImageNet model itself.
    "imagenet-b": Shape(Qwen3Config(vocab_size=2048, hidden_size=768, intermediate_size=2048, num_hidden_layers=24,
                                    num_attention_heads=12, num_key_value_heads=12, head_dim=64),
                        _head(768, 768, 16, head_dim=64), AE_T2I, 256, 256, 100, 4.0, "BitDance-B widths, 256 px"),
    # issue 2's mid-size model: Qwen3 8 x 512, head 3 x 512, parallel 64, 512 px, 20 steps, cfg 4
    "mid": Shape(Qwen3Config(vocab_size=2048, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                             num_attention_heads=8, num_key_value_heads=4, head_dim=64),
                 _head(512, 512, 64, depth=3, ada=1), AE_SMALL, 512, 512, 20, 4.0, "issue 2 mid-size"),
    "tiny": Shape(Qwen3Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16),
                  _head(128, 64, 16, depth=2, ada=2), AutoencoderConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1),
                  256, 256, 4, 4.0, "test-sized"),
}


def custom_shape(base: str = "mid", layers=None, hidden=None, heads=None, kv_heads=None, head_dim=None,
                 intermediate=None, vocab=None, head_depth=None, head_width=None, head_adaln=None, parallel=None,
                 ae_ch=None, height=None, width=None, steps=None, cfg=None) -> Shape:
    s = SHAPES[base]
    llm = replace(s.llm, **{k: v for k, v in dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                                                   num_key_value_heads=kv_heads, head_dim=head_dim,
                                                   intermediate_size=intermediate, vocab_size=vocab).items() if v is not None})
    if hidden is not None and heads is not None and head_dim is None:
        llm.head_dim = hidden // heads
    head = replace(s.head, ch_cond=llm.hidden_size, **{k: v for k, v in dict(
        depth_latent=head_depth, ch_latent=head_width, depth_adanln=head_adaln, parallel_num=parallel).items() if v is not None})
    if head.ch_latent % head.head_dim:
        head.head_dim = 64 if head.ch_latent % 64 == 0 else head.ch_latent
    ae = replace(s.ae, ch=ae_ch) if ae_ch else s.ae
    out = Shape(llm, head, ae, height or s.height, width or s.width, steps or s.steps, s.cfg if cfg is None else cfg, "custom")
    head.validate("custom shape")
    return out


class SyntheticCodec(PromptCodec):
    """A tokenizer stand-in: words hash to ids below the special tokens, which sit at the top of
    the vocabulary: <|vision_start|>, <|im_start|>, <|im_end|>, <|res_1..256|>, <|query_1..P-1|>."""

    def __init__(self, vocab_size: int, parallel_num: int):
        n_special = 3 + 256 + (parallel_num - 1)
        require(vocab_size > n_special + 16, f"vocab_size {vocab_size} too small for {n_special} special tokens")
        base = vocab_size - n_special
        table = {"<|vision_start|>": base, "<|im_start|>": base + 1, "<|im_end|>": base + 2}
        table.update({f"<|res_{i}|>": base + 2 + i for i in range(1, 257)})
        table.update({f"<|query_{i}|>": base + 258 + i for i in range(1, parallel_num)})
        self.base = base

        def encode(text: str) -> list[int]:
            return [table[p] if p in table else zlib.crc32(p.encode()) % base
                    for p in re.findall(r"<\|[^|]+\|>|[^\s<]+|\n|<", text)]
        super().__init__(encode, table.get, "synthetic tokenizer")


def _init_(name: str, t: torch.Tensor, gen: torch.Generator) -> None:
    """In place: matrices fan_in^-1/2 (clamped to [0.02, 0.2]), norm weights 1 + 0.1 N, biases 0.05 N."""
    if t.dim() >= 2:
        fan_in = t[0].numel()
        std = min(0.2, max(0.02, fan_in ** -0.5))
        if ".adaptive." in name and ".gamma." in name:
            std = 0.02
        t.normal_(0.0, std, generator=gen)
    elif name.endswith("bias"):
        t.normal_(0.0, 0.05, generator=gen)
        if ".adaptive." in name and ".gamma." in name:
            t.add_(1.0)
    else:
        t.normal_(1.0, 0.1, generator=gen)


def randomize_(module: nn.Module, device, dtype, seed: int = 0, fp8_include=None, q4_include=None,
               draw_device=None) -> nn.Module:
    """Materialise a meta module with random values on `device`, one tensor at a time.
    With `fp8_include`, the selected linears become fp8 (quantised from float32 as they are drawn);
    with `q4_include`, Q4_0 linears with random blocks drawn directly (uniform 4-bit codes, a scale
    giving the matrix's usual spread; no quantiser run: seconds at 14B, on the device).
    draw_device: where the numbers are drawn (and quantised) before each tensor moves to `device`:
    a GPU draws a 14B model in seconds where the CPU takes minutes (bench's host copies for offloading)."""
    from ..formats import q4
    from ..formats.checkpoints import assign
    from ..formats.fp8 import quantize_fp8, quantize_linears

    device = torch.device(device)
    draw = torch.device(draw_device) if draw_device is not None else device
    gen = torch.Generator(device=draw).manual_seed(seed)
    swapped = set(quantize_linears(module, fp8_include)) if fp8_include is not None else set()
    q4_swapped = set(q4.quantize_linears(module, q4_include)) if q4_include is not None else set()
    for name, t in list(module.state_dict(keep_vars=True).items()):
        owner, _, leaf = name.rpartition(".")
        if owner in q4_swapped and leaf == "weight":
            lin = module.get_submodule(owner)
            blocks = torch.randint(0, 256, tuple(t.shape), generator=gen, device=draw, dtype=torch.int16).to(torch.uint8)
            std = min(0.2, max(0.02, lin.in_features ** -0.5))
            d = torch.full((blocks.numel() // q4.BLOCK_BYTES, 1), std / 4.6, dtype=torch.float16, device=draw)
            blocks.view(-1, q4.BLOCK_BYTES)[:, :2] = d.view(torch.uint8)  # codes uniform on 0..15: (q - 8) has std ~4.6
            lin.weight = nn.Parameter(blocks.to(device), requires_grad=False)
            continue
        if owner in swapped:
            lin = module.get_submodule(owner)
            if leaf == "weight":
                w = torch.empty(t.shape, device=draw, dtype=torch.float32)
                _init_(name, w, gen)
                q, s = quantize_fp8(w)
                del w
                lin.weight = nn.Parameter(q.to(device), requires_grad=False)
                lin.weight_scale = s.to(device)
                continue
            if leaf == "weight_scale":
                continue
        x = torch.empty(t.shape, device=draw, dtype=torch.float32 if dtype is None else dtype)
        if x.is_floating_point():
            _init_(name, x, gen)
        assign(module, name, x.to(device))
    return module.eval()


def build_random_t2i(shape: Shape | str, device="cpu", dtype=torch.float32, seed: int = 0, fp8: bool = False,
                     ae_dtype=None, attention: str = "sdpa", weights: str | None = None, draw_device=None):
    """A T2IPipeline with random weights at `shape` (weights: "as-is", "fp8" (backbone and head linears
    in fp8; also fp8=True) or "4bit" (backbone linears Q4_0, head fp8), as the loaders make them),
    stored on `device`, drawn on `draw_device` (default: `device`)."""
    from ..formats import q4
    from ..formats.fp8 import default_include
    from ..pipelines.t2i import T2IPipeline

    weights = weights or ("fp8" if fp8 else "as-is")
    require(weights in ("as-is", "fp8", "4bit"), f"weights '{weights}' unknown; choose as-is, fp8 or 4bit")
    shape = SHAPES[shape] if isinstance(shape, str) else shape
    with torch.device("meta"):
        backbone, head = Qwen3Backbone(shape.llm), DiffusionHead(shape.head)
        projector = Projector(shape.ae.z_channels, shape.llm.hidden_size)
    ae = build_autoencoder(shape.ae)
    inc = default_include if weights in ("fp8", "4bit") else None
    if weights == "4bit":
        randomize_(backbone, device, dtype, seed, q4_include=q4.default_include, draw_device=draw_device)
    else:
        randomize_(backbone, device, dtype, seed, inc, draw_device=draw_device)
    randomize_(head, device, dtype, seed + 1, inc, draw_device=draw_device)
    randomize_(projector, device, dtype, seed + 2, draw_device=draw_device)
    randomize_(ae, device, ae_dtype or dtype, seed + 3, draw_device=draw_device)
    backbone.set_attention(attention)
    head.set_attention(attention)
    codec = SyntheticCodec(shape.llm.vocab_size, shape.head.parallel_num)
    return T2IPipeline(backbone, head, projector, ae, codec, device, name="random")


def save_official_folder(pipe, folder: str, tokenizer_json: str | None = None) -> str:
    """Write a pipeline in the official layout (config.json, model.safetensors, ae/vision_head/projector
    files). The tokenizer is copied from `tokenizer_json` (the pipeline's codec is not saveable)."""
    import shutil

    from safetensors.torch import save_file

    save_configs(pipe.backbone.config, pipe.head.config, pipe.autoencoder.config, folder)

    def sd(m):
        return {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()}
    save_file(sd(pipe.backbone), os.path.join(folder, "model.safetensors"))
    save_file(sd(pipe.head), os.path.join(folder, "vision_head.safetensors"))
    save_file(sd(pipe.projector), os.path.join(folder, "projector.safetensors"))
    save_file(sd(pipe.autoencoder), os.path.join(folder, "ae.safetensors"))
    if tokenizer_json:
        shutil.copy(tokenizer_json, os.path.join(folder, "tokenizer.json"))
    return folder


def save_configs(c: Qwen3Config, h: HeadConfig, ae: AutoencoderConfig, folder: str) -> str:
    """The three config files of the official layout (config.json, vision_head_config.json,
    ae_config.json): enough for `describe_t2i` and the memory planner, no weights."""
    os.makedirs(folder, exist_ok=True)
    cfg = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False, "hidden_act": "silu",
           "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
           "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
           "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
           "rope_theta": c.rope_theta, "max_position_embeddings": c.max_position_embeddings, "rope_scaling": None,
           "tie_word_embeddings": False, "use_sliding_window": False}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(folder, "vision_head_config.json"), "w") as f:
        json.dump({k: getattr(h, k) for k in HeadConfig._JSON_KEYS}, f)
    with open(os.path.join(folder, "ae_config.json"), "w") as f:
        json.dump(ae.to_json(), f)
    return folder


def write_tokenizer_json(path: str, parallel_num: int, words=("a", "red", "fox", "cat", "in", "the", "snow", "user",
                                                                 "assistant", "at", "dawn", "sky")) -> str:
    """A small word-level tokenizer.json with the BitDance special tokens (<|im_start|>, <|im_end|>,
    <|vision_start|>, <|res_1..256|>, <|query_1..P-1|>), loadable by `prompts.load_prompt_codec`."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>"] + [f"<|res_{i}|>" for i in range(1, 257)] + [
        f"<|query_{i}|>" for i in range(1, parallel_num)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(path)
    return path


def shape_to_json(shape: Shape) -> dict:
    return {"llm": asdict(shape.llm), "head": {k: v for k, v in asdict(shape.head).items()},
            "ae": asdict(shape.ae), "height": shape.height, "width": shape.width, "steps": shape.steps, "cfg": shape.cfg,
            "note": shape.note}


__all__ = ["SHAPES", "Shape", "SyntheticCodec", "build_random_t2i", "custom_shape", "randomize_", "save_configs", "save_official_folder",
           "BitDanceError"]
