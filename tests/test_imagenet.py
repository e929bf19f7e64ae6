"""ImageNet class-conditional models: the official fixtures through the CLI, loading, configs, key lists."""
import builtins
import json
import os

import numpy as np
import pytest
import torch

from bitdance_core import BitDanceError, load_imagenet
from bitdance_core.formats.checkpoints import expected_shapes, load_pt
from bitdance_core.models.imagenet import build_imagenet
from bitdance_core.pipelines.imagenet_classes import class_index, imagenet_class_names, parse_classes
from bitdance_core.models.imagenet_config import ImageNetConfig, config_from_shapes
from paths import compare_with_official, fixture_dirs, official_keys, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

FIXTURES = fixture_dirs("imagenet-")
CASES = [(fx, c) for fx in FIXTURES for c in sorted(os.listdir(fx)) if os.path.isfile(os.path.join(fx, c, "params.json"))]
TINY = next((f for f in FIXTURES if os.path.basename(f) == "imagenet-tiny-p4"), None)
needs_tiny = pytest.mark.skipif(TINY is None, reason="shared/fixtures/imagenet-tiny-p4 not present")


@pytest.mark.parametrize("fixture,case", CASES, ids=[f"{os.path.basename(f)}/{c}" for f, c in CASES])
def test_imagenet_fixture_through_cli(fixture, case, tmp_path):
    p = json.load(open(os.path.join(fixture, case, "params.json")))
    pix, tok = tmp_path / "p.npy", tmp_path / "t.npy"
    vae = ["--vae", os.path.join(fixture, "vae.pt")] if os.path.isfile(os.path.join(fixture, "vae.pt")) else []
    r = run_cli("imagenet", "--checkpoint", os.path.join(fixture, "model.pt"), *vae,
                "--classes", ",".join(str(c) for c in p["cond"]), "--steps", str(p["sample_steps"]),
                "--cfg", str(p["cfg_scale"]), "--cfg-schedule", p.get("cfg_schedule", "linear"), "--seed", str(p["seed"]),
                "--device", "cpu", "--dtype", "float32", "--pixels-npy", str(pix), "--tokens-npy", str(tok),
                "--out", str(tmp_path / "img.png"))
    assert r.returncode == 0, r.stderr[-3000:]
    ref_tokens = np.load(os.path.join(fixture, case, "tokens.npy"))
    diff = compare_with_official(tok, ref_tokens, pix, os.path.join(fixture, case, "image.npy"))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.01, f"max {diff.max()}, {(diff > 0).sum()} values off"
    n = len(p["cond"])
    pngs = [tmp_path / "img.png"] if n == 1 else [tmp_path / f"img_{i}.png" for i in range(n)]
    assert all(f.is_file() for f in pngs)
    assert "steps" in r.stderr  # the progress bar


# ---- configs and key lists -----------------------------------------------------------------------------

KEYS = official_keys()

RELEASED = [  # section, (dim, layers, heads, P, head kind, diff layers, adaLN blocks, default cfg)
    ("imagenet_B_1x", (768, 24, 12, 1, "mlp", 6, 2, 3.2)),
    ("imagenet_B_4x", (768, 24, 12, 4, "transformer", 6, 2, 3.9)),
    ("imagenet_B_16x", (768, 24, 12, 16, "transformer", 6, 2, 6.1)),
    ("imagenet_L_1x", (1024, 32, 16, 1, "mlp", 8, 2, 4.0)),
    ("imagenet_H_1x", (1280, 40, 20, 1, "mlp", 12, 3, 4.55)),
]


@pytest.mark.parametrize("section,want", RELEASED, ids=[s for s, _ in RELEASED])
def test_released_shapes_build_on_meta_and_match_official_keys(section, want):
    keys = KEYS[section]
    cfg = config_from_shapes(keys, section)
    dim, layers, heads, par, kind, dl, ada, default_cfg = want
    assert (cfg.dim, cfg.n_layer, cfg.n_head, cfg.parallel_num, cfg.head_kind) == (dim, layers, heads, par, kind)
    assert (cfg.diff_layers, cfg.diff_dim, cfg.diff_adanln_layers) == (dl, dim, ada)
    assert (cfg.cls_token_num, cfg.num_classes, cfg.latent_dim, cfg.grid, cfg.resolution) == (64, 1000, 32, 16, 256)
    assert (cfg.ae.ch, cfg.ae.ch_mult, cfg.ae.num_res_blocks, cfg.ae.gan_decoder) == (256, (1, 1, 2, 2, 4), 4, False)
    assert cfg.default_cfg == default_cfg
    cfg.validate(section)
    model = build_imagenet(cfg)
    assert all(t.device.type == "meta" for t in model.state_dict().values())
    ours = expected_shapes(model)
    assert sorted(set(ours) ^ set(keys)) == []
    assert {k: v for k, v in ours.items() if v != keys[k]} == {}


