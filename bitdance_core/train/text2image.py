"""Training a text-to-image BitDance (tiny Qwen3 backbone + diffusion head + projector) on the digits.

The modules are the engine's (Qwen3Backbone, DiffusionHead, Projector, BinaryAutoencoder) and the
files written are the official T2I folder layout, so `load_t2i` reads the result. One training row
is exactly what the pipeline feeds at inference:
  [chat-templated prompt | <|vision_start|> <|res_h|> | <|res_w|> <|query_1..P-1|> | blocks 0..S-2]
with the prompt left-padded, causal over the prompt, and block-bidirectional from <|res_w|> on;
the outputs of the last P prefix tokens and of every block but the last, plus the 2D sin-cos table,
condition the head on blocks 0..S-1. The inputs are projector(bits) + the same table.
"""
from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from ..models.autoencoder import BinaryAutoencoder
from ..models.head import DiffusionHead, HeadConfig
from ..models.positions import raster_to_blocks, sincos_2d_blocks
from ..models.projector import Projector
from ..pipelines.prompts import COND_TEMPLATE, UNCOND_PROMPT, PromptCodec, from_tokenizers_file
from ..models.qwen3 import Qwen3Backbone, Qwen3Config
from . import data
from .common import EMA, Log, adamw, lr_at, optimize, run_summary, save_json, setup
from .diffusion import flip_bits, flow_loss, init_head, init_linear_embed
from .text_tokenizer import build_text_tokenizer, save_text_tokenizer

DEMO_LLM = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, rope_theta=10000.0, max_position_embeddings=4096)
DEMO_HEAD = dict(ch_target=32, ch_latent=128, depth_latent=2, depth_adanln=1, parallel_num=4, use_swiglu=True,
                 time_shift=1.0, P_mean=0.0, P_std=1.0)
TRAIN = dict(size=32, uncond_prob=0.1, perturb_rate=0.1, diff_batch_mul=2)


class T2IModel(torch.nn.Module):
    """The three trained parts together (the tokenizer is frozen and kept apart)."""

    def __init__(self, llm: Qwen3Config, head: HeadConfig, z_channels: int):
        super().__init__()
        self.backbone = Qwen3Backbone(llm)
        self.head = DiffusionHead(head)
        self.projector = Projector(z_channels, llm.hidden_size)


class PromptBatcher:
    """Token ids of every (label, template) prompt, cached, and left-padded batches of them."""

    def __init__(self, codec: PromptCodec, lat: int, parallel_num: int):
        self.codec = codec
        self.prefix = codec.image_prefix(lat, lat, parallel_num)
        self.uncond = codec.encode(UNCOND_PROMPT) + self.prefix
        self.cond = [[codec.encode(COND_TEMPLATE.format(prompt=data.prompt(d, t))) + self.prefix
                      for t in range(len(data.TEMPLATES))] for d in range(10)]

    def rows(self, labels, templates, dropped) -> list[list[int]]:
        return [self.uncond if u else self.cond[d][t] for d, t, u in zip(labels.tolist(), templates.tolist(), dropped.tolist())]


