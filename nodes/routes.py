"""HTTP routes for the web extension (web/bitdance.js)."""
from __future__ import annotations

from aiohttp import web

from . import paths
from .engine import bd, describe_t2i, imagenet_classes


def register(server) -> None:
    routes = server.routes

    @routes.get("/bitdance/model_info")
    async def model_info(request: web.Request) -> web.Response:
        """What a text-to-image model makes (sizes, block, AR steps), from its config files and tokenizer."""
        name = request.query.get("model", "")
        try:
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
