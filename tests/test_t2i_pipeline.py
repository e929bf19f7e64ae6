"""Pipeline behaviours on the tiny official-layout model: guidance batching, negative prompts,
callbacks and cancel, layouts (diffusers, sharded), dtypes, and clear errors for bad input."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bitdance_core import BitDanceError, load_t2i
from paths import fixture_dirs

MODEL = os.path.join(fixture_dirs("t2i-tiny-p16")[0], "model")
CASE1 = os.path.join(os.path.dirname(MODEL), "case1_cfg7.5_seed42")
PROMPT = "A red fox sitting in a snowy forest at sunrise"
ARGS = dict(height=256, width=256, steps=4, cfg=7.5, num_images=1, seed=42)


@pytest.fixture(scope="module")
def pipe():
    return load_t2i(MODEL)


def official_case1_bits(pipe):
    from bitdance_core.models.positions import blocks_to_raster

    return blocks_to_raster(torch.from_numpy(np.load(os.path.join(CASE1, "tokens.npy"))), 16, 16, 4)


def test_batched_guidance_equals_separate_passes(pipe):
    batched = pipe.generate(PROMPT, **ARGS)
    separate = pipe.generate(PROMPT, **ARGS, batched_cfg=False)
    assert torch.equal(batched, separate)
    assert torch.equal(batched, official_case1_bits(pipe))


def test_negative_prompt_of_another_length(pipe):
    neg = pipe.encode_prompt(PROMPT, "a blurry dark photo with text and many words in it")
    assert len(neg.uncond_ids) != len(neg.cond_ids)
    a = pipe.generate(neg, **ARGS)
    b = pipe.generate(neg, **ARGS, batched_cfg=False)
    assert torch.equal(a, b)
    assert not torch.equal(a, pipe.generate(PROMPT, **ARGS))  # the negative prompt changes the image
    assert set(a.unique().tolist()) == {-1.0, 1.0}


def test_batch_of_images_and_seeds(pipe):
    two = pipe.generate(PROMPT, **{**ARGS, "num_images": 2})
    assert two.shape == (2, 32, 16, 16)
    assert not torch.equal(two[0], two[1])
    assert torch.equal(pipe.generate(PROMPT, **ARGS), pipe.generate(PROMPT, **ARGS))  # same seed, same bits
    assert not torch.equal(pipe.generate(PROMPT, **ARGS), pipe.generate(PROMPT, **{**ARGS, "seed": 43}))


def test_callback_sees_every_block_and_can_cancel(pipe):
    seen = []
    bits = pipe.generate(PROMPT, **ARGS, callback=lambda s, n, b: seen.append((s, n, b.clone())))
    assert [s for s, _, _ in seen] == list(range(16)) and all(n == 16 for _, n, _ in seen)
    assert (seen[0][2] != 0).sum() == 16 * 32  # block 0 filled, the rest still zero
    assert torch.equal(seen[-1][2], bits)

    class Stop(Exception):
        pass

    def stop_at_3(s, n, b):
        if s == 3:
            raise Stop
    with pytest.raises(Stop):
        pipe.generate(PROMPT, **ARGS, callback=stop_at_3)
    assert torch.equal(pipe.generate(PROMPT, **ARGS), bits)  # the pipeline is fine after a cancel


def test_euler_sampler_runs(pipe):
    bits = pipe.generate(PROMPT, **ARGS, sampler="euler")
    assert set(bits.unique().tolist()) == {-1.0, 1.0}


def test_bfloat16_on_cpu(pipe):
    p16 = load_t2i(MODEL, dtype=torch.bfloat16)
    assert p16.backbone.dtype == torch.bfloat16
    bits = p16.generate(PROMPT, **ARGS)
    agree = (bits == pipe.generate(PROMPT, **ARGS)).float().mean().item()
    assert bits.shape == (1, 32, 16, 16) and agree > 0.6  # same model, lower precision: mostly the same bits


def test_diffusers_layout_and_sharded_backbone(tmp_path, pipe):
    d = tmp_path / "diffusers"
    for sub, files in {"tokenizer": ["tokenizer.json", "tokenizer_config.json"], "text_encoder": ["config.json"]}.items():
        (d / sub).mkdir(parents=True)
        for f in files:
            shutil.copy(os.path.join(MODEL, f), d / sub / f)
    sd = load_file(os.path.join(MODEL, "model.safetensors"))
    keys = sorted(sd)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    index = {"metadata": {}, "weight_map": {}}
    for i, part in enumerate(halves):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(d / "text_encoder" / name))
        index["weight_map"].update({k: name for k in part})
    (d / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps(index))
    for sub, cfg, w in (("autoencoder", "ae_config.json", "ae.safetensors"),
                        ("diffusion_head", "vision_head_config.json", "vision_head.safetensors"),
                        ("projector", None, "projector.safetensors")):
        (d / sub).mkdir()
        if cfg:
            c = json.load(open(os.path.join(MODEL, cfg))) | {"_class_name": "X", "_diffusers_version": "0.36.0"}
            (d / sub / "config.json").write_text(json.dumps(c))
        shutil.copy(os.path.join(MODEL, w), d / sub / "diffusion_pytorch_model.safetensors")
    other = load_t2i(str(d))
    assert torch.equal(other.generate(PROMPT, **ARGS), official_case1_bits(pipe))


# ---- bad input: one clear error each -----------------------------------------------------------

def copy_model(tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(MODEL, dst)
    return dst


@pytest.mark.parametrize("kwargs,match", [
    (dict(height=100), r"height 100 px \(asked for: width 256, height 100\) is not a multiple of 64 px"),
    (dict(width=0), r"width 0 px \(asked for: width 0, height 256\) is not a positive whole number of pixels"),
    (dict(height=4096, width=256), r"height 4096 px .* is larger than its largest side, 2048 px .*<\|res_128\|>"),
    (dict(steps=0), "steps must be an integer >= 1, got 0"),
    (dict(cfg=-1.0), "cfg .* must be a finite number >= 0, got -1.0"),
    (dict(cfg=float("inf")), "cfg .* must be a finite number >= 0, got inf"),
    (dict(num_images=0), "num_images must be an integer >= 1, got 0"),
])
def test_bad_arguments(pipe, kwargs, match):
    with pytest.raises(BitDanceError, match=match):
        pipe.generate(PROMPT, **{**ARGS, **kwargs})


def test_empty_prompt(pipe):
    with pytest.raises(BitDanceError, match="prompt is empty"):
        pipe.generate("", **ARGS)


def test_missing_file(tmp_path):
    m = copy_model(tmp_path)
    os.remove(m / "projector.safetensors")
    with pytest.raises(BitDanceError, match="missing file: .*projector.safetensors"):
        load_t2i(str(m))


def test_not_a_model_folder(tmp_path):
    with pytest.raises(BitDanceError, match="not a BitDance model folder"):
        load_t2i(str(tmp_path))


def test_truncated_safetensors(tmp_path):
    m = copy_model(tmp_path)
    f = m / "vision_head.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(BitDanceError, match="vision_head.safetensors: truncated safetensors file"):
        load_t2i(str(m))


def _edit_json(path, edit):
    obj = json.loads(path.read_text())
    path.write_text(json.dumps(edit(obj)))


@pytest.mark.parametrize("file, edit, words", [
    ("config.json", lambda c: {**c, "rms_norm_eps": "x"}, "rms_norm_eps is 'x'; expected a number"),
    ("config.json", lambda c: {**c, "hidden_size": 64.5}, "hidden_size is 64.5; expected an integer"),
    ("config.json", lambda c: {**c, "num_hidden_layers": None}, "num_hidden_layers is null; expected an integer"),
    ("config.json", lambda c: [c], "expected a JSON object"),
    ("vision_head_config.json", lambda c: {**c, "parallel_num": 0}, "parallel_num 0 must be positive"),
    ("vision_head_config.json", lambda c: {**c, "time_shift": "x"}, "time_shift is 'x'; expected a number"),
    ("vision_head_config.json", lambda c: {**c, "use_swiglu": "yes"}, "use_swiglu is 'yes'; expected true or false"),
    ("ae_config.json", lambda c: {**c, "ddconfig": {**c["ddconfig"], "z_channels": "32"}},
     "ddconfig: z_channels is '32'; expected an integer"),
    ("ae_config.json", lambda c: {**c, "ddconfig": {**c["ddconfig"], "ch_mult": 4}}, "ch_mult is 4; expected a list"),
])
def test_a_config_value_of_the_wrong_type_is_named(tmp_path, file, edit, words):
    """A hand-edited config: the file, the key and the value are named before any weight is read, not a
    TypeError or ZeroDivisionError from inside the model."""
    m = copy_model(tmp_path)
    _edit_json(m / file, edit)
    with pytest.raises(BitDanceError) as e:
        load_t2i(str(m))
    assert str(e.value).startswith(str(m / file)) and words in str(e.value), str(e.value)


def test_a_broken_shard_index_is_named(tmp_path):
    m = copy_model(tmp_path)
    (m / "config.json").write_bytes(b"\xff\xfe\x00 not text")  # bytes that are not UTF-8: still named
    with pytest.raises(BitDanceError, match=r"config.json: not valid JSON \('utf-8' codec can't decode"):
        load_t2i(str(m))
    shutil.copy(os.path.join(MODEL, "config.json"), m / "config.json")
    index = m / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"model.embed_tokens.weight": "model.safetensors",')
    with pytest.raises(BitDanceError, match=r"model.safetensors.index.json: not valid JSON"):
        load_t2i(str(m))
    index.write_text(json.dumps({"weight_map": {"model.embed_tokens.weight": "../elsewhere/model.safetensors"}}))
    with pytest.raises(BitDanceError, match=r"names '../elsewhere/model.safetensors'; shards must be file names in"):
        load_t2i(str(m))


LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 28000000000\n")
HTML_PAGE = b"\n<!DOCTYPE html>\n<html class=''><head><title>model.safetensors</title></head><body></body></html>\n"


@pytest.mark.parametrize("stand_in, words", [(LFS_POINTER, "a Git LFS pointer to a 28,000,000,000-byte file"),
                                             (HTML_PAGE, "a web page, not weights"), (b"", "an empty file")])
def test_what_a_failed_download_left_is_named_in_every_weights_format(tmp_path, stand_in, words):
    """A Git LFS pointer, a saved web page or an empty file in place of the weights: the safetensors, .pt
    and GGUF readers each name the file and what it is (not 'truncated', and not a pickle that 'could
    execute code'), so the user knows to fetch the file itself."""
    from bitdance_core.formats.checkpoints import load_pt
    from bitdance_core.formats.gguf_file import GGUFSource

    m = copy_model(tmp_path)
    (m / "model.safetensors").write_bytes(stand_in)
    with pytest.raises(BitDanceError) as e:
        load_t2i(str(m))
    assert str(e.value).startswith(f"{m / 'model.safetensors'}: {words}"), str(e.value)
    for name, read in (("model.pt", load_pt), ("backbone-Q4_0.gguf", GGUFSource)):
        (tmp_path / name).write_bytes(stand_in)
        with pytest.raises(BitDanceError) as e:
            read(str(tmp_path / name))
        assert str(e.value).startswith(f"{tmp_path / name}: {words}"), str(e.value)
        assert "execute" not in str(e.value)


def test_a_complete_file_that_safetensors_cannot_read_is_not_called_truncated(tmp_path):
    """A file whose size is what its header says, holding a dtype the installed safetensors does not
    know (as F8_E8M0 is to safetensors 0.4): the message names the file, says it is complete and lists
    its dtypes, instead of advising a new download."""
    m = copy_model(tmp_path)
    f = m / "projector.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    key = sorted(k for k in header if k != "__metadata__")[0]
    header[key]["dtype"] = "Q7"
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)  # same length: the offsets stay right
    assert len(raw) == n
    f.write_bytes(data[:8] + raw + data[8 + n:])
    with pytest.raises(BitDanceError) as e:
        load_t2i(str(m))
    msg = str(e.value)
    assert msg.startswith(str(f)) and "not truncated" in msg and "Q7" in msg, msg
    assert "download it again" not in msg, msg


