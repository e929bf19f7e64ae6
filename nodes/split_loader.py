"""The split model loader: the community's three-file package (main model, text encoder, VAE) from
ComfyUI's own model folders, with the prompt tokenizer built from ComfyUI's Qwen vocabulary files.
Its outputs are the folder loader's, so the rest of the graph is the same."""
from __future__ import annotations

import os

from comfy_api.latest import io

from . import paths
from .engine import OFFLOAD_CHOICES, WEIGHTS_CHOICES, read_split
from .memory import DTYPE_CHOICES
from .t2i import ATTENTION_CHOICES, load_t2i_managed
from .types import ModelType, TokenizerType
from .validation import check_combos

PARALLEL_CHOICES = ["auto", "64", "16"]


class BitDanceSplitModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BitDanceSplitModelLoader",
            display_name="BitDance Split Model Loader",
            category="BitDance/loaders",
            description="Loads BitDance from three files in ComfyUI's model folders (the community fp8 package: "
                        "BitDance_14B_MainModel_FP8, BitDance_TextEncoder_FP8, BitDance_VAE_FP16). The prompt "
                        "tokenizer is Qwen3's vocabulary, which ComfyUI ships, plus BitDance's tokens: no download. "
                        "Same outputs as the BitDance Model Loader.",
            inputs=[
                io.Combo.Input("main_model", options=paths.list_split_files("diffusion_models"),
                               tooltip="models/diffusion_models/ (or the legacy models/unet/, or the top of "
                                       "models/bitdance/): the diffusion head and projector, e.g. "
                                       "BitDance_14B_MainModel_FP8.safetensors"),
                io.Combo.Input("text_encoder", options=paths.list_split_files("text_encoders"),
                               tooltip="models/text_encoders/ (or the legacy models/clip/, or the top of "
                                       "models/bitdance/): the Qwen3 backbone, e.g. BitDance_TextEncoder_FP8.safetensors"),
                io.Combo.Input("vae", options=paths.list_split_files("vae"),
                               tooltip="models/vae/ (or the top of models/bitdance/): the binary tokenizer, e.g. "
                                       "BitDance_VAE_FP16.safetensors"),
                io.Combo.Input("parallel_num", options=PARALLEL_CHOICES, default="auto",
                               tooltip="Tokens per AR step: 64 (BitDance-14B-64x) or 16 (14B-16x). auto: from the text "
                                       "encoder's vocabulary size (151669 + 256 + tokens per step - 1 rows)"),
                io.Combo.Input("dtype", options=DTYPE_CHOICES, default="auto",
                               tooltip="auto: bf16 on a GPU that supports it, fp32 on the CPU"),
                io.Combo.Input("attention", options=ATTENTION_CHOICES, default="auto",
                               tooltip="auto: PyTorch SDPA (flash kernels where the GPU has them)"),
                io.Combo.Input("weights", options=WEIGHTS_CHOICES, default="auto",
                               tooltip="fp8: the files' fp8 linears stay fp8 (as stored; computed in dtype). as-is: "
                                       "every weight widened to dtype (twice the memory of fp8, no dequantising per "
                                       "step). 4bit: the text encoder's linears in 4 bits (GGUF Q4_0: read from "
                                       "<text encoder>-Q4_0.gguf beside it, written once by `python -m bitdance_core "
                                       "convert --text-encoder FILE --weights 4bit`, or quantised on load), the "
                                       "head's fp8. auto: the first of as-is, fp8, 4bit that fits the free GPU memory "
                                       "without offloading; then 4bit with the least offloading. On the CPU auto is "
                                       "as-is."),
                io.Combo.Input("offload", options=OFFLOAD_CHOICES, default="auto",
                               tooltip="stage: backbone, head and VAE each on the GPU only while used. stream: some "
                                       "backbone layers stay on the GPU, the others are streamed from CPU memory. "
                                       "auto: the fastest that fits the free GPU memory (the console says what was "
                                       "chosen and why). On the CPU auto is none."),
                io.Boolean.Input("cuda_graphs", default=False,
                                 tooltip="Replay the diffusion head's sampling loop and the backbone's block step as "
                                         "CUDA graphs (falls back to eager where capture fails). GPU only; "
                                         "experimental until measured on a GPU."),
            ],
            outputs=[ModelType.Output(display_name="model"), TokenizerType.Output(display_name="tokenizer")],
        )

    @classmethod
    def validate_inputs(cls, main_model=None, text_encoder=None, vae=None):  # the files only: see validation.py
        return check_combos(cls, main_model=main_model, text_encoder=text_encoder, vae=vae)

    @classmethod
    def execute(cls, main_model: str, text_encoder: str, vae: str, parallel_num: str = "auto", dtype: str = "auto",
                attention: str = "auto", weights: str = "auto", offload: str = "auto",
                cuda_graphs: bool = False) -> io.NodeOutput:
        files = [paths.resolve_split_file("diffusion_models", main_model, "main model"),
                 paths.resolve_split_file("text_encoders", text_encoder, "text encoder"),
                 paths.resolve_split_file("vae", vae, "VAE")]
        split = read_split(*files, qwen_vocab=paths.comfy_qwen_vocab(),
                           parallel_num=None if parallel_num == "auto" else int(parallel_num))
        print(f"[BitDance] {main_model}: {split.summary()}", flush=True)
        key = "|".join([*(os.path.realpath(f) for f in files), str(split.parallel_num)])
        return io.NodeOutput(*load_t2i_managed(split, main_model, key, dtype, attention, weights, offload, cuda_graphs))


NODES = [BitDanceSplitModelLoader]