def test_same_shapes_with_the_upstream_ffn_rule():
    """A config given by hand (no shapes) builds the same model as the one read from the file."""
    cfg = ImageNetConfig(dim=1280, n_layer=40, n_head=20, diff_layers=12, diff_dim=1280, diff_adanln_layers=3)
    assert expected_shapes(build_imagenet(cfg)) == KEYS["imagenet_H_1x"]


@needs_tiny
def test_fixture_config_json_beside_the_checkpoint_wins_over_inference():
    sd = load_pt(os.path.join(TINY, "model.pt"))["ema"]
    inferred = config_from_shapes({k: tuple(v.shape) for k, v in sd.items()}, "model.pt")
    kw = json.load(open(os.path.join(TINY, "config.json")))["kwargs"]
    for k in ("dim", "n_layer", "diff_layers", "diff_dim", "diff_adanln_layers", "latent_dim", "down_size", "patch_size",
              "resolution", "cls_token_num", "num_classes", "parallel_num"):
        assert getattr(inferred, k) == kw[k], k
    assert inferred.n_head == 1  # 64 / 64: the shapes do not tell the head count
    pipe = load_imagenet(os.path.join(TINY, "model.pt"))
    assert pipe.config.n_head == kw["n_head"] == 4  # read from config.json beside the file
    assert pipe.config.parallel_mode == "patch" and pipe.config.head_kind == "transformer"
    assert pipe.default_cfg == 3.9  # unknown shape, 4 tokens per step


@needs_tiny
def test_explicit_config_argument_and_its_errors(tmp_path):
    bits = {}
    for label, config in (("file", os.path.join(TINY, "config.json")), ("dict", {"n_head": 4}),
                          ("kwargs", {"kwargs": {"n_head": 4, "dim": 64}})):
        pipe = load_imagenet(os.path.join(TINY, "model.pt"), config=config)
        assert pipe.config.n_head == 4
        bits[label] = pipe.generate([3, 7], steps=2, cfg=4.0, seed=123)
    assert torch.equal(bits["file"], bits["dict"]) and torch.equal(bits["file"], bits["kwargs"])
    with pytest.raises(BitDanceError, match="n_heads_typo"):
        load_imagenet(os.path.join(TINY, "model.pt"), config={"kwargs": {"n_heads_typo": 4}})
    with pytest.raises(BitDanceError, match=r"'query_token' has shape \[1, 3, 64\], expected \[1, 3, 128\]"):
        load_imagenet(os.path.join(TINY, "model.pt"), config={"dim": 128, "n_head": 2})
    with pytest.raises(BitDanceError, match="heads"):
        load_imagenet(os.path.join(TINY, "model.pt"), config={"n_head": 3})


# ---- the pipeline API -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    if TINY is None:
        pytest.skip("shared/fixtures/imagenet-tiny-p4 not present")
    return load_imagenet(os.path.join(TINY, "model.pt"), vae=os.path.join(TINY, "vae.pt"))


def test_generate_api_callback_seed_and_reference(tiny):
    seen = []
    bits = tiny.generate([3, 7], steps=4, cfg=4.0, seed=123, callback=lambda s, t, b: seen.append((s, t, b.clone())))
    ref = torch.from_numpy(np.load(os.path.join(TINY, "case1_cfg4_linear", "tokens.npy")))
    assert torch.equal(bits, ref)
    assert [s for s, _, _ in seen] == list(range(64)) and all(t == 64 for _, t, _ in seen)
    assert torch.equal(seen[-1][2], bits)
    first = seen[0][2]  # one 2x2 block done: the top-left block is set, the rest is 0
    assert (first[:, :, :2, :2].abs() == 1).all() and (first[:, :, 2:, :] == 0).all() and (first[:, :, :, 2:] == 0).all()
    again = tiny.generate([3, 7], steps=4, cfg=4.0, seed=123)
    other = tiny.generate([3, 7], steps=4, cfg=4.0, seed=124)
    assert torch.equal(bits, again) and not torch.equal(bits, other)


