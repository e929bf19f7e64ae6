"""The node pack on a real ComfyUI server: node definitions, results, caching, progress and previews."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import NODE_IDS, PROBE_PREAMBLE, REPO, TEST_WORKFLOWS, load, node_of, run_probe, tiny_t2i
from paths import assert_pixels_within_one_level, fixture_tokens_raster
from safetensors.torch import load_file

from bitdance_core import demo_models, describe_t2i
from bitdance_core.pipelines.sizes import OFFICIAL_SIZES

EXPECTED = {
    "BitDanceModelLoader": ({"model": "COMBO", "dtype": "COMBO", "attention": "COMBO", "download": "BOOLEAN",
                             "weights": "COMBO", "offload": "COMBO", "cuda_graphs": "BOOLEAN"},
                            ["BITDANCE_MODEL", "BITDANCE_TOKENIZER"]),
    "BitDanceSplitModelLoader": ({"main_model": "COMBO", "text_encoder": "COMBO", "vae": "COMBO", "parallel_num": "COMBO",
                                  "dtype": "COMBO", "attention": "COMBO", "weights": "COMBO", "offload": "COMBO",
                                  "cuda_graphs": "BOOLEAN"},
                                 ["BITDANCE_MODEL", "BITDANCE_TOKENIZER"]),
    "BitDanceTextEncode": ({"model": "BITDANCE_MODEL", "prompt": "STRING", "negative_prompt": "STRING"},
                           ["BITDANCE_CONDITIONING"]),
    "BitDanceARSampler": ({"model": "BITDANCE_MODEL", "positive": "BITDANCE_CONDITIONING",
                           "negative": "BITDANCE_CONDITIONING", "width": "INT", "height": "INT", "steps": "INT",
                           "cfg": "FLOAT", "seed": "INT", "batch_size": "INT", "sampler": "COMBO", "init": "LATENT"},
                          ["LATENT"]),
    "BitDanceTokenizerLoader": ({"tokenizer": "COMBO", "dtype": "COMBO"}, ["BITDANCE_TOKENIZER"]),
    "BitDanceDecode": ({"tokenizer": "BITDANCE_TOKENIZER", "bits": "LATENT", "gan_seed": "INT", "images_at_once": "INT",
                        "tile": "INT"},
                       ["IMAGE"]),
    "BitDanceEncode": ({"tokenizer": "BITDANCE_TOKENIZER", "image": "IMAGE"}, ["LATENT"]),
    "BitDanceExtendCanvas": ({"tokenizer": "BITDANCE_TOKENIZER", "bits": "LATENT", "side": "COMBO", "pixels": "INT"},
                             ["LATENT"]),
    "BitDanceImageNetLoader": ({"checkpoint": "COMBO", "vae": "COMBO", "dtype": "COMBO"},
                               ["BITDANCE_IMAGENET_MODEL", "BITDANCE_TOKENIZER"]),
    "BitDanceImageNetSampler": ({"model": "BITDANCE_IMAGENET_MODEL", "class_name": "COMBO", "class_index": "INT",
                                 "steps": "INT", "cfg": "FLOAT", "cfg_schedule": "COMBO", "seed": "INT",
                                 "batch_size": "INT", "init": "LATENT"}, ["LATENT"]),
}


def _type(spec):
    t = spec[0]
    return "COMBO" if isinstance(t, list) else t


def test_object_info_lists_every_node(comfy):
    info = comfy.get("/object_info")
    assert sorted(k for k in info if k.startswith("BitDance")) == sorted(NODE_IDS)
    for node, (inputs, outputs) in EXPECTED.items():
        d = info[node]
        assert d["category"].startswith("BitDance/"), node
        got = {k: _type(v) for sec in ("required", "optional") for k, v in d["input"].get(sec, {}).items()}
        assert got == inputs, node
        assert d["output"] == outputs, node
    opts = info["BitDanceModelLoader"]["input"]["required"]["model"][1]["options"]
    assert "t2i-tiny-p16" in opts and "BitDance-14B-64x" in opts and "imagenet-tiny-p4" not in opts
    assert info["BitDanceTokenizerLoader"]["input"]["required"]["tokenizer"][1]["options"][:1] == ["ae-tiny"]
    classes = info["BitDanceImageNetSampler"]["input"]["required"]["class_name"][1]["options"]
    assert len(classes) == 1000 and classes[207] == "207: golden retriever"
    assert comfy.get("/object_info/BitDanceARSampler")["BitDanceARSampler"]["input"]["required"]["seed"][1][
        "control_after_generate"] is True


def test_model_list_follows_the_disk(comfy):
    link = os.path.join(comfy.base, "models", "bitdance", "added-later")
    os.symlink(os.path.join(comfy.base, "models", "bitdance", "t2i-tiny-p16"), link)
    try:
        opts = comfy.get("/object_info/BitDanceModelLoader")["BitDanceModelLoader"]["input"]["required"]["model"][1]
        assert "added-later" in opts["options"]
    finally:
        os.remove(link)
    opts = comfy.get("/object_info/BitDanceModelLoader")["BitDanceModelLoader"]["input"]["required"]["model"][1]
    assert "added-later" not in opts["options"]


def test_model_info_route(comfy):
    """The sizes each model makes, as the engine computes them (the web extension's presets)."""
    info = comfy.get("/bitdance/model_info?model=t2i-tiny-p16")
    assert info["available"] and info["parallel_num"] == 16 and info["downsample"] == 16
    assert info["official_sizes"] is True and info["sizes"] == [list(s) for s in OFFICIAL_SIZES]
    demo = comfy.get("/bitdance/model_info?model=demo/digits-t2i")
    rule = describe_t2i(demo_models.T2I).size_rule
    assert demo["official_sizes"] is False and demo["sizes"] == [list(s) for s in rule.sizes]
    assert demo["sizes"][0] == [32, 32] and demo["sizes"][-1] == [512, 512] and demo["max_side"] == 512
    missing = comfy.get("/bitdance/model_info?model=BitDance-14B-64x")
    assert missing["available"] is False and "BitDance-14B-64x" in missing["error"]


def test_imagenet_info_route(comfy):
    """The classes of each class-conditional checkpoint (the class sampler's list in the web extension)."""
    demo = comfy.get("/bitdance/imagenet_info?checkpoint=demo/digits-imagenet/model.pt")
    assert demo["available"] and demo["classes"] == [str(i) for i in range(10)]
    tiny = comfy.get("/bitdance/imagenet_info?checkpoint=imagenet-tiny-p4/model.pt")
    assert tiny["available"] and len(tiny["classes"]) == 10
    missing = comfy.get("/bitdance/imagenet_info?checkpoint=BitDance-ImageNet/BitDance_B_1x.pt")
    assert missing["available"] is False and "hf download shallowdream204/BitDance-ImageNet" in missing["error"]


def test_imagenet_loader_takes_a_bitdance_tokenizer_safetensors(comfy):
    """BitDance-Tokenizer ships its tokenizer as ae_*.safetensors with plain encoder.*/decoder.* names; placed
    in models/bitdance/ it is offered as the ImageNet Loader's vae and gives the same images as the .pt."""
    import torch
    from safetensors.torch import save_file

    from bitdance_core.pipelines.tokenizers import tokenizer_source

    vsrc, _ = tokenizer_source(os.path.join(comfy.base, "models", "bitdance", "imagenet-tiny-p4", "vae.pt"))
    weights = {k: vsrc.read(k, "cpu", None).contiguous() for k in vsrc.keys() if k.startswith(("encoder.", "decoder."))}
    assert weights and all(isinstance(t, torch.Tensor) for t in weights.values())
    path = os.path.join(comfy.base, "models", "bitdance", "ae_imagenet_tiny.safetensors")
    save_file(weights, path)
    # the same tokenizer with its output shifted: proves the file chosen is the one decoding
    shifted = os.path.join(comfy.base, "models", "bitdance", "ae_imagenet_tiny_shifted.safetensors")
    save_file({**weights, "decoder.conv_out.bias": weights["decoder.conv_out.bias"] + 0.5}, shifted)
    try:
        info = comfy.get("/object_info/BitDanceImageNetLoader")["BitDanceImageNetLoader"]["input"]["required"]
        assert "ae_imagenet_tiny.safetensors" in info["vae"][1]["options"]
        images = []
        for vae in ("imagenet-tiny-p4/vae.pt", "ae_imagenet_tiny.safetensors", "ae_imagenet_tiny_shifted.safetensors"):
            wf = {
                "1": {"class_type": "BitDanceImageNetLoader",
                      "inputs": {"checkpoint": "imagenet-tiny-p4/model.pt", "vae": vae, "dtype": "auto"}},
                "2": {"class_type": "BitDanceImageNetSampler",
                      "inputs": {"model": ["1", 0], "class_name": "3: tiger shark", "class_index": 3, "steps": 2,
                                 "cfg": 4.0, "cfg_schedule": "linear", "seed": 11, "batch_size": 1}},
                "3": {"class_type": "BitDanceDecode", "inputs": {"tokenizer": ["1", 1], "bits": ["2", 0],
                                                                  "images_at_once": 0, "gan_seed": 0}},
                "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
            }
            (imgs,) = comfy.images(comfy.run(wf)).values()
            images.append(np.asarray(imgs[0].convert("RGB")))
        assert images[0].shape == (256, 256, 3) and np.array_equal(images[0], images[1])
        assert not np.array_equal(images[0], images[2])
    finally:
        os.remove(path)
        os.remove(shifted)


def test_t2i_equals_the_cli(comfy, tmp_path, fixtures_dir):
    """The tiny T2I workflow (fixture case 1 settings) through ComfyUI == the engine's CLI == the
    fixture: the sampled bits (saved with ComfyUI's SaveLatent) bit for bit; the pixels within one
    level (float32 decoding rounds differently between CPUs, e.g. AVX2 and AVX512)."""
    wf = load(os.path.join(TEST_WORKFLOWS, "tiny_t2i.api.json"))
    s = node_of(wf, "BitDanceARSampler")["inputs"]
    sampler_id = next(k for k, v in wf.items() if v["class_type"] == "BitDanceARSampler")
    wf["9"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler_id, 0], "filename_prefix": "equals_cli"}}
    entry, msgs, binary = comfy.run_watching(wf, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    (img,) = [im for ims in comfy.images(entry).values() for im in ims]
    assert img.size == (s["width"], s["height"])
    ours = np.asarray(img.convert("RGB"))
    (saved,) = entry["outputs"]["9"]["latents"]
    ours_bits = load_file(os.path.join(comfy.base, "output", saved["subfolder"], saved["filename"]))["latent_tensor"]

    cli_px, cli_tok = tmp_path / "cli.npy", tmp_path / "cli_tokens.npy"
    enc = node_of(wf, "BitDanceTextEncode")["inputs"]
    cmd = [sys.executable, "-m", "bitdance_core", "t2i", "--model", os.path.join(fixtures_dir, "t2i-tiny-p16", "model"),
           "--prompt", enc["prompt"], "--height", str(s["height"]), "--width", str(s["width"]),
           "--steps", str(s["steps"]), "--cfg", str(s["cfg"]), "--seed", str(s["seed"]),
           "--num-images", str(s["batch_size"]), "--device", "cpu", "--dtype", "float32",
           "--pixels-npy", str(cli_px), "--tokens-npy", str(cli_tok)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    case = os.path.join(fixtures_dir, "t2i-tiny-p16", "case1_cfg7.5_seed42")
    ref_bits = fixture_tokens_raster(case)
    assert np.array_equal(ours_bits.numpy(), ref_bits), f"{int((ours_bits.numpy() != ref_bits).sum())} bits differ"
    assert np.array_equal(np.load(cli_tok), ref_bits)
    assert_pixels_within_one_level(ours, np.load(cli_px)[0], "ComfyUI vs the CLI")
    assert_pixels_within_one_level(ours, np.load(os.path.join(case, "image.npy"))[0], "ComfyUI vs the fixture")

    # progress: one update per AR block (256x256 at 16 tokens per block = 16 blocks), live previews
    prog = [d for t, d in msgs if t == "progress" and d.get("node") == sampler_id]
    values = [p["value"] for p in prog]
    assert {p["max"] for p in prog} == {16}
    if comfy.get("/system_stats")["system"]["comfyui_version"] == "0.3.75":
        assert values == list(range(1, 17))
    else:
        # Newer ComfyUI (since January 2026) drops updates that come under 100 ms after the last one
        # sent, except the first, the last and those carrying a preview (here every 2nd block).
        assert values == sorted(set(values)) and values[0] == 1 and values[-1] == 16, values
        assert set(range(2, 16, 2)) <= set(values), values
    assert binary >= 4, "expected live preview frames over the websocket"


def test_same_inputs_are_cached_and_a_new_seed_recomputes(comfy):
    wf = tiny_t2i(seed=11)
    first = comfy.run(wf)
    again = comfy.run(wf)
    cached = set(comfy.messages(again, "execution_cached")[0]["nodes"])
    sampler_id = next(k for k, v in wf.items() if v["class_type"] == "BitDanceARSampler")
    loader_id = next(k for k, v in wf.items() if v["class_type"] == "BitDanceModelLoader")
    assert {sampler_id, loader_id} <= cached
    wf2 = tiny_t2i(seed=12)
    third = comfy.run(wf2)
    cached = set(comfy.messages(third, "execution_cached")[0]["nodes"])
    assert loader_id in cached and sampler_id not in cached
    a, b = comfy.images(first), comfy.images(third)
    assert np.asarray(list(a.values())[0][0]).tolist() != np.asarray(list(b.values())[0][0]).tolist()


def test_negative_prompt_node_and_batch(comfy):
    wf = tiny_t2i(seed=3, cfg=4.0)
    wf["9"] = {"class_type": "BitDanceTextEncode", "inputs": {"model": ["1", 0], "prompt": "blurry", "negative_prompt": ""}}
    node_of(wf, "BitDanceARSampler")["inputs"].update(negative=["9", 0], batch_size=2, width=192, height=64)
    entry = comfy.run(wf)
    (imgs,) = comfy.images(entry).values()
    assert [im.size for im in imgs] == [(192, 64), (192, 64)]


@pytest.mark.parametrize("name", ["tiny_imagenet", "tiny_tokenizer_roundtrip"])
def test_tiny_workflows(comfy, name, upload_example):
    wf = load(os.path.join(TEST_WORKFLOWS, f"{name}.api.json"))
    entry = comfy.run(wf)
    imgs = [im for ims in comfy.images(entry).values() for im in ims]
    if name == "tiny_imagenet":
        assert [im.size for im in imgs] == [(256, 256)] * node_of(wf, "BitDanceImageNetSampler")["inputs"]["batch_size"]
    else:
        scale = node_of(wf, "ImageScale")["inputs"]
        assert [im.size for im in imgs] == [(scale["width"], scale["height"])]


REGISTRATION_PROBE = PROBE_PREAMBLE + """
from bitdance_pack.nodes import t2i
managed = t2i.BitDanceModelLoader.execute("demo/digits-t2i").result[0]
print("REGISTERED", sum(l.model is managed.patcher for l in mm.current_loaded_models))
mm.unload_all_models()
print("AFTER_UNLOAD", sum(l.model is managed.patcher for l in mm.current_loaded_models))
managed.ensure_loaded()
print("AGAIN", sum(l.model is managed.patcher for l in mm.current_loaded_models))
"""


def test_a_loaded_model_is_known_to_comfyui_before_it_samples(tmp_path):
    """The loader puts the weights on the device itself, so ComfyUI must be told at once: its free
    memory, the sampler's fit check (which counts the models ComfyUI can unload) and "unload models"
    see the model from the loader on, not from the first sampler run. ComfyUI 0.3.75's own
    model_management, in a process of its own (as ComfyUI would run it, on the CPU)."""
    res, lines = run_probe(tmp_path, REGISTRATION_PROBE)
    assert lines.get("REGISTERED") == "1", res.stdout[-2000:]
    assert lines.get("AFTER_UNLOAD") == "0" and lines.get("AGAIN") == "1", res.stdout[-2000:]


CACHE_AND_PIN_PROBE = PROBE_PREAMBLE + """
from comfy.cli_args import args
from bitdance_pack.nodes import memory, t2i, tokenizer
print("PIN_CPU", memory.pin_host_copies())  # --cpu: ComfyUI pins nothing (MAX_PINNED_MEMORY -1)
mm.MAX_PINNED_MEMORY = 1 << 30
print("PIN_ALLOWED", memory.pin_host_copies())
args.disable_pinned_memory = True
print("PIN_DISABLED", memory.pin_host_copies())
def own_bytes(modules):
    return sum({t.data_ptr(): t.numel() * t.element_size() for m in modules for t in
                list(m.parameters()) + list(m.buffers())}.values())
managed, tok = t2i.BitDanceModelLoader.execute("demo/digits-t2i", dtype="bf16").result  # float32 file: copies
own = own_bytes(managed.modules.values())
print("RAM", managed.get_ram_usage(), own, sum(t.numel() for t in managed._comfy_cache_tensors()))
print("TOK_WITH_MODEL", tok.get_ram_usage(), len(tok._comfy_cache_tensors()))
mapped = t2i.BitDanceModelLoader.execute("demo/digits-t2i", dtype="fp32").result[0]  # the file's own pages
print("RAM_MAPPED", mapped.get_ram_usage(), own_bytes(mapped.modules.values()), int(sys.platform.startswith("linux")))
alone = tokenizer.BitDanceTokenizerLoader.execute("demo/digits-t2i", dtype="bf16").result[0]
ae_bytes = own_bytes([alone.ae])
print("TOK_ALONE", alone.get_ram_usage(), alone.owner.get_ram_usage(), ae_bytes)
t2i.BitDanceModelLoader.execute("demo/digits-t2i", cuda_graphs=True)  # on the CPU: "off (no CUDA device)"
args.disable_cuda_graphs = True  # a newer ComfyUI's flag
t2i.BitDanceModelLoader.execute("demo/digits-t2i", cuda_graphs=True)
"""


def test_loaded_models_tell_comfyui_their_ram_and_follow_its_pinning(tmp_path):
    """In ComfyUI 0.3.75's own process (on the CPU): a loaded model's output reports the CPU memory it
    holds to ComfyUI's RAM caches (get_ram_usage for --cache-ram, _comfy_cache_tensors for the newer
    RAM-pressure cache), a tokenizer that came with a model is not counted twice, and the host copies
    are pinned only where ComfyUI's own pinning is on; a newer ComfyUI's --disable-cuda-graphs (set
    here on 0.3.75's args) turns the loader's cuda_graphs off."""
    res, lines = run_probe(tmp_path, CACHE_AND_PIN_PROBE)
    assert lines.get("PIN_CPU") == "False" and lines.get("PIN_ALLOWED") == "None", res.stdout[-2000:]
    assert lines.get("PIN_DISABLED") == "False", res.stdout[-2000:]
    ram, own, cached = (int(x) for x in lines["RAM"].split())
    assert own > 0 and own <= ram <= own * 1.05 and cached == ram, lines["RAM"]  # the whole model, on the CPU here
    # read in the file's dtype, the weights are the file's mapped pages (Linux tells them apart: not held memory)
    ram_mapped, own_mapped, linux = (int(x) for x in lines["RAM_MAPPED"].split())
    assert ram_mapped < own_mapped * 0.1 if linux else own_mapped <= ram_mapped, lines["RAM_MAPPED"]
    assert lines["TOK_WITH_MODEL"] == "0 0"
    alone, owner, ae_bytes = (int(x) for x in lines["TOK_ALONE"].split())
    assert alone == owner and ae_bytes <= alone <= ae_bytes * 1.05, lines["TOK_ALONE"]
    graphs = [line for line in res.stdout.splitlines() if "CUDA graphs" in line]
    assert len(graphs) == 2 and "no CUDA device" in graphs[0] and "--disable-cuda-graphs" in graphs[1], graphs


def test_models_are_managed_by_comfyui(comfy):
    """Our model is loaded through comfy.model_management (a ModelPatcher), ComfyUI's "free memory"
    (unload models + drop caches) releases it, and the next prompt reloads it with the same result."""
    wf = tiny_t2i(seed=21)
    before = comfy.images(comfy.run(wf))
    with open(comfy.log_path) as f:
        assert "Requested to load ModuleDict" in f.read()
    status, _ = comfy.request("POST", "/free", {"unload_models": True, "free_memory": True})
    assert status == 200
    loader_id = next(k for k, v in wf.items() if v["class_type"] == "BitDanceModelLoader")
    again = comfy.run(wf)
    if loader_id in comfy.messages(again, "execution_cached")[0]["nodes"]:
        # the prompt worker took this prompt before it saw the /free flags; it handles them right
        # after that prompt, before it takes the next one
        again = comfy.run(wf)
    assert loader_id not in comfy.messages(again, "execution_cached")[0]["nodes"]
    a, b = list(before.values())[0][0], list(comfy.images(again).values())[0][0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
