"""Training a class-conditional BitDance (the ImageNet parallel model, `model_parallel.py` recipe) on the digits.

The model is the engine's own `ImageNetModel`, so the weights saved here load with `load_imagenet`
(strictly, `{'ema': state_dict}` with `vae.*` keys, config.json beside it). Sequence, as upstream:
[class tokens x K | query tokens x (P-1) | proj_in(bits of blocks 0 .. S-2)], block-causal; the
outputs at the last class token, the queries and every image token but the last block, plus
pos_for_diff, condition the diffusion head on blocks 0 .. S-1.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..models.autoencoder import BinaryAutoencoder
from ..models.imagenet import ImageNetModel, apply_rope
from ..models.imagenet_config import ImageNetConfig
from ..models.positions import raster_to_blocks
from . import data
from .common import EMA, Log, adamw, lr_at, optimize, run_summary, save_json, setup
from .diffusion import drop_labels, flip_bits, flow_loss, init_head, init_linear_embed

# Constructor arguments of upstream BitDance (model_parallel.py), as config.json records them.
DEMO_KWARGS = dict(dim=128, n_layer=4, n_head=2, diff_layers=2, diff_dim=128, diff_adanln_layers=1, latent_dim=32,
                   down_size=8, patch_size=1, resolution=32, diff_batch_mul=2, grad_checkpointing=False,
                   cls_token_num=4, num_classes=10, class_dropout_prob=0.1, drop_rate=0.0, perturb_schedule="constant",
                   perturb_rate=0.1, perturb_rate_max=0.3, time_schedule="logit_normal", time_shift=1.0,
                   P_std=1.0, P_mean=0.0, parallel_num=4, parallel_mode="patch")
_ARCH = ("dim", "n_layer", "n_head", "diff_layers", "diff_dim", "diff_adanln_layers", "latent_dim", "down_size",
         "patch_size", "resolution", "cls_token_num", "num_classes", "parallel_num", "parallel_mode", "time_shift")


def model_config(kwargs: dict, ae: BinaryAutoencoder) -> ImageNetConfig:
    cfg = ImageNetConfig(**{k: kwargs[k] for k in _ARCH}, ae=ae.config)
    cfg.validate("demo config")
    return cfg


def block_causal_mask(cfg: ImageNetConfig) -> torch.Tensor:
    """bool [1, 1, T, T] (True = may attend): causal over the first K-1 class tokens, then blocks of P
    (the last class token with the queries, then each block of image tokens) that see themselves and
    everything before (upstream get_block_causal_mask)."""
    T = cfg.grid * cfg.grid + cfg.cls_token_num - 1
    i = torch.arange(T)
    block = torch.where(i < cfg.cls_token_num - 1, -1 - i, (i - (cfg.cls_token_num - 1)) // cfg.parallel_num)
    causal = i[None, :] <= i[:, None]
    same = (block[:, None] == block[None, :]) & (block[:, None] >= 0)
    return (causal | same)[None, None]


def encode_dataset(ae: BinaryAutoencoder, pixels: torch.Tensor, cfg: ImageNetConfig) -> torch.Tensor:
    """Images -> ±1 tokens [N, h*w, 32] in generation (block) order."""
    with torch.no_grad():
        bits = torch.cat([ae.encode(pixels[i:i + 256]) for i in range(0, len(pixels), 256)])
    return raster_to_blocks(bits, cfg.block_side)


def backbone_forward(model: ImageNetModel, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The whole sequence at once (no cache): what `ImageNetModel.forward_tokens` computes step by step."""
    rope = model.rope(x.device)[:x.shape[1]]
    x = model.emb_norm(x)
    for layer in model.layers:
        a = layer.attention
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, a.n_head, a.head_dim) for t in a.wqkv(layer.attention_norm(x)).chunk(3, dim=-1))
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        x = x + a.wo(out.transpose(1, 2).reshape(b, n, a.dim))
        x = x + layer.feed_forward(layer.ffn_norm(x))
    return model.norm(x)


