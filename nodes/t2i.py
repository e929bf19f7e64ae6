"""Text-to-image nodes: model loader, text encode, AR sampler."""
from __future__ import annotations

import os

import torch
from comfy.cli_args import args
from comfy_api.latest import io

from . import paths
from .download import download_release
from .engine import (OFFLOAD_CHOICES, WEIGHTS_CHOICES, bd, check_generation, describe_loaded, enable_cuda_graphs,
                     find_t2i_files, load_t2i_planned, plan_t2i, read_t2i)
from .memory import (DTYPE_CHOICES, Managed, free_memory_for_planning, make_room, pick_device, pick_dtype,
                     pin_host_copies)
from .continuation import init_input, read_init
from .validation import check_combo
from .progress import BlockProgress, preview_decoder
from .types import Conditioning, ConditioningType, ModelType, Tokenizer, TokenizerType, bits_latent, expect

ATTENTION_CHOICES = ["auto", "sdpa", "flash"]
SAMPLER_CHOICES = ["euler_maruyama", "euler"]


class BitDanceModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BitDanceModelLoader",
            display_name="BitDance Model Loader",
            category="BitDance/loaders",
            description="Loads a BitDance text-to-image model folder from models/bitdance/ (official or diffusers "
                        "layout). Its binary tokenizer comes out too, for decoding the sampled bits.",
            inputs=[
                io.Combo.Input("model", options=paths.list_t2i_models(),
                               tooltip="A folder in models/bitdance/. Released names not on disk yet are listed too: "
                                       "turn on 'download' to fetch them there."),
                io.Combo.Input("dtype", options=DTYPE_CHOICES, default="auto",
                               tooltip="auto: bf16 on a GPU that supports it, fp32 on the CPU"),
                io.Combo.Input("attention", options=ATTENTION_CHOICES, default="auto",
                               tooltip="auto: PyTorch SDPA (flash kernels where the GPU has them)"),
                io.Boolean.Input("download", default=False,
                                 tooltip="Download a released model that is missing into models/bitdance/<name> "
                                         "(Hugging Face; never into a hidden cache)"),
                # optional: API prompts written before these options existed still validate (as auto)
                io.Combo.Input("weights", options=WEIGHTS_CHOICES, default="auto", optional=True,
                               tooltip="fp8: backbone and head linears stored as float8 (half the memory, computed in "
                                       "dtype). 4bit: the backbone's linears in 4 bits (GGUF Q4_0, from the folder's "
                                       "backbone-Q4_0.gguf, or quantised on load), the head's in fp8: 14B fits 12-16 GB "
                                       "cards. auto: the first of as stored, fp8, 4bit that fits the free GPU memory "
                                       "without offloading; then 4bit with the least offloading. On the CPU auto is as "
                                       "stored."),
                io.Combo.Input("offload", options=OFFLOAD_CHOICES, default="auto", optional=True,
                               tooltip="stage: backbone, head and autoencoder each on the GPU only while used. "
                                       "stream: some backbone layers stay on the GPU, the others are streamed from "
                                       "CPU memory. auto: the fastest that fits the free GPU memory (the console says "
                                       "what was chosen and why). On the CPU auto is none."),
                io.Boolean.Input("cuda_graphs", default=False, optional=True,
                                 tooltip="Replay the diffusion head's sampling loop and the backbone's block step "
                                         "as CUDA graphs (far fewer kernel launches; falls back to eager where "
                                         "capture fails). GPU only; experimental until measured on a GPU."),
            ],
            outputs=[ModelType.Output(display_name="model"), TokenizerType.Output(display_name="tokenizer")],
        )

    @classmethod
    def validate_inputs(cls, model=None):  # one input: see validation.py
        return check_combo(cls, "model", model)

    @classmethod
    def execute(cls, model: str, dtype: str = "auto", attention: str = "auto", download: bool = False,
                weights: str = "auto", offload: str = "auto", cuda_graphs: bool = False) -> io.NodeOutput:
        path = resolve_or_download(model, "model", download)
        return io.NodeOutput(*load_t2i_managed(read_t2i(path), model, os.path.realpath(path), dtype, attention, weights,
                                               offload, cuda_graphs))


