"""Interrupt, invalid input, missing and corrupt models, mismatched graph values."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from helpers import API_WORKFLOWS, load, node_of, tiny_t2i


def _error(comfy, entry) -> dict:
    errs = comfy.messages(entry, "execution_error")
    assert errs, json.dumps(entry["status"])[:2000]
    return errs[0]


def test_interrupt_ends_sampling_within_one_block_and_the_next_prompt_runs(comfy):
    wf = tiny_t2i(width=1024, height=1024, steps=20, seed=5)  # 256 AR blocks: minutes if not stopped
    sampler_id = next(k for k, v in wf.items() if v["class_type"] == "BitDanceARSampler")
    seen = {}

    def on_message(t, d):
        if t == "progress" and d.get("node") == sampler_id and d["value"] >= 3 and "at" not in seen:
            seen["at"] = d["value"]
            comfy.interrupt()

    entry, msgs, _ = comfy.run_watching(wf, timeout=300, on_message=on_message)
    assert entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in [m[0] for m in entry["status"]["messages"]], entry["status"]
    values = [d["value"] for t, d in msgs if t == "progress" and d.get("node") == sampler_id]
    assert values[-1] <= seen["at"] + 1, f"interrupt asked at block {seen['at']}, sampling went on to {values[-1]}"
    assert values[-1] < 256
    # the server carries on
    after = comfy.run(tiny_t2i(seed=6))
    assert after["status"]["status_str"] == "success"


def test_invalid_inputs_are_refused_with_node_errors(comfy):
    wf = tiny_t2i()
    node_of(wf, "BitDanceARSampler")["inputs"]["width"] = -5
    status, body = comfy.post_prompt(wf)
    assert status == 400 and "3" in body["node_errors"], body
    assert "width" in json.dumps(body["node_errors"]["3"])

    wf = tiny_t2i()
    node_of(wf, "BitDanceModelLoader")["inputs"]["model"] = "no-such-model"
    status, body = comfy.post_prompt(wf)
    assert status == 400 and "no-such-model" in json.dumps(body["node_errors"])

    wf = tiny_t2i()  # a LATENT wired where a BitDance conditioning belongs
    node_of(wf, "BitDanceARSampler")["inputs"]["positive"] = ["4", 0]
    node_of(wf, "BitDanceDecode")["inputs"]["bits"] = ["3", 0]
    wf["9"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    node_of(wf, "BitDanceARSampler")["inputs"]["positive"] = ["9", 0]
    status, body = comfy.post_prompt(wf)
    assert status == 400 and "3" in body["node_errors"], body
    assert "BITDANCE_CONDITIONING" in json.dumps(body["node_errors"]["3"])


def test_size_the_model_cannot_make_names_the_value(comfy):
    wf = tiny_t2i(width=96, height=128)  # 96 is not a multiple of the 64 px block
    prompt_id = comfy.queue_prompt(wf)
    err = _error(comfy, comfy.wait(prompt_id))
    assert err["node_type"] == "BitDanceARSampler" and "width 96" in err["exception_message"]


def test_missing_weights_file_is_named(comfy):
    wf = tiny_t2i()
    node_of(wf, "BitDanceModelLoader")["inputs"]["model"] = "broken-missing"
    err = _error(comfy, comfy.wait(comfy.queue_prompt(wf)))
    assert err["node_type"] == "BitDanceModelLoader"
    assert os.path.join("broken-missing", "model.safetensors") in err["exception_message"] or \
        "model.safetensors" in err["exception_message"], err["exception_message"]


def test_corrupt_weights_file_is_named(comfy):
    wf = tiny_t2i()
    node_of(wf, "BitDanceModelLoader")["inputs"]["model"] = "broken-corrupt"
    err = _error(comfy, comfy.wait(comfy.queue_prompt(wf)))
    assert err["node_type"] == "BitDanceModelLoader"
    assert "broken-corrupt" in err["exception_message"] and "model.safetensors" in err["exception_message"]


def test_released_model_not_on_disk_says_where_it_goes(comfy):
    wf = tiny_t2i()
    node_of(wf, "BitDanceModelLoader")["inputs"]["model"] = "BitDance-14B-64x"
    err = _error(comfy, comfy.wait(comfy.queue_prompt(wf)))
    msg = err["exception_message"]
    assert "BitDance-14B-64x" in msg and "hf download shallowdream204/BitDance-14B-64x" in msg


def test_decode_refuses_a_latent_not_made_by_bitdance(comfy):
    wf = tiny_t2i()
    wf["9"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    node_of(wf, "BitDanceDecode")["inputs"]["bits"] = ["9", 0]
    err = _error(comfy, comfy.wait(comfy.queue_prompt(wf)))
    assert err["node_type"] == "BitDanceDecode" and "not made by a BitDance node" in err["exception_message"]


def test_conditioning_from_another_model_is_refused(comfy):
    """Text encoded with one model's tokenizer, sampled with another model: a clear error."""
    src = os.path.join(comfy.base, "models", "bitdance", "t2i-tiny-p16")
    other = os.path.join(comfy.base, "models", "bitdance", "t2i-tiny-other")
    os.makedirs(other)
    for f in os.listdir(src):
        os.symlink(os.path.join(src, f), os.path.join(other, f))
    wf = tiny_t2i(seed=99)
    wf["8"] = {"class_type": "BitDanceModelLoader",
               "inputs": {"model": "t2i-tiny-other", "dtype": "auto", "attention": "auto", "download": False}}
    node_of(wf, "BitDanceTextEncode")["inputs"]["model"] = ["8", 0]
    try:
        err = _error(comfy, comfy.wait(comfy.queue_prompt(wf)))
    finally:
        shutil.rmtree(other)
    assert err["node_type"] == "BitDanceARSampler" and "t2i-tiny-other" in err["exception_message"]