def test_guidance_schedules_and_defaults(tiny):
    assert tiny.guidance(4.0, "linear", 0) == 1.0  # the step-0 behaviour
    assert tiny.guidance(4.0, "linear", 32) == 1.0 + 3.0 * 32 / 64
    assert tiny.guidance(4.0, "constant", 0) == 4.0 and tiny.guidance(0.5, "constant", 9) == 1.0
    lin = tiny.generate([3], steps=2, cfg=4.0, cfg_schedule="linear", seed=1)
    const = tiny.generate([3], steps=2, cfg=4.0, cfg_schedule="constant", seed=1)
    default = tiny.generate([3], steps=2, cfg=None, seed=1)
    explicit = tiny.generate([3], steps=2, cfg=tiny.default_cfg, seed=1)
    assert lin.shape == (1, 32, 16, 16) and set(lin.unique().tolist()) == {-1.0, 1.0}
    assert not torch.equal(lin, const) and torch.equal(default, explicit)
    with pytest.raises(BitDanceError, match="cfg_schedule"):
        tiny.generate([3], steps=2, cfg_schedule="cosine")
    with pytest.raises(BitDanceError, match="out of range"):
        tiny.generate([11], steps=2, cfg=1.0)  # 10 classes: 0-9, and 10 = the null class
    assert tiny.generate([10], steps=1, cfg=1.0).shape == (1, 32, 16, 16)


def test_same_label_twice_gives_two_images(tiny):
    """Each row of a batch gets its own noise."""
    bits = tiny.generate([5, 5], steps=2, cfg=1.0, seed=3)
    assert not torch.equal(bits[0], bits[1])


@needs_tiny
def test_vae_file_and_safetensors_resave_give_the_same_result(tiny, tmp_path):
    from safetensors.torch import save_file

    sd = load_pt(os.path.join(TINY, "model.pt"))["ema"]
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    (tmp_path / "model_config.json").write_text(open(os.path.join(TINY, "config.json")).read())
    resaved = load_imagenet(str(path))
    assert torch.equal(resaved.generate([3, 7], steps=2, cfg=4.0, seed=9), tiny.generate([3, 7], steps=2, cfg=4.0, seed=9))
    # A checkpoint without its vae.* keys needs the tokenizer file, and says so.
    torch.save({"ema": {k: v for k, v in sd.items() if not k.startswith("vae.")}}, tmp_path / "novae.pt")
    with pytest.raises(BitDanceError, match="vae"):
        load_imagenet(str(tmp_path / "novae.pt"), config=os.path.join(TINY, "config.json"))
    fixed = load_imagenet(str(tmp_path / "novae.pt"), vae=os.path.join(TINY, "vae.pt"), config=os.path.join(TINY, "config.json"))
    assert torch.equal(fixed.autoencoder.decoder.conv_out.weight, tiny.autoencoder.decoder.conv_out.weight)