def load_t2i_managed(source, name: str, key: str, dtype: str, attention: str, weights: str, offload: str,
                     cuda_graphs: bool) -> tuple[Managed, Tokenizer]:
    """The model loaders' common part: the engine plans (weights, offload) for the free memory and
    says why, ComfyUI makes room, the engine loads, and ComfyUI gets the model to manage.
    source: a model folder's configs (engine.read_t2i) or the split files' (engine.read_split); key: what a
    conditioning made with this model must match."""
    device = pick_device()
    torch_dtype = pick_dtype(dtype, device)
    # the engine decides (from the configs and the free memory) and says why, for the largest square
    # this model makes (the sampler checks its own size and batch before it starts)
    info = describe_loaded(source)
    h, w = info["reference_size"]
    decision = plan_t2i(source, free_memory_for_planning(device), device, torch_dtype, weights, offload, h, w)
    print(f"[BitDance] {name} ({info['parallel_num']} tokens per step, {info['summary']}; memory planned for "
          f"its largest square, {w}x{h}): {decision.summary()}", flush=True)
    make_room(key, device, torch_dtype, need=decision.plan.peak_bytes)  # need given: `key` is not read as a path
    pipe, off = load_t2i_planned(source, decision, device, torch_dtype,
                                 attention="sdpa" if attention == "auto" else attention, pin=pin_host_copies())
    if cuda_graphs and getattr(args, "disable_cuda_graphs", False):  # a newer ComfyUI's switch
        print(f"[BitDance] {name}: CUDA graphs off: ComfyUI was started with --disable-cuda-graphs", flush=True)
        cuda_graphs = False
    if cuda_graphs:
        enabled = enable_cuda_graphs(pipe)  # after the offload hooks
        print(f"[BitDance] {name}: CUDA graphs {'on' if enabled else 'off (no CUDA device)'}", flush=True)
    managed = Managed(pipe, {"backbone": pipe.backbone, "head": pipe.head, "projector": pipe.projector,
                             "autoencoder": pipe.autoencoder}, device, key, name, offload=off, memory=decision)
    managed.park()  # an offloaded model holds nothing on the GPU until a sampler uses it
    return managed, Tokenizer(pipe.autoencoder, managed)


def resolve_or_download(name: str, what: str, download: bool) -> str:
    """The model folder; a released name that is not (completely) on disk is downloaded when asked."""
    if name not in paths.RELEASES:
        return paths.resolve(name, what)
    try:
        path = paths.resolve(name, what)
        find_t2i_files(path)
        return path
    except bd.BitDanceError:
        pass
    target = os.path.join(paths.default_root(), name)
    if not download:
        raise bd.BitDanceError(f"{what} '{name}' is not on disk: {paths.download_hint(name)}, or turn on 'download' "
                               "in this node")
    return download_release(name, target)


class BitDanceTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BitDanceTextEncode",
            display_name="BitDance Text Encode",
            category="BitDance/conditioning",
            description="Templates and tokenizes a prompt (cheap: the backbone runs in the sampler). The negative "
                        "prompt, if given, replaces the official unconditional prompt for guidance.",
            inputs=[
                ModelType.Input("model"),
                io.String.Input("prompt", multiline=True, default="", placeholder="what to draw"),
                io.String.Input("negative_prompt", multiline=True, default="", optional=True,
                                placeholder="optional; empty = the official unconditional prompt"),
            ],
            outputs=[ConditioningType.Output(display_name="conditioning")],
        )

    @classmethod
    def execute(cls, model, prompt: str, negative_prompt: str = "") -> io.NodeOutput:
        managed = expect(model, Managed, "model", "BitDance Model Loader")
        tokens = managed.obj.encode_prompt(prompt, negative_prompt or None)
        return io.NodeOutput(Conditioning(tokens, managed.key, managed.name))


class BitDanceARSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BitDanceARSampler",
            display_name="BitDance AR Sampler",
            category="BitDance/sampling",
            description="Generates the image's binary tokens block by block (the progress bar counts AR blocks). "
                        "Outputs a LATENT of ±1 bits for BitDance Decode.",
            inputs=[
                ModelType.Input("model"),
                ConditioningType.Input("positive"),
                ConditioningType.Input("negative", optional=True,
                                       tooltip="Its prompt replaces the unconditional prompt (overrides the "
                                               "positive node's negative prompt)"),
                io.Int.Input("width", default=1024, min=16, max=4096, step=16,
                             tooltip="Must divide by the model's block size: 128 px (64x models), 64 px (16x), "
                                     "16 px (the digits demo model, 32 px native)"),
                io.Int.Input("height", default=1024, min=16, max=4096, step=16),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="Diffusion-head steps per AR block"),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance scale; 1 or less turns guidance off"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Int.Input("batch_size", default=1, min=1, max=64),
                io.Combo.Input("sampler", options=SAMPLER_CHOICES, default="euler_maruyama", optional=True),
                init_input(),
            ],
            outputs=[io.Latent.Output(display_name="bits")],
        )

    @classmethod
    def validate_inputs(cls, sampler=None):
        return check_combo(cls, "sampler", sampler)

    @classmethod
    def execute(cls, model, positive, width: int, height: int, steps: int, cfg: float, seed: int, batch_size: int,
                negative=None, sampler: str = "euler_maruyama", init=None) -> io.NodeOutput:
        managed = expect(model, Managed, "model", "BitDance Model Loader")
        pos = expect(positive, Conditioning, "positive", "BitDance Text Encode")
        pipe = managed.obj
        tokens = pos.tokens
        for cond, what in ((pos, "positive"), (negative, "negative")):
            if cond is None:
                continue
            expect(cond, Conditioning, what, "BitDance Text Encode")
            if cond.model_key != managed.key:
                raise bd.BitDanceError(f"{what}: encoded with the tokenizer of '{cond.model_name}', but the sampler's "
                                       f"model is '{managed.name}'; connect the same model to both nodes")
        if negative is not None:
            tokens = pipe.encode_prompt(pos.tokens.prompt, negative.tokens.prompt)
        init_bits = keep = None
        if init is not None:  # continue an image: its size and mask
            init_bits, mask, batch_size, height, width = read_init(init, pipe.autoencoder.family, pipe.downsample,
                                                                   batch_size)
            try:
                grid = pipe.block_grid(height, width)
            except bd.BitDanceError as e:
                raise bd.BitDanceError(f"init: its size, {width}x{height} px, does not fit this model: {e}") from e
            keep = bd.keep_from_noise_mask(grid, mask, batch_size)
        pipe.check_size(height, width)
        fit = None
        if managed.memory is not None:  # the engine predicts this generation's peak as the model is loaded
            fit = check_generation(pipe, managed.memory, height, width, batch_size, cfg,
                                   managed.free_bytes_for_generation(), tokens)
            if not fit.fits:
                print(f"[BitDance] warning: {fit.message}", flush=True)
        managed.ensure_loaded(fit.plan if fit is not None else None)
        # a live preview decodes one image in the middle of sampling, next to the KV cache and the head's state
        whole_fits = fit is None or fit.whole_preview_fits(pipe.autoencoder.config, height, width,
                                                            pipe.autoencoder._param_dtype())
        progress = BlockProgress(decode=preview_decoder(pipe.autoencoder, pipe.device, whole_fits))
        try:
            bits = pipe.generate(tokens, height=height, width=width, steps=steps, cfg=cfg, num_images=batch_size,
                                 seed=seed, sampler=sampler, callback=progress, init_bits=init_bits, keep=keep)
        except torch.cuda.OutOfMemoryError as e:  # still one for ComfyUI (it unloads models after it)
            hint = (fit.message if fit is not None and fit.message
                    else "use a smaller size or batch, or fp8 weights / an offload mode in the loader")
            raise bd.OutOfDeviceMemory(f"out of GPU memory while sampling: {hint}") from e
        finally:
            managed.park()
        return io.NodeOutput(bits_latent(bits.cpu(), pipe.autoencoder.family))


NODES = [BitDanceModelLoader, BitDanceTextEncode, BitDanceARSampler]
