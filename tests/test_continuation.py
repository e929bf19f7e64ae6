"""Continuing an image (keep some blocks, generate the rest) on the official fixtures, float32 CPU.

The determinism contract: with the same seed, keeping the model's own bits from an unforced run
reproduces that run bit for bit, for any mask (a row mask, both checkerboards, one mask per image).
Kept blocks are the init bits exactly; the rest is deterministic and new; changing a kept block after
the last regenerated block changes no regenerated block.
"""
import json
import os
import pickle

import numpy as np
import pytest
import torch

from bitdance_core import BitDanceError, load_imagenet, load_t2i
from bitdance_core.models.sampler import SAMPLERS, skip_draws
from bitdance_core.pipelines import continuation
from paths import fixture_dirs, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

T2I_CASES = [(fx, c) for fx in fixture_dirs("t2i-") for c in sorted(os.listdir(fx))
             if os.path.isfile(os.path.join(fx, c, "params.json"))]
IMAGENET_CASES = [(fx, c) for fx in fixture_dirs("imagenet-") for c in sorted(os.listdir(fx))
                  if os.path.isfile(os.path.join(fx, c, "params.json"))]


def ids(cases):
    return [f"{os.path.basename(f)}/{c}" for f, c in cases]


def params(fixture, case):
    with open(os.path.join(fixture, case, "params.json")) as f:
        return json.load(f)


