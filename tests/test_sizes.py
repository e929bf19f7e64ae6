"""The sizes a model offers (bitdance_core/sizes.py) are the sizes it makes: every offered size passes
the CLI's check and the pipeline's (what the AR Sampler node calls), for the digits demo model and for
a model in the 64x layout; a size it cannot make is refused naming the size asked for and the model's
sizes; only models with the official sizes warn about other sizes."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from bitdance_core import demo_models as dm
from bitdance_core import BitDanceError, describe_t2i, load_t2i
from bitdance_core.cli.main import main as cli_main
from bitdance_core.pipelines.prompts import PromptCodec
from bitdance_core.pipelines.sizes import OFFICIAL_SIZES, SizeRule, max_res_token
from bitdance_core.cli.synthetic import build_random_t2i, custom_shape, save_official_folder, write_tokenizer_json
from paths import run_cli

DEMO_SIZES = [(32, 32), (64, 32), (32, 64), (64, 64), (128, 64), (64, 128), (128, 128), (256, 128), (128, 256),
              (256, 256), (512, 256), (256, 512), (512, 512)]


@pytest.fixture(scope="module")
def model_64x(tmp_path_factory):
    """A tiny random model in the 64x layout: 64 tokens per step (8x8-token blocks), 16 px tokens,
    res tokens up to 256 (4096 px), written as an official folder."""
    folder = tmp_path_factory.mktemp("bitdance-64x")
    pipe = build_random_t2i(custom_shape("tiny", parallel=64), seed=5)
    save_official_folder(pipe, str(folder), write_tokenizer_json(str(folder / "tok.json"), 64))
    os.remove(folder / "tok.json")
    return str(folder)


def test_the_rule():
    demo = SizeRule(downsample=8, parallel_num=4, max_res=64)
    assert (demo.block_pixels, demo.max_side, demo.has_official_sizes) == (16, 512, False)
    assert demo.sizes == DEMO_SIZES and demo.reference_size == (512, 512)
    assert demo.summary() == "13 sizes from 32x32 to 512x512"
    released = SizeRule(downsample=16, parallel_num=64, max_res=256)
    assert released.has_official_sizes and released.sizes == OFFICIAL_SIZES and released.reference_size == (1024, 1024)
    assert released.summary() == "the 18 official sizes"
    # 16x with res tokens to 128 (the t2i-tiny-p16 fixture): every official size fits, so they are its presets
    assert SizeRule(16, 16, 128).sizes == OFFICIAL_SIZES
    # the largest side is whole blocks: res tokens to 100, 4-token blocks of 16 px -> 1600 px
    assert SizeRule(16, 16, 100).max_side == 1600 and not SizeRule(16, 16, 100).has_official_sizes
    def codec(tokens):
        return PromptCodec(str.split, {t: i for i, t in enumerate(tokens)}.get, "folder/tokenizer.json")
    assert max_res_token(codec(["<|res_1|>", "<|res_2|>", "<|res_3|>", "<|res_5|>"])) == 3
    with pytest.raises(BitDanceError, match=r"folder/tokenizer.json: the tokenizer has no <\|res_1\|> token"):
        max_res_token(codec(["<|im_start|>", "<|res_2|>"]))  # Qwen3's own tokenizer, say
    none = SizeRule(16, 64, 4)  # res tokens shorter than one 8-token block: no size at all, said clearly
    assert none.sizes == []
    for call in (lambda: none.reference_size, none.summary, lambda: none.check(128, 128)):
        with pytest.raises(BitDanceError, match="makes no image size: its tokenizer's res tokens reach 4 latent tokens"):
            call()


def _accepted_everywhere(folder: str, sizes, capsys):
    info = describe_t2i(folder)
    pipe = load_t2i(folder)
    assert pipe.supported_sizes == info.supported_sizes == list(sizes)
    for h, w in sizes:
        info.check_size(h, w)  # what the CLI checks before it loads the weights
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an offered size is no "not an official size" warning
            pipe.check_size(h, w)  # what generate() and the AR Sampler node check
        rc = cli_main(["t2i", "--model", folder, "--prompt", "a red fox", "--height", str(h), "--width", str(w),
                       "--device", "cpu", "--dry-run"])
        err = capsys.readouterr().err
        assert rc == 0 and f"{w}x{h} is {info.ar_steps(h, w)} AR steps" in err, err


def test_every_demo_size_is_accepted(capsys):
    _accepted_everywhere(dm.T2I, DEMO_SIZES, capsys)


def test_every_64x_size_is_accepted(model_64x, capsys):
    _accepted_everywhere(model_64x, OFFICIAL_SIZES, capsys)


@pytest.mark.parametrize("which,height,width", [("demo", 32, 32), ("demo", 512, 512), ("64x", 384, 640),
                                                ("64x", 1024, 256)])
def test_offered_sizes_make_images_through_the_cli(which, height, width, model_64x, tmp_path):
    """The smallest and largest demo sizes and two 64x ones, generated for real (1 step, no guidance)."""
    folder = dm.T2I if which == "demo" else model_64x
    out = tmp_path / "p.npy"
    r = run_cli("t2i", "--model", folder, "--prompt", "a handwritten digit seven", "--height", str(height),
                "--width", str(width), "--steps", "1", "--cfg", "1", "--device", "cpu", "--pixels-npy", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert np.load(out).shape == (1, height, width, 3)
    assert "not one of the official" not in r.stderr


@pytest.mark.parametrize("height,width,why", [
    (1024, 1024, "height 1024 px (asked for: width 1024, height 1024) is larger than its largest side, 512 px"),
    (32, 40, "width 40 px (asked for: width 40, height 32) is not a multiple of 16 px"),
])
def test_cli_size_error_names_the_size_asked_for(height, width, why, tmp_path):
    r = run_cli("t2i", "--model", dm.T2I, "--prompt", "a handwritten digit seven", "--height", str(height),
                "--width", str(width), "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "never-written.png"))
    assert r.returncode == 2
    assert why in r.stderr, r.stderr
    assert "digits-t2i makes sides that are multiples of 16 px from 16 to 512 px" in r.stderr
    assert "32x32, 32x64" in r.stderr and "512x512" in r.stderr
    assert "2048" not in r.stderr  # the old message doubled the size (16 px per token for every model)


def test_only_models_with_the_official_sizes_warn(model_64x):
    pipe = load_t2i(model_64x)
    with pytest.warns(UserWarning, match="128x128 is not one of the official BitDance sizes"):
        pipe.check_size(128, 128)
    demo = load_t2i(dm.T2I)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        demo.check_size(48, 48)  # any size the demo makes is fine: it has no official sizes
