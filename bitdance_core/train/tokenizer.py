"""Training the binary tokenizer (the engine's BinaryAutoencoder) on the digits.

The latent is sign(encoder(x)), trained with a straight-through estimator, and two terms from
upstream's lookup-free quantiser (imagenet_gen/src/gfq.py): an entropy term over groups of 8 bits
(each token's 32 bits as 4 codebooks of 256 codes: confident per token, every code used across the
batch) and a commitment term pulling the encoder output towards its signs.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..models.ae_layers import AutoencoderConfig
from ..models.autoencoder import BinaryAutoencoder
from . import data
from .common import Log, adamw, lr_at, save_json, setup

# 32 px digits -> a 4x4 grid of 32-bit tokens (downsample 2**(len(ch_mult)-1) = 8).
DEMO_AE = AutoencoderConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=32)


def sign_ste(h: torch.Tensor) -> torch.Tensor:
    """±1 forward (sign, with 0 -> -1 as the engine's encode), identity gradient."""
    q = torch.where(h > 0, torch.ones_like(h), -torch.ones_like(h))
    return h + (q - h).detach()


def entropy_terms(h: torch.Tensor, group_bits: int = 8, temperature: float = 0.01, eps: float = 1e-5):
    """(per-token entropy, codebook entropy) of the soft code assignment, as upstream's entropy_loss.

    h [B, C, H, W] -> tokens split into C/group_bits codebooks; logits = 2 <x, code> for every ±1 code."""
    b, c, hh, ww = h.shape
    x = h.permute(0, 2, 3, 1).reshape(-1, c // group_bits, group_bits)
    codes = torch.arange(2 ** group_bits, device=h.device)
    book = (((codes[:, None] >> torch.arange(group_bits, device=h.device)) & 1) * 2 - 1).to(h.dtype)
    logits = 2 * x @ book.T / temperature
    probs = logits.softmax(-1)
    per_token = -(probs * (logits + eps).log_softmax(-1)).sum(-1).mean()
    avg = probs.reshape(-1, probs.shape[-1]).mean(0)
    codebook = -(avg * (avg + eps).log()).sum()
    return per_token, codebook


def init_autoencoder(ae: BinaryAutoencoder) -> BinaryAutoencoder:
    """Adaptive norms start as plain GroupNorm (scale 1, shift 0)."""
    for m in ae.decoder.adaptive:
        nn.init.zeros_(m.gamma.weight), nn.init.ones_(m.gamma.bias)
        nn.init.zeros_(m.beta.weight), nn.init.zeros_(m.beta.bias)
    return ae


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two image batches in [-1, 1], over the uint8 range."""
    a8 = torch.clamp(127.5 * a + 128.0, 0, 255).floor()
    b8 = torch.clamp(127.5 * b + 128.0, 0, 255).floor()
    mse = ((a8 - b8) ** 2).mean().item()
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))


@torch.no_grad()
def roundtrip_psnr(ae: BinaryAutoencoder, pixels: torch.Tensor) -> float:
    return psnr(ae.decode(ae.encode(pixels)), pixels)


def train_tokenizer(out: str, seed: int = 0, steps: int = 800, batch: int = 48, lr: float = 2e-3,
                    w_entropy: float = 0.02, w_commit: float = 0.25, size: int = 32,
                    cfg: AutoencoderConfig = DEMO_AE, threads: int = 2) -> BinaryAutoencoder:
    """Trains on the training split, writes out/ae_config.json + out/ae.safetensors, returns the model."""
    gen = setup(seed, threads)
    images, labels = data.load_digits_8x8()
    (train, _), (held, _) = data.split(images, labels)
    train_px = data.to_pixels(torch.from_numpy(train), size)
    held_px = data.to_pixels(torch.from_numpy(held), size)

    ae = init_autoencoder(BinaryAutoencoder(cfg)).train()
    opt = adamw(ae, lr, weight_decay=0.0)
    log = Log("tokenizer", steps)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=50)
        idx = torch.randint(0, len(train_px), (batch,), generator=gen)
        x = data.augment(train_px[idx], gen)
        h = ae.encoder(x)
        rec = ae.decoder(sign_ste(h))
        l_rec = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        per_token, codebook = entropy_terms(h)
        l_commit = F.mse_loss(h, torch.sign(h).detach())
        loss = l_rec + w_entropy * (per_token - codebook) + w_commit * l_commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.step(step, rec=l_rec.item(), ent=per_token.item(), code_ent=codebook.item(), commit=l_commit.item())

    ae.eval()
    seconds, cpu = log.elapsed(), log.cpu()
    held_psnr = roundtrip_psnr(ae, held_px)
    train_psnr = roundtrip_psnr(ae, train_px[:300])
    print(f"[tokenizer] {seconds:.0f} s; round-trip PSNR held-out {held_psnr:.2f} dB, train {train_psnr:.2f} dB", flush=True)
    save_tokenizer(ae, out)
    save_json(os.path.join(out, "train_tokenizer.json"),
              {"seed": seed, "steps": steps, "batch": batch, "lr": lr, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
               "psnr_heldout_db": round(held_psnr, 2), "psnr_train_db": round(train_psnr, 2),
               "threads": torch.get_num_threads(), "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    return ae


def save_tokenizer(ae: BinaryAutoencoder, folder: str) -> None:
    """The official T2I file pair: ae_config.json + ae.safetensors (bare encoder.* / decoder.* keys)."""
    os.makedirs(folder, exist_ok=True)
    save_json(os.path.join(folder, "ae_config.json"), ae.config.to_json())
    save_file({k: v.detach().contiguous() for k, v in ae.state_dict().items()}, os.path.join(folder, "ae.safetensors"))
