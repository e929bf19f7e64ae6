"""The tokenizer's linear preview (models/linear_preview.py): fitted from the decoder alone, it shows
what the tokens draw (real digits' tokens are recognised by the digit classifier), it is the
least-squares map it claims to be, and the same seed fits the same map."""
import os

import numpy as np
import pytest
import torch

from bitdance_core import demo_models as dm
from bitdance_core import load_tokenizer, to_uint8
from bitdance_core.errors import BitDanceError
from bitdance_core.models.ae_layers import AutoencoderConfig
from bitdance_core.models.autoencoder import BinaryAutoencoder
from bitdance_core.models import linear_preview as lp
from bitdance_core.models.linear_preview import LinearPreview, _features, _patches, fit_linear_preview
from bitdance_core.train import data
from bitdance_core.train.evaluate import recognition
from paths import fixture_dirs
from test_tokenizers import _random_gan_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
PER_CLASS = 20


@pytest.fixture(scope="module")
def demo_tokenizer():
    return load_tokenizer(dm.T2I)


@pytest.fixture(scope="module")
def held_out_digits():
    """PER_CLASS held-out real digits of each class, classes 0..9 in order, as [-1, 1] pixels."""
    images, labels = data.load_digits_8x8()
    _, (ink, lab) = data.split(images, labels)
    order = np.concatenate([np.flatnonzero(lab == c)[:PER_CLASS] for c in range(10)])
    return data.to_pixels(torch.from_numpy(ink[order]), dm.SIZE)


@pytest.fixture
def small_fits(monkeypatch):
    """Fewer, smaller random grids per fit: for the tests that check a fit runs, not what it draws
    (a 32x downsampling tokenizer decodes 512x512 pixels a grid at the real settings)."""
    monkeypatch.setattr(lp, "GRID_SIDE", 4)
    monkeypatch.setattr(lp, "SAMPLES_PER_FEATURE", 2)


def _as_conv(solution, z):
    """A least-squares solution [z*9 + 1, c*f*f] as LinearPreview's (weight, bias)."""
    return solution[:-1].T.reshape(-1, z, 3, 3).float(), solution[-1].float()


def _psnr(a, b):
    return float(10 * torch.log10(4 / (a.clamp(-1, 1) - b.clamp(-1, 1)).pow(2).mean()))


@torch.no_grad()
def test_the_preview_shows_what_the_tokens_draw(demo_tokenizer, held_out_digits):
    """Fitted on random bits only, the preview of real digits' tokens is recognised nearly as well as
    their decode, and sits far nearer the decode than the decodes' mean picture does."""
    ae = demo_tokenizer
    bits = ae.encode(held_out_digits)
    decoded = ae.decode(bits)
    preview = ae.linear_preview()(bits)
    assert preview.shape == decoded.shape and preview.dtype == torch.float32
    clf = data.digit_classifier(dm.SIZE)
    seen, decoded_seen = (recognition(to_uint8(x).numpy(), PER_CLASS, clf) for x in (preview, decoded))
    print(f"\nrecognised: preview {seen['overall']:.3f} (worst {seen['worst']:.2f}), decode {decoded_seen['overall']:.3f}; "
          f"PSNR to the decode: preview {_psnr(preview, decoded):.1f} dB, "
          f"mean picture {_psnr(decoded.mean(0, keepdim=True).expand_as(decoded), decoded):.1f} dB")
    assert seen["overall"] >= 0.9 and seen["overall"] >= decoded_seen["overall"] - 0.05, seen
    mean_picture = decoded.mean(0, keepdim=True).expand_as(decoded)
    assert _psnr(preview, decoded) >= _psnr(mean_picture, decoded) + 3.0
    # the decode-encode round of the random bits is worth it: nearer the decode than a fit on the
    # random bits themselves, and not far from a map of the same form fitted on real digits' tokens
    on_random = fit_linear_preview(ae.decode, 32, ae.downsample)(bits)
    images, labels = data.load_digits_8x8()
    (train, _), _ = data.split(images, labels)
    real = ae.encode(data.to_pixels(torch.from_numpy(train[:1000]), dm.SIZE))
    x, y = _features(real.double()), _patches(ae.decode(real).double(), ae.downsample)
    on_real = LinearPreview(*_as_conv(torch.linalg.lstsq(x, y).solution, 32), ae.downsample)(bits)
    near = {name: _psnr(p, decoded) for name, p in (("ours", preview), ("random", on_random), ("real", on_real))}
    print("PSNR to the decode of maps fitted on: " + ", ".join(f"{k} {v:.1f} dB" for k, v in near.items()))
    assert near["ours"] >= near["random"] + 1.0 and near["ours"] >= near["real"] - 5.0, near
    assert ae.linear_preview() is ae.linear_preview()  # fitted once per tokenizer


