"""The tokenizer in bf16 computes as the official one does: bf16 weights under CUDA's bf16 autocast.

The reference below is the upstream module code (modeling/vision_encoder/autoencoder.py) written as
functions, with autocast's rules made explicit, because the CPU's autocast puts group_norm on its
bf16 list where CUDA's puts it on the float32 list:
- conv2d and linear cast their inputs to bf16 and compute in bf16;
- group_norm casts to float32 and returns float32;
- everything else (swish, the sums, the adaptive scale and shift) runs in its inputs' promoted dtype;
- the decoder gets the sampler's float32 tokens (its style statistics and GAN noise are float32).
"""
import os

import pytest
import torch
import torch.nn.functional as F

from bitdance_core import load_tokenizer, to_uint8
from bitdance_core.models.ae_layers import depth_to_space_dcr
from paths import FIXTURES
from test_tokenizers import _random_gan_tokenizer

AE_TINY = os.path.join(FIXTURES, "ae-tiny")
BF = torch.bfloat16

pytestmark = pytest.mark.usefixtures("one_thread")


class Autocast:
    """CUDA bf16 autocast's rules for the ops the tokenizer uses; `gn_dtype` bf16 gives the flow of a
    plain bf16 model instead (no autocast), which this test must tell apart."""

    def __init__(self, gn_dtype=torch.float32):
        self.gn_dtype = gn_dtype

    def conv(self, m, x):
        return F.conv2d(x.to(BF), m.weight.to(BF), None if m.bias is None else m.bias.to(BF), m.stride, m.padding)

    def linear(self, m, x):
        return F.linear(x.to(BF), m.weight.to(BF), None if m.bias is None else m.bias.to(BF))

    def group_norm(self, m, x):
        w = None if m.weight is None else m.weight.to(self.gn_dtype)
        b = None if m.bias is None else m.bias.to(self.gn_dtype)
        return F.group_norm(x.to(self.gn_dtype), m.num_groups, w, b, m.eps)

    def resblock(self, blk, x):
        residual = x
        x = self.conv(blk.conv1, swish(self.group_norm(blk.norm1, x)))
        x = self.conv(blk.conv2, swish(self.group_norm(blk.norm2, x)))
        if blk.nin_shortcut is not None:
            residual = self.conv(blk.nin_shortcut, residual)
        return x + residual

    def decode(self, dec, z, noise=None):
        style = z.clone()
        if noise is not None:
            z = torch.cat([z, noise], dim=1)
        z = self.conv(dec.conv_in, z)
        for blk in dec.mid_block:
            z = self.resblock(blk, z)
        for i in reversed(range(len(dec.up))):
            ada = dec.adaptive[i]
            b, c = z.shape[:2]
            scale = self.linear(ada.gamma, (style.flatten(2).var(dim=-1) + ada.eps).sqrt()).view(b, c, 1, 1)
            bias = self.linear(ada.beta, style.flatten(2).mean(dim=-1)).view(b, c, 1, 1)
            z = scale * self.group_norm(ada.gn, z) + bias
            for blk in dec.up[i].block:
                z = self.resblock(blk, z)
            if i > 0:
                z = depth_to_space_dcr(self.conv(dec.up[i].upsample.conv1, z), 2)
        return self.conv(dec.conv_out, swish(self.group_norm(dec.norm_out, z)))

    def encode(self, enc, x):
        x = self.conv(enc.conv_in, x)
        for level in enc.down:
            for blk in level.block:
                x = self.resblock(blk, x)
            if hasattr(level, "downsample"):
                x = self.conv(level.downsample, x)
        for blk in enc.mid_block:
            x = self.resblock(blk, x)
        h = self.conv(enc.conv_out, swish(self.group_norm(enc.norm_out, x)))
        one = torch.ones((), dtype=h.dtype)
        return torch.where(h > 0, one, -one)


def swish(x):
    return x * torch.sigmoid(x)


def _smooth_image(seed, size=128):
    img = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
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
    decode's norms in bf16, 44% of these pixels were off and 6% by 2 to 6 levels)."""
    ae = load_tokenizer(AE_TINY, dtype=BF)
    low = torch.randn(2, 32, 4, 12, generator=torch.Generator().manual_seed(0))
    bits = torch.where(F.interpolate(low, size=(16, 48), mode="bilinear") > 0, 1.0, -1.0)
    whole = ae.decode(bits)
    for tile in (64, 128):
        u8 = (to_uint8(ae.decode(bits, tile=tile)).int() - to_uint8(whole).int()).abs()
        off, off2 = u8.gt(0).float().mean().item(), u8.gt(1).float().mean().item()
        assert u8.max() <= 3 and off <= 0.2 and off2 <= 0.01, (tile, u8.max(), off, off2)
