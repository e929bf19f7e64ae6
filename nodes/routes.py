"""HTTP routes for the web extension (web/bitdance.js)."""
from __future__ import annotations

import asyncio

from aiohttp import web

from . import paths
from .engine import bd, describe_split, describe_t2i, imagenet_classes

# the split loader's inputs: (query key, ComfyUI folder, what)
SPLIT_SLOTS = (("main_model", "diffusion_models", "main model"), ("text_encoder", "text_encoders", "text encoder"),
               ("vae", "vae", "VAE"))


def register(server) -> None:
    routes = server.routes

    @routes.get("/bitdance/model_info")
    async def model_info(request: web.Request) -> web.Response:
        """What a text-to-image model makes (sizes, block, AR steps), from its config files and tokenizer:
        ?model=<folder in models/bitdance>, or the split loader's
        ?main_model=&text_encoder=&vae=&parallel_num= (file headers only)."""
        q = request.query
        name = q.get("main_model", q.get("model", ""))
        try:
            if "main_model" in q:
                files = [paths.resolve_split_file(folder, q.get(key, ""), what) for key, folder, what in SPLIT_SLOTS]
                p = q.get("parallel_num", "auto")
                if p != "auto" and not p.isdigit():
                    raise bd.BitDanceError(f"parallel_num '{p}' is not a number")
                # builds the prompt tokenizer too (a second or two): off the event loop
                info = await asyncio.to_thread(describe_split, *files, paths.comfy_qwen_vocab(),
                                               None if p == "auto" else int(p))
            else:
                info = describe_t2i(paths.resolve(name, "model"))
        except bd.BitDanceError as e:
            return web.json_response({"model": name, "available": False, "error": str(e)})
        return web.json_response({"model": name, "available": True, **info})

    @routes.get("/bitdance/imagenet_info")
    async def imagenet_info(request: web.Request) -> web.Response:
        """A class-conditional checkpoint's classes, as the class sampler lists them."""
        name = request.query.get("checkpoint", "")
        try:
            classes = imagenet_classes(paths.resolve(name, "checkpoint"))
        except bd.BitDanceError as e:
            return web.json_response({"checkpoint": name, "available": False, "error": str(e)})
        return web.json_response({"checkpoint": name, "available": True, "classes": classes})