@needs_tiny
def test_the_tokenizer_file_in_every_layout_gives_the_same_model(tiny, tmp_path):
    """--vae as the .pt, as BitDance-Tokenizer's plain-key ae_*.safetensors, as a safetensors whose keys keep
    the ImageNet model's `vae.` prefix, and as a tokenizer folder: the same tokenizer weights each time
    (the safetensors files store names that differ from the model's, which the reader must map)."""
    from safetensors.torch import save_file
    from bitdance_core.pipelines.tokenizers import tokenizer_source

    vsrc, _ = tokenizer_source(os.path.join(TINY, "vae.pt"))
    weights = {k: vsrc.read(k, "cpu", None).contiguous() for k in vsrc.keys() if k.startswith(("encoder.", "decoder."))}
    save_file(weights, str(tmp_path / "ae_plain.safetensors"))
    save_file({"vae." + k: v for k, v in weights.items()}, str(tmp_path / "ae_prefixed.safetensors"))
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    save_file(weights, str(folder / "ae.safetensors"))
    ae = tiny.autoencoder
    (folder / "ae_config.json").write_text(json.dumps(ae.config.to_json()))
    sd = load_pt(os.path.join(TINY, "model.pt"))["ema"]
    torch.save({"ema": {k: v for k, v in sd.items() if not k.startswith("vae.")}}, tmp_path / "novae.pt")
    expected = tiny.autoencoder.state_dict()
    for vae in ("ae_plain.safetensors", "ae_prefixed.safetensors", "tokenizer"):
        model = load_imagenet(str(tmp_path / "novae.pt"), vae=str(tmp_path / vae), config=os.path.join(TINY, "config.json"))
        got = model.autoencoder.state_dict()
        assert got.keys() == expected.keys(), vae
        assert all(torch.equal(got[k], expected[k]) for k in expected), vae
    # A file with no tokenizer tensors is refused by name, not silently ignored.
    save_file({"head.weight": torch.zeros(2, 2)}, str(tmp_path / "not_a_tokenizer.safetensors"))
    with pytest.raises(BitDanceError, match="not_a_tokenizer.safetensors: no encoder.* or decoder.* tensors"):
        load_imagenet(os.path.join(TINY, "model.pt"), vae=str(tmp_path / "not_a_tokenizer.safetensors"))


# ---- unsafe and broken files ---------------------------------------------------------------------------

