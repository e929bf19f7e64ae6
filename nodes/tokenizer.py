"""Binary tokenizer nodes: loader, decode (bits -> IMAGE), encode (IMAGE -> bits)."""
from __future__ import annotations

import os

import torch
from comfy_api.latest import io

import comfy.model_management as mm

from . import paths
from .convert import image_to_pixels, pixels_to_image
from .engine import bd, images_per_decode
from .memory import DTYPE_CHOICES, Managed, make_room, pick_dtype, pick_tokenizer_device
from .validation import check_combo
from .types import Tokenizer, TokenizerType, bits_latent, expect, latent_bits


class BitDanceTokenizerLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BitDanceTokenizerLoader",
            display_name="BitDance Tokenizer Loader",
            category="BitDance/loaders",
            description="Loads a binary tokenizer on its own: a model folder's tokenizer, a BitDance-Tokenizer "
                        "file (ae_*.safetensors beside its ae_*_config.json), or a UniWeTok checkpoint (.pt, "
                        "its ddconfig in <name>_config.json or config.json beside it).",
            inputs=[
                io.Combo.Input("tokenizer", options=paths.list_tokenizers(),
                               tooltip="A folder with ae_config.json, an ae_*.safetensors file or a UniWeTok .pt, "
                                       "in models/bitdance/"),
                io.Combo.Input("dtype", options=DTYPE_CHOICES, default="auto"),
            ],
            outputs=[TokenizerType.Output(display_name="tokenizer")],
        )

    @classmethod
    def validate_inputs(cls, tokenizer=None):  # one input: see validation.py
        return check_combo(cls, "tokenizer", tokenizer)

    @classmethod
    def execute(cls, tokenizer: str, dtype: str = "auto") -> io.NodeOutput:
        path = paths.resolve(tokenizer, "tokenizer")
        device = pick_tokenizer_device()
        torch_dtype = pick_dtype(dtype, device)
        make_room(bd.find_tokenizer_files(path)[1], device, torch_dtype)  # its weights, not a whole model folder
        ae = bd.load_tokenizer(path, device=device, dtype=torch_dtype)
        managed = Managed(ae, {"autoencoder": ae}, device, os.path.realpath(path), tokenizer)
        return io.NodeOutput(Tokenizer(ae, managed))


class BitDanceDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BitDanceDecode",
            display_name="BitDance Decode",
            category="BitDance/tokenizer",
            description="Decodes BitDance bits (a LATENT from a BitDance sampler or BitDance Encode) into images.",
            inputs=[
                TokenizerType.Input("tokenizer"),
                io.Latent.Input("bits"),
                io.Int.Input("gan_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Noise seed of GAN decoders (d32 tokenizers, UniWeTok); plain decoders ignore it"),
                io.Int.Input("images_at_once", default=0, min=0, max=64,
                             tooltip="Decode this many images at a time to save memory (0 = all)"),
                io.Int.Input("tile", default=0, min=0, max=4096, step=16, optional=True,
                             tooltip="Decode in overlapping tiles of this many pixels to save memory "
                                     "(0 = whole image; tiles are approximate near their seams)"),
            ],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, tokenizer, bits, gan_seed: int = 0, images_at_once: int = 0, tile: int = 0) -> io.NodeOutput:
        tok = expect(tokenizer, Tokenizer, "tokenizer", "a BitDance loader")
        samples = latent_bits(bits, tok)
        tok.owner.ensure_loaded()
        mm.throw_exception_if_processing_interrupted()
        device = tok.owner.device
        chunk = images_at_once or None
        if chunk is None and device.type != "cpu":  # "all": as many as the free memory takes (the same pixels)
            f = tok.ae.downsample
            fits = images_per_decode(tok.ae, samples.shape[-2] * f, samples.shape[-1] * f, mm.get_free_memory(device))
            if fits < samples.shape[0]:
                chunk = fits
                print(f"[BitDance] decoding {fits} image(s) at a time: {samples.shape[0]} at once would not fit the "
                      "free GPU memory", flush=True)
        gen = torch.Generator(device=device).manual_seed(int(gan_seed))
        try:
            pixels = tok.ae.decode(samples.to(device), generator=gen, chunk=chunk, tile=tile or None)
        finally:
            tok.owner.park()
        return io.NodeOutput(pixels_to_image(pixels))


class BitDanceEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BitDanceEncode",
            display_name="BitDance Encode",
            category="BitDance/tokenizer",
            description="Encodes images into BitDance bits (a LATENT tagged with this tokenizer). Width and height "
                        "must divide by the tokenizer's factor (16 or 32; UniWeTok: 32, and at least 64).",
            inputs=[TokenizerType.Input("tokenizer"), io.Image.Input("image")],
            outputs=[io.Latent.Output(display_name="bits")],
        )

    @classmethod
    def execute(cls, tokenizer, image) -> io.NodeOutput:
        tok = expect(tokenizer, Tokenizer, "tokenizer", "a BitDance loader")
        tok.owner.ensure_loaded()
        try:
            bits = tok.ae.encode(image_to_pixels(image).to(tok.owner.device))
        finally:
            tok.owner.park()
        return io.NodeOutput(bits_latent(bits.to("cpu", torch.float32), tok.family))


NODES = [BitDanceTokenizerLoader, BitDanceDecode, BitDanceEncode]
