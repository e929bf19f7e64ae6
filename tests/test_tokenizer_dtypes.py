"""The tokenizer in bf16 computes as the official one does: bf16 weights under CUDA's bf16 autocast.

The reference is the upstream module code with autocast's rules spelled out (tests/tokenizer_reference.py;
on a GPU, tests/gpu/test_tokenizer_gpu.py checks the same against the real CUDA autocast). The decoder
gets the sampler's float32 tokens (its style statistics and GAN noise are float32).
"""
import os

import pytest
import torch
import torch.nn.functional as F

from bitdance_core import load_tokenizer, to_uint8
from paths import FIXTURES
from test_tokenizers import _random_gan_tokenizer
from tokenizer_reference import BF, Autocast

AE_TINY = os.path.join(FIXTURES, "ae-tiny")

pytestmark = pytest.mark.usefixtures("one_thread")


def _smooth_image(seed, size=128):
    img = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return F.avg_pool2d(img, 9, 1, 4)


@torch.no_grad()
def test_bf16_encode_and_decode_compute_as_the_official_autocast():
    ae = load_tokenizer(AE_TINY, dtype=BF)
    image = _smooth_image(0)
    bits = load_tokenizer(AE_TINY).encode(image)  # float32 tokens, as the sampler gives them
    official = Autocast().decode(ae.decoder, bits)
    ours = ae.decode(bits)
    assert ours.dtype == official.dtype == BF
    assert torch.equal(ours, official)
    assert torch.equal(ae.encode(image), Autocast().encode(ae.encoder, image))
    # what the test tells apart: a bf16 model without autocast's float32 norms gives other pixels
    plain = Autocast(gn_dtype=BF).decode(ae.decoder, bits)
    assert (to_uint8(plain).int() - to_uint8(official).int()).abs().gt(0).float().mean() > 0.05


@torch.no_grad()
def test_bf16_gan_decoder_computes_as_the_official_autocast(tmp_path):
    """The GAN decoder's noise is drawn in the tokens' float32 (upstream's randn_like) and rounded by conv_in."""
    ae = load_tokenizer(_random_gan_tokenizer(tmp_path, seed=1), dtype=BF)
    bits = torch.randint(0, 2, (1, 16, 3, 5), generator=torch.Generator().manual_seed(2)).float() * 2 - 1
    noise = torch.randn(bits.shape, generator=torch.Generator().manual_seed(7))
    ours = ae.decode(bits, generator=torch.Generator().manual_seed(7))
    assert torch.equal(ours, Autocast().decode(ae.decoder, bits, noise))


@torch.no_grad()
def test_bf16_tiled_decode_stays_next_to_the_whole_one():
    """The tiles' norms are float32 like the whole decode's, so in bf16 they differ from it only by
    the rounding of some conv inputs: a few pixels one level off, hardly any two (with the whole
    decode's norms in bf16, 45% of these pixels were off and 7% by 2 to 4 levels)."""
    ae = load_tokenizer(AE_TINY, dtype=BF)
    low = torch.randn(1, 32, 2, 4, generator=torch.Generator().manual_seed(0))
    bits = torch.where(F.interpolate(low, size=(8, 16), mode="bilinear") > 0, 1.0, -1.0)  # 128x256, small:
    whole = ae.decode(bits)  # bf16 convolutions are slow on CPUs without native bf16
    u8 = (to_uint8(ae.decode(bits, tile=64)).int() - to_uint8(whole).int()).abs()
    off, off2 = u8.gt(0).float().mean().item(), u8.gt(1).float().mean().item()
    assert u8.max() <= 3 and off <= 0.2 and off2 <= 0.01, (u8.max(), off, off2)


@pytest.mark.parametrize("dtype", [torch.float32, BF])
@pytest.mark.parametrize("shape,memory_format", [((2, 64, 16, 24), torch.contiguous_format),
                                                 ((2, 64, 16, 24), torch.channels_last),
                                                 ((1, 32, 3, 5), torch.contiguous_format)])
def test_norm_swish_in_parts_gives_the_whole_values(dtype, shape, memory_format):
    """norm_swish normalises a few groups at a time (memory): the values are those of one float32 group
    norm and swish over the whole activation, bit for bit on any CPU (parts too small to keep every
    value on the vectorised path, as the 3x5 grid here, are not split), in the input's memory format."""
    from bitdance_core.models.ae_layers import NORM_CHUNKS, group_norm_fp32, norm_swish

    g = torch.Generator().manual_seed(0)
    norm = torch.nn.GroupNorm(32, shape[1], eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(shape[1], generator=g) + 0.5)
        norm.bias.copy_(torch.randn(shape[1], generator=g))
    conv = torch.nn.Conv2d(shape[1], 8, 3, padding=1).to(dtype)
    x = (torch.randn(shape, generator=g) * 3 + 1).to(memory_format=memory_format)
    with torch.no_grad():
        whole = group_norm_fp32(norm, x)
        whole = (whole * torch.sigmoid(whole)).to(dtype)
        got = norm_swish(norm, x, conv)
    assert NORM_CHUNKS > 1 and got.dtype == dtype and got.is_contiguous(memory_format=memory_format)
    assert torch.equal(got, whole)