class _WritesAFile:
    """Unpickling this calls open(marker, 'w'): code execution that leaves a trace."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    torch.save({"ema": {"emb_norm.weight": torch.ones(4)}, "args": _WritesAFile(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(BitDanceError, match=r"refused to open.*GLOBAL"):
        load_imagenet(str(path))
    from bitdance_core import load_tokenizer
    with pytest.raises(BitDanceError, match="refused to open"):
        load_tokenizer(str(path))
    r = run_cli("imagenet", "--checkpoint", str(path), "--classes", "1", "--steps", "1", "--device", "cpu",
                "--tokens-npy", str(tmp_path / "never-written.npy"))
    assert r.returncode == 2 and "refused to open" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()


@needs_tiny
def test_missing_or_misshaped_key_is_named(tmp_path):
    sd = load_pt(os.path.join(TINY, "model.pt"))["ema"]
    cfg = os.path.join(TINY, "config.json")
    missing = {k: v for k, v in sd.items() if k != "layers.1.attention.wo.weight"}
    torch.save({"ema": missing}, tmp_path / "missing.pt")
    with pytest.raises(BitDanceError, match=r"missing keys \['layers.1.attention.wo.weight'\]"):
        load_imagenet(str(tmp_path / "missing.pt"), config=cfg)
    bad = dict(sd)
    bad["head.net.res_blocks.1.w2.weight"] = torch.zeros(128, 100)
    torch.save({"ema": bad}, tmp_path / "bad.pt")
    with pytest.raises(BitDanceError, match=r"'head.net.res_blocks.1.w2.weight' has shape \[128, 100\], expected \[128, 192\]"):
        load_imagenet(str(tmp_path / "bad.pt"), config=cfg)
    extra = dict(sd, **{"unused.weight": torch.zeros(1)})
    torch.save({"model": extra}, tmp_path / "extra.pt")
    with pytest.raises(BitDanceError, match="unused.weight"):
        load_imagenet(str(tmp_path / "extra.pt"), config=cfg)
    torch.save({"optimizer": {}}, tmp_path / "empty.pt")
    with pytest.raises(BitDanceError, match="'ema' or 'model'"):
        load_imagenet(str(tmp_path / "empty.pt"))


# ---- class names ----------------------------------------------------------------------------------------

def test_class_names_in_index_order():
    names = imagenet_class_names()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert (names[0], names[1], names[207], names[999]) == ("tench", "goldfish", "golden retriever", "toilet tissue")
    assert class_index("Golden Retriever") == 207 and class_index("crane") == 517 and class_index("crane bird") == 134
    assert parse_classes("goldfish, 7,207") == [1, 7, 207] and parse_classes([3, "9"]) == [3, 9]
    with pytest.raises(BitDanceError, match="did you mean.*golden retriever"):
        class_index("retriever dog")
    with pytest.raises(BitDanceError, match="out of range"):
        parse_classes("1000")
    assert parse_classes("1000", allow_null=True) == [1000]
    # before a model is read (num_classes None) only the spelling is checked
    assert parse_classes("goldfish,1500", None) == [1, 1500]
    for bad, why in (("goldfsh", "not an ImageNet class name"), ("-3", "negative"), ([2.5], "not a class id")):
        with pytest.raises(BitDanceError, match=why):
            parse_classes(bad, None)


def test_cli_refuses_a_misspelt_class_before_loading(tmp_path):
    empty = tmp_path / "BitDance_B_1x.pt"
    empty.write_bytes(b"")  # loading it would fail, naming the file: the class name must be refused first
    r = run_cli("imagenet", "--checkpoint", str(empty), "--classes", "golden retriver", "--device", "cpu",
                "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "not an ImageNet class name" in r.stderr and "golden retriever" in r.stderr
    assert "empty file" not in r.stderr and "Traceback" not in r.stderr


# ---- bf16 as the official autocast runs it --------------------------------------------------------------

def _head_conditions(model, seed=0):
    """The head's condition at every AR step (hidden + position, float32 for comparison) for two
    classes and their null rows, teacher-forced with the same random tokens for any model."""
    from bitdance_core.models.imagenet import KVCache, first_step_mask

    c, P = model.config, model.config.parallel_num
    y = torch.tensor([1, 2, c.num_classes, c.num_classes])
    tokens = torch.randint(0, 2, (4, c.steps, P, c.token_dim), generator=torch.Generator().manual_seed(seed)) * 2.0 - 1
    cache = KVCache(c, 4, c.grid * c.grid + c.cls_token_num, model.dtype, "cpu")
    x = model.cls_embedding(y).view(4, c.cls_token_num, c.dim)
    if P > 1:
        x = torch.cat([x, model.query_token.expand(4, -1, -1)], dim=1)
    start, mask, out = 0, first_step_mask(c, "cpu"), []
    with torch.no_grad():
        for i in range(c.steps):
            if i > 0:
                x = model.proj_in(tokens[:, i - 1].to(model.dtype))
                start, mask = P * (i - 1) + c.cls_token_num + P - 1, None
            hidden = model.forward_tokens(x, cache, start, mask)[:, -P:] + model.pos_for_diff.weight[i * P:(i + 1) * P]
            out.append(hidden)
    return torch.cat(out, dim=1)


@needs_tiny
def test_bf16_keeps_what_the_official_autocast_keeps_in_float32():
    """The official sampler runs the float32 model under bf16 autocast: its linears compute in bf16,
    its norms, embeddings and head positions stay float32, so the residual stream and the head's
    condition are float32. A bf16 load does the same; its head conditions are nearer the float32
    model's than those of the same weights all in bf16 (the stream rounded at every sum)."""
    import copy

    ck = os.path.join(TINY, "model.pt")
    ref = _head_conditions(load_imagenet(ck).model)
    model = load_imagenet(ck, dtype=torch.bfloat16).model
    kept = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
    norms = {f"layers.{i}.{k}_norm.weight" for i in range(model.config.n_layer) for k in ("attention", "ffn")}
    backbone = {"query_token", "cls_embedding.weight", "emb_norm.weight", "norm.weight", "pos_for_diff.weight"} | norms
    others = kept - backbone
    assert backbone <= kept and {"head.net.res_blocks.0.norm1.bias", "vae.decoder.norm_out.weight"} <= others
    assert all(".norm" in n or n.split(".")[-2].startswith("norm") for n in others), others  # the norms only
    assert model.dtype == torch.bfloat16 and model.layers[0].attention.wqkv.weight.dtype == torch.bfloat16
    assert model.vae.decoder.conv_out.weight.dtype == model.head.net.input_proj.weight.dtype == torch.bfloat16
    conds = _head_conditions(model)
    assert conds.dtype == torch.float32
    all_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    plain = _head_conditions(all_bf16)
    assert plain.dtype == torch.bfloat16
    err, err_plain = (conds - ref).abs().mean().item(), (plain.float() - ref).abs().mean().item()
    assert err < 0.9 * err_plain, (err, err_plain)
