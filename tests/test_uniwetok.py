"""UniWeTok (the 32x, 2^128-codebook binary tokenizer): every uniwetok* fixture (the public uniwetok-tiny and
any others beside it) through the CLI and the API against the official outputs, the EMA rule, the ddconfig
from a file or from the shapes, bad inputs; and a second small model built here with our own module
(another shape, non-square, batch 2) for the inference paths the fixtures cannot reach (chunks, tiles,
bf16 noise, batching, file recognition)."""
import dataclasses
import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch

from bitdance_core import BitDanceError, find_tokenizer_files, load_tokenizer
from bitdance_core.formats.checkpoints import expected_shapes
from bitdance_core.models.uniwetok import UniWeTok, UniWeTokConfig, decoder_centers, encoder_centers
from bitdance_core.pipelines.uniwetok_loading import (apply_ema, config_from_json, config_from_shapes, is_uniwetok_checkpoint,
                                            load_uniwetok)
from paths import FIXTURES as ALL_FIXTURES
from paths import fixture_dirs, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

FIXTURES = fixture_dirs("uniwetok")
IDS = [os.path.basename(f) for f in FIXTURES]
over_fixtures = pytest.mark.parametrize("fx", FIXTURES, ids=IDS)


def test_the_public_fixture_is_there():
    assert any(os.path.basename(f) == "uniwetok-tiny" for f in FIXTURES), f"no uniwetok-tiny in {ALL_FIXTURES}"


def arr(fx, name):
    return torch.from_numpy(np.load(os.path.join(fx, name)))


def decode_seed(fx) -> int:
    """The seed of torch.manual_seed(seed) right before each official decode (manifest.json; 1234 in the README)."""
    path = os.path.join(fx, "manifest.json")
    return json.load(open(path)).get("decode_seed", 1234) if os.path.isfile(path) else 1234


def ddconfig(fx) -> dict:
    return json.load(open(os.path.join(fx, "config.json")))["ddconfig"]


def raw_state(fx) -> dict:
    return torch.load(os.path.join(fx, "uniwetok.pt"), map_location="cpu", weights_only=True)["state_dict"]


