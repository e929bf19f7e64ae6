"""Tiny ComfyUI split files (main model, text encoder, VAE) made from a tiny text-to-image fixture
with the engine's own writer (pipelines/comfy_split.py save_comfy_split), for the engine and the
ComfyUI server tests.

kinds:
- "fp8": the community package's layout and dtypes (big linears fp8 e4m3 + scales, the rest bf16,
  VAE fp16), with the fixture's tokenizer beside the text encoder (`<stem>_tokenizer.json`);
- "fp32": the same layout in float32, nothing quantised: the fixture's weights exactly;
- "qwen": like "fp8", but the text encoder's embedding has the rows of a Qwen3-based BitDance
  vocabulary (151669 + 256 + P-1, random) and no tokenizer beside it: the loader must build Qwen's
  tokenizer and read parallel_num from those rows, as for the community files.
"""
from __future__ import annotations

import json
import os

import torch

from bitdance_core.pipelines.comfy_split import save_comfy_split
from bitdance_core.pipelines.prompts import bitdance_vocab_size
from bitdance_core.pipelines.t2i_loading import load_t2i

KINDS = ("fp8", "fp32", "qwen")


def fixture_parallel_num(model_dir: str) -> int:
    with open(os.path.join(model_dir, "vision_head_config.json")) as f:
        return int(json.load(f)["parallel_num"])


def write_trimmed_tokenizer(model_dir: str, out_path: str, parallel_num: int) -> str:
    """The fixture's tokenizer.json with only the P-1 query tokens a P-token model has (the fixtures
    carry 63 for any P; a released tokenizer has exactly P-1). The ids of every other token stay."""
    with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    keep = {f"<|query_{i}|>" for i in range(1, parallel_num)}
    tok["added_tokens"] = [t for t in tok["added_tokens"]
                           if not t["content"].startswith("<|query_") or t["content"] in keep]
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False)
    return out_path


def write_split(model_dir: str, folder: str, stem: str, kind: str = "fp8") -> dict[str, str]:
    """Write the split files of the fixture model in `model_dir` into `folder`; returns their paths
    by slot (main_model, text_encoder, vae; plus tokenizer when one is written beside)."""
    assert kind in KINDS, kind
    pipe = load_t2i(model_dir, dtype=torch.float32)
    names = {"main_model": f"{stem}_main.safetensors", "text_encoder": f"{stem}_text_encoder.safetensors",
             "vae": f"{stem}_vae.safetensors"}
    if kind == "fp32":
        paths = save_comfy_split(pipe, folder, fp8=False, dtype=torch.float32, vae_dtype=torch.float32, names=names)
    else:
        paths = save_comfy_split(pipe, folder, names=names)
    P = fixture_parallel_num(model_dir)
    if kind == "qwen":
        from safetensors.torch import load_file, save_file

        te = load_file(paths["text_encoder"])
        hidden = te["model.embed_tokens.weight"].shape[1]
        g = torch.Generator().manual_seed(0)
        te["model.embed_tokens.weight"] = (0.1 * torch.randn(bitdance_vocab_size(P), hidden, generator=g)).to(torch.bfloat16)
        te.pop("lm_head.weight", None)  # not used by the pipeline; a loader must work without it
        save_file(te, paths["text_encoder"])
    else:
        paths["tokenizer"] = write_trimmed_tokenizer(
            model_dir, paths["text_encoder"][: -len(".safetensors")] + "_tokenizer.json", P)
    return paths
