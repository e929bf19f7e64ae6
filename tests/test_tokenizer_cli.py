"""The tokenizer CLI on the official ae-tiny fixture (and any other ae-* fixtures): encode bits
identical, decode within 1e-4."""
import os

import numpy as np
import pytest

from paths import fixture_dirs, run_cli

AE_FIXTURES = fixture_dirs("ae-")


def cli(*args):
    return run_cli("tokenizer", *args, timeout=300)


@pytest.mark.parametrize("fx", AE_FIXTURES, ids=[os.path.basename(f) for f in AE_FIXTURES])
def test_encode_decode_through_cli(fx, tmp_path):
    bits = tmp_path / "bits.npy"
    r = cli("encode", "--model", fx, "--image-npy", os.path.join(fx, "input_image.npy"), "--bits-npy", str(bits), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    got, want = np.load(bits), np.load(os.path.join(fx, "encode_bits.npy"))
    assert got.shape == want.shape and got.dtype == np.float32
    assert (got == want).all(), f"{(got != want).sum()} bits differ"
    for src, ref in (("encode_bits.npy", "decode_of_encode_bits.npy"), ("random_bits.npy", "decode_of_random_bits.npy")):
        out = tmp_path / f"dec_{src}"
        r = cli("decode", "--model", fx, "--bits-npy", os.path.join(fx, src), "--pixels-npy", str(out), "--device", "cpu")
        assert r.returncode == 0, r.stderr
        d = np.load(out)
        assert d.shape == np.load(os.path.join(fx, ref)).shape and d.dtype == np.float32
        assert np.abs(d - np.load(os.path.join(fx, ref))).max() <= 1e-4


def test_tiled_decode_flag(tmp_path):
    fx = AE_FIXTURES[0]
    out = tmp_path / "tiled.npy"
    r = cli("decode", "--model", fx, "--bits-npy", os.path.join(fx, "random_bits.npy"), "--pixels-npy", str(out),
            "--tile", "128", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert np.abs(np.load(out) - np.load(os.path.join(fx, "decode_of_random_bits.npy"))).max() <= 1e-4


def test_tokenizer_file_form_and_bad_inputs(tmp_path):
    fx = AE_FIXTURES[0]
    # a BitDance-Tokenizer style file: ae_<name>.safetensors + ae_<name>_config.json beside it
    os.symlink(os.path.join(fx, "ae.safetensors"), tmp_path / "ae_tiny.safetensors")
    os.symlink(os.path.join(fx, "ae_config.json"), tmp_path / "ae_tiny_config.json")
    bits = tmp_path / "b.npy"
    r = cli("encode", "--model", str(tmp_path / "ae_tiny.safetensors"), "--image-npy", os.path.join(fx, "input_image.npy"),
            "--bits-npy", str(bits), "--device", "cpu")
    assert r.returncode == 0 and (np.load(bits) == np.load(os.path.join(fx, "encode_bits.npy"))).all()
    np.save(tmp_path / "odd.npy", np.zeros((1, 3, 100, 64), np.float32))
    r = cli("encode", "--model", fx, "--image-npy", str(tmp_path / "odd.npy"), "--bits-npy", str(bits), "--device", "cpu")
    assert r.returncode == 2 and "image size 100x64 must divide by the tokenizer's factor 16" in r.stderr
    np.save(tmp_path / "wrongc.npy", np.ones((1, 8, 4, 4), np.float32))
    r = cli("decode", "--model", fx, "--bits-npy", str(tmp_path / "wrongc.npy"), "--pixels-npy", str(tmp_path / "x.npy"), "--device", "cpu")
    assert r.returncode == 2 and "bits must be [B, 32, h, w]" in r.stderr and "[1, 8, 4, 4]" in r.stderr
    r = cli("decode", "--model", str(tmp_path / "nope"), "--bits-npy", str(bits), "--pixels-npy", str(tmp_path / "x.npy"))
    assert r.returncode == 2 and "nope" in r.stderr