def test_wrong_shape(tmp_path):
    m = copy_model(tmp_path)
    sd = load_file(str(m / "projector.safetensors"))
    sd["fc1.weight"] = torch.zeros(64, 16)
    save_file(sd, str(m / "projector.safetensors"))
    with pytest.raises(BitDanceError, match=r"key 'fc1.weight' has shape \[64, 16\], expected \[64, 32\]"):
        load_t2i(str(m))


def test_missing_key(tmp_path):
    m = copy_model(tmp_path)
    sd = load_file(str(m / "ae.safetensors"))
    del sd["decoder.conv_out.bias"]
    save_file(sd, str(m / "ae.safetensors"))
    with pytest.raises(BitDanceError, match=r"ae.safetensors: .*missing keys \['decoder.conv_out.bias'\]"):
        load_t2i(str(m))


def test_unknown_config_key(tmp_path):
    m = copy_model(tmp_path)
    cfg = json.load(open(m / "vision_head_config.json")) | {"depth_latnet": 3}
    (m / "vision_head_config.json").write_text(json.dumps(cfg))
    with pytest.raises(BitDanceError, match=r"vision_head_config.json: unknown config key\(s\) \['depth_latnet'\]"):
        load_t2i(str(m))


def test_lm_head_is_accepted_and_never_loaded(tmp_path):
    m = copy_model(tmp_path)
    sd = load_file(str(m / "model.safetensors"))
    assert "lm_head.weight" in sd
    p = load_t2i(str(m))
    assert not any("lm_head" in k for k in p.backbone.state_dict())


