"""The tokenizer CLI on the official ae-tiny fixture (and any other ae-* fixtures): encode bits
identical, decode within 1e-4."""
import os
import pickle

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


def cli_main(capsys, *argv):
    """`python -m bitdance_core tokenizer ARGV` in this process: (exit status, stderr)."""
    from bitdance_core.cli.main import main

    rc = main(["tokenizer", *argv, "--device", "cpu"])
    return rc, capsys.readouterr().err


def test_each_action_names_the_option_it_lacks_before_loading(tmp_path, capsys):
    fx = AE_FIXTURES[0]
    image, bits = os.path.join(fx, "input_image.npy"), os.path.join(fx, "random_bits.npy")
    for argv, why in ((["encode", "--image-npy", image], "tokenizer encode needs --bits-npy: where to write the bits"),
                      (["encode", "--bits-npy", str(tmp_path / "b.npy")],
                       "tokenizer encode needs --image-npy: the images to encode"),
                      (["decode", "--bits-npy", bits], "tokenizer decode needs --pixels-npy: where to write the images"),
                      (["decode", "--pixels-npy", str(tmp_path / "p.npy")],
                       "tokenizer decode needs --bits-npy: the bits to decode")):
        rc, err = cli_main(capsys, *argv, "--model", str(tmp_path / "no-tokenizer"))  # named before it is looked for
        assert rc == 2 and err == f"error: {why}\n", err
    assert not os.listdir(tmp_path)


def test_arrays_that_are_no_images_or_bits_are_refused_before_loading(tmp_path, capsys):
    """A pickle, an object array or an .npz is refused without unpickling (nor advice to); images must be
    float [B, 3, H, W] in [-1, 1], bits ±1 [B, C, h, w]: what is wrong and how to convert it is said."""
    fx = AE_FIXTURES[0]
    image, bits = np.load(os.path.join(fx, "input_image.npy")), np.load(os.path.join(fx, "random_bits.npy"))
    b, c, h, w = bits.shape
    pixels = np.round((image + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)  # as t2i --pixels-npy writes them
    with open(tmp_path / "pickled.npy", "wb") as f:
        pickle.dump({"image": image}, f)
    np.save(tmp_path / "objects.npy", np.array([{"bits": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "both.npz", image=image, bits=bits)
    arrays = {"pixels": pixels, "image255": (image + 1) * 127.5, "bits01": (bits > 0).astype(np.float32),
              "bool": bits > 0, "bits100": bits * 100, "nan": bits * np.nan}
    for name, arr in arrays.items():
        np.save(tmp_path / f"{name}.npy", arr)
    never = "it holds pickled data or an object array, which are never loaded"
    want_image = "images must be float [B, 3, H, W] with values in [-1, 1]; got "
    want_bits = "bits must be ±1 float [B, C, h, w] (as `tokenizer encode` and --tokens-npy write them); got "
    cases = [
        ("encode", "--image-npy", "pickled.npy", f"not an .npy array of numbers as np.save writes one ({never})"),
        ("encode", "--image-npy", "objects.npy", never),
        ("decode", "--bits-npy", "pickled.npy", never),
        ("decode", "--bits-npy", "both.npz", "an .npz archive; give one array as an .npy file (np.save)"),
        ("encode", "--image-npy", "pixels.npy", f"{want_image}uint8 {list(pixels.shape)} with values "
                                                f"{pixels.min()}..{pixels.max()}: convert with x.transpose(0, 3, 1, 2) / 127.5 - 1"),
        ("encode", "--image-npy", "image255.npy", f"{want_image}float32 {list(image.shape)} with values "),
        ("encode", "--image-npy", "image255.npy", ": convert with x / 127.5 - 1"),
        ("decode", "--bits-npy", "bits01.npy", f"{want_bits}float32 [{b}, {c}, {h}, {w}] with values 0..1: 0/1 bits? "
                                               f"convert with 2 * b - 1"),
        ("decode", "--bits-npy", "bool.npy", f"{want_bits}bool [{b}, {c}, {h}, {w}] with values 0..1"),
        ("decode", "--bits-npy", "bits100.npy", f"{want_bits}float32 [{b}, {c}, {h}, {w}] with values -100..100"),
        ("decode", "--bits-npy", "nan.npy", f"{want_bits}float32 [{b}, {c}, {h}, {w}] with NaN or infinite values"),
        ("decode", "--bits-npy", "pixels.npy", f"{want_bits}uint8 {list(pixels.shape)} with values "),
    ]
    for action, option, name, why in cases:
        other = "--bits-npy" if action == "encode" else "--pixels-npy"
        path = str(tmp_path / name)
        rc, err = cli_main(capsys, action, "--model", str(tmp_path / "no-tokenizer"), option, path,
                           other, str(tmp_path / "out.npy"))
        assert rc == 2 and err.startswith(f"error: {option} {path}: ") and why in err, (name, err)
        assert "allow_pickle" not in err and "unsafely" not in err, err  # unpickling is never suggested
    assert not (tmp_path / "out.npy").exists()
    # bits as a sampler writes them, rarely with a 0 where torch.sign met an exact 0, decode
    bits[0, 0, 0, 0] = 0
    np.save(tmp_path / "sampled.npy", bits)
    rc, err = cli_main(capsys, "decode", "--model", fx, "--bits-npy", str(tmp_path / "sampled.npy"), "--pixels-npy",
                       str(tmp_path / "out.npy"))
    assert rc == 0 and np.load(tmp_path / "out.npy").shape == image.shape, err


def test_tile_0_and_chunk_0_decode_whole(tmp_path):
    """--tile 0 is no tiling and --chunk 0 all images at once, as the ComfyUI Decode node's 0s."""
    fx = AE_FIXTURES[0]
    out = tmp_path / "tile0.npy"
    r = cli("decode", "--model", fx, "--bits-npy", os.path.join(fx, "random_bits.npy"), "--pixels-npy", str(out),
            "--tile", "0", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert np.abs(np.load(out) - np.load(os.path.join(fx, "decode_of_random_bits.npy"))).max() <= 1e-4
    # --chunk 0 is all images at once, as the node's images_at_once 0; a negative count is refused
    r = cli("decode", "--model", fx, "--bits-npy", os.path.join(fx, "random_bits.npy"), "--pixels-npy", str(out),
            "--chunk", "0", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert np.abs(np.load(out) - np.load(os.path.join(fx, "decode_of_random_bits.npy"))).max() <= 1e-4
    r = cli("decode", "--model", fx, "--bits-npy", os.path.join(fx, "random_bits.npy"), "--pixels-npy", str(out),
            "--chunk", "-1", "--device", "cpu")
    assert r.returncode == 2 and "argument --chunk: must be a number of images >= 1, or 0 for all at once" in r.stderr