def sequence_inputs(rows: list[list[int]], n_img: int, P: int):
    """Left-padded ids [B, L], RoPE positions [B, L + n_img], bool mask [B, 1, T, T] (T = L + n_img)."""
    L = max(map(len, rows))
    pads = torch.tensor([L - len(r) for r in rows])
    ids = torch.tensor([[0] * (L - len(r)) + r for r in rows])
    T = L + n_img
    ar = torch.arange(T)
    pos = (ar[None, :] - pads[:, None]).clamp_min(0)
    # blocks: -1 - i before the first block (causal), then 0, 1, ... every P tokens from L - P on
    block = torch.where(ar < L - P, -1 - ar, (ar - (L - P)) // P)
    visible = (ar[None, :] <= ar[:, None]) | ((block[:, None] == block[None, :]) & (block[:, None] >= 0))
    valid = ar[None, :] >= pads[:, None]  # [B, T] keys that are not padding
    mask = visible[None] & valid[:, None, :]
    mask |= torch.eye(T, dtype=torch.bool)[None]  # padding rows see themselves
    return ids, pos, mask[:, None], L


def training_loss(model: T2IModel, rows, tokens: torch.Tensor, pos_table: torch.Tensor, cfg: dict) -> torch.Tensor:
    P = model.head.config.parallel_num
    B, N, C = tokens.shape
    ids, positions, mask, L = sequence_inputs(rows, N - P, P)
    img = model.projector(flip_bits(tokens[:, :-P], cfg["perturb_rate"])) + pos_table[:N - P]
    x = torch.cat([model.backbone.embed(ids), img], dim=1)
    hidden = model.backbone(x, positions, None, 0, mask)[:, L - P:] + pos_table
    m = cfg["diff_batch_mul"]
    cond = hidden.reshape(-1, P, hidden.shape[-1]).repeat(m, 1, 1)
    target = tokens.reshape(-1, P, C).repeat(m, 1, 1)
    hc = model.head.config
    return flow_loss(model.head.net, target, cond, hc.P_mean, hc.P_std, hc.time_shift)


def train_t2i(out: str, ae: BinaryAutoencoder, seed: int = 0, steps: int = 2000, batch: int = 64, lr: float = 1e-3,
              ema_decay: float = 0.999, shifts: int = 4, threads: int = 2) -> tuple[T2IModel, dict]:
    """Trains on the training split and writes the official T2I folder to `out`."""
    gen = setup(seed, threads)
    size, P = TRAIN["size"], DEMO_HEAD["parallel_num"]
    lat = size // ae.downsample
    ps = int(round(P ** 0.5))
    tok = build_text_tokenizer(P)
    save_text_tokenizer(tok, out)
    codec = from_tokenizers_file(os.path.join(out, "tokenizer.json"))
    batcher = PromptBatcher(codec, lat, P)
    llm = Qwen3Config(vocab_size=tok.get_vocab_size(), **DEMO_LLM)
    head = HeadConfig(ch_cond=llm.hidden_size, **DEMO_HEAD)

    images, labels = data.load_digits_8x8()
    (train, train_y), _ = data.split(images, labels)
    px = data.to_pixels(torch.from_numpy(train), size)
    px = torch.cat([px] + [data.augment(px, gen, max_shift=1) for _ in range(shifts)])
    ys = torch.from_numpy(train_y).repeat(shifts + 1)
    with torch.no_grad():
        bits = torch.cat([ae.encode(px[i:i + 256]) for i in range(0, len(px), 256)])
    tokens = raster_to_blocks(bits, ps)  # [N, lat*lat, 32] in generation order
    pos_table = sincos_2d_blocks(llm.hidden_size, lat, lat, ps)

    model = T2IModel(llm, head, ae.config.z_channels)
    init_linear_embed(model.backbone)
    init_linear_embed(model.projector)
    init_head(model.head.net)
    model.train()
    ema = EMA(model, ema_decay)
    opt = adamw(model, lr, weight_decay=0.01, no_decay=("embed_tokens", "projector"))
    log = Log("t2i", steps)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=100)
        idx = torch.randint(0, len(tokens), (batch,), generator=gen)
        templates = torch.randint(0, len(data.TEMPLATES), (batch,), generator=gen)
        dropped = torch.rand(batch, generator=gen) < TRAIN["uncond_prob"]
        rows = batcher.rows(ys[idx], templates, dropped)
        loss = training_loss(model, rows, tokens[idx], pos_table, TRAIN)
        optimize(opt, model, ema, loss)
        log.step(step, loss=loss.item())
    summary = run_summary(log, seed=seed, steps=steps, batch=batch, lr=lr, ema=ema_decay, shifts=shifts)
    save_t2i(ema.model, ae, out)
    save_json(os.path.join(out, "train_t2i.json"), summary)
    print(f"[t2i] {summary['seconds']:.0f} s wall, {summary['cpu_seconds']:.0f} s cpu", flush=True)
    return ema.model, summary


def _save(module: torch.nn.Module, path: str, skip: tuple[str, ...] = ()) -> None:
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items() if k not in skip}, path)


def save_t2i(model: T2IModel, ae: BinaryAutoencoder, folder: str) -> None:
    """The official folder: config.json + model.safetensors (Qwen3, `model.*`; embeddings tied, so no
    lm_head), ae_config.json + ae.safetensors, vision_head_config.json + vision_head.safetensors,
    projector.safetensors. tokenizer.json and tokenizer_config.json are written before training."""
    from .tokenizer import save_tokenizer

    c = model.backbone.config
    save_json(os.path.join(folder, "config.json"), {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": None, "eos_token_id": None, "dtype": "float32", "head_dim": c.head_dim, "hidden_act": "silu",
        "hidden_size": c.hidden_size, "initializer_range": 0.02, "intermediate_size": c.intermediate_size,
        "layer_types": ["full_attention"] * c.num_hidden_layers, "max_position_embeddings": c.max_position_embeddings,
        "max_window_layers": c.num_hidden_layers, "model_type": "qwen3", "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers, "num_key_value_heads": c.num_key_value_heads,
        "rms_norm_eps": c.rms_norm_eps, "rope_scaling": None, "rope_theta": c.rope_theta, "sliding_window": None,
        "tie_word_embeddings": True, "use_cache": True, "use_sliding_window": False, "vocab_size": c.vocab_size})
    _save(model.backbone, os.path.join(folder, "model.safetensors"))
    h = model.head.config
    save_json(os.path.join(folder, "vision_head_config.json"), {k: getattr(h, k) for k in HeadConfig._JSON_KEYS})
    _save(model.head, os.path.join(folder, "vision_head.safetensors"))
    _save(model.projector, os.path.join(folder, "projector.safetensors"))
    save_tokenizer(ae, folder)