def test_download_failure_names_the_repository_and_folder(comfy):
    """The server runs with HF_HUB_OFFLINE=1: asking for a download fails fast, with a clear message,
    and leaves no empty folder behind."""
    wf = tiny_t2i()
    node_of(wf, "BitDanceModelLoader")["inputs"].update(model="BitDance-14B-16x", download=True)
    err = _error(comfy, comfy.wait(comfy.queue_prompt(wf)))
    msg = err["exception_message"]
    assert "downloading shallowdream204/BitDance-14B-16x into" in msg and "BitDance-14B-16x" in msg
    assert not os.path.exists(os.path.join(comfy.base, "models", "bitdance", "BitDance-14B-16x"))


@pytest.mark.parametrize("name,node,repo", [
    ("bitdance_imagenet_class", "BitDanceImageNetLoader", "shallowdream204/BitDance-ImageNet"),
    ("bitdance_tokenizer_roundtrip", "BitDanceTokenizerLoader", "shallowdream204/BitDance-Tokenizer"),
])
def test_missing_released_model_is_reported_once_with_its_download_command(comfy, upload_example, name, node, repo):
    """A released workflow queued as it is (its model not on disk): one error for that model (ComfyUI
    repeats a failed validate_inputs for every input the function takes), naming the folder it goes
    in and the command that downloads it."""
    wf = load(os.path.join(API_WORKFLOWS, f"{name}.api.json"))
    status, body = comfy.post_prompt(wf)
    assert status == 400, body
    errors = [e for n in body["node_errors"].values() for e in n["errors"]]
    assert len(errors) == 1, json.dumps(body["node_errors"], indent=1)
    loader_id = next(k for k, v in wf.items() if v["class_type"] == node)
    assert list(body["node_errors"]) == [loader_id]
    folder = os.path.join(comfy.base, "models", "bitdance", repo.split("/")[1])
    assert f"hf download {repo} --local-dir {folder}" in errors[0]["details"], errors[0]


def test_class_the_model_does_not_have_names_its_classes(comfy):
    """The digits demo has classes '0' .. '9': an ImageNet class (index 207) is refused when it runs,
    with the model's own class list."""
    wf = load(os.path.join(API_WORKFLOWS, "demo_digits_class.api.json"))
    node_of(wf, "BitDanceImageNetSampler")["inputs"].update(class_name="207: golden retriever", batch_size=1)
    err = _error(comfy, comfy.wait(comfy.queue_prompt(wf)))
    msg = err["exception_message"]
    assert err["node_type"] == "BitDanceImageNetSampler", err
    assert "class_name '207: golden retriever'" in msg and "10 classes (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)" in msg, msg