@torch.no_grad()
def test_the_map_is_the_least_squares_fit_it_claims(demo_tokenizer):
    """The convolution + depth-to-space applies the solved map (a token's 3x3 window of bits, then 1)
    exactly, and its error on the fitted decodes is orthogonal to every feature (normal equations)."""
    ae, f = demo_tokenizer, demo_tokenizer.downsample
    preview = fit_linear_preview(ae.decode, 32, f, seed=3)
    bits = torch.randint(0, 2, (2, 32, 5, 7), generator=torch.Generator().manual_seed(9)).float() * 2 - 1
    solution = torch.cat([preview.weight.reshape(preview.weight.shape[0], -1).T, preview.bias[None]]).double()
    by_features = _features(bits.double()) @ solution  # [tokens, 3*f*f]
    by_conv = _patches(preview(bits).double(), f)
    assert torch.allclose(by_conv, by_features.clamp(-1, 1), atol=1e-5)
    # the fit's own random grids, drawn again: the solution satisfies its ridge normal equations,
    # X^T (y - X s) = ridge * s, so nothing linear in the window is left in the error
    grids = -(-lp.SAMPLES_PER_FEATURE * solution.shape[0] // lp.GRID_SIDE ** 2)
    drawn = torch.randint(0, 2, (grids, 32, lp.GRID_SIDE, lp.GRID_SIDE), generator=torch.Generator().manual_seed(3))
    lhs = torch.zeros_like(solution)
    for grid in drawn.float() * 2 - 1:
        x, y = _features(grid[None].double()), _patches(ae.decode(grid[None]).double(), f)
        lhs += x.T @ (y - x @ solution)
    ridge = lp.RIDGE * grids * lp.GRID_SIDE ** 2
    assert torch.allclose(lhs, ridge * solution, atol=1e-3 * ridge * solution.abs().max())


@torch.no_grad()
def test_a_seed_fits_one_map_and_a_gan_decoder_is_fitted_too(tmp_path, demo_tokenizer, small_fits):
    a = fit_linear_preview(demo_tokenizer.decode, 32, 8, seed=1, encode=demo_tokenizer.encode)
    b = fit_linear_preview(demo_tokenizer.decode, 32, 8, seed=1, encode=demo_tokenizer.encode)
    c = fit_linear_preview(demo_tokenizer.decode, 32, 8, seed=2, encode=demo_tokenizer.encode)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)
    gan = load_tokenizer(_random_gan_tokenizer(tmp_path))  # z=16, f=32; its noise is averaged over by the fit
    bits = torch.randint(0, 2, (1, 16, 2, 3), generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    preview = gan.linear_preview()(bits)
    assert preview.shape == (1, 3, 64, 96) and torch.isfinite(preview).all()
    assert preview.std() > 0


@torch.no_grad()
def test_a_uniwetok_tokenizer_has_a_preview_too(small_fits):
    """UniWeTok (a BinaryAutoencoder with a decoder of its own, noise included) fits one as well."""
    tok = load_tokenizer(os.path.join(fixture_dirs("uniwetok")[0], "uniwetok.pt"))
    bits = torch.randint(0, 2, (1, tok.config.z_channels, 2, 3), generator=torch.Generator().manual_seed(0)) * 2.0 - 1
    preview = tok.linear_preview()(bits)
    assert preview.shape == (1, 3, 2 * tok.downsample, 3 * tok.downsample) and preview.std() > 0


@torch.no_grad()
def test_a_tokenizer_of_other_channel_counts_is_fitted(small_fits):
    """Grey-scale pixels (out_ch 1) and a narrow latent: the map has as many outputs as the decoder."""
    torch.manual_seed(0)
    grey = BinaryAutoencoder(AutoencoderConfig(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, z_channels=4, in_channels=1,
                                               out_ch=1))
    preview = grey.linear_preview()
    assert preview.weight.shape == (1 * 4 * 4, 4, 3, 3)
    assert preview(torch.ones(2, 4, 3, 5)).shape == (2, 1, 12, 20)


def test_bits_of_another_tokenizer_are_refused(demo_tokenizer):
    preview = LinearPreview(torch.zeros(3 * 64, 32, 3, 3), torch.zeros(3 * 64), 8)
    with pytest.raises(BitDanceError, match=r"bits must be \[B, 32, h, w\].*got \[1, 16, 4, 4\]"):
        preview(torch.ones(1, 16, 4, 4))
