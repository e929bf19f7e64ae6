"""The tokenizer's bf16 dtype flow against the real CUDA autocast (skipped without a GPU).

The official pipeline decodes with bf16 weights under torch.autocast("cuda", bfloat16); the engine
casts by hand and runs no autocast. Here the upstream module code (tests/tokenizer_reference.py,
plain ops) runs under the real autocast, so CUDA's own op lists decide its dtypes, against the
engine's decode and encode on the same weights.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from bitdance_core import load_tokenizer, to_uint8
from paths import FIXTURES
from tokenizer_reference import Autocast

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
AE_TINY = os.path.join(FIXTURES, "ae-tiny")


def _off(a, b) -> tuple[int, float]:
    """(largest difference in uint8 levels, share of values that differ)."""
    d = (to_uint8(a).int() - to_uint8(b).int()).abs()
    return int(d.max()), float(d.gt(0).float().mean())


@torch.no_grad()
def test_bf16_tokenizer_computes_as_under_the_real_cuda_autocast():
    ae = load_tokenizer(AE_TINY, device="cuda", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    bits = (torch.randint(0, 2, (2, 32, 16, 16), generator=g).float() * 2 - 1).cuda()  # float32, as sampled
    with torch.autocast("cuda", dtype=torch.bfloat16):
        official = Autocast(explicit=False).decode(ae.decoder, bits)
    ours = ae.decode(bits)
    assert official.dtype == ours.dtype == torch.bfloat16
    # the same arithmetic, op for op: equal up to a kernel's own choices (reported if not exactly equal)
    most, share = _off(ours, official)
    assert most <= 1 and share <= 0.01, (most, share, torch.equal(ours, official))
    # what the check tells apart: a bf16 model without autocast's float32 norms
    plain = Autocast(gn_dtype=torch.bfloat16).decode(ae.decoder, bits)
    assert _off(plain, official)[1] > 0.05

    img = F.avg_pool2d(torch.rand(2, 3, 256, 256, generator=g) * 2 - 1, 9, 1, 4).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        official_bits = Autocast(explicit=False).encode(ae.encoder, img)
    assert (ae.encode(img) != official_bits).float().mean() <= 0.001


@torch.no_grad()
def test_bf16_decode_peak_against_the_planner():
    """The planner's decoder_peak for the bf16 flow (a float32 stream beside bf16 convolutions, the
    norms in parts), against torch.cuda's own count: never much below it (the plan would not hold),
    not far above (memory left unused). The CPU tests check the float32 figure only."""
    from bitdance_core.runtime.planner import decoder_peak, measure_peak

    ae = load_tokenizer(AE_TINY, device="cuda", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    bits = (torch.randint(0, 2, (2, 32, 32, 32), generator=g).float() * 2 - 1).cuda()  # 512x512
    ae.decode(bits)  # cuDNN's first call chooses its algorithms
    _, peak = measure_peak(lambda: ae.decode(bits), "cuda")
    planned = decoder_peak(ae.config, 2, 512, 512, 2)
    assert 0.9 <= planned / peak <= 1.5, (planned, peak)
