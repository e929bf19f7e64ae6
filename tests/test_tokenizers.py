"""Binary tokenizers: ae-tiny round trip, GAN decoders (d32c128 shapes, seeded noise), .pt/.safetensors loading, tiling."""
import json
import os

import numpy as np
import pytest
import torch

from bitdance_core import BitDanceError, load_tokenizer, to_uint8
from bitdance_core.models.ae_layers import AutoencoderConfig
from bitdance_core.models.autoencoder import BinaryAutoencoder, build_autoencoder, config_from_shapes
from bitdance_core.formats.checkpoints import expected_shapes
from paths import FIXTURES, official_keys

AE_TINY = os.path.join(FIXTURES, "ae-tiny")
IMAGENET = os.path.join(FIXTURES, "imagenet-tiny-p4")
needs_ae = pytest.mark.skipif(not os.path.isdir(AE_TINY), reason="shared/fixtures/ae-tiny not present")


pytestmark = pytest.mark.usefixtures("one_thread")


def fx(name):
    return torch.from_numpy(np.load(os.path.join(AE_TINY, name)))


@needs_ae
@pytest.mark.parametrize("path", ["", "ae.safetensors"])
def test_ae_tiny_round_trip(path):
    ae = load_tokenizer(os.path.join(AE_TINY, path) if path else AE_TINY)
    assert ae.downsample == 16 and ae.config.z_channels == 32 and not ae.config.gan_decoder
    bits = ae.encode(fx("input_image.npy"))
    assert torch.equal(bits, fx("encode_bits.npy"))
    assert (ae.decode(bits) - fx("decode_of_encode_bits.npy")).abs().max() <= 1e-5
    assert (ae.decode(fx("random_bits.npy")) - fx("decode_of_random_bits.npy")).abs().max() <= 1e-5
    assert ae.encode(ae.decode(bits)).shape == bits.shape
    with pytest.raises(BitDanceError, match="divide by the tokenizer's factor 16"):
        ae.encode(torch.zeros(1, 3, 100, 64))
    with pytest.raises(BitDanceError, match=r"bits must be \[B, 32, h, w\]"):
        ae.decode(torch.ones(1, 16, 4, 4))
    with pytest.raises(BitDanceError, match=r"bits \[0, 32, 4, 4\] hold no tokens"):
        ae.decode(torch.ones(0, 32, 4, 4))


@needs_ae
def test_config_read_from_shapes_when_no_config_file(tmp_path):
    """A bare ae_*.safetensors without its _config.json: the ddconfig comes from the tensor shapes."""
    import shutil

    dst = tmp_path / "ae_tiny.safetensors"
    shutil.copy(os.path.join(AE_TINY, "ae.safetensors"), dst)
    ae = load_tokenizer(str(dst))
    want = AutoencoderConfig.from_json(json.load(open(os.path.join(AE_TINY, "ae_config.json"))))
    assert ae.config == want
    assert (ae.decode(fx("random_bits.npy")) - fx("decode_of_random_bits.npy")).abs().max() <= 1e-5


@pytest.mark.skipif(not os.path.isdir(IMAGENET), reason="shared/fixtures/imagenet-tiny-p4 not present")
@pytest.mark.parametrize("name", ["vae.pt", "model.pt"])
def test_imagenet_tokenizer_pt(name):
    """ae_d16c32.pt layout ({'state_dict': ...}) and the vae.* weights inside a whole ImageNet checkpoint."""
    ae = load_tokenizer(os.path.join(IMAGENET, name))
    assert ae.config.z_channels == 32 and ae.downsample == 16
    tokens = torch.from_numpy(np.load(os.path.join(IMAGENET, "case1_cfg4_linear", "tokens.npy")))
    ref = np.load(os.path.join(IMAGENET, "case1_cfg4_linear", "image.npy")).astype(int)
    diff = np.abs(to_uint8(ae.decode(tokens)).numpy().astype(int) - ref)
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.01  # contiguous weights: ~150 values one level off
    # the official path (channels_last) matches on the CPU the fixture was made on (AVX2); other
    # CPUs round float32 differently, so a few values may be one level off there
    official = np.abs(to_uint8(ae.to(memory_format=torch.channels_last).decode(tokens)).numpy().astype(int) - ref)
    assert official.max() <= 1 and (official > 0).mean() <= 0.001, int((official > 0).sum())


# ---- released GAN / plain tokenizers at their real shapes -------------------------------------------------

KEYS = official_keys()


@pytest.mark.parametrize("section,z,gan,ch,mult", [("ae_d32c128", 128, True, 128, (1, 1, 2, 2, 4, 8)),
                                                   ("ae_d32c256", 256, True, 128, (1, 1, 2, 2, 4, 8)),
                                                   ("t2i_ae", 32, False, 256, (1, 1, 2, 2, 4))])