def quiet_load(path, **kw):
    """Loaded with every warning an error: a fixture with its config must load silently."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_tokenizer(path, **kw)


# ---- the official outputs --------------------------------------------------------------------------------

@over_fixtures
def test_cli_encode_and_decode_match_the_official_outputs(fx, tmp_path):
    model, bits = os.path.join(fx, "uniwetok.pt"), tmp_path / "bits.npy"
    r = run_cli("tokenizer", "encode", "--model", model, "--image-npy", os.path.join(fx, "input_image.npy"),
                "--bits-npy", str(bits), "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    got, want = np.load(bits), np.load(os.path.join(fx, "encode_bits.npy"))
    assert got.dtype == np.float32 and got.shape == want.shape
    assert (got == want).all(), f"{(got != want).sum()} of {got.size} bits differ from the official encode"
    for src, ref in (("encode_bits.npy", "decode_of_encode_bits.npy"), ("random_bits.npy", "decode_of_random_bits.npy")):
        out = tmp_path / f"dec_{src}"
        r = run_cli("tokenizer", "decode", "--model", model, "--bits-npy", os.path.join(fx, src), "--pixels-npy", str(out),
                    "--seed", str(decode_seed(fx)), "--device", "cpu")
        assert r.returncode == 0, r.stderr[-3000:]
        d, want = np.load(out), np.load(os.path.join(fx, ref))
        assert d.dtype == np.float32 and d.shape == want.shape
        assert np.abs(d - want).max() <= 1e-4, f"{src}: max |diff| {np.abs(d - want).max()}"


@over_fixtures
def test_cli_tiled_decode_matches_the_official_output(fx, tmp_path):
    """The attention runs over the whole token grid before the tiled levels: tiles change only rounding."""
    out = tmp_path / "tiled.npy"
    r = run_cli("tokenizer", "decode", "--model", os.path.join(fx, "uniwetok.pt"), "--bits-npy",
                os.path.join(fx, "random_bits.npy"), "--pixels-npy", str(out), "--seed", str(decode_seed(fx)),
                "--tile", "32", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert np.abs(np.load(out) - np.load(os.path.join(fx, "decode_of_random_bits.npy"))).max() <= 1e-4


@over_fixtures
def test_api_matches_the_official_outputs_and_draws_the_official_noise(fx):
    tok = quiet_load(os.path.join(fx, "uniwetok.pt"))
    assert isinstance(tok, UniWeTok) and tok.downsample == 32 and tok.family.startswith("uniwetok-")
    img = arr(fx, "input_image.npy")
    if os.path.isfile(os.path.join(fx, "encoder_pre_sign.npy")):
        assert (tok.encoder(img) - arr(fx, "encoder_pre_sign.npy")).abs().max() <= 1e-5
    bits = tok.encode(img)
    assert torch.equal(bits, arr(fx, "encode_bits.npy"))
    seed = decode_seed(fx)
    # One draw per decode, before anything else, in the bits' shape and dtype: the fixture's logged noise
    # is torch.randn of that shape from a generator seeded with the seed, global or explicit alike.
    noise = torch.randn(bits.shape, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    assert torch.equal(torch.randn(bits.shape), noise)
    if os.path.isfile(os.path.join(fx, "decode_noise.npy")):
        assert torch.equal(arr(fx, "decode_noise.npy"), noise)
    for src, ref in (("encode_bits.npy", "decode_of_encode_bits.npy"), ("random_bits.npy", "decode_of_random_bits.npy")):
        b = arr(fx, src)
        explicit = tok.decode(b, generator=torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)
        global_rng = tok.decode(b)  # no generator: the global one, as the official decode
        assert torch.equal(explicit, global_rng)
        assert torch.equal(explicit, tok.decoder(b, noise=torch.randn(b.shape, generator=torch.Generator().manual_seed(seed))))
        assert (explicit - arr(fx, ref)).abs().max() <= 1e-4
    other = tok.decode(arr(fx, "random_bits.npy"), generator=torch.Generator().manual_seed(seed + 1))
    assert (other - arr(fx, "decode_of_random_bits.npy")).abs().max() > 1e-3  # the seed matters


def test_sign_maps_zero_to_minus_one():
    fx = FIXTURES[0]
    tok = quiet_load(os.path.join(fx, "uniwetok.pt"))
    z = tok.config.z_channels
    pre = torch.zeros(1, z, 2, 2)
    pre[0, 0, 0, 0], pre[0, 1, 0, 0] = 1e-7, -1e-7
    tok.encoder.forward = lambda image: pre  # the sign alone
    bits = tok.encode(torch.zeros(1, 3, 64, 64))
    assert bits[0, 0, 0, 0] == 1 and bits[0, 1, 0, 0] == -1
    assert (bits.flatten()[1:] == -1).all() and bits.flatten()[0] == 1  # every exact 0 -> -1


def test_rope_positions_differ_between_encoder_and_decoder():
    """The official grids: encoder arange(n)*(7/(n-1))+0.5, decoder (arange(n)+0.5)*(7.5/(n-0.5))."""
    for n in (2, 3, 8):
        i = np.arange(n, dtype=np.float64)
        assert np.allclose(encoder_centers(n, "cpu", torch.float32).numpy(), i * 7.0 / (n - 1) + 0.5, atol=1e-6)
        assert np.allclose(decoder_centers(n, "cpu", torch.float32).numpy(), (i + 0.5) * 7.5 / (n - 0.5), atol=1e-6)
    assert torch.isnan(encoder_centers(1, "cpu", torch.float32)).all()  # why a latent side of 1 is refused
    assert decoder_centers(1, "cpu", torch.float32).item() == 7.5


# ---- the EMA rule ---------------------------------------------------------------------------------------

def test_apply_ema_is_the_official_rule():
    state = {"a.b.c": 1, "model_ema.abc": 2, "d.e": 3, "model_ema.decay": 4, "x.model_ema.y": 5,
             "model_ema.xmodel_emay": 6, "f": 7, "model_ema.f": 8}
    out, replaced = apply_ema(state)
    assert out == {**state, "a.b.c": 2, "f": 8}  # dots dropped after the prefix; keys with model_ema untouched
    assert sorted(replaced) == ["a.b.c", "f"]
    assert state["a.b.c"] == 1  # the input is not changed


@over_fixtures
def test_every_model_key_takes_its_ema_twin(fx):
    sd = raw_state(fx)
    tok = quiet_load(os.path.join(fx, "uniwetok.pt"))
    loaded = tok.state_dict()
    twins = 0
    for k in expected_shapes(tok):
        twin = "model_ema." + k.replace(".", "")
        twins += twin in sd
        assert torch.equal(loaded[k], sd[twin] if twin in sd else sd[k]), k
    manifest = os.path.join(fx, "manifest.json")
    named = json.load(open(manifest)).get("checkpoint", {}).get("ema_substituted_keys", []) \
        if os.path.isfile(manifest) else []
    for k in named:  # the fixture's plain copies of these are wrong on purpose
        twin = sd["model_ema." + k.replace(".", "")]
        assert not torch.equal(sd[k], twin) and torch.equal(loaded[k], twin), k
    assert twins >= len(named)


@over_fixtures
def test_without_the_ema_rule_the_outputs_differ(fx, tmp_path):
    """The plain keys alone (what a loader without the rule would use) give another model, whenever any
    model key has an EMA twin."""
    sd = raw_state(fx)
    torch.save({"state_dict": {k: v for k, v in sd.items() if not k.startswith("model_ema")}}, tmp_path / "plain.pt")
    shutil.copy(os.path.join(fx, "config.json"), tmp_path / "config.json")
    plain = quiet_load(str(tmp_path / "plain.pt"))
    twinned = [k for k in expected_shapes(plain) if "model_ema." + k.replace(".", "") in sd]
    seed = decode_seed(fx)
    bits = plain.encode(arr(fx, "input_image.npy"))
    pixels = plain.decode(arr(fx, "random_bits.npy"), generator=torch.Generator().manual_seed(seed))
    same = torch.equal(bits, arr(fx, "encode_bits.npy")) and \
        (pixels - arr(fx, "decode_of_random_bits.npy")).abs().max() <= 1e-4
    assert same == (not twinned), f"{len(twinned)} model keys have EMA twins"


# ---- the ddconfig ---------------------------------------------------------------------------------------

@over_fixtures
def test_config_from_shapes_equals_the_fixture_config(fx):
    dd = ddconfig(fx)
    want, heads_given = config_from_json({"ddconfig": dd}, "config.json")
    assert heads_given == ("n_heads" in dd)
    shapes = {k: tuple(v.shape) for k, v in apply_ema(raw_state(fx))[0].items() if isinstance(v, torch.Tensor)}
    assert config_from_shapes(shapes, "uniwetok.pt", n_heads=want.n_heads) == want
    assert quiet_load(os.path.join(fx, "uniwetok.pt")).config == want


@over_fixtures
def test_without_a_config_file_n_heads_is_the_official_default_and_said(fx, tmp_path):
    os.symlink(os.path.join(fx, "uniwetok.pt"), tmp_path / "bare.pt")
    want = config_from_json({"ddconfig": ddconfig(fx)}, "config.json")[0]
    default_heads = dataclasses.replace(want, n_heads=16)
    try:
        default_heads.check("x")
    except BitDanceError:  # 16 heads do not fit this width: refused, saying why and what to write
        with pytest.raises(BitDanceError, match=r"n_heads.*official default 16.*bare_config\.json"):
            load_tokenizer(str(tmp_path / "bare.pt"))
    else:
        with pytest.warns(UserWarning, match=r"n_heads.*official default 16.*bare_config\.json"):
            tok = load_tokenizer(str(tmp_path / "bare.pt"))
        assert tok.config == default_heads
    # <stem>_config.json beside it gives the head count (and wins over a config.json)
    json.dump({"ddconfig": ddconfig(fx)}, open(tmp_path / "bare_config.json", "w"))
    json.dump({"ddconfig": {**ddconfig(fx), "n_heads": 1}}, open(tmp_path / "config.json", "w"))
    tok = quiet_load(str(tmp_path / "bare.pt"))
    assert tok.config == want
    assert torch.equal(tok.encode(arr(fx, "input_image.npy")), arr(fx, "encode_bits.npy"))
    assert find_tokenizer_files(str(tmp_path / "bare.pt")) == (str(tmp_path / "bare_config.json"), str(tmp_path / "bare.pt"))


# ---- bad input ------------------------------------------------------------------------------------------

@over_fixtures
def test_bad_images_and_bits_are_refused_by_name(fx):
    tok = quiet_load(os.path.join(fx, "uniwetok.pt"))
    z, c = tok.config.z_channels, tok.config.in_channels
    with pytest.raises(BitDanceError, match=r"image size 100x64 .*multiples of 32.*nearest valid size is 96x64"):
        tok.encode(torch.zeros(1, c, 100, 64))
    with pytest.raises(BitDanceError, match=r"image size 64x200 .*nearest valid size is 64x192"):
        tok.encode(torch.zeros(1, c, 64, 200))
    if tok.config.attn_blocks:
        with pytest.raises(BitDanceError, match=r"image size 32x96 .*at least 64.*nearest valid size is 64x96"):
            tok.encode(torch.zeros(1, c, 32, 96))
    with pytest.raises(BitDanceError, match=rf"image must be \[B, {c}, H, W\]"):
        tok.encode(torch.zeros(1, c + 1, 64, 64))
    with pytest.raises(BitDanceError, match=rf"bits must be \[B, {z}, h, w\] .*\[1, {z + 8}, 2, 2\]"):
        tok.decode(torch.ones(1, z + 8, 2, 2))
    with pytest.raises(BitDanceError, match="at least 2 tokens"):
        tok.decode(torch.ones(1, z, 1, 1))


def _save_variant(fx, folder, drop=(), config=None):
    sd = {k: v for k, v in raw_state(fx).items() if k not in drop}
    torch.save({"state_dict": sd}, folder / "uniwetok.pt")
    json.dump(config if config is not None else {"ddconfig": ddconfig(fx)}, open(folder / "config.json", "w"))
    return str(folder / "uniwetok.pt")


@over_fixtures
def test_bad_checkpoints_and_configs_are_refused_by_name(fx, tmp_path):
    # a model key missing (and no EMA twin of it) is named
    with pytest.raises(BitDanceError, match=r"missing keys \['decoder\.conv_out\.bias'\]"):
        load_tokenizer(_save_variant(fx, tmp_path, drop=["decoder.conv_out.bias", "model_ema.decoderconv_outbias"]))
    # an EMA twin does not stand in for a missing plain key (the official rule walks the plain keys)
    with pytest.raises(BitDanceError, match=r"missing keys \['encoder\.conv_in\.weight'\]"):
        load_tokenizer(_save_variant(fx, tmp_path, drop=["encoder.conv_in.weight"]))
    dd = ddconfig(fx)
    with pytest.raises(BitDanceError, match=r"key 'encoder\.conv_out\.weight' has shape"):
        load_tokenizer(_save_variant(fx, tmp_path, config={"ddconfig": {**dd, "z_channels": dd["z_channels"] * 2}}))
    with pytest.raises(BitDanceError, match=r"unknown ddconfig key\(s\) \['heads'\]"):
        load_tokenizer(_save_variant(fx, tmp_path, config={"ddconfig": {**dd, "heads": 4}}))
    with pytest.raises(BitDanceError, match=r"config\.json: no 'ddconfig' object"):
        load_tokenizer(_save_variant(fx, tmp_path, config={"ch": 32}))
    with pytest.raises(BitDanceError, match=r"n_heads 3 does not divide"):
        load_tokenizer(_save_variant(fx, tmp_path, config={"ddconfig": {**dd, "n_heads": 3}}))
    with pytest.raises(BitDanceError, match="missing file"):
        load_tokenizer(str(tmp_path / "nope.pt"))


@over_fixtures
def test_cli_refuses_bad_sizes_and_bits(fx, tmp_path):
    model, z = os.path.join(fx, "uniwetok.pt"), ddconfig(fx)["z_channels"]
    np.save(tmp_path / "odd.npy", np.zeros((1, 3, 100, 64), np.float32))
    r = run_cli("tokenizer", "encode", "--model", model, "--image-npy", str(tmp_path / "odd.npy"), "--bits-npy",
                str(tmp_path / "b.npy"), "--device", "cpu")
    assert r.returncode == 2 and "image size 100x64" in r.stderr and "nearest valid size is 96x64" in r.stderr, r.stderr
    np.save(tmp_path / "wrong.npy", np.ones((1, z + 8, 2, 2), np.float32))
    r = run_cli("tokenizer", "decode", "--model", model, "--bits-npy", str(tmp_path / "wrong.npy"), "--pixels-npy",
                str(tmp_path / "p.npy"), "--device", "cpu")
    assert r.returncode == 2 and f"bits must be [B, {z}, h, w]" in r.stderr and f"[1, {z + 8}, 2, 2]" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "p.npy")


# ---- a second model built with our own module -------------------------------------------------------------

OWN = UniWeTokConfig(ch=32, ch_mult=(1, 2, 2, 2, 2, 2), num_res_blocks=2, z_channels=16, attn_blocks=2, n_heads=4)


@pytest.fixture(scope="module")
def own_model(tmp_path_factory):
    """OWN with random weights (well-conditioned like the fixture's), saved as an official-style checkpoint:
    EMA twins (the plain copy of two keys wrong), discriminator and bookkeeping keys, <stem>_config.json."""
    folder = tmp_path_factory.mktemp("own")
    g = torch.Generator().manual_seed(3)
    model = UniWeTok(OWN).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adaptive." in name and ".gamma." in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g) + (1.0 if name.endswith("bias") else 0.0))
            elif p.dim() == 1:
                p.copy_((0.05 if name.endswith("bias") else 0.1) * torch.randn(p.shape, generator=g)
                        + (0.0 if name.endswith("bias") else 1.0))
            else:
                p.copy_(min(max((p.numel() / p.shape[0]) ** -0.5, 0.02), 0.2) * torch.randn(p.shape, generator=g))
    sd = dict(model.state_dict())
    for k in ("encoder.mid_attn_blocks.1.attention.wo.weight", "decoder.up.3.block.1.conv2.weight"):
        sd["model_ema." + k.replace(".", "")] = sd[k]
        sd[k] = torch.randn(sd[k].shape, generator=g)
    sd.update({"loss.discriminator.main.0.weight": torch.zeros(4, 3, 4, 4), "model_ema.decay": torch.tensor(0.999),
               "model_ema.num_updates": torch.tensor(7, dtype=torch.int32)})
    torch.save({"state_dict": sd}, folder / "own.pt")
    json.dump(OWN.to_json(), open(folder / "own_config.json", "w"))
    return str(folder / "own.pt"), model


def _own_image(batch=2, h=64, w=128):
    low = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    return torch.tanh(1.5 * torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False))


def test_own_model_loads_with_the_ema_rule(own_model):
    path, model = own_model
    tok = quiet_load(path)
    assert tok.config == OWN and tok.family == "uniwetok-z16-f32"
    want = model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in tok.state_dict().items())
    img = _own_image()
    assert torch.equal(tok.encoder(img), model.encoder(img))


def test_own_model_batches_chunks_and_tiles(own_model):
    tok = quiet_load(own_model[0])
    img = _own_image()
    pre = tok.encoder(img)
    bits = tok.encode(img)
    assert bits.shape == (2, 16, 2, 4) and bits.dtype == torch.float32 and set(bits.unique().tolist()) == {-1.0, 1.0}
    for i in range(2):  # each image alone: the same map (batching changes rounding at most)
        alone = tok.encoder(img[i:i + 1])
        assert (alone - pre[i:i + 1]).abs().max() <= 1e-5
        sure = pre[i:i + 1].abs() > 1e-4
        assert torch.equal(tok.encode(img[i:i + 1])[sure], bits[i:i + 1][sure])
    gen = lambda s=5: torch.Generator().manual_seed(s)  # noqa: E731
    whole = tok.decode(bits, generator=gen())
    assert whole.shape == (2, 3, 64, 128)
    assert torch.equal(whole, tok.decode(bits, generator=gen()))
    assert (tok.decode(bits, generator=gen(6)) - whole).abs().max() > 1e-3
    # one draw for the batch, sliced per chunk: chunks change nothing but rounding
    assert (tok.decode(bits, generator=gen(), chunk=1) - whole).abs().max() <= 1e-5
    noise = torch.randn(bits.shape, generator=gen())
    assert torch.equal(tok.decoder(bits, noise=noise), whole)
    assert (tok.decoder(bits[1:], noise=noise[1:]) - whole[1:]).abs().max() <= 1e-5
    for tile in (32, 48):  # several tiles: the attention is in the untiled trunk, GroupNorm statistics synced
        assert (tok.decode(bits, generator=gen(), tile=tile) - whole).abs().max() <= 1e-4
    again = tok.encode(whole.clamp(-1, 1))
    assert again.shape == bits.shape


def test_own_model_in_bfloat16_draws_float32_noise(own_model):
    """In bf16 the decoder still gets the bits and its noise block in float32 (upstream's randn_like of
    the sampler's float32 tokens); its conv_in rounds them to bf16."""
    tok = load_tokenizer(own_model[0], dtype=torch.bfloat16)
    assert tok.decoder.conv_in.weight.dtype == torch.bfloat16
    img = _own_image(batch=1, h=96, w=64)
    bits = tok.encode(img)
    assert bits.dtype == torch.bfloat16 and bits.shape == (1, 16, 3, 2)
    noise = torch.randn(bits.shape, generator=torch.Generator().manual_seed(2))
    out = tok.decode(bits, generator=torch.Generator().manual_seed(2))
    assert out.dtype == torch.bfloat16 and torch.equal(out, tok.decoder(bits.float(), noise=noise))
    other = tok.decode(bits, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(out, other)  # the noise is drawn from the generator given


def test_checkpoint_files_are_recognised_by_their_keys(own_model, tmp_path):
    path, model = own_model
    assert is_uniwetok_checkpoint(path)
    for fx in FIXTURES:
        assert is_uniwetok_checkpoint(os.path.join(fx, "uniwetok.pt"))
    for other in ("imagenet-tiny-p4/model.pt", "imagenet-tiny-p4/vae.pt"):
        if os.path.isfile(os.path.join(ALL_FIXTURES, other)):
            assert not is_uniwetok_checkpoint(os.path.join(ALL_FIXTURES, other))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert not is_uniwetok_checkpoint(str(tmp_path / "junk.pt"))
    # a legacy (non-zip) torch file: only opening it tells, and then it loads
    legacy = tmp_path / "legacy.pt"
    torch.save({"state_dict": model.state_dict()}, legacy, _use_new_zipfile_serialization=False)
    assert not is_uniwetok_checkpoint(str(legacy)) and is_uniwetok_checkpoint(str(legacy), open_if_needed=True)
    json.dump(OWN.to_json(), open(tmp_path / "legacy_config.json", "w"))
    assert is_uniwetok_checkpoint(str(legacy))  # a UniWeTok ddconfig beside it says so too
    tok = quiet_load(str(legacy))
    assert isinstance(tok, UniWeTok) and tok.config == OWN
    # the BitDance tokenizers still load through the same entry point
    ae_tiny = os.path.join(ALL_FIXTURES, "ae-tiny")
    if os.path.isdir(ae_tiny):
        ae = load_tokenizer(ae_tiny)
        assert not isinstance(ae, UniWeTok) and ae.family == "bitdance-z32-f16"


def test_direct_loader_names_a_file_that_is_not_uniwetok(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BitDanceError, match="not a UniWeTok checkpoint"):
        load_uniwetok(str(tmp_path / "junk.pt"))
