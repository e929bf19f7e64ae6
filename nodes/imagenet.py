"""ImageNet class-conditional nodes: loader and class sampler."""
from __future__ import annotations

import os

from comfy_api.latest import io

from . import paths
from .engine import bd, class_label, imagenet_class_names, parse_class_label
from .memory import DTYPE_CHOICES, Managed, make_room, pick_device, pick_dtype
from .continuation import init_input, read_init
from .validation import check_combo
from .progress import BlockProgress, preview_decoder
from .types import ImageNetModelType, Tokenizer, TokenizerType, bits_latent, expect

AUTO = "auto"
CFG_SCHEDULES = ["linear", "constant"]


def class_options() -> list[str]:
    """The 1000 ImageNet classes (the released models); the web extension lists the connected model's."""
    return [class_label(i, name) for i, name in enumerate(imagenet_class_names())]


def _is_vae(name: str) -> bool:
    base = os.path.basename(name).lower()
    return base.startswith(("ae_", "vae"))


class BitDanceImageNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        pts = paths.list_checkpoints()
        return io.Schema(
            node_id="BitDanceImageNetLoader",
            display_name="BitDance ImageNet Loader",
            category="BitDance/loaders",
            description="Loads a BitDance-ImageNet checkpoint (.pt, 256x256 class-conditional) from models/bitdance/, "
                        "with its binary tokenizer.",
            inputs=[
                io.Combo.Input("checkpoint", options=[p for p in pts if not _is_vae(p)],
                               tooltip="e.g. BitDance-ImageNet/BitDance_B_1x.pt"),
                io.Combo.Input("vae", options=[AUTO] + [p for p in pts if _is_vae(p)] + paths.list_tokenizer_files(),
                               default=AUTO,
                               tooltip="The tokenizer weights (ae_d16c32.pt, or BitDance-Tokenizer's "
                                       "ae_d16c32.safetensors); auto: the checkpoint's own copy, or the one beside it"),
                io.Combo.Input("dtype", options=DTYPE_CHOICES, default="auto"),
            ],
            outputs=[ImageNetModelType.Output(display_name="model"), TokenizerType.Output(display_name="tokenizer")],
        )

    @classmethod
    def validate_inputs(cls, checkpoint=None):  # one input: see validation.py (vae is checked when it loads)
        return check_combo(cls, "checkpoint", checkpoint)

    @classmethod
    def execute(cls, checkpoint: str, vae: str = AUTO, dtype: str = "auto") -> io.NodeOutput:
        path = paths.resolve(checkpoint, "checkpoint")
        vae_path = None if vae == AUTO else paths.resolve(vae, "vae")
        device = pick_device()
        torch_dtype = pick_dtype(dtype, device)
        make_room(path, device, torch_dtype)
        net = bd.load_imagenet(path, vae=vae_path, device=device, dtype=torch_dtype)
        managed = Managed(net, {"model": net.model}, device, os.path.realpath(path), checkpoint)
        return io.NodeOutput(managed, Tokenizer(net.autoencoder, managed))


class BitDanceImageNetSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        options = class_options()
        return io.Schema(
            node_id="BitDanceImageNetSampler",
            display_name="BitDance ImageNet Class Sampler",
            category="BitDance/sampling",
            description="Generates 256x256 images of an ImageNet class, block by block. Outputs a LATENT of ±1 bits "
                        "for BitDance Decode.",
            inputs=[
                ImageNetModelType.Input("model"),
                io.Combo.Input("class_name", options=options, default=options[0] if options else None,
                               tooltip="The class to draw: one of the 1000 ImageNet classes, or the connected "
                                       "model's own (the digits demo: 0 to 9)"),
                io.Int.Input("class_index", default=-1, min=-1, max=999,
                             tooltip="-1: use class_name; otherwise this class index (0..999)"),
                io.Int.Input("steps", default=100, min=1, max=1000, tooltip="Diffusion-head steps per AR block"),
                io.Float.Input("cfg", default=-1.0, min=-1.0, max=100.0, step=0.05, round=0.01,
                               tooltip="Guidance scale; -1 = the model's recommended value"),
                io.Combo.Input("cfg_schedule", options=CFG_SCHEDULES, default="linear"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Int.Input("batch_size", default=1, min=1, max=64),
                init_input(),
            ],
            outputs=[io.Latent.Output(display_name="bits")],
        )

    @classmethod
    def validate_inputs(cls, class_name=None):
        """Any '<index>: <name>' or '<index>': the names listed are ImageNet's, but a model with other
        classes (the digits demo: '0' .. '9', which the web extension lists) is checked when it runs.
        class_name must stay an argument here: later ComfyUI versions check every combo that
        validate_inputs does not take against its options, which would refuse the digits' labels."""
        if class_name is None:
            return True
        try:
            parse_class_label(class_name)
        except bd.BitDanceError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, model, class_name: str, class_index: int, steps: int, cfg: float, cfg_schedule: str, seed: int,
                batch_size: int, init=None) -> io.NodeOutput:
        managed = expect(model, Managed, "model", "BitDance ImageNet Loader")
        net = managed.obj
        index = class_index if class_index >= 0 else parse_class_label(class_name)
        if index >= net.num_classes:
            labels = [class_label(i, n) for i, n in enumerate(net.class_names)]
            shown = ", ".join(labels if len(labels) <= 20 else labels[:20] + ["..."])
            what = f"class_index {class_index}" if class_index >= 0 else f"class_name '{class_name}'"
            raise bd.BitDanceError(f"{what}: {managed.name} has {net.num_classes} classes ({shown}); choose one of them")
        init_bits = keep = None
        if init is not None:  # continue an image: its mask (the size must be the model's)
            init_bits, mask, batch_size, _, _ = read_init(init, net.autoencoder.family, net.autoencoder.downsample,
                                                          batch_size)
            keep = bd.keep_from_noise_mask(net.block_grid(), mask, batch_size)
        managed.ensure_loaded()
        progress = BlockProgress(decode=preview_decoder(net.autoencoder, net.device))
        bits = net.generate(classes=[index] * batch_size, steps=steps, cfg=None if cfg < 0 else cfg,
                            cfg_schedule=cfg_schedule, seed=seed, callback=progress, init_bits=init_bits, keep=keep)
        return io.NodeOutput(bits_latent(bits.cpu(), net.autoencoder.family))


NODES = [BitDanceImageNetLoader, BitDanceImageNetSampler]