def test_released_tokenizer_shapes(section, z, gan, ch, mult):
    cfg = config_from_shapes(KEYS[section], section)
    assert (cfg.z_channels, cfg.gan_decoder, cfg.ch, cfg.ch_mult, cfg.num_res_blocks) == (z, gan, ch, mult, 4)
    assert cfg.downsample == (32 if gan else 16)
    ae = build_autoencoder(cfg)
    assert all(t.device.type == "meta" for t in ae.state_dict().values())
    assert expected_shapes(ae) == KEYS[section]
    if gan:
        assert KEYS[section]["decoder.conv_in.weight"][1] == 2 * z  # bits + the noise block


def _random_gan_tokenizer(folder, seed=0):
    """A small GAN-decoder tokenizer (d32c128's structure, narrower) saved as ae_x.safetensors + ae_x_config.json."""
    from safetensors.torch import save_file

    cfg = AutoencoderConfig(ch=32, ch_mult=(1, 1, 2, 2, 4, 8), num_res_blocks=1, z_channels=16, gan_decoder=True)
    torch.manual_seed(seed)
    ae = BinaryAutoencoder(cfg)
    with torch.no_grad():
        for name, p in ae.named_parameters():
            if ".adaptive." in name and ".gamma." in name:  # keep the random decoder well-conditioned
                p.mul_(0.05)
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(folder / "ae_x.safetensors"))
    (folder / "ae_x_config.json").write_text(json.dumps(cfg.to_json()))
    return str(folder / "ae_x.safetensors")


def test_gan_decoder_is_deterministic_for_a_seed(tmp_path):
    ae = load_tokenizer(_random_gan_tokenizer(tmp_path))
    assert ae.config.gan_decoder and ae.downsample == 32
    g = torch.Generator().manual_seed(11)
    bits = torch.randint(0, 2, (2, 16, 3, 5), generator=g).float() * 2 - 1
    a = ae.decode(bits, generator=torch.Generator().manual_seed(5))
    b = ae.decode(bits, generator=torch.Generator().manual_seed(5))
    c = ae.decode(bits, generator=torch.Generator().manual_seed(6))
    assert a.shape == (2, 3, 96, 160)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3  # the noise matters
    chunked = ae.decode(bits, generator=torch.Generator().manual_seed(5), chunk=1)
    assert (chunked - a).abs().max() <= 1e-5  # one noise draw for the whole batch, sliced per chunk
    # The noise is torch.randn of the bits' shape from the generator, concatenated after the bits.
    noise = torch.randn(bits.shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(ae.decoder(bits, noise=noise), a)
    # Same seed through the tokenizer's .pt / shapes-only loading path gives the same pixels.
    torch.save({"state_dict": ae.state_dict()}, tmp_path / "ae_y.pt")
    again = load_tokenizer(str(tmp_path / "ae_y.pt"))
    assert again.config == ae.config
    assert torch.equal(again.decode(bits, generator=torch.Generator().manual_seed(5)), a)


# ---- tiled decoding -----------------------------------------------------------------------------------------

@needs_ae
def test_tiled_decode_matches_whole_decode():
    ae = load_tokenizer(AE_TINY)
    g = torch.Generator().manual_seed(0)
    low = torch.randn(2, 32, 4, 12, generator=g)  # structured bits, so tiles differ in their statistics
    bits = torch.where(torch.nn.functional.interpolate(low, size=(16, 48), mode="bilinear") > 0, 1.0, -1.0)
    whole = ae.decode(bits)
    for tile in (128, 200, 256):
        tiled = ae.decode(bits, tile=tile)
        assert tiled.shape == whole.shape == (2, 3, 256, 768)
        assert (tiled - whole).abs().max() <= 2e-5, tile  # float rounding only
        u8 = (to_uint8(tiled).int() - to_uint8(whole).int()).abs()
        assert u8.max() <= 1 and (u8 > 0).float().mean() <= 1e-3
    assert torch.equal(ae.decode(bits, tile=4096), whole)  # one tile: the plain path
    with pytest.raises(BitDanceError, match="tile"):
        ae.decode(bits, tile=0)


def test_tiled_decode_gan_same_noise(tmp_path):
    ae = load_tokenizer(_random_gan_tokenizer(tmp_path, seed=1))
    bits = torch.randint(0, 2, (1, 16, 6, 10), generator=torch.Generator().manual_seed(2)).float() * 2 - 1
    whole = ae.decode(bits, generator=torch.Generator().manual_seed(7))
    tiled = ae.decode(bits, generator=torch.Generator().manual_seed(7), tile=64)
    assert (tiled - whole).abs().max() <= 2e-5
