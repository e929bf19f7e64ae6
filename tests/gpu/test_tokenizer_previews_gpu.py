"""What a live preview costs at 1024x1024 with the released tokenizer's shape (random weights, bf16; skipped
without a GPU). Prints one PREVIEW_COSTS line of seconds (no timing is asserted; the figures decide
nodes/progress.py's `auto` choice on consumer cards):
- whole: the decoder on the whole image (what `auto` and `taesd` run where it fits);
- tiled: the decoder in 256 px tiles whose states rest in CPU memory (`taesd` on a tight plan);
- fit: fitting the linear preview (once per load: decode, encode, decode of random grids);
- linear: one linear preview (`latent2rgb`, and `auto` on a tight plan), from bits on the GPU.
"""
import json
import time

import pytest
import torch

from bitdance_core.models.ae_layers import AutoencoderConfig
from bitdance_core.models.autoencoder import BinaryAutoencoder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
RELEASED = AutoencoderConfig(ch=256, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=4, z_channels=32)  # ae.safetensors


def _seconds(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, out


@torch.no_grad()
def test_preview_costs_at_1024_with_the_released_tokenizer_shape():
    torch.manual_seed(0)
    with torch.device("cuda"):
        ae = BinaryAutoencoder(RELEASED).to(torch.bfloat16).eval()
    for name, p in ae.named_parameters():
        if ".adaptive." in name and ".gamma." in name:  # keep the random decoder's values finite
            p.mul_(0.05)
    bits = (torch.randint(0, 2, (1, 32, 64, 64), device="cuda") * 2 - 1).float()
    ae.decode(bits[..., :16, :16])  # warm-up (kernel selection)
    torch.cuda.reset_peak_memory_stats()
    whole_s, whole = _seconds(lambda: ae.decode(bits))
    whole_peak = torch.cuda.max_memory_allocated()
    tiled_s, tiled = _seconds(lambda: ae.decode(bits, tile=256))
    fit_s, preview = _seconds(lambda: ae.linear_preview("cuda"))
    linear_s, pixels = _seconds(lambda: preview(bits))
    print("\nPREVIEW_COSTS " + json.dumps({"whole_s": whole_s, "tiled_s": tiled_s, "fit_s": fit_s, "linear_s": linear_s,
                                           "whole_peak_gib": whole_peak / 2 ** 30}))
    assert whole.shape == tiled.shape == pixels.shape == (1, 3, 1024, 1024)
    assert torch.isfinite(whole).all() and torch.isfinite(pixels).all()
    scale = whole.float().abs().max()
    assert (tiled.float() - whole.float()).abs().max() <= 0.05 * scale  # the same image up to bf16 rounding