def test_describe_from_configs_only(tmp_path):
    from bitdance_core import describe_t2i

    m = copy_model(tmp_path)
    for w in ("model.safetensors", "vision_head.safetensors"):
        os.remove(m / w)  # no weights needed to describe a model
    info = describe_t2i(str(m))
    assert (info.parallel_num, info.downsample, info.latent_channels, info.block_pixels) == (16, 16, 32, 64)
    assert (512, 512) in info.supported_sizes and info.ar_steps(1024, 1024) == 256
    os.remove(m / "vision_head_config.json")
    with pytest.raises(BitDanceError, match="not a BitDance text-to-image model folder: .*vision_head_config.json is missing"):
        describe_t2i(str(m))


def test_the_head_modulates_as_the_official_autocast_does():
    """Under the official bf16 autocast the head's layer norms run in float32 and the modulation
    `norm(x) * (1 + scale) + shift` is promoted to float32, rounded once where the next linear takes
    it. `head.modulate` does that in bf16 (not three bf16 roundings), and in float32 it is the plain
    formula, bit for bit (the fixtures' path)."""
    from bitdance_core.models.head import modulate

    g = torch.Generator().manual_seed(0)
    norm = torch.nn.LayerNorm(256, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(256, generator=g))
        norm.bias.copy_(0.1 * torch.randn(256, generator=g))
    x, scale, shift = (torch.randn(64, 256, generator=g) for _ in range(3))
    assert torch.equal(modulate(norm, x, scale, shift), norm(x) * (1 + scale) + shift)
    n16 = torch.nn.LayerNorm(256, eps=1e-6).to(torch.bfloat16)
    n16.load_state_dict(norm.state_dict())
    x16, s16, b16 = x.to(torch.bfloat16), scale.to(torch.bfloat16), shift.to(torch.bfloat16)
    got = modulate(n16, x16, s16, b16)
    once = (torch.nn.functional.layer_norm(x16.float(), (256,), n16.weight.float(), n16.bias.float(), 1e-6)
            * (1 + s16) + b16).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, once)
    assert not torch.equal(got, n16(x16) * (1 + s16) + b16)  # the all-bf16 chain rounds differently
