"""The split model loader in the real ComfyUI: the tiny split files conftest placed in
models/diffusion_models, text_encoders and vae (tests/split_files.py), ComfyUI's own Qwen
vocabulary as the prompt tokenizer, results equal to the engine loading the same files, and bad
input named clearly."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import uuid

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bitdance_core import to_uint8
from bitdance_core.pipelines.comfy_split import load_comfy_split
from bitdance_core.pipelines.prompts import (QWEN_MERGES_SHA256, QWEN_VOCAB_SHA256, qwen3_bitdance_codec,
                                             qwen_vocab_bitdance_codec)

from conftest import COMFY_DIR, MODELS
from helpers import TEST_WORKFLOWS, load, node_of
from test_comfy_split import PROMPTS, qwen3_files
from paths import fixture_tokens_raster, run_cli

COMFY_QWEN = os.path.join(COMFY_DIR, "comfy", "text_encoders", "qwen25_tokenizer")
LOADER = "BitDanceSplitModelLoader"


def _sha256_lf(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read().replace(b"\r\n", b"\n")).hexdigest()


def test_comfyui_ships_qwen3s_vocabulary():
    """ComfyUI's qwen25_tokenizer files are byte-identical to Qwen3's (= BitDance's, doc §1.6: sha256
    ca10d7e9…0910 and 8831e4f1…04d5), and the tokenizer built from them gives the official ids."""
    for name, doc in (("vocab.json", ("ca10d7e9", "0910")), ("merges.txt", ("8831e4f1", "04d5"))):
        ours = _sha256_lf(os.path.join(COMFY_QWEN, name))
        assert ours == _sha256_lf(os.path.join(qwen3_files(), name)), name  # the real Qwen3 files
        assert ours.startswith(doc[0]) and ours.endswith(doc[1]), name
    assert (_sha256_lf(os.path.join(COMFY_QWEN, "vocab.json")), _sha256_lf(os.path.join(COMFY_QWEN, "merges.txt"))) == \
        (QWEN_VOCAB_SHA256, QWEN_MERGES_SHA256)
    for P in (64, 16):
        ours = qwen_vocab_bitdance_codec(COMFY_QWEN, P)
        official = qwen3_bitdance_codec(os.path.join(qwen3_files(), "tokenizer.json"), P)
        for text in PROMPTS:
            pt = ours.encode_prompt(text, "blurry, low quality")
            ref = official.encode_prompt(text, "blurry, low quality")
            assert (pt.cond_ids, pt.uncond_ids) == (ref.cond_ids, ref.uncond_ids), text
        assert ours.image_prefix(64, 64, P) == official.image_prefix(64, 64, P) == \
            [151652, 151732, 151732, *range(151925, 151925 + P - 1)]
        assert list(ours.encode_prompt("a cat").cond_ids) == [151644, 872, 198, 64, 8251, 151645, 198, 151644, 77091, 198]


def test_dropdowns_list_comfyuis_folders(comfy):
    info = comfy.get(f"/object_info/{LOADER}")[LOADER]["input"]["required"]
    opts = {k: info[k][1]["options"] for k in ("main_model", "text_encoder", "vae")}
    assert {"tiny_fp8_main.safetensors", "tiny_fp32_main.safetensors", "tiny_qwen_main.safetensors"} <= set(opts["main_model"])
    assert "tiny_fp8_text_encoder.safetensors" in opts["text_encoder"] and "tiny_fp8_vae.safetensors" in opts["vae"]
    assert not any(o.endswith(".json") for o in opts["text_encoder"])  # the tokenizer beside is not a choice
    assert info["parallel_num"][1]["options"] == ["auto", "64", "16"]
    # the legacy folder names: models/unet is listed with diffusion_models, models/clip with text_encoders
    for legacy, key, src in (("unet", "main_model", "diffusion_models/tiny_fp8_main.safetensors"),
                             ("clip", "text_encoder", "text_encoders/tiny_fp8_text_encoder.safetensors")):
        d = os.path.join(comfy.base, "models", legacy)
        os.makedirs(d, exist_ok=True)
        link = os.path.join(d, f"legacy_{legacy}.safetensors")
        os.symlink(os.path.join(comfy.base, "models", src), link)
        try:
            listed = comfy.get(f"/object_info/{LOADER}")[LOADER]["input"]["required"][key][1]["options"]
            assert f"legacy_{legacy}.safetensors" in listed
        finally:
            os.remove(link)


def _split_workflow(kind: str, **loader) -> dict:
    """The tiny split workflow on the tiny_<kind> files, with a SaveLatent of the sampled bits (both
    outputs under a new name each time, so neither is answered from ComfyUI's cache)."""
    wf = copy.deepcopy(load(os.path.join(TEST_WORKFLOWS, "tiny_t2i_split.api.json")))
    ins = node_of(wf, LOADER)["inputs"]
    ins.update(main_model=f"tiny_{kind}_main.safetensors", text_encoder=f"tiny_{kind}_text_encoder.safetensors",
               vae=f"tiny_{kind}_vae.safetensors", **loader)
    tag = uuid.uuid4().hex[:8]
    node_of(wf, "SaveImage")["inputs"]["filename_prefix"] = f"split_{kind}_{tag}"
    wf["9"] = {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": f"latents/split_{kind}_{tag}"}}
    return wf


def _run(comfy, wf):
    """(bits [B, C, h, w] as SaveLatent wrote them, uint8 pixels [B, H, W, 3]) of a run."""
    entry = comfy.run(wf, timeout=600)
    (lat,) = [x for out in entry["outputs"].values() for x in out.get("latents", [])]
    bits = load_file(os.path.join(comfy.base, "output", lat["subfolder"], lat["filename"]))["latent_tensor"]
    pixels = np.stack([np.asarray(im.convert("RGB")) for ims in comfy.images(entry).values() for im in ims])
    return bits, pixels


def _engine(comfy, wf, kind: str, weights: str):
    """The same files loaded by the engine directly (no ComfyUI), generating the workflow's image."""
    ins = node_of(wf, LOADER)["inputs"]
    models = os.path.join(comfy.base, "models")
    pipe = load_comfy_split(os.path.join(models, "diffusion_models", ins["main_model"]),
                            os.path.join(models, "text_encoders", ins["text_encoder"]),
                            os.path.join(models, "vae", ins["vae"]), qwen_vocab=COMFY_QWEN if kind == "qwen" else None,
                            dtype=torch.float32, weights=weights)
    s = node_of(wf, "BitDanceARSampler")["inputs"]
    prompt = node_of(wf, "BitDanceTextEncode")["inputs"]["prompt"]
    bits = pipe.generate(prompt, height=s["height"], width=s["width"], steps=s["steps"], cfg=s["cfg"],
                         num_images=s["batch_size"], seed=s["seed"])
    return bits, to_uint8(pipe.autoencoder.decode(bits)).numpy()


@pytest.mark.parametrize("kind,loader,engine_weights", [
    ("fp8", {}, "as-is"),  # the committed tiny workflow: weights auto = as-is on the CPU (the fp8 values widened)
    ("fp8", {"weights": "fp8", "offload": "stream", "cuda_graphs": True}, "fp8"),  # fp8 bytes kept, streamed
    ("qwen", {"weights": "fp8", "offload": "stage"}, "fp8"),  # no tokenizer beside: ComfyUI's Qwen vocabulary
])
def test_split_workflow_equals_the_engine(comfy, kind, loader, engine_weights):
    wf = _split_workflow(kind, **loader)
    bits, pixels = _run(comfy, wf)
    ref_bits, ref_pixels = _engine(comfy, wf, kind, engine_weights)
    assert bits.shape == ref_bits.shape and torch.equal(bits, ref_bits), \
        f"{int((bits != ref_bits).sum())} bits differ from the engine's"
    assert pixels.shape == ref_pixels.shape
    assert np.abs(pixels.astype(int) - ref_pixels.astype(int)).max() <= 1
    log = open(comfy.log_path, encoding="utf-8", errors="replace").read()
    want = ("from the text encoder's 151940 vocabulary rows" if kind == "qwen" else "from the tokenizer's 15 query tokens")
    assert f"[BitDance] tiny_{kind}_main.safetensors: 16 tokens per step ({want})" in log
    if kind == "qwen":
        assert "tokenizer: Qwen3's vocabulary in " + os.path.realpath(COMFY_QWEN) in log
    if loader:
        assert f"weights {loader['weights']}, offload {loader['offload']}" in log


def test_full_precision_split_files_give_the_official_tokens_in_comfyui(comfy):
    """Split files holding the fixture's weights exactly (float32), weights as-is: the fixture's
    tokens bit for bit, as the folder loader gives them (what holds for the fp8 files: equal to
    the engine, above; their weights are rounded, so not the fixture's tokens)."""
    fx = os.path.dirname(MODELS["t2i-tiny-p16"])
    case = os.path.join(fx, "case1_cfg7.5_seed42")
    p = json.load(open(os.path.join(case, "params.json")))
    wf = _split_workflow("fp32", weights="as-is")
    s = node_of(wf, "BitDanceARSampler")["inputs"]
    assert (s["width"], s["height"], s["steps"], s["cfg"], s["seed"]) == \
        (p["width"], p["height"], p["num_sampling_steps"], p["guidance_scale"], p["seed"])
    assert node_of(wf, "BitDanceTextEncode")["inputs"]["prompt"] == p["prompt"]
    bits, pixels = _run(comfy, wf)
    ref = fixture_tokens_raster(case)
    assert int((bits.numpy() != ref).sum()) == 0
    diff = np.abs(pixels.astype(int) - np.load(os.path.join(case, "image.npy")).astype(int))
    assert diff.max() <= 1


def _error(comfy, wf) -> dict:
    entry = comfy.wait(comfy.queue_prompt(wf), timeout=300)
    errs = comfy.messages(entry, "execution_error")
    assert errs, json.dumps(entry["status"])[:2000]
    assert errs[0]["node_type"] == LOADER
    return errs[0]


def test_a_file_of_the_wrong_kind_is_named(comfy):
    """The VAE file put in models/diffusion_models and chosen as the main model."""
    dst = os.path.join(comfy.base, "models", "diffusion_models", "wrong_kind.safetensors")
    shutil.copy(os.path.join(comfy.base, "models", "vae", "tiny_fp8_vae.safetensors"), dst)
    try:
        wf = _split_workflow("fp8")
        node_of(wf, LOADER)["inputs"]["main_model"] = "wrong_kind.safetensors"
        msg = _error(comfy, wf)["exception_message"]
        assert dst in msg and "chosen as the BitDance main model, but it is a BitDance VAE file" in msg, msg
    finally:
        os.remove(dst)


def test_missing_keys_are_named(comfy):
    folder = os.path.join(comfy.base, "models", "text_encoders")
    te = load_file(os.path.join(folder, "tiny_fp8_text_encoder.safetensors"))
    te.pop("model.layers.1.mlp.down_proj.weight")
    dst = os.path.join(folder, "missing_key_text_encoder.safetensors")
    save_file(te, dst)
    shutil.copy(os.path.join(folder, "tiny_fp8_text_encoder_tokenizer.json"),
                os.path.join(folder, "missing_key_text_encoder_tokenizer.json"))
    try:
        wf = _split_workflow("fp8")
        node_of(wf, LOADER)["inputs"]["text_encoder"] = "missing_key_text_encoder.safetensors"
        msg = _error(comfy, wf)["exception_message"]
        assert dst in msg and "missing keys ['model.layers.1.mlp.down_proj.weight']" in msg, msg
    finally:
        os.remove(dst)
        os.remove(os.path.join(folder, "missing_key_text_encoder_tokenizer.json"))


def test_a_file_not_in_the_folder_is_refused_when_queued(comfy):
    wf = _split_workflow("fp8")
    node_of(wf, LOADER)["inputs"]["vae"] = "BitDance_VAE_FP16.safetensors"
    status, body = comfy.post_prompt(wf)
    assert status == 400 and "BitDance_VAE_FP16.safetensors" in json.dumps(body["node_errors"]), body


def test_model_info_route_reads_the_split_files(comfy):
    """What the web extension asks for the sampler's size presets when the split loader feeds it."""
    q = "main_model=tiny_qwen_main.safetensors&text_encoder=tiny_qwen_text_encoder.safetensors&vae=tiny_qwen_vae.safetensors"
    info = comfy.get(f"/bitdance/model_info?{q}&parallel_num=auto")
    assert info["available"] and info["parallel_num"] == 16 and info["downsample"] == 16 and info["layout"] == "split"
    assert info["official_sizes"] is True and [1024, 1024] in info["sizes"]  # the official presets (res tokens to 256)
    wrong = comfy.get(f"/bitdance/model_info?{q}&parallel_num=64")
    assert wrong["available"] is False and "151940 rows is that of a 16x model" in wrong["error"]
    missing = comfy.get("/bitdance/model_info?main_model=BitDance_14B_MainModel_FP8.safetensors"
                        "&text_encoder=tiny_qwen_text_encoder.safetensors&vae=tiny_qwen_vae.safetensors&parallel_num=auto")
    assert missing["available"] is False and "BitDance_14B_MainModel_FP8.safetensors" in missing["error"]


def test_split_files_at_the_top_of_models_bitdance_are_offered_and_run(comfy):
    """Some guides put the three files in models/bitdance/: each is offered in its own slot's dropdown
    only (its kind read from its keys), and a workflow naming them there gives the bits of the same
    files in ComfyUI's folders."""
    models = os.path.join(comfy.base, "models")
    links = {}
    for slot, folder in (("main", "diffusion_models"), ("text_encoder", "text_encoders"), ("vae", "vae")):
        links[slot] = os.path.join(models, "bitdance", f"guide_{slot}.safetensors")
        os.symlink(os.path.join(models, folder, f"tiny_qwen_{slot}.safetensors"), links[slot])
    try:
        info = comfy.get(f"/object_info/{LOADER}")[LOADER]["input"]["required"]
        opts = {k: info[k][1]["options"] for k in ("main_model", "text_encoder", "vae")}
        for key, slot in (("main_model", "main"), ("text_encoder", "text_encoder"), ("vae", "vae")):
            assert [o for o in opts[key] if o.startswith("guide_")] == [f"guide_{slot}.safetensors"], opts[key]
        wf = _split_workflow("qwen", weights="fp8", offload="stage")
        node_of(wf, LOADER)["inputs"].update(main_model="guide_main.safetensors",
                                             text_encoder="guide_text_encoder.safetensors", vae="guide_vae.safetensors")
        bits, _ = _run(comfy, wf)
        ref_bits, _ = _run(comfy, _split_workflow("qwen", weights="fp8", offload="stage"))
        assert torch.equal(bits, ref_bits)
    finally:
        for path in links.values():
            os.remove(path)


def test_a_4bit_text_encoder_written_once_is_read_by_the_split_loader(comfy):
    """weights 4bit through the Split Model Loader: the fp8 text encoder quantised on load, then, once
    `convert --text-encoder` has written <stem>-Q4_0.gguf beside it in models/text_encoders/, read from
    that file: the same bits (and the engine's), and the console says which."""
    te = os.path.join(comfy.base, "models", "text_encoders", "tiny_fp8_text_encoder.safetensors")
    q4 = te[: -len(".safetensors")] + "-Q4_0.gguf"
    assert not os.path.exists(q4)
    try:
        on_load, _ = _run(comfy, _split_workflow("fp8", weights="4bit", offload="none"))
        r = run_cli("convert", "--text-encoder", te, "--weights", "4bit")
        assert r.returncode == 0 and r.stdout.strip() == q4, r.stderr[-2000:]
        from_file, _ = _run(comfy, _split_workflow("fp8", weights="4bit", offload="stage"))  # new inputs: a new load
        assert torch.equal(on_load, from_file)
        ref_bits, _ = _engine(comfy, _split_workflow("fp8"), "fp8", "4bit")
        assert torch.equal(from_file, ref_bits)
        lines = open(comfy.log_path, encoding="utf-8", errors="replace").read().splitlines()
        assert any("weights 4bit, offload none" in x and "the text encoder is quantised on load" in x for x in lines)
        assert any("weights 4bit, offload stage" in x and "4-bit text encoder from tiny_fp8_text_encoder-Q4_0.gguf" in x
                   for x in lines)
    finally:
        if os.path.exists(q4):
            os.remove(q4)  # the other tests quantise on load