def training_loss(model: ImageNetModel, tokens: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                  kw: dict) -> torch.Tensor:
    cfg = model.config
    B, N, P, K = tokens.shape[0], tokens.shape[1], cfg.parallel_num, cfg.cls_token_num
    inp = flip_bits(tokens, kw["perturb_rate"])
    y = drop_labels(labels, cfg.num_classes, kw["class_dropout_prob"])
    seq = torch.cat([model.cls_embedding(y).view(B, K, cfg.dim), model.query_token.expand(B, -1, -1),
                     model.proj_in(inp[:, :-P])], dim=1)
    hidden = backbone_forward(model, seq, mask)[:, -N:] + model.pos_for_diff.weight
    m = kw["diff_batch_mul"]
    cond = hidden.reshape(-1, P, cfg.dim).repeat(m, 1, 1)
    target = tokens.reshape(-1, P, cfg.token_dim).repeat(m, 1, 1)
    return flow_loss(model.head.net, target, cond, kw["P_mean"], kw["P_std"], kw["time_shift"])


def new_model(cfg: ImageNetConfig, ae: BinaryAutoencoder) -> ImageNetModel:
    model = ImageNetModel(cfg)
    init_linear_embed(model)
    with torch.no_grad():
        model.query_token.normal_(std=0.02)
    init_head(model.head.net)
    model.vae.load_state_dict(ae.state_dict())
    model.vae.requires_grad_(False).eval()
    return model


def train_classcond(out: str, ae: BinaryAutoencoder, seed: int = 0, steps: int = 2000, batch: int = 64,
                    lr: float = 1e-3, ema_decay: float = 0.999, shifts: int = 4, kwargs: dict | None = None,
                    threads: int = 2) -> ImageNetModel:
    """Trains on the training split (each image plus `shifts` shifted copies), saves out/model.pt
    ({'ema': state_dict}) and out/config.json."""
    kw = dict(DEMO_KWARGS, **(kwargs or {}))
    gen = setup(seed, threads)
    cfg = model_config(kw, ae)
    images, labels = data.load_digits_8x8()
    (train, train_y), _ = data.split(images, labels)
    px = data.to_pixels(torch.from_numpy(train), cfg.resolution)
    px = torch.cat([px] + [data.augment(px, gen, max_shift=1) for _ in range(shifts)])
    ys = torch.from_numpy(train_y).repeat(shifts + 1)
    tokens = encode_dataset(ae, px, cfg)

    model = new_model(cfg, ae).train()
    model.vae.eval()
    ema = EMA(model, ema_decay)
    opt = adamw(model, lr, weight_decay=0.01, no_decay=("proj_in", "cls_embedding", "query_token"))
    mask = block_causal_mask(cfg)
    log = Log("classcond", steps)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=100)
        idx = torch.randint(0, len(tokens), (batch,), generator=gen)
        loss = training_loss(model, tokens[idx], ys[idx], mask, kw)
        optimize(opt, model, ema, loss)
        log.step(step, loss=loss.item())
    summary = run_summary(log, seed=seed, steps=steps, batch=batch, lr=lr, ema=ema_decay, shifts=shifts)
    save_classcond(ema.model, kw, out)
    save_json(os.path.join(out, "train_classcond.json"), summary)
    print(f"[classcond] {summary['seconds']:.0f} s wall, {summary['cpu_seconds']:.0f} s cpu", flush=True)
    return ema.model


def save_classcond(model: ImageNetModel, kwargs: dict, folder: str) -> None:
    """The released ImageNet layout: model.pt = {'ema': full state dict incl. vae.*}, config.json beside it
    (upstream constructor arguments under "kwargs", as the official fixture records them)."""
    os.makedirs(folder, exist_ok=True)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save({"ema": sd}, os.path.join(folder, "model.pt"))
    ae = model.vae.config.to_json()["ddconfig"]
    save_json(os.path.join(folder, "config.json"),
              {"module": "imagenet_gen/src/model_parallel.py", "cls": "BitDance", "kwargs": dict(kwargs, trained_vae=""),
               "vae_ddconfig": ae, "vae_num_codebooks": 4,
               "note": "BitDance demo: class-conditional handwritten digits (classes 0-9), 32 px; "
                       "trained by `python -m bitdance_core.train`"})