def fixture_tokens_raster(fixture, case, p):
    """The official tokens as [B, C, h, w] (the fixture stores them in generation order)."""
    tokens = np.load(os.path.join(fixture, case, "tokens.npy"))
    if tokens.ndim == 4:
        return torch.from_numpy(tokens)
    b, n, c = tokens.shape
    h, w = p["latent_grid_hw"]
    ps = p["patch_side_ps"]
    return torch.from_numpy(tokens.reshape(b, h // ps, w // ps, ps, ps, c).transpose(0, 5, 1, 3, 2, 4).reshape(b, c, h, w))


def checkerboard(rows, cols, parity):
    return (torch.arange(rows)[:, None] + torch.arange(cols)[None]) % 2 == parity


def masks(grid):
    """Keep the top half; the two checkerboards (one keeps block 0, one regenerates it)."""
    return {"top_half": continuation.keep_rows(grid, grid.lat_h // 2 // grid.block_h * grid.block_h),
            "checker_even": checkerboard(grid.rows, grid.cols, 0),
            "checker_odd": checkerboard(grid.rows, grid.cols, 1)}


_PIPES = {}


def t2i_pipe(fixture):
    if fixture not in _PIPES:
        _PIPES[fixture] = load_t2i(os.path.join(fixture, "model"), device="cpu", dtype=torch.float32)
    return _PIPES[fixture]


def imagenet_pipe(fixture):
    if fixture not in _PIPES:
        vae = os.path.join(fixture, "vae.pt")
        _PIPES[fixture] = load_imagenet(os.path.join(fixture, "model.pt"), vae=vae if os.path.isfile(vae) else None)
    return _PIPES[fixture]


def t2i_kwargs(p):
    return dict(height=p["height"], width=p["width"], steps=p["num_sampling_steps"], cfg=p["guidance_scale"],
                num_images=p["num_images"], seed=p["seed"])


def imagenet_kwargs(p):
    return dict(classes=p["cond"], steps=p["sample_steps"], cfg=p["cfg_scale"],
                cfg_schedule=p.get("cfg_schedule", "linear"), seed=p["seed"])


# ---- the determinism contract -----------------------------------------------------------------

@pytest.mark.parametrize("fixture,case", T2I_CASES, ids=ids(T2I_CASES))
def test_t2i_own_bits_kept_reproduce_the_run(fixture, case):
    p, pipe = params(fixture, case), t2i_pipe(fixture)
    ref = fixture_tokens_raster(fixture, case, p)
    kw = t2i_kwargs(p)
    assert torch.equal(pipe.generate(p["prompt"], **kw), ref)  # the unforced run is the official one
    grid = pipe.block_grid(p["height"], p["width"])
    for name, keep in masks(grid).items():
        out = pipe.generate(p["prompt"], init_bits=ref, keep=keep, **kw)
        assert torch.equal(out, ref), f"{name}: {int((out != ref).sum())} bits differ from the unforced run"


@pytest.mark.parametrize("fixture,case", IMAGENET_CASES, ids=ids(IMAGENET_CASES))
def test_imagenet_own_bits_kept_reproduce_the_run(fixture, case):
    """Including block 0 kept or not: at step 0 of the linear schedule the null-class rows sample on
    their own, and a kept block 0 must leave them their own samples."""
    p, net = params(fixture, case), imagenet_pipe(fixture)
    ref = fixture_tokens_raster(fixture, case, p)
    kw = imagenet_kwargs(p)
    assert torch.equal(net.generate(**kw), ref)
    for name, keep in masks(net.block_grid()).items():
        out = net.generate(init_bits=ref, keep=keep, **kw)
        assert torch.equal(out, ref), f"{name}: {int((out != ref).sum())} bits differ from the unforced run"


def test_one_mask_per_image_and_guidance_variants():
    fixture, case = next((f, c) for f, c in T2I_CASES if params(f, c)["num_images"] > 1)
    p, pipe = params(fixture, case), t2i_pipe(fixture)
    ref = fixture_tokens_raster(fixture, case, p)
    grid = pipe.block_grid(p["height"], p["width"])
    per_image = torch.stack([masks(grid)["top_half"], checkerboard(grid.rows, grid.cols, 1)])
    assert torch.equal(pipe.generate(p["prompt"], init_bits=ref, keep=per_image, **t2i_kwargs(p)), ref)
    net = imagenet_pipe(IMAGENET_CASES[0][0])
    for schedule, cfg in (("constant", 4.0), ("linear", 1.0), ("linear", 3.0)):
        run = net.generate([3, 7], steps=2, cfg=cfg, cfg_schedule=schedule, seed=5)
        keep = torch.stack([checkerboard(8, 8, 0), torch.zeros(8, 8, dtype=torch.bool)])
        again = net.generate([3, 7], steps=2, cfg=cfg, cfg_schedule=schedule, seed=5, init_bits=run, keep=keep)
        assert torch.equal(again, run), (schedule, cfg)


# ---- another image kept: exact, deterministic, new; causality --------------------------------------

def test_t2i_other_bits_kept_exact_deterministic_and_new():
    fixture, case = T2I_CASES[0]
    p, pipe = params(fixture, case), t2i_pipe(fixture)
    kw = dict(t2i_kwargs(p), seed=p["seed"] + 1)
    init = pipe.generate("a small wooden boat on a calm blue lake", **kw)
    grid = pipe.block_grid(p["height"], p["width"])
    keep = masks(grid)["top_half"]
    rows = grid.lat_h // 2
    a = pipe.generate(p["prompt"], init_bits=init, keep=keep, **kw)
    b = pipe.generate(p["prompt"], init_bits=init, keep=keep, **kw)
    assert torch.equal(a, b)
    assert torch.equal(a[..., :rows, :], init[..., :rows, :])
    assert (a[..., rows:, :] != init[..., rows:, :]).float().mean() > 0.2
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    # the top half of the prompt's own run is not what was kept, so the bottom continues something else
    own = pipe.generate(p["prompt"], **kw)
    assert not torch.equal(a[..., rows:, :], own[..., rows:, :])


@pytest.mark.parametrize("kind", ["t2i", "imagenet"])
def test_causality_kept_blocks_after_the_last_regenerated_one_change_nothing_before(kind):
    """Regenerate the top half, keep the bottom: the bottom comes after every regenerated block in
    generation order, so changing it changes no regenerated bit."""
    if kind == "t2i":
        fixture, case = T2I_CASES[0]
        p, pipe = params(fixture, case), t2i_pipe(fixture)
        grid = pipe.block_grid(p["height"], p["width"])

        def run(init, keep):
            return pipe.generate(p["prompt"], init_bits=init, keep=keep, **t2i_kwargs(p))
    else:
        fixture, case = IMAGENET_CASES[0]
        p, pipe = params(fixture, case), imagenet_pipe(fixture)
        grid = pipe.block_grid()

        def run(init, keep):
            return pipe.generate(init_bits=init, keep=keep, **imagenet_kwargs(p))
    init = fixture_tokens_raster(fixture, case, p)
    rows = grid.lat_h // 2
    keep = ~continuation.keep_rows(grid, rows)
    changed = init.clone()
    changed[..., rows:, :] = -changed[..., rows:, :]
    a, b = run(init, keep), run(changed, keep)
    assert torch.equal(a[..., :rows, :], b[..., :rows, :])
    assert torch.equal(a[..., rows:, :], init[..., rows:, :]) and torch.equal(b[..., rows:, :], changed[..., rows:, :])
    # ... while a kept block before a regenerated one does change what follows it
    keep_top = continuation.keep_rows(grid, rows)
    c, d = run(init, keep_top), run(-init, keep_top)
    assert not torch.equal(c[..., rows:, :], d[..., rows:, :])


# ---- the head is skipped for kept blocks, the generator advances the same -----------------------------

@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_skip_draws_advances_the_generator_as_a_sampler_call(sampler, cfg):
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 32)
    cond = torch.randn(2 if cfg > 1 else 1, 3, 8)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    SAMPLERS[sampler](lambda x, t, c: x + net(c), cond, cfg, 3, g1, x_dim=32)
    skip_draws(sampler, cond, cfg, 3, g2, x_dim=32)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_kept_blocks_skip_the_head_and_the_preview_shows_them():
    fixture, case = T2I_CASES[0]
    p, pipe = params(fixture, case), t2i_pipe(fixture)
    ref = fixture_tokens_raster(fixture, case, p)
    grid = pipe.block_grid(p["height"], p["width"])
    keep = masks(grid)["checker_even"]
    calls, seen = [], []
    inner = pipe.samplers["euler_maruyama"]
    pipe.samplers["euler_maruyama"] = lambda *a, **k: calls.append(1) or inner(*a, **k)
    try:
        out = pipe.generate(p["prompt"], init_bits=ref, keep=keep, callback=lambda s, t, b: seen.append(b.clone()),
                            **t2i_kwargs(p))
    finally:
        pipe.samplers["euler_maruyama"] = inner
    assert torch.equal(out, ref)
    assert len(calls) == int((~keep).sum()) == grid.steps // 2
    # after block 0 (kept): every kept block is shown already, the regenerated ones are 0 until drawn
    first = seen[0]
    shown = keep.repeat_interleave(grid.block_h, 0).repeat_interleave(grid.block_w, 1)
    assert torch.equal(first[..., shown], ref[..., shown]) and (first[..., ~shown] == 0).all()
    assert torch.equal(seen[-1], out)


# ---- masks and canvases --------------------------------------------------------------------------

GRID = continuation.BlockGrid(lat_h=8, lat_w=12, block_h=2, block_w=2, channels=32, downsample=16)  # 192x128 px


def test_keep_from_noise_mask_any_masked_pixel_regenerates_its_block():
    mask = torch.zeros(1, 1, 128, 192)  # ComfyUI's SetLatentNoiseMask layout, pixel resolution
    mask[0, 0, 40, 70] = 0.01  # one faint pixel: latent (2, 4) -> block (1, 2)
    mask[0, 0, 100:128, 150:192] = 1.0  # bottom-right corner: blocks rows 3, columns 4..5
    keep = continuation.keep_from_noise_mask(GRID, mask, 2)
    regen = torch.zeros(4, 6, dtype=torch.bool)
    regen[1, 2] = True
    regen[3, 4:] = True
    assert keep.shape == (2, 4, 6) and torch.equal(keep[0], ~regen) and torch.equal(keep[1], ~regen)
    # the same mask at latent resolution, and one per image
    latent = torch.zeros(2, 8, 12)
    latent[1, 7, 0] = 1
    keep = continuation.keep_from_noise_mask(GRID, latent, 2)
    assert keep[0].all() and not keep[1, 3, 0] and int((~keep[1]).sum()) == 1
    with pytest.raises(BitDanceError, match=r"noise mask: 100x100 does not fit the image, 192x128 px"):
        continuation.keep_from_noise_mask(GRID, torch.zeros(100, 100), 1)
    with pytest.raises(BitDanceError, match="3 masks for 2 images"):
        continuation.keep_from_noise_mask(GRID, torch.zeros(3, 128, 192), 2)


def test_keep_rows_and_keep_masks_are_checked():
    assert torch.equal(continuation.keep_rows(GRID, 4), torch.arange(4)[:, None].expand(4, 6) < 2)
    with pytest.raises(BitDanceError, match=r"keep rows 3: must be a multiple of the block height, 2 latent rows \(32 px\)"):
        continuation.keep_rows(GRID, 3)
    with pytest.raises(BitDanceError, match="keep rows 9"):
        continuation.keep_rows(GRID, 9)
    assert continuation.check_keep(GRID, np.ones((4, 6), dtype=np.int64), 3).shape == (3, 4, 6)
    with pytest.raises(BitDanceError, match=r"shape \[6, 4\] does not fit: expected \[4, 6\]"):
        continuation.check_keep(GRID, torch.ones(6, 4, dtype=torch.bool), 1)
    with pytest.raises(BitDanceError, match="values other than 0 and 1"):
        continuation.check_keep(GRID, torch.full((4, 6), 0.5), 1)


def test_extend_canvas_pads_bits_and_mask():
    bits = torch.ones(1, 32, 4, 6)
    out, regen = continuation.extend_canvas(bits, None, "bottom", 3)
    assert out.shape == (1, 32, 7, 6) and torch.equal(out[..., :4, :], bits) and (out[..., 4:, :] == 0).all()
    assert regen.shape == (1, 1, 7, 6) and (regen[..., :4, :] == 0).all() and (regen[..., 4:, :] == 1).all()
    # a mask already there (pixel resolution) is kept, the right side added
    old = regen.repeat_interleave(16, 2).repeat_interleave(16, 3)
    old[..., 0, 0] = 1
    out2, regen2 = continuation.extend_canvas(out, old, "right", 2)
    assert out2.shape == (1, 32, 7, 8) and regen2[0, 0, 0, 0] == 1 and regen2[0, 0, 0, 1] == 0
    assert (regen2[..., 6:] == 1).all() and (regen2[..., 4:, :] == 1).all() and int(regen2.sum()) == 1 + 3 * 6 + 7 * 2
    with pytest.raises(BitDanceError, match="side 'top'"):
        continuation.extend_canvas(bits, None, "top", 2)


def test_bad_init_inputs_are_named():
    fixture, case = T2I_CASES[0]
    p, pipe = params(fixture, case), t2i_pipe(fixture)
    kw = dict(t2i_kwargs(p), steps=1)
    ref = fixture_tokens_raster(fixture, case, p)
    grid = pipe.block_grid(p["height"], p["width"])
    keep = masks(grid)["top_half"]
    with pytest.raises(BitDanceError, match="16 channels, but this model's tokenizer makes 32: bits from another tokenizer"):
        pipe.generate(p["prompt"], init_bits=ref[:, :16], keep=keep, **kw)
    with pytest.raises(BitDanceError, match=r"init bits are 8x16 latent \(128x256 px\), but the generation is 256x256 px"):
        pipe.generate(p["prompt"], init_bits=ref[..., :8], keep=keep, **kw)
    with pytest.raises(BitDanceError, match="2 images for 3 to generate"):
        pipe.generate(p["prompt"], init_bits=torch.cat([ref, ref]), keep=keep, **dict(kw, num_images=3))
    with pytest.raises(BitDanceError, match="without a keep mask"):
        pipe.generate(p["prompt"], init_bits=ref, **kw)
    with pytest.raises(BitDanceError, match="without init bits"):
        pipe.generate(p["prompt"], keep=keep, **kw)
    with pytest.raises(BitDanceError, match="nothing to regenerate: every block of 256x256 px"):
        pipe.generate(p["prompt"], init_bits=ref, keep=torch.ones_like(keep), **kw)
    zeros = ref.clone()
    zeros[..., 4:8, 8:12] = 0  # block (1, 2): kept by the top-half mask
    with pytest.raises(BitDanceError, match=r"kept block \(row 1, column 2\) of image 0 holds values other than ±1"):
        pipe.generate(p["prompt"], init_bits=zeros, keep=keep, **kw)
    zeros[..., :8, :] = ref[..., :8, :]
    zeros[..., 8:, :] = 0  # regenerated blocks may hold anything: they are never read
    assert pipe.generate(p["prompt"], init_bits=zeros, keep=keep, **kw).shape == ref.shape


# ---- the command line ----------------------------------------------------------------------------

def t2i_cli(fixture, p, *extra):
    return run_cli("t2i", "--model", os.path.join(fixture, "model"), "--prompt", p["prompt"],
                   "--steps", str(p["num_sampling_steps"]), "--cfg", str(p["guidance_scale"]),
                   "--num-images", str(p["num_images"]), "--seed", str(p["seed"]), "--device", "cpu",
                   "--dtype", "float32", *extra)


def test_cli_t2i_own_tokens_kept_reproduce_the_official_run(tmp_path):
    fixture, case = T2I_CASES[0]
    p = params(fixture, case)
    ref = fixture_tokens_raster(fixture, case, p)
    np.save(tmp_path / "init.npy", ref.numpy())
    h, w = p["latent_grid_hw"]
    bs = p["patch_side_ps"]
    np.save(tmp_path / "checker.npy", checkerboard(h // bs, w // bs, 0).numpy())
    for name, option in (("top", ["--keep-rows", str(h // 2)]), ("checker", ["--keep-mask-npy", str(tmp_path / "checker.npy")])):
        out = tmp_path / f"{name}.npy"
        r = t2i_cli(fixture, p, "--init-tokens-npy", str(tmp_path / "init.npy"), *option, "--tokens-npy", str(out))
        assert r.returncode == 0, r.stderr[-3000:]
        got = np.load(out)
        assert got.shape == ref.shape and int((got != ref.numpy()).sum()) == 0, name


def test_cli_t2i_other_tokens_kept_and_outpainting(tmp_path):
    """Another image's tokens: the kept rows are those tokens exactly, the rest deterministic (the CLI
    equals the API) and new. An init smaller than --height is outpainted below it."""
    fixture, case = T2I_CASES[0]
    p = params(fixture, case)
    other = t2i_pipe(fixture).generate("a small wooden boat on a calm blue lake", **dict(t2i_kwargs(p), seed=7))
    np.save(tmp_path / "other.npy", other.numpy())
    h = p["latent_grid_hw"][0]
    out = tmp_path / "out.npy"
    r = t2i_cli(fixture, p, "--init-tokens-npy", str(tmp_path / "other.npy"), "--keep-rows", str(h // 2),
                "--tokens-npy", str(out), "--out", str(tmp_path / "out.png"))
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.from_numpy(np.load(out))
    assert torch.equal(got[..., : h // 2, :], other[..., : h // 2, :])
    assert (got[..., h // 2:, :] != other[..., h // 2:, :]).float().mean() > 0.2
    pipe = t2i_pipe(fixture)
    api = pipe.generate(p["prompt"], init_bits=other, keep=continuation.keep_rows(pipe.block_grid(p["height"], p["width"]), h // 2),
                        **t2i_kwargs(p))
    assert torch.equal(got, api)
    # outpaint: the 256-row init at the top of a 384-row image, the rest drawn after it
    tall = tmp_path / "tall.npy"
    r = t2i_cli(fixture, p, "--init-tokens-npy", str(tmp_path / "other.npy"), "--height", str(p["height"] + 128),
                "--tokens-npy", str(tall))
    assert r.returncode == 0, r.stderr[-3000:]
    tall = torch.from_numpy(np.load(tall))
    assert tall.shape[-2] == h + 8 and torch.equal(tall[..., :h, :], other)
    assert set(tall[..., h:, :].unique().tolist()) == {-1.0, 1.0}


def test_cli_t2i_init_image_is_encoded_with_the_models_tokenizer(tmp_path):
    from PIL import Image

    fixture, case = T2I_CASES[0]
    p = params(fixture, case)
    pixels = np.load(os.path.join(fixture, case, "image.npy"))[0]
    Image.fromarray(pixels).save(tmp_path / "init.png")
    out = tmp_path / "out.npy"
    r = t2i_cli(fixture, p, "--init-image", str(tmp_path / "init.png"), "--keep-rows", "4", "--tokens-npy", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    pipe = t2i_pipe(fixture)
    encoded = pipe.autoencoder.encode(torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1)
    got = torch.from_numpy(np.load(out))
    assert got.shape == (1, 32, p["height"] // 16, p["width"] // 16)
    assert torch.equal(got[..., :4, :], encoded[..., :4, :])


def test_init_image_is_read_as_shown_and_16_bit_gray_is_scaled(tmp_path):
    """--init-image: a photo with an EXIF orientation is turned as it is shown (as ComfyUI's LoadImage
    does); a 16-bit grayscale PNG is scaled from 0..65535 rather than clipped to white; a float image is
    refused by name."""
    from PIL import Image
    from bitdance_core.cli.continuation import read_image

    rng = np.random.default_rng(0)
    stored = rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)  # 64 wide, 32 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to show"
    Image.fromarray(stored).save(tmp_path / "phone.png", exif=exif)
    shown = read_image(str(tmp_path / "phone.png"))
    assert tuple(shown.shape) == (1, 3, 64, 32)
    expected = np.rot90(stored, k=-1)  # clockwise
    assert torch.equal(shown, torch.from_numpy(expected.astype(np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1)
    Image.fromarray(stored).save(tmp_path / "plain.png")
    assert tuple(read_image(str(tmp_path / "plain.png")).shape) == (1, 3, 32, 64)

    gray16 = rng.integers(0, 65536, (32, 32), dtype=np.uint16)
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    got = read_image(str(tmp_path / "gray16.png"))
    want = torch.from_numpy(gray16.astype(np.float32) / 65535.0)[None, None].expand(1, 3, 32, 32) * 2 - 1
    assert torch.allclose(got, want, atol=1e-6)
    assert (got < 0.99).float().mean() > 0.9  # not clipped to white

    Image.fromarray(rng.random((32, 32), dtype=np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(BitDanceError, match="float.tiff: a 32-bit float image"):
        read_image(str(tmp_path / "float.tiff"))


def test_cli_imagenet_own_tokens_kept_reproduce_the_official_run(tmp_path):
    fixture, case = IMAGENET_CASES[0]
    p = params(fixture, case)
    init = os.path.join(fixture, case, "tokens.npy")
    ref = np.load(init)
    grid = imagenet_pipe(fixture).block_grid()
    np.save(tmp_path / "checker.npy", checkerboard(grid.rows, grid.cols, 0).numpy())
    vae = ["--vae", os.path.join(fixture, "vae.pt")] if os.path.isfile(os.path.join(fixture, "vae.pt")) else []
    for name, option in (("top", ["--keep-rows", str(grid.lat_h // 2)]),
                         ("checker", ["--keep-mask-npy", str(tmp_path / "checker.npy")])):
        out = tmp_path / f"{name}.npy"
        r = run_cli("imagenet", "--checkpoint", os.path.join(fixture, "model.pt"), *vae,
                    "--classes", ",".join(str(c) for c in p["cond"]), "--steps", str(p["sample_steps"]),
                    "--cfg", str(p["cfg_scale"]), "--cfg-schedule", p.get("cfg_schedule", "linear"), "--seed", str(p["seed"]),
                    "--device", "cpu", "--dtype", "float32", "--init-tokens-npy", init, *option, "--tokens-npy", str(out))
        assert r.returncode == 0, r.stderr[-3000:]
        assert int((np.load(out) != ref).sum()) == 0, name


def test_cli_bad_inputs_say_what_is_wrong(tmp_path):
    fixture, case = T2I_CASES[0]
    p = params(fixture, case)
    ref = fixture_tokens_raster(fixture, case, p).numpy()
    np.save(tmp_path / "init.npy", ref)
    np.save(tmp_path / "half.npy", ref[:, :16])
    np.save(tmp_path / "mask.npy", np.ones((3, 3), dtype=bool))
    from PIL import Image
    Image.new("RGB", (100, 64)).save(tmp_path / "odd.png")
    np.save(tmp_path / "pixels.npy", np.full((1, 32, 32, 3), 200, dtype=np.uint8))  # a pixels array, not bits
    with open(tmp_path / "pickled.npy", "wb") as f:  # not an .npy at all: a pickle
        pickle.dump({"bits": ref}, f)
    np.save(tmp_path / "objects.npy", np.array([{"bits": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "empty.npy", ref[:, :, :0])
    init = ["--init-tokens-npy", str(tmp_path / "init.npy")]
    never_unpickled = "it holds pickled data or an object array, which are never loaded"
    cases = [
        (["--init-tokens-npy", str(tmp_path / "pixels.npy"), "--keep-rows", "4"],
         "bits must be ±1 float [B, C, h, w] (as `tokenizer encode` and --tokens-npy write them); got uint8 "
         "[1, 32, 32, 3] with values 200..200"),
        (["--init-tokens-npy", str(tmp_path / "half.npy"), "--keep-rows", "8"], "bits from another tokenizer"),
        (init + ["--keep-rows", "6"], "keep rows 6: must be a multiple of the block height, 4 latent rows (64 px)"),
        (init + ["--keep-mask-npy", str(tmp_path / "mask.npy")], "keep mask: shape [3, 3] does not fit: expected [4, 4]"),
        (init, "nothing to regenerate"),
        (["--keep-rows", "8"], "need the image to continue"),
        (init + ["--keep-rows", "8", "--height", "128"], "is larger than the generation"),
        (["--init-image", str(tmp_path / "odd.png"), "--keep-rows", "4"], "odd.png (100x64 px) does not fit this model"),
        (["--init-image", str(tmp_path / "missing.png"), "--keep-rows", "4"], "missing --init-image file"),
        (["--init-tokens-npy", str(tmp_path / "pickled.npy"), "--keep-rows", "4"], never_unpickled),
        (["--init-tokens-npy", str(tmp_path / "objects.npy"), "--keep-rows", "4"], never_unpickled),
        (init + ["--keep-mask-npy", str(tmp_path / "objects.npy")], never_unpickled),
        (["--init-tokens-npy", str(tmp_path / "empty.npy"), "--keep-rows", "4"],
         f"got an empty float32 array of shape [1, {ref.shape[1]}, 0, {ref.shape[3]}]"),  # not read as "no init size"
    ]
    for options, message in cases:
        r = t2i_cli(fixture, dict(p, num_sampling_steps=1), *options, "--tokens-npy", str(tmp_path / "never-written.npy"))
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (options, r.stderr[-1500:])
        assert "allow_pickle" not in r.stderr and "unsafely" not in r.stderr, r.stderr  # unpickling is never suggested
    assert not (tmp_path / "never-written.npy").exists()
