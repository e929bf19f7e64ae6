"""The official tokenizer's order of operations (docs: bitdance-reference.md, 4a.1), written here as plain
functions over our modules' weights, to check our dtype flow against the official one under CUDA's
bf16 autocast.

explicit=True spells autocast's rules out (what the CPU tests need: the CPU's autocast keeps group_norm
in bf16, where CUDA's runs it in float32):
- conv2d and linear cast their inputs (and weights) to bf16 and compute in bf16;
- group_norm casts to float32 and returns float32 (`gn_dtype` bf16 gives a plain bf16 model instead);
- everything else (swish, the sums, the adaptive scale and shift) runs in its inputs' promoted dtype.
explicit=False calls the plain ops, for a caller inside a real torch.autocast("cuda") (tests/gpu).
"""
import torch
import torch.nn.functional as F

from bitdance_core.models.ae_layers import depth_to_space_dcr

BF = torch.bfloat16


def swish(x):
    return x * torch.sigmoid(x)


class Autocast:
    """The upstream forward with CUDA bf16 autocast's rules (see the module doc)."""

    def __init__(self, gn_dtype=torch.float32, explicit: bool = True):
        self.gn_dtype, self.explicit = gn_dtype, explicit

    def _cast(self, t, dtype):
        return t if t is None or not self.explicit else t.to(dtype)

    def conv(self, m, x):
        return F.conv2d(self._cast(x, BF), self._cast(m.weight, BF), self._cast(m.bias, BF), m.stride, m.padding)

    def linear(self, m, x):
        return F.linear(self._cast(x, BF), self._cast(m.weight, BF), self._cast(m.bias, BF))

    def group_norm(self, m, x):
        return F.group_norm(self._cast(x, self.gn_dtype), m.num_groups, self._cast(m.weight, self.gn_dtype),
                            self._cast(m.bias, self.gn_dtype), m.eps)

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
